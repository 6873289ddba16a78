"""One results schema for every engine: the "summary" block of a run's results.json.

`edge-ft finetune` (torch) and `edge-ft train` (ort-training, ort-step) each write their own detailed results.json
(torch: accuracy_before/after, ms_per_step_p50, peak_rss_mb ...; the device: step_latency_ms, memory_mb, losses
...). Both also write this block, with the same keys, and readers go through read_summary, which derives it from
either detailed layout when a file predates the block:

  engine        torch | ort-training | ort-step
  accuracy      held-out accuracy of the final model (None without evaluation data)
  steps         optimizer steps taken
  epochs        [{"epoch": 1-based, "seconds": training time, "loss": mean loss, "accuracy": held-out or None}]
  ms_per_step   {"p50", "p95", "mean"} over every step
  memory_mb     {"rss_after_imports", "peak_rss"} of the training process (None when not measured)

`edge-ft train`'s whole results.json is TrainResults, written by write_results and read by read_results, so a
misspelt key is a type error; files written before a key existed still load (such keys are NotRequired).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import numpy as np

from edge_ft.atomic import atomic_write_json
from edge_ft.contracts import RESULTS

SUMMARY = "summary"


class SummaryEpoch(TypedDict):
    epoch: int  # 1-based
    seconds: float  # training time of the epoch
    loss: float | None  # mean training loss
    accuracy: float | None  # held-out accuracy after the epoch (None without evaluation data)


class StepStats(TypedDict):
    p50: float | None  # ms per step; None when no step was timed
    p95: float | None
    mean: float | None


class SummaryMemory(TypedDict):
    rss_after_imports: float | None  # MB, the training process once its runtime was loaded
    peak_rss: float | None  # MB, the training process's peak


class RunSummary(TypedDict):
    engine: str  # torch | ort-training | ort-step
    accuracy: float | None  # held-out accuracy of the final model
    steps: int  # optimizer steps taken
    epochs: list[SummaryEpoch]
    ms_per_step: StepStats
    memory_mb: SummaryMemory


class DeviceMemory(TypedDict):
    rss_after_imports: float  # MB once the runtime was loaded
    peak_rss_sampled: float  # MB, the highest RSS sampled while training
    ru_maxrss: float  # MB, the kernel's high-water mark for the process


class StepCpu(TypedDict):
    """The CPU time of the training steps, and on an emulated board the board's time it stands for."""

    steps: int  # steps counted: the epochs' step loops (the first epoch's left out when later ones exist)
    warmup_left_out: bool  # whether the first epoch (onnxruntime's first-step planning) was left out
    ms_per_step: float | None  # CPU ms per step, all threads of the process
    busiest_thread_ms_per_step: float | None  # the busiest thread's share of it
    wall_ms_per_step: NotRequired[float | None]  # the same steps' wall time (their epochs' step loops)
    typical_ms_per_step: NotRequired[float | None]  # the median step's CPU ms, where clocked every step (timing cpu)
    quota: dict[str, float] | None  # {"thread", "job"}: the emulated board's CPU shares; None outside one
    board_ms_per_step: float | None  # the board's time per step its shares make of it (edge_ft.device.board_time):
    # of the typical step where clocked every step, else of the mean


class TrainResults(TypedDict):
    """`edge-ft train`'s results.json."""

    bundle: dict[str, Any]  # path, engine, method, optimizer, num_classes, base, trainable, applied_adapter, model
    classes: list[str] | None  # the name of each label
    settings: dict[str, Any]  # the TrainSettings, plus train_examples and eval_examples
    steps: int  # optimizer steps taken
    resumed_from: list[int]  # the steps this run was resumed at
    epochs: list[dict[str, Any]]  # per epoch: seconds, mean_loss, eval_accuracy ...
    losses: list[float]  # every step's loss
    accuracy: float | None  # held-out accuracy of the exported model.onnx
    step_latency_ms: dict[str, float]  # p50, p95, mean
    train_seconds: float
    feature_cache_seconds: NotRequired[float | None]  # None: features were not cached
    feature_cache: NotRequired[dict[str, Any]]  # the cache's settings and the first trained layer
    op_profile: NotRequired[dict[str, Any] | None]  # the per-op profile's summary, when one was taken
    memory_mb: DeviceMemory
    cpu: NotRequired[StepCpu]  # absent in files written before it
    bundle_bytes: dict[str, int]  # bytes of each file of the bundle
    summary: NotRequired[RunSummary]  # absent in files written before it; read it with read_summary
    artifact_bytes: NotRequired[dict[str, int]]  # bytes of each file of the run folder, results.json excepted


def write_results(run_dir: Path, results: TrainResults) -> None:
    """RUN_DIR/results.json, atomically."""
    atomic_write_json(run_dir / RESULTS, results)


def read_results(run_dir: Path) -> TrainResults:
    """RUN_DIR/results.json as `edge-ft train` wrote it (json errors and OSError propagate to the caller)."""
    results: TrainResults = json.loads((run_dir / RESULTS).read_text())
    return results


def make_summary(engine: str, accuracy: float | None, steps: int, epochs: list[SummaryEpoch],
                 step_ms: Sequence[float] | np.ndarray,
                 rss_after_imports_mb: float | None, peak_rss_mb: float | None) -> RunSummary:
    """The block both writers call; `epochs` rows already carry the summary's keys, `step_ms` the timed steps' ms."""
    ms = np.asarray(step_ms, dtype=float)
    stats: StepStats = {"p50": round(float(np.median(ms)), 4), "p95": round(float(np.percentile(ms, 95)), 4),
             "mean": round(float(ms.mean()), 4)} if len(ms) else {"p50": None, "p95": None, "mean": None}
    return {"engine": engine, "accuracy": accuracy, "steps": int(steps), "epochs": epochs, "ms_per_step": stats,
            "memory_mb": {"rss_after_imports": rss_after_imports_mb, "peak_rss": peak_rss_mb}}


def read_summary(results: Mapping[str, Any]) -> RunSummary:
    """The summary of a results.json from any engine, old files included."""
    if isinstance(results.get(SUMMARY), dict):
        return cast(RunSummary, dict(results[SUMMARY]))  # as make_summary wrote it
    if "step_latency_ms" in results:  # a device run written before the block existed
        lat, mem = results["step_latency_ms"], results["memory_mb"]
        return {"engine": results["bundle"]["engine"], "accuracy": results["accuracy"], "steps": results["steps"],
                "epochs": [{"epoch": i + 1, "seconds": e["seconds"], "loss": e.get("mean_loss"),
                            "accuracy": e.get("eval_accuracy")} for i, e in enumerate(results["epochs"])],
                "ms_per_step": {"p50": lat.get("p50"), "p95": lat.get("p95"), "mean": lat.get("mean")},
                "memory_mb": {"rss_after_imports": mem.get("rss_after_imports"),
                              "peak_rss": mem.get("peak_rss_sampled")}}
    return {"engine": results.get("engine", "torch"), "accuracy": results["accuracy_after"],  # a torch run
            "steps": results["steps"],
            "epochs": [{"epoch": e["epoch"], "seconds": e["seconds"], "loss": e.get("loss"),
                        "accuracy": e.get("test_accuracy")} for e in results["epochs"]],
            "ms_per_step": {"p50": results.get("ms_per_step_p50"), "p95": results.get("ms_per_step_p95"),
                            "mean": results.get("ms_per_step_mean")},
            "memory_mb": {"rss_after_imports": results.get("rss_after_imports_mb"),
                          "peak_rss": results.get("peak_rss_mb")}}


__all__ = ["SUMMARY", "DeviceMemory", "RunSummary", "StepStats", "SummaryEpoch", "SummaryMemory", "TrainResults",
           "make_summary", "read_results", "read_summary", "write_results"]
