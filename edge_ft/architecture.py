"""The methods as rules over a model description (edge_ft.model_desc), without torch: which tensors exist under a
method and which of them train.

    trainable_names(cfg)   # the one rule set: cfg.method over cfg.network (the description with cfg's head)

  full     every parameter
  probe    the head's weight and bias (cfg.head: the output layer unless --head names another linear layer)
  lora     rank-r lora_A/lora_B on cfg.targets (linear layers), biases per cfg.bias (PEFT semantics), and
           cfg.modules_to_save trained whole
  bias     every bias, BatchNorm's beta included (BitFit; TinyTL), and cfg.modules_to_save trained whole
  last-k   every parameter from the k-th last conv/linear layer (forward order) on, BatchNorms between included

The host's torch model (edge_ft.host.methods) and these tables must agree; tests check them against each other.
LAYER_SPECS and INPUT_SHAPE are LeNet-5's, derived from its description, for code that only knows LeNet-5.
"""

from __future__ import annotations

from edge_ft.config import LINEAR_LAYERS, MethodConfig
from edge_ft.model_desc import ModelDesc, lenet5

INPUT_SHAPE = lenet5().input_shape  # C, H, W of one LeNet-5 example
# LeNet-5's weight layers: name -> (kind, in, out, kernel); out None for the head (its class count varies).
LAYER_SPECS = {
    layer.name: ("conv" if layer.kind == "conv2d" else "linear", *lenet5().dims(layer.name),
                 layer.attrs["kernel_size"][0] if layer.kind == "conv2d" else None)
    for layer in lenet5().layers if layer.kind in ("conv2d", "linear")
}
LAYER_SPECS[lenet5().output] = (*LAYER_SPECS[lenet5().output][:2], None, None)


def layer_dims(layer: str, num_classes: int, model: ModelDesc | None = None) -> tuple[int, int]:
    """(in_features or in_channels, out_features or out_channels)."""
    return (model or lenet5()).with_num_classes(num_classes).dims(layer)


def layer_io_shapes(num_classes: int = 10, model: ModelDesc | None = None,
                    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per-example (input, output) shape of each conv/linear layer, in forward order.

    LeNet-5: {"conv1": ((1,28,28), (6,24,24)), "conv2": ((6,12,12), (16,8,8)), "fc1": ((256,), (120,)), ...}
    """
    net = (model or lenet5()).with_num_classes(num_classes)
    return {layer.name: (layer.input_shapes[0], layer.output_shape) for layer in net.layers
            if layer.kind in ("conv2d", "linear")}


def base_param_shapes(num_classes: int = 10, model: ModelDesc | None = None) -> dict[str, tuple[int, ...]]:
    """The pretrained model's parameters in state-dict order."""
    return (model or lenet5()).with_num_classes(num_classes).param_shapes


def param_shapes(cfg: MethodConfig) -> dict[str, tuple[int, ...]]:
    """All parameters of the model as the method builds it (LoRA adds lora_A/lora_B per target)."""
    net = cfg.network
    shapes = net.param_shapes
    if cfg.method != "lora":
        return shapes
    last_param = {}  # torch registers lora_A/B after the wrapped layer's own parameters
    for layer in cfg.targets:
        last_param[net.layer(layer).param_names()[-1]] = layer
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        out[name] = shape
        if name in last_param:
            layer = last_param[name]
            fan_in, fan_out = net.dims(layer)
            out[f"{layer}.lora_A"] = (cfg.rank, fan_in)
            out[f"{layer}.lora_B"] = (fan_out, cfg.rank)
    return out


def last_k_layers(cfg: MethodConfig) -> list[str]:
    """last-k: the layers with parameters from the k-th last conv/linear layer on, in forward order."""
    layers = [layer for layer in cfg.network.layers if layer.params]
    weighted = [i for i, layer in enumerate(layers) if layer.kind in ("conv2d", "linear")]
    return [layer.name for layer in layers[weighted[-cfg.last_k]:]]


def trainable_names(cfg: MethodConfig) -> list[str]:
    """Parameter names that receive gradients under the method, in state-dict order."""
    names = list(param_shapes(cfg))
    net = cfg.network
    if cfg.method == "full":
        return names
    if cfg.method == "probe":
        trainable = net.layer(cfg.head).param_names()
    elif cfg.method == "last-k":
        trainable = [n for layer in last_k_layers(cfg) for n in net.layer(layer).param_names()]
    elif cfg.method == "bias":
        trainable = [n for n in names if n.rsplit(".", 1)[-1] == "bias"]
    else:
        trainable = [n for n in names if n.endswith(".lora_B" if cfg.freeze_lora_a else (".lora_A", ".lora_B"))]
        if cfg.bias == "all":
            trainable += [n for n in names if n.endswith(".bias")]
        elif cfg.bias == "lora_only":
            trainable += [n for t in cfg.targets for n in net.layer(t).param_names() if n.endswith(".bias")]
    for layer in cfg.modules_to_save:  # trained whole, as PEFT's modules_to_save copy
        trainable += net.layer(layer).param_names()
    order = {n: i for i, n in enumerate(names)}
    return sorted(set(trainable), key=order.__getitem__)


def frozen_names(cfg: MethodConfig) -> list[str]:
    trainable = set(trainable_names(cfg))
    return [n for n in param_shapes(cfg) if n not in trainable]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def count_params(cfg: MethodConfig) -> dict[str, int]:
    shapes = param_shapes(cfg)
    total = sum(numel(s) for s in shapes.values())
    trainable = sum(numel(shapes[n]) for n in trainable_names(cfg))
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def owner(name: str) -> str:
    """The layer a parameter belongs to: 'features.0.weight' -> 'features.0', 'fc1.lora_A' -> 'fc1'."""
    return name.rsplit(".", 1)[0]


def lowest_trainable_layer(cfg: MethodConfig) -> str:
    """The first layer (in forward order) owning a trainable tensor: nothing below it needs a gradient."""
    layers = {owner(n) for n in trainable_names(cfg)}
    return next(layer.name for layer in cfg.network.layers if layer.name in layers)


__all__ = [
    "INPUT_SHAPE",
    "LAYER_SPECS",
    "LINEAR_LAYERS",
    "base_param_shapes",
    "count_params",
    "frozen_names",
    "last_k_layers",
    "layer_dims",
    "layer_io_shapes",
    "lowest_trainable_layer",
    "numel",
    "owner",
    "param_shapes",
    "trainable_names",
]
