"""Baselines: a new sweep against a stored one, on the figures that survive a change of runner.

    outcomes, notes = compare(new_runs, read_records("OLD.jsonl"), parse_limits(["10%", "accuracy=0.01"]))

Runs are matched by what was measured — task, method, engine, profile and settings — not by the records' key,
which also holds this machine's host speed and the base's hash (both differ on another runner). Compared figures:
  accuracy       higher is better
  peak_rss_mb    lower is better
  payload_bytes  lower is better
  ms_per_step    lower is better, made comparable across machines: under a CPU quota the emulation already
                 scaled time to the board's (the quota was set from the host speed measured in that run), a
                 native run's time is multiplied by its host speed (reference-core milliseconds); an emulated run
                 without a quota (rlimit mode) has no board time, so its time is not compared (a note says so)
A run that fitted its budget in the baseline and no longer does is a regression whatever the figures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from edge_ft.bench.records import BenchRecord, latest_runs
from edge_ft.errors import UserError
from edge_ft.gates.assertions import STEP_TIME, Failure, Outcome, field_value, run_name, show_value, unscaled_time

HIGHER_IS_BETTER = {"accuracy": True, "peak_rss_mb": False, "payload_bytes": False, STEP_TIME: False}
DEFAULT_MAX_REGRESSION = "10%"


@dataclass(frozen=True)
class Limit:
    amount: float  # how much worse a figure may get
    relative: bool  # amount is a fraction of the baseline figure (10% -> 0.1); else in the field's unit

    def __str__(self) -> str:
        return f"{self.amount * 100:g}%" if self.relative else f"{self.amount:g}"


def parse_limits(texts: list[str]) -> dict[str, Limit]:
    """["10%", "accuracy=0.01"] -> a Limit per compared field: `N%` of the baseline figure or an amount in the
    field's unit, for every field or for FIELD= one; later ones win."""
    limits = dict.fromkeys(HIGHER_IS_BETTER, _parse_limit(DEFAULT_MAX_REGRESSION, DEFAULT_MAX_REGRESSION))
    for text in texts:
        name, _, amount = text.rpartition("=")
        name = name.strip()
        if name and name not in HIGHER_IS_BETTER:
            raise UserError(f"--max-regression {text!r}: {name!r} is not compared; fields: "
                            f"{', '.join(HIGHER_IS_BETTER)}")
        limit = _parse_limit(text, amount.strip())
        limits.update({name: limit} if name else dict.fromkeys(HIGHER_IS_BETTER, limit))
    return limits


def _parse_limit(text: str, amount: str) -> Limit:
    relative = amount.endswith("%")
    try:
        value = float(amount[:-1] if relative else amount)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"--max-regression {text!r}: expected N% (of the baseline figure) or an amount in the "
                        "field's unit, for all fields or FIELD=... (e.g. 10% or accuracy=0.01)")
    return Limit(value / 100 if relative else value, relative)


def identity(record: BenchRecord) -> str:
    """What was measured, without what belongs to the machine (host speed) or the base's bytes."""
    settings = {k: v for k, v in (record.get("settings") or {}).items() if k not in ("host_speed", "target_accuracy")}
    return json.dumps([record.get("task"), record.get("label"), record.get("engine"), record.get("profile"),
                       settings], sort_keys=True)


def comparable(record: BenchRecord, name: str) -> Any:
    """The figure as compared across runners (time: see the module docstring); None when it cannot be."""
    value = field_value(record, name)
    if name != STEP_TIME or value is None:
        return value
    if record.get("native"):
        speed = record.get("host_speed") or (record.get("settings") or {}).get("host_speed")
        return value * float(speed) if isinstance(speed, (int, float)) else None
    return None if unscaled_time(record) else value


def compare(new: list[BenchRecord], old: list[BenchRecord], limits: dict[str, Limit], source: str = "baseline"
            ) -> tuple[list[Outcome], list[str]]:
    """One Outcome per new run that has a baseline run; notes for what was not compared and why."""
    before = {identity(r): r for r in latest_runs(old)}
    outcomes: list[Outcome] = []
    notes: list[str] = []
    unmatched: list[str] = []
    for r in new:
        base = before.get(identity(r))
        if base is None:
            unmatched.append(run_name(r))
            continue
        outcomes.append(_compare_run(r, base, limits, notes))
    if unmatched:
        notes.append(f"no baseline run in {source} for {len(unmatched)} run(s): {', '.join(unmatched)} "
                     "(runs match on task, method, engine, profile and settings)")
    if not outcomes:
        outcomes.append(Outcome("baseline", f"baseline {source}", "fail", "no matching run", [Failure(
            "no run", "-", f"no run matches a run of {source} (same task, method, engine, profile and settings); "
                           "re-run the baseline with this sweep's options")]))
    return outcomes, notes


def _compare_run(new: BenchRecord, old: BenchRecord, limits: dict[str, Limit], notes: list[str]) -> Outcome:
    name = f"{run_name(new)} vs baseline"
    failures, changes = [], []
    if old.get("fits") and not new.get("fits"):
        failures.append(Failure(run_name(new), f"fits -> {new.get('status')}", new.get("verdict", "")))
    for field, higher_better in HIGHER_IS_BETTER.items():
        a, b = comparable(old, field), comparable(new, field)
        if a is None or b is None:
            if field == STEP_TIME and (unscaled_time(old) or unscaled_time(new)) and new.get("status") == "ok":
                notes.append(f"{run_name(new)}: ms_per_step not compared: "
                             f"{'baseline' if unscaled_time(old) else 'new'} run not time-scaled "
                             f"({(old if unscaled_time(old) else new).get('emulation')} emulation)")
            continue
        worse = (a - b) if higher_better else (b - a)
        relative = worse / abs(a) if a else (math.inf if worse > 0 else 0.0)
        limit = limits[field]
        changes.append(f"{field} {show_value(a)} -> {show_value(b)} ({'+' if b >= a else ''}{_percent(b, a)})")
        if (relative if limit.relative else worse) > limit.amount + 1e-12:
            by = f"{relative * 100:.1f}%" if limit.relative else show_value(worse)
            failures.append(Failure(run_name(new), f"{field} {show_value(a)} -> {show_value(b)}",
                                    f"worse by {by} (max {limit})"))
    if old.get("base_sha256") != new.get("base_sha256"):
        notes.append(f"{run_name(new)}: the baseline run started from other base weights")
    detail = "; ".join(changes) or "no figure to compare (neither run finished)"
    return Outcome("baseline", name, "fail" if failures else "pass", detail, failures)


def _percent(new: float, old: float) -> str:
    return f"{(new - old) / abs(old) * 100:.1f}%" if old else "n/a"
