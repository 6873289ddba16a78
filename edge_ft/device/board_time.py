"""The CPU time a stretch of training took, per thread, and the board time an emulated board's quota makes of it.

Under an emulated board (edge_ft.emulation) every thread is capped at one board core's share of a CPU here, and the
whole job at what the board's threads achieve together. Wall time under such caps moves with how the host delivers
them: CFS charges a quota at the scheduler tick (4 ms at HZ=250, a tenth of a second of a Zero 2 W's time), so a
capped job runs and stops in tick-sized bursts, and a busy host refills a quota late. The CPU time the work took
moves far less, and the quota's own arithmetic turns it into the time the board needs:

    board seconds = max(busiest thread's CPU seconds / thread share, all threads' CPU seconds / job share)

no thread can go faster than one board core and the job no faster than its threads together: this is the wall time
a perfectly delivered quota gives. The emulation hands its shares to the child in QUOTA_ENV; outside an emulated
board there is no quota and no board time.

Per-thread CPU time comes from /proc/self/task/*/schedstat (nanoseconds on a CPU, not tick-rounded), else psutil.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_ft.contracts import QUOTA_ENV, TIMING_ENV
from edge_ft.run_record import StepCpu

_TASKS = Path("/proc/self/task")


def thread_cpu_seconds() -> dict[int, float]:
    """CPU seconds each live thread of this process has used, by thread id.

    schedstat shows a thread's runtime as of its last tick or switch: current for threads that are asleep (a
    stopped pool), up to a tick (4 ms at HZ=250) stale for the running caller, which therefore reads its own
    clock (CLOCK_THREAD_CPUTIME_ID brings the runtime up to date)."""
    try:
        used = {int(t.name): int((t / "schedstat").read_text().split()[0]) / 1e9 for t in _TASKS.iterdir()}
    except (OSError, ValueError, IndexError):
        import psutil

        used = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
    used[threading.get_native_id()] = time.thread_time()
    return used


@dataclass(frozen=True)
class Quota:
    """An emulated board's CPU quota, as shares of one CPU here."""

    thread: float  # what each thread may use (one board core)
    job: float  # what the whole job may use (the board's threads together)

    def board_seconds(self, cpu_seconds: float, busiest_seconds: float) -> float:
        """The time the board needs for work that took `cpu_seconds` over all threads, `busiest_seconds` on one."""
        return max(busiest_seconds / self.thread, cpu_seconds / self.job)

    def env_value(self) -> str:
        return f"{self.thread!r},{self.job!r}"


def quota_from_env(environ: dict[str, str] | None = None) -> Quota | None:
    """The quota an emulated board's child runs under (QUOTA_ENV), None outside one or when it is malformed."""
    text = (os.environ if environ is None else environ).get(QUOTA_ENV, "")
    try:
        thread, job = (float(v) for v in text.split(","))
    except ValueError:
        return None
    return Quota(thread, job) if 0 < thread <= job and job < float("inf") else None


def clock_every_step(environ: dict[str, str] | None = None) -> bool:
    """Whether this child is timed by CPU time (TIMING_ENV): unthrottled, so reading the CPU clock every step moves
    nothing, and the typical step's CPU time is what its board time comes from."""
    return (os.environ if environ is None else environ).get(TIMING_ENV) == "cpu"


class CpuMeter:
    """CPU seconds of this process's threads between start() and stop(): the sum, and the busiest thread's."""

    def __init__(self) -> None:
        self._start: dict[int, float] = {}

    def start(self) -> CpuMeter:
        self._start = thread_cpu_seconds()
        return self

    def stop(self) -> tuple[float, float]:
        used = [max(0.0, v - self._start.get(tid, 0.0)) for tid, v in thread_cpu_seconds().items()]
        return sum(used), max(used, default=0.0)


def step_cpu(steps: int, cpu_seconds: float, busiest_seconds: float, quota: Quota | None,
             warmup_left_out: bool = False, wall_seconds: float | None = None,
             typical_seconds: float | None = None) -> StepCpu:
    """results.json's "cpu" block for `steps` steps that took `cpu_seconds` (`busiest_seconds` on one thread) and
    `wall_seconds` of wall time. `typical_seconds`: the median step's CPU time, where it was clocked every step (a
    child timed by CPU time); the board time then comes from it, the busiest thread taking the same share of it."""
    shares = None if quota is None else {"thread": quota.thread, "job": quota.job}
    if not steps:
        return {"steps": 0, "warmup_left_out": False, "ms_per_step": None, "busiest_thread_ms_per_step": None,
                "wall_ms_per_step": None, "typical_ms_per_step": None, "quota": shares, "board_ms_per_step": None}
    per_step, busiest_share = cpu_seconds / steps, busiest_seconds / cpu_seconds if cpu_seconds else 1.0
    basis = per_step if typical_seconds is None else typical_seconds
    return {"steps": steps, "warmup_left_out": warmup_left_out, "ms_per_step": round(per_step * 1e3, 4),
            "wall_ms_per_step": None if wall_seconds is None else round(wall_seconds / steps * 1e3, 4),
            "typical_ms_per_step": None if typical_seconds is None else round(typical_seconds * 1e3, 4),
            "busiest_thread_ms_per_step": round(busiest_seconds / steps * 1e3, 4), "quota": shares,
            "board_ms_per_step": None if quota is None else
            round(quota.board_seconds(basis, basis * busiest_share) * 1e3, 4)}


def epochs_cpu(epochs: list[dict[str, Any]], quota: Quota | None) -> StepCpu:
    """The "cpu" block of a run from its epochs' CPU figures. The first epoch is left out when a later one has
    figures: it carries the warm-up (onnxruntime plans and allocates in the first step; tens of ms of CPU time,
    a fifth of a short run's per-step figure), as `bench`'s epoch_seconds_later leaves it out of the epoch time."""
    timed = [e for e in epochs if e.get("cpu_steps")]
    counted = timed[1:] or timed
    steps = sum(e["cpu_steps"] for e in counted)
    typical = None  # clocked every step: the epochs' median steps, weighted by their step counts
    if counted and all(e.get("cpu_median_seconds") is not None for e in counted):
        typical = sum(e["cpu_median_seconds"] * e["cpu_steps"] for e in counted) / steps
    return step_cpu(steps, sum(e["cpu_seconds"] for e in counted),
                    sum(e["busiest_cpu_seconds"] for e in counted), quota, warmup_left_out=len(counted) < len(timed),
                    wall_seconds=sum(e["seconds"] for e in counted), typical_seconds=typical)
