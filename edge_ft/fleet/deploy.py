"""Run a federation on this machine: one SuperLink, N SuperNodes each confined to a device profile, one `flwr run`.

    result = run_federation(plan, ["rpi-zero-2w"] * 4 + ["rpi-4b-2gb"] * 2)   # DeployConfig(): TLS, node auth

plan is a FleetPlan (edge_ft.fleet.plan): app_dir (the Flower App), run_config (`flwr run --run-config`),
node_configs (one --node-config per SuperNode) and results_dir. What runs, with Flower 1.42's CLI:

  flower-superlink --host 127.0.0.1 --port P --ssl-ca-certfile ca.pem --ssl-certfile server.pem
                   --ssl-keyfile server.key --enable-supernode-auth --disable-runtime-dependency-installation
  flwr supernode register keys/node-NN.pub fleet            (every node's public key, before it starts)
  flower-supernode --superlink 127.0.0.1:P --port Q --isolation subprocess --node-config "partition-id=0 ..."
                   --root-certificates ca.pem --auth-supernode-private-key keys/node-NN
  flwr run APP_DIR fleet --stream --run-config "..."        (connection `fleet` in $FLWR_HOME/config.toml)

The SuperLink, its ServerApp and the flwr CLI run from this (host) venv; SuperNodes and their ClientApps from the
device venv. Everything lives in RUN_DIR (certificates, keys, FLWR_HOME, logs, federation.json); nothing is left
running, also on Ctrl-C or SIGTERM: each process has its own group, a finally block ends them all and removes the
cgroups.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edge_ft.atomic import atomic_write_json, atomic_write_text, ensure_dir
from edge_ft.emulation import lifetime
from edge_ft.emulation.hostspeed import HostSpeed
from edge_ft.emulation.profiles import load_profile
from edge_ft.errors import UserError
from edge_ft.fleet.certs import make_node_key, make_tls
from edge_ft.fleet.lean_entry import write_shims
from edge_ft.fleet.measure import RESULT_FILE, FederationResult, node_result
from edge_ft.fleet.processes import SuperNode, flower_env, kill_pids, plain, stop_groups, toml_value, write_config
from edge_ft.fleet.records import round_starts
from edge_ft.fleet.shared_runs import Plan, install_bundle, shared_node_configs
from edge_ft.interpreters import find_device_python

CONNECTION = "fleet"  # the SuperLink connection's name in $FLWR_HOME/config.toml
DEVICE_BUNDLE = "device-bundle"  # where a shared federation's devices find the bundle of the current run
SAMPLE_SECONDS = 0.1  # memory sampling tick
LINK_EVERY = 10  # look for the SuperLink's new descendants every 10th tick: they live for a whole run
START_TIMEOUT = 120.0  # seconds the SuperLink may take to listen (under a loaded machine)
_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")
# FedAvg's line per phase; under SecAgg+ the legacy workflow's ("aggregate_fit: received ..."), a train phase
_AGGREGATED = re.compile(r"aggregate_(train|evaluate|fit): [Rr]eceived (\d+) results and (\d+) failures")


@dataclass(frozen=True)
class Fault:
    """Kill a node mid-round, let the round finish with the others, restart the node once it has."""

    node: int  # index of the node to kill
    round: int  # the round whose train message it dies in (its n-th train message; every node trains each round)
    rejoin: bool = True  # restart its SuperNode (same key) once that round's training is aggregated
    message: int = 0  # > 0: die in its message-th train message of the run instead (SecAgg+ sends four a round:
    #                   setup, key shares, masked vector, unmasking; 3 = after sharing its keys in round 1)


@dataclass(frozen=True)
class DeployConfig:
    """How run_fleet runs plans on this machine."""

    tls: bool = True  # TLS between the SuperNodes and the SuperLink
    auth: bool = True  # SuperNode authentication: registered node keys only (needs TLS)
    run_dir: Path | None = None  # certificates, keys, FLWR_HOME, logs, federation.json (None: first plan's ../deploy)
    fault: Fault | None = None  # kill one node mid-round in the first run and restart it (runtime tests)
    host: HostSpeed | None = None  # this machine's core speed for the CPU quotas (None: the reference core)
    device_python: str | None = None  # the device venv's interpreter (None: .venv-device/bin/python when present)
    mode: str = "auto"  # how profiles are imposed: auto | cgroup | rlimit
    cpu_cap: bool = True  # False: devices' memory and cores, this machine's CPU speed
    isolation: str = "subprocess"  # how ClientApps start: subprocess (by the SuperNode) | process (beside it)
    lean: bool = True  # SuperExec and ClientApps through edge_ft.fleet.lean_entry, not Flower's console scripts
    progress: bool = True  # a progress bar over rounds
    echo: Callable[[str], None] | None = None  # receives the readable lines of the runs (rounds, aggregation)


ACTIVATED = b"[Fleet.ActivateNode] Activated node_id"  # the SuperLink's log line for each SuperNode it accepts


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what} exited with code {proc.returncode} before listening; see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise UserError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; see {log}")


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None) -> None:
    """$FLWR_HOME/config.toml with one SuperLink connection, the one `flwr run` and `flwr supernode` use."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    lines.append(f"root-certificates = {toml_value(str(ca_cert))}" if ca_cert else "insecure = true")
    flwr_home.mkdir(parents=True, exist_ok=True)
    atomic_write_text(flwr_home / "config.toml", "\n".join(lines) + "\n")


def sigterm_as_interrupt():
    """SIGTERM and SIGHUP (and SIGINT) raise KeyboardInterrupt in the main thread, so the finally blocks that end
    processes run (edge_ft.emulation.lifetime; the CLI has this in place already)."""
    return lifetime.cancellable()


class Federation:
    """The processes of one run and the bookkeeping around them; run_federation drives it."""

    def __init__(self, plan: Plan, profiles: list[str], run_dir: Path, *, tls: bool, auth: bool, host: HostSpeed,
                 device_bin: Path, mode: str, cpu_cap: bool, isolation: str = "subprocess", lean: bool = True,
                 node_configs: list[dict] | None = None):
        if auth and not tls:
            raise UserError("SuperNode authentication needs TLS (Flower refuses node keys over plain HTTP)")
        node_configs = plan.node_configs if node_configs is None else node_configs
        if len(profiles) != len(node_configs):
            raise UserError(f"{len(profiles)} device profiles for {len(node_configs)} nodes in the plan")
        self.plan, self.run_dir, self.auth = plan, run_dir, auth
        self.host_bin = Path(sys.executable).parent
        self.flwr_home = run_dir / "flwr-home"
        self.tls = make_tls(run_dir / "certs") if tls else None
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        write_connection(self.flwr_home, self.address, self.tls.ca_cert if self.tls else None)
        self.env = flower_env(self.host_bin, run_dir, self.flwr_home)
        shims = write_shims(run_dir / "bin", device_bin / "python") if lean else None
        self.nodes = [SuperNode(i, load_profile(p), dict(cfg), device_bin, run_dir, self.flwr_home, self.tls,
                                make_node_key(run_dir / "keys", i) if auth else None, host, mode, cpu_cap, isolation,
                                shims)
                      for i, (p, cfg) in enumerate(zip(profiles, node_configs))]
        self.link: subprocess.Popen | None = None
        self.runner: subprocess.Popen | None = None
        self.link_log = run_dir / "logs" / "superlink.log"
        self.run_log = run_dir / "logs" / "run.log"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sampler = threading.Thread(target=self._sample_loop, daemon=True)
        self._link_pids: set[int] = set()

    def start_superlink(self) -> None:
        argv = [str(self.host_bin / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--isolation", "subprocess", "--disable-runtime-dependency-installation"]
        if self.tls:
            argv += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                     "--ssl-keyfile", str(self.tls.server_key)]
        else:
            argv.append("--insecure")
        if self.auth:
            argv.append("--enable-supernode-auth")
        self.link_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.link_log, "wb") as out:
            self.link = subprocess.Popen(lifetime.guarded(argv), env=self.env, cwd=self.run_dir, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        lifetime.watch(self.link.pid)
        wait_listening(self.port, self.link, START_TIMEOUT, "flower-superlink", self.link_log)
        self._sampler.start()

    def register(self, public_key: Path) -> str:
        """`flwr supernode register KEY.pub fleet`; returns its output (the node id Flower assigned)."""
        proc = subprocess.run([str(self.host_bin / "flwr"), "supernode", "register", str(public_key), CONNECTION],
                              env=self.env, cwd=self.run_dir, capture_output=True, text=True, timeout=120)
        out = plain(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise UserError(f"registering {public_key.name} failed: {out.strip().splitlines()[-1:] or proc.returncode}")
        return out

    def start_nodes(self) -> None:
        keys = [node.key.public for node in self.nodes if node.key is not None]
        with ThreadPoolExecutor(max_workers=len(keys) or 1) as pool:  # each `flwr` call mostly imports: overlap them
            list(pool.map(self.register, keys))
        for node in self.nodes:
            with self._lock:
                node.start(self.address, free_port())
        self._wait_activated(len(self.nodes))

    def _wait_activated(self, count: int) -> None:
        """Until the SuperLink has activated `count` SuperNodes (or START_TIMEOUT passed: the rounds' quorum then
        decides), so that round 1 samples every device rather than those that happened to connect first."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.link.poll() is None:
            with contextlib.suppress(OSError):
                if self.link_log.read_bytes().count(ACTIVATED) >= count:
                    return
            time.sleep(0.1)

    def run(self, on_line: Callable[[str], None], plan: Plan | None = None, name: str = "run") -> int:
        """`flwr run APP_DIR fleet --stream` of `plan` (default: the federation's): its output, one plain line at a
        time, to on_line, and into logs/NAME.log; its exit code."""
        plan = plan or self.plan
        self.run_log = self.run_dir / "logs" / f"{name}.log"
        argv = [str(self.host_bin / "flwr"), "run", str(plan.app_dir), CONNECTION, "--stream"]
        if plan.run_config:
            argv += ["--run-config", str(write_config(self.run_dir / "configs" / f"{name}_config.toml",
                                                       plan.run_config))]
        t0 = time.monotonic()
        with open(self.run_log, "w") as log:
            self.runner = subprocess.Popen(lifetime.guarded(argv), env=self.env, cwd=self.run_dir,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           text=True, start_new_session=True)
            lifetime.watch(self.runner.pid)
            for raw in self.runner.stdout:
                line = plain(raw)
                log.write(f"{time.monotonic() - t0:7.1f}s {line}\n")
                log.flush()
                on_line(line)
            return self.runner.wait()

    def _sample_loop(self) -> None:
        for tick in itertools.count():
            if self._stop.wait(SAMPLE_SECONDS):
                return
            with self._lock:
                for node in self.nodes:
                    node.sample()
                if tick % LINK_EVERY == 0:
                    self._watch_link()

    def _watch_link(self) -> None:
        """Remember the SuperLink's descendants: its ServerApp SuperExec runs in a session of its own."""
        import psutil

        with contextlib.suppress(psutil.Error):
            self._link_pids.update(c.pid for c in psutil.Process(self.link.pid).children(recursive=True))

    def shutdown(self) -> None:
        """End everything this run started, whatever state it is in; remove every cgroup."""
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join(5)
        if self.link is not None:
            self._watch_link()
        stop_groups([self.runner] + [n.current.proc if n.current else None for n in self.nodes] + [self.link])
        for node in self.nodes:
            node.stop()
        kill_pids(self._link_pids, self.run_dir)


def run_federation(plan: Plan, node_profiles: list[str], cfg: DeployConfig | None = None) -> FederationResult:
    """Run `plan` on emulated devices (one profile name per node) and measure every node."""
    return run_fleet([plan], node_profiles, cfg)[0]


def run_fleet(plans: list[Plan], node_profiles: list[str], cfg: DeployConfig | None = None) -> list[FederationResult]:
    """Run the plans one after another on one SuperLink and one set of SuperNodes, started once; measure every node
    in every run. Never leaves a process. Returns one result per run that started (a failed run ends the series).
    With several plans each run's federation.json goes to its plan's results_dir/../deploy and the devices install
    each run's bundle before it (DEVICE_BUNDLE, edge_ft.fleet.shared_runs)."""
    cfg = cfg or DeployConfig()
    tls, auth, fault = cfg.tls, cfg.auth, cfg.fault
    run_dir = ensure_dir(cfg.run_dir or Path(plans[0].results_dir).parent / "deploy").resolve()
    host = cfg.host or HostSpeed.reference()
    device_bin = Path(find_device_python(cfg.device_python)).parent
    for tool in ("flower-supernode", "flower-superexec", "flwr-clientapp"):
        if not (device_bin / tool).exists():
            raise UserError(f"{device_bin}/{tool} not found: the device venv needs the fleet extra "
                            "(flwr; `make device-venv`)")
    several = len(plans) > 1
    fed = Federation(plans[0], node_profiles, run_dir, tls=tls, auth=auth, host=host, device_bin=device_bin,
                     mode=cfg.mode, cpu_cap=cfg.cpu_cap, isolation=cfg.isolation, lean=cfg.lean,
                     node_configs=shared_node_configs(plans, run_dir / DEVICE_BUNDLE) if several else None)
    results: list[FederationResult] = []
    t0 = started = time.monotonic()
    try:
        with sigterm_as_interrupt():
            fed.start_superlink()
            fed.start_nodes()
            startup = round(time.monotonic() - t0, 3)
            for i, plan in enumerate(plans):
                result = FederationResult("failed", str(run_dir), tls, auth, startup_seconds=0.0 if i else startup)
                results.append(result)
                if i:
                    with fed._lock:  # the sampler thread writes the nodes' figures
                        _record(results[-2], fed, plans[i - 1], several, started)
                        for node in fed.nodes:
                            node.new_run()
                    started = time.monotonic()
                if several:
                    install_bundle(Path(plan.run_config["bundle"]), run_dir / DEVICE_BUNDLE)
                watcher = _Progress(fed, result, fault if i == 0 else None, cfg.progress, cfg.echo)
                try:
                    name = f"run-{Path(plan.results_dir).parent.name}" if several else "run"
                    code = fed.run(watcher.line, plan, name)
                finally:
                    watcher.close()
                result.flwr_exit_code = code
                result.status = "ok" if code == 0 and watcher.finished else "failed"
                if result.status != "ok":
                    result.message = f"flwr run exited with code {code}; see {fed.run_log}"
                    break
    except KeyboardInterrupt:
        if results:
            results[-1].status, results[-1].message = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
        raise
    finally:
        fed.shutdown()
        if results:
            _record(results[-1], fed, plans[len(results) - 1], several, started)
    return results


def _record(result: FederationResult, fed: Federation, plan: Plan, several: bool, started: float) -> None:
    """Close one run's measurement and write its federation.json."""
    result.wall_seconds = round(time.monotonic() - started, 3)
    starts = round_starts(Path(plan.results_dir))
    result.nodes = [node_result(n, starts) for n in fed.nodes]
    where = ensure_dir(Path(plan.results_dir).parent / "deploy") if several else fed.run_dir
    with contextlib.suppress(UserError):
        atomic_write_json(where / RESULT_FILE, result.to_dict())


class _Progress:
    """Reads the streamed run: a progress bar over rounds, readable lines to `echo`, and the fault hook."""

    def __init__(self, fed: Federation, result: FederationResult, fault: Fault | None, progress: bool,
                 echo: Callable[[str], None] | None):
        self.fed, self.result, self.fault, self.echo = fed, result, fault, echo
        self.round, self.finished, self.bar = 0, False, None
        self.progress = progress
        self._killer: threading.Thread | None = None
        if fault is not None:  # watching from the start: the streamed [ROUND n/N] line can come after the message
            self._killer = threading.Thread(target=self._kill_when_busy, daemon=True)
            self._killer.start()

    def line(self, text: str) -> None:
        if m := _ROUND.search(text):
            self.round, total = int(m.group(1)), int(m.group(2))
            for node in self.fed.nodes:
                node.server_round = self.round
            self._bar(total)
        elif m := _AGGREGATED.search(text):
            phase, ok, failed = m.group(1).replace("fit", "train"), int(m.group(2)), int(m.group(3))
            self.result.rounds.setdefault(self.round, {})[phase] = [ok, failed]
            if phase == "train" and self.bar is not None:  # the app evaluates on the server: train ends a round
                self.bar.update(1)
            if self.fault and self.fault.rejoin and phase == "train" and self.round == self.fault.round:
                self._rejoin()
        elif "Strategy execution finished" in text:
            self.finished = True
        else:
            return
        if self.echo:
            self.echo(text.split(":", 1)[-1].strip() if ":" in text else text)

    def _bar(self, total: int) -> None:
        if self.bar is None and self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="round", dynamic_ncols=True, file=sys.stderr, desc="federation")

    def _kill_when_busy(self) -> None:
        """SIGKILL the node while it works on its train message of the fault's round (taken, not yet answered):
        death mid-round. The node trains in every round (the federations faults are used with sample every node),
        so its n-th train message of the run is round n's."""
        assert self.fault is not None
        node = self.fed.nodes[self.fault.node]
        deadline = time.monotonic() + START_TIMEOUT * self.fault.round
        while time.monotonic() < deadline and not self.fed._stop.is_set():
            with self.fed._lock:
                if node.working_on("train", self.fault.message or self.fault.round):
                    node.kill()
                    return
            time.sleep(0.05)

    def _rejoin(self) -> None:
        if self._killer is not None:
            self._killer.join()
        with self.fed._lock:
            self.fed.nodes[self.fault.node].start(self.fed.address, free_port())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


