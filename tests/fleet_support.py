"""The plan the deployment tests run: a stand-in FleetPlan around the numpy-only smoke app (tests/fleet_smoke_app).

Switching the tests to the real fine-tuning app is one line: PLAN = the function that calls
edge_ft.fleet.plan.plan_fleet with the same (out_dir, num_nodes, rounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SMOKE_APP = Path(__file__).resolve().parent / "fleet_smoke_app"


@dataclass(frozen=True)
class SmokePlan:
    app_dir: Path  # the Flower App folder `flwr run` points at
    run_config: dict  # `flwr run --run-config`
    node_configs: list[dict]  # one `--node-config` per SuperNode
    results_dir: Path  # where the run's files go


def smoke_plan(out_dir: Path, num_nodes: int, rounds: int) -> SmokePlan:
    out_dir.mkdir(parents=True, exist_ok=True)
    return SmokePlan(SMOKE_APP, {"num-server-rounds": rounds, "min-nodes": num_nodes},
                     [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)], out_dir)


PLAN = smoke_plan
