"""Describe a torch module once, on the host: torch.fx traces its forward and ShapeProp runs it on a sample input.

Why torch.fx and not forward hooks: hooks see only module calls, so `x + skip`, `torch.cat`, `F.relu` and
`torch.flatten` (residuals, concatenations, functional activations) would be invisible, and the graph's wiring
(which layer reads which) would have to be guessed from call order. FX records every call with its operands;
ShapeProp then gives each node's real shape. The cost of FX: a forward with data-dependent Python control flow
cannot be traced, which is said in one line (such a model needs rewriting as a static graph anyway to export).

    desc = describe(LeNet5(), (1, 28, 28), source="edge_ft.host.model:LeNet5")
    model_class("pkg.module:Net") / model_class("path/to/net.py:Net")   # the user's class, imported
"""

from __future__ import annotations

import importlib
import importlib.util
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from edge_ft.errors import UserError
from edge_ft.model_desc import INPUT, Layer, ModelDesc

MODULE_KINDS = {
    nn.Linear: "linear", nn.Conv2d: "conv2d", nn.BatchNorm2d: "batchnorm2d", nn.ReLU: "relu", nn.ReLU6: "relu6",
    nn.Hardswish: "hardswish", nn.AvgPool2d: "avgpool2d", nn.MaxPool2d: "maxpool2d",
    nn.AdaptiveAvgPool2d: "adaptiveavgpool2d", nn.Flatten: "flatten", nn.Dropout: "dropout",
}
FUNCTION_KINDS = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish", F.avg_pool2d: "avgpool2d",
    F.max_pool2d: "maxpool2d", F.adaptive_avg_pool2d: "adaptiveavgpool2d", torch.flatten: "flatten",
    operator.add: "add", torch.add: "add", torch.cat: "concat", torch.mean: "mean", F.dropout: "dropout",
}
METHOD_KINDS = {"relu": "relu", "flatten": "flatten", "view": "flatten", "reshape": "flatten", "add": "add",
                "mean": "mean"}
IGNORED_MODULES = (nn.Identity,)


class _Tracer(torch.fx.Tracer):
    """Every module edge-ft knows is a leaf; others (Sequential, user blocks) are traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, tuple(MODULE_KINDS)) or super().is_leaf_module(m, qualname)


def tracer() -> torch.fx.Tracer:
    return _Tracer()


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """model.<name> = module, for dotted paths ("head.1")."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@dataclass(frozen=True)
class HostModel:
    make: Callable[[], nn.Module]  # builds the untrained network (its default class count)
    desc: ModelDesc  # what describe() traced from it


def host_model(spec: str | None, input_shape: tuple[int, ...] | None = None) -> HostModel:
    """--model SPEC and --input-shape as a HostModel; no SPEC is LeNet-5 and its shipped description."""
    from edge_ft.host.model import LeNet5
    from edge_ft.model_desc import lenet5

    if spec is None:
        if input_shape is not None and tuple(input_shape) != lenet5().input_shape:
            raise UserError(f"--input-shape {','.join(map(str, input_shape))}: LeNet-5 takes "
                            f"{','.join(map(str, lenet5().input_shape))}; give --model for another network")
        return HostModel(LeNet5, lenet5())
    if input_shape is None:
        raise UserError(f"--model {spec}: give the shape of one example too, e.g. --input-shape 1,28,28")
    cls = model_class(spec)
    try:
        module = cls()
    except Exception as e:
        raise UserError(f"--model {spec}: {cls.__name__}() fails ({type(e).__name__}: {e}); the class must "
                        "build with its default arguments") from None
    return HostModel(cls, describe(module, tuple(input_shape), source=spec))


def describe(module: nn.Module, input_shape: tuple[int, ...], source: str = "") -> ModelDesc:
    """Trace `module` on one zero batch of `input_shape` (C,H,W) and return its description (eval mode, so
    BatchNorm statistics are untouched)."""
    name = type(module).__name__
    try:
        graph = tracer().trace(module)
    except Exception as e:  # FX raises many types for dynamic control flow
        raise UserError(f"model {name}: torch.fx cannot trace its forward ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); write it without data-dependent control "
                        "flow") from None
    gm = torch.fx.GraphModule(module, graph)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(2, *input_shape))
    except Exception as e:
        raise UserError(f"model {name}: a forward pass on input shape {list(input_shape)} fails "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check --input-shape") \
            from None
    finally:
        module.train(was_training)

    layers: list[Layer] = []
    alias: dict[str, str] = {}  # FX node -> layer name it stands for (input, identities)
    output = None
    for node in graph.nodes:
        if node.op == "placeholder":
            alias[node.name] = INPUT
        elif node.op == "output":
            output = alias.get(node.args[0].name) if isinstance(node.args[0], torch.fx.Node) else None
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), IGNORED_MODULES):
            alias[node.name] = alias[node.args[0].name]
        else:
            layer = _layer(gm, node, alias, name)
            if any(seen.name == layer.name for seen in layers):  # a module called again
                if layer.params:
                    raise UserError(f"model {name}: {layer.name} is called more than once (shared weights are "
                                    "not supported)")
                # a parameter-free module reused: each call gets its node's name, and says whose call it is
                layer = replace(layer, name=node.name, attrs={**layer.attrs, "module": layer.name})
            alias[node.name] = layer.name
            layers.append(layer)
    if output is None:
        raise UserError(f"model {name}: its forward must return one tensor (the logits)")
    return ModelDesc(
        name=name, input_shape=tuple(input_shape), output=output,
        parameters=tuple((n, tuple(p.shape)) for n, p in module.named_parameters()),
        buffers=tuple((n, tuple(b.shape)) for n, b in module.named_buffers()),
        layers=tuple(layers), source=source)


def _kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str]:
    """(kind or None, what it is called in an error message)."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return next((k for cls, k in MODULE_KINDS.items() if type(m) is cls), None), type(m).__name__
    if node.op == "call_function":
        return FUNCTION_KINDS.get(node.target), getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target), f"Tensor.{node.target}"
    return None, f"{node.op} {node.target}"  # get_attr: a parameter used outside its module


def _layer(gm: torch.fx.GraphModule, node: torch.fx.Node, alias: dict[str, str], model: str) -> Layer:
    kind, what = _kind(gm, node)
    if kind is None:
        raise UserError(f"model {model}: {node.name} ({what}) is a layer kind edge-ft does not support "
                        "(supported: Linear, Conv2d, BatchNorm2d, ReLU, ReLU6, Hardswish, AvgPool2d, MaxPool2d, "
                        "AdaptiveAvgPool2d, mean, flatten/view/reshape, add, cat, Dropout)")
    tensors = [a for a in _flat_args(node) if isinstance(a, torch.fx.Node)]
    if (node.op == "call_method" and node.target == "add" or kind == "add") and len(tensors) != 2:
        raise UserError(f"model {model}: {node.name} adds a constant; only tensor + tensor is supported")
    name = node.target if node.op == "call_module" else node.name
    attrs: dict = {}
    params: tuple[str, ...] = ()
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        params = tuple(n for n, _ in m.named_parameters(recurse=False))
        attrs = _module_attrs(m)
    elif kind == "concat":
        attrs = {"dim": int(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))}
    elif kind == "dropout":
        attrs = {"p": float(node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5))}
    return Layer(name=str(name), kind=kind, inputs=tuple(alias[t.name] for t in tensors),
                 input_shapes=tuple(tuple(t.meta["tensor_meta"].shape[1:]) for t in tensors),
                 output_shape=tuple(node.meta["tensor_meta"].shape[1:]), params=params, attrs=attrs)


def _flat_args(node: torch.fx.Node) -> list:
    out = []
    for a in (*node.args, *node.kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _pair(v) -> list[int]:
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v), int(v)]


def _module_attrs(m: nn.Module) -> dict:
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str):
            raise UserError(f"Conv2d padding={m.padding!r} is not supported; give the padding as numbers")
        return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": _pair(m.kernel_size),
                "stride": _pair(m.stride), "padding": _pair(m.padding), "dilation": _pair(m.dilation),
                "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features}
    if isinstance(m, nn.BatchNorm2d):
        return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum}
    if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
        return {"kernel_size": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                "padding": _pair(m.padding)}
    if isinstance(m, nn.Dropout):
        return {"p": m.p}
    return {}


def model_class(spec: str) -> type[nn.Module]:
    """'pkg.module:Class' or 'path/to/file.py:Class' -> the class (imported; a .py file by its path)."""
    where, sep, cls_name = spec.rpartition(":")
    if not sep or not where or not cls_name:
        raise UserError(f"--model {spec!r}: give PKG.MODULE:CLASS or path/to/file.py:CLASS")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise UserError(f"--model {spec}: {path} is not a file")
            mod_name = f"edge_ft_user_model_{abs(hash(str(path.resolve())))}"
            spec_obj = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[mod_name] = module  # dataclasses and pickling look modules up by name
            spec_obj.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--model {spec}: cannot import {where} ({type(e).__name__}: {e})") from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UserError(f"--model {spec}: {where} has no nn.Module class {cls_name!r}")
    return cls


def lenet5_desc() -> ModelDesc:
    """LeNet-5 traced now (what edge_ft/descriptions/lenet5.json must hold)."""
    from edge_ft.host.model import INPUT_SHAPE, LeNet5
    from edge_ft.model_desc import LENET5_SOURCE

    return describe(LeNet5(), INPUT_SHAPE, source=LENET5_SOURCE)


if __name__ == "__main__":  # python -m edge_ft.host.describe: rewrite edge_ft/descriptions/lenet5.json
    from edge_ft.atomic import atomic_write_bytes
    from edge_ft.model_desc import LENET5_FILE

    atomic_write_bytes(LENET5_FILE, lenet5_desc().to_json().encode())
