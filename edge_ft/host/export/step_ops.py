"""What a training-step graph supports, and how the backward of each op is written in plain ONNX.

`check_supported` runs the model's forward once and refuses, in one line naming the op and the layer, any aten op
outside SUPPORTED; `decompositions()` rewrites the backward ops ONNX lacks into ops onnxruntime runs fast, each
choice measured with its profiler (one thread):
  convolution_backward  dx as ConvTranspose (grouped, strided, padded alike); dW as a Gather of (padded) input
                        windows + one MatMul per group (LeNet-5 full fine-tuning, batch 256: 15% faster per step
                        than the batch-as-channel Conv); a 1x1 stride-1 conv needs no Gather; db as ReduceSum
  avg_pool2d_backward   exact tiling: Div + nearest Resize (ONNX_TRANSLATIONS), 3.8x faster than an Expand;
                        otherwise each kernel offset's share placed by one Pad and summed
  threshold_backward    ReLU's backward as grad * float(out > 0), 3-4x faster than LessOrEqual + Where
  hardtanh_backward     ReLU6's, the same float-mask form
  max_pool2d_with_indices_backward  ScatterElements(add) of the gradient to the recorded argmax, as torch does
  _adaptive_avg_pool2d  an average pool when the output size divides the input (global pooling included)
  avg_pool2d            a 2x2 stride-2 unpadded pool as one bilinear Resize to half size (average_pool_2x2): the
                        same average, twice as fast as onnxruntime's AveragePool
The loss and its gradient are one op kept whole (cross_entropy_and_grad): ONNX's SoftmaxCrossEntropyLoss and
softmax - one-hot, instead of the ~20 small nodes the traced log_softmax / nll_loss and their backward become.
BatchNorm runs in eval mode: its running statistics are frozen graph inputs, never outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._decomp import core_aten_decompositions
from torch.utils._python_dispatch import TorchDispatchMode

from edge_ft.errors import UserError

aten = torch.ops.aten

# Forward ops a model may use (by overload packet): layers, residual adds, concatenation, views.
SUPPORTED = {
    "convolution", "native_batch_norm", "_native_batch_norm_legit_no_training", "addmm", "mm", "bmm",
    "relu", "hardtanh", "hardswish", "max_pool2d_with_indices", "avg_pool2d", "_adaptive_avg_pool2d", "mean",
    "add", "sub", "mul", "div", "neg", "cat", "view", "_unsafe_view", "reshape", "t", "transpose", "permute",
    "expand", "squeeze", "unsqueeze", "clone", "detach", "alias", "slice", "empty", "lift_fresh",
}


class _OpRecorder(TorchDispatchMode):
    """Records the first unsupported aten op and the module path that was running it."""

    def __init__(self, path: list[str]):
        super().__init__()
        self.path, self.found = path, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in SUPPORTED and self.found is None:
            self.found = (f"aten.{name}", self.path[-1] if self.path else "")
        return func(*args, **(kwargs or {}))


def check_supported(model: torch.nn.Module, input_shape: tuple[int, ...]) -> None:
    """Run one forward (eval mode, batch 2) and raise UserError naming the first op the step graph cannot take."""
    stack: list[str] = []
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    hooks = []
    for name, module in model.named_modules():  # hooks return None, so they change no input or output
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name) and None))
        hooks.append(module.register_forward_hook(lambda m, a, out: stack.pop() and None))
    recorder, example = _OpRecorder(stack), torch.zeros(2, *input_shape)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    if recorder.found:
        op, layer = recorder.found
        where = f"layer {layer!r} ({types[layer]})" if layer else "the model's own forward"
        raise UserError(f"the step graph does not support {op} in {where}; supported: convolutions, linear, "
                        "BatchNorm2d (eval), ReLU/ReLU6/Hardswish, average/max/adaptive pools, add, cat, views")


def _convolution_backward(grad_out, inp, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """aten.convolution_backward as forward convolutions; only the gradients in output_mask are computed."""
    if transposed:
        raise NotImplementedError("the step graph supports forward (non-transposed) convolutions only")
    grad_in = grad_w = grad_b = None
    if output_mask[0]:  # dL/dx: the transposed convolution of the output gradient with the same kernel
        extra = [i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)  # rows a strided conv dropped at the border
                 for i, o, s, p, d, k in zip(inp.shape[2:], grad_out.shape[2:], stride, padding, dilation,
                                             weight.shape[2:])]
        grad_in = aten.convolution(grad_out, weight, None, stride, padding, dilation, True, extra, groups)
    if output_mask[1] and groups == 1 and _unit(stride, padding, dilation) and list(weight.shape[2:]) != [1, 1]:
        grad_w = _weight_grad_unit(grad_out, inp, weight.shape)
    elif output_mask[1]:
        grad_w = _weight_grad_unfolded(grad_out, inp, weight.shape, stride, padding, dilation, groups)
    if output_mask[2]:
        grad_b = grad_out.sum(dim=(0, 2, 3))
    return grad_in, grad_w, grad_b


def _unit(stride, padding, dilation) -> bool:
    """Stride 1, no padding, no dilation: LeNet-5's convolutions."""
    return list(stride) == [1, 1] and not any(padding) and list(dilation) == [1, 1]


def _weight_grad_unit(grad_out, inp, weight_shape):
    """_weight_grad_unfolded for a plain stride-1 unpadded conv, as LeNet-5's bundles have always been traced
    (the batch axis inferred by reshape: the same graph, node for node)."""
    c_out, c_in, kh, kw = weight_shape
    height, width = inp.shape[2], inp.shape[3]
    h, w = grad_out.shape[2], grad_out.shape[3]
    corner = (torch.arange(kh) * width)[:, None] + torch.arange(kw)[None, :]  # (k,k)
    offset = (torch.arange(h) * width)[:, None] + torch.arange(w)[None, :]  # (h,w)
    rows = (corner[:, :, None, None] + offset[None, None]).reshape(-1)  # (k*k*h*w,)
    x = inp.permute(1, 2, 3, 0).reshape(c_in, height * width, -1)  # (Cin, H*W, B)
    patches = x.index_select(1, rows).reshape(c_in * kh * kw, -1)  # (Cin*k*k, h*w*B)
    g = grad_out.permute(1, 2, 3, 0).reshape(c_out, -1)  # (Cout, h*w*B)
    return aten.mm(patches, g.t()).t().reshape(c_out, c_in, kh, kw)


def _weight_grad_unfolded(grad_out, inp, weight_shape, stride, padding, dilation, groups):
    """dL/dW as one MatMul (one per group) over gathered input windows.

    Patches (Cin*k*k, h*w*B) come from one Gather of whole batch rows (B contiguous floats each) out of the
    (padded) input laid out (Cin, H*W, B); then (Cin/G*k*k, N) @ (N, Cout/G) per group holds exactly the
    convolution's multiply-accumulates, in one large GEMM instead of the batch-as-channel convolution's
    per-channel ones. A 1x1 stride-1 unpadded conv's patches are its input itself.
    """
    c_out, c_in_group, kh, kw = weight_shape
    batch = inp.shape[0]  # sizes spelled out, never -1: inferring one costs symbolic tracing 6x the time
    if any(padding):
        inp = F.pad(inp, (padding[1], padding[1], padding[0], padding[0]))
    c_in, height, width = inp.shape[1], inp.shape[2], inp.shape[3]
    h, w = grad_out.shape[2], grad_out.shape[3]
    x = inp.permute(1, 2, 3, 0).reshape(c_in, height * width, batch)  # (Cin, H*W, B)
    if (kh, kw) == (1, 1) and list(stride) == [1, 1]:
        patches = x.reshape(c_in, height * width * batch)
    else:
        # Flat input position of window (i,j), output pixel (y,x): (i*d + y*s)*W + j*d + x*s, in (i,j,y,x)
        # order. Built from aranges, not stored: the graph file keeps no tensors (onnxruntime folds this into a
        # constant at load).
        corner = (torch.arange(kh) * dilation[0] * width)[:, None] + torch.arange(kw)[None, :] * dilation[1]
        offset = (torch.arange(h) * stride[0] * width)[:, None] + torch.arange(w)[None, :] * stride[1]
        rows = (corner[:, :, None, None] + offset[None, None]).reshape(-1)  # (k*k*h*w,)
        patches = x.index_select(1, rows).reshape(c_in * kh * kw, h * w * batch)  # (Cin*k*k, h*w*B)
    g = grad_out.permute(1, 2, 3, 0).reshape(c_out, h * w * batch)  # (Cout, h*w*B)
    if groups == 1:
        return aten.mm(patches, g.t()).t().reshape(c_out, c_in_group, kh, kw)
    patches = patches.reshape(groups, c_in_group * kh * kw, h * w * batch)  # (G, Cin/G*k*k, N)
    g = g.reshape(groups, c_out // groups, h * w * batch)  # (G, Cout/G, N)
    return aten.bmm(patches, g.transpose(1, 2)).transpose(1, 2).reshape(c_out, c_in_group, kh, kw)


def _avg_pool2d_backward(grad_out, inp, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor):
    """Average pooling's backward: spread each gradient over its window.

    When the windows tile the input exactly the op stays whole (NotImplemented) and is written as one Resize
    (_avg_pool2d_backward_onnx); non-overlapping unpadded windows that leave rows over repeat the gradient and
    pad the leftover with zeros; any other pool (overlapping, padded) sums one padded copy per kernel offset.
    """
    kh, kw = kernel_size
    sh, sw = stride or kernel_size
    if ceil_mode:
        raise NotImplementedError("the step graph supports average pooling with ceil_mode=False only")
    if (sh, sw) == (kh, kw) and not any(padding) and not divisor:
        if inp.shape[2] == grad_out.shape[2] * kh and inp.shape[3] == grad_out.shape[3] * kw:
            return NotImplemented
        grad = grad_out.repeat_interleave(kh, dim=2).repeat_interleave(kw, dim=3) / (kh * kw)
        return F.pad(grad, (0, inp.shape[3] - grad.shape[3], 0, inp.shape[2] - grad.shape[2]))
    ph, pw = padding
    height, width = inp.shape[2] + 2 * ph, inp.shape[3] + 2 * pw
    oh, ow = grad_out.shape[2], grad_out.shape[3]
    if divisor:
        grad = grad_out / divisor
    elif count_include_pad or not any(padding):
        grad = grad_out / (kh * kw)
    else:  # each window divides by the input pixels it covers (padding excluded)
        rows = (torch.arange(oh) * sh - ph + kh).clamp(max=inp.shape[2]) - (torch.arange(oh) * sh - ph).clamp(min=0)
        cols = (torch.arange(ow) * sw - pw + kw).clamp(max=inp.shape[3]) - (torch.arange(ow) * sw - pw).clamp(min=0)
        grad = grad_out / (rows[:, None] * cols[None, :]).to(grad_out.dtype)
    if (sh, sw) != (1, 1):  # zeros between the gradients: (.., oh, ow) -> (.., (oh-1)*sh+1, (ow-1)*sw+1)
        grad = F.pad(grad[:, :, :, None, :, None], (0, sw - 1, 0, 0, 0, sh - 1))
        grad = grad.reshape(grad.shape[0], grad.shape[1], oh * sh, ow * sw)[:, :, : (oh - 1) * sh + 1,
                                                                            : (ow - 1) * sw + 1]
    span_h, span_w = grad.shape[2], grad.shape[3]
    total = sum(F.pad(grad, (j, width - j - span_w, i, height - i - span_h)) for i in range(kh) for j in range(kw))
    return total[:, :, ph: ph + inp.shape[2], pw: pw + inp.shape[3]]


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


def _hardtanh_backward(grad_out, inp, min_val, max_val):
    """ReLU6's (clamp's) backward: the gradient passes strictly inside (min, max), as torch's does."""
    return grad_out * ((inp > min_val) & (inp < max_val)).to(grad_out.dtype)


def _max_pool2d_backward(grad_out, inp, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """Each output's gradient added at its argmax (indices are flat positions within each (H, W) plane)."""
    batch, channels = grad_out.shape[0], grad_out.shape[1]
    flat = torch.zeros_like(inp).reshape(batch, channels, -1)
    flat = flat.scatter_add(2, indices.reshape(batch, channels, -1), grad_out.reshape(batch, channels, -1))
    return flat.reshape(inp.shape)


def _adaptive_windows(inp_size, out_size) -> list[int]:
    if any(i % o for i, o in zip(inp_size, out_size)):
        raise NotImplementedError(f"the step graph supports adaptive pooling only when the output size divides the "
                                  f"input ({tuple(inp_size)} -> {tuple(out_size)})")
    return [i // o for i, o in zip(inp_size, out_size)]


def _adaptive_avg_pool2d(inp, output_size):
    k = _adaptive_windows(inp.shape[2:], output_size)
    return aten.avg_pool2d(inp, k, k)


def _adaptive_avg_pool2d_backward(grad_out, inp):
    k = _adaptive_windows(inp.shape[2:], grad_out.shape[2:])
    return aten.avg_pool2d_backward(grad_out, inp, k, k, [0, 0], False, True, None)


@torch.library.custom_op("edge_ft::cross_entropy_and_grad", mutates_args=())
def cross_entropy_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F.cross_entropy (mean over the batch) and its gradient with respect to the logits, (softmax - one-hot) / B."""
    log_prob = F.log_softmax(logits, dim=1)
    one_hot = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.nll_loss(log_prob, labels), (log_prob.exp() - one_hot) / logits.shape[0]


@cross_entropy_and_grad.register_fake
def _(logits, labels):
    return logits.new_empty(()), torch.empty_like(logits)


def _cross_entropy_and_grad_onnx(logits, labels):
    """One SoftmaxCrossEntropyLoss (loss and log-probabilities) and Exp - OneHot, divided by the batch size."""
    from onnxscript import opset21 as op

    loss, log_prob = op.SoftmaxCrossEntropyLoss(logits, labels, reduction="mean")
    on_off = op.CastLike(op.Constant(value_floats=[0.0, 1.0]), logits)
    depth = op.Squeeze(op.Shape(logits, start=1, end=2))  # a scalar: the spec allows [1], stricter runtimes do not
    one_hot = op.OneHot(labels, depth, on_off, axis=-1)
    batch = op.CastLike(op.Shape(logits, start=0, end=1), logits)
    return loss, op.Div(op.Sub(op.Exp(log_prob), one_hot), batch)


@torch.library.custom_op("edge_ft::average_pool_2x2", mutates_args=())
def average_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """F.avg_pool2d(x, 2): the mean of each 2x2 window, stride 2, no padding."""
    return F.avg_pool2d(x, 2)


@average_pool_2x2.register_fake
def _(x):
    return x.new_empty(x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)


def _average_pool_2x2_onnx(x):
    """Bilinear Resize by 1/2, half-pixel centres: output (i, j) samples input (2i + 0.5, 2j + 0.5), the
    equal-weight mean of its 2x2 window."""
    from onnxscript import opset21 as op

    scales = op.Constant(value_floats=[1.0, 1.0, 0.5, 0.5])
    return op.Resize(x, None, scales, mode="linear", coordinate_transformation_mode="half_pixel")


def _avg_pool2d(inp, kernel_size, stride=(), padding=(0, 0), ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    if list(kernel_size) in ([2], [2, 2]) and list(stride or kernel_size) in ([2], [2, 2]) and not any(padding) \
            and not ceil_mode and not divisor_override:
        return average_pool_2x2(inp)
    return NotImplemented


def decompositions() -> dict:
    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.avg_pool2d.default] = _avg_pool2d
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[aten.threshold_backward.default] = _threshold_backward
    table[aten.hardtanh_backward.default] = _hardtanh_backward
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool2d_backward
    table[aten._adaptive_avg_pool2d.default] = _adaptive_avg_pool2d
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_backward
    return table


# Ops the trace keeps whole, written our way. Other forward pools stay onnxruntime's AveragePool (as Reshape +
# ReduceMean the 2x2 pool measured no faster inside the step graph; the bilinear Resize is 0.8-0.9x the step).
ONNX_TRANSLATIONS = {aten.avg_pool2d_backward.default: _avg_pool2d_backward_onnx,
                     torch.ops.edge_ft.cross_entropy_and_grad.default: _cross_entropy_and_grad_onnx,
                     torch.ops.edge_ft.average_pool_2x2.default: _average_pool_2x2_onnx}
