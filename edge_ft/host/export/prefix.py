"""Split a prepared model at its frozen prefix: the layers that run before anything trains.

Nothing upstream of the first layer that owns a trainable tensor can need a gradient, so that part of the forward
computes the same features for the same example at every step. The device runs it once per example
(features.onnx) and trains the rest (the suffix, a bundle of its own whose input is the prefix's output).

The cut is a single tensor of the traced graph (torch.fx): the latest node before the first trainable one that
every later node reaches only through it. In a plain chain (LeNet-5) that is the trained layer's input; a skip
connection that crosses the first trained layer moves the cut below the branch, so the suffix never needs a
tensor the prefix did not hand it.

When the first layer that trains is a LoRA Linear (its base weight frozen) reading the cut tensor, its frozen
product W0 x + b is fixed per example too: the prefix hands over both, concatenated on the last axis, and the suffix
computes only the adapter's low-rank path (x A^T B^T) on top of the cached product: the step's largest matrix
product leaves the step.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from edge_ft.host.describe import tracer
from edge_ft.host.export.step_trace import model_tensors
from edge_ft.host.lora import LoRALinear


@dataclass(frozen=True)
class Split:
    prefix: torch.fx.GraphModule  # input -> features, every tensor frozen
    suffix: torch.fx.GraphModule  # features -> logits, holding every trainable tensor under its own name
    shape: tuple[int, ...]  # one example's features, the suffix's input shape
    first_trained: str  # the module (or attribute) that trains first, in forward order
    prefix_tensors: tuple[str, ...]  # the model tensors only the prefix reads
    frozen_product: int = 0  # trailing features that are first_trained's frozen product W0 x + b (0: none)

    def manifest_entry(self) -> dict:
        return {"shape": list(self.shape), "dim": math.prod(self.shape), "first_trained": self.first_trained,
                "tensors": list(self.prefix_tensors), "frozen_product": self.frozen_product}


def _trains(node: torch.fx.Node, model: nn.Module, trainable: set[str]) -> bool:
    if node.op == "call_module":
        return any(f"{node.target}.{n}" in trainable for n, _ in model.get_submodule(node.target).named_parameters())
    return node.op == "get_attr" and node.target in trainable


def _cut(nodes: list[torch.fx.Node], first: int) -> int:
    """Index of the latest node before `first` that no later node reads around (0: the input, no prefix)."""
    pos = {n: i for i, n in enumerate(nodes)}
    lowest_read = len(nodes)  # the lowest index read by any node after the candidate (attributes are free)
    reads = [min((pos[a] for a in n.all_input_nodes if a.op != "get_attr"), default=len(nodes)) for n in nodes]
    for i in range(len(nodes) - 1, -1, -1):
        if i < first and lowest_read >= i and nodes[i].op not in ("get_attr", "output") and _batched(nodes[i]):
            return i
        lowest_read = min(lowest_read, reads[i])
    return 0


def _batched(node: torch.fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape") and len(meta.shape) >= 2 and meta.shape[0] == 2


def split_frozen_prefix(model: nn.Module) -> Split | None:
    """The prepared model as (frozen prefix, trainable suffix), or None when the very first layer trains (full
    fine-tuning, bias) and there is nothing to cache. What trains is what the requires_grad flags say."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    graph = tracer().trace(model)
    whole = torch.fx.GraphModule(model, graph)
    _shapes(whole, model)
    nodes = list(graph.nodes)
    first = next((i for i, n in enumerate(nodes) if _trains(n, model, trainable)), None)
    cut = 0 if first is None else _cut(nodes, first)
    if cut == 0 or nodes[cut].op == "placeholder":
        return None
    lora = _frozen_product_layer(model, nodes[first], nodes[cut], trainable)
    prefix = _prefix(model, nodes[cut])
    suffix = _suffix(model, nodes, cut, None if lora is None else (nodes[first], lora))
    suffix_tensors = set(model_tensors(suffix))
    shape = tuple(int(d) for d in nodes[cut].meta["tensor_meta"].shape[1:])
    if lora is not None:
        prefix = _WithFrozenProduct(prefix, lora)
        shape = (*shape[:-1], shape[-1] + lora.out_features)
    suffix.input_shape = shape
    return Split(prefix, suffix, shape, str(nodes[first].target),
                 tuple(n for n in model_tensors(model) if n not in suffix_tensors),
                 0 if lora is None else lora.out_features)


def _frozen_product_layer(model: nn.Module, first: torch.fx.Node, cut: torch.fx.Node,
                          trainable: set[str]) -> LoRALinear | None:
    """The LoRA Linear whose frozen product the prefix can hand over: the first layer that trains, reading the cut
    tensor itself, its base weight and bias frozen. None otherwise (probe, last-k: the base itself trains)."""
    if first.op != "call_module" or first.args != (cut,) or first.kwargs:
        return None
    layer = model.get_submodule(str(first.target))
    if not isinstance(layer, LoRALinear) or layer.merged:
        return None
    base = [f"{first.target}.{n}" for n in ("weight", "bias") if getattr(layer, n) is not None]
    return None if any(n in trainable for n in base) else layer


class _WithFrozenProduct(nn.Module):
    """The prefix, then the LoRA layer's frozen product of its output: cat([x, W0 x + b], -1)."""

    def __init__(self, prefix: torch.fx.GraphModule, lora: LoRALinear):
        super().__init__()
        self.prefix, self.weight, self.bias = prefix, lora.weight, lora.bias
        self.input_shape = prefix.input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.prefix(x)
        return torch.cat([features, F.linear(features, self.weight, self.bias)], dim=-1)


def _shapes(whole: torch.fx.GraphModule, model: nn.Module) -> None:
    """Every node's output shape, from a forward pass that changes nothing: in eval mode (a BatchNorm in training
    mode would fold the dummy batch into its running statistics, and the bundle would export those), no grad."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(whole).propagate(torch.zeros(2, *model.input_shape))
    finally:
        for m, training in modes.items():
            m.train(training)


def _prefix(model: nn.Module, cut: torch.fx.Node) -> torch.fx.GraphModule:
    graph = tracer().trace(model)
    node = next(n for n in graph.nodes if n.name == cut.name)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (node,)
    gm = torch.fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.input_shape = model.input_shape
    return gm


def _suffix(model: nn.Module, nodes: list[torch.fx.Node], cut: int,
            frozen_product: tuple[torch.fx.Node, LoRALinear] | None) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    features = graph.placeholder("features")
    env = {nodes[cut]: features}
    if frozen_product is not None:  # features = cat([x, W0 x + b], -1): the layer adds its low-rank path alone
        node, lora = frozen_product
        x = graph.call_function(operator.getitem, (features, (Ellipsis, slice(None, lora.in_features))))
        product = graph.call_function(operator.getitem, (features, (Ellipsis, slice(lora.in_features, None))))
        env[nodes[cut]] = x
        env[node] = graph.call_function(operator.add, (product, _low_rank(graph, x, str(node.target), lora)))

    def arg(n: torch.fx.Node) -> torch.fx.Node:
        if n not in env:  # an attribute read before the cut (a constant), copied along
            env[n] = graph.node_copy(n, arg)
        return env[n]

    for node in nodes[cut + 1:]:
        if node not in env:
            env[node] = graph.node_copy(node, arg)
    gm = torch.fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _low_rank(graph: torch.fx.Graph, x: torch.fx.Node, name: str, lora: LoRALinear) -> torch.fx.Node:
    """(x A^T B^T) * scaling, LoRALinear.forward's adapter term in its order, reading the layer's A and B."""
    a, b = graph.get_attr(f"{name}.lora_A"), graph.get_attr(f"{name}.lora_B")
    at = graph.call_method("transpose", (a, 0, 1))
    bt = graph.call_method("transpose", (b, 0, 1))
    path = graph.call_function(operator.matmul, (graph.call_function(operator.matmul, (x, at)), bt))
    return graph.call_function(operator.mul, (path, lora.scaling))
