"""Split a prepared model at its frozen prefix: the layers that run before anything trains.

Nothing upstream of the first layer that owns a trainable tensor can need a gradient, so that part of the forward
computes the same features for the same example at every step. The device runs it once per example
(features.onnx) and trains the rest (the suffix, a bundle of its own whose input is the prefix's output).

The cut is a single tensor of the traced graph (torch.fx): the latest node before the first trainable one that
every later node reaches only through it. In a plain chain (LeNet-5) that is the trained layer's input; a skip
connection that crosses the first trained layer moves the cut below the branch, so the suffix never needs a
tensor the prefix did not hand it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from edge_ft.host.describe import tracer
from edge_ft.host.export.step_trace import model_tensors


@dataclass(frozen=True)
class Split:
    prefix: torch.fx.GraphModule  # input -> features, every tensor frozen
    suffix: torch.fx.GraphModule  # features -> logits, holding every trainable tensor under its own name
    shape: tuple[int, ...]  # one example's features, the suffix's input shape
    first_trained: str  # the module (or attribute) that trains first, in forward order
    prefix_tensors: tuple[str, ...]  # the model tensors only the prefix reads

    def manifest_entry(self) -> dict:
        return {"shape": list(self.shape), "dim": math.prod(self.shape), "first_trained": self.first_trained,
                "tensors": list(self.prefix_tensors)}


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
    prefix, suffix = _prefix(model, nodes[cut]), _suffix(model, nodes, cut)
    suffix_tensors = set(model_tensors(suffix))
    shape = tuple(int(d) for d in nodes[cut].meta["tensor_meta"].shape[1:])
    suffix.input_shape = shape
    return Split(prefix, suffix, shape, str(nodes[first].target),
                 tuple(n for n in model_tensors(model) if n not in suffix_tensors))


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


def _suffix(model: nn.Module, nodes: list[torch.fx.Node], cut: int) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    env = {nodes[cut]: graph.placeholder("features")}

    def arg(n: torch.fx.Node) -> torch.fx.Node:
        if n not in env:  # an attribute read before the cut (a constant), copied along
            env[n] = graph.node_copy(n, arg)
        return env[n]

    for node in nodes[cut + 1:]:
        env[node] = graph.node_copy(node, arg)
    gm = torch.fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
