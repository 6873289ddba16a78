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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SUMMARY = "summary"


def make_summary(engine: str, accuracy: float | None, steps: int, epochs: list[dict[str, Any]],
                 step_ms: Sequence[float] | np.ndarray,
                 rss_after_imports_mb: float | None, peak_rss_mb: float | None) -> dict[str, Any]:
    """The block both writers call; `epochs` rows already carry the summary's keys, `step_ms` the timed steps' ms."""
    ms = np.asarray(step_ms, dtype=float)
    stats = {"p50": round(float(np.median(ms)), 4), "p95": round(float(np.percentile(ms, 95)), 4),
             "mean": round(float(ms.mean()), 4)} if len(ms) else {"p50": None, "p95": None, "mean": None}
    return {"engine": engine, "accuracy": accuracy, "steps": int(steps), "epochs": epochs, "ms_per_step": stats,
            "memory_mb": {"rss_after_imports": rss_after_imports_mb, "peak_rss": peak_rss_mb}}


def read_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The summary of a results.json from any engine, old files included."""
    if isinstance(results.get(SUMMARY), dict):
        return dict(results[SUMMARY])
    if "step_latency_ms" in results:  # a device run written before the block existed
        lat, mem = results["step_latency_ms"], results["memory_mb"]
        return {"engine": results["bundle"]["engine"], "accuracy": results["accuracy"], "steps": results["steps"],
                "epochs": [{"epoch": i + 1, "seconds": e["seconds"], "loss": e.get("mean_loss"),
                            "accuracy": e.get("eval_accuracy")} for i, e in enumerate(results["epochs"])],
                "ms_per_step": {k: lat.get(k) for k in ("p50", "p95", "mean")},
                "memory_mb": {"rss_after_imports": mem.get("rss_after_imports"),
                              "peak_rss": mem.get("peak_rss_sampled")}}
    return {"engine": results.get("engine", "torch"), "accuracy": results["accuracy_after"],  # a torch run
            "steps": results["steps"],
            "epochs": [{"epoch": e["epoch"], "seconds": e["seconds"], "loss": e.get("loss"),
                        "accuracy": e.get("test_accuracy")} for e in results["epochs"]],
            "ms_per_step": {k: results.get(f"ms_per_step_{k}") for k in ("p50", "p95", "mean")},
            "memory_mb": {"rss_after_imports": results.get("rss_after_imports_mb"),
                          "peak_rss": results.get("peak_rss_mb")}}


__all__ = ["SUMMARY", "make_summary", "read_summary"]
