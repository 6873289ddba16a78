"""What one training step costs under each method, computed without torch from the model's description.

Any network edge_ft.model_desc describes (conv2d with stride/padding/dilation/groups, linear, BatchNorm2d, pools,
activations, add, concat, flatten, dropout) is costed; LeNet-5 is the default (cfg.model).

    from edge_ft.config import MethodConfig
    from edge_ft.costmodel import estimate

    est = estimate(MethodConfig("lora", rank=2), batch=32, optimizer="adamw", dtype="float32")
    est.params        # {"total": 45774, "trainable": 1348, "frozen": 44426}
    est.layers        # [LayerFlops(layer, forward, backward_input, backward_weight), ...] in forward order
    est.flops         # {"forward", "backward_input", "backward_weight", "backward", "total"} per training step
    est.memory        # {"weights", "gradients", "optimizer_state", "activations", "total"} in bytes
    est.saved         # {"fc1.input": bytes, "fc1.lora_hidden": bytes, ...}: what autograd keeps for backward
    est.to_dict()     # JSON-ready; `edge-ft analyze --json` prints one per method

Conventions (the tests hold them against torch.utils.flop_counter and autograd's saved-tensor hooks):
- FLOPs = 2 x multiply-accumulates of conv and linear (matmul) ops only, as torch.utils.flop_counter counts them;
  bias adds, ReLU, pooling, the loss and the optimizer update count 0.
- backward_input: FLOPs that produce activation gradients (a layer's input, and LoRA's hidden x A^T);
  backward_weight: FLOPs that produce parameter gradients. A frozen weight gets no gradient. A layer's input needs
  a gradient only when some layer below it trains, so the lowest trainable layer (and always conv1) gets none.
  Bias gradients are sums (0 FLOPs), but a trainable bias makes its layer "trainable" for that rule, which is why
  LoRA with bias="all" (conv1.bias trains) pays for input gradients all the way down to conv2.
- LoRA runs unmerged while training: forward adds x A^T (B,in)x(in,r) and then (B,r)x(r,out); backward adds
  dB, dA, the hidden gradient dz = dy B, and dx += dz A where the input needs a gradient.
- Grouped convs count their real MACs (in_channels / groups per output); flop_counter prices a grouped conv's
  weight gradient as if it were ungrouped, `groups` times more (the tests allow exactly that difference).
- Memory: weights = every parameter (adapters included), gradients = trainable parameters, optimizer state =
  OptimizerConfig.state_per_param x trainable parameters, all in `dtype`; AdamW's per-tensor step counters
  (a few bytes) are ignored. Activations = unique tensors autograd saves for backward, parameters excluded:
  conv inputs and ReLU outputs of every layer at or above the lowest trainable one, a linear layer's input when
  its weight trains or it has an adapter, LoRA's (B,r) hidden, and the log-probabilities of the loss.
  Other kinds, as autograd keeps them: BatchNorm its input and per-channel batch statistics, ReLU6 / Hardswish
  / pools their input (max pooling also int64 indices; a 1x1 adaptive pool is a mean and keeps nothing), dropout
  its mask; add, concat and flatten nothing. A linear layer whose weight is frozen keeps no input even when its
  bias trains (the bias method: BitFit, TinyTL); a conv keeps its input whenever it records a backward (torch's
  one formula for input, weight and bias), so bias-only keeps no linear layer's input but still the convs'.
  Not counted: the loss's int64 labels (8 bytes per example) and nll_loss's scalar weight sum, which autograd
  also keeps; they are inputs and bookkeeping, not activations, and the tests assert exactly that difference.
- cached=True prices a step on a cached frozen prefix (edge_ft.host.export.prefix): the layers up to the cut (the
  latest layer before the first that trains which no later layer reads around) run once per example, not per
  step, and count nothing; when the first layer that trains is a LoRA target reading the cut, its frozen product
  W0 x comes cached too and its forward counts the adapter's path alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, NamedTuple

from edge_ft.architecture import count_params, numel, owner, trainable_names
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.errors import UserError
from edge_ft.model_desc import INPUT, WEIGHTED, Layer, ModelDesc

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPES = tuple(DTYPE_BYTES)
ALIASES = ("flatten",)  # views: their result shares the input's storage, so saving either keeps the same bytes


class LayerFlops(NamedTuple):
    """One layer's FLOPs per training step (batch included), the unit an ONNX-graph count is compared with."""

    layer: str
    forward: int
    backward_input: int
    backward_weight: int


def _macs(layer: Layer) -> int:
    """Multiply-accumulates of a conv/linear op for one example (bias excluded)."""
    if layer.kind == "conv2d":
        a = layer.attrs
        kh, kw = a["kernel_size"]
        # every output value is a dot product over its group's (in_c / groups x kh x kw) window
        return int(numel(layer.output_shape) * (a["in_channels"] // a["groups"]) * kh * kw)
    return int(layer.attrs["in_features"] * layer.attrs["out_features"])


def layer_macs(layer: str, num_classes: int, model: ModelDesc | None = None) -> int:
    """Multiply-accumulates of the layer's conv/linear op for one example (bias excluded)."""
    from edge_ft.model_desc import lenet5

    return _macs((model or lenet5()).with_num_classes(num_classes).layer(layer))


def _grad_flow(cfg: MethodConfig) -> tuple[dict[str, bool], dict[str, bool]]:
    """(records_backward, output_requires_grad) per layer: an op records a backward node once one of its inputs
    requires a gradient or one of its own tensors trains; its result then requires a gradient."""
    owners = {owner(n) for n in trainable_names(cfg)}
    requires = {INPUT: False}
    records = {}
    for layer in cfg.network.layers:
        records[layer.name] = layer.name in owners or any(requires[i] for i in layer.inputs)
        requires[layer.name] = records[layer.name]
    return records, requires


def input_grad_layers(cfg: MethodConfig) -> list[str]:
    """Conv/linear layers whose input needs a gradient: those reached by a trainable tensor below them."""
    _, requires = _grad_flow(cfg)
    return [layer.name for layer in cfg.network.layers
            if layer.kind in WEIGHTED and any(requires[i] for i in layer.inputs)]


def cached_prefix(cfg: MethodConfig) -> tuple[set[str], str | None]:
    """(the layers a cached frozen prefix runs once per example, the LoRA target whose frozen product it hands
    over too or None), cut where the exporter cuts: the latest layer before the first that trains which no later
    layer reads around. Empty when the first layer trains (full, bias)."""
    layers, owners = cfg.network.layers, {owner(n) for n in trainable_names(cfg)}
    first = next((i for i, layer in enumerate(layers) if layer.name in owners), 0)
    position = {layer.name: i for i, layer in enumerate(layers)}
    lowest_read = len(layers)  # the lowest layer index read by any layer after the candidate (INPUT: -1)
    for i in range(len(layers) - 1, -1, -1):
        if i < first and lowest_read >= i:
            target = layers[first]
            lora = (cfg.method == "lora" and target.name in (cfg.targets or ()) and target.inputs == (layers[i].name,)
                    and not {f"{target.name}.weight", f"{target.name}.bias"} & set(trainable_names(cfg)))
            return {layer.name for layer in layers[:i + 1]}, target.name if lora else None
        lowest_read = min([lowest_read, *(position.get(n, -1) for n in layers[i].inputs)])
    return set(), None


def layer_flops(cfg: MethodConfig, batch: int, cached: bool = False) -> list[LayerFlops]:
    """Per-layer forward / input-gradient / weight-gradient FLOPs of one step at `batch`, conv/linear layers in
    forward order; cached: a step on the cached frozen prefix (the suffix's layers alone)."""
    trainable = set(trainable_names(cfg))
    needs_input_grad = set(input_grad_layers(cfg))
    prefix, product = cached_prefix(cfg) if cached else (set(), None)
    rows = []
    for layer in cfg.network.layers:
        if layer.kind not in WEIGHTED or layer.name in prefix:
            continue  # flop_counter's convention: only conv and matmul ops count
        base = 2 * batch * _macs(layer)  # y = W x, and each of dx = W^T dy, dW = dy x^T
        forward = 0 if layer.name == product else base
        backward_input = base if layer.name in needs_input_grad else 0
        backward_weight = base if f"{layer.name}.weight" in trainable else 0
        if cfg.method == "lora" and layer.name in (cfg.targets or ()):
            fan_in, fan_out = layer.attrs["in_features"], layer.attrs["out_features"]
            down = 2 * batch * fan_in * cfg.rank  # z = x A^T: (B,in) x (in,r); also dA = dz^T x and dx += dz A
            up = 2 * batch * cfg.rank * fan_out  # z B^T: (B,r) x (r,out); also dB = dy^T z and dz = dy B
            forward += down + up
            backward_weight += down + up
            backward_input += up  # dz is needed for dA even when x needs no gradient
            if layer.name in needs_input_grad:
                backward_input += down
        rows.append(LayerFlops(layer.name, forward, backward_input, backward_weight))
    return rows


def _saves(layer: Layer, cfg: MethodConfig, trainable: set[str]) -> list[tuple[int, str]]:
    """What the layer's backward keeps, as autograd does: (input index, or -1 for its output) and a role.

    conv2d keeps its input for any gradient (one backward formula for input, weight and bias); linear keeps it
    only for its weight's (or an adapter's) gradient, so a layer whose bias alone trains keeps nothing (BitFit,
    TinyTL); ReLU keeps its result, ReLU6/Hardswish/pools/BatchNorm their input; add, concat, flatten and a mean
    keep no activations.
    """
    kind = layer.kind
    if kind == "conv2d" or kind in ("relu6", "hardswish", "avgpool2d", "maxpool2d", "batchnorm2d"):
        return [(0, "input")]
    if kind == "adaptiveavgpool2d":  # a 1x1 output is computed as a mean, which keeps nothing
        return [] if layer.output_shape[1:] == (1, 1) else [(0, "input")]
    if kind == "linear":
        adapted = cfg.method == "lora" and layer.name in (cfg.targets or ())
        return [(0, "input")] if f"{layer.name}.weight" in trainable or adapted else []
    if kind == "relu":
        return [(-1, "relu")]
    return []


def _extra_saved(layer: Layer, batch: int, cfg: MethodConfig) -> dict[str, tuple[int, int | None]]:
    """Tensors a layer keeps besides activations: name -> (elements, fixed bytes per element or None)."""
    if cfg.method == "lora" and layer.name in (cfg.targets or ()):
        return {f"{layer.name}.lora_hidden": (batch * cfg.rank, None)}  # z = x A^T, needed for dB
    if layer.kind == "batchnorm2d":  # per-channel batch mean and inverse std
        return {f"{layer.name}.batch_stats": (2 * layer.output_shape[0], None)}
    if layer.kind == "maxpool2d":  # argmax indices, int64
        return {f"{layer.name}.indices": (batch * numel(layer.output_shape), 8)}
    if layer.kind == "dropout" and layer.attrs.get("p", 0) > 0:  # the scaled keep-mask, in the training dtype
        return {f"{layer.name}.mask": (batch * numel(layer.output_shape), None)}
    return {}


def saved_tensors(cfg: MethodConfig, batch: int) -> dict[str, tuple[int, int | None]]:
    """Every tensor autograd keeps for backward (parameters and buffers excluded): name -> (elements, fixed bytes
    per element, None for the training dtype). An activation is named by the conv/linear layer that keeps it as
    its input ("fc1.input"), else by the weight layer it comes from and what produced it ("conv1.relu")."""
    net = cfg.network
    trainable = set(trainable_names(cfg))
    records, _ = _grad_flow(cfg)
    by_name = {layer.name: layer for layer in net.layers}
    storage = {INPUT: INPUT}  # tensor -> the tensor whose memory it is (views share it)
    source: dict[str, str | None] = {INPUT: None}  # tensor -> nearest conv/linear layer at or above it
    names: dict[str, str] = {}  # storage -> name
    kept_as_input: set[str] = set()  # storages a conv/linear layer keeps (and names) as its input
    elements: dict[str, int] = {}
    extra: dict[str, tuple[int, int | None]] = {}
    for layer in net.layers:
        first = layer.inputs[0] if layer.inputs else INPUT
        storage[layer.name] = storage[first] if layer.kind in ALIASES else layer.name
        source[layer.name] = layer.name if layer.kind in WEIGHTED else source.get(first)
        if not records[layer.name]:
            continue
        for index, role in _saves(layer, cfg, trainable):
            tensor = layer.name if index < 0 else layer.inputs[index]
            shape = layer.output_shape if index < 0 else layer.input_shapes[index]
            key = storage[tensor]
            elements.setdefault(key, batch * numel(shape))
            if layer.kind in WEIGHTED and role == "input" and key not in kept_as_input:
                names[key] = f"{layer.name}.input"  # who keeps it for its gradient names it
                kept_as_input.add(key)
            elif key not in names:
                producer = by_name.get(key)
                names[key] = (f"{source[key]}.{producer.kind}" if producer and source[key] else
                              f"{layer.name}.{role}")
        extra.update(_extra_saved(layer, batch, cfg))
    saved: dict[str, tuple[int, int | None]] = {names[k]: (n, None) for k, n in elements.items()}
    for name, value in extra.items():
        saved[name] = value
    saved["loss.log_probs"] = (batch * cfg.num_classes, None)  # log_softmax saves its output; nll_loss reuses it
    return saved


def saved_activation_elements(cfg: MethodConfig, batch: int) -> dict[str, int]:
    """Elements of every tensor autograd keeps for backward (parameters excluded), named by who saves it."""
    return {name: n for name, (n, _) in saved_tensors(cfg, batch).items()}


@dataclass(frozen=True)
class CostEstimate:
    config: MethodConfig  # the method and its LoRA settings
    batch: int  # examples per training step
    optimizer: str  # sgd | sgd-momentum | adamw
    dtype: str  # float32 | float16 | bfloat16: bytes per stored value
    params: dict[str, int]  # total / trainable / frozen parameter counts
    layers: tuple[LayerFlops, ...]  # per-layer FLOPs in forward order
    saved: dict[str, int]  # saved activation tensor -> bytes
    memory: dict[str, int]  # bytes: weights, gradients, optimizer_state, activations, total

    @property
    def flops(self) -> dict[str, int]:
        forward = sum(r.forward for r in self.layers)
        backward_input = sum(r.backward_input for r in self.layers)
        backward_weight = sum(r.backward_weight for r in self.layers)
        backward = backward_input + backward_weight
        return {"forward": forward, "backward_input": backward_input, "backward_weight": backward_weight,
                "backward": backward, "total": forward + backward}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "batch": self.batch,
            "optimizer": self.optimizer,
            "dtype": self.dtype,
            "trainable_params": self.params["trainable"],
            "frozen_params": self.params["frozen"],
            "total_params": self.params["total"],
            "flops": self.flops,
            "memory_bytes": dict(self.memory),
            "layers": [r._asdict() for r in self.layers],
            "saved_activations_bytes": dict(self.saved),
        }


def estimate(cfg: MethodConfig, batch: int = 32, optimizer: OptimizerConfig | str = "adamw",
             dtype: str = "float32", cached: bool = False) -> CostEstimate:
    """Parameters, FLOPs per training step and memory of training cfg.model with `cfg` at `batch`; cached: the
    step's FLOPs on a cached frozen prefix (layer_flops)."""
    batch_arg = batch
    try:
        batch = -1 if isinstance(batch, bool) else operator.index(batch)  # ints, numpy ints; not 2.5, "32", True
    except TypeError:
        batch = -1
    if batch < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_arg!r}")
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    opt = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(name=optimizer)
    size = DTYPE_BYTES[dtype]
    params = count_params(cfg)
    saved = {name: n * (fixed or size) for name, (n, fixed) in saved_tensors(cfg, batch).items()}
    memory = {
        "weights": params["total"] * size,
        "gradients": params["trainable"] * size,
        "optimizer_state": opt.state_per_param * params["trainable"] * size,
        "activations": sum(saved.values()),
    }
    memory["total"] = sum(memory.values())
    return CostEstimate(cfg, batch, opt.name, dtype, params, tuple(layer_flops(cfg, batch, cached)), saved, memory)


def estimate_all(lora: MethodConfig, batch: int = 32, optimizer: OptimizerConfig | str = "adamw",
                 dtype: str = "float32") -> dict[str, CostEstimate]:
    """The three methods side by side; full and probe share `lora`'s model and class count."""
    configs = {
        "full": MethodConfig("full", num_classes=lora.num_classes, model=lora.model),
        "probe": MethodConfig("probe", num_classes=lora.num_classes, model=lora.model),
        "lora": lora,
    }
    return {name: estimate(cfg, batch, optimizer, dtype) for name, cfg in configs.items()}


__all__ = ["DTYPES", "DTYPE_BYTES", "CostEstimate", "LayerFlops", "cached_prefix", "estimate", "estimate_all",
           "input_grad_layers", "layer_flops", "layer_macs", "saved_activation_elements"]
