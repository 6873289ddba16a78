"""How well this machine emulates each board, as measured figures (`edge-ft profile check`).

For every confined profile, three kinds of runs under its limits:
  speed    the calibration work-rate workload on one thread (`calibrate --rate`) under the profile's per-thread
           quota, the cap lifted and restored every few seconds in the same process (hostspeed.work_fractions).
           Each cycle's (capped rate / uncapped rate) / (cpu_speed / host speed) is the emulation's accuracy: 1.0
           means the job got exactly the profile's speed. Being a ratio within one process and a few seconds, it
           does not move when the machine as a whole is faster or slower at that moment (a shared VM's core drifts
           10-20% between seconds here). The median over the cycles is reported (goal: within +-10%).
  threads  `threads` GIL-free busy threads: the CPU share they obtain together over one thread's quota, vs the
           profile's thread_speedup (4 threads on a Pi Zero 2 W go 1.86x as fast as one, not 4x)
  memory   a child touching fresh memory in 8 MiB steps until the cap stops it: the largest allocation that
           survived, and how it ended (OOM kill under a cgroup, MemoryError under RLIMIT_DATA)
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

from edge_ft.emulation.emulate import plan_cpus, run_confined
from edge_ft.emulation.hostspeed import HostSpeed, work_fractions
from edge_ft.emulation.profiles import DeviceProfile

STEP_MB = 8
SPEED_TOLERANCE = 0.10  # |achieved / target - 1| the emulation aims for
# The threads probe: each thread burns this much CPU time (hashing releases the GIL, so threads run in parallel).
THREAD_CPU_SECONDS = 0.1
_THREADS = """
import hashlib, sys, threading, time
n, cpu = int(sys.argv[1]), float(sys.argv[2])
data = b"x" * (1 << 16)
def spin():
    t = time.thread_time()
    while time.thread_time() - t < cpu:
        hashlib.sha256(data).digest()
threads = [threading.Thread(target=spin) for _ in range(n)]
w, c = time.perf_counter(), time.process_time()
for t in threads: t.start()
for t in threads: t.join()
print((time.process_time() - c) / (time.perf_counter() - w))
"""
_MEMORY = f"""
import sys
import numpy as np
held, total, limit = [], 0, int(sys.argv[1])
while total < limit:
    held.append(np.ones({STEP_MB} << 17))  # {STEP_MB} MiB of float64, every page written
    total += {STEP_MB}
    print(total, flush=True)
"""


CYCLES = 5  # capped phases of the speed measurement; the median counts


@dataclass
class ProfileCheck:
    profile: str
    emulation: str  # cgroup | rlimit
    target_speed: float  # the profile's cpu_speed (reference core = 1)
    host_speed: float  # this machine's core speed the quota was scaled by
    accuracy: list[float]  # per cycle: (capped rate / uncapped rate) / (cpu_speed / host speed)
    thread_quota: float | None  # share of one CPU here per device thread
    quota_efficiency: float | None  # the measured throttling loss the quota was corrected for
    threads: int
    target_speedup: float  # profile.thread_speedup(threads)
    achieved_speedup: float | None  # CPU share of `threads` busy threads over one thread's quota
    memory_cap_mb: int
    largest_allocation_mb: int  # on top of the interpreter and numpy (~30 MB)
    memory_end: str  # how the allocation run ended

    @property
    def speed_ratio(self) -> float | None:
        return statistics.median(self.accuracy) if self.accuracy else None

    @property
    def achieved_speed(self) -> float | None:
        """The speed the confined job ran at, relative to the reference core, with this machine at its speed."""
        return None if self.speed_ratio is None else self.speed_ratio * self.target_speed

    @property
    def within_tolerance(self) -> bool | None:
        ratio = self.speed_ratio
        return None if ratio is None else abs(ratio - 1) <= SPEED_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speed_ratio": self.speed_ratio, "achieved_speed": self.achieved_speed,
                "within_tolerance": self.within_tolerance}


def check_profile(profile: DeviceProfile, host: HostSpeed, mode: str = "auto", cycles: int = CYCLES,
                  memory: bool = True) -> ProfileCheck:
    py = sys.executable
    intended = host.share(profile.cpu_speed)
    cpus = plan_cpus(profile)
    # How the profile's single-thread quota would be set (and whether cgroups work at all), from a trivial job.
    cal = run_confined([py, "-c", "pass"], profile, mode=mode, threads=1, host=host)
    accuracy, speedup = [], None
    if cal.time_scaled:  # under rlimit, or for a board at least as fast as this machine, there is nothing to check
        assert cal.cpu_quota is not None  # a time-scaled run has its quota
        accuracy = [round(f / intended, 4) for f in work_fractions(cal.cpu_quota, cpus[-1:], cycles)]
        many = run_confined([py, "-c", _THREADS, str(profile.threads), str(THREAD_CPU_SECONDS)], profile, mode=mode,
                            host=host)
        if many.status == "ok":
            speedup = float(many.stdout_tail.strip().splitlines()[-1]) / cal.cpu_quota
    largest, end = 0, "not run"
    if memory:
        mem = run_confined([py, "-c", _MEMORY, str(profile.budget_mb + 4 * STEP_MB)], profile, mode=mode, host=host,
                           timeout=300)
        lines = mem.stdout_tail.split()
        largest = int(lines[-1]) if lines else 0
        end = {"out_of_memory": "OOM-killed at the cap" if mem.oom_killed else "MemoryError at the cap",
               "ok": "never stopped (no cap?)"}.get(mem.status, mem.status)
    return ProfileCheck(
        profile=profile.name, emulation=cal.emulation, target_speed=profile.cpu_speed, host_speed=host.speed,
        accuracy=accuracy,
        thread_quota=cal.cpu_quota, quota_efficiency=cal.quota_efficiency, threads=profile.threads,
        target_speedup=profile.thread_speedup(profile.threads), achieved_speedup=speedup,
        memory_cap_mb=profile.budget_mb, largest_allocation_mb=largest, memory_end=end)


def check_table(checks: list[ProfileCheck]) -> list[list[str]]:
    """Rows for a Markdown or plain table: one per profile."""
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    rows = []
    for c in checks:
        verdict = {True: "within 10%", False: "off by more than 10%",
                   None: "board >= this core: not scaled" if c.thread_quota is None else "-"}[c.within_tolerance]
        spread = f" ({min(c.accuracy):.2f}-{max(c.accuracy):.2f})" if len(c.accuracy) > 1 else ""
        rows.append([c.profile, c.emulation, num(c.target_speed, ".3g"), num(c.achieved_speed, ".3g"),
                     num(c.speed_ratio, ".2f") + spread, verdict, num(c.thread_quota, ".3f"),
                     num(c.quota_efficiency, ".2f"),
                     f"{num(c.achieved_speedup, '.2f')} ({c.target_speedup:.2f})" if c.threads > 1 else "-",
                     str(c.memory_cap_mb), f"{c.largest_allocation_mb} ({c.memory_end})"])
    return rows


CHECK_HEADER = ["profile", "mode", "target speed", "achieved", "ratio (range)", "speed", "quota/thread",
                "throttle eff.", "threads speed-up (target)", "cap MB", "largest allocation MB (end)"]
