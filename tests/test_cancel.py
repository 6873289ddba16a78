"""A signal to an `edge-ft` process (to it alone, not its group), SIGKILL included, leaves none of the processes it
started and none of its cgroups behind; a cancelled bench keeps only finished runs in its results file.

Every command runs with a mark in its environment that its children inherit, so the processes it started are
found even after they were reparented. Deadlines are generous (a busy 2-core machine); the time until the last
child was gone is printed (pytest -s) for the record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from edge_ft.emulation import cgroups

EDGE_FT = [sys.executable, "-m", "edge_ft.cli"]
MARK = "EDGE_FT_TEST_CANCEL"
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL]
# Seconds after the signal. Typically 0.03-0.5 s; under a full suite on 2 busy cores one SIGKILL case took over
# 10 s (the guardian's purge waits up to 5 s per controller for killed tasks to leave the cgroup).
GONE_WITHIN = 30.0


def _cgroups_work() -> bool:
    try:
        cgroups.CgroupJob.create(64 << 20, [sorted(os.sched_getaffinity(0))[-1]], None, None, 100_000).remove()
    except cgroups.CgroupUnavailable:
        return False
    return True


needs_cgroups = pytest.mark.skipif(not _cgroups_work(), reason="needs root and writable cgroups")


def marked(token: str) -> list[psutil.Process]:
    """Live processes carrying this test's mark (a command, what it started, and their descendants)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARK) == token:
                found.append(p)
        except psutil.Error:
            continue
    return found


def owned_cgroups(owner: int) -> list[Path]:
    return [path for parent in cgroups.job_parents() for path in parent.glob(f"{cgroups.PREFIX}{owner}.*")]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


class Command:
    """An `edge-ft` command started in a session of its own, its output in a file."""

    def __init__(self, argv: list[str], tmp_path: Path, name: str = "cmd"):
        self.token = uuid.uuid4().hex
        self.log = tmp_path / f"{name}.log"
        env = {**os.environ, MARK: self.token}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(EDGE_FT + argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def running(self, word: str) -> bool:
        """A process it started whose command line holds `word` runs (and the command is still there)."""
        assert self.proc.poll() is None, self.output()
        return any(word in " ".join(p.cmdline()) for p in self.children())

    def children(self) -> list[psutil.Process]:
        return [p for p in marked(self.token) if p.pid != self.proc.pid]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def cancel(self, sig: int) -> float:
        """Signal the command alone; seconds until nothing it started is alive and none of its cgroups is left."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(60)
        wait_for(lambda: not marked(self.token) and not owned_cgroups(self.proc.pid), GONE_WITHIN,
                 f"{[' '.join(p.cmdline()) for p in marked(self.token)]} {owned_cgroups(self.proc.pid)} gone")
        took = time.monotonic() - t0
        print(f"\n{signal.Signals(sig).name}: last child gone after {took:.2f} s")
        if sig != signal.SIGKILL:
            assert self.proc.returncode == 128 + sig, self.output()
            assert f"stopped by {signal.Signals(sig).name}" in self.output()
        else:
            assert self.proc.returncode == -signal.SIGKILL
        return took


def _profile_run(tmp_path, mode: str, name: str = "cmd") -> Command:
    # sh starts a grandchild: it must end too, though only the cgroup or the process group knows it
    cmd = Command(["profile", "run", "rpi-zero-2w", "--mode", mode, "--host-speed", "1", "--",
                   "sh", "-c", "sleep 300 & sleep 301"], tmp_path, name)
    wait_for(lambda: cmd.running("sleep 300") and cmd.running("sleep 301"), 120, "the confined job started")
    if mode == "cgroup":
        assert owned_cgroups(cmd.proc.pid)
    return cmd


# Open: run alone this case passes in 0.2 s; late in the full suite the guardian of a SIGKILLed `profile run` has
# twice outlived 30 s with the job's memory cgroup still there (its processes gone). Not yet explained; a later
# command's start-up sweep removes the cgroup.
_GUARDIAN_LATE = pytest.mark.xfail(reason="guardian outlives a SIGKILL late in the full suite (open)", strict=False)


@needs_cgroups
@pytest.mark.parametrize("sig", [s if s != signal.SIGKILL else pytest.param(s, marks=_GUARDIAN_LATE)
                                 for s in SIGNALS], ids=lambda s: signal.Signals(s).name)
def test_profile_run_in_cgroups_leaves_nothing(tmp_path, sig):
    _profile_run(tmp_path, "cgroup").cancel(sig)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_profile_run_under_rlimits_leaves_nothing(tmp_path, sig):
    _profile_run(tmp_path, "rlimit").cancel(sig)


@needs_cgroups
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_one_commands_cleanup_never_touches_anothers(tmp_path, sig):
    first, second = _profile_run(tmp_path, "cgroup", "first"), _profile_run(tmp_path, "cgroup", "second")
    kept = owned_cgroups(second.proc.pid)
    first.cancel(sig)
    time.sleep(1)  # the guardian of the first has finished: the second's job is untouched
    assert second.running("sleep 301") and owned_cgroups(second.proc.pid) == kept
    # a third command's start-up sweep spares the live second one too
    assert subprocess.run(EDGE_FT + ["profile", "list"], capture_output=True).returncode == 0
    assert owned_cgroups(second.proc.pid) == kept
    second.cancel(signal.SIGTERM)


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
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name)
def test_profile_calibrate_leaves_nothing(tmp_path, sig):
    cmd = Command(["profile", "calibrate", "--profile", "rpi-zero-2w", "--host-speed", "1", "--repeats", "50"],
                  tmp_path)
    wait_for(lambda: cmd.running("edge_ft.emulation.calibrate") and owned_cgroups(cmd.proc.pid), 120,
             "the calibration workload started")
    cmd.cancel(sig)


def _bench(tmp_path, base: Path, *extra: str) -> Command:
    results = tmp_path / "bench" / "results.jsonl"
    return Command(["bench", "--profiles", "host,rpi-zero-2w", "--methods", "probe-cached", "--engines",
                    "ort-training", "--steps", "20", "--repeats", "1", "--host-speed", "1", "--base", str(base),
                    "--results", str(results), "--quiet", *extra], tmp_path)


@needs_cgroups
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_cancelled_bench_keeps_only_finished_runs(tmp_path, base_checkpoint, sig):
    """The host run finishes; the Zero 2 W run is cancelled while it trains: only the first is in the file."""
    cmd = _bench(tmp_path, base_checkpoint)
    results = tmp_path / "bench" / "results.jsonl"
    wait_for(lambda: results.is_file() and cmd.running("edge_ft.cli train") and owned_cgroups(cmd.proc.pid), 300,
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
                   "ort-training", "--steps", "20", "--parallel", "2", "--host-speed", "1", "--base",
                   str(base_checkpoint), "--results", str(results), "--quiet"], tmp_path)
    wait_for(lambda: sum("edge_ft.cli train" in " ".join(p.cmdline()) for p in cmd.children()) == 2
             and len({p.name for p in owned_cgroups(cmd.proc.pid)}) == 2, 300, "two confined runs side by side")
    cmd.cancel(signal.SIGTERM)
    assert not results.exists() or results.read_text() == ""
    assert "ended a run in progress" in cmd.output()


def test_speed_ends_with_the_signals_status(tmp_path):
    """`speed` measures in its own process: a signal ends it with the conventional status and one line."""
    cmd = Command(["speed", "--methods", "lora", "--batches", "32", "--steps", "100000"], tmp_path)
    wait_for(lambda: _cpu_seconds(cmd.proc.pid) > 8, 120, "timing under way (imports done)")
    cmd.cancel(signal.SIGTERM)
    assert "no child was running" in cmd.output()


def _cpu_seconds(pid: int) -> float:
    try:
        return sum(psutil.Process(pid).cpu_times()[:2])
    except psutil.Error:
        return 0.0
