"""Run a measured job as a child process confined to a device profile, and record how it went.

    result = run_confined(["python", "-m", "edge_ft.cli", "train", ...], load_profile("rpi-3b"))
    result.status  # "ok" | "out_of_memory" | "timeout" | "failed"

How the profile is imposed (result.emulation says which path ran):
  cgroup  memory cap = profile budget (no swap), cpuset = min(profile cores, CPUs here), every thread capped at
          one device core's speed (cpu_speed / host speed of one CPU here, raised by the measured throttling loss:
          edge_ft.emulation.hostspeed) and the whole job at what its threads achieve together on the board
          (profile.thread_speedup: 4 threads on a Pi are 1.4-1.9x one, not 4x). Wall time approximates the device's.
  rlimit  where cgroups cannot be written: RLIMIT_DATA = budget (heap and private mappings; RLIMIT_AS would also
          count reserved-but-untouched address space such as thread stacks and allocator arenas and reject jobs
          that fit), CPU affinity, thread counts. Times are this machine's, not the device's (time_scaled False).
  native  the profile is this machine (`host`, or measuring on the real board): thread counts only.
timing="cpu" keeps the memory cap and cores but no CPU quota, and runs the job on one thread at this machine's
speed; it hands the child one board core's share of a CPU here times the board's thread speed-up (QUOTA_ENV), so
`edge-ft train` turns its CPU time into the board's time (edge_ft.device.board_time): the board's threads are
credited with the profile's thread_scaling instead of run. Four unthrottled threads on fewer CPUs here wait for
each other in ways the board's four cores do not, and their CPU time moved 1.5x between runs; one thread's moves
by a few percent. It needs no cgroup (rlimit mode is timed too), takes this machine's time instead of the
board's, and leaves out what throttling adds to the work (cold caches after every throttled gap); wall times are
this machine's. timing="quota" (the default here) paces the job, its threads included, as described above.
In every mode the thread variables below are set before the child starts, so numpy's BLAS, OpenMP and the trainer's
onnxruntime session (EDGE_FT_THREADS -> intra_op_num_threads) size their pools for the device; in every confined
mode those pools also sleep when idle instead of spinning (NO_SPIN_ENV).
Running out of memory is a result ("does not fit in 512 MB"), never an exception.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from edge_ft.contracts import MEMORY_BUDGET_ENV, QUOTA_ENV, TIMING_ENV, TIMINGS
from edge_ft.device.board_time import Quota
from edge_ft.device.ort_api import SPINNING_ENV
from edge_ft.emulation import lifetime
from edge_ft.emulation.cgroups import CgroupJob, CgroupUnavailable
from edge_ft.emulation.cpu import quota_period_us, thread_env
from edge_ft.emulation.hostspeed import HostSpeed
from edge_ft.emulation.profiles import DeviceProfile
from edge_ft.errors import UserError

MODES = ("auto", "cgroup", "rlimit", "native")
# Thread pools that wait for work by spinning: OpenMP's (torch), OpenBLAS's own (numpy) and onnxruntime's intra-
# and inter-op pools (both engines). On the board an idle thread spins on its own idle core; in a confined child
# it spins on CPU time the job's quota charges (or, with more device threads than CPUs here, on a core its own
# worker needs): onnxruntime's spinning made the same Zero 2 W run 160-193 ms/step against 62-71 without it, and
# torch ran 10x slower. Every confined child's pools sleep instead (docs/emulation.md says why; the generated
# results page of the docs site has the measurements).
NO_SPIN_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4", SPINNING_ENV: "0"}
_ENTER = lifetime.ENTER
# How a process that ran out of memory without being OOM-killed says so (Python, numpy, C++/onnxruntime, glibc).
_OOM_TEXT = re.compile(r"MemoryError|Unable to allocate|std::bad_alloc|Failed to allocate|Cannot allocate memory|"
                       r"out of memory", re.IGNORECASE)
_CHILD_RESCAN = 25  # outside a cgroup, look for new child processes every 25 samples (a /proc walk is not free)


@dataclass
class ConfinedResult:
    argv: list[str]  # the job's command line
    profile: str  # profile name
    emulation: str  # how the limits were imposed: native | cgroup | rlimit
    exit_code: int | None  # the job's exit status; negative: killed by that signal
    oom_killed: bool  # the kernel's OOM killer ended (part of) the job inside its memory cap
    timed_out: bool  # killed after `timeout` seconds
    wall_seconds: float  # start to exit, as seen by the parent
    cpu_seconds: float  # user + system CPU time of the job (and the children it waited for)
    peak_rss_bytes: int  # max(sampled_rss_bytes, ru_maxrss_bytes)
    sampled_rss_bytes: int  # highest total RSS over the job's processes, sampled every ~20 ms
    ru_maxrss_bytes: int  # the kernel's RSS high-water mark of the job process
    cgroup_peak_bytes: int | None  # highest memory charged to the job's cgroup (RSS + page cache); cgroup only
    memory_limit_bytes: int | None  # the cap imposed (None: native)
    cpus: list[int] | None  # CPUs the job was allowed on (None: all)
    threads: int  # thread count given to BLAS/OpenMP/onnxruntime
    cpu_quota: float | None  # share of one CPU here one board core stands for: each thread's cap (timing quota) or
    # the divisor of a thread's CPU time (timing cpu); None: neither
    total_quota: float | None  # the same for the whole job (the board's threads together)
    quota_efficiency: float | None  # measured work per CPU-second under the quota; the quota was raised by 1/it
    host_speed: float  # this machine's core vs the reference core, used to scale the quota
    host_speed_source: str  # measured | cached | given | reference
    time_scaled: bool  # its step times stand for the device's: by a CPU quota (timing quota) or CPU time (timing cpu)
    timing: str | None  # "quota" | "cpu" (contracts.TIMINGS) when time-scaled, else None
    # What the CPU quota held back (cgroup mode; None otherwise): seconds the job was stopped by its cap (added up
    # over the CPUs it ran on), thread-seconds its threads were stopped by their own one-core caps, CFS periods.
    throttled_seconds: float | None = None
    thread_throttled_seconds: float | None = None
    throttled_periods: int | None = None
    periods: int | None = None
    notes: list[str] = field(default_factory=list)  # caveats about this emulation
    stdout_tail: str = ""
    stderr_tail: str = ""

    @property
    def status(self) -> str:
        if self.timed_out:
            return "timeout"
        if self.oom_killed:
            return "out_of_memory"
        if self.exit_code == 0:
            return "ok"
        if self.emulation != "cgroup" and _OOM_TEXT.search(self.stderr_tail):
            return "out_of_memory"
        return "failed"

    @property
    def fits(self) -> bool:
        """False when the job needed more memory than the profile's budget."""
        return self.status != "out_of_memory"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status, "fits": self.fits}


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def plan_cpus(profile: DeviceProfile) -> list[int]:
    """The last `cores` CPUs this process may use (CPU 0 usually takes most interrupts)."""
    here = usable_cpus()
    return here[-min(profile.cores, len(here)):]


def run_confined(argv: list[str], profile: DeviceProfile, env: dict[str, str] | None = None,
                 timeout: float | None = None, *, mode: str = "auto", threads: int | None = None,
                 host: HostSpeed | None = None, cwd: str | os.PathLike[str] | None = None,
                 sample_interval: float = 0.02, tail_chars: int = 4000, cpu_cap: bool = True,
                 timing: str = "quota") -> ConfinedResult:
    """Run `argv` under `profile`'s limits and measure it.

    mode: auto (native for native profiles, else cgroup, else rlimit) | cgroup | rlimit | native.
    threads: override the profile's thread count (calibration runs one thread).
    host: this machine's speed (HostSpeed.resolve(): cached or measured); None treats this machine as the
    reference core with no throttling correction, so a profile's cpu_speed is its share of a CPU here.
    cpu_cap=False: the profile's memory cap, cores and threads, this machine's speed (see confine).
    timing: "quota" paces the job; "cpu" times it by its CPU time (see the module's docstring).
    """
    conf = confine(profile, env, mode=mode, threads=threads, host=host, cpu_cap=cpu_cap, timing=timing)
    try:
        run = _run_and_watch(conf.command(argv), conf.env, cwd, timeout, conf.job, sample_interval, tail_chars)
    finally:
        conf.remove()
    return ConfinedResult(argv=list(argv), profile=profile.name, **conf.fields(), **run)


@dataclass
class Confinement:
    """How one job is confined: its cgroups (or rlimit/affinity spec), environment and the quotas applied."""

    mode: str  # native | cgroup | rlimit (after any fallback)
    job: CgroupJob | None  # the cgroups (cgroup mode)
    spec: dict[str, Any]  # what enter.py applies before exec: cgroup.procs files, RLIMIT_DATA, CPU affinity
    env: dict[str, str]  # the child's environment: thread counts, EDGE_FT_PROFILE, EDGE_FT_EMULATION
    cpus: list[int] | None  # CPUs the job may use (None: all)
    threads: int  # thread count given to BLAS/OpenMP/onnxruntime
    memory_limit_bytes: int | None  # the cap imposed (None: native)
    thread_share: float | None  # CPU quota per thread (share of one CPU here); None: uncapped
    total_share: float | None  # CPU quota of the whole job; None: uncapped
    efficiency: float | None  # the throttling correction the quota was raised by
    host: HostSpeed  # this machine's speed the quotas were scaled by
    notes: list[str]  # caveats about this emulation
    timed_by: Quota | None = None  # timing cpu: the shares the child's CPU time is scaled by (no cap applied)

    def command(self, argv: list[str]) -> list[str]:
        """argv prefixed by the entry program that applies the limits before the job's first instruction."""
        return lifetime.guarded(argv, self.spec)

    def remove(self) -> None:
        if self.job is not None:
            self.job.remove()

    def fields(self) -> dict[str, Any]:
        """The ConfinedResult fields that describe the confinement."""
        timing, shares = None, self.timed_by
        if self.job is not None and self.thread_share is not None:
            timing, shares = "quota", Quota(self.thread_share, self.total_share or self.thread_share)
        elif shares is not None:
            timing = "cpu"
        paced = timing == "quota"
        return dict(emulation=self.mode, threads=self.threads, cpus=self.cpus,
                    memory_limit_bytes=self.memory_limit_bytes,
                    cpu_quota=shares.thread if shares else None, total_quota=shares.job if shares else None,
                    quota_efficiency=self.efficiency if paced else None, host_speed=self.host.speed,
                    host_speed_source=self.host.source, time_scaled=timing is not None, timing=timing,
                    notes=list(self.notes))


def threads_to_run(profile: DeviceProfile, threads: int, timing: str, mode: str = "auto", cpu_cap: bool = True) -> int:
    """The threads a job confined to `profile` runs (what its command line should ask for): one when timed by CPU
    time on a board that is not this machine (it stands for the board's `threads`, credited with thread_scaling),
    else `threads`."""
    timed_by_cpu = timing == "cpu" and cpu_cap and not profile.native and mode != "native"
    return 1 if timed_by_cpu else threads


def confine(profile: DeviceProfile, env: dict[str, str] | None = None, *, mode: str = "auto",
            threads: int | None = None, host: HostSpeed | None = None, cpu_cap: bool = True,
            timing: str = "quota") -> Confinement:
    """Create the limits for one job under `profile` (see run_confined); the caller starts the child with
    `command(argv)` and `env`, and calls `remove()` when it has ended. cpu_cap=False keeps memory, cores and
    thread counts but lifts the CPU quota (times are then this machine's); timing="cpu" lifts it too and hands the
    child the shares its CPU time is scaled by."""
    if mode not in MODES:
        raise UserError(f"unknown emulation mode {mode!r}: choose one of {', '.join(MODES)}")
    if timing not in TIMINGS:
        raise UserError(f"unknown timing {timing!r}: choose one of {', '.join(TIMINGS)}")
    by_cpu = timing == "cpu" and cpu_cap
    cpu_cap = cpu_cap and not by_cpu
    host = host or HostSpeed.reference()
    threads = threads or profile.threads
    notes: list[str] = []
    if mode == "auto":
        mode = "native" if profile.native else "cgroup"
    share = host.share(profile.cpu_speed)
    cpus = None if mode == "native" else plan_cpus(profile)
    job, thread_share, total_share, efficiency = None, None, None, None
    if mode == "cgroup" and share < 1 and cpu_cap:
        thread_share, efficiency = host.thread_quota(profile.cpu_speed, cpus)
        total_share = thread_share * profile.thread_speedup(threads)
    if mode == "cgroup":
        assert cpus is not None  # plan_cpus gives every mode but native its cores
        try:
            job = CgroupJob.create(profile.budget_bytes, cpus, thread_share, total_share,
                                   quota_period_us(min(thread_share or 1, 1)))
        except CgroupUnavailable as e:
            notes.append(f"cgroups unavailable ({e}); fell back to rlimit: memory cap via RLIMIT_DATA, "
                         "times are this machine's")
            mode = "rlimit"
    timed_by = None
    if by_cpu and mode != "native":  # one thread here stands for the board's threads together (module docstring)
        speedup = profile.thread_speedup(threads)
        timed_by, threads = Quota(share * speedup, share * speedup), threads_to_run(profile, threads, timing, mode)
    if job is not None and cpu_cap:
        assert cpus is not None  # a cgroup job has its cores
        notes += _cgroup_notes(profile, share, total_share, cpus, threads)
    elif timed_by is not None:
        notes.append(f"timed by CPU time: one thread at this machine's speed; its steps' CPU time over {share:.3g} of "
                     f"a CPU per board core, {timed_by.thread / share:.2f}x for the board's {profile.threads} threads "
                     "(thread_scaling), is the board's time; its wall time is this machine's")
    elif job is not None and share < 1:
        notes.append("CPU quota lifted: memory cap, cores and threads are the device's, times are this machine's")
    elif mode == "rlimit" and share < 1:
        notes.append(f"not time-scaled: the device core is ~{share:.2f}x this one; wall times are this machine's")
    spec = {"procs": job.entry_files() if job else [],
            "rlimit_data": profile.budget_bytes if mode == "rlimit" else None,
            "cpus": cpus if mode == "rlimit" else None}
    paced = Quota(thread_share, total_share) if job is not None and thread_share and total_share else None
    child_env = _child_env(profile, env, mode, threads, paced, timed_by)
    return Confinement(mode, job, spec, child_env, cpus, threads,
                       None if mode == "native" else profile.budget_bytes, thread_share, total_share, efficiency,
                       host, notes, timed_by)


def _child_env(profile: DeviceProfile, env: dict[str, str] | None, mode: str, threads: int, paced: Quota | None,
               timed_by: Quota | None) -> dict[str, str]:
    """The child's environment: thread counts, the board's name, mode and memory budget, its shares when a quota
    paces it (`paced`) or its CPU time is scaled (`timed_by`; edge_ft.device.board_time), pools that never spin."""
    child_env = thread_env(threads, env)
    child_env.update(EDGE_FT_PROFILE=profile.name, EDGE_FT_EMULATION=mode)
    child_env[MEMORY_BUDGET_ENV] = str(profile.budget_bytes)  # the feature cache sizes itself against it
    child_env.pop(QUOTA_ENV, None)  # a caller's stale value never reaches a child
    child_env.pop(TIMING_ENV, None)
    if paced is not None:
        child_env[QUOTA_ENV] = paced.env_value()
    elif timed_by is not None:
        child_env[QUOTA_ENV], child_env[TIMING_ENV] = timed_by.env_value(), "cpu"
    if mode != "native":
        for var, value in NO_SPIN_ENV.items():  # a caller's own choice (EDGE_FT_ORT_SPINNING=1 ...) stands
            child_env.setdefault(var, value)
    return child_env


def _cgroup_notes(profile: DeviceProfile, share: float, total_share: float | None, cpus: list[int],
                  threads: int) -> list[str]:
    notes = []
    if share >= 1:
        notes.append("the device core is at least as fast as this one: no CPU cap, times are this machine's")
    if profile.cores > len(cpus):
        notes.append(f"the profile has {profile.cores} cores, this machine {len(cpus)}: its threads share them")
    needed = total_share or 0.0
    if share < 1 and needed > len(cpus):
        notes.append(f"{threads} busy threads need {needed:.2f} CPUs here but {len(cpus)} exist: "
                     "parallel phases run slower than on the device")
    if profile.cpu_speed_is_estimate:
        notes.append("the profile's cpu_speed is an estimate; measure the board with `edge-ft profile calibrate`")
    return notes


def _run_and_watch(cmd: list[str], env: dict[str, str] | None, cwd: str | os.PathLike[str] | None,
                   timeout: float | None, job: CgroupJob | None, interval: float, tail_chars: int) -> dict[str, Any]:
    """Start the child, sample its memory (and split its threads) until it exits; return the measured fields."""
    import psutil

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: a timeout kills all of it
        with lifetime.watched(proc.pid, f"`{_short(cmd)}`", cgroups=job is not None):
            try:
                status, usage, sampled, timed_out, wall = _watch(proc, t0, timeout, job, interval, psutil)
            except BaseException:
                _kill(proc.pid, job)
                with contextlib.suppress(ChildProcessError):
                    os.wait4(proc.pid, 0)
                proc.returncode = -9
                raise
            throttling = _throttling(job)
        proc.returncode = os.waitstatus_to_exitcode(status)
        return {
            "exit_code": proc.returncode, "timed_out": timed_out, "wall_seconds": wall,
            "oom_killed": job.oom_killed() if job is not None else False,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, **throttling,
            "sampled_rss_bytes": sampled, "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "peak_rss_bytes": max(sampled, usage.ru_maxrss * 1024),
            "cgroup_peak_bytes": job.memory_peak() if job is not None else None,
            "stdout_tail": _tail(out, tail_chars), "stderr_tail": _tail(err, tail_chars),
        }


def _watch(proc: subprocess.Popen[bytes], t0: float, timeout: float | None, job: CgroupJob | None, interval: float,
           psutil: ModuleType) -> tuple[int, Any, int, bool, float]:
    """Sample until the child exits: (wait status, rusage, highest RSS, timed out, wall seconds)."""
    sampled, timed_out, tick = 0, False, 0
    procs: dict[int, Any] = {}  # pid -> psutil.Process
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, usage, sampled, timed_out, time.perf_counter() - t0
        if job is not None:
            job.split_threads()
            pids = job.pids() or [proc.pid]
        else:
            pids = _process_tree(proc.pid) if tick % _CHILD_RESCAN == 0 else list(procs) or [proc.pid]
        sampled = max(sampled, _total_rss(pids, procs, psutil))
        if timeout is not None and not timed_out and time.perf_counter() - t0 > timeout:
            timed_out = True
            _kill(proc.pid, job)
        tick += 1
        time.sleep(interval)


def _short(cmd: list[str]) -> str:
    """The job's command without the entry program's prefix, cut to a few words."""
    argv = cmd[cmd.index("--") + 1:] if "--" in cmd else cmd
    words = [Path(argv[0]).name, *argv[1:5]]
    return " ".join(words) + (" ..." if len(argv) > 5 else "")


def _throttling(job: CgroupJob | None) -> dict[str, Any]:
    """The ConfinedResult throttling fields of a finished job (all None outside a cgroup)."""
    if job is None:
        return {}
    t = job.throttling()
    return {"throttled_seconds": t["throttled_seconds"], "thread_throttled_seconds": t["thread_throttled_seconds"],
            "throttled_periods": t["throttled_periods"], "periods": t["periods"]}


def _process_tree(pid: int) -> list[int]:
    import psutil

    with contextlib.suppress(psutil.Error):
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return [pid]


def _total_rss(pids: list[int], cache: dict[int, Any], psutil: ModuleType) -> int:
    """Sum of RSS over `pids`; psutil.Process objects are cached so each sample is one /proc read per process."""
    total = 0
    for pid in pids:
        try:
            p = cache.get(pid) or cache.setdefault(pid, psutil.Process(pid))
            total += p.memory_info().rss
        except psutil.Error:
            cache.pop(pid, None)
    return total


def _kill(pid: int, job: CgroupJob | None) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, 9)
    if job is not None:
        job.kill()


def _tail(f: IO[bytes], chars: int) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * chars))
    return f.read().decode("utf-8", "replace")[-chars:]
