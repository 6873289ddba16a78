"""Children and cgroups end with the command that made them, however it ends.

Three layers, each a net for the one before:
  1. cancellable()  SIGTERM, SIGHUP and SIGINT raise Cancelled (a KeyboardInterrupt) in the main thread, so the
                    `except BaseException: kill` and `finally: job.remove()` paths of a confined run end its child
                    and remove its cgroups; the CLI then prints one line (summary) and exits 128 + the signal.
  2. die with the parent  every confined or measured child starts through emulate's entry program, which sets
                    PR_SET_PDEATHSIG=SIGKILL before it execs the job (and exits if the parent is already gone), and
                    runs in a process group of its own, registered with a guardian: a small process (this file run
                    as a script, standard library only) that holds the read end of a pipe only the command writes
                    to and a pidfd of the command. When the command dies in any way, SIGKILL and the OOM killer
                    included, the pidfd turns readable (the pipe ends too, unless a forked descendant still holds
                    its write end); the guardian kills the registered process groups and every cgroup named after
                    the command's pid (cgroup.kill on v2, each task on v1), removes those cgroups and exits. The
                    guardian is started before the first cgroup or guarded child exists (ensure_guardian), so there
                    is no instant at which a SIGKILL would leave either with nobody to clean up.
  3. sweep()        at start every command removes edge-ft cgroups whose owning process is gone (names carry the
                    owner's pid: edge-ft.<pid>.<n>), killing what still runs in them; a live owner's are never
                    touched.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

PREFIX = "edge-ft."  # edge_ft.emulation.cgroups.PREFIX (this file also runs alone, without the package)
SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
ENTER = Path(__file__).with_name("enter.py")


class Cancelled(KeyboardInterrupt):
    """The command was told to stop by a signal; existing KeyboardInterrupt handling ends what it started."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(f"signal {signum}")
        self.signum = signum


_state: dict[str, Any] = {"signum": None, "stopped": [], "kept": None}
_guard: dict[str, Any] = {"proc": None, "lock": threading.Lock()}


def _raise(signum: int, frame: FrameType | None) -> None:
    if _state["signum"] is not None:  # cleanup is running: a second signal must not cut it short
        return
    _state["signum"] = signum
    raise Cancelled(signum)


@contextlib.contextmanager
def cancellable() -> Iterator[None]:
    """Turn SIGTERM, SIGHUP and SIGINT into Cancelled for the duration (main thread only; elsewhere a no-op).
    SIGINT is taken even when inherited as ignored (a background shell starts us so, but a supervisor that signals
    one process means it); SIGHUP stays ignored under nohup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}  # signal -> the handler it had
    for sig in SIGNALS:
        old = signal.getsignal(sig)
        if sig == signal.SIGHUP and old == signal.SIG_IGN or old is _raise:
            continue
        previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stopped(what: str) -> None:
    """Note a child that was ended because the command was cancelled (for summary)."""
    _state["stopped"].append(what)


def kept(what: str | None) -> None:
    """What a cancelled command keeps (e.g. "3 finished runs in results.jsonl"); None: nothing."""
    _state["kept"] = what


def kept_runs(finished: int, results: str | Path) -> None:
    """What a cancelled sweep keeps: the runs it finished, each appended to `results` when it ended."""
    kept(f"{finished} finished runs in {results}; the run in progress is not recorded")


def exit_status(e: KeyboardInterrupt) -> int:
    return 128 + getattr(e, "signum", signal.SIGINT)


def summary(prog: str, e: KeyboardInterrupt) -> str:
    """One line, prefixed with the command's prog ("edge-ft bench"): which signal, what was stopped, what was kept."""
    signum = getattr(e, "signum", signal.SIGINT)
    ended = "; ".join(_state["stopped"]) or "no child was running"
    return (f"{prog}: stopped by {signal.Signals(signum).name}: {ended}; "
            f"kept: {_state['kept'] or 'nothing'}")


def reset() -> None:
    """Forget what an earlier (in-process) command stopped and kept."""
    _state.update(signum=None, stopped=[], kept=None)


def guarded(argv: list[str], spec: dict[str, Any] | None = None) -> list[str]:
    """argv run through emulate's entry program, which applies `spec` (cgroups, rlimits, affinity) and makes the
    child die with this process before the job's first instruction. Starts the guardian first (ensure_guardian)."""
    import json

    ensure_guardian()
    spec = {**(spec or {}), "parent": os.getpid()}
    return [sys.executable, "-I", "-S", str(ENTER), json.dumps(spec), "--", *argv]


def _guardian() -> subprocess.Popen[bytes] | None:
    """The guardian of this process, started on first use (None where it cannot start)."""
    with _guard["lock"]:
        proc: subprocess.Popen[bytes] | None = _guard["proc"]
        if proc is not None and proc.poll() is None:
            return proc
        with contextlib.suppress(OSError):
            proc = subprocess.Popen([sys.executable, "-I", "-S", __file__, str(os.getpid()),
                                     *map(str, _cgroup_parents())], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, start_new_session=True)
            _guard["proc"] = proc
            return proc
        return None


def ensure_guardian() -> None:
    """Start this process's guardian unless it runs. Called before a cgroup named after this process is made and
    before a guarded child starts: a SIGKILL between the two and the first watch() must not leave them behind."""
    _guardian()


def guardian_pid() -> int | None:
    proc = _guard["proc"]
    return proc.pid if proc is not None else None


def _tell(line: str) -> None:
    proc = _guardian()
    if proc is None:
        return
    assert proc.stdin is not None  # started with stdin=PIPE
    with _guard["lock"], contextlib.suppress(OSError, ValueError):
        proc.stdin.write(f"{line}\n".encode())
        proc.stdin.flush()


def watch(pgid: int) -> None:
    """Process group `pgid` is killed by the guardian should this process die before unwatch(pgid)."""
    _tell(f"+{pgid}")


def unwatch(pgid: int) -> None:
    _tell(f"-{pgid}")


@contextlib.contextmanager
def watched(pgid: int, what: str = "", cgroups: bool = False) -> Iterator[None]:
    """watch(pgid) while the block runs. The block ends the group itself when it raises; on a cancel `what` is
    noted as stopped (see summary)."""
    watch(pgid)
    try:
        yield
    except KeyboardInterrupt:
        stopped(f"ended {what or 'a child'} (pid {pgid})" + (" and removed its cgroups" if cgroups else ""))
        raise
    finally:
        unwatch(pgid)


def run(argv: list[str], what: str, spec: dict[str, Any] | None = None,
        **popen: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run for a child that dies with this process: through the entry program, in a process group of
    its own that is killed should we be cancelled (or die)."""
    with subprocess.Popen(guarded(argv, spec), start_new_session=True, **popen) as proc, watched(proc.pid, what):
        try:
            out, err = proc.communicate()
        except BaseException:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _cgroup_parents() -> list[Path]:
    if os.geteuid() != 0:
        return []
    with contextlib.suppress(Exception):
        from edge_ft.emulation.cgroups import job_parents

        return job_parents()
    return []


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _tree(path: Path) -> list[Path]:
    """A cgroup and its leaves (v1 thread leaves, v2 threaded leaves); [] once it is gone."""
    with contextlib.suppress(OSError):
        return [path, *(p for p in path.iterdir() if p.is_dir())]
    return []


def _members(path: Path) -> list[int]:
    """Processes in cgroup `path` and its leaves."""
    pids: set[int] = set()
    for group in _tree(path):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(p) for p in _read(group / "cgroup.procs").split())
    return sorted(pids)


def _uncap(path: Path) -> None:
    """Lift the CPU quota of a job, then of its leaves (v1 refuses a leaf above its parent): killed processes exit
    unthrottled."""
    for group, name, value in [(g, n, v) for g in _tree(path) for n, v in (("cpu.cfs_quota_us", "-1"),
                                                                            ("cpu.max", "max"))]:
        with contextlib.suppress(OSError):
            with open(group / name, "w") as f:
                f.write(value)


def _kill_members(path: Path, pids: list[int]) -> None:
    try:
        with open(path / "cgroup.kill", "w") as f:
            f.write("1")
    except OSError:  # v1, or a v2 kernel before 5.14
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _remove(path: Path) -> bool:
    """rmdir a cgroup's leaves, then the cgroup (never rm -r); True when it is gone."""
    for group in reversed(_tree(path)):
        with contextlib.suppress(OSError):
            group.rmdir()
    return not path.exists()


def purge(paths: str | Path | Iterable[str | Path], wait: float = 5.0) -> list[Path]:
    """Kill everything in the cgroups `paths` (a job has one per v1 controller), then remove them; the ones gone.
    Every quota is lifted and every member killed before any rmdir, so a killed task held by its CPU quota in one
    controller does not keep its memory cgroup busy, and an rmdir refused while killed tasks finish exiting
    (EBUSY) is tried again until `wait` seconds have passed. Another process may remove them meanwhile."""
    folders = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    deadline = time.monotonic() + wait
    for path in folders:
        _uncap(path)
    while (busy := [(path, pids) for path in folders if (pids := _members(path))]) and time.monotonic() < deadline:
        for path, pids in busy:
            _kill_members(path, pids)
        time.sleep(0.01)
    while (left := [path for path in folders if not _remove(path)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [path for path in folders if path not in left]


def owner_of(path: Path) -> int | None:
    """The pid an edge-ft cgroup is named after (edge-ft.<pid>.<n>), else None."""
    with contextlib.suppress(IndexError, ValueError):
        if path.name.startswith(PREFIX):
            return int(path.name[len(PREFIX):].split(".")[0])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie is gone for our purpose: it can no longer clean up
        return _read(Path(f"/proc/{pid}/stat")).rsplit(")", 1)[1].split()[0] != "Z"
    return True


def purge_owned(parents: Iterable[str | Path], owner: int | None = None) -> int:
    """Purge the edge-ft cgroups under `parents` owned by `owner` (None: by any process that is gone, never this
    one or a live one). Returns how many distinct jobs were removed."""
    paths = []  # every job's folder under each parent (v1: one per controller), all killed before any is removed
    for parent in parents:
        with contextlib.suppress(OSError):
            for path in Path(parent).glob(f"{PREFIX}*"):
                pid = owner_of(path)
                if pid is None or (pid != owner if owner is not None else pid == os.getpid() or _alive(pid)):
                    continue
                paths.append(path)
    return len({path.name for path in purge(paths)}) if paths else 0


def sweep() -> int:
    """Remove cgroups left by edge-ft commands that are gone (killed, OOM-killed, crashed); how many."""
    parents = _cgroup_parents()
    return purge_owned(parents) if parents else 0


def _owner_exit(owner: int) -> int | None:
    """A pidfd that turns readable when `owner`, our parent, exits; None where the kernel has none (< 5.3)."""
    with contextlib.suppress(AttributeError, OSError):
        return os.pidfd_open(owner)
    return None


def _apply(lines: bytes, groups: set[int]) -> None:
    for text in lines.decode().split():
        if text[:1] == "+":
            groups.add(int(text[1:]))
        elif text[:1] == "-":
            groups.discard(int(text[1:]))


def _watch_owner(owner: int) -> set[int]:
    """Read the owner's +pgid / -pgid lines until it is gone; the process groups still registered then.

    Gone is the end of the pipe or, whichever comes first, the owner's exit (its pidfd, else a check every half
    second): a descendant that forked without exec can hold the pipe's write end open after the owner died."""
    pidfd = _owner_exit(owner)
    groups: set[int] = set()
    pending = b""
    gone = os.getppid() != owner  # it died before we looked: we were reparented
    while True:
        waits = [0] + ([pidfd] if pidfd is not None else [])
        ready = select.select(waits, [], [], 0 if gone else None if pidfd is not None else 0.5)[0]
        if 0 in ready:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            *complete, pending = (pending + chunk).split(b"\n")
            _apply(b"\n".join(complete), groups)
            continue  # the owner's last lines are read before its exit is acted on
        if gone:
            break
        gone = (pidfd in ready) if pidfd is not None else not _alive(owner)
    return groups


def _guard_main(argv: list[str]) -> None:
    """The guardian: wait until the owner is gone, then kill its process groups and purge its cgroups."""
    for sig in SIGNALS:  # a group signal meant for the command must not end its cleanup
        signal.signal(sig, signal.SIG_IGN)
    owner, parents = int(argv[0]), [Path(p) for p in argv[1:]]
    for pgid in _watch_owner(owner):
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    purge_owned(parents, owner)


if __name__ == "__main__":
    _guard_main(sys.argv[1:])
