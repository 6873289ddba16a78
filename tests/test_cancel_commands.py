"""The other commands that start confined or measured processes end them on a signal to the command alone, as
tests/test_cancel.py shows for `profile run` and `bench`: `demo`, `recommend --measure`, `bench --models`,
`profile check` (both workloads) and `train --profile`. Each is cancelled where it first has a child running (a
confined one where it confines), with tiny settings; the preparation of a sweep is shared by the cases of one
command, so only the first of them pays for its exports.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from edge_ft.contracts import RESULTS
from edge_ft.device.resume import RESUME
from tests.cancel_support import Command, needs_cgroups, signal_id

TERM_AND_KILL = [signal.SIGTERM, signal.SIGKILL]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """A folder whose prep/ (bases, data, bundles) the cases of this module reuse."""
    return tmp_path_factory.mktemp("cancel-prep")


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    return path


def _no_record(results: Path, cmd: Command, sig: int) -> None:
    """A run cut short is never recorded, and the command says it kept none."""
    assert not results.is_file() or results.read_text() == ""
    if sig != signal.SIGKILL:
        assert f"kept: 0 finished runs in {results}" in cmd.output()


@pytest.mark.parametrize("sig", TERM_AND_KILL, ids=signal_id)
def test_demo_ends_its_preparation(tmp_path, sig):
    """The demo's first child prepares (pretrains, exports); its runs are the sweep's, tested with `bench`."""
    out = tmp_path / "demo"
    cmd = Command(["demo", "--out", str(out), "--profiles", "host,rpi-zero-2w", "--epochs", "1",
                   "--pretrain-epochs", "1", "--host-speed", "1", "--quiet"], tmp_path)
    cmd.wait_until(lambda: cmd.running("edge_ft.bench.prepare"), "the demo's preparation started")
    cmd.cancel(sig)
    assert not (out / "results.jsonl").exists() and not (out / "report.md").exists()
    if sig != signal.SIGKILL:
        assert "ended the preparation" in cmd.output()


@needs_cgroups
@pytest.mark.parametrize("sig", TERM_AND_KILL, ids=signal_id)
def test_recommend_measure_ends_its_confined_run(tmp_path, shared, base_checkpoint, sig):
    results = _fresh(shared / "results.jsonl")
    cmd = Command(["recommend", "--profile", "rpi-zero-2w", "--measure", "--methods", "probe-cached", "--engines",
                   "ort-training", "--steps", "20", "--host-speed", "1", "--base", str(base_checkpoint),
                   "--results", str(results), "--quiet"], tmp_path)
    cmd.wait_until(lambda: cmd.confined("edge_ft.cli train"), "the confined run started")
    cmd.cancel(sig)
    _no_record(results, cmd, sig)


@needs_cgroups
@pytest.mark.parametrize("sig", TERM_AND_KILL, ids=signal_id)
def test_bench_models_ends_its_confined_run(tmp_path, shared, sig):
    results = _fresh(shared / "models.jsonl")
    cmd = Command(["bench", "--models", "lenet5", "--methods", "probe", "--profiles", "rpi-zero-2w", "--steps", "2",
                   "--max-batch", "64", "--host-speed", "1", "--results", str(results), "--quiet"], tmp_path)
    cmd.wait_until(lambda: cmd.confined("edge_ft.device.step_probe"), "the confined step probe started")
    cmd.cancel(sig)
    _no_record(results, cmd, sig)


@needs_cgroups
@pytest.mark.parametrize("sig", TERM_AND_KILL, ids=signal_id)
def test_profile_check_ends_its_confined_workload(tmp_path, sig):
    cmd = Command(["profile", "check", "--profiles", "rpi-zero-2w", "--cycles", "1", "--host-speed", "1", "--quiet"],
                  tmp_path)
    cmd.wait_until(lambda: cmd.confined("edge_ft.emulation.calibrate"), "the confined workload started")
    cmd.cancel(sig)


@needs_cgroups
@pytest.mark.parametrize("sig", TERM_AND_KILL, ids=signal_id)
def test_profile_check_train_ends_its_confined_step(tmp_path, shared, base_checkpoint, sig):
    cmd = Command(["profile", "check", "--workload", "train", "--profiles", "rpi-zero-2w", "--methods", "probe",
                   "--runs", "2", "--steps", "200", "--host-speed", "1", "--base", str(base_checkpoint),
                   "--out", str(shared / "check"), "--quiet"], tmp_path)
    cmd.wait_until(lambda: cmd.confined("edge_ft.device.step_probe"), "the confined training step started")
    cmd.cancel(sig)


def test_train_with_a_profile_keeps_a_checkpoint_and_no_result(tmp_path, shared, base_checkpoint):
    """`train --profile` takes the board's threads and memory budget and trains in its own process (no child):
    a signal saves a checkpoint to resume from, says so, and writes no result."""
    from edge_ft.cli import main

    bundle, data = shared / "bundle", shared / "data"
    if not (bundle / "manifest.json").is_file():
        assert main(["export", "--method", "probe", "--engine", "ort-step", "--base", str(base_checkpoint),
                     "--out", str(bundle)]) == 0
        assert main(["data", "export", "mnist-digits", "--out", str(data)]) == 0
    out = tmp_path / "run"
    cmd = Command(["train", str(bundle), "--data", str(data / "train.npz"), "--profile", "rpi-zero-2w",
                   "--epochs", "1000", "--checkpoint-every", "5", "--out", str(out), "--quiet"], tmp_path)
    cmd.wait_until(lambda: cmd.proc.poll() is None and (out / RESUME).is_file(), "a first checkpoint written")
    cmd.cancel(signal.SIGTERM)
    assert not (out / RESULTS).exists()
    assert "checkpoint saved; add --resume to continue" in cmd.output()
    assert f"kept: a checkpoint in {out} (add --resume to continue); no result" in cmd.output()
