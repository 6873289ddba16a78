"""Resumable `edge-ft train` runs: kill -9 or a power cut loses at most the steps since the last checkpoint.

A checkpoint is two writes, each atomic (edge_ft.atomic):
  checkpoints/step-N.state  the engine's state (trainable tensors + optimizer moments/step count)
  resume.json               the commit point, written second: which state file, its sha256, the run's identity
                            (bundle manifest, data, settings) and the trainer's progress (step, epoch, position in
                            the epoch, losses and timings so far)
A crash between the two leaves resume.json naming the previous state file, which is still there. Batch order
comes from (seed, epoch) and the learning rate from the epoch, so step + position are all the trainer needs;
the device trainer draws no other random numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_ft.atomic import atomic_write_json, remove_stale_temps
from edge_ft.checkpoint import sha256_file
from edge_ft.contracts import RESULTS
from edge_ft.errors import UserError

if TYPE_CHECKING:
    from edge_ft.device.engines import Engine

RESUME = "resume.json"
CHECKPOINTS = "checkpoints"
FORMAT = "edge-ft-resume"
# Settings that change which numbers training produces; threads, progress output and --checkpoint-every do not.
RUN_SETTINGS = ("batch", "epochs", "steps", "lr", "schedule", "step_every", "seed", "cache_features")


@dataclass
class Progress:
    """Where the trainer is: `step` steps done, the next batch is batch `batch` of epoch `epoch`."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch: int = 0  # batches of `epoch` done (== batches per epoch: its steps ran, its evaluation did not)
    losses: list[float] = field(default_factory=list)  # every step's loss so far
    step_seconds: list[float] = field(default_factory=list)  # every step's time so far
    epoch_log: list[dict[str, Any]] = field(default_factory=list)  # finished epochs, as results.json lists them
    epoch_losses: list[float] = field(default_factory=list)  # losses of the epoch in progress
    epoch_seconds: float = 0.0  # time spent in the epoch in progress before the checkpoint
    hits: int = 0  # correct training predictions in the epoch in progress
    seen: int = 0  # training examples scored in the epoch in progress
    train_seconds: float = 0.0  # training time before the checkpoint (all earlier processes)
    resumed_from: list[int] = field(default_factory=list)  # steps this run was resumed at


def run_identity(manifest_path: Path, x: np.ndarray, y: np.ndarray, settings: Any) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run: the bundle, the data and the settings."""
    data = hashlib.sha256(np.ascontiguousarray(x).tobytes())
    data.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return {"bundle_manifest_sha256": sha256_file(manifest_path), "data_sha256": data.hexdigest(),
            "settings": {k: getattr(settings, k) for k in RUN_SETTINGS}}


def state_path(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}.state"


def save_checkpoint(engine: Engine, out: Path, identity: dict[str, Any], progress: Progress,
                    keep: int | None = None) -> Path:
    """Engine state first, then resume.json naming it: resume.json only ever names a complete state file. With
    `keep`, only the newest `keep` state files up to this step stay (the one resume.json names among them)."""
    path = state_path(out, progress.step)
    engine.save_state(str(path))
    atomic_write_json(out / RESUME, {"format": FORMAT, "format_version": 1, "state": path.relative_to(out).as_posix(),
                                     "state_sha256": sha256_file(path), "run": identity,
                                     "progress": asdict(progress)})
    if keep:
        prune_checkpoints(out, progress.step, keep)
    return path


def prune_checkpoints(out: Path, step: int, keep: int) -> None:
    """Remove all but the newest `keep` state files of steps <= `step` (the committed one), and any of a later step:
    those a killed process wrote before resume.json could name them."""
    states = {}
    for path in (out / CHECKPOINTS).glob("step-*.state"):
        try:
            states[int(path.stem.removeprefix("step-"))] = path
        except ValueError:
            continue
    kept = sorted(n for n in states if n <= step)[-keep:]
    for n, path in states.items():
        if n not in kept:
            path.unlink(missing_ok=True)


def start(out: Path, identity: dict[str, Any], resume: bool, replace: bool = False) -> tuple[Progress, Path | None]:
    """(progress, state file to load) for a run writing to `out`.

    A finished run (results.json) is never trained over unless `replace`: resuming it has nothing left to do,
    and a fresh start would throw its results away. Fresh runs (resume False) also refuse a folder holding an
    unfinished run, so its training is never overwritten by accident. Either way, temp files that a killed
    process left behind are removed.
    """
    for folder in (out, out / CHECKPOINTS):
        remove_stale_temps(folder)
    record_path = out / RESUME
    finished = (out / RESULTS).is_file()
    if finished and not replace:
        what = "there is nothing to resume" if resume else "choose another --out"
        raise UserError(f"{out}: holds a finished run (results.json); {what}, or add --force to train it again "
                        "from step 0 and replace it")
    if not resume or finished:
        if record_path.is_file() and not finished:  # --force replaces finished runs, never unfinished ones
            raise UserError(f"{out}: holds an unfinished run (resume.json); add --resume to continue it, "
                            "or choose another --out")
        for stale in [record_path, out / RESULTS, *sorted((out / CHECKPOINTS).glob("step-*.state"))]:
            stale.unlink(missing_ok=True)
        return Progress(), None
    if not record_path.is_file():
        return Progress(), None
    record = _read_record(record_path)
    _check_identity(record_path, record["run"], identity)
    state = out / record["state"]
    if not state.is_file() or sha256_file(state) != record["state_sha256"]:
        raise UserError(f"{state}: missing or does not match {record_path}; the run folder was changed by hand, "
                        "start it again without --resume")
    progress = record["progress"]
    progress.resumed_from = [*progress.resumed_from, progress.step]
    return progress, state


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT or record.get("format_version") != 1:
            raise ValueError(f"format {record.get('format')!r} version {record.get('format_version')!r}")
        record["progress"] = _progress(record["progress"])
        if not isinstance(record["run"], dict) or not isinstance(record["run"].get("settings"), dict):
            raise ValueError("'run' must hold the bundle, data and settings the run started with")
        if not isinstance(record["state_sha256"], str):
            raise ValueError("'state_sha256' must be a string")
        if not isinstance(record["state"], str) or ".." in Path(record["state"]).parts:
            raise ValueError("state must be a path inside the run folder")
        return dict(record)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError,
            OSError) as e:
        raise UserError(f"{path}: not a readable resume record ({e}); start the run again without --resume "
                        "or with another --out") from None


def _is_count(v: object) -> bool:
    return type(v) is int and v >= 0


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and type(v) is not bool and math.isfinite(v)


def _progress(raw: dict[str, Any]) -> Progress:
    """Progress(**raw) with every field's type and the counts' consistency checked."""
    p = Progress(**raw)
    ok = (all(_is_count(v) for v in (p.step, p.epoch, p.batch, p.hits, p.seen))
          and all(_is_number(v) for v in (p.epoch_seconds, p.train_seconds))
          and all(isinstance(v, list) for v in (p.losses, p.step_seconds, p.epoch_log, p.epoch_losses,
                                               p.resumed_from))
          and all(_is_number(v) for v in (*p.losses, *p.step_seconds, *p.epoch_losses))
          and all(_is_count(v) for v in p.resumed_from) and all(isinstance(e, dict) for e in p.epoch_log)
          and len(p.losses) == len(p.step_seconds) == p.step and len(p.epoch_log) == p.epoch
          and len(p.epoch_losses) == p.batch and p.seen >= p.hits)
    if not ok:
        raise ValueError("progress fields of the wrong type or inconsistent counts")
    return p


def _check_identity(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    what = {"bundle_manifest_sha256": "the bundle (manifest.json) changed", "data_sha256": "the --data file changed"}
    for key, why in what.items():
        if saved.get(key) != current[key]:
            raise UserError(f"{path}: {why} since this run started; resume with the same inputs or choose "
                            "another --out")
    settings = saved["settings"]
    for key, value in current["settings"].items():
        if settings.get(key) != value:
            raise UserError(f"{path}: the run started with {key}={settings.get(key)!r}, this command gives "
                            f"{value!r}; resume with the same options or choose another --out")
