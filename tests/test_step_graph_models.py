"""The general step graph on MLPerf Tiny's reference models (ResNet-8, DS-CNN, MobileNetV1-0.25) and the ops they
do not reach, run by onnxruntime against torch.

Each model at its real input size, batch 4, for three trainable sets (full, head only, BatchNorm affine + biases):
  parity   one SGD-momentum step at a time from the graph's weights (tests/lockstep.py), 3 steps, so the momentum
           buffers take part; losses and weight changes compared with torch.optim
  FLOPs    the Conv / ConvTranspose / MatMul / Gemm nodes of the graph (test_step_graph_costs.node_flops) sum to
           what torch.utils.flop_counter counts for the same forward and backward
Inputs are seeded random tensors (no CIFAR, speech or VWW data ships with edge-ft); BatchNorm statistics and
affine parameters are drawn away from their identity initialisation so that a graph that ignored them would fail.
"""

from __future__ import annotations

import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lockstep import run_lockstep
from safetensors.numpy import load_file
from test_step_graph_costs import node_flops
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

from edge_ft.config import OptimizerConfig
from edge_ft.contracts import INPUT, LABELS, LOSS, LR
from edge_ft.device.engines.ort_step import next_name, optimizer_keys
from edge_ft.errors import UserError
from edge_ft.host.export.ort_step import write_step_graphs
from edge_ft.host.models import REFERENCE_MODELS
from edge_ft.host.models.tiny import trainable_sets

BATCH, STEPS = 4, 3
OPT = OptimizerConfig("sgd-momentum", lr=0.05)
SETS = ("full", "head", "bn-bias")
# Which (model, trainable set) pairs the suite exports: tracing one takes 20-260 s of CPU, so not all nine. These
# reach every decomposition the models use: strided, depthwise and pointwise convolutions with their dx and dW
# (DS-CNN full), BatchNorm's affine gradients with frozen statistics (DS-CNN bn-bias), residual adds and strided
# 1x1 shortcuts (ResNet-8 full), and the largest model's forward with a trained head (MobileNetV1 head).
CASES = [("ds-cnn", "full"), ("ds-cnn", "bn-bias"), ("resnet8", "full"), ("mobilenet-v1-0.25", "head")]
_ROOT = Path(tempfile.mkdtemp(prefix="edge-ft-step-models-"))


def teardown_module():
    shutil.rmtree(_ROOT, ignore_errors=True)


def seeded(model: nn.Module) -> nn.Module:
    """Seeded weights; BatchNorm statistics and affine parameters moved off identity."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


class GraphRunner:
    """The ort-step engine's feeding loop over an exported folder, without a bundle manifest."""

    def __init__(self, folder: Path, trainable: list[str], opt: OptimizerConfig):
        self.session = ort.InferenceSession(folder / "train_step.onnx", providers=["CPUExecutionProvider"])
        state = load_file(folder / "state.safetensors")
        self.opt_keys = optimizer_keys(opt.name, trainable)
        self.trainable = trainable
        self.tensors = {k: v for k, v in state.items() if k not in self.opt_keys}
        self.opt_state = {k: state[k] for k in self.opt_keys}

    def parameters(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.tensors.items()}

    def train_step(self, x, y, lr):
        outputs = [LOSS, "logits", *(next_name(k) for k in self.trainable + self.opt_keys)]
        feeds = {INPUT: x, LABELS: y, LR: np.asarray(lr, np.float32), **self.tensors, **self.opt_state}
        loss, logits, *updated = self.session.run(outputs, feeds)
        n = len(self.trainable)
        self.tensors.update(zip(self.trainable, updated[:n]))
        self.opt_state = dict(zip(self.opt_keys, updated[n:]))
        return float(loss), logits


def prepared(model_name: str, subset: str) -> tuple[nn.Module, list[str]]:
    model = seeded(REFERENCE_MODELS[model_name]()).eval()
    trainable = trainable_sets(model)[subset]
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model, trainable


@cache
def exported(model_name: str, subset: str) -> Path:
    model, trainable = prepared(model_name, subset)
    folder = _ROOT / f"{model_name}-{subset}"
    folder.mkdir()
    write_step_graphs(model, trainable, OPT, folder)
    return folder


def batches(model: nn.Module, classes: int, n: int, batch: int = BATCH):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((batch, *model.input_shape), dtype=np.float32),
             rng.integers(0, classes, batch).astype(np.int64)) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("model_name, subset", CASES)
def test_steps_match_torch_optim(model_name, subset):
    model, trainable = prepared(model_name, subset)
    runner = GraphRunner(exported(model_name, subset), trainable, OPT)
    start = runner.parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    torch_opt = torch.optim.SGD(params, lr=OPT.lr, momentum=OPT.momentum)
    gaps = run_lockstep(runner, model, torch_opt, batches(model, model.classifier.out_features, STEPS),
                        lambda step: OPT.lr)
    # Forward rounding from the same weights: float32 convolutions summed in another order, ~30 layers deep.
    np.testing.assert_allclose(gaps.losses, gaps.reference, rtol=1e-5)
    gaps.check(5e-5)  # beyond lockstep's rounding bound: the forward's relative rounding (measured 4.8e-6)
    after = runner.parameters()
    for name, value in start.items():
        if name in trainable:
            assert not np.array_equal(after[name], value), f"{name} did not train"
        else:  # frozen weights and BatchNorm's running statistics never move
            np.testing.assert_array_equal(after[name], value, err_msg=f"frozen {name} moved")
    assert set(start) == set(dict(model.named_parameters())) | {
        n for n, b in model.named_buffers() if b.is_floating_point()}


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                               output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's convolution_backward formula, whose weight-gradient term ignores `groups` (it counts a depthwise
    conv's dW as if every input channel met every output channel, C_in times too many), with that term fixed."""
    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    dx = conv_backward_flop(*args, [output_mask[0], False, False], out_val=out_shape)
    dw = conv_backward_flop(*args, [False, output_mask[1], False], out_val=out_shape)
    assert dw % groups == 0
    return dx + dw // groups


def torch_step_flops(model: nn.Module, x: np.ndarray, y: np.ndarray) -> int:
    mapping = {torch.ops.aten.convolution_backward: grouped_conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    return counter.get_total_flops()


@pytest.mark.slow
@pytest.mark.parametrize("model_name, subset", CASES)
def test_graph_flops_equal_torch_flop_counter(model_name, subset):
    model, _ = prepared(model_name, subset)
    folder = exported(model_name, subset)
    (x, y), = batches(model, model.classifier.out_features, 1, batch=61)  # 61: no weight has that size
    state = load_file(folder / "state.safetensors")
    counted = node_flops(folder / "train_step.onnx", {INPUT: x, LABELS: y, LR: np.array(0.05, np.float32),
                                                     **state})
    assert sum(f for *_, f in counted) == torch_step_flops(model, x, y)
    forward = node_flops(folder / "forward.onnx", {INPUT: x, **{k: v for k, v in state.items()
                                                               if not k.startswith("momentum.")}})
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.from_numpy(x))
    assert sum(f for *_, f in forward) == counter.get_total_flops()


class EveryOp(nn.Module):
    """The supported ops the reference models do not use: ReLU6, Hardswish, max / adaptive / padded and
    overlapping average pools (count_include_pad both ways), a 2x2 pool of an odd-sized map (the graph's Resize
    form) and an adaptive pool to 1x1 of a 2x2 map (that form again), a depthwise conv with multiplier 2, a
    dilated conv, concatenation, a residual add, Dropout and a Flatten."""

    input_shape = (3, 15, 15)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)  # (B,6,8,8)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU6()
        self.depthwise = nn.Conv2d(6, 12, 3, padding=1, groups=6)  # multiplier 2
        self.dilated = nn.Conv2d(6, 12, 3, padding=2, dilation=2, bias=False)
        self.hswish = nn.Hardswish()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)  # overlapping: (B,24,4,4)
        self.avgpool = nn.AvgPool2d(3, stride=1, padding=1)  # padded, overlapping
        self.avgpool_excl = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False)  # (B,24,5,5)
        self.halve = nn.AvgPool2d(2)  # (B,24,2,2): the fifth row and column dropped
        self.adaptive = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(24, 5)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = torch.cat([self.depthwise(x), self.dilated(x)], dim=1)
        x = self.maxpool(self.hswish(x))
        x = self.halve(self.avgpool_excl(x + self.avgpool(x)))
        return self.classifier(self.dropout(self.flatten(self.adaptive(x))))


@pytest.mark.slow
def test_every_supported_op_matches_autograd(tmp_path):
    model = seeded(EveryOp()).eval()
    trainable = [n for n, _ in model.named_parameters()]
    opt = OptimizerConfig("sgd", lr=0.1)
    write_step_graphs(model, trainable, opt, tmp_path)
    (x, y), = batches(model, 5, 1, batch=6)
    x = x * 4  # spread the activations over ReLU6's and Hardswish's bends
    runner = GraphRunner(tmp_path, trainable, opt)
    loss, _ = runner.train_step(x, y, opt.lr)
    torch_loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), rel=1e-6)
    for name, p in model.named_parameters():
        expected = (p - opt.lr * p.grad).detach().numpy()
        np.testing.assert_allclose(runner.tensors[name], expected, rtol=0, atol=1e-6, err_msg=name)
    state = load_file(tmp_path / "state.safetensors")
    counted = node_flops(tmp_path / "train_step.onnx", {INPUT: x, LABELS: y, LR: np.array(0.1, np.float32), **state})
    model.zero_grad()
    assert sum(f for *_, f in counted) == torch_step_flops(model, x, y)


class WithLSTM(nn.Module):
    input_shape = (4, 8)

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        return self.classifier(self.rnn(x)[0][:, -1])


class WithGelu(nn.Module):
    input_shape = (8,)

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh"))
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.mark.parametrize("model, message", [
    (WithLSTM(), r"does not support aten\.\w+ in layer 'rnn' \(LSTM\)"),
    (WithGelu(), r"does not support aten\.gelu in layer 'features\.1' \(GELU\)"),
])
def test_unsupported_op_stops_the_export_in_one_line(tmp_path, model, message):
    with pytest.raises(UserError, match=message) as error:
        write_step_graphs(model, [n for n, _ in model.named_parameters()], OPT, tmp_path)
    assert "\n" not in str(error.value)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_trainable_names_must_be_parameters(tmp_path):
    model = REFERENCE_MODELS["ds-cnn"]()
    with pytest.raises(UserError, match="'features.1.running_mean' is not a parameter"):
        write_step_graphs(model, ["features.1.running_mean"], OPT, tmp_path)
