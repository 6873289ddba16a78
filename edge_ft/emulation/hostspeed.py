"""The host machine's speed, measured once and cached, so every emulated board runs at its profile's speed anywhere.

    host = HostSpeed.resolve(given=None)   # cached figure for this machine, else measured now (~20 s), or --host-speed
    host.thread_quota(profile)             # share of one CPU here per device thread, corrected for throttling losses

Two figures, both cached per machine in $EDGE_FT_CACHE_DIR (default ~/.cache/edge-ft)/host-speed.json, keyed by
CPU model, usable cores and the versions of Python, numpy and its BLAS (any change re-measures; an entry with
"correct_quota": false keeps the speed scaling and turns the throttling correction off):

speed       the calibration workload (edge_ft.emulation.calibrate) on one unconfined core here, relative to the
            reference core every shipped cpu_speed is stated against. A board at cpu_speed 0.035 on a host at
            0.5 gets 0.07 of a CPU here.
efficiency  work done per CPU-second under a CFS quota of a given share, relative to unthrottled work. Measured
            here (AMD EPYC KVM guest): ~0.7 at 0.05 of a CPU, ~0.8 at 0.15, ~1.0 near a whole CPU, whatever the
            period (20 or 100 ms) and even with an idle-priority filler keeping the core awake. The kernel's
            accounting is exact (the job gets its quota's CPU time to 0.5%); what a throttled job loses is speed
            per CPU-second, as caches and branch predictors are refilled after every throttled gap. So the quota
            is raised by 1/efficiency, solved once per share from two measurements with the same three parts in
            short interleaved units (`calibrate --rate`), each in one process whose cap is lifted and restored
            every few seconds (work_fractions).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ft.emulation.cpu import quota_period_us, thread_env

CACHE_ENV = "EDGE_FT_CACHE_DIR"
CACHE_FILE = "host-speed.json"
SPEED_REPEATS = 3  # calibration runs per part when measuring this machine; the fastest counts
SPEED_RUNS = 3  # whole calibrations; the median speed counts (this machine drifts 20% between minutes)
CAPPED_SECONDS = 2.5  # one capped phase of the work-rate run (125 quota periods at the shortest)
FREE_SECONDS = 0.6  # one uncapped phase, before and after each capped one
CYCLES = 4  # capped phases per measurement; the median counts
MIN_UNITS = 6  # whole work units a phase must hold (0.05 of a CPU here needs ~5 s for them)
MAX_RUN_SECONDS = 600  # the workload's own limit; the parent ends it when its phases are done
_lock = threading.Lock()  # parallel sweep runs share one HostSpeed: measure each share once


def cache_path() -> Path:
    folder = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-ft"
    return Path(folder) / CACHE_FILE


# Raised whenever what the cached figures mean changes, so older ones are measured again (2: the free core timed by
# CPU time, the throttling loss per CPU-second).
CALIBRATION_VERSION = 2


def machine_key() -> dict[str, Any]:
    """What the cached figures belong to: the same CPU model, core count and numeric libraries."""
    import numpy as np

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                model = line.split(":", 1)[1].strip()
                break
    blas = ""
    with contextlib.suppress(Exception):
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{info.get('name', '')} {info.get('version', '')}".strip()
    return {"cpu": model, "arch": platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "numpy": np.__version__, "blas": blas,
            "calibration": CALIBRATION_VERSION}


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


def _load_cache() -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(cache_path().read_text())
        if isinstance(data, dict) and isinstance(data.get("machines"), dict):
            return data
    return {"machines": {}}


def _save_entry(key: dict[str, Any], entry: dict[str, Any]) -> None:
    """Merge this machine's entry into the cache file; a cache that cannot be written only costs a re-measure."""
    from edge_ft.atomic import atomic_write_json
    from edge_ft.errors import UserError

    data = _load_cache()
    data["machines"][_key_text(key)] = entry
    with contextlib.suppress(OSError, UserError):
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_path(), data)


def cached_speed() -> float | None:
    """The host machine's cached speed, never measuring (None when it was never measured here)."""
    entry = _load_cache()["machines"].get(_key_text(machine_key()))
    speed = entry.get("speed") if isinstance(entry, dict) else None
    return float(speed) if isinstance(speed, (int, float)) and speed > 0 else None


def _today() -> str:
    return time.strftime("%Y-%m-%d")


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


@dataclass
class HostSpeed:
    speed: float  # one core here relative to the reference core (1.0 = the reference)
    source: str  # measured | cached | given (--host-speed) | reference (no scaling, no correction)
    measured: str = ""  # date of the measurement this figure comes from ("" when given)
    key: dict[str, Any] = field(default_factory=dict)  # machine_key() the figures belong to
    correct_quota: bool = True  # raise quotas by 1/efficiency (measured per share, cached)
    quiet: bool = False  # no progress lines while measuring
    efficiency: dict[str, float] = field(default_factory=dict)  # quota share (4 significant digits) -> efficiency

    @classmethod
    def reference(cls) -> HostSpeed:
        """Treat this machine as the reference core and apply no correction (tests, explicit comparisons)."""
        return cls(1.0, "reference", correct_quota=False)

    @classmethod
    def resolve(cls, given: float | None = None, refresh: bool = False, quiet: bool = False) -> HostSpeed:
        """--host-speed when given, else this machine's cached figure, else measure it now and cache it."""
        key = machine_key()
        entry = _load_cache()["machines"].get(_key_text(key))
        entry = entry if isinstance(entry, dict) else {}  # a hand-edited or damaged entry is measured again
        stored = entry.get("quota_efficiency")
        efficiency = {k: float(v) for k, v in (stored.items() if isinstance(stored, dict) and not refresh else [])
                      if isinstance(v, (int, float)) and 0 < v <= 1}
        correct = entry.get("correct_quota", True) is not False  # false in the cache turns the correction off
        speed = entry.get("speed")
        if given is not None:
            return cls(given, "given", "", key, correct, quiet, efficiency)
        if isinstance(speed, (int, float)) and speed > 0 and not refresh:
            return cls(float(speed), "cached", str(entry.get("measured", "")), key, correct, quiet, efficiency)
        _say(f"measuring this machine's core speed once (cached in {cache_path()}) ...", quiet)
        runs = sorted((calibrate_native(SPEED_REPEATS) for _ in range(SPEED_RUNS)), key=lambda r: r["speed"])
        result = runs[len(runs) // 2]
        host = cls(round(result["speed"], 4), "measured", _today(), key, quiet=quiet)
        _save_entry(key, {"speed": host.speed, "measured": host.measured, "per_part": result["per_part"],
                          "seconds": result["seconds"], "speeds": [round(r["speed"], 4) for r in runs],
                          "quota_efficiency": {}})
        return host

    def share(self, cpu_speed: float) -> float:
        """One device core as a share of one CPU here, before any correction."""
        return cpu_speed / self.speed

    def thread_quota(self, cpu_speed: float, cpus: list[int] | None = None) -> tuple[float, float]:
        """(quota share per device thread, efficiency it was corrected by) for a board core of `cpu_speed`."""
        share = self.share(cpu_speed)
        if share >= 1 or not self.correct_quota:
            return share, 1.0
        eff = self.quota_efficiency(share, cpus)
        return min(1.0, share / eff), eff

    def quota_efficiency(self, share: float, cpus: list[int] | None = None) -> float:
        """Work per CPU-second under a `share` quota relative to unthrottled; cached per machine and share."""
        bucket = f"{share:.4g}"
        with _lock:
            if bucket not in self.efficiency:
                _say(f"measuring how much work a {share:.3g}-CPU quota lets through here (once per machine, "
                     "30-60 s) ...", self.quiet)
                self.efficiency[bucket] = solve_efficiency(share, cpus)
                self._store_efficiency()
            return self.efficiency[bucket]

    def _store_efficiency(self) -> None:
        entry = _load_cache()["machines"].get(_key_text(self.key)) if self.key else None
        if not isinstance(entry, dict):
            return  # a given --host-speed on an uncached machine: keep the figures for this process only
        entry["quota_efficiency"] = dict(self.efficiency)
        entry["quota_efficiency_measured"] = _today()
        _save_entry(self.key, entry)

    def describe(self) -> str:
        when = f", {self.measured}" if self.measured else ""
        return f"{self.speed:.3g} of the reference core ({self.source}{when})"

    def to_record(self) -> dict[str, Any]:
        return {"host_speed": self.speed, "host_speed_source": self.source, "host_speed_measured": self.measured}


def _last_cpu() -> list[int]:
    return sorted(os.sched_getaffinity(0))[-1:]


def _calibrate_cmd(spec: dict[str, Any], argv: list[str]) -> list[str]:
    """The calibration module as a child confined by emulate's entry program (`spec`: cgroup files or CPUs), dying
    with this process."""
    from edge_ft.emulation.lifetime import guarded

    return guarded([sys.executable, "-m", "edge_ft.emulation.calibrate", *argv], spec)


def _child(argv: list[str], cpus: list[int]) -> dict[str, Any]:
    """Run the calibration module in a child with one BLAS thread, pinned to `cpus`; its last line of JSON."""
    from edge_ft.emulation.lifetime import run

    proc = run([sys.executable, "-m", "edge_ft.emulation.calibrate", *argv], "the calibration workload",
               spec={"procs": [], "rlimit_data": None, "cpus": cpus}, env=thread_env(1), stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        from edge_ft.errors import UserError

        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise UserError(f"the calibration workload failed: {last}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def calibrate_native(repeats: int, cpus: list[int] | None = None) -> dict[str, Any]:
    """The calibration report of one unconfined core here (pinned to the last usable CPU), timed by CPU time."""
    return _child(["--repeats", str(repeats), "--clock", "cpu"], cpus or _last_cpu())


def solve_efficiency(share: float, cpus: list[int] | None = None) -> float:
    """The efficiency e such that a quota of share / e delivers `share` of this core's work.

    Efficiency grows with the quota (measured here: ~0.7 at 0.05 of a CPU, ~0.8 at 0.15, ~0.9 at 0.5), so
    dividing by e(share) overshoots a little. One fixed-point step, e(share / e(share)), measures it at the quota
    actually applied; a secant step extrapolated from two noisy points overshot by 1.7x here, this does not.
    """
    e0 = measure_efficiency(share, cpus)
    q1 = min(1.0, share / e0)
    return e0 if q1 >= 1.0 or e0 >= 0.97 else measure_efficiency(q1, cpus)


def measure_efficiency(share: float, cpus: list[int] | None = None) -> float:
    """Median work per CPU-second under a `share` quota over the free rate; 1.0 where cgroups are unavailable.

    By CPU time, not by the work the quota let through in wall time: beside busy neighbours a quota delivers less
    than its share, and that passing shortfall must not be cached as this machine's correction (it was: 0.60 at a
    0.47 share measured at a load of 12, 0.93 at 0.45 when quieter)."""
    efficiencies = work_fractions(share, cpus, clock="cpu")
    if not efficiencies:
        return 1.0
    # Clamped: a quota cannot give more than the CPU, and a disturbed measurement must not become a wild correction.
    return round(min(1.0, max(0.4, statistics.median(efficiencies))), 4)


def work_fractions(thread_share: float, cpus: list[int] | None = None, cycles: int = CYCLES,
                   clock: str = "wall") -> list[float]:
    """Per cycle: the work rate of one thread under a `thread_share` CFS quota over its rate with the cap lifted
    just before and after, in one running process (so imports, caches and this machine's drift of the moment are
    the same on both sides). Empty where cgroups are unavailable.

    A shared VM's core drifts 10-20% between seconds; comparing separate processes (or a cached figure) with a
    capped run mixes that drift into the result. Toggling the cap on one process every few seconds does not.
    """
    from edge_ft.emulation.cgroups import CgroupJob, CgroupUnavailable
    from edge_ft.emulation.lifetime import watched

    try:
        job = CgroupJob.create(1 << 30, cpus or _last_cpu(), thread_share, thread_share,
                               quota_period_us(min(thread_share, 1)))
    except CgroupUnavailable:
        return []
    cmd = _calibrate_cmd({"procs": job.entry_files(), "rlimit_data": None, "cpus": None},
                         ["--rate", str(MAX_RUN_SECONDS), "--stamps"])
    ends: list[tuple[float, float]] = []  # (wall, CPU) time at the end of every unit
    bounds: list[tuple[float, float]] = []  # (start, end) of each phase; odd phases are capped
    try:
        job.set_cpu_cap(False)  # imports at full speed
        proc = subprocess.Popen(cmd, env=thread_env(1), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        try:
            with watched(proc.pid, "the quota calibration workload", cgroups=True):
                assert proc.stdout is not None  # stdout=PIPE
                proc.stdout.readline()  # {"started": ...}: the workload is warm and timing
                reader = threading.Thread(target=_read_stamps, args=(proc.stdout, ends), daemon=True)
                reader.start()
                for k in range(2 * cycles + 1):
                    capped = k % 2 == 1
                    job.set_cpu_cap(capped)
                    begin, held = time.perf_counter(), len(ends)
                    # A phase lasts its time and at least MIN_UNITS whole units (a slow quota needs longer phases).
                    while proc.poll() is None and (time.perf_counter() - begin < (CAPPED_SECONDS if capped else
                                                                                  FREE_SECONDS)
                                                   or len(ends) - held < MIN_UNITS):
                        time.sleep(0.05)
                    bounds.append((begin, time.perf_counter()))
        finally:
            proc.kill()
            proc.wait()
    finally:
        job.remove()
    if not ends:
        from edge_ft.errors import UserError

        raise UserError("the calibration workload (python -m edge_ft.emulation.calibrate --rate) produced no timings")
    # Capped phases by wall time (what the quota let through), uncapped ones by CPU time (what one core here does
    # while the job runs), so a neighbour sharing the core in an uncapped phase does not inflate the fraction.
    # With clock="cpu" capped phases are rated by CPU time too: the work per CPU-second the quota's gaps leave,
    # apart from how much CPU time the quota delivered (all of it on a quiet machine, less beside a busy one).
    rates = [_phase_rate(ends, begin, end, by_cpu=k % 2 == 0 or clock == "cpu") for k, (begin, end) in
             enumerate(bounds)]
    fractions = []
    for k in range(1, len(bounds), 2):
        free = [r for r in (rates[k - 1], rates[k + 1]) if r]
        capped_rate = rates[k]
        if capped_rate and free:
            fractions.append(capped_rate / (sum(free) / len(free)))
    return fractions


def _read_stamps(stream: Iterable[str], ends: list[tuple[float, float]]) -> None:
    for line in stream:
        with contextlib.suppress(ValueError):
            wall, cpu = map(float, line.split())
            ends.append((wall, cpu))


def _phase_rate(ends: list[tuple[float, float]], begin: float, end: float, by_cpu: bool) -> float | None:
    """Units per wall second (or per CPU second) between the first and last unit that ended inside [begin, end]
    (whole units only)."""
    inside = [stamp for stamp in ends if begin <= stamp[0] <= end]
    if len(inside) < 3:
        return None
    i = 1 if by_cpu else 0
    return (len(inside) - 1) / (inside[-1][i] - inside[0][i])
