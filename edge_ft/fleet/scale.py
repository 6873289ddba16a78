"""The scale table: simulated fleets of several sizes × methods × partitionings, each run to a round cap, summarised
into one results file (edge_ft.fleet.scale_record).

    results = run_scale(Path("runs/fleet-scale"), ScaleConfig(), command="edge-ft fleet scale")

Every cell is `edge-ft fleet simulate` (edge_ft.fleet.plan + edge_ft.fleet.simulate: the fleet's own ServerApp and
ClientApp under Flower's Simulation Engine) with the same settings but devices, method and partitioning. The base is
pretrained once (unless given) and each method's bundle exported once (PlanConfig.bundle_cache). A fixed number of
online devices is sampled per round (seeded), so cells of 10 and 1,000 devices do the same host work per round. The
results file is rewritten after each cell: a run that is stopped keeps its finished cells, and running the command
again with the same settings runs only the missing ones.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from typing import Any

from edge_ft.errors import UserError
from edge_ft.fleet.devices import DEFAULT_MIX, LINK_MBPS, board_cost, deal_boards
from edge_ft.fleet.records import read_rounds
from edge_ft.fleet.scale_record import (
    SCALE_FILE,
    SCALE_FORMAT,
    ScaleCell,
    ScaleResults,
    ScaleSettings,
    load_scale,
    save_scale,
)
from edge_ft.fleet.sim_report import sim_seconds

METHODS = {"lora": ("lora", "fedavg"), "ffa": ("lora", "ffa"), "probe": ("probe", "fedavg"), "full": ("full", "fedavg")}
PARTITIONINGS = ("writers", "dirichlet:0.1", "dirichlet:1")
DEVICES = (10, 100, 1000)


@dataclass(frozen=True)
class ScaleConfig:
    """The table's axes and the settings every cell shares."""

    devices: tuple[int, ...] = DEVICES  # fleet sizes
    methods: tuple[str, ...] = tuple(METHODS)  # lora | ffa | probe | full
    partitionings: tuple[str, ...] = PARTITIONINGS  # edge_ft.fleet.partitions schemes
    settings: ScaleSettings = ScaleSettings(
        task="mnist-digits", target_accuracy=0.9, max_rounds=25, clients_per_round=20, local_steps=5, batch=16,
        rank=2, fleet_mix=DEFAULT_MIX, availability="diurnal:0.3-0.9", deadline=0.0, stragglers="drop",
        link_mbps=LINK_MBPS, seed=0)
    base: Path | None = None  # pretrained base (None: pretrained once in OUT/prep)
    cpus_per_client: float = 1.0  # Ray CPUs per virtual ClientApp


def cell_name(devices: int, method: str, partitioning: str) -> str:
    return f"{devices}-{method}-{partitioning.replace(':', '')}"


def summarise(devices: int, method: str, partitioning: str, rounds: list[dict[str, Any]], target: float,
              fleet_fits: float, plan_seconds: float, machine: dict[str, Any]) -> ScaleCell:
    """One cell from a run's round records (round 0 first) and its simulation.json."""
    accuracy = [float(r["accuracy"]) for r in rounds]
    cumulative = [round(s, 3) for s in sim_seconds(rounds)]
    reached = next((r["round"] for r in rounds[1:] if r["accuracy"] >= target), None)
    through = rounds[: (reached if reached is not None else len(rounds) - 1) + 1]
    trained = rounds[1:]
    return ScaleCell(
        devices=devices, method=method, partitioning=partitioning, rounds_run=len(trained), rounds_to_target=reached,
        bytes=sum(int(r["bytes_down"]) + int(r["bytes_up"]) for r in through),
        sim_seconds=cumulative[len(through) - 1], accuracy=accuracy, sim_seconds_cumulative=cumulative,
        fleet_fits=fleet_fits, sampled=sum(int(r.get("sampled", 0)) for r in trained),
        returned=sum(len(r["clients"]) for r in trained), dropped=sum(len(r.get("dropped", [])) for r in trained),
        did_not_fit=sum(len(r.get("did_not_fit", [])) for r in trained), plan_seconds=round(plan_seconds, 1),
        wall_seconds=float(machine["wall_seconds"]), peak_memory_mb=float(machine["peak_memory_mb"]),
        peak_memory_mb_per_device=float(machine["peak_memory_mb_per_device"]))


def fleet_fits(s: ScaleSettings, method: str, devices: int, num_classes: int) -> float:
    """Share of the fleet's devices whose board has the memory to train `method` at the batch."""
    kind, aggregation = METHODS[method]
    boards = deal_boards(s.fleet_mix, devices, s.seed)
    fits = [board_cost(b, kind, s.batch, s.rank, num_classes, aggregation == "ffa").fits for b in boards]
    return round(sum(fits) / devices, 4)


def run_cell(out: Path, cfg: ScaleConfig, base: Path, devices: int, method: str, partitioning: str) -> ScaleCell:
    from edge_ft.data.tasks import get_task
    from edge_ft.fleet.plan import PlanConfig, plan_fleet
    from edge_ft.fleet.simulate import SimulationConfig, simulate

    s = cfg.settings
    kind, aggregation = METHODS[method]
    t0 = time.monotonic()
    plan = plan_fleet(out / "cells" / cell_name(devices, method, partitioning), PlanConfig(
        kind, task=s.task, num_nodes=devices, partitioning=partitioning, rounds=s.max_rounds,
        local_steps=s.local_steps, aggregation=aggregation, seed=s.seed, batch=s.batch, rank=s.rank, base=base,
        clients_per_round=s.clients_per_round, min_train_nodes=1, min_available_nodes=1,
        round_timeout=24 * 3600.0, threads=1, fleet_mix=s.fleet_mix, availability=s.availability,
        deadline=s.deadline, stragglers=s.stragglers, link_mbps=s.link_mbps, simulation=True,
        bundle_cache=out / "bundles"))
    plan_seconds = time.monotonic() - t0
    machine = simulate(plan, SimulationConfig(cpus_per_client=cfg.cpus_per_client))
    num_classes = len(get_task(s.task).classes)
    return summarise(devices, method, partitioning, read_rounds(plan.results_dir), s.target_accuracy,
                     fleet_fits(s, method, devices, num_classes), plan_seconds, machine)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("edge-ft", "flwr", "ray", "onnxruntime", "onnxruntime-training", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def _machine() -> dict[str, Any]:
    import psutil

    from edge_ft.bench.speed import machine

    return {"cpus": os.cpu_count(), "processor": machine(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "system": platform.platform(),
            "load_average_at_end": [round(v, 2) for v in os.getloadavg()]}


def _earlier_cells(path: Path, s: ScaleSettings) -> list[ScaleCell]:
    """The cells of an earlier run of the same settings in `path` (none when it has other settings or none)."""
    if not path.is_file():
        return []
    earlier = load_scale(path)
    if earlier.settings != s:
        raise UserError(f"{path}: holds a table of other settings; choose another --out or delete it")
    return earlier.cells


def run_scale(out: Path, cfg: ScaleConfig, command: str,
              on_cell: Callable[[ScaleCell], None] | None = None) -> ScaleResults:
    """Every missing cell of the table, in order of fleet size; the results file (OUT/fleet-scale.json) is
    rewritten after each. on_cell(cell) is called as each finishes."""
    from edge_ft.host.train import ensure_base

    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    out = Path(out).resolve()
    path = out / SCALE_FILE
    cells = _earlier_cells(path, cfg.settings)
    done = {(c.devices, c.method, c.partitioning) for c in cells}
    base, _ = ensure_base(out, cfg.base, None, quiet=True)
    results = None
    for devices, method, partitioning in product(cfg.devices, cfg.methods, cfg.partitionings):
        if (devices, method, partitioning) in done:
            continue
        cell = run_cell(out, cfg, base, devices, method, partitioning)
        cells.append(cell)
        results = ScaleResults(SCALE_FORMAT, datetime.now(timezone.utc).isoformat(timespec="seconds"), _machine(),
                               _versions(), command, cfg.settings, list(cells))
        save_scale(path, results)
        if on_cell is not None:
            on_cell(cell)
    return results or load_scale(path)
