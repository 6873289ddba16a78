"""A signal to an `edge-ft` process (to it alone, not its group), SIGKILL included, leaves none of the processes it
started and none of its cgroups behind; a cancelled bench keeps only finished runs in its results file.
(tests/cancel_support.py: how a command is started, signalled and checked; tests/test_cancel_commands.py: the
other commands that confine or measure.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from edge_ft.emulation import cgroups
from tests.cancel_support import (
    EDGE_FT,
    GONE_WITHIN,
    SIGNALS,
    Command,
    cmdline,
    mark,
    marked,
    needs_cgroups,
    owned_cgroups,
    signal_id,
    wait_for,
)


def _profile_run(tmp_path, mode: str, name: str = "cmd") -> Command:
    # sh starts a grandchild: it must end too, though only the cgroup or the process group knows it
    cmd = Command(["profile", "run", "rpi-zero-2w", "--mode", mode, "--host-speed", "1", "--",
                   "sh", "-c", "sleep 300 & sleep 301"], tmp_path, name)
    cmd.wait_until(lambda: cmd.running("sleep 300") and cmd.running("sleep 301"), "the confined job started")
    if mode == "cgroup":
        assert owned_cgroups(cmd.proc.pid)
    return cmd


@needs_cgroups
@pytest.mark.parametrize("sig", SIGNALS, ids=signal_id)
def test_profile_run_in_cgroups_leaves_nothing(tmp_path, sig):
    _profile_run(tmp_path, "cgroup").cancel(sig)


@pytest.mark.parametrize("sig", SIGNALS, ids=signal_id)
def test_profile_run_under_rlimits_leaves_nothing(tmp_path, sig):
    _profile_run(tmp_path, "rlimit").cancel(sig)


@needs_cgroups
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=signal_id)
def test_one_commands_cleanup_never_touches_anothers(tmp_path, sig):
    first, second = _profile_run(tmp_path, "cgroup", "first"), _profile_run(tmp_path, "cgroup", "second")
    kept = owned_cgroups(second.proc.pid)
    first.cancel(sig)  # returns once the first's guardian is gone too: the second's job is untouched
    assert second.running("sleep 301") and owned_cgroups(second.proc.pid) == kept
    # a third command's start-up sweep spares the live second one too
    assert subprocess.run(EDGE_FT + ["profile", "list"], capture_output=True).returncode == 0
    assert owned_cgroups(second.proc.pid) == kept
    second.cancel(signal.SIGTERM)


# A process that makes a job's cgroups and is SIGKILLed at once, before any child or watch(); with `fork`, it first
# forks a child that never execs and so holds every descriptor it had, the guardian's pipe included.
_DIES_HOLDING_CGROUPS = """
import os, signal, sys, time
from edge_ft.emulation.cgroups import CgroupJob
job = CgroupJob.create(64 << 20, [sorted(os.sched_getaffinity(0))[-1]], 0.5, 0.5, 20_000)
if sys.argv[1] == "fork" and os.fork() == 0:
    time.sleep(300)
    os._exit(0)
os.kill(os.getpid(), signal.SIGKILL)
"""


@needs_cgroups
@pytest.mark.parametrize("how", ["at-once", "fork"])
def test_cgroups_made_before_any_child_go_with_a_sigkill(tmp_path, how):
    """The guardian runs before the first cgroup is made, and acts on its owner's exit even while a descendant
    that forked without exec keeps the pipe to it open."""
    token, env = mark()
    proc = subprocess.Popen([sys.executable, "-c", _DIES_HOLDING_CGROUPS, how], env=env)
    try:
        assert proc.wait(120) == -signal.SIGKILL
        wait_for(lambda: not owned_cgroups(proc.pid)
                 and not any("lifetime.py" in cmdline(p) for p in marked(token)),
                 GONE_WITHIN, f"the cgroups of {proc.pid} and its guardian gone")
    finally:
        for p in marked(token):  # the forked child (it belongs to no job)
            p.kill()


@needs_cgroups
def test_start_up_sweep_removes_cgroups_of_dead_owners_and_kills_what_runs_in_them(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    parent = cgroups.job_parents()[0]
    stale = parent / f"{cgroups.PREFIX}{int(dead.stdout)}.0"
    stale.mkdir()
    orphan = subprocess.Popen(["sleep", "300"])
    try:
        (stale / "cgroup.procs").write_text(str(orphan.pid))
        out = subprocess.run(EDGE_FT + ["profile", "list"], capture_output=True, text=True)
        assert "removed 1 cgroup left by edge-ft processes that are gone" in out.stderr
        assert not stale.exists() and orphan.wait(10) == -signal.SIGKILL
    finally:
        orphan.kill()


@needs_cgroups
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=signal_id)
def test_profile_calibrate_leaves_nothing(tmp_path, sig):
    cmd = Command(["profile", "calibrate", "--profile", "rpi-zero-2w", "--host-speed", "1", "--repeats", "50"],
                  tmp_path)
    cmd.wait_until(lambda: cmd.confined("edge_ft.emulation.calibrate"), "the calibration workload started")
    cmd.cancel(sig)


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory) -> Path:
    """The bench cases' results folder: its prep/ (data, bundle) is made by the first and reused by the others."""
    return tmp_path_factory.mktemp("bench")


@needs_cgroups
@pytest.mark.parametrize("sig", SIGNALS, ids=signal_id)
def test_cancelled_bench_keeps_only_finished_runs(tmp_path, bench_folder, base_checkpoint, sig):
    """The host run finishes; the Zero 2 W run is cancelled while it trains: only the first is in the file."""
    results = bench_folder / "results.jsonl"
    results.unlink(missing_ok=True)
    cmd = Command(["bench", "--profiles", "host,rpi-zero-2w", "--methods", "probe-cached", "--engines",
                   "ort-training", "--steps", "20", "--repeats", "1", "--host-speed", "1", "--base",
                   str(base_checkpoint), "--results", str(results), "--quiet"], tmp_path)
    cmd.wait_until(lambda: results.is_file() and cmd.confined("edge_ft.cli train"),
                   "the confined run started after the native one was recorded")
    cmd.cancel(sig)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["profile"], r["status"]) for r in records] == [("host", "ok")]
    if sig != signal.SIGKILL:
        assert f"kept: 1 finished runs in {results}" in cmd.output()


@pytest.mark.slow
@needs_cgroups
def test_cancelled_parallel_bench_records_no_run_in_progress(tmp_path, base_checkpoint):
    results = tmp_path / "bench" / "results.jsonl"
    cmd = Command(["bench", "--profiles", "rpi-zero-2w", "--methods", "probe-cached,lora", "--engines",
                   "ort-training", "--steps", "20", "--parallel", "2", "--timing", "quota", "--host-speed", "1",
                   "--base", str(base_checkpoint), "--results", str(results), "--quiet"], tmp_path)
    # quota-paced runs go side by side; runs timed by CPU time (the default) run one at a time
    cmd.wait_until(lambda: sum("edge_ft.cli train" in cmdline(p) for p in cmd.children()) == 2
                   and len({p.name for p in owned_cgroups(cmd.proc.pid)}) == 2, "two confined runs side by side")
    cmd.cancel(signal.SIGTERM)
    assert not results.exists() or results.read_text() == ""
    assert "ended a run in progress" in cmd.output()


def test_speed_ends_with_the_signals_status(tmp_path):
    """`speed` measures in its own process: a signal ends it with the conventional status and one line."""
    cmd = Command(["speed", "--methods", "lora", "--batches", "32", "--steps", "100000"], tmp_path)
    cmd.wait_until(lambda: _cpu_seconds(cmd.proc.pid) > 8, "timing under way (imports done)")
    cmd.cancel(signal.SIGTERM)
    assert "no child was running" in cmd.output()


def _cpu_seconds(pid: int) -> float:
    try:
        return sum(psutil.Process(pid).cpu_times()[:2])
    except psutil.Error:
        return 0.0
