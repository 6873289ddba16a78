"""A/B deployment on the device: `edge-ft deploy` and `edge-ft rollback`, in the spirit of Mender's and RAUC's
A/B updates.

  ROOT/a/, ROOT/b/   slots: model.onnx (the adapter merged into the bundle) + slot.json (what it came from)
  ROOT/active.json   the commit point: active slot and its model's sha256, previous slot and its sha256
  ROOT/deploy.log    append-only JSON lines, one per decision (refused, rejected, activated, rolled back)

A deploy writes only the inactive slot (built in a staging folder and swapped in whole), scores the holdout on it
and on the active model, and switches by rewriting active.json atomically when accuracy holds. A kill -9 at any
point leaves active.json naming a slot whose model matches its recorded hash: the old model or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edge_ft.atomic import atomic_write_json, ensure_dir, replace_folder
from edge_ft.checkpoint import sha256_file
from edge_ft.errors import UserError
from edge_ft.trust.signature import TIME_FORMAT, now_utc

ACTIVE, LOG, SLOT_RECORD, MODEL = "active.json", "deploy.log", "slot.json", "model.onnx"
SLOTS = ("a", "b")
STAGING_PREFIX = ".staging-"


def default_root() -> Path:
    from edge_ft.trust.policy import home

    return home() / "deploy"


def read_active(root: Path) -> dict[str, Any] | None:
    """active.json when it names a slot whose model has the recorded hash; None before the first deploy."""
    path = root / ACTIVE
    if not path.is_file():
        return None
    try:
        active = json.loads(path.read_text())
        slot, digest = active["active"], active["active_sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable ({e!r}); restore it or deploy again") from None
    if slot not in SLOTS or not slot_holds(root, slot, digest):
        raise UserError(f"{path}: slot {slot!r} does not hold the model it names; deploy again")
    return dict(active)


def slot_holds(root: Path, slot: str | None, digest: str | None) -> bool:
    model = root / str(slot) / MODEL
    return slot in SLOTS and isinstance(digest, str) and model.is_file() and sha256_file(model) == digest


def active_model(root: str | Path) -> Path:
    """The model `predict` reads: the active slot's model.onnx."""
    root = Path(root)
    active = read_active(root)
    if active is None:
        raise UserError(f"{root}: no active model yet; `edge-ft deploy ADAPTER --bundle B --holdout TEST.npz`")
    return root / str(active["active"]) / MODEL


def read_slot(slot: Path) -> dict[str, Any]:
    """A slot's slot.json (written by deploy before the slot was swapped in)."""
    try:
        record = json.loads((slot / SLOT_RECORD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{slot / SLOT_RECORD}: unreadable ({e}); deploy again") from None
    if not isinstance(record, dict):
        raise UserError(f"{slot / SLOT_RECORD}: not a slot record; deploy again")
    return record


def log(root: Path, event: dict[str, Any]) -> None:
    """Append one JSON line and fsync: the log only grows (a kill mid-write can leave one partial last line)."""
    line = json.dumps({"time": now_utc().strftime(TIME_FORMAT), **event}, sort_keys=True) + "\n"
    fd = os.open(root / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_log(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / LOG
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the partial last line of a killed write
    return events


def holdout_accuracy(model: Path, holdout: str | Path) -> float:
    import numpy as np

    from edge_ft.device.classify import gather_inputs, open_model

    m = open_model(model, threads=1)
    batch = gather_inputs([holdout], m.card.classes, m.card.input_shape)
    if any(label is None for label in batch.labels):
        raise UserError(f"{holdout}: needs labels (y) to score the holdout")
    predicted = np.argmax(m.probabilities(batch.pixels), axis=1)
    return float(np.mean([m.card.class_name(int(p)) == label for p, label in zip(predicted, batch.labels)]))


def _stage(root: Path, bundle_path: str | Path, adapter: str | Path, holdout: str | Path, verified: Any) -> Path:
    """The new slot's contents in a staging folder under ROOT: merged model, its record and holdout accuracy."""
    from edge_ft.device.adapter import merge_adapter
    from edge_ft.device.bundle import load_bundle

    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))
    staging.chmod(0o755)
    merge_adapter(load_bundle(bundle_path), adapter, staging / MODEL)
    signed = {v.kind: {"name": v.name, "version": v.version, "keyid": v.keyid} for v in verified or []}
    record = {"adapter": str(Path(adapter).resolve()), "bundle": str(Path(bundle_path).resolve()),
              "signed": signed or None, "model_sha256": sha256_file(staging / MODEL),
              "holdout": str(holdout), "accuracy": holdout_accuracy(staging / MODEL, holdout),
              "built": now_utc().strftime(TIME_FORMAT)}
    atomic_write_json(staging / SLOT_RECORD, record)
    return staging


def deploy(adapter: str | Path, bundle: str | Path, holdout: str | Path, root: str | Path | None = None,
           tolerance: float = 0.01, trust: list[str] | None = None) -> dict[str, Any]:
    """Verify, merge into the inactive slot, score, and switch when accuracy holds; returns the logged decision.
    Not activating (lower accuracy) and refusing (verification) are logged, then raised as one-line errors."""
    from edge_ft.trust.policy import enforce

    root = ensure_dir(root or default_root())
    base = {"adapter": str(adapter), "bundle": str(bundle)}
    try:
        verified = enforce("deploy", [bundle, adapter], trust)
    except UserError as e:
        log(root, {**base, "decision": "refused", "reason": str(e)})
        raise
    for stale in root.glob(STAGING_PREFIX + "*"):  # of a deploy killed mid-build
        shutil.rmtree(stale, ignore_errors=True)
    active = read_active(root)
    current = active["active"] if active else None
    target = "b" if current == "a" else "a"
    staging = _stage(root, bundle, adapter, holdout, verified)
    record = json.loads((staging / SLOT_RECORD).read_text())
    replace_folder(staging, root / target)
    old_accuracy = holdout_accuracy(root / current / MODEL, holdout) if current else None
    event = {**base, "slot": target, "accuracy": record["accuracy"], "active_accuracy": old_accuracy,
             "tolerance": tolerance, "signed": record["signed"]}
    if old_accuracy is not None and record["accuracy"] < old_accuracy - tolerance:
        log(root, {**event, "decision": "rejected", "active": current})
        raise UserError(f"{adapter}: not activated: holdout accuracy {record['accuracy']:.4f} is below the active "
                        f"model's {old_accuracy:.4f} by more than {tolerance}; slot {current} stays active")
    atomic_write_json(root / ACTIVE, {"active": target, "active_sha256": record["model_sha256"],
                                      "previous": current, "previous_sha256": active["active_sha256"] if active
                                      else None, "switched": now_utc().strftime(TIME_FORMAT)})
    event = {**event, "decision": "activated", "previous": current}
    log(root, event)
    return event


def rollback(root: str | Path | None = None) -> dict[str, Any]:
    """Make the previous slot active again (when it still holds the model that was active before)."""
    root = Path(root or default_root())
    active = read_active(root)
    if active is None:
        raise UserError(f"{root}: nothing deployed; there is no model to roll back to")
    previous = active.get("previous")
    if not slot_holds(root, previous, active.get("previous_sha256")):
        raise UserError(f"{root}: no previous model to roll back to (none yet, or its slot was reused)")
    atomic_write_json(root / ACTIVE, {"active": previous, "active_sha256": active["previous_sha256"],
                                      "previous": active["active"], "previous_sha256": active["active_sha256"],
                                      "switched": now_utc().strftime(TIME_FORMAT)})
    event = {"decision": "rolled back", "slot": previous, "from": active["active"]}
    log(root, event)
    return event
