"""The cached frozen prefix: a run on cached features is the uncached run, step for step, for every method with a
prefix (ort-step bundles); resume keeps working with it; full and bias have no prefix to cache."""

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from edge_ft.checkpoint import load_safetensors
from edge_ft.cli import main
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.device.bundle import load_bundle
from edge_ft.device.inference import predict, session_runner
from edge_ft.device.ort_api import inference_session
from edge_ft.errors import UserError
from tests.ort_step_support import _ROOT, bundle_path
from tests.ort_training_support import mnist, npz_pair

ADAMW = OptimizerConfig("adamw", lr=0.01)
CACHED = {  # method -> (config, the first layer that trains: where the prefix ends)
    "lora": (MethodConfig("lora", rank=2, targets=("fc1", "fc2", "fc3")), "fc1"),
    "lora-save": (MethodConfig("lora", rank=2, targets=("fc1", "fc2"), modules_to_save=("fc3",)), "fc1"),
    "last-k": (MethodConfig("last-k", last_k=2), "fc2"),
    "probe": (MethodConfig("probe"), "fc3"),
}
# Same batches, same head graph inputs up to the prefix's rounding: the features come from features.onnx instead
# of the step graph's own forward, which may order a sum differently (float32: ~1e-7 relative per op).
LOSS_ATOL = 1e-5


@cache
def run(method: str, *extra: str) -> Path:
    """`edge-ft train` on 1000 MNIST examples (eval on 500 others): 2 epochs of 64, checkpoints every 10."""
    train, test = npz_pair()
    out = _ROOT / f"run-{method}-{len(list(_ROOT.glob('run-*')))}"
    assert main(["train", str(bundle_path(CACHED[method][0], ADAMW)), "--data", str(train), "--eval", str(test),
                 "--epochs", "2", "--batch", "64", "--lr", "0.01", "--checkpoint-every", "10", "--threads", "1",
                 "--out", str(out), "--quiet", *extra]) == 0
    return out


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", CACHED)
def test_cached_prefix_trains_the_same_steps(method):
    cfg, first = CACHED[method]
    b = load_bundle(bundle_path(cfg, ADAMW))
    assert b.manifest["features"]["first_trained"] == first and set(b.head.trainable) == set(b.trainable)
    # LoRA's first target (fc1) hands its frozen product W0 x + b over with its input: 256 + 120 features
    product = 120 if method.startswith("lora") else 0
    assert b.manifest["features"]["frozen_product"] == product
    assert b.manifest["features"]["shape"][-1] == {"fc1": 256 + product, "fc2": 120, "fc3": 84}[first]
    assert ("fc1.weight" in b.head.frozen) == (first == "fc1" and not product)
    plain, cached = run(method, "--no-cache"), run(method)  # cached by default: two epochs read each example twice
    a, c = results(plain), results(cached)
    assert not a["feature_cache"]["use"] and c["feature_cache"]["use"] and c["feature_cache"]["in_memory"]
    np.testing.assert_allclose(c["losses"], a["losses"], rtol=0, atol=LOSS_ATOL)
    ta, tc = load_safetensors(plain / "trained.safetensors"), load_safetensors(cached / "trained.safetensors")
    assert set(ta) == set(tc) == set(b.trainable)
    for name in ta:
        np.testing.assert_allclose(tc[name], ta[name], rtol=0, atol=1e-4, err_msg=name)
    x = mnist()[0][-200:]
    outs = [predict(session_runner(inference_session(p / "model.onnx", threads=1)), x) for p in (plain, cached)]
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-3)
    assert not list(cached.glob("*feature-cache.npy"))


def test_resume_with_the_cache_continues_the_same_run(tmp_path):
    """A cached run resumed from its last checkpoint (step 30 of 32) ends where the straight cached run ends."""
    train, test = npz_pair()
    straight = results(run("lora"))
    out = tmp_path / "resumed"
    args = ["train", str(bundle_path(CACHED["lora"][0], ADAMW)), "--data", str(train), "--eval", str(test),
            "--epochs", "2", "--batch", "64", "--lr", "0.01", "--checkpoint-every", "10", "--threads", "1",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    (out / "results.json").unlink()  # as if killed after its last checkpoint
    assert main([*args, "--resume"]) == 0
    r = results(out)
    assert r["resumed_from"] == [30] and r["feature_cache"]["use"]
    np.testing.assert_allclose(r["losses"], straight["losses"], rtol=0, atol=1e-6)


def test_resume_refuses_a_change_of_cache(tmp_path, capsys):
    train, _ = npz_pair()
    out = tmp_path / "run"
    args = ["train", str(bundle_path(CACHED["last-k"][0], ADAMW)), "--data", str(train), "--batch", "64",
            "--epochs", "2", "--checkpoint-every", "5", "--threads", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0  # cached by default
    (out / "results.json").unlink()
    assert main([*args, "--resume", "--no-cache"]) != 0
    assert "cache_features=True, this command gives False" in capsys.readouterr().err


def test_memory_mapped_cache_is_deleted(tmp_path):
    """Features that do not fit the budget go to a file in the run folder, which is gone when the run ends."""
    from edge_ft.device.trainer import TrainSettings, train

    x, y = mnist()
    b = load_bundle(bundle_path(CACHED["lora"][0], ADAMW))
    small = TrainSettings(batch=64, epochs=2, threads=1, quiet=True, memory_budget=1)
    r = train(b, (x[:300], y[:300]), None, small, tmp_path / "mapped")
    big = train(b, (x[:300], y[:300]), None, TrainSettings(batch=64, epochs=2, threads=1, quiet=True),
                tmp_path / "memory")
    assert r["feature_cache"]["use"] and not r["feature_cache"]["in_memory"] and big["feature_cache"]["in_memory"]
    assert r["losses"] == big["losses"] and not list((tmp_path / "mapped").glob("*.npy"))


@pytest.mark.parametrize("method", ["full", "bias"])
def test_full_and_bias_have_no_prefix(method, tmp_path):
    b = load_bundle(bundle_path(MethodConfig(method), ADAMW))
    assert "features" not in b.manifest and b.head is None
    x, y = mnist()
    from edge_ft.device.trainer import TrainSettings, train

    with pytest.raises(UserError, match="no frozen prefix"):
        train(b, (x[:64], y[:64]), None, TrainSettings(batch=64, cache_features=True, quiet=True), tmp_path / "r")
    r = train(b, (x[:64], y[:64]), None, TrainSettings(batch=64, epochs=2, quiet=True), tmp_path / "auto")
    assert not r["feature_cache"]["use"]


def test_memory_mapped_cache_is_deleted_when_the_run_fails(tmp_path, monkeypatch):
    """A run that stops on an error (here: at its first epoch's end) leaves no cache file behind either."""
    from edge_ft.device import trainer
    from edge_ft.device.feature_cache import CACHE_FILE

    x, y = mnist()
    seen = []

    def fail(run, *args):
        seen.extend(p.name for p in run.out.glob("*.npy"))
        raise RuntimeError("stopped")

    monkeypatch.setattr(trainer, "_log_epoch", fail)
    b = load_bundle(bundle_path(CACHED["lora"][0], ADAMW))
    out = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="stopped"):
        trainer.train(b, (x[:300], y[:300]), (x[300:400], y[300:400]),
                      trainer.TrainSettings(batch=64, epochs=2, threads=1, quiet=True, memory_budget=1), out)
    assert sorted(seen) == sorted([CACHE_FILE, f"eval-{CACHE_FILE}"]) and not list(out.glob("*.npy"))


@pytest.mark.parametrize("budget, in_memory", [("1", False), (str(64 * 2**30), True)])
def test_train_sizes_the_cache_against_the_budget_its_parent_gives(budget, in_memory, monkeypatch, tmp_path):
    """A confined run gets its profile's budget in $EDGE_FT_MEMORY_BUDGET: features that do not fit half of what
    that budget leaves are memory-mapped in the run folder (and gone at the end), else held in memory."""
    from edge_ft.contracts import MEMORY_BUDGET_ENV

    train, _ = npz_pair()
    monkeypatch.setenv(MEMORY_BUDGET_ENV, budget)
    out = tmp_path / "run"
    assert main(["train", str(bundle_path(CACHED["probe"][0], ADAMW)), "--data", str(train), "--batch", "64",
                 "--epochs", "2", "--threads", "1", "--out", str(out), "--quiet"]) == 0
    cache = results(out)["feature_cache"]
    assert cache["use"] and cache["in_memory"] is in_memory and not list(out.glob("*.npy"))


def test_a_confined_run_is_given_its_profiles_budget(tmp_path):
    from edge_ft.contracts import MEMORY_BUDGET_ENV
    from edge_ft.emulation.emulate import confine
    from tests.test_emulate import make_profile

    conf = confine(make_profile(tmp_path, budget_mb=96), mode="native")
    try:
        assert conf.env[MEMORY_BUDGET_ENV] == str(96 * 2**20)
    finally:
        conf.remove()
