"""Several fleet runs on one federation (edge_ft.fleet.deploy.run_fleet with several plans): the devices keep their
data, trust one server key, and install each run's bundle before it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from edge_ft.atomic import replace_folder
from edge_ft.errors import UserError


class Plan(Protocol):
    """What run_fleet needs of a FleetPlan (edge_ft.fleet.plan)."""

    app_dir: Path
    run_config: dict
    node_configs: list[dict]
    results_dir: Path


def shared_node_configs(plans: list[Plan], device_bundle: Path) -> list[dict]:
    """The SuperNodes' configs when several plans share them: every plan must give each device the same data;
    the bundle is the one installed for the current run."""
    first = plans[0].node_configs
    for plan in plans[1:]:
        same = len(plan.node_configs) == len(first) and all(
            _same_data(a.get("data"), b.get("data")) for a, b in zip(first, plan.node_configs))
        if not same:
            raise UserError("runs that share one federation must give each device the same data: plan them with "
                            "the same task, partitioning, seed and number of nodes")
    for plan in plans[1:]:
        if plan.node_configs and plan.node_configs[0].get("server-key") and not _same_key(
                plan.node_configs[0]["server-key"], first[0].get("server-key")):
            raise UserError("runs that share one federation must be signed by one server key (the devices trust "
                            "one): plan them with the same signing_key")
    return [{**cfg, "bundle": str(device_bundle)} if "bundle" in cfg else dict(cfg) for cfg in first]


def _same_key(a: str, b: str | None) -> bool:
    from edge_ft.trust.keys import load_public_key

    return b is not None and load_public_key(a).raw == load_public_key(b).raw


def _same_data(a: str | None, b: str | None) -> bool:
    """The same examples and labels in two node data files (.npz; written apart, their bytes differ)."""
    import numpy as np

    from edge_ft.data.npz import load_npz

    if a is None or b is None or a == b:
        return a == b
    return all(np.array_equal(u, v) for u, v in zip(load_npz(a), load_npz(b)))


def install_bundle(bundle: Path, target: Path) -> None:
    """Install a run's bundle where the devices look for it, as a device would before a new fleet run."""
    import shutil

    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bundle, staging)
    replace_folder(staging, target)
