"""The ort-step engine: one plain-ONNX training-step graph run by a standard InferenceSession.

Parity: 20 steps on real MNIST batches against torch.optim, each step compared from the same weights, for every
method with SGD-momentum and AdamW. Portability: the same bundle trained by standard onnxruntime 1.32 in .venv-device
(no torch, no onnx) gives the host's losses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import ort_step_support as support
import pytest
import torch
import torch.nn.functional as F
from lockstep import run_lockstep
from safetensors.numpy import load_file

from edge_ft.config import METHODS, MethodConfig, OptimizerConfig
from edge_ft.device.bundle import load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.device.engines.onnx_wire import bake_weights
from edge_ft.device.engines.ort_step import FLAT
from edge_ft.errors import UserError
from edge_ft.host.methods import build_model

REPO = Path(__file__).resolve().parents[1]
DEVICE_PYTHON = REPO / ".venv-device" / "bin" / "python"
LR = {"sgd": 0.05, "sgd-momentum": 0.05, "adamw": 2e-3}
# What a step's weight gap may hold beyond the rounding bound of tests/lockstep.py (summation order, ReLU kinks
# within rounding of zero, both carried through the optimizer), as a fraction of the largest single-step change:
# the forward's own relative rounding. Measured excess: 0 for SGD-momentum, 5e-4 for AdamW (see test_device_train).
UPDATE_RTOL = {"sgd-momentum": 1e-5, "adamw": 5e-3}
PARITY = {**{m: MethodConfig(m) for m in METHODS},  # and a 3-class task: adapters on fc1/fc2, fc3 trained whole
          "lora-new-head": MethodConfig("lora", targets=("fc1", "fc2"), modules_to_save=("fc3",), num_classes=3)}


def reference_model(cfg: MethodConfig) -> torch.nn.Module:
    """The plain torch model (nn.AvgPool2d, unmerged LoRA) the bundle was exported from."""
    state = {k: torch.from_numpy(v.copy()) for k, v in support.base_state().items()}
    return build_model(cfg, state, seed=support.EXPORT_SEED)


def torch_optimizer(params, opt: OptimizerConfig) -> torch.optim.Optimizer:
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum if opt.name == "sgd-momentum" else 0)


def schedule(opt: OptimizerConfig, step: int) -> float:
    return opt.lr * (1 - step / 40)  # a decaying rate: lr is a graph input, not a constant baked into the graph


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adamw"])
@pytest.mark.parametrize("method", PARITY)
def test_twenty_steps_match_torch_optim(method, optimizer):
    """Every step compared with torch.optim from the engine's weights (tests/lockstep.py), with a decaying rate."""
    cfg, opt = PARITY[method], OptimizerConfig(optimizer, lr=LR[optimizer])
    engine = open_engine(load_bundle(support.bundle_path(cfg, opt)))
    start = engine.parameters()
    model = reference_model(cfg)
    torch_opt = torch_optimizer([p for p in model.parameters() if p.requires_grad], opt)
    batches = support.mnist_batches(classes=cfg.num_classes)
    gaps = run_lockstep(engine, model, torch_opt, batches, lambda step: schedule(opt, step))
    np.testing.assert_allclose(gaps.losses, gaps.reference, rtol=2e-6)  # forward rounding from the same weights
    gaps.check(UPDATE_RTOL[optimizer])
    assert len(batches[-1][0]) == 5  # the last batch was short: the batch axis is dynamic
    x = batches[3][0]
    with torch.no_grad():  # the training graph's forward is torch's forward at the trained weights
        model.load_state_dict({k: torch.from_numpy(v) for k, v in engine.parameters().items()})
        np.testing.assert_allclose(engine.logits(x), model(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-5)

    after = engine.parameters()
    for name, p in model.named_parameters():
        assert np.isfinite(after[name]).all(), name  # AdamW's eps survived export (LoRA's dA is 0 at step 1)
        if p.requires_grad:
            assert not np.array_equal(after[name], start[name]), f"{name} did not train"
        else:
            np.testing.assert_array_equal(after[name], start[name], err_msg=f"frozen {name} moved")
    assert set(engine.trainable_state()) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_export_inference_is_a_standalone_plain_model(tmp_path):
    cfg, opt = MethodConfig("lora"), OptimizerConfig("adamw", lr=LR["adamw"])
    engine = open_engine(load_bundle(support.bundle_path(cfg, opt)))
    for x, y in support.mnist_batches()[:5]:
        engine.train_step(x, y, opt.lr)
    engine.export_inference(tmp_path / "model.onnx")

    model = onnx.load(tmp_path / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    session = ort.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    x = support.mnist_batches()[7][0]
    np.testing.assert_allclose(session.run(None, {"input": x})[0], engine.logits(x), rtol=0, atol=1e-6)

    reference = reference_model(cfg)  # the engine's weights in torch give the same logits
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in engine.parameters().items()})
    np.testing.assert_allclose(engine.logits(x), reference(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


@pytest.mark.slow
def test_resume_continues_bit_identically(tmp_path):
    cfg, opt = MethodConfig("probe"), OptimizerConfig("adamw", lr=LR["adamw"])
    bundle = load_bundle(support.bundle_path(cfg, opt))
    batches = support.mnist_batches()
    engine = open_engine(bundle)
    for x, y in batches[:5]:
        engine.train_step(x, y, opt.lr)
    engine.save_state(tmp_path / "resume.safetensors")
    straight = [engine.train_step(x, y, opt.lr)[0] for x, y in batches[5:10]]

    resumed = open_engine(bundle)
    resumed.load_state(tmp_path / "resume.safetensors")
    assert [resumed.train_step(x, y, opt.lr)[0] for x, y in batches[5:10]] == straight

    other = load_bundle(support.bundle_path(MethodConfig("lora"), opt))
    with pytest.raises(UserError, match="missing tensor 'fc1.lora_A'"):
        open_engine(other).load_state(tmp_path / "resume.safetensors")


@pytest.mark.slow
def test_graphs_are_small_portable_and_weightless():
    opt = OptimizerConfig("adamw", lr=LR["adamw"])
    folder = support.bundle_path(MethodConfig("full"), opt)
    for name in ("train_step.onnx", "forward.onnx"):
        model = onnx.load(folder / name)
        assert model.ir_version <= 10
        assert {(o.domain, o.version) for o in model.opset_import} == {("", 21)}
        assert not model.graph.initializer and all(n.domain == "" for n in model.graph.node)
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert (folder / name).stat().st_size < 64_000
    train = onnx.load(folder / "train_step.onnx")
    assert [o.name for o in train.graph.output[:3]] == ["loss", "logits", "next.conv1.weight"]
    assert [i.name for i in train.graph.input][-1] == "step"


def test_onnx_reference_evaluator_runs_the_step_graph_like_onnxruntime():
    """onnx's own reference implementation, stricter than onnxruntime (OneHot's depth must be a scalar), takes one
    step of a step graph and gives onnxruntime's loss, logits and next weights."""
    from onnx.reference import ReferenceEvaluator

    folder = support.bundle_path(MethodConfig("probe"), OptimizerConfig("sgd", lr=LR["sgd"])) / "head"
    x, y = support.mnist_batches()[0]  # the head's graph (fc3 and the loss): the evaluator's convolutions are slow
    features = np.random.default_rng(0).random((len(x), 84), dtype=np.float32)
    state = load_file(folder / "state.safetensors")
    graph = onnx.load(folder / "train_step.onnx")
    feed = {"input": features, "labels": y, "lr": np.array(LR["sgd"], np.float32)}
    trainable = json.loads((folder / "manifest.json").read_text())["trainable"]  # a head's step is flat
    feed[FLAT] = np.concatenate([state[n].ravel() for n in trainable])
    feed |= {i.name: state[i.name] for i in graph.graph.input if i.name not in feed}
    ours = ReferenceEvaluator(graph).run(None, feed)
    theirs = ort.InferenceSession(folder / "train_step.onnx", providers=["CPUExecutionProvider"]).run(None, feed)
    assert [o.shape for o in ours] == [o.shape for o in theirs]
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not DEVICE_PYTHON.exists(), reason="the device venv is built by `make test`")
def test_standard_onnxruntime_trains_the_same_bundle(tmp_path):
    """.venv-device: onnxruntime 1.32, no torch, no onnx; the current source on PYTHONPATH."""
    cfg, opt = MethodConfig("lora"), OptimizerConfig("adamw", lr=LR["adamw"])
    folder = support.bundle_path(cfg, opt)
    batches = support.mnist_batches()[:10]
    np.savez(tmp_path / "batches.npz", **{f"x{i}": x for i, (x, _) in enumerate(batches)},
             **{f"y{i}": y for i, (_, y) in enumerate(batches)})
    script = (
        "import json, sys, numpy as np\n"
        "from edge_ft.device.bundle import load_bundle\n"
        "from edge_ft.device.engines import open_engine\n"
        "engine = open_engine(load_bundle(sys.argv[1]))\n"
        "data = np.load(sys.argv[2], allow_pickle=False)\n"
        f"losses = [engine.train_step(data[f'x{{i}}'], data[f'y{{i}}'], {opt.lr})[0] for i in range({len(batches)})]\n"
        "import onnxruntime\n"
        "print(json.dumps({'losses': losses, 'ort': onnxruntime.__version__,\n"
        "                  'torch': 'torch' in sys.modules, 'onnx': 'onnx' in sys.modules}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([str(DEVICE_PYTHON), "-c", script, str(folder), str(tmp_path / "batches.npz")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    device = json.loads(run.stdout)
    assert device["ort"] != ort.__version__ and not device["torch"] and not device["onnx"]

    host = open_engine(load_bundle(folder))
    host_losses = [host.train_step(x, y, opt.lr)[0] for x, y in batches]
    np.testing.assert_allclose(device["losses"], host_losses, rtol=1e-5)


@pytest.mark.slow
def test_engine_validates_what_it_hands_to_onnxruntime():
    opt = OptimizerConfig("sgd-momentum", lr=LR["sgd-momentum"])
    bundle = load_bundle(support.bundle_path(MethodConfig("probe"), opt)).head  # head-only: quick to export
    engine = open_engine(bundle)
    features = np.random.default_rng(0).random((4, 84), dtype=np.float32)
    loss, logits = engine.train_step(features, np.array([0, 1, 2, 9]), 0.1)
    assert np.isfinite(loss) and logits.shape == (4, 10)
    with pytest.raises(UserError, match="float32 \\(B, 84\\)"):
        engine.train_step(features[:, :80], np.zeros(4, np.int64), 0.1)
    with pytest.raises(UserError, match="labels must lie in 0..9"):
        engine.train_step(features, np.array([0, 1, 2, 10]), 0.1)
    with pytest.raises(UserError, match="labels must have shape"):
        engine.train_step(features, np.zeros(3, np.int64), 0.1)
    with pytest.raises(UserError, match="not a trainable tensor"):
        engine.load_trainable({"fc2.weight": np.zeros((84, 120), np.float32)})
    with pytest.raises(UserError, match="fc3.bias has shape \\(\\), bundle .* needs \\(10,\\)"):
        engine.load_trainable({"fc3.bias": np.float32(0)})  # bound buffers are written in place: no broadcasting


@pytest.mark.slow
def test_bound_buffers_step_exactly_like_feeding_the_graph():
    """The engine's in-place ping-pong buffers (IOBinding) against session.run with every tensor fed: the same
    bits over steps that change the batch size and the learning rate, snapshots unchanged by later steps."""
    opt = OptimizerConfig("adamw", lr=LR["adamw"])
    bundle = load_bundle(support.bundle_path(MethodConfig("probe"), opt)).head
    engine = open_engine(bundle)
    files = bundle.manifest["ort_step"]
    session = ort.InferenceSession(str(bundle.file(files["train_graph"])), providers=["CPUExecutionProvider"])
    state = load_file(bundle.file(files["state"]))
    trainable = list(bundle.trainable)
    if FLAT in {i.name for i in session.get_inputs()}:  # a flat step graph: one vector per kind, in state order
        for kind in ("", "exp_avg.", "exp_avg_sq."):
            state[kind + FLAT] = np.concatenate([state[kind + n].ravel() for n in trainable])
    outputs = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(0)
    snapshot = None
    for step, (batch, lr) in enumerate([(8, 1e-2), (8, 1e-2), (3, 1e-2), (8, 5e-3), (3, 5e-3)]):
        x, y = rng.random((batch, 84), dtype=np.float32), rng.integers(0, 10, batch)
        loss, logits = engine.train_step(x, y, lr)
        feeds = {i.name: state[i.name] for i in session.get_inputs()[3:]}
        inputs = {"input": x, "labels": y, "lr": np.array(lr, np.float32), **feeds}
        expected = dict(zip(outputs, session.run(None, inputs)))
        assert loss == expected["loss"] and np.array_equal(logits, expected["logits"])
        state.update({k.removeprefix("next."): v for k, v in expected.items() if k.startswith("next.")})
        if FLAT in state:
            ends = np.cumsum([state[n].size for n in trainable])[:-1]
            state.update({n: v.reshape(state[n].shape) for n, v in zip(trainable, np.split(state[FLAT], ends))})
        assert all(np.array_equal(v, state[k]) for k, v in engine.trainable_state().items())
        if step == 1:
            snapshot = engine.trainable_state()
            kept = {k: v.copy() for k, v in snapshot.items()}
    assert all(np.array_equal(snapshot[k], kept[k]) for k in kept)


def test_baked_weights_make_a_valid_model(tmp_path):
    """onnx_wire against the onnx package: inputs become initializers, everything else is copied through."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
    )
    raw = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()
    w, b = np.arange(6, dtype=np.float32).reshape(3, 2) / 7, np.array([1e-30, -2.5], np.float32)
    baked = bake_weights(raw, {"w": w, "b": b})
    model = onnx.load_from_string(baked)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    x = np.random.default_rng(0).random((5, 3), dtype=np.float32)
    out = ort.InferenceSession(baked, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    baked_values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(baked_values["w"], w)  # the very bits, 1e-30 included
    np.testing.assert_array_equal(baked_values["b"], b)
    # Two float32 dot products of 3 terms (ORT's MLAS vs numpy's BLAS kernel of this CPU) may round differently in
    # the last bit; the float64 result is within a few ulp of both.
    exact = x.astype(np.float64) @ w.astype(np.float64) + b
    np.testing.assert_allclose(out, exact, rtol=4 * np.finfo(np.float32).eps, atol=0)
    with pytest.raises(UserError, match="no input named 'bias'"):
        bake_weights(raw, {"bias": b})
    with pytest.raises(UserError, match="not a valid ONNX model"):
        bake_weights(raw[: len(raw) // 2], {"w": w})  # a truncated copy


def test_device_engine_imports_neither_torch_nor_onnx():
    code = ("import sys; import edge_ft.device.engines.ort_step, edge_ft.device.engines.onnx_wire; "
            "print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


class StridedNet(torch.nn.Module):
    """Exercises the decompositions LeNet-5 does not reach: a strided, padded conv and nn.AvgPool2d over an
    odd-sized map (13x13: the last row and column get no gradient)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 3, 3)  # -> (B,3,26,26)
        self.conv2 = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)  # -> (B,4,13,13)
        self.pool = torch.nn.AvgPool2d(2)  # -> (B,4,6,6)
        self.fc = torch.nn.Linear(144, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.fc(x.flatten(1))


@pytest.mark.slow
def test_decompositions_match_autograd_beyond_lenet(tmp_path):
    from edge_ft.device.engines.ort_step import optimizer_keys
    from edge_ft.host.export.step_trace import export_onnx, make_step, train_io_names

    torch.manual_seed(0)
    model, opt = StridedNet(), OptimizerConfig("sgd", lr=0.1)
    names = [n for n, _ in model.named_parameters()]
    tensors = [p.detach().clone() for p in model.parameters()]
    inputs, outputs = train_io_names(names, [], optimizer_keys(opt.name, names))
    export_onnx(make_step(model, names, [], [], opt), (1, 28, 28), tensors, inputs, outputs,
                tmp_path / "step.onnx", labels=True)
    x, y = support.mnist_batches()[0]
    feeds = {"input": x, "labels": y, "lr": np.array(opt.lr, np.float32),
             **{n: t.numpy() for n, t in zip(names, tensors)}}
    loss, _, *updated = ort.InferenceSession(tmp_path / "step.onnx").run(None, feeds)

    torch_loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    assert loss == pytest.approx(torch_loss.item(), rel=1e-6)
    for name, p, new in zip(names, model.parameters(), updated):
        np.testing.assert_allclose(new, (p - opt.lr * p.grad).detach().numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_flat_step_updates_exactly_like_the_step_per_tensor(tmp_path):
    """A head's flat step graph (every trainable tensor in one vector) and the per-tensor step graph of the same model
    give the same loss, logits, weights and AdamW moments, bit for bit, over three steps."""
    from edge_ft.device.engines.ort_step import STEP_KEY, next_name, optimizer_keys
    from edge_ft.host.export.ort_step import write_step_graphs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(84, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    model.input_shape = (84,)
    model[0].weight.requires_grad = False  # a frozen tensor too: it stays a graph input in both forms
    opt, trainable = OptimizerConfig("adamw", lr=0.05), ["0.bias", "2.weight", "2.bias"]
    runs = {}
    for flat in (False, True):
        write_step_graphs(model, trainable, opt, tmp_path / str(flat), flat=flat)
        session = ort.InferenceSession(tmp_path / str(flat) / "train_step.onnx", providers=["CPUExecutionProvider"])
        state = load_file(tmp_path / str(flat) / "state.safetensors")
        names = [FLAT] if flat else trainable
        updated = {FLAT: np.concatenate([state[n].ravel() for n in trainable])} if flat else {
            n: state[n] for n in trainable}
        updated |= {k: np.zeros((), np.int64) if k == STEP_KEY else np.zeros_like(updated[k.split(".", 1)[1]])
                    for k in optimizer_keys(opt.name, names)}
        outs = []
        for _, y in support.mnist_batches()[:3]:
            feed = {"input": np.random.default_rng(len(outs)).random((len(y), 84), dtype=np.float32), "labels": y,
                    "lr": np.array(opt.lr, np.float32), "0.weight": state["0.weight"], **updated}
            got = session.run(None, feed)
            updated = dict(zip(updated, got[2:]))
            assert [o.name for o in session.get_outputs()][2:] == [next_name(k) for k in updated]
            outs.append(got[:2])
        runs[flat] = (outs, updated)
    (per_tensor, last), (flat_outs, flat_last) = runs[False], runs[True]
    for (loss, logits), (flat_loss, flat_logits) in zip(per_tensor, flat_outs):
        assert np.array_equal(loss, flat_loss) and np.array_equal(logits, flat_logits)
    for buf in ("", "exp_avg.", "exp_avg_sq."):
        assert np.array_equal(np.concatenate([last[buf + n].ravel() for n in trainable]), flat_last[buf + FLAT])
    assert last[STEP_KEY] == flat_last[STEP_KEY] == 3
