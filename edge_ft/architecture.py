"""LeNet-5's parameters described without torch: names, shapes and which ones each method trains.

The host model (edge_ft.host.model) and this table must agree; a test checks them against each other.
The device side, the cost model and bundle manifests use this table, so they never need torch.
"""

from __future__ import annotations

from edge_ft.config import LINEAR_LAYERS, MethodConfig

INPUT_SHAPE = (1, 28, 28)  # C, H, W of one example
POOL = 2  # each conv is followed by ReLU and a 2x2, stride-2 average pool

# name -> (kind, in, out, kernel); conv spatial sizes follow from the 28x28 input.
LAYER_SPECS = {
    "conv1": ("conv", 1, 6, 5),  # (B,1,28,28) -> (B,6,24,24), pooled to 12x12
    "conv2": ("conv", 6, 16, 5),  # (B,6,12,12) -> (B,16,8,8), pooled to 4x4
    "fc1": ("linear", 256, 120, None),
    "fc2": ("linear", 120, 84, None),
    "fc3": ("linear", 84, None, None),  # out = num_classes
}


def layer_dims(layer: str, num_classes: int) -> tuple[int, int]:
    """(in_features or in_channels, out_features or out_channels)."""
    _, fan_in, fan_out, _ = LAYER_SPECS[layer]
    return fan_in, (num_classes if fan_out is None else fan_out)


def layer_io_shapes(num_classes: int = 10) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per-example (input, output) shape of each layer's conv/linear op, in forward order.

    {"conv1": ((1,28,28), (6,24,24)), "conv2": ((6,12,12), (16,8,8)), "fc1": ((256,), (120,)), ...}
    """
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    c, h, w = INPUT_SHAPE
    for layer, (kind, _, _, k) in LAYER_SPECS.items():
        fan_in, fan_out = layer_dims(layer, num_classes)
        if kind == "conv":
            out = (fan_out, h - k + 1, w - k + 1)  # valid convolution, stride 1
            shapes[layer] = ((c, h, w), out)
            c, h, w = fan_out, out[1] // POOL, out[2] // POOL
        else:
            shapes[layer] = ((fan_in,), (fan_out,))
    return shapes


def base_param_shapes(num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """The pretrained model's parameters in state-dict order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (kind, fan_in, fan_out, k) in LAYER_SPECS.items():
        fan_out = num_classes if fan_out is None else fan_out
        shapes[f"{layer}.weight"] = (fan_out, fan_in, k, k) if kind == "conv" else (fan_out, fan_in)
        shapes[f"{layer}.bias"] = (fan_out,)
    return shapes


def param_shapes(cfg: MethodConfig) -> dict[str, tuple[int, ...]]:
    """All parameters of the model as the method builds it (LoRA adds lora_A/lora_B per target)."""
    shapes = base_param_shapes(cfg.num_classes)
    if cfg.method != "lora":
        return shapes
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        out[name] = shape
        layer, kind = name.split(".")
        if kind == "bias" and layer in cfg.targets:  # torch registers lora_A/B after weight and bias
            fan_in, fan_out = layer_dims(layer, cfg.num_classes)
            out[f"{layer}.lora_A"] = (cfg.rank, fan_in)
            out[f"{layer}.lora_B"] = (fan_out, cfg.rank)
    return out


def trainable_names(cfg: MethodConfig) -> list[str]:
    """Parameter names that receive gradients under the method, in state-dict order."""
    names = list(param_shapes(cfg))
    if cfg.method == "full":
        return names
    if cfg.method == "probe":
        return ["fc3.weight", "fc3.bias"]
    trainable = [n for n in names if n.endswith(".lora_B" if cfg.freeze_lora_a else (".lora_A", ".lora_B"))]
    if cfg.bias == "all":
        trainable += [n for n in names if n.endswith(".bias")]
    elif cfg.bias == "lora_only":
        trainable += [f"{t}.bias" for t in cfg.targets]
    for layer in cfg.modules_to_save:  # trained whole, as PEFT's modules_to_save copy
        trainable += [f"{layer}.weight", f"{layer}.bias"]
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


def lowest_trainable_layer(cfg: MethodConfig) -> str:
    """The first layer (in forward order) owning a trainable tensor: nothing below it needs a gradient."""
    layers = [n.split(".")[0] for n in trainable_names(cfg)]
    return next(layer for layer in LAYER_SPECS if layer in layers)


__all__ = [
    "INPUT_SHAPE",
    "LAYER_SPECS",
    "POOL",
    "LINEAR_LAYERS",
    "base_param_shapes",
    "count_params",
    "frozen_names",
    "layer_dims",
    "layer_io_shapes",
    "lowest_trainable_layer",
    "numel",
    "param_shapes",
    "trainable_names",
]
