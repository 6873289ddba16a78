"""What the fleet's ServerApp keeps in its results folder, and how a restarted server resumes from it.

  state/round-NNNN.safetensors  the global trainable tensors after round N
  server.json                   the commit point, written after the tensors: the run's identity, the last finished
                                round, the sha256 of its tensors file and every round's record so far
  rounds.jsonl                  the same round records, one JSON line each (what `edge-ft report` plots)
  adapter/                      the final global model in PEFT's layout (edge_ft.device.adapter), when done
  fleet.json                    the run's summary, written last: a folder with fleet.json is a finished run
A kill between the two writes of a round leaves server.json naming the previous round's tensors, still there.
A round record: {"round", "method", "aggregation", "partitioning", "accuracy", "clients": [{"node",
"partition", metrics...}], "rejected": [{"node", "reason"}], "bytes_down", "bytes_up" (totals of the round),
"lora_product_gap" (LoRA only, edge_ft.fleet.aggregate.product_gap), "seconds", "refused": [{"node", "reason"}]
(nodes that refused the server's signed message: never averaged), "canary" (edge_ft.fleet.canary, or null)}.
A simulated fleet's records (a run config with a fleet mix, edge_ft.fleet.devices) add "simulated" (the device
model: mix, availability, deadline, stragglers, link, each board's step seconds and memory fit) and per round
"fleet" (devices), "online", "sampled" (online devices sampled), "did_not_fit": [{"node", "board", "memory_mb",
"budget_mb"}] (sampled, never sent), "dropped": [{"node", "board", "reason"}] (past the deadline), "sim_seconds"
(simulated round time: the slowest kept device), and per client "board" and "sim-seconds".
The run's identity holds its name ("run-name"): what the server signs every round with, and what nodes remember
the last accepted round of. A fresh run gets a new name; a resumed run keeps its own.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from pathlib import Path

import numpy as np

from edge_ft.atomic import atomic_save_safetensors, atomic_write_json, atomic_write_text, remove_stale_temps
from edge_ft.checkpoint import load_safetensors, sha256_file
from edge_ft.errors import UserError

STATE, ROUNDS, SUMMARY, STATE_DIR, ADAPTER = "server.json", "rounds.jsonl", "fleet.json", "state", "adapter"
FORMAT = "edge-ft-fleet-server"


def state_file(results: Path, round_: int) -> Path:
    return results / STATE_DIR / f"round-{round_:04d}.safetensors"


def start(results: Path, identity: dict, resume: bool) -> tuple[int, list[dict], dict[str, np.ndarray] | None]:
    """(rounds done, their records, global tensors after them or None) for a server writing to `results`.

    Without `resume`, a folder holding an unfinished fleet run is refused (its rounds are never overwritten by
    accident) and a finished one is started over; with it, the run continues after its last committed round.
    """
    for folder in (results, results / STATE_DIR):
        remove_stale_temps(folder)
    path = results / STATE
    if not resume:
        if path.is_file() and not (results / SUMMARY).is_file():
            raise UserError(f"{results}: holds an unfinished fleet run ({STATE}); run with resume=true to continue "
                            "it, or choose another results folder")
        for stale in [path, results / ROUNDS, results / SUMMARY, *sorted((results / STATE_DIR).glob("round-*"))]:
            stale.unlink(missing_ok=True)
        return 0, [], None
    if not path.is_file():
        return 0, [], None
    try:
        saved = json.loads(path.read_text())
        if saved.get("format") != FORMAT or not isinstance(saved.get("rounds"), list):
            raise ValueError(f"format {saved.get('format')!r}")
        done, tensors_file, digest = int(saved["round"]), results / saved["state"], saved["state_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable fleet server state ({e}); start the run again without resume") from None
    for key, value in identity.items():
        if saved.get("identity", {}).get(key) != value:
            raise UserError(f"{path}: the run started with {key}={saved.get('identity', {}).get(key)!r}, this one "
                            f"has {value!r}; resume with the same plan or choose another results folder")
    if not tensors_file.is_file() or sha256_file(tensors_file) != digest:
        raise UserError(f"{tensors_file}: missing or does not match {path}; start the run again without resume")
    return done, saved["rounds"], load_safetensors(tensors_file)


def run_name(results: Path, resume: bool) -> str:
    """The name of the run in `results`: the committed one when resuming it, else a new one."""
    path = results / STATE
    if resume and path.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            name = json.loads(path.read_text()).get("identity", {}).get("run-name")
            if isinstance(name, str):
                return name
    return f"{results.resolve().parent.name}-{secrets.token_hex(6)}"


def commit_round(results: Path, identity: dict, round_: int, tensors: dict[str, np.ndarray],
                 rounds: list[dict]) -> None:
    """Tensors first, then server.json naming them, then rounds.jsonl; older tensor files are dropped last."""
    path = state_file(results, round_)
    atomic_save_safetensors(path, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                            metadata={"format": "edge-ft-fleet-global", "round": str(round_)})
    atomic_write_json(results / STATE, {"format": FORMAT, "format_version": 1, "identity": identity,
                                        "round": round_, "state": path.relative_to(results).as_posix(),
                                        "state_sha256": sha256_file(path), "rounds": rounds})
    atomic_write_text(results / ROUNDS, "".join(json.dumps(r) + "\n" for r in rounds))
    for old in (results / STATE_DIR).glob("round-*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)


def finish(results: Path, summary: dict) -> None:
    atomic_write_json(results / SUMMARY, summary)


def read_rounds(path: str | Path) -> list[dict]:
    """Round records of one run (a results folder or its rounds.jsonl)."""
    path = Path(path)
    path = path / ROUNDS if path.is_dir() else path
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable fleet rounds file ({e}); point at a fleet results folder") from None
    if not rows or not all(isinstance(r, dict) and {"round", "method", "accuracy"} <= set(r) for r in rows):
        raise UserError(f"{path}: holds no fleet round records")
    return rows


def is_fleet_records(path: str | Path) -> bool:
    """A fleet results folder or rounds file (as opposed to `edge-ft bench` results)."""
    path = Path(path)
    return (path / ROUNDS).is_file() if path.is_dir() else path.name == ROUNDS


def round_starts(results: str | Path) -> list[tuple[float, int]]:
    """(time.time() when the ServerApp started the round, round) for every round recorded in `results` so far;
    none for a run that recorded nothing (e.g. another app)."""
    if not is_fleet_records(results):
        return []
    with contextlib.suppress(UserError):
        return [(r["started_at"], r["round"]) for r in read_rounds(results) if "started_at" in r]
    return []
