"""The scale table's results file (`edge-ft fleet scale`, edge_ft.fleet.scale): its record types, defined once.

    results = load_scale(path)        # a ScaleResults, every field checked against the types below
    save_scale(path, results)         # atomically, as JSON

One ScaleCell per (devices, method, partitioning): how many rounds the fleet needed to reach the target accuracy
(None: not reached within the rounds run), the bytes and simulated fleet time through that round, how much of the
fleet could take part, and what the simulation cost this machine.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from edge_ft.atomic import atomic_write_json
from edge_ft.errors import UserError

SCALE_FORMAT = "edge-ft-fleet-scale/1"
SCALE_FILE = "fleet-scale.json"


@dataclass(frozen=True)
class ScaleSettings:
    """What every cell shares."""

    task: str  # transfer task (edge_ft.data.tasks)
    target_accuracy: float  # global test accuracy a cell must reach
    max_rounds: int  # rounds run per cell: "not reached" means not within these
    clients_per_round: int  # online devices sampled per round (fewer when fewer are online)
    local_steps: int  # optimizer steps per device per round
    batch: int  # examples per step
    rank: int  # LoRA rank (lora and ffa)
    fleet_mix: str  # boards by share (edge_ft.fleet.devices)
    availability: str  # availability trace
    deadline: float  # simulated seconds a round waits for a device (0: none)
    stragglers: str  # drop | partial
    link_mbps: float  # devices' link speed
    seed: int  # partitions, boards, availability, sampling, batch order


@dataclass(frozen=True)
class ScaleCell:
    """One simulated fleet run."""

    devices: int  # devices in the fleet
    method: str  # lora (FedAvg) | ffa (FFA-LoRA) | probe | full
    partitioning: str  # writers | dirichlet:ALPHA | ... (edge_ft.fleet.partitions)
    rounds_run: int  # federated rounds run
    rounds_to_target: int | None  # first round whose global accuracy reached the target (None: not reached)
    bytes: int  # bytes down + up through rounds_to_target (all rounds run when not reached)
    sim_seconds: float  # simulated fleet seconds through rounds_to_target (all rounds run when not reached)
    accuracy: list[float]  # global test accuracy after each round, round 0 (the start) first
    sim_seconds_cumulative: list[float]  # simulated fleet seconds after each round, round 0 first
    fleet_fits: float  # share of the fleet's devices whose board has the memory for the method
    sampled: int  # device-rounds sampled, all rounds
    returned: int  # device-rounds whose update was averaged
    dropped: int  # device-rounds past the deadline
    did_not_fit: int  # device-rounds sampled on a board without the memory (never sent the model)
    plan_seconds: float  # this machine: planning the run (partitions, data files, node configs, bundle install)
    wall_seconds: float  # this machine: the simulation (Ray start to finish)
    peak_memory_mb: float  # this machine: peak summed PSS of the simulation's processes, MiB
    peak_memory_mb_per_device: float  # peak_memory_mb / devices


@dataclass(frozen=True)
class ScaleResults:
    format: str  # SCALE_FORMAT
    date: str  # when the table was finished (UTC, ISO 8601)
    machine: dict[str, Any]  # cpus, processor, memory
    versions: dict[str, str]  # edge-ft, flwr, ray, onnxruntime, python
    command: str  # what produced it
    settings: ScaleSettings
    cells: list[ScaleCell]


def _check(value: Any, kind: Any, where: str) -> Any:
    """value as `kind` (a type hint of the records above), or a UserError naming `where`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check(value, next(a for a in args if a is not type(None)), where)
    if isinstance(kind, type) and is_dataclass(kind):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected an object")
        hints = typing.get_type_hints(kind)
        names = [f.name for f in fields(kind)]
        if set(value) != set(names):
            raise UserError(f"{where}: keys {sorted(set(value) ^ set(names))} differ from the {kind.__name__} record")
        return kind(**{n: _check(value[n], hints[n], f"{where}.{n}") for n in names})
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected an object")
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def load_scale(path: str | Path) -> ScaleResults:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no readable scale results ({e})") from None
    results: ScaleResults = _check(data, ScaleResults, str(path))
    if results.format != SCALE_FORMAT:
        raise UserError(f"{path}: format {results.format!r}, expected {SCALE_FORMAT!r}")
    return results


def save_scale(path: str | Path, results: ScaleResults) -> None:
    atomic_write_json(path, asdict(results))
