"""A network described without torch: its layers, tensors and shapes, as traced once on the host.

`edge-ft export` traces the user's module (edge_ft.host.describe) and writes this description into the bundle's
manifest under "model"; the cost model, the methods' rules (edge_ft.architecture) and the device's checks read it
from there, so nothing outside the model's own definition knows which network it is. LeNet-5's description ships
as edge_ft/descriptions/lenet5.json, written by the same tracer (a test re-traces it), and is the default everywhere.

JSON (format "edge-ft-model", version 1):
  name          the class name, e.g. "LeNet5"
  source        where the host found the class ("edge_ft.host.model:LeNet5", "path/to/net.py:Net"); provenance only
  input_shape   one example's shape, e.g. [1, 28, 28]
  output        the layer whose result is the logits (an nn.Linear: the classifier head)
  parameters    {name: shape} of every parameter, in state-dict order
  buffers       {name: shape} of every buffer (BatchNorm running statistics), in state-dict order
  layers        in forward (topological) order, each
                  name          module path ("features.0", "fc1") or, for a function, the traced node's name ("add")
                  kind          one of KINDS
                  inputs        names of the layers it reads (INPUT for the network's input)
                  input_shapes  one example's shape of each input, e.g. [[1, 28, 28]]
                  output_shape  one example's shape of its result
                  params        its own parameters' local names ("weight", "bias"); full name is "<name>.<local>"
                  attrs         kind-specific settings: conv2d in_channels, out_channels, kernel_size, stride,
                                padding, dilation, groups; linear in_features, out_features; batchnorm2d
                                num_features, eps, momentum; pools kernel_size, stride, padding; concat dim;
                                dropout p; "module" names the module of a parameter-free module's second and later
                                calls (the first call carries the module's own name)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge_ft.errors import UserError

FORMAT, VERSION = "edge-ft-model", 1
INPUT = "input"  # the name layers use for the network's input
WEIGHTED = ("conv2d", "linear")  # kinds with a weight matrix: FLOPs, LoRA, last-k count these
KINDS = WEIGHTED + ("batchnorm2d", "relu", "relu6", "hardswish", "avgpool2d", "maxpool2d", "adaptiveavgpool2d",
                    "mean", "flatten", "add", "concat", "dropout")
# Settings each kind must carry (what the cost model and the device read); a description without them is refused.
REQUIRED_ATTRS = {
    "conv2d": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"),
    "linear": ("in_features", "out_features"),
    "batchnorm2d": ("num_features", "eps"),
    "avgpool2d": ("kernel_size", "stride", "padding"), "maxpool2d": ("kernel_size", "stride", "padding"),
    "concat": ("dim",), "dropout": ("p",),
}
LENET5_FILE = Path(__file__).parent / "descriptions" / "lenet5.json"
LENET5_SOURCE = "edge_ft.host.model:LeNet5"


@dataclass(frozen=True)
class Layer:
    name: str  # module path or traced node name
    kind: str  # one of KINDS
    inputs: tuple[str, ...]  # producer layers (INPUT for the network input)
    input_shapes: tuple[tuple[int, ...], ...]  # per example, one per input
    output_shape: tuple[int, ...]  # per example
    params: tuple[str, ...] = ()  # local parameter names, e.g. ("weight", "bias")
    attrs: dict[str, Any] = field(default_factory=dict, hash=False)  # kind-specific settings (JSON values)

    def param_names(self) -> list[str]:
        return [f"{self.name}.{p}" for p in self.params]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "inputs": list(self.inputs),
                "input_shapes": [list(s) for s in self.input_shapes], "output_shape": list(self.output_shape),
                "params": list(self.params), "attrs": dict(self.attrs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layer:
        attrs = dict(d.get("attrs", {}))
        missing = [a for a in REQUIRED_ATTRS.get(str(d["kind"]), ()) if a not in attrs]
        if missing:
            raise ValueError(f"layer {d['name']} ({d['kind']}) lacks {', '.join(missing)}")
        return cls(str(d["name"]), str(d["kind"]), tuple(str(i) for i in d["inputs"]),
                   tuple(_shape(s) for s in d["input_shapes"]), _shape(d["output_shape"]),
                   tuple(str(p) for p in d.get("params", ())), attrs)


@dataclass(frozen=True)
class ModelDesc:
    name: str  # class name, e.g. "LeNet5"
    input_shape: tuple[int, ...]  # one example, e.g. (1, 28, 28)
    output: str  # the linear layer producing the logits
    parameters: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) in state-dict order
    layers: tuple[Layer, ...]  # forward order
    buffers: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (name, shape) in state-dict order
    source: str = ""  # where the class came from (provenance only)

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names) or INPUT in names:
            raise UserError(f"model {self.name}: layer names must be unique and not {INPUT!r}")
        unknown = next((layer for layer in self.layers if layer.kind not in KINDS), None)
        if unknown is not None:
            raise UserError(f"model {self.name}: layer {unknown.name} is a {unknown.kind}, which edge-ft does not "
                            f"support (supported: {', '.join(KINDS)})")
        params = {name for name, _ in self.parameters}
        for layer in self.layers:  # a layer's parameters are the model's, and a weighted layer has its weight
            if any(n not in params for n in layer.param_names()) or (
                    layer.kind in WEIGHTED and "weight" not in layer.params):
                raise UserError(f"model {self.name}: layer {layer.name}'s parameters do not match the model's; "
                                "re-export the bundle")
        head = self.layer(self.output)
        if head.kind != "linear":
            raise UserError(f"model {self.name}: its output comes from {head.name} ({head.kind}); the logits must "
                            "come from an nn.Linear head")

    # ------------------------------------------------------------------------------------------ queries

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.parameters)

    @property
    def statistics(self) -> dict[str, tuple[int, ...]]:
        """The buffers the graphs read, frozen like any frozen tensor: BatchNorm's running mean and variance
        (num_batches_tracked, an integer that eval mode never reads, is left out, as bundles leave it out)."""
        return {n: s for n, s in self.buffers if not n.endswith(".num_batches_tracked")}

    @property
    def title(self) -> str:
        """The name messages and tables use: "LeNet-5" for edge-ft's own, else the class name."""
        return "LeNet-5" if self.source == LENET5_SOURCE else self.name

    @property
    def num_classes(self) -> int:
        return self.layer(self.output).output_shape[0]

    def layers_of(self, *kinds: str) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if layer.kind in kinds)

    @property
    def linear_layers(self) -> tuple[str, ...]:
        return self.layers_of("linear")

    def dims(self, name: str) -> tuple[int, int]:
        """(in_features or in_channels, out_features or out_channels) of a linear or conv layer."""
        a = self.layer(name).attrs
        return (a["in_features"], a["out_features"]) if "in_features" in a else (a["in_channels"], a["out_channels"])

    def with_num_classes(self, num_classes: int) -> ModelDesc:
        """The same network with a `num_classes`-way head (what a new task's freshly initialised head gives)."""
        head = self.layer(self.output)
        if head.output_shape == (num_classes,):
            return self
        attrs = {**head.attrs, "out_features": num_classes}
        new_head = replace(head, output_shape=(num_classes,), attrs=attrs)
        shapes = {f"{head.name}.weight": (num_classes, attrs["in_features"]), f"{head.name}.bias": (num_classes,)}
        return replace(self, layers=tuple(new_head if lay.name == head.name else lay for lay in self.layers),
                       parameters=tuple((n, shapes.get(n, s)) for n, s in self.parameters))

    # ------------------------------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "source": self.source,
                "input_shape": list(self.input_shape), "output": self.output,
                "parameters": {n: list(s) for n, s in self.parameters},
                "buffers": {n: list(s) for n, s in self.buffers},
                "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model description") -> ModelDesc:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{where}: not an edge-ft model description; re-export the bundle")
        if d.get("version") != VERSION:
            raise UserError(f"{where}: model description version {d.get('version')!r}, this edge-ft reads "
                            f"{VERSION}; export the bundle with this edge-ft version")
        try:
            return cls(name=str(d["name"]), input_shape=_shape(d["input_shape"]), output=str(d["output"]),
                       parameters=tuple((str(n), _shape(s)) for n, s in d["parameters"].items()),
                       layers=tuple(Layer.from_dict(x) for x in d["layers"]),
                       buffers=tuple((str(n), _shape(s)) for n, s in d.get("buffers", {}).items()),
                       source=str(d.get("source", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where}: malformed model description ({e!r}); re-export the bundle") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict()) + "\n"


def _shape(value: Any) -> tuple[int, ...]:
    shape = tuple(value)
    if not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"shape {value!r} is not a list of non-negative integers")
    return shape


@lru_cache(maxsize=1)
def lenet5() -> ModelDesc:
    """LeNet-5's description (10 classes), as the tracer wrote it; bundles without a description are LeNet-5."""
    return ModelDesc.from_dict(json.loads(LENET5_FILE.read_text()), str(LENET5_FILE))


def model_from_manifest(manifest: dict[str, Any], where: str) -> ModelDesc:
    """The manifest's "model"; bundles and runs written before it existed were all LeNet-5 exports."""
    if "model" not in manifest:
        return lenet5()
    return ModelDesc.from_dict(manifest["model"], where)


__all__ = ["FORMAT", "INPUT", "KINDS", "VERSION", "WEIGHTED", "Layer", "ModelDesc", "lenet5", "model_from_manifest"]
