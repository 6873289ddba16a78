"""The cgroups one confined run lives in: create, let the child join, watch, remove.

Layout (cgroup v1, one folder per controller, nested under the cgroup this process already lives in, so a job
can never escape limits placed on its caller):
  memory/<own>/edge-ft.<pid>.<n>/          memory.limit_in_bytes (+ memory.memsw.limit_in_bytes: no swap either)
  cpuset/<own>/edge-ft.<pid>.<n>/          cpuset.cpus, cpuset.mems
  cpu/<own>/edge-ft.<pid>.<n>/             cpu.cfs_quota_us = all device cores' worth, cpu.shares raised (capped)
  cpu/<own>/edge-ft.<pid>.<n>/t<k>/        cpu.cfs_quota_us = one device core's worth, one leaf per thread
CFS bandwidth control caps a group, not a thread: with one shared quota a single-threaded phase would run `cores`
times faster than on the device and spinning pool threads would eat the worker's share. Giving every thread its own
leaf (v1 accepts single thread ids in `tasks`) caps each thread at one device core, as the hardware does. New threads
start in their creator's leaf; `split_threads()`, called every sampling tick, moves them into leaves of their own.

cgroup v2 (unified, /sys/fs/cgroup/cgroup.controllers present): the same shape in one hierarchy:
  <parent>/edge-ft.<pid>.<n>/              memory.max, memory.swap.max = 0, cpuset.cpus, cpu.max, cpu.weight
  <parent>/edge-ft.<pid>.<n>/t<k>/         cgroup.type = threaded, cpu.max = one device core's worth, per thread
The job folder is a threaded domain, so its threads (cgroup.threads) spread over thread leaves while memory stays
accounted to the job. v2 lets no cgroup that holds processes give controllers to children, and a CI job's commands
run in such a cgroup (a systemd service's): when <own> holds processes, they are moved into <own>/edge-ft-leaf
first (still under <own> and its limits) and the jobs are created beside it; later runs reuse that layout.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
PREFIX = "edge-ft."
V2_LEAF = "edge-ft-leaf"  # v2: where the processes of a cgroup that must delegate controllers are moved
V2_CONTROLLERS = ("cpu", "cpuset", "memory")
# A capped job's CPU weight (v1 cpu.shares, v2 cpu.weight; defaults 1024, 100): a board's cores are its own, so when
# its quota is refilled its threads run then instead of queueing behind neighbours. The quota still bounds what it
# takes; the weight only decides when. Uncapped (no quota, or lifted by set_cpu_cap) it is an ordinary process.
CAPPED_WEIGHT = {1: 100 * 1024, 2: 10_000}
DEFAULT_WEIGHT = {1: 1024, 2: 100}
_counter = itertools.count()


class CgroupUnavailable(Exception):
    """Cgroups cannot confine a job here (not root, read-only, controller missing); the message says why."""


def parse_cpulist(text: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _write(path: Path, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _own_paths() -> dict[str, str]:
    """controller -> this process's cgroup path, from /proc/self/cgroup ('' is the v2 hierarchy)."""
    paths = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def _v1_mount(controller: str) -> Path | None:
    """The v1 hierarchy carrying `controller` (/sys/fs/cgroup/cpu or a co-mount like cpu,cpuacct)."""
    if not CGROUP_ROOT.is_dir():
        return None
    for d in sorted(CGROUP_ROOT.iterdir()):
        if controller in d.name.split(",") and (d / "tasks").exists():
            return d
    return None


def _v2_parent(own: str) -> Path:
    """The v2 cgroup jobs are created in: this process's own, or the one whose processes were moved to its leaf."""
    path = CGROUP_ROOT / own.lstrip("/")
    return path.parent if path.name == V2_LEAF else path


def _v2_delegate(parent: Path) -> None:
    """Make `parent` hand cpu, cpuset and memory to its children. A cgroup holding processes may not (EBUSY, the
    'no internal processes' rule; only the root is exempt), so its processes are moved into its leaf first."""
    missing = [c for c in V2_CONTROLLERS if c not in _read(parent / "cgroup.subtree_control").split()]
    if not missing:
        return
    absent = [c for c in missing if c not in _read(parent / "cgroup.controllers").split()]
    if absent:
        raise CgroupUnavailable(f"cgroup v2: the {', '.join(absent)} controller is not given to {parent} by its "
                                "parent (enable it in the parent's cgroup.subtree_control)")
    for _ in range(5):  # processes forked while we move the others land in the old cgroup: move again
        try:
            _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise CgroupUnavailable(f"cgroup v2: cannot enable {', '.join(missing)} below {parent} "
                                        f"({e.strerror})") from None
        leaf = parent / V2_LEAF
        leaf.mkdir(exist_ok=True)
        for pid in _read(parent / "cgroup.procs").split():
            with contextlib.suppress(OSError):  # it exited meanwhile
                _write(leaf / "cgroup.procs", pid)
    raise CgroupUnavailable(f"cgroup v2: {parent} keeps processes that cannot be moved into {V2_LEAF}, so it cannot "
                            "give controllers to children; run inside a delegated cgroup (e.g. systemd-run --scope "
                            "-p Delegate=yes)")


def _mkdir(path: Path, made: list[Path]) -> None:
    path.mkdir()
    made.append(path)


def _flat(path: Path) -> dict[str, int]:
    """Every counter of a flat-keyed file (cpu.stat, memory.oom_control, memory.events); {} when unreadable."""
    out = {}
    with contextlib.suppress(OSError):
        for line in _read(path).splitlines():
            k, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[k] = int(v)
    return out


def _throttled_seconds(stat: dict[str, int]) -> float:
    """Throttled time from a cpu.stat: v1 throttled_time (ns), v2 throttled_usec."""
    return stat["throttled_usec"] / 1e6 if "throttled_usec" in stat else stat.get("throttled_time", 0) / 1e9


def _quota_us(share: float | None, period_us: int) -> int | None:
    """A share of one CPU as CFS quota microseconds per period (the kernel wants at least 1 ms); None: uncapped."""
    return None if share is None else max(1000, round(share * period_us))


def _remove_tree(path: Path) -> None:
    """rmdir a cgroup and its leaves (cgroups are removed with rmdir, never rm -r); ignore what is gone."""
    if path.is_dir():
        for leaf in path.iterdir():
            if leaf.is_dir():
                with contextlib.suppress(OSError):
                    leaf.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()


class CgroupJob:
    """The cgroups of one confined run. Build with `create`, hand `entry_files` to the child, `remove` at the end."""

    def __init__(self, version: int, dirs: dict[str, Path]):
        self.version = version
        self.dirs = dirs  # "memory" / "cpuset" / "cpu" -> job folder (all the same folder under v2)
        self.leaves: list[Path] = []  # v1 per-thread cpu leaves
        self.thread_quota_us: int | None = None
        self.period_us: int | None = None
        self._next_leaf = itertools.count()
        self._oom_before = 0
        self._total_quota_us: int | None = None  # the whole job's cap, as written at creation
        self._ended_leaves_throttled = 0.0  # throttled seconds of per-thread leaves already removed

    @classmethod
    def create(cls, memory_bytes: int, cpus: list[int], thread_quota: float | None, total_quota: float | None,
               period_us: int) -> CgroupJob:
        """Quotas are fractions of one of this machine's CPUs (None: no cap). Raises CgroupUnavailable."""
        if os.geteuid() != 0:
            raise CgroupUnavailable("not running as root, so cgroups cannot be created")
        from edge_ft.emulation.lifetime import ensure_guardian

        ensure_guardian()  # before the first cgroup named after this process: should it die now, they go too
        own = _own_paths()
        name = f"{PREFIX}{os.getpid()}.{next(_counter)}"
        made: list[Path] = []
        try:
            if is_v2():
                job = cls._create_v2(_v2_parent(own.get("", "/")) / name, made,
                                     memory_bytes, cpus, thread_quota, total_quota, period_us)
            else:
                job = cls._create_v1(own, name, made, memory_bytes, cpus, thread_quota, total_quota, period_us)
        except BaseException as e:  # a cancel in the middle must not leave half a job behind either
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    path.rmdir()
            if not isinstance(e, OSError):
                raise
            where = e.filename or "cgroup files"
            raise CgroupUnavailable(f"cannot set up cgroups ({where}: {e.strerror or e})") from None
        job._oom_before = job.oom_kills()
        return job

    @classmethod
    def _create_v1(cls, own: dict[str, str], name: str, made: list[Path], memory_bytes: int, cpus: list[int],
                   thread_quota: float | None, total_quota: float | None, period_us: int) -> CgroupJob:
        dirs = {}
        for controller in ("memory", "cpuset", "cpu"):
            mount = _v1_mount(controller)
            if mount is None:
                raise CgroupUnavailable(f"no cgroup v1 '{controller}' hierarchy under {CGROUP_ROOT}")
            parent = mount / own.get(controller, "/").lstrip("/")
            remove_stale(parent)
            dirs[controller] = parent / name
        mem, cpuset, cpu = dirs["memory"], dirs["cpuset"], dirs["cpu"]
        _mkdir(mem, made)
        _write(mem / "memory.limit_in_bytes", memory_bytes)
        if (mem / "memory.memsw.limit_in_bytes").exists():  # only with swap accounting; stops swapping past the cap
            _write(mem / "memory.memsw.limit_in_bytes", memory_bytes)
        _mkdir(cpuset, made)
        _write(cpuset / "cpuset.cpus", ",".join(map(str, cpus)))
        _write(cpuset / "cpuset.mems", _read(cpuset.parent / "cpuset.effective_mems").strip()
               or _read(cpuset.parent / "cpuset.mems").strip())
        _mkdir(cpu, made)
        _write(cpu / "cpu.cfs_period_us", period_us)
        job = cls(1, dirs)
        job.period_us = period_us
        job._total_quota_us = _quota_us(total_quota, period_us)
        if job._total_quota_us is not None:
            _write(cpu / "cpu.cfs_quota_us", job._total_quota_us)
        job.thread_quota_us = _quota_us(thread_quota, period_us)
        job._set_weight(capped=True)
        job.leaves.append(job._new_leaf(made))
        return job

    @classmethod
    def _create_v2(cls, path: Path, made: list[Path], memory_bytes: int, cpus: list[int], thread_quota: float | None,
                   total_quota: float | None, period_us: int) -> CgroupJob:
        parent = path.parent
        remove_stale(parent)
        _v2_delegate(parent)
        _mkdir(path, made)
        _write(path / "memory.max", memory_bytes)
        if (path / "memory.swap.max").exists():  # absent without swap accounting
            _write(path / "memory.swap.max", 0)
        _write(path / "cpuset.cpus", ",".join(map(str, cpus)))
        job = cls(2, {"memory": path, "cpuset": path, "cpu": path})
        job.period_us = period_us
        job._total_quota_us = _quota_us(total_quota, period_us)
        _write(path / "cpu.max", f"{job._total_quota_us or 'max'} {period_us}")
        _write(path / "cgroup.subtree_control", "+cpu")  # cpu is a threaded controller: its leaves may take threads
        job.thread_quota_us = _quota_us(thread_quota, period_us)
        job._set_weight(capped=True)
        job.leaves.append(job._new_leaf(made))
        return job

    def _new_leaf(self, made: list[Path] | None = None) -> Path:
        leaf = self.dirs["cpu"] / f"t{next(self._next_leaf)}"
        leaf.mkdir()
        if made is not None:
            made.append(leaf)
        if self.version == 2:
            _write(leaf / "cgroup.type", "threaded")
            _write(leaf / "cpu.max", f"{self.thread_quota_us or 'max'} {self.period_us}")
            return leaf
        _write(leaf / "cpu.cfs_period_us", self.period_us)
        if self.thread_quota_us is not None:
            _write(leaf / "cpu.cfs_quota_us", self.thread_quota_us)
        return leaf

    def _set_weight(self, capped: bool) -> None:
        """CAPPED_WEIGHT while a quota caps the job (none at all: the default weight)."""
        capped = capped and (self._total_quota_us is not None or self.thread_quota_us is not None)
        name = "cpu.shares" if self.version == 1 else "cpu.weight"
        with contextlib.suppress(OSError):  # a kernel without the file only loses the priority
            _write(self.dirs["cpu"] / name, (CAPPED_WEIGHT if capped else DEFAULT_WEIGHT)[self.version])

    def set_cpu_cap(self, capped: bool) -> None:
        """Lift the CPU quota (capped=False) or restore it, without moving the job: `profile check` and the quota
        correction compare a job's speed with and without its cap inside one running process. v1 refuses a
        child quota above its parent's, so leaves are capped before the parent and lifted after it."""
        leaves = [leaf for leaf in self.leaves if leaf.is_dir()]
        self._set_weight(capped)
        if self.version == 2:  # v2 takes a child's cpu.max above its parent's (the lower one holds): any order
            for path, quota in [(self.dirs["cpu"], self._total_quota_us)] + [(leaf, self.thread_quota_us)
                                                                            for leaf in leaves]:
                _write(path / "cpu.max", f"{quota if capped and quota else 'max'} {self.period_us}")
            return
        total = self.dirs["cpu"] / "cpu.cfs_quota_us"
        if capped:
            for leaf in leaves:
                _write(leaf / "cpu.cfs_quota_us", self.thread_quota_us or -1)
            _write(total, self._total_quota_us or -1)
        else:
            _write(total, -1)
            for leaf in leaves:
                _write(leaf / "cpu.cfs_quota_us", -1)

    def entry_files(self) -> list[str]:
        """The cgroup.procs files a child writes its own pid into before it execs the job."""
        if self.version == 2:  # join the job (the threaded domain), then move the one thread into the first leaf
            return [str(self.dirs["memory"] / "cgroup.procs"), str(self.leaves[0] / "cgroup.threads")]
        return [str(self.dirs["memory"] / "cgroup.procs"), str(self.dirs["cpuset"] / "cgroup.procs"),
                str(self.leaves[0] / "cgroup.procs")]

    def split_threads(self) -> None:
        """Give every thread of the job its own one-core leaf; drop leaves whose thread has ended."""
        if self.thread_quota_us is None:  # created without a per-thread quota: a leaf per thread would cap nothing
            return
        threads = "tasks" if self.version == 1 else "cgroup.threads"
        for leaf in list(self.leaves):
            try:
                tids = _read(leaf / threads).split()
            except OSError:
                continue
            if not tids and leaf is not self.leaves[0]:  # leaf 0 is empty until the child joins it
                ended = _throttled_seconds(_flat(leaf / "cpu.stat"))
                with contextlib.suppress(OSError):
                    leaf.rmdir()
                    self._ended_leaves_throttled += ended
                    self.leaves.remove(leaf)
                continue
            for tid in tids[1:]:
                new = self._new_leaf()
                try:
                    _write(new / threads, tid)
                    self.leaves.append(new)
                except OSError:  # the thread ended in between
                    with contextlib.suppress(OSError):
                        new.rmdir()

    def throttling(self) -> dict[str, Any]:
        """How much the CPU quota held the job back so far (read it before `remove`).

        periods / throttled_periods  CFS periods of the job's cap, and those in which it ran out
        throttled_seconds            time the job was stopped by its cap, added up over the CPUs it ran on
        thread_throttled_seconds     summed over threads, time each was stopped by its own one-core cap"""
        job = _flat(self.dirs["cpu"] / "cpu.stat")
        leaves = sum(_throttled_seconds(_flat(leaf / "cpu.stat")) for leaf in self.leaves if leaf.is_dir())
        return {"periods": job.get("nr_periods", 0), "throttled_periods": job.get("nr_throttled", 0),
                "throttled_seconds": round(_throttled_seconds(job), 4),
                "thread_throttled_seconds": round(leaves + self._ended_leaves_throttled, 4)}

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in _read(self.dirs["memory"] / "cgroup.procs").split()]
        return []

    def memory_peak(self) -> int | None:
        """Highest memory charged to the job (RSS + page cache), or None where the kernel does not keep it."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        with contextlib.suppress(OSError, ValueError):
            return int(_read(self.dirs["memory"] / name))
        return None

    def reset_memory_peak(self) -> bool:
        """Start memory_peak() again from the current usage (v1); False where that is not possible (v2's
        memory.peak resets only for the file descriptor that wrote it)."""
        if self.version != 1:
            return False
        with contextlib.suppress(OSError):
            _write(self.dirs["memory"] / "memory.max_usage_in_bytes", 0)
            return True
        return False

    def oom_kills(self) -> int:
        if self.version == 1:
            return _flat(self.dirs["memory"] / "memory.oom_control").get("oom_kill", 0)
        return _flat(self.dirs["memory"] / "memory.events").get("oom_kill", 0)

    def oom_killed(self) -> bool:
        return self.oom_kills() > self._oom_before

    def kill(self, wait: float = 2.0) -> None:
        """SIGKILL every process still in the job and wait (bounded) until the group is empty."""
        deadline = time.monotonic() + wait
        if self.pids():
            with contextlib.suppress(OSError):  # a process dies faster unthrottled (its exit frees all its memory)
                self.set_cpu_cap(False)
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        self.kill()
        for path in {p for p in self.dirs.values()}:
            _remove_tree(path)


def is_v2() -> bool:
    """The unified hierarchy is mounted at /sys/fs/cgroup (no per-controller v1 folders)."""
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def job_parents() -> list[Path]:
    """The folders this process's jobs are created in: one per controller under v1, one under v2."""
    own = _own_paths()
    if is_v2():
        return [_v2_parent(own.get("", "/"))]
    mounts = {c: _v1_mount(c) for c in ("memory", "cpuset", "cpu")}
    return [m / own.get(c, "/").lstrip("/") for c, m in mounts.items() if m is not None]


def remove_stale(parent: Path) -> int:
    """Remove edge-ft cgroups under `parent` left behind by commands that are gone (a crash, a SIGKILL, the OOM
    killer), killing what still runs in them; never this process's or a live owner's. Returns how many."""
    from edge_ft.emulation.lifetime import purge_owned

    return purge_owned([parent])
