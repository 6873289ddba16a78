"""The plans the deployment tests run: the real fine-tuning app (`fleet_plan`, LoRA on ort-step, a few steps a
round) for the federation whose result is checked, and the numpy-only smoke app (tests/fleet_smoke_app, `PLAN`) for
the fault and cleanup cases, where only Flower's processes matter and a ClientApp that starts in a second keeps
them short.
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


def fleet_plan(out_dir: Path, num_nodes: int, rounds: int, base: Path):
    """edge-ft's own Flower App: LoRA (FFA) on ort-step, 3 local steps of 16 examples a round, digits by writer."""
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    return plan_fleet(out_dir, PlanConfig("lora", task="mnist-digits", num_nodes=num_nodes, partitioning="writers",
                                          rounds=rounds, local_steps=3, batch=16, aggregation="ffa", seed=0,
                                          base=base, threads=1))
