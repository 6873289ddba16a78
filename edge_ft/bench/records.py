"""The benchmark's results file: one JSON object per line, appended atomically, read tolerantly.

    append_record(path, record)   # one whole line, flushed and fsynced before returning
    read_records(path)            # every parseable line, in file order (a torn last line is skipped)
    latest(records)               # key -> the last record with that key (`--force` re-runs append, never rewrite)
    latest_runs(records, profile) # the last record of every run (task, profile, method label, engine)

BenchRecord is a record's schema, the one place its fields are named: a misspelt key is a type error (mypy).

A crash while writing can leave at most a partial last line; every earlier line stays intact, and the next append
starts on a fresh line so it never glues itself to the torn one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast

from edge_ft.errors import UserError

if TYPE_CHECKING:
    from edge_ft.emulation.hostspeed import HostSpeed

SCHEMA = 1  # bumped when a field changes meaning
# What a record measured: a fine-tuning run on a task (edge_ft.bench.measure; records without "kind" are these) or
# one model's training step on synthetic inputs with its batch-size limit (edge_ft.bench.tradeoff). Readers ask
# for the kind they understand, so both live in one results file.
TASK, TRADEOFF = "task", "tradeoff"
# Fields every record carries (tests, the report and gates rely on them). time_scaled is False when the run had no
# CPU quota (rlimit mode, native, or a board at least as fast as this machine): its times are this machine's.
REQUIRED = ("task", "method", "engine", "profile", "emulation", "time_scaled", "status", "accuracy",
            "peak_rss_bytes", "ms_per_step_p50", "payload_bytes", "trainable_params")


class Epoch(TypedDict):
    seconds: float  # the epoch's training time
    accuracy: float | None  # held-out accuracy after it (None when not evaluated)


class SearchStep(TypedDict):
    batch: int  # the batch size tried
    fits: bool  # finished within the board's budget
    status: str  # ok | out_of_memory | timeout | failed
    peak_rss_bytes: int  # the try's peak RSS
    timed: bool  # the timed run (the start batch), not a search probe


class BenchRecord(TypedDict, total=False):
    """One line of a results file. Not total: records written by older versions lack later fields, so a field
    that may be absent is read with .get(). A task record (edge_ft.bench.measure) has no "kind"; a per-model
    record (edge_ft.bench.tradeoff) has kind "tradeoff" and the model fields."""

    # identity
    schema: int  # SCHEMA when written
    kind: str  # TASK (absent in task records) | TRADEOFF
    key: str  # run_key of what was measured: equal inputs, equal key
    task: str  # canonical task name, a data folder, or "synthetic" (per-model records)
    method: str  # full | probe | lora | bias | last-k
    label: str  # the method token, a key of SWEEP_LABELS (a per-model record: of METHOD_LABELS; older: its method)
    cache_features: bool  # trained on the cached frozen prefix
    engine: str  # torch | ort-training | ort-step
    settings: dict[str, Any]  # SweepSettings / TradeoffSettings as a dict
    base_sha256: str  # the base weights every run starts from
    started: str  # local time the run started, ISO 8601 to the second
    versions: dict[str, Any]  # python and library versions of the interpreter that ran it
    # the board and its emulation
    profile: str  # device profile name
    arch: str  # the board's instruction set (x86_64, aarch64, ...)
    budget_mb: int  # the board's memory budget
    native: bool  # the profile is this machine, unconfined
    installable_on_device: bool  # the engine's wheels exist for the board's arch
    emulation: str  # cgroup | rlimit | native
    time_scaled: bool  # its times are the board's, not this machine's (by `timing`)
    timing: NotRequired[str | None]  # quota: paced by a CPU quota | cpu: run here, its CPU time scaled; None: neither
    board_scale: NotRequired[float | None]  # timing cpu: board time over wall time per step, applied to every time
    cpu_quota: float | None  # one board core as a share of a CPU here: each thread's quota (or CPU-time divisor)
    total_quota: float | None  # the same for the whole job
    quota_efficiency: float | None  # speed-up the threads achieved against their quota
    threads: int  # threads the run used
    cpus: list[int]  # CPUs it was pinned to
    host_speed: float  # this machine's core speed against the reference core (scales every quota)
    host_speed_source: str  # measured | cached | given | reference
    host_speed_measured: str | None  # when the speed was measured
    # outcome
    status: str  # ok | out_of_memory | timeout | failed
    exit_code: int | None  # the child's exit code
    fits: bool  # finished with its peak RSS within the budget
    verdict: str  # one line saying why it fits or not
    notes: list[str]  # what the emulation had to say about the run
    stderr_tail: str  # the end of the child's stderr when it did not finish ok
    # training
    accuracy: float | None  # held-out accuracy at the end
    epochs: list[Epoch]  # per-epoch time and accuracy
    steps: int | None  # optimizer steps taken
    time_to_accuracy_s: float | None  # training seconds until the target accuracy (None: never reached)
    epoch_seconds_mean: float | None  # mean epoch time
    epoch_seconds_later: float | None  # mean epoch time without the first (warm-up)
    feature_cache_seconds: float | None  # the one-off feature pass of a cached probe
    feature_cache: NotRequired[dict[str, Any] | None]  # a cached per-model label's cache: examples, bytes, in_memory,
    # features_shape, seconds and cpu_seconds of its one-off pass on this machine (edge_ft.device.step_probe)
    trainable_params: int  # parameters that train
    total_params: int  # parameters of the network
    flops_per_step: int  # analytical FLOPs of one training step
    # time
    ms_per_step_p50: float | None  # step time, median
    ms_per_step_p95: float | None  # step time, 95th percentile
    ms_per_step_mean: float | None  # step time, mean (wall time under a quota)
    cpu_ms_per_step: float | None  # CPU time of a step, all threads (device engines)
    busiest_thread_ms_per_step: float | None  # the busiest thread's part of it
    wall_ms_per_step: NotRequired[float | None]  # wall time of the same steps (their epochs' step loops)
    typical_ms_per_step: NotRequired[float | None]  # timing cpu: the median step's CPU time, the board time's basis
    board_ms_per_step: float | None  # on an emulated board: the board's time its CPU time stands for (see step_ms)
    repeats_ms_per_step_p50: list[float | None]  # step_ms of each repetition of a repeated run (the fastest is it)
    wall_seconds: float  # the whole child's wall time
    cpu_seconds: float  # CPU time the job used
    throttled_seconds: float | None  # time the quota held the job stopped (None outside a cgroup)
    thread_throttled_seconds: float | None  # the same per thread
    throttled_periods: int | None  # CFS periods in which the job ran out of quota
    periods: int | None  # CFS periods of the job
    # memory
    peak_rss_bytes: int  # the job's peak RSS (parent's sampling, ru_maxrss, the trainer's own)
    sampled_rss_bytes: int  # the parent's sampled peak
    ru_maxrss_bytes: int  # the kernel's high-water mark for the child
    cgroup_peak_bytes: int | None  # the cgroup's peak charge
    rss_after_imports_bytes: int | None  # RSS once the runtime was imported, before training
    train_peak_rss_bytes: int | None  # peak RSS the trainer sampled itself
    # what ships
    bundle_bytes: int | None  # the exported bundle's size
    payload_bytes: int | None  # what a device sends back: the adapter's weights (torch: its weights file)
    payload_files: dict[str, int]  # file name -> bytes of what ships
    merged_model_bytes: int | None  # model.onnx with the adapter merged
    # per-model records (kind "tradeoff")
    model: str  # model name (edge_ft.bench.prepare.MODEL_NAMES)
    model_title: str  # its display name
    input_shape: list[int]  # one example's shape
    num_classes: int  # classes of the head
    inputs: str  # what the synthetic inputs are
    optimizer: str  # the optimizer of the measured step
    flops: dict[str, int]  # forward / backward_input / backward_weight / total FLOPs per step
    batch: int  # batch of the timed run
    max_fitting_batch: int | None  # the largest batch that fits the budget (None: not even the smallest)
    first_failing_batch: int | None  # the smallest batch found not to fit (None: none tried failed)
    search: list[SearchStep]  # every batch the search tried


def host_fields(host: HostSpeed) -> BenchRecord:
    """The speed every CPU quota of a run was scaled by."""
    return {"host_speed": host.speed, "host_speed_source": host.source, "host_speed_measured": host.measured}


def run_key(identity: dict[str, Any]) -> str:
    """A stable id of what was measured (task, method, engine, profile, settings): equal inputs, equal key."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def append_record(path: str | os.PathLike[str], record: BenchRecord) -> None:
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


def read_records(path: str | os.PathLike[str], missing_ok: bool = True, kind: str | None = TASK) -> list[BenchRecord]:
    """Records of `kind` (None: every kind) in file order; lines that are not a JSON object (a torn write) are
    skipped."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise UserError(f"{path}: no such results file (create it with `edge-ft bench --results {path}`)")
    records: list[BenchRecord] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and "key" in obj and kind in (None, obj.get("kind", TASK)):
                    records.append(cast(BenchRecord, obj))  # files of every version load: fields are optional
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read results ({e})") from None
    return records


def require_fields(records: list[BenchRecord], path: str | os.PathLike[str]) -> list[BenchRecord]:
    """`records`, or one line naming the first that lacks a field every bench record carries (REQUIRED): a file
    cut down by hand or written by another program."""
    for r in records:
        if missing := [k for k in REQUIRED if k not in r]:
            raise UserError(f"{path}: record {r.get('key', '?')!r} lacks {', '.join(missing)}: not a whole "
                            "`edge-ft bench` record (cut down, or written by another program)")
    return records


def latest(records: list[BenchRecord], by: Callable[[BenchRecord], Hashable] = lambda r: r["key"]
           ) -> dict[Hashable, BenchRecord]:
    """by(record) -> the last record written for it (insertion order follows the first time a key appeared). By
    default per run key (equal settings); a --force re-run appends, never rewrites, so the last one counts."""
    out: dict[Hashable, BenchRecord] = {}
    for r in records:
        out[by(r)] = r
    return out


def run_of(r: BenchRecord) -> tuple[str | None, str | None, str | None, str | None]:
    """What a gate or a recommendation judges as one run: task, profile, method label, engine (older settings of
    the same run, kept in the file by --force or other sweeps, do not count)."""
    return r.get("task"), r.get("profile"), r.get("label", r.get("method")), r.get("engine")


def latest_runs(records: list[BenchRecord], profile: str | None = None, task: str | None = None
                ) -> list[BenchRecord]:
    """The last record of every run (run_of), in first-seen order; only `profile`'s and `task`'s when given."""
    picked = [r for r in records if profile in (None, r.get("profile")) and task in (None, r.get("task"))]
    return list(latest(picked, run_of).values())


def step_ms(record: Mapping[str, Any]) -> float | None:
    """The step time a record stands for. Under a CPU quota: the board time its CPU time stands for
    (edge_ft.device.board_time: steady where wall time moves with how the host delivers the quota), else the mean
    wall time (records without it; p50 is uneven there). Otherwise p50."""
    keys = ("board_ms_per_step", "ms_per_step_mean") if record.get("time_scaled") else ("ms_per_step_p50",)
    for key in keys:
        value = record.get(key)
        if value is not None and math.isfinite(value):
            return float(value)
    return None
