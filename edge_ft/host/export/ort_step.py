"""Bundle files for the ort-step engine: a training-step graph, a forward graph and the state they read.

  train_step.onnx     (input, labels, lr, params..., optimizer state...) -> (loss, logits, next.<each>...)
  forward.onnx        (input, params...) -> logits; the device bakes weights into it for export_inference
  state.safetensors   every model tensor and the zero optimizer state (keys: edge_ft.device.engines.ort_step)
Graphs hold no weights, so they stay tens of kB and the state file is the only thing training changes. A head
bundle's step (the suffix of a cached prefix) reads and updates its trainable tensors as one flat vector
(step_trace.make_flat_step); the state file keeps one key per tensor either way.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import torch

from edge_ft.atomic import atomic_save_safetensors
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.contracts import INPUT, LOGITS
from edge_ft.device.engines.ort_step import FLAT, STATE_FORMAT, optimizer_keys
from edge_ft.errors import UserError
from edge_ft.host.export import common
from edge_ft.host.export.step_ops import check_supported
from edge_ft.host.export.step_trace import (
    export_onnx,
    initial_state,
    make_flat_step,
    make_forward,
    make_step,
    model_tensors,
    train_io_names,
)

TRAIN_GRAPH = "train_step.onnx"
FORWARD_GRAPH = "forward.onnx"
STATE_FILE = "state.safetensors"
MEAN_POOLS = False  # nn.AvgPool2d stays: its backward becomes one Resize (step_trace), the mean's an Expand
FROZEN_NORMS = False  # BatchNorm2d stays: the step is traced in eval mode, statistics frozen inputs


def build(model: torch.nn.Module, cfg: MethodConfig, opt: OptimizerConfig, out_dir, head: bool = False) -> dict:
    """Write the three files into out_dir; return the manifest's "ort_step" entry. What trains is what the
    prepared model's requires_grad flags say; head: `model` is the suffix of a cached prefix (a flat step)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return write_step_graphs(model, trainable, opt, out_dir, flat=head)


def write_step_graphs(model: torch.nn.Module, trainable: Collection[str], opt: OptimizerConfig, out_dir,
                      flat: bool = False) -> dict:
    """The step graph, forward graph and state of any supported nn.Module, `trainable` naming the parameters
    the step updates (every other parameter and BatchNorm statistic is a frozen input); the model's
    `input_shape` attribute gives one example's shape (LeNet-5's when absent). flat: the step reads and updates
    the trainable tensors as one vector (make_flat_step). Returns the manifest's "ort_step" entry; raises
    UserError naming the first op and layer the step graph does not support."""
    out_dir = Path(out_dir)
    weights = {n: t.detach().clone().contiguous() for n, t in model_tensors(model).items()}
    params = {n for n, _ in model.named_parameters()}
    unknown = sorted(set(trainable) - params)
    if unknown:
        raise UserError(f"{unknown[0]!r} is not a parameter of the model; it cannot train")
    trainable = [n for n in weights if n in set(trainable)]  # state-dict order, as the manifest lists them
    frozen = [n for n in weights if n not in set(trainable)]
    input_shape = common.input_shape_of(model)
    check_supported(model, input_shape)
    opt_state = initial_state(opt, {n: weights[n] for n in trainable})
    opt_keys = optimizer_keys(opt.name, trainable)
    assert list(opt_state) == opt_keys, "exporter and engine disagree on the state layout"

    if flat:
        vector = torch.cat([weights[n].reshape(-1) for n in trainable])
        flat_state = initial_state(opt, {FLAT: vector})
        flat_keys = optimizer_keys(opt.name, [FLAT])
        tensors = [vector] + [weights[n] for n in frozen] + [flat_state[k] for k in flat_keys]
        inputs, outputs = train_io_names([FLAT], frozen, flat_keys)
        step = make_flat_step(model, {n: tuple(weights[n].shape) for n in trainable}, frozen, flat_keys, opt)
    else:
        tensors = [weights[n] for n in trainable + frozen] + [opt_state[k] for k in opt_keys]
        inputs, outputs = train_io_names(trainable, frozen, opt_keys)
        step = make_step(model, trainable, frozen, opt_keys, opt)
    export_onnx(step, input_shape, tensors, inputs, outputs, out_dir / TRAIN_GRAPH, labels=True)
    names = list(weights)
    export_onnx(make_forward(model, names), input_shape, [weights[n] for n in names], [INPUT, *names], [LOGITS],
                out_dir / FORWARD_GRAPH, labels=False)
    atomic_save_safetensors(out_dir / STATE_FILE, {k: v.numpy() for k, v in {**weights, **opt_state}.items()},
                            metadata={"format": STATE_FORMAT, "optimizer": opt.name})
    return {"ort_step": {"train_graph": TRAIN_GRAPH, "forward_graph": FORWARD_GRAPH, "state": STATE_FILE}}
