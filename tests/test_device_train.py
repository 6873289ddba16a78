"""On-device training with the ort-training engine: parity with torch, resumable state, `edge-ft train`, no torch."""

import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ft.checkpoint import load_safetensors
from edge_ft.cli import main
from edge_ft.data.batches import epoch_batches
from edge_ft.device.bundle import load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.device.inference import accuracy, predict, session_runner
from edge_ft.device.ort_api import inference_session
from edge_ft.host.methods import build_model
from edge_ft.run_record import read_results, read_summary
from edge_ft.training_defaults import epoch_lr
from tests.lockstep import run_lockstep
from tests.ort_training_support import ADAMW, EXPORT_SEED, METHODS, ROOT, SGD, base_state, bundle, mnist, npz_pair

REPO = Path(__file__).resolve().parents[1]
DEVICE_PYTHON = REPO / ".venv-device" / "bin" / "python"
LOSS_TOL = 1e-5  # per-step loss from the same weights, ORT vs torch: float32 rounding of a ~2.3 loss is ~1e-6
# What a step's weight gap may hold beyond the rounding bound of tests/lockstep.py (each sum's Σ|terms| and ReLU
# kinks within rounding of zero, carried through SGD's or AdamW's recurrences), as a fraction of the largest
# single-step change: the forward's relative rounding. Measured on AVX2: SGD 2e-8, AdamW 8.7e-4.
UPDATE_RTOL = {"sgd": 1e-5, "adamw": 5e-3}
ADAMW_LR = {"full": 3e-3, "probe": 3e-2, "lora": 2e-2}  # the methods' recipe rates (training_defaults) when tuned


@cache
def batches(steps: int = 20, batch: int = 32, tail: int = 5, classes: int = 10):
    """`steps` real MNIST batches of digits < `classes` in the shared seeded order; the last holds `tail` examples
    (dynamic batch)."""
    x, y = mnist()
    x, y = x[y < classes], y[y < classes]
    n = (steps - 1) * batch + tail
    return tuple(epoch_batches(x[:n], y[:n], batch, seed=0, epoch=0))


def torch_reference(cfg, opt):
    """The plain torch model (nn.AvgPool2d, torch.optim) on the same base and LoRA init, and its optimizer."""
    torch.manual_seed(0)
    model = build_model(cfg, {k: torch.from_numpy(v) for k, v in base_state().items()}, seed=EXPORT_SEED)
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=opt.lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    return model, optimizer


@pytest.mark.parametrize("opt", [SGD, ADAMW], ids=["sgd", "adamw"])
@pytest.mark.parametrize("method", METHODS)
def test_twenty_steps_match_torch(method, opt):
    """Same base, batches and optimizer, compared one step at a time from the engine's weights (tests/lockstep.py):
    every step's loss and update agree with torch.optim's, frozen tensors come back bit-identical."""
    cfg = METHODS[method]
    b = load_bundle(bundle(cfg, opt))
    opt = replace(opt, lr=ADAMW_LR[cfg.method]) if opt.name == "adamw" else opt
    engine = open_engine(b, threads=1)
    model, optimizer = torch_reference(cfg, opt)
    gaps = run_lockstep(engine, model, optimizer, batches(classes=cfg.num_classes), lambda step: opt.lr)
    np.testing.assert_allclose(gaps.losses, gaps.reference, rtol=0, atol=LOSS_TOL)
    gaps.check(UPDATE_RTOL[opt.name])
    params = engine.parameters()
    start = open_engine(b, threads=1).parameters()
    assert all(np.abs(params[n] - start[n]).max() > 1e-5 for n in b.trainable if not n.endswith("lora_A"))
    for name in b.frozen:  # never touched: the very same bits
        np.testing.assert_array_equal(params[name], start[name], err_msg=name)
        np.testing.assert_array_equal(params[name], base_state()[name], err_msg=name)


def test_logits_are_the_eval_forward():
    b = load_bundle(bundle(METHODS["lora"]))
    engine = open_engine(b, threads=1)
    x, y = batches()[0]
    _, train_logits = engine.train_step(x, y, 0.0)  # lr 0: weights unchanged, logits of the training graph
    np.testing.assert_allclose(engine.logits(x), train_logits, rtol=0, atol=1e-6)
    model = build_model(METHODS["lora"], {k: torch.from_numpy(v) for k, v in base_state().items()}, seed=EXPORT_SEED)
    with torch.no_grad():
        np.testing.assert_allclose(train_logits, model(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-5)


def test_saved_state_resumes_exactly(tmp_path):
    """AdamW moments and step count come back with the weights: 10 + 10 steps == 20 steps."""
    b = load_bundle(bundle(METHODS["lora"], ADAMW))
    straight = open_engine(b, threads=1)
    expected = [straight.train_step(x, y, ADAMW.lr)[0] for x, y in batches()]
    first = open_engine(b, threads=1)
    losses = [first.train_step(x, y, ADAMW.lr)[0] for x, y in batches()[:10]]
    first.save_state(str(tmp_path / "half.state"))
    resumed = open_engine(b, threads=1)
    resumed.load_state(str(tmp_path / "half.state"))
    losses += [resumed.train_step(x, y, ADAMW.lr)[0] for x, y in batches()[10:]]
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-6)
    for name, value in resumed.trainable_state().items():
        np.testing.assert_allclose(value, straight.trainable_state()[name], rtol=0, atol=1e-6)


@cache
def cli_run(method: str, *extra: str) -> Path:
    """`edge-ft train` on 1000 MNIST examples (eval on 500 others), 2 epochs of 64, cosine, checkpoints every 10."""
    train, test = npz_pair()
    out = ROOT / f"run-{method}-{len(list(ROOT.glob('run-*')))}"
    assert main(["train", str(bundle(METHODS[method])), "--data", str(train), "--eval", str(test), "--epochs", "2",
                 "--batch", "64", "--lr", "0.01", "--schedule", "cosine", "--checkpoint-every", "10",
                 "--threads", "1", "--out", str(out), "--quiet", *extra]) == 0
    return out


def test_train_cli_writes_a_complete_run():
    out = cli_run("full", "--mem-arena", "on")
    r = json.loads((out / "results.json").read_text())
    steps = 2 * math.ceil(1000 / 64)
    assert r["steps"] == steps == len(r["losses"]) and r["step_latency_ms"]["n"] == steps
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-0000{n}.state" for n in (10, 20, 30)]
    assert [e["lr"] for e in r["epochs"]] == [epoch_lr(0.01, e, 2, "cosine") for e in range(2)]
    assert r["epochs"][1]["mean_loss"] < r["epochs"][0]["mean_loss"]
    assert r["accuracy"] > 0.5  # 32 steps of full fine-tuning from a random init on real digits
    x_eval, y_eval = mnist()[0][-500:], mnist()[1][-500:]
    run = session_runner(inference_session(out / "model.onnx", threads=1))
    assert accuracy(predict(run, x_eval), y_eval) == r["accuracy"] == r["epochs"][-1]["eval_accuracy"]
    trained = load_safetensors(out / "trained.safetensors")
    assert set(trained) == set(load_bundle(bundle(METHODS["full"])).trainable)
    assert r["artifact_bytes"]["trained.safetensors"] == (out / "trained.safetensors").stat().st_size
    assert set(r["bundle_bytes"]) >= {"checkpoint", "training_model.onnx", "manifest.json"}
    memory = r["memory_mb"]
    assert 0 < memory["rss_after_imports"] <= memory["peak_rss_sampled"] <= memory["ru_maxrss"] + 1
    # The one results schema: the block both engines write equals what the reader derives from an older file.
    assert r["summary"] == read_summary({k: v for k, v in r.items() if k != "summary"})
    assert r["summary"]["engine"] == "ort-training" and r["summary"]["accuracy"] == r["accuracy"]
    assert read_results(out)["summary"] == r["summary"]  # the file holds what train() returned


def test_cached_features_train_the_same_head():
    plain, cached = cli_run("probe", "--no-cache"), cli_run("probe", "--cache-features")
    a, b = (json.loads((p / "results.json").read_text()) for p in (plain, cached))
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=0, atol=1e-5)
    assert b["accuracy"] == a["accuracy"] and b["feature_cache_seconds"] > 0 and a["feature_cache_seconds"] is None
    ta, tb = load_safetensors(plain / "trained.safetensors"), load_safetensors(cached / "trained.safetensors")
    for name in ta:
        np.testing.assert_allclose(tb[name], ta[name], rtol=0, atol=1e-5)
    x = mnist()[0][:256, None].astype(np.float32) / 255
    outs = [inference_session(p / "model.onnx", threads=1).run(None, {"input": x})[0] for p in (plain, cached)]
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-4)


def test_train_cli_errors_are_one_line(tmp_path, capsys):
    from edge_ft.data.npz import save_npz

    train, _ = npz_pair()
    bad = tmp_path / "labels.npz"
    save_npz(bad, mnist()[0][:10], np.full(10, 12))
    lora = str(bundle(METHODS["lora"]))
    cases = [
        ([str(bundle(METHODS["full"])), "--data", str(train), "--cache"], "has no frozen prefix to cache"),
        ([lora, "--data", str(bad)], "labels must be >= 0 and < 10"),
        ([str(tmp_path / "nope"), "--data", str(train)], "no such bundle folder"),
    ]
    for argv, message in cases:
        assert main(["train", *argv, "--steps", "2", "--quiet", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


BLOCKER = textwrap.dedent("""
    import os, sys

    class BlockTorchAndOnnx:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "onnxscript"):
                with open(os.environ["EDGE_FT_BLOCK_LOG"], "a") as log:
                    log.write(name + "\\n")
                raise ImportError(f"{name} is blocked: the device side must not import it")
            return None

    sys.meta_path.insert(0, BlockTorchAndOnnx())
""")


def test_device_run_never_imports_torch_or_onnx(tmp_path):
    """A whole fine-tuning + adapter export + merge in a process where importing torch or onnx raises."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "blocked.log"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}", "EDGE_FT_BLOCK_LOG": str(log)}
    train, test = npz_pair()
    b = str(bundle(METHODS["lora"]))

    def cli(*argv):
        done = subprocess.run([sys.executable, "-m", "edge_ft.cli", *argv], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    cli("train", b, "--data", str(train), "--eval", str(test), "--steps", "30", "--batch", "32", "--threads", "1",
        "--out", str(tmp_path / "run"), "--quiet")
    cli("adapter", "export", str(tmp_path / "run"), "--out", str(tmp_path / "adapter"))
    cli("adapter", "merge", b, str(tmp_path / "adapter"), "--out", str(tmp_path / "merged.onnx"))
    assert not log.exists(), f"tried to import: {log.read_text()}"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 30
    assert (tmp_path / "merged.onnx").stat().st_size > 0


needs_device_venv = pytest.mark.skipif(not DEVICE_PYTHON.exists(), reason="no .venv-device (make device-venv)")


@needs_device_venv
def test_inference_model_runs_on_standard_onnxruntime(tmp_path):
    """model.onnx from the training API loads in the device venv's standard onnxruntime and agrees."""
    out = cli_run("lora")
    x = mnist()[0][:64, None].astype(np.float32) / 255
    np.save(tmp_path / "x.npy", x)
    script = ("import numpy as np, onnxruntime as ort, sys; s = ort.InferenceSession(sys.argv[1]); "
              "np.save(sys.argv[3], s.run(None, {'input': np.load(sys.argv[2])})[0]); print(ort.__version__)")
    done = subprocess.run([str(DEVICE_PYTHON), "-c", script, str(out / "model.onnx"), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not done.stdout.startswith("1.19")  # really the standard wheel, not the training build
    expected = inference_session(out / "model.onnx", threads=1).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=0, atol=1e-5)


@needs_device_venv
def test_standard_onnxruntime_refuses_ort_training_bundles_cleanly(tmp_path):
    train, _ = npz_pair()
    done = subprocess.run([str(DEVICE_PYTHON), "-m", "edge_ft.cli", "train", str(bundle(METHODS["lora"])), "--data",
                           str(train), "--steps", "1", "--out", str(tmp_path / "run")],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no training API" in done.stderr and "--engine ort-step" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
