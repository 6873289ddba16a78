"""The processes of a federation: Flower's command lines, a confined SuperNode, and how they are measured and ended.

    node = SuperNode(index=0, profile=load_profile("rpi-zero-2w"), ...)
    node.start(link)                 # flower-supernode from the device venv, inside the profile's cgroup
    node.sample()                    # every tick: RSS (and PSS) of the SuperNode, its SuperExec and ClientApps
    node.kill(); node.start(link)    # the fault hook: SIGKILL the whole node, later the same key rejoins
    node.stop()                      # SIGTERM, then SIGKILL, then the cgroup goes

A SuperNode (isolation "subprocess", Flower's default) starts `flower-superexec`, which starts one `flwr-clientapp`
process per message; both are looked up on PATH, so the device venv's bin/ goes first on the SuperNode's PATH and
the ClientApp runs with the device venv's Python (numpy + onnxruntime + flwr, no torch). Children inherit the
SuperNode's cgroup, so the profile's memory cap and CPU quota hold for the whole client stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from edge_ft.atomic import atomic_write_text
from edge_ft.emulation import lifetime
from edge_ft.emulation.emulate import Confinement, confine
from edge_ft.emulation.hostspeed import HostSpeed
from edge_ft.emulation.profiles import DeviceProfile
from edge_ft.fleet.certs import NodeKey, TlsFiles

# Offline devices: no telemetry, no update check (both would try the network at every start).
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              # a SuperExec asks its SuperNode for work every second by default; a message should not wait that long
              "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}
RUN_MARK = "EDGE_FT_FLEET_RUN"  # set in every process of a federation: how cleanup checks find strays
ROLES = ("supernode", "superexec", "clientapp")  # a node's processes, by their Flower command
PSS_EVERY = 5  # read PSS (a walk over smaps) every 5th sample (0.5 s); RSS every sample
STOP_GRACE = 5.0  # seconds a process gets after SIGTERM before SIGKILL
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RECEIVING = re.compile(r"Receiving: (\w+) message")
_SENDING = re.compile(r"Sending: (\w+) (?:message|reply)")


def plain(line: str) -> str:
    """A Flower log line without its colour codes and level prefix padding."""
    return _ANSI.sub("", line).rstrip()


def write_config(path: Path, config: dict) -> Path:
    """A flat config as a TOML file: Flower takes `--node-config FILE.toml` and `--run-config FILE.toml`, which
    keeps paths with spaces or quotes intact where `key=value` pairs would split them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
    return path


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a TOML basic string


def role_of(cmdline: list[str]) -> str | None:
    """supernode | superexec | clientapp | serverapp | superlink from a Flower process's command line."""
    text = " ".join(cmdline[:4])  # [python, -m, edge_ft.fleet.lean_entry, flwr-clientapp] names it 4th
    for marker, role in (("flower-supernode", "supernode"), ("flower-superexec", "superexec"),
                         ("flwr-clientapp", "clientapp"), ("flwr-serverapp", "serverapp"),
                         ("flower-superlink", "superlink")):
        if marker in text:
            return role
    return None


def flower_env(bin_dir: Path, run_dir: Path, flwr_home: Path, base: dict | None = None) -> dict[str, str]:
    """The environment of a Flower process: its venv's bin/ first on PATH (Flower starts its helpers by name)."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env[RUN_MARK] = str(run_dir)
    env.pop("PYTHONPATH", None)  # the venv's own packages, not the caller's
    return env


def stop_groups(procs: list[subprocess.Popen | None], grace: float = STOP_GRACE) -> None:
    """SIGTERM process groups (Flower shuts down cleanly on it), all at once; SIGKILL what is left after
    `grace` seconds."""
    procs = [p for p in procs if p is not None]
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group may outlive its leader
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            proc.wait(2)
        lifetime.unwatch(proc.pid)


def kill_pids(pids, run_dir: Path) -> None:
    """SIGKILL processes of this run that left their group (Flower starts the ServerApp's SuperExec in a session of
    its own). A pid is killed only while it still carries this run's mark: a recycled pid is someone else's."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(RUN_MARK) == str(run_dir):
                p.kill()


@dataclass
class NodeLife:
    """One start of a SuperNode (a killed node that rejoins has two)."""

    started: float  # time.monotonic() at start
    confinement: Confinement
    proc: subprocess.Popen
    log: Path
    ended: float | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    cgroup_peak_bytes: int | None = None


@dataclass
class SuperNode:
    """One emulated device: a flower-supernode (and everything it starts) confined to a device profile."""

    index: int
    profile: DeviceProfile
    node_config: dict  # --node-config (partition-id, num-partitions, data, bundle, ...)
    device_bin: Path  # the device venv's bin/ (flower-supernode, flower-superexec, flwr-clientapp)
    run_dir: Path
    flwr_home: Path
    tls: TlsFiles | None
    key: NodeKey | None  # SuperNode authentication key (None: auth off)
    host: HostSpeed
    mode: str = "auto"  # emulation mode (auto: cgroup, else rlimit)
    cpu_cap: bool = True  # False: memory/cores/threads of the device, CPU time of this machine
    isolation: str = "subprocess"  # Flower's: the SuperNode starts its SuperExec | "process": we start it beside
    shims: Path | None = None  # first on PATH: lean flower-superexec and flwr-clientapp (edge_ft.fleet.lean_entry)
    lives: list[NodeLife] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)  # every pid the node ever had (cleanup sweeps them)
    peak_rss: dict[str, int] = field(default_factory=dict)  # role -> highest RSS of one process
    peak_pss: dict[str, int] = field(default_factory=dict)  # role -> highest PSS of one process
    peak_total_rss: int = 0  # highest sum of RSS over the node's processes
    peak_total_pss: int = 0  # highest sum of PSS over the node's processes
    pss_by_round: dict[int, int] = field(default_factory=dict)  # server round -> highest sum of PSS in it
    events: list[tuple[float, str, int | None, str]] = field(default_factory=list)  # (time.time(), kind, round, type)
    _procs: dict[int, tuple[psutil.Process, str]] = field(default_factory=dict)
    server_round: int | None = None  # the round the ServerApp is in (from its stream): stamps the node's messages
    _ticks: int = 0
    _log_pos: int = 0

    @property
    def name(self) -> str:
        return f"node-{self.index:02d}"

    @property
    def current(self) -> NodeLife | None:
        return self.lives[-1] if self.lives else None

    def alive(self) -> bool:
        return self.current is not None and self.current.proc.poll() is None

    def argv(self, superlink: str, port: int) -> list[str]:
        argv = [str(self.device_bin / "flower-supernode"), "--superlink", superlink, "--port", str(port),
                "--isolation", self.isolation,
                "--node-config", str(write_config(self.run_dir / "configs" / f"{self.name}.toml", self.node_config))]
        argv += ["--root-certificates", str(self.tls.ca_cert)] if self.tls else ["--insecure"]
        if self.key is not None:
            argv += ["--auth-supernode-private-key", str(self.key.private)]
        return argv

    def start(self, superlink: str, port: int) -> None:
        """Start (or restart) the SuperNode inside a fresh confinement; its output goes to logs/node-NN[.k].log."""
        env = flower_env(self.device_bin, self.run_dir, self.flwr_home)
        if self.shims is not None:
            env["PATH"] = f"{self.shims}{os.pathsep}{env['PATH']}"
        conf = confine(self.profile, env, mode=self.mode, host=self.host, cpu_cap=self.cpu_cap)
        suffix = f".{len(self.lives)}" if self.lives else ""
        log = self.run_dir / "logs" / f"{self.name}{suffix}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log, "wb") as out:
                proc = subprocess.Popen(conf.command(self.argv(superlink, port)), env=conf.env, cwd=self.run_dir,
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)  # its own group: stop() ends all it started
        except BaseException:
            conf.remove()
            raise
        lifetime.watch(proc.pid)  # should the fleet die, its guardian ends the node (and removes its cgroups)
        self.lives.append(NodeLife(time.monotonic(), conf, proc, log))
        self._log_pos = 0
        self.seen.add(proc.pid)
        if self.isolation == "process":
            self._start_superexec(conf, port, log)

    def _start_superexec(self, conf: Confinement, port: int, log: Path) -> None:
        """Isolation "process": the SuperExec (which starts a ClientApp per message) is started beside the
        SuperNode, in the same cgroup, as a device's service manager would; it ends with the cgroup, the pid sweep
        of stop(), or by itself when the SuperNode is gone (--parent-pid)."""
        argv = [str((self.shims or self.device_bin) / "flower-superexec"), "--insecure", "--runtime-api-address",
                f"127.0.0.1:{port}", "--parent-pid", str(self.current.proc.pid)]
        with open(log.with_suffix(".superexec.log"), "wb") as out:
            proc = subprocess.Popen(conf.command(argv), env=conf.env, cwd=self.run_dir, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        lifetime.watch(proc.pid)
        self.seen.add(proc.pid)

    def new_run(self) -> None:
        """Measure the next `flwr run` on the same SuperNode from zero: peaks, per-round figures, messages."""
        self.peak_rss, self.peak_pss, self.pss_by_round, self.events = {}, {}, {}, []
        self.peak_total_rss = self.peak_total_pss = 0
        self.server_round = None
        for life in self.lives:  # what an ended life or the live cgroup reached so far belongs to the earlier runs
            life.cgroup_peak_bytes = None
        life = self.current
        if life is not None and life.ended is None and life.confinement.job is not None:
            life.confinement.job.reset_memory_peak()

    def pids(self) -> list[int]:
        life = self.current
        if life is None:
            return []
        if life.confinement.job is not None:
            return life.confinement.job.pids()
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(life.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        return []

    def sample(self) -> None:
        """One measurement tick: split new threads into their own CPU leaves, sum RSS (and PSS), read the log."""
        life = self.current
        if life is None:
            return
        if life.ended is None and life.proc.poll() is not None:
            self._ended(life)
        if life.confinement.job is not None and life.ended is None:
            life.confinement.job.split_threads()
        self._ticks += 1
        with_pss = self._ticks % PSS_EVERY == 0
        total_rss = total_pss = 0
        for pid in self.pids():
            self.seen.add(pid)
            try:
                p, role = self._procs.get(pid) or self._track(pid)
                if with_pss:
                    mem = p.memory_full_info()
                    total_pss += mem.pss
                    self.peak_pss[role] = max(self.peak_pss.get(role, 0), mem.pss)
                else:
                    mem = p.memory_info()
                total_rss += mem.rss
                self.peak_rss[role] = max(self.peak_rss.get(role, 0), mem.rss)
            except psutil.Error:
                self._procs.pop(pid, None)
        self.peak_total_rss = max(self.peak_total_rss, total_rss)
        self.peak_total_pss = max(self.peak_total_pss, total_pss)
        if with_pss and self.server_round is not None:
            self.pss_by_round[self.server_round] = max(self.pss_by_round.get(self.server_round, 0), total_pss)
        self._read_log(life)

    def _track(self, pid: int) -> tuple[psutil.Process, str]:
        p = psutil.Process(pid)
        cmd = p.cmdline()
        # enter.py is the node's first program for a moment before it execs flower-supernode
        role = role_of(cmd) or ("supernode" if "enter.py" in " ".join(cmd[:4]) else "other")
        if cmd:  # a process caught before exec has no command line yet: look again next tick
            self._procs[pid] = (p, role)
        return p, role

    def _read_log(self, life: NodeLife) -> None:
        """Timestamp the SuperNode's message lines as they appear: per round, when a message came and went."""
        with contextlib.suppress(OSError):
            with open(life.log, "rb") as f:
                f.seek(self._log_pos)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self._log_pos += end
            now = time.time()  # wall clock: comparable with the ServerApp's round starts (edge_ft.fleet.records)
            for raw in data[:end].decode("utf-8", "replace").splitlines():
                line = plain(raw)
                if m := _RECEIVING.search(line):
                    self.events.append((now, "receive", self.server_round, m.group(1)))
                elif m := _SENDING.search(line):
                    self.events.append((now, "send", self.server_round, m.group(1)))

    def _ended(self, life: NodeLife) -> None:
        life.ended = time.monotonic()
        life.exit_code = life.proc.returncode
        job = life.confinement.job
        if job is not None:
            life.oom_killed = job.oom_killed()
            life.cgroup_peak_bytes = job.memory_peak()

    def working_on(self, mtype: str = "train", nth: int = 1) -> bool:
        """The node took its `nth` `mtype` message of this run (or a later one) and has not answered it yet, as its
        log reads now."""
        life = self.current
        if life is None or life.ended is not None:
            return False
        self._read_log(life)
        kinds = [kind for _, kind, _, m in self.events if m == mtype]
        return kinds.count("receive") >= nth and kinds[-1] == "receive"

    def kill(self) -> None:
        """SIGKILL the whole node at once (SuperNode, SuperExec, ClientApp): a device that lost power."""
        life = self.current
        if life is None:
            return
        with contextlib.suppress(OSError):
            os.killpg(life.proc.pid, signal.SIGKILL)
        lifetime.unwatch(life.proc.pid)
        if life.confinement.job is not None:
            life.confinement.job.kill()
        kill_pids(self.seen, self.run_dir)
        with contextlib.suppress(subprocess.TimeoutExpired):
            life.proc.wait(5)
        self._finish(life)

    def stop(self) -> None:
        """After stop_groups() signalled it: kill what is left in the cgroup, sweep strays, remove the cgroup."""
        life = self.current
        if life is None:
            return
        if life.confinement.job is not None:
            life.confinement.job.kill()
        kill_pids(self.seen, self.run_dir)
        self._finish(life)

    def _finish(self, life: NodeLife) -> None:
        if life.ended is None:
            self._read_log(life)
            self._ended(life)
        life.confinement.remove()

    def round_seconds(self, round_starts: list[tuple[float, int]] | None = None) -> dict[int, float]:
        """Wall time of the node's train message per round: from its arrival to the reply (ClientApp start,
        imports, training and the upload, as the device sees it). A message belongs to the last round the ServerApp
        started before it arrived (round_starts: (time.time(), round)); without those, to the round of the
        ServerApp's streamed log line, which can arrive after the message did."""
        starts = sorted(round_starts or [])
        out: dict[int, float] = {}
        arrived: tuple[float, int | None] | None = None
        for t, kind, rnd, mtype in self.events:
            if mtype != "train":
                continue
            if kind == "receive":  # a node answers one message before it takes the next; a killed one never does
                before = [r for start, r in starts if start <= t]
                arrived = (t, before[-1] if before else (None if starts else rnd))
            elif arrived is not None:
                if arrived[1] is not None:
                    out[arrived[1]] = round(t - arrived[0], 3)
                arrived = None
        return out

    def received(self, mtype: str = "train") -> list[tuple[float, int | None]]:
        return [(t, rnd) for t, kind, rnd, m in self.events if kind == "receive" and m == mtype]
