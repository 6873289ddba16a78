"""The benchmark's results file: one JSON object per line, appended atomically, read tolerantly.

    append_record(path, record)   # one whole line, flushed and fsynced before returning
    read_records(path)            # every parseable line, in file order (a torn last line is skipped)
    latest(records)               # key -> the last record with that key (`--force` re-runs append, never rewrite)

A crash while writing can leave at most a partial last line; every earlier line stays intact, and the next append
starts on a fresh line so it never glues itself to the torn one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_ft.errors import UserError

SCHEMA = 1  # bumped when a field changes meaning
# What a record measured: a fine-tuning run on a task (edge_ft.bench.measure; records without "kind" are these) or
# one model's training step on synthetic inputs with its batch-size limit (edge_ft.bench.tradeoff). Readers ask
# for the kind they understand, so both live in one results file.
TASK, TRADEOFF = "task", "tradeoff"
# Fields every record carries (tests, the report and gates rely on them). time_scaled is False when the run had no
# CPU quota (rlimit mode, native, or a board at least as fast as this machine): its times are this machine's.
REQUIRED = ("task", "method", "engine", "profile", "emulation", "time_scaled", "status", "accuracy",
            "peak_rss_bytes", "ms_per_step_p50", "payload_bytes", "trainable_params")


def run_key(identity: dict) -> str:
    """A stable id of what was measured (task, method, engine, profile, settings): equal inputs, equal key."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def append_record(path: str | os.PathLike, record: dict) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            if f.tell() and not _ends_with_newline(path):
                f.write(b"\n")  # the previous writer died mid-line: start clean
            f.write((json.dumps(record, sort_keys=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot append to {path}: {e.strerror or e}; choose a writable --results file") from None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_records(path: str | os.PathLike, missing_ok: bool = True, kind: str | None = TASK) -> list[dict]:
    """Records of `kind` (None: every kind) in file order; lines that are not a JSON object (a torn write) are
    skipped."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise UserError(f"{path}: no such results file (create it with `edge-ft bench --results {path}`)")
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and "key" in obj and kind in (None, obj.get("kind", TASK)):
                    records.append(obj)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read results ({e})") from None
    return records


def latest(records: list[dict]) -> dict[str, dict]:
    """key -> the last record written for it (insertion order follows the first time a key appeared)."""
    out: dict[str, dict] = {}
    for r in records:
        out[r["key"]] = r
    return out


def step_ms(record: Mapping[str, Any]) -> float | None:
    """The step time a record stands for: the mean under a CPU quota (p50 is uneven there), p50 otherwise."""
    key = "ms_per_step_mean" if record.get("time_scaled") else "ms_per_step_p50"
    value = record.get(key)
    return None if value is None or not math.isfinite(value) else float(value)
