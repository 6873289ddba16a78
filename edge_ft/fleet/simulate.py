"""Many devices on this machine: edge-ft's own ServerApp and ClientApp under Flower's Simulation Engine.

    plan = plan_fleet(out, PlanConfig("lora", num_nodes=1000, partitioning="dirichlet:1", fleet_mix=DEFAULT_MIX,
                                      simulation=True, ...))
    result = simulate(plan, SimulationConfig())   # writes out/simulation.json

The apps are the objects the deployment runs (edge_ft.fleet.server_app.app, edge_ft.fleet.client_app.app), with the
same run config; only the runtime differs. Flower's Simulation Engine (flwr[simulation], Ray) registers one virtual
SuperNode per device and runs their ClientApps in a pool of Ray actors: cores / cpus_per_client of them at once, each
a long-lived worker process that serves one virtual device's message after another, so memory grows with the pool,
not with the number of devices. A virtual SuperNode knows only its partition id; the ClientApp reads that
partition's node config from the plan (run config "sim-nodes"). The devices' boards, availability, memory and
simulated time come from the run config's device model (edge_ft.fleet.devices), applied by the ServerApp.

simulation.json records this machine's side: wall seconds, the peak memory of this process and every process it
started (Ray's GCS, raylet, workers: the sum of their PSS, sampled), per simulated device, and the versions.
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_ft.atomic import atomic_write_json
from edge_ft.errors import UserError

RESULT = "simulation.json"
SAMPLE_SECONDS = 0.5  # memory sampling tick
MB = 1024 * 1024


@dataclass(frozen=True)
class SimulationConfig:
    """How the Simulation Engine runs on this machine."""

    cpus_per_client: float = 1.0  # Ray CPUs one virtual ClientApp takes: cpus / this ClientApps run at once
    cpus: int | None = None  # CPUs Ray may use (None: all of this machine's)
    object_store_mb: int = 256  # Ray's shared object store (messages in flight), MiB
    verbose: bool = False  # Flower's DEBUG log


class _PeakMemory:
    """Samples the summed PSS (RSS where PSS is unreadable) of this process and all its descendants."""

    def __init__(self):
        import psutil

        self.me, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        while not self.stop.wait(SAMPLE_SECONDS):
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    info = p.memory_full_info()
                    total += getattr(info, "pss", info.rss)
            self.peak = max(self.peak, total)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def _run(run_config: dict, app_dir: Path, num_nodes: int, cfg: SimulationConfig) -> None:
    """One Flower simulation of the fleet app with this run config (Flower's own run_simulation, which takes no run
    config, minus that: the Run carries it for the ClientApps, the ServerApp's Context for the ServerApp)."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from edge_ft.fleet import client_app, server_app

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    init = {"object_store_memory": cfg.object_store_mb * MB, "include_dashboard": False}
    if cfg.cpus:
        init["num_cpus"] = cfg.cpus
    backend = {"client_resources": {"num_cpus": cfg.cpus_per_client, "num_gpus": 0.0}, "init_args": init}
    _run_simulation(num_supernodes=num_nodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    client_app=client_app.app, server_app=server_app.app, backend_config=backend,
                    server_app_context=context, app_dir=str(app_dir), is_app=True, run=run,
                    verbose_logging=cfg.verbose)


def simulate(plan, cfg: SimulationConfig | None = None) -> dict:
    """Run a FleetPlan planned with simulation=True under the Simulation Engine; returns (and writes beside the
    results folder) this machine's measurement of it."""
    cfg = cfg or SimulationConfig()
    if not plan.run_config.get("sim-nodes"):
        raise UserError("the plan is not for the Simulation Engine: plan it with PlanConfig(simulation=True)")
    # Ray writes PYTHONPATH (this interpreter's whole sys.path), PYTHONBREAKPOINT and RAY_* into the calling
    # process's environment (some on import) for its workers; a caller that goes on to start other Pythons (a device
    # venv) must not inherit them, so the environment is put back as it was.
    saved = dict(os.environ)
    try:
        import ray
    except ImportError:
        raise UserError("Flower's Simulation Engine needs ray: pip install 'edge-ft[simulation]'") from None
    num_nodes = int(plan.run_config["num-nodes"])
    t0 = time.monotonic()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        with _PeakMemory() as memory:
            _run(plan.run_config, plan.app_dir, num_nodes, cfg)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
    import flwr

    results = Path(plan.results_dir)
    summary_path = results / "fleet.json"
    if not summary_path.is_file():
        raise UserError(f"the simulation ended without finishing the run (no {summary_path}); see the log above")
    wall = time.monotonic() - t0
    out = {"devices": num_nodes, "wall_seconds": round(wall, 1), "peak_memory_mb": round(memory.peak / MB, 1),
           "peak_memory_mb_per_device": round(memory.peak / MB / num_nodes, 3), "config": asdict(cfg),
           "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "versions": {"flwr": flwr.__version__, "ray": ray.__version__, "python": platform.python_version()}}
    atomic_write_json(results.parent / RESULT, out)
    return out
