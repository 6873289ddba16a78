"""Gates: assertions on benchmark records that a CI job can fail on (`edge-ft bench --assert`, `edge-ft gate`).

    gates = [parse_assertion("rpi-zero-2w:lora:peak_rss_mb<=200"), parse_assertion("rpi-zero-2w:*:fits")]
    outcomes = evaluate(gates, latest_runs(read_records("results.jsonl")))
    any(o.failed for o in outcomes)   # -> exit code 1

Grammar: PROFILE:METHOD[:ENGINE]:FIELD OP VALUE, or PROFILE:METHOD[:ENGINE]:fits
  PROFILE, METHOD, ENGINE  a name or a pattern with `*` (`rpi-*`, `*`); ENGINE left out means every engine
  FIELD                    a record field (NUMBER_FIELDS, BOOL_FIELDS, WORD_FIELDS);
                           X_mb / X_kb read the record's X_bytes in MiB / KiB,
                           ms_per_step is the step time the report quotes (board time under a CPU quota, p50 otherwise)
  OP                       <= < >= > == != (true/false and words such as emulation==cgroup take only == and !=)
  VALUE                    a bare number in the field's unit (accuracy is a fraction: 0.9), true/false, or a word
  fits                     every matched run finished within the profile's memory budget (the record's verdict)
Every matched run must hold; a gate that matches no run fails (a typo must not pass silently). A time field of an
emulated run that was not time-scaled (rlimit mode, or a board at least as fast as this machine) is this
machine's time, not the board's: such a gate fails, or is skipped with allow_unscaled_time.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from edge_ft.bench.measure import LABELS
from edge_ft.bench.records import BenchRecord, step_ms
from edge_ft.contracts import ENGINES, MB
from edge_ft.errors import UserError

OPS: dict[str, Callable[[Any, Any], bool]] = {"<=": operator.le, ">=": operator.ge, "==": operator.eq,
                                              "!=": operator.ne, "<": operator.lt, ">": operator.gt}
_OP = re.compile(r"(<=|>=|==|!=|<|>)")
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]*")
FITS = "fits"  # the built-in gate
GRAMMAR = "PROFILE:METHOD[:ENGINE]:FIELD OP VALUE or PROFILE:METHOD[:ENGINE]:fits"
# Gateable record fields by kind (edge_ft.bench.measure.base_record writes them; a test checks both agree).
NUMBER_FIELDS = (
    "accuracy", "peak_rss_bytes", "sampled_rss_bytes", "ru_maxrss_bytes", "cgroup_peak_bytes",
    "rss_after_imports_bytes", "train_peak_rss_bytes", "bundle_bytes", "payload_bytes", "merged_model_bytes",
    "flops_per_step", "trainable_params", "total_params", "steps", "budget_mb", "threads", "exit_code",
    "cpu_quota", "total_quota", "quota_efficiency", "host_speed",
    "ms_per_step_p50", "ms_per_step_p95", "ms_per_step_mean", "epoch_seconds_mean", "epoch_seconds_later",
    "time_to_accuracy_s", "feature_cache_seconds", "wall_seconds", "cpu_seconds", "throttled_seconds",
    "thread_throttled_seconds", "throttled_periods", "periods", "cpu_ms_per_step", "busiest_thread_ms_per_step",
    "board_ms_per_step", "wall_ms_per_step", "typical_ms_per_step", "board_scale")
BOOL_FIELDS = ("fits", "time_scaled", "native", "installable_on_device", "cache_features")
WORD_FIELDS = ("status", "emulation", "timing", "arch", "task", "host_speed_source")
STEP_TIME = "ms_per_step"  # derived: the step time the report and recommend quote
TIME_FIELDS = (STEP_TIME, "ms_per_step_p50", "ms_per_step_p95", "ms_per_step_mean", "epoch_seconds_mean",
               "epoch_seconds_later", "time_to_accuracy_s", "feature_cache_seconds", "wall_seconds", "cpu_seconds",
               "throttled_seconds", "thread_throttled_seconds", "cpu_ms_per_step", "busiest_thread_ms_per_step",
               "board_ms_per_step")
UNITS = {"_mb": MB, "_kb": 1024}  # derived field suffix -> bytes per unit, read from the matching _bytes field


@dataclass(frozen=True)
class Assertion:
    text: str  # as the user wrote it
    profile: str  # name or `*` pattern
    method: str  # sweep label (edge_ft.contracts.SWEEP_LABELS) or pattern
    engine: str  # engine or pattern; "*" when left out
    field: str  # record field, derived field (peak_rss_mb, ms_per_step) or "fits"
    op: str = ""  # one of OPS; "" for the built-in
    value: float | bool | str | None = None

    def matches(self, record: BenchRecord) -> bool:
        return all(fnmatchcase(str(record.get(k)), pattern) for k, pattern in
                   (("profile", self.profile), ("label", self.method), ("engine", self.engine)))


@dataclass
class Failure:
    run: str  # which run: "rpi-zero-2w lora ort-step"
    measured: str  # the figure, with its field name
    why: str  # what it should have been, or why it cannot be judged


@dataclass
class Outcome:
    """One gate or one baseline comparison: a test case in the JUnit file, a row in the summary."""

    suite: str  # "gates" | "baseline"
    name: str  # the assertion text, or the compared run
    status: str  # pass | fail | skip
    detail: str = ""  # one line: what held, or why it was skipped
    failures: list[Failure] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def message(self) -> str:
        return "; ".join(f"{f.run}: {f.measured} {f.why}" for f in self.failures) or self.detail


def run_name(record: BenchRecord) -> str:
    return f"{record['profile']} {record['label']} {record['engine']}"


def known_field(name: str) -> str:
    """The kind of a gateable field: number | bool | word; raises UserError for an unknown one."""
    if name == STEP_TIME or source_field(name)[0] in NUMBER_FIELDS:
        return "number"
    if name in BOOL_FIELDS:
        return "bool"
    if name in WORD_FIELDS:
        return "word"
    raise UserError(f"unknown field {name!r}: use a record field such as peak_rss_mb, accuracy, payload_bytes, "
                    f"ms_per_step, fits, emulation (all: {', '.join(sorted(gateable_fields()))})")


def gateable_fields() -> set[str]:
    derived = {f[:-len("_bytes")] + suffix for f in NUMBER_FIELDS if f.endswith("_bytes") for suffix in UNITS}
    return {*NUMBER_FIELDS, *BOOL_FIELDS, *WORD_FIELDS, STEP_TIME, *derived}


def source_field(name: str) -> tuple[str, int]:
    """The record field a (possibly derived) field is read from, and its divisor: peak_rss_mb -> (peak_rss_bytes,
    MiB)."""
    for suffix, unit in UNITS.items():
        if name.endswith(suffix) and name[:-len(suffix)] + "_bytes" in NUMBER_FIELDS:
            return name[:-len(suffix)] + "_bytes", unit
    return name, 1


def field_value(record: BenchRecord, name: str) -> Any:
    """The record's value of a (possibly derived) field, in the unit its name states; None when not measured."""
    if name == STEP_TIME:
        return step_ms(record)
    source, unit = source_field(name)
    value = record.get(source)
    return value / unit if unit != 1 and isinstance(value, (int, float)) else value


def parse_assertion(text: str) -> Assertion:
    """`rpi-zero-2w:lora:peak_rss_mb<=200` -> Assertion; a malformed one raises UserError naming what is wrong."""
    spec = "".join(text.split())
    selector, op, raw = (_OP.split(spec, maxsplit=1) + ["", ""])[:3]
    names = selector.split(":")
    if len(names) not in (3, 4) or not all(names):
        raise UserError(f"assertion {text!r}: expected {GRAMMAR} (e.g. 'rpi-zero-2w:lora:peak_rss_mb<=200')")
    profile, method, *engine, name = names
    engine = engine[0] if engine else "*"
    if "*" not in method and method not in LABELS:
        raise UserError(f"assertion {text!r}: unknown method {method!r}; methods {', '.join(LABELS)} or *")
    if "*" not in engine and engine not in ENGINES:
        raise UserError(f"assertion {text!r}: unknown engine {engine!r}; engines {', '.join(ENGINES)} or *")
    if name == FITS and not op:
        return Assertion(text, profile, method, engine, FITS)
    if not _FIELD_NAME.fullmatch(name) or (not op and "=" in name):
        field_name = re.split(r"[=!<>]", name)[0]
        raise UserError(f"assertion {text!r}: no operator after the field {field_name!r}; OP is one of "
                        f"{' '.join(OPS)}")
    if not op:
        raise UserError(f"assertion {text!r}: no comparison; expected {GRAMMAR} with OP one of "
                        f"{' '.join(OPS)} (e.g. 'rpi-zero-2w:*:peak_rss_mb<=200')")
    try:
        kind = known_field(name)
    except UserError as e:
        raise UserError(f"assertion {text!r}: {e}") from None
    return Assertion(text, profile, method, engine, name, op, _parse_value(text, name, kind, op, raw))


def _parse_value(text: str, name: str, kind: str, op: str, raw: str) -> float | bool | str:
    if not raw or _OP.search(raw):
        raise UserError(f"assertion {text!r}: expected one value after {op}")
    if kind != "number":
        if op not in ("==", "!="):
            raise UserError(f"assertion {text!r}: {name} is {'true/false' if kind == 'bool' else 'a word'}; "
                            "compare it with == or !=")
        if kind == "bool":
            if raw.lower() not in ("true", "false"):
                raise UserError(f"assertion {text!r}: {name} is true or false, not {raw!r}")
            return raw.lower() == "true"
        return raw
    try:
        value = float(raw)
    except ValueError:
        unit = _unit(name)
        raise UserError(f"assertion {text!r}: value {raw!r} is not a number; give a bare number in the field's "
                        f"unit ({name} is {unit})") from None
    if not math.isfinite(value):
        raise UserError(f"assertion {text!r}: value {raw!r} is not a finite number")
    if name == "accuracy" and not 0 <= value <= 1:
        raise UserError(f"assertion {text!r}: accuracy is a fraction in [0, 1] (write 0.9 for 90%)")
    return value


def _unit(name: str) -> str:
    if name == "accuracy":
        return "a fraction, 0.9 = 90%"
    for ending, unit in (("_mb", "MiB"), ("_kb", "KiB"), ("_bytes", "bytes"), ("ms_per_step", "milliseconds"),
                         ("_seconds", "seconds"), ("_s", "seconds"), ("_params", "parameters")):
        if ending in name:
            return "in " + unit
    return "a plain number"


def is_time_field(name: str) -> bool:
    return name in TIME_FIELDS


def unscaled_time(record: BenchRecord) -> bool:
    """A confined run whose wall time is this machine's, not the board's (no CPU quota was applied)."""
    return not record.get("native") and not record.get("time_scaled")


def unscaled_why(record: BenchRecord) -> str:
    return (f"not time-scaled ({record.get('emulation')} emulation): this machine's time, not "
            f"{record['profile']}'s; gate time only on runs under a CPU quota (cgroup mode)")


def evaluate(assertions: list[Assertion], records: list[BenchRecord],
             allow_unscaled_time: bool = False) -> list[Outcome]:
    """One Outcome per assertion over `records` (one per run: latest_runs or a sweep's records)."""
    return [_evaluate_one(a, records, allow_unscaled_time) for a in assertions]


def _evaluate_one(a: Assertion, records: list[BenchRecord], allow_unscaled_time: bool) -> Outcome:
    matched = [r for r in records if a.matches(r)]
    if not matched:
        runs = ", ".join(sorted({run_name(r) for r in records})) or "none"
        return Outcome("gates", a.text, "fail", "matched no run",
                       [Failure("no run", "-", f"matched no run (runs: {runs})")])
    failures: list[Failure] = []
    skipped: list[Failure] = []
    for r in matched:
        if a.field == FITS and not a.op:  # the built-in; fits==false is an ordinary comparison
            if not r.get("fits"):
                failures.append(Failure(run_name(r), f"peak RSS {field_value(r, 'peak_rss_mb'):.0f} MB",
                                        r.get("verdict") or r.get("status", "")))
            continue
        if is_time_field(a.field) and unscaled_time(r):
            (skipped if allow_unscaled_time else failures).append(
                Failure(run_name(r), f"{a.field} {show_value(field_value(r, a.field))}", unscaled_why(r)))
            continue
        value = field_value(r, a.field)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            failures.append(Failure(run_name(r), f"{a.field} not measured", f"(run {r.get('status')}: "
                                                                              f"{r.get('verdict', '')})"))
        elif not _comparable(value, a.value):
            failures.append(Failure(run_name(r), f"{a.field} {show_value(value)}",
                                    f"cannot be compared with {show_value(a.value)} (a damaged record?)"))
        elif not OPS[a.op](value, a.value):
            failures.append(Failure(run_name(r), f"{a.field} {show_value(value)}",
                                    f"not {a.op} {show_value(a.value)}"))
    held = len(matched) - len(failures) - len(skipped)
    if failures:
        return Outcome("gates", a.text, "fail", f"{len(failures)} of {len(matched)} runs fail", failures)
    if skipped and not held:
        return Outcome("gates", a.text, "skip", f"skipped: {skipped[0].why}", skipped)
    note = f"; {len(skipped)} skipped (not time-scaled)" if skipped else ""
    return Outcome("gates", a.text, "pass", f"holds for {held} run{'s' * (held != 1)}{note}", skipped)


def _comparable(value: Any, limit: Any) -> bool:
    if isinstance(limit, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(limit, bool)
    return isinstance(value, str) == isinstance(limit, str)


def show_value(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
