"""What one training step of LeNet-5 costs under full fine-tuning, linear probing and LoRA, computed without torch.

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
- Memory: weights = every parameter (adapters included), gradients = trainable parameters, optimizer state =
  OptimizerConfig.state_per_param x trainable parameters, all in `dtype`; AdamW's per-tensor step counters
  (a few bytes) are ignored. Activations = unique tensors autograd saves for backward, parameters excluded:
  conv inputs and ReLU outputs of every layer at or above the lowest trainable one, a linear layer's input when
  its weight trains or it has an adapter, LoRA's (B,r) hidden, and the log-probabilities of the loss.
  Not counted: the loss's int64 labels (8 bytes per example) and nll_loss's scalar weight sum, which autograd
  also keeps; they are inputs and bookkeeping, not activations, and the tests assert exactly that difference.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

from edge_ft.architecture import (
    LAYER_SPECS,
    count_params,
    layer_dims,
    layer_io_shapes,
    lowest_trainable_layer,
    numel,
    trainable_names,
)
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.errors import UserError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPES = tuple(DTYPE_BYTES)


class LayerFlops(NamedTuple):
    """One layer's FLOPs per training step (batch included), the unit an ONNX-graph count is compared with."""

    layer: str
    forward: int
    backward_input: int
    backward_weight: int


def layer_macs(layer: str, num_classes: int) -> int:
    """Multiply-accumulates of the layer's conv/linear op for one example (bias excluded)."""
    (fan_in_shape, out_shape) = layer_io_shapes(num_classes)[layer]
    kind, _, _, k = LAYER_SPECS[layer]
    if kind == "conv":
        return numel(out_shape) * fan_in_shape[0] * k * k  # every output value is a (in_c x k x k) dot product
    return fan_in_shape[0] * out_shape[0]


def input_grad_layers(cfg: MethodConfig) -> list[str]:
    """Layers whose input needs a gradient: every layer above the lowest one that owns a trainable tensor."""
    layers = list(LAYER_SPECS)
    return layers[layers.index(lowest_trainable_layer(cfg)) + 1:]


def layer_flops(cfg: MethodConfig, batch: int) -> list[LayerFlops]:
    """Per-layer forward / input-gradient / weight-gradient FLOPs of one step at `batch`, in forward order."""
    trainable = set(trainable_names(cfg))
    needs_input_grad = set(input_grad_layers(cfg))
    rows = []
    for layer in LAYER_SPECS:
        base = 2 * batch * layer_macs(layer, cfg.num_classes)  # y = W x, and each of dx = W^T dy, dW = dy x^T
        forward = base
        backward_input = base if layer in needs_input_grad else 0
        backward_weight = base if f"{layer}.weight" in trainable else 0
        if cfg.method == "lora" and layer in cfg.targets:
            fan_in, fan_out = layer_dims(layer, cfg.num_classes)
            down = 2 * batch * fan_in * cfg.rank  # z = x A^T: (B,in) x (in,r); also dA = dz^T x and dx += dz A
            up = 2 * batch * cfg.rank * fan_out  # z B^T: (B,r) x (r,out); also dB = dy^T z and dz = dy B
            forward += down + up
            backward_weight += down + up
            backward_input += up  # dz is needed for dA even when x needs no gradient
            if layer in needs_input_grad:
                backward_input += down
        rows.append(LayerFlops(layer, forward, backward_input, backward_weight))
    return rows


def saved_activation_elements(cfg: MethodConfig, batch: int) -> dict[str, int]:
    """Elements of every tensor autograd keeps for backward (parameters excluded), named by who saves it."""
    layers = list(LAYER_SPECS)
    lowest = layers.index(lowest_trainable_layer(cfg))
    trainable = set(trainable_names(cfg))
    shapes = layer_io_shapes(cfg.num_classes)
    saved: dict[str, int] = {}
    for i, layer in enumerate(layers):
        kind = LAYER_SPECS[layer][0]
        in_shape, out_shape = shapes[layer]
        has_grad_fn = i >= lowest  # an op records a backward node once any of its inputs or parameters trains
        adapted = cfg.method == "lora" and layer in cfg.targets
        if kind == "conv":
            if has_grad_fn:
                saved[f"{layer}.input"] = batch * numel(in_shape)  # convolution_backward needs x for dW
                saved[f"{layer}.relu"] = batch * numel(out_shape)  # ReLU saves its result; the pool reads the same
        else:
            # The input is the previous ReLU's saved result, or kept by the matmuls for dW / dA.
            prev_relu_saved = i > 0 and LAYER_SPECS[layers[i - 1]][0] == "linear" and i - 1 >= lowest
            if prev_relu_saved or f"{layer}.weight" in trainable or adapted:
                saved[f"{layer}.input"] = batch * numel(in_shape)
        if adapted:
            saved[f"{layer}.lora_hidden"] = batch * cfg.rank  # z = x A^T, needed for dB
    saved["loss.log_probs"] = batch * cfg.num_classes  # log_softmax saves its output; nll_loss reuses it
    return saved


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

    def to_dict(self) -> dict:
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
             dtype: str = "float32") -> CostEstimate:
    """Parameters, FLOPs per training step and memory of training LeNet-5 with `cfg` at `batch`."""
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
    saved = {name: n * size for name, n in saved_activation_elements(cfg, batch).items()}
    memory = {
        "weights": params["total"] * size,
        "gradients": params["trainable"] * size,
        "optimizer_state": opt.state_per_param * params["trainable"] * size,
        "activations": sum(saved.values()),
    }
    memory["total"] = sum(memory.values())
    return CostEstimate(cfg, batch, opt.name, dtype, params, tuple(layer_flops(cfg, batch)), saved, memory)


def estimate_all(lora: MethodConfig, batch: int = 32, optimizer: OptimizerConfig | str = "adamw",
                 dtype: str = "float32") -> dict[str, CostEstimate]:
    """The three methods side by side; full and probe share `lora`'s class count."""
    configs = {
        "full": MethodConfig("full", num_classes=lora.num_classes),
        "probe": MethodConfig("probe", num_classes=lora.num_classes),
        "lora": lora,
    }
    return {name: estimate(cfg, batch, optimizer, dtype) for name, cfg in configs.items()}


__all__ = ["DTYPES", "DTYPE_BYTES", "CostEstimate", "LayerFlops", "estimate", "estimate_all", "input_grad_layers",
           "layer_flops", "layer_macs", "saved_activation_elements"]
