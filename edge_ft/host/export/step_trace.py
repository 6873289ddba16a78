"""Trace a whole training step (forward, cross-entropy, backward, optimizer update) into plain ONNX.

torch.export cannot trace torch.func.grad inside a module, so the step is first traced by make_fx (on fake tensors
whose only symbolic size is the batch), which runs autograd eagerly and records the backward as ordinary aten ops,
then re-exported with a dynamic batch and
translated by the dynamo ONNX exporter. step_ops says which ops a model may use and writes the backward ops ONNX
lacks (its `decompositions()`, each form chosen with onnxruntime's profiler). The model runs in eval mode:
BatchNorm normalises with its frozen running statistics (graph inputs like any frozen tensor) and Dropout is the
identity.

The optimizer update is written out here functionally with torch.optim's arithmetic, so a graph step and a
torch.optim step agree to float rounding.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from edge_ft.config import OptimizerConfig
from edge_ft.contracts import INPUT, LABELS, LOGITS, LOSS, LR
from edge_ft.device.engines.ort_step import FLAT, OPT_BUFFERS, STEP_KEY, next_name
from edge_ft.host.export.step_ops import ONNX_TRANSLATIONS, cross_entropy_and_grad, decompositions

OPSET = 21  # highest opset onnxruntime-training 1.19.2 runs; standard onnxruntime runs it too
MAX_BATCH = 1 << 16


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


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the forward reads, by state-dict name: the parameters, then the floating-point buffers
    (BatchNorm's running statistics); num_batches_tracked is left out, eval mode never reads it."""
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    return tensors


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """BatchNorm with frozen statistics and Dropout as the identity while tracing; the caller's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def make_step(model: torch.nn.Module, trainable: list[str], frozen: list[str], state_keys: list[str],
              opt: OptimizerConfig) -> Callable:
    """step(x, y, lr, *trainable, *frozen, *state) -> (loss, logits, *new trainable, *new state)."""
    n_train, n_frozen = len(trainable), len(frozen)

    def step(x, y, lr, *tensors):
        params = dict(zip(trainable, tensors[:n_train]))
        fixed = dict(zip(frozen, tensors[n_train:n_train + n_frozen]))
        state = dict(zip(state_keys, tensors[n_train + n_frozen:]))
        loss, logits, grads = _loss_and_grads(model, params, fixed, x, y)
        new_params, new_state = optimizer_update(opt, params, grads, state, lr)
        return (loss, logits, *(new_params[n] for n in trainable), *(new_state[k] for k in state_keys))

    return step


def _loss_and_grads(model: torch.nn.Module, params: dict, fixed: dict, x, y) -> tuple:
    """(loss, logits, gradient of the loss per tensor of `params`) of the model in eval mode."""

    def logits_of(params):
        with eval_mode(model):
            return torch.func.functional_call(model, {**params, **fixed}, (x,))

    # Only `params` is differentiated: autograd never builds gradients for frozen tensors or the input. The
    # loss's gradient comes with the loss, from one op (step_ops.cross_entropy_and_grad), not from autograd.
    logits, pullback = torch.func.vjp(logits_of, params)
    loss, grad_logits = cross_entropy_and_grad(logits, y)
    grads, = pullback(grad_logits)
    return loss, logits, grads


def make_flat_step(model: torch.nn.Module, trainable: dict[str, tuple[int, ...]], frozen: list[str],
                   state_keys: list[str], opt: OptimizerConfig) -> Callable:
    """step(x, y, lr, flat, *frozen, *state) -> (loss, logits, new flat, *new state): make_step with the trainable
    tensors as one vector (FLAT, state-dict order) and the optimizer state of that vector (optimizer_keys(name,
    [FLAT])). The same arithmetic element by element, in one node per operation instead of one per tensor: in a
    step of small tensors (a cached prefix's suffix) onnxruntime's per-node cost outweighs the arithmetic."""
    names, ends = list(trainable), list(itertools.accumulate(math.prod(s) for s in trainable.values()))
    n_frozen = len(frozen)

    def step(x, y, lr, flat, *tensors):
        fixed = dict(zip(frozen, tensors[:n_frozen]))
        state = dict(zip(state_keys, tensors[n_frozen:]))
        params = {n: flat[end - math.prod(trainable[n]):end].reshape(trainable[n]) for n, end in zip(names, ends)}
        loss, logits, grads = _loss_and_grads(model, params, fixed, x, y)
        grad = torch.cat([grads[n].reshape(-1) for n in names])
        new_params, new_state = optimizer_update(opt, {FLAT: flat}, {FLAT: grad}, state, lr)
        return (loss, logits, new_params[FLAT], *(new_state[k] for k in state_keys))

    return step


def make_forward(model: torch.nn.Module, names: list[str]) -> Callable:
    """forward(x, *weights) -> logits, with every model tensor a graph input."""

    def forward(x, *weights):
        with eval_mode(model):
            return torch.func.functional_call(model, dict(zip(names, weights)), (x,))

    return forward


def example_batch(tensors: list[torch.Tensor]) -> int:
    """A batch size equal to no weight dimension: symbolic tracing would otherwise tie the two together."""
    dims = {d for t in tensors for d in t.shape}
    return next(b for b in range(61, MAX_BATCH) if b not in dims)


def batch_symbolic(args: tuple[torch.Tensor, ...], batched: int) -> list[torch.Tensor]:
    """Fake tensors for make_fx whose only symbolic size is the batch axis of the first `batched` args.

    make_fx's own symbolic mode makes every size of every input a symbol (each weight's too) and reasons about
    all of them on every op; with the weights' sizes static the same graph traces in about half the CPU time
    (DS-CNN full fine-tuning: 48 s instead of 100 s).
    """
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    fakes = []
    for i, a in enumerate(args):
        sizes = [DimDynamic.DYNAMIC if i < batched and d == 0 else DimDynamic.STATIC for d in range(a.dim())]
        fakes.append(mode.from_tensor(a, source=ConstantSource(f"input{i}"),
                                      symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes)))
    return fakes


def export_onnx(fn: Callable, input_shape: tuple[int, ...], tensors: list[torch.Tensor], input_names: list[str],
                output_names: list[str], path, labels: bool) -> None:
    """Trace fn(x, [y, lr,] *tensors) with a dynamic batch and write it as a plain ai.onnx model at `path`."""
    import onnx

    batch = example_batch(tensors)
    x = torch.rand(batch, *input_shape)
    head = [x, torch.zeros(batch, dtype=torch.int64), torch.tensor(0.01)] if labels else [x]
    args = tuple(head + [t.detach().clone().contiguous() for t in tensors])
    batched = 2 if labels else 1  # x, and y when there are labels, carry the batch axis
    gm = make_fx(fn, decomposition_table=decompositions(), tracing_mode="symbolic")(*batch_symbolic(args, batched))
    dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = tuple([{0: dim}] * batched + [None] * (len(args) - batched))
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
