"""Starting an `edge-ft` command, signalling it alone, and checking that nothing it started is left.

Every command runs with a mark in its environment that its children inherit, so the processes it started are
found even after they were reparented. Deadlines are generous (a busy 2-core machine); the time until the last
child was gone is printed (pytest -s) for the record.
"""

from __future__ import annotations

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
# Seconds after the signal. Typically 0.03-0.5 s; a SIGKILL case waits for the guardian, which may have to wait for
# killed tasks to leave a cgroup (up to 5 s per controller on a busy machine).
GONE_WITHIN = 30.0
START_WITHIN = 300.0  # seconds for a command to reach the state a test cancels it in (imports, exports, a busy CI)


def cgroups_work() -> bool:
    try:
        cgroups.CgroupJob.create(64 << 20, [sorted(os.sched_getaffinity(0))[-1]], None, None, 100_000).remove()
    except cgroups.CgroupUnavailable:
        return False
    return True


needs_cgroups = pytest.mark.skipif(not cgroups_work(), reason="needs root and writable cgroups")


def signal_id(sig) -> str:
    return signal.Signals(sig).name


def mark() -> tuple[str, dict[str, str]]:
    """A fresh mark and the environment that carries it."""
    token = uuid.uuid4().hex
    return token, {**os.environ, MARK: token}


def marked(token: str) -> list[psutil.Process]:
    """Live processes carrying this mark (a command, what it started, and their descendants)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARK) == token:
                found.append(p)
        except psutil.Error:
            continue
    return found


def cmdline(p: psutil.Process) -> str:
    """A process's command line; "" once it has exited (it may do so between being listed and being read)."""
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def owned_cgroups(owner: int) -> list[Path]:
    return [path for parent in cgroups.job_parents() for path in parent.glob(f"{cgroups.PREFIX}{owner}.*")]


def wait_for(predicate, timeout: float, what):
    """predicate()'s first true value within `timeout` seconds; else fail saying `what` (text, or a function giving
    it then: what was left is described when the time is up, not when the wait starts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f} s: {what() if callable(what) else what}")


class Command:
    """An `edge-ft` command started in a session of its own, its output in a file."""

    def __init__(self, argv: list[str], tmp_path: Path, name: str = "cmd"):
        self.token, env = mark()
        self.log = tmp_path / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(EDGE_FT + argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def running(self, word: str) -> bool:
        """A process it started whose command line holds `word` runs (and the command is still there)."""
        assert self.proc.poll() is None, self.output()
        return any(word in cmdline(p) for p in self.children())

    def confined(self, word: str) -> bool:
        """A process it started whose command line holds `word` runs, and a cgroup of the command exists."""
        return self.running(word) and bool(owned_cgroups(self.proc.pid))

    def wait_until(self, predicate, what: str, timeout: float = START_WITHIN) -> None:
        wait_for(predicate, timeout, lambda: f"{what}\n{self.output()[-2000:]}")

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
                 lambda: f"{[cmdline(p) for p in marked(self.token)]} {owned_cgroups(self.proc.pid)} gone")
        took = time.monotonic() - t0
        print(f"\n{signal_id(sig)}: last child gone after {took:.2f} s")
        if sig != signal.SIGKILL:
            assert self.proc.returncode == 128 + sig, self.output()
            assert f"stopped by {signal_id(sig)}" in self.output()
        else:
            assert self.proc.returncode == -signal.SIGKILL
        return took
