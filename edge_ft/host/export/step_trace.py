"""Trace a whole training step (forward, cross-entropy, backward, optimizer update) into plain ONNX.

torch.export cannot trace torch.func.grad inside a module, so the step is first traced by make_fx, which runs
autograd eagerly and records the backward as ordinary aten ops, then re-exported with a dynamic batch and
translated by the dynamo ONNX exporter. `decompositions()` rewrites the backward ops ONNX lacks into ops that
onnxruntime runs fast, each choice measured with its profiler (full fine-tuning, batch 256, one thread):
  convolution_backward  dx as ConvTranspose; dW as a Gather of input windows + one MatMul (15% faster per step
                        than the batch-as-channel Conv); db as ReduceSum
  avg_pool2d_backward   Div + nearest Resize (ONNX_TRANSLATIONS), 3.8x faster than the Expand it replaced
  threshold_backward    ReLU's backward as grad * float(out > 0), 3-4x faster than LessOrEqual + Where

The optimizer update is written out here functionally with torch.optim's arithmetic, so a graph step and a
torch.optim step agree to float rounding.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from edge_ft.config import OptimizerConfig
from edge_ft.device.engines.ort_step import INPUT, LABELS, LOGITS, LOSS, LR, OPT_BUFFERS, STEP_KEY, next_name

aten = torch.ops.aten
OPSET = 21  # highest opset onnxruntime-training 1.19.2 runs; standard onnxruntime runs it too
MAX_BATCH = 1 << 16


def _convolution_backward(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """aten.convolution_backward as forward convolutions; only the gradients in output_mask are computed."""
    if transposed or groups != 1:
        raise NotImplementedError("step export supports plain (groups=1, non-transposed) convolutions only")
    grad_in = grad_w = grad_b = None
    if output_mask[0]:  # dL/dx: the transposed convolution of the output gradient with the same kernel
        extra = [i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)  # rows a strided conv dropped at the border
                 for i, o, s, p, d, k in zip(inp.shape[2:], grad_out.shape[2:], stride, padding, dilation,
                                             weight.shape[2:])]
        grad_in = aten.convolution(grad_out, weight, None, stride, padding, dilation, True, extra, 1)
    if output_mask[1] and _unit(stride, padding, dilation):
        grad_w = _weight_grad_unfolded(grad_out, inp, weight.shape)
    elif output_mask[1]:  # dL/dW: batch becomes the channel axis; (Cin,B,H,W) conv (Cout,B,h,w) -> (Cin,Cout,k,k)
        grad_w = aten.convolution(inp.transpose(0, 1), grad_out.transpose(0, 1), None, dilation, padding, stride,
                                  False, [0, 0], 1)
        grad_w = grad_w[:, :, : weight.shape[2], : weight.shape[3]].transpose(0, 1)
    if output_mask[2]:
        grad_b = grad_out.sum(dim=(0, 2, 3))
    return grad_in, grad_w, grad_b


def _unit(stride, padding, dilation) -> bool:
    """Stride 1, no padding, no dilation: the case whose windows a plain Gather unfolds."""
    return list(stride) == [1, 1] and not any(padding) and list(dilation) == [1, 1]


def _weight_grad_unfolded(grad_out, inp, weight_shape):
    """dL/dW of a stride-1 unpadded convolution as one MatMul over gathered input windows.

    Patches (Cin*k*k, h*w*B) come from one Gather of whole batch rows (B contiguous floats each) out of the
    input laid out (Cin, H*W, B); then (Cin*k*k, N) @ (N, Cout) holds exactly the convolution's
    multiply-accumulates, in one large GEMM instead of the batch-as-channel convolution's per-channel ones.
    """
    c_out, c_in, kh, kw = weight_shape
    height, width = inp.shape[2], inp.shape[3]
    h, w = grad_out.shape[2], grad_out.shape[3]
    # Flat input position of window (i,j), output pixel (y,x): (i+y)*W + j+x, in (i,j,y,x) order. Built from
    # aranges, not stored: the graph file keeps no tensors (onnxruntime folds this into a constant at load).
    corner = (torch.arange(kh) * width)[:, None] + torch.arange(kw)[None, :]  # (k,k)
    offset = (torch.arange(h) * width)[:, None] + torch.arange(w)[None, :]  # (h,w)
    rows = (corner[:, :, None, None] + offset[None, None]).reshape(-1)  # (k*k*h*w,)
    x = inp.permute(1, 2, 3, 0).reshape(c_in, height * width, -1)  # (Cin, H*W, B)
    patches = x.index_select(1, rows).reshape(c_in * kh * kw, -1)  # (Cin*k*k, h*w*B)
    g = grad_out.permute(1, 2, 3, 0).reshape(c_out, -1)  # (Cout, h*w*B)
    return aten.mm(patches, g.t()).t().reshape(c_out, c_in, kh, kw)


def _avg_pool2d_backward(grad_out, inp, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor):
    """Non-overlapping average pooling's backward: spread each gradient evenly over its k x k window.

    When the windows tile the input exactly the op stays whole (NotImplemented) and is written as one Resize
    (_avg_pool2d_backward_onnx); otherwise it is spelled out here, the rows the pool dropped getting zeros.
    """
    kh, kw = kernel_size
    if list(stride or kernel_size) != [kh, kw] or any(padding) or ceil_mode or divisor:
        raise NotImplementedError("step export supports non-overlapping, unpadded average pooling only")
    if inp.shape[2] == grad_out.shape[2] * kh and inp.shape[3] == grad_out.shape[3] * kw:
        return NotImplemented
    grad = grad_out.repeat_interleave(kh, dim=2).repeat_interleave(kw, dim=3) / (kh * kw)
    return F.pad(grad, (0, inp.shape[3] - grad.shape[3], 0, inp.shape[2] - grad.shape[2]))


def _avg_pool2d_backward_onnx(grad_output, self, kernel_size, stride, padding, ceil_mode, count_include_pad,
                              divisor_override=None):
    """The exact-tiling pool backward as Div + nearest Resize (onnxruntime's Expand of the spelled-out
    version took 3.8x as long); no FLOPs are counted for either, as the cost model counts none for pooling."""
    from onnxscript import opset21 as op

    kh, kw = kernel_size
    scaled = op.Div(grad_output, op.CastLike(op.Constant(value_float=float(kh * kw)), grad_output))
    scales = op.Constant(value_floats=[1.0, 1.0, float(kh), float(kw)])
    return op.Resize(scaled, None, scales, mode="nearest", coordinate_transformation_mode="asymmetric",
                     nearest_mode="floor")


def _threshold_backward(grad_out, output, threshold):
    """ReLU's backward as grad * (out > 0): a float mask multiplies 3-4x faster in onnxruntime than Where selects."""
    return grad_out * (output > threshold).to(grad_out.dtype)


def decompositions() -> dict:
    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[aten.threshold_backward.default] = _threshold_backward
    return table


# Ops the trace keeps whole, written our way. The forward pool stays onnxruntime's AveragePool: as Reshape +
# ReduceMean it measured no faster inside the step graph (interleaved, batch 256), though 3x faster alone.
ONNX_TRANSLATIONS = {aten.avg_pool2d_backward.default: _avg_pool2d_backward_onnx}


def optimizer_update(opt: OptimizerConfig, params: dict, grads: dict, state: dict, lr: torch.Tensor):
    """One torch.optim step, functionally: (params, state) -> (new params, new state), same keys.

    lr is a 0-d float32 tensor (a graph input, so schedules need no re-export). AdamW's step count and bias
    corrections run in float64, as torch.optim computes them in Python floats.
    """
    new_params, new_state = {}, {}
    if opt.name == "adamw":
        beta1, beta2 = opt.betas
        step = state[STEP_KEY] + 1  # int64 0-d
        new_state[STEP_KEY] = step
        lr64, step64 = lr.double(), step.double()
        bias_correction1 = 1 - beta1 ** step64
        bias_correction2_sqrt = (1 - beta2 ** step64).sqrt()
        step_size = (lr64 / bias_correction1).float()
        decay = (1 - lr64 * opt.weight_decay).float()
    for name, p in params.items():
        g = grads[name]
        if opt.name == "sgd":
            new_params[name] = p - lr * g
        elif opt.name == "sgd-momentum":  # dampening 0, no Nesterov; the first buffer is g itself (0 * m + g)
            buf = state[f"momentum.{name}"] * opt.momentum + g
            new_state[f"momentum.{name}"] = buf
            new_params[name] = p - lr * buf
        else:
            p = p * decay  # decoupled weight decay first, as torch.optim.AdamW does
            m = state[f"exp_avg.{name}"]
            m = m + (1 - beta1) * (g - m)  # exp_avg.lerp_(g, 1 - beta1)
            v = state[f"exp_avg_sq.{name}"] * beta2 + (1 - beta2) * g * g
            denom = v.sqrt() / bias_correction2_sqrt.float() + opt.eps  # this eps is what keeps 0/0 out
            new_state[f"exp_avg.{name}"], new_state[f"exp_avg_sq.{name}"] = m, v
            new_params[name] = p - step_size * m / denom
    return new_params, new_state


def initial_state(opt: OptimizerConfig, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero buffers (each its own tensor: tracing merges aliased inputs into one) and step 0."""
    state = {f"{buf}.{n}": torch.zeros_like(p) for buf in OPT_BUFFERS[opt.name] for n, p in params.items()}
    if opt.name == "adamw":
        state[STEP_KEY] = torch.zeros((), dtype=torch.int64)
    return state


def make_step(model: torch.nn.Module, trainable: list[str], frozen: list[str], state_keys: list[str],
              opt: OptimizerConfig) -> Callable:
    """step(x, y, lr, *trainable, *frozen, *state) -> (loss, logits, *new trainable, *new state)."""
    n_train, n_frozen = len(trainable), len(frozen)

    def step(x, y, lr, *tensors):
        params = dict(zip(trainable, tensors[:n_train]))
        fixed = dict(zip(frozen, tensors[n_train:n_train + n_frozen]))
        state = dict(zip(state_keys, tensors[n_train + n_frozen:]))

        def loss_fn(params):
            logits = torch.func.functional_call(model, {**params, **fixed}, (x,))
            return F.cross_entropy(logits, y), logits

        # Only `params` is differentiated: autograd never builds gradients for frozen tensors or the input.
        grads, (loss, logits) = torch.func.grad_and_value(loss_fn, has_aux=True)(params)
        new_params, new_state = optimizer_update(opt, params, grads, state, lr)
        return (loss, logits, *(new_params[n] for n in trainable), *(new_state[k] for k in state_keys))

    return step


def make_forward(model: torch.nn.Module, names: list[str]) -> Callable:
    """forward(x, *weights) -> logits, with every model tensor a graph input."""

    def forward(x, *weights):
        return torch.func.functional_call(model, dict(zip(names, weights)), (x,))

    return forward


def example_batch(tensors: list[torch.Tensor]) -> int:
    """A batch size equal to no weight dimension: symbolic tracing would otherwise tie the two together."""
    dims = {d for t in tensors for d in t.shape}
    return next(b for b in range(61, MAX_BATCH) if b not in dims)


def export_onnx(fn: Callable, input_shape: tuple[int, ...], tensors: list[torch.Tensor], input_names: list[str],
                output_names: list[str], path, labels: bool) -> None:
    """Trace fn(x, [y, lr,] *tensors) with a dynamic batch and write it as a plain ai.onnx model at `path`."""
    import onnx

    batch = example_batch(tensors)
    x = torch.rand(batch, *input_shape)
    head = [x, torch.zeros(batch, dtype=torch.int64), torch.tensor(0.01)] if labels else [x]
    args = tuple(head + [t.detach().clone().contiguous() for t in tensors])
    gm = make_fx(fn, decomposition_table=decompositions(), tracing_mode="symbolic")(*args)
    dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = tuple([{0: dim}] * (2 if labels else 1) + [None] * (len(args) - (2 if labels else 1)))
    with _quiet_exporter():
        ep = torch.export.export(gm, args, dynamic_shapes=dynamic, strict=False)
        # optimize=True constant-folds with a tolerance and deletes AdamW's `+ eps` (then 0/0 = NaN): keep it off.
        program = torch.onnx.export(ep, args, dynamo=True, optimize=False, opset_version=OPSET,
                                    input_names=input_names, output_names=output_names, verbose=False,
                                    custom_translation_table=ONNX_TRANSLATIONS)
    model = program.model_proto
    batch_symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for value in [*model.graph.input, *model.graph.output]:  # one readable name for the batch axis everywhere
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == batch_symbol:
                d.dim_param = "batch"
    del model.graph.value_info[:]  # symbolic intermediate shapes: ORT re-infers them
    for node in model.graph.node:  # the exporter's per-node FX provenance is ~80% of the file
        del node.metadata_props[:]
    model.ir_version = min(model.ir_version, 10)
    model.producer_name, model.producer_version = "edge-ft", ""
    onnx.checker.check_model(model, full_check=True)
    from edge_ft.atomic import atomic_write_bytes

    atomic_write_bytes(path, model.SerializeToString())


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notes that are no user's concern (no torchvision, pytree deprecations)."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registry.setLevel(level)


def train_io_names(trainable: list[str], frozen: list[str], state_keys: list[str]) -> tuple[list[str], list[str]]:
    inputs = [INPUT, LABELS, LR, *trainable, *frozen, *state_keys]
    outputs = [LOSS, LOGITS, *(next_name(k) for k in [*trainable, *state_keys])]
    return inputs, outputs
