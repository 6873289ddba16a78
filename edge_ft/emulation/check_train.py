"""Does an emulated board give the same answer twice? (`edge-ft profile check --workload train`).

The real training step of each method (the ort-step bundle of mnist-digits, on synthetic inputs of its shape:
edge_ft.device.step_probe) run confined to each board, `runs` times:
  free      the step on this machine with the CPU cap lifted (the board's cores, memory and one thread); the
            fastest run's p50 counts, as a neighbour only ever slows a run down
  expected  free x host speed / cpu_speed: the same step on one board core, as the profile describes it
  one       `runs` runs under the profile's quota with one thread: median ms/step (mean over the timed steps, the
            figure a quota makes honest), spread (largest |run / median - 1|), ratio expected / median
            (1.0: the board's speed exactly)
  threads   `runs` runs with the profile's threads: median, spread, and the speed-up over one thread beside the
            profile's thread_scaling (the emulation caps a job at it; onnxruntime may reach less)
  thread cost  CPU time per step with the profile's threads over one thread's, both under the quota (step_probe's
            cpu_ms_per_step): the quota hands a job thread_scaling x one core's CPU time, so the speed-up it allows
            this step is thread_scaling / thread cost. Above 1 the threads' hand-offs cost CPU time (onnxruntime's
            pool sleeps and wakes between kernels when it may not spin): the step's, not the quota's.
Goal: every spread and every ratio within 10%.
With timing "cpu" (the emulation `bench` uses by default) `one` and `threads` are the board times the runs' CPU
time stands for (one unthrottled thread here each; the board's threads credited with thread_scaling, so their
speed-up is thread_scaling by construction and thread cost is 1), each run the fastest of CPU_TIMED_REPEATS
processes as a bench figure is: the check then says how steady bench's figure is and how close to the expectation.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_ft.contracts import CPU_TIMED_REPEATS
from edge_ft.emulation.emulate import run_confined, threads_to_run
from edge_ft.emulation.hostspeed import HostSpeed
from edge_ft.emulation.profiles import DeviceProfile
from edge_ft.errors import UserError

TOLERANCE = 0.10
TRAIN_METHODS = ("full", "probe", "lora")


@dataclass
class TrainCheck:
    profile: str
    method: str
    threads: int
    free_ms: float  # one thread here, cap lifted (fastest run's p50)
    expected_ms: float  # free_ms x host speed / cpu_speed
    one_ms: list[float]  # per run, one thread under the quota: mean ms/step
    many_ms: list[float]  # per run, the profile's threads under the quota
    target_speedup: float  # profile.thread_speedup(threads)
    one_cpu_ms: list[float] = field(default_factory=list)  # per run, one thread: CPU ms per step, all threads
    many_cpu_ms: list[float] = field(default_factory=list)  # per run, the profile's threads: CPU ms per step
    timing: str = "quota"  # how one_ms and many_ms were timed (contracts.TIMINGS)

    @staticmethod
    def _spread(values: list[float]) -> float | None:
        if not values:
            return None
        mid = statistics.median(values)
        return max(abs(v / mid - 1) for v in values)

    @property
    def ratio(self) -> float | None:
        return self.expected_ms / statistics.median(self.one_ms) if self.one_ms else None

    @property
    def speedup(self) -> float | None:
        return statistics.median(self.one_ms) / statistics.median(self.many_ms) if self.one_ms and self.many_ms \
            else None

    @property
    def thread_cost(self) -> float | None:
        """CPU per step of the profile's threads over one thread's (1.0: the threads add no work)."""
        if not self.one_cpu_ms or not self.many_cpu_ms:
            return None
        return statistics.median(self.many_cpu_ms) / statistics.median(self.one_cpu_ms)

    @property
    def allowed_speedup(self) -> float | None:
        """The speed-up the quota allows this step: thread_scaling / thread_cost."""
        return self.target_speedup / self.thread_cost if self.thread_cost else None

    @property
    def holds(self) -> bool:
        spreads = [self._spread(self.one_ms), self._spread(self.many_ms)]
        return (self.ratio is not None and abs(self.ratio - 1) <= TOLERANCE
                and all(s is not None and s <= TOLERANCE for s in spreads))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "one_spread": self._spread(self.one_ms),
                "many_spread": self._spread(self.many_ms), "speedup": self.speedup, "thread_cost": self.thread_cost,
                "allowed_speedup": self.allowed_speedup, "holds": self.holds}


def probe_ms(argv_for: Callable[[int, Path], list[str]], profile: DeviceProfile, host: HostSpeed, out: Path,
             threads: int, capped: bool, mode: str, env: dict[str, str], timing: str = "quota"
             ) -> tuple[float, float]:
    """One confined step-probe run: (ms/step, p50 with the cap lifted, the mean under the quota, or the board time
    of its CPU time under timing cpu; its CPU ms/step)."""
    out.unlink(missing_ok=True)
    argv = argv_for(threads_to_run(profile, threads, timing, mode, cpu_cap=capped), out)
    r = run_confined(argv, profile, env=env, mode=mode, threads=threads, host=host, cpu_cap=capped, timeout=900,
                     timing=timing)
    if r.status != "ok":
        last = (r.stderr_tail.strip().splitlines() or [r.status])[-1]
        raise UserError(f"the training step under {profile.name} did not finish ({r.status}: {last})")
    if capped and not r.time_scaled:
        raise UserError(f"{profile.name} is not time-scaled here ({r.emulation}): nothing to check "
                        "(cgroups need root; a board at least as fast as this core is run unscaled)")
    result = json.loads(out.read_text())
    ms = result["summary"]["ms_per_step"]
    if capped and r.timing == "cpu":
        return result["cpu"]["board_ms_per_step"], result["cpu_ms_per_step"]
    return (ms["mean"] if capped else ms["p50"]), result["cpu_ms_per_step"]


def bench_figure(run: Callable[[], tuple[float, float]], timing: str) -> tuple[float, float]:
    """One run as bench measures it: timed by CPU time, the fastest of CPU_TIMED_REPEATS processes; else one."""
    return min((run() for _ in range(CPU_TIMED_REPEATS if timing == "cpu" else 1)), key=lambda r: r[0])


def check_train(profile: DeviceProfile, method: str, bundle: Path, python: str, env: dict[str, str], host: HostSpeed,
                work: Path, runs: int = 3, steps: int = 30, mode: str = "auto",
                say: Callable[[str], None] | None = None, timing: str = "quota") -> TrainCheck:
    """`runs` free, one-thread and many-thread runs of `bundle`'s step under `profile`, interleaved (free, one,
    many, free, ...) so a slow minute here touches every kind alike."""
    def argv_for(threads: int, out: Path) -> list[str]:
        return [python, "-m", "edge_ft.device.step_probe", str(bundle), "--batch", "32", "--steps", str(steps),
                "--warmup", "3", "--threads", str(threads), "--out", str(out)]

    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{profile.name}-{method}.json"
    free, one, many, one_cpu, many_cpu = [], [], [], [], []
    for k in range(runs):
        free.append(probe_ms(argv_for, profile, host, out, 1, False, mode, env)[0])
        ms, cpu = bench_figure(lambda: probe_ms(argv_for, profile, host, out, 1, True, mode, env, timing), timing)
        one.append(ms)
        one_cpu.append(cpu)
        if profile.threads > 1:
            ms, cpu = bench_figure(lambda: probe_ms(argv_for, profile, host, out, profile.threads, True, mode, env,
                                                    timing), timing)
            many.append(ms)
            many_cpu.append(cpu)
        if say:
            say(f"  {profile.name} {method} run {k + 1}/{runs}: free {free[-1]:.2f} ms, one thread {one[-1]:.1f} ms"
                + (f", {profile.threads} threads {many[-1]:.1f} ms" if many else ""))
    expected = min(free) * host.speed / profile.cpu_speed
    return TrainCheck(profile.name, method, profile.threads, round(min(free), 4), round(expected, 3),
                      [round(v, 3) for v in one], [round(v, 3) for v in many],
                      profile.thread_speedup(profile.threads), [round(v, 4) for v in one_cpu],
                      [round(v, 4) for v in many_cpu], timing)


TRAIN_HEADER = ["profile", "method", "expected ms (1 thread)", "1 thread: median ms (spread)", "ratio",
                "threads: median ms (spread)", "speed-up (profile)", "threads' CPU/step (x one)",
                "speed-up the quota allows", "verdict"]


def train_table(checks: list[TrainCheck]) -> list[list[str]]:
    def cell(values: list[float], spread: float | None) -> str:
        if not values:
            return "-"
        assert spread is not None  # measured values have a spread
        return f"{statistics.median(values):.1f} (±{100 * spread:.0f}%)"

    rows = []
    for c in checks:
        d = c.to_dict()
        rows.append([c.profile, c.method, f"{c.expected_ms:.1f}", cell(c.one_ms, d["one_spread"]),
                     f"{c.ratio:.2f}", cell(c.many_ms, d["many_spread"]),
                     f"{c.speedup:.2f} ({c.target_speedup:.2f})" if c.speedup else "-",
                     f"{c.thread_cost:.2f}x" if c.thread_cost else "-",
                     f"{c.allowed_speedup:.2f}" if c.allowed_speedup else "-",
                     "within 10%" if c.holds else "off by more than 10%"])
    return rows
