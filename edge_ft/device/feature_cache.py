"""The cached frozen prefix: run a bundle's features.onnx once per example and train its head bundle on the result.

Every bundle whose first layers hold no trainable tensor (probe, LoRA on linear layers, LoRA with modules_to_save,
last-k) carries features.onnx (those layers, frozen) and a head bundle (the training step of the rest). The
features are the same numbers at every epoch, so the trainer computes them once: in memory when they fit half of
what the memory budget leaves, else in a memory-mapped file in the run folder that is deleted at the end.

Whether to cache (when the user said neither --cache nor --no-cache) is this cost model: caching runs the prefix
once over the training and eval examples; not caching runs it once per example a step or an evaluation reads.
Cache when that saves prefix runs and the cache fits the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ft.data.npz import to_float
from edge_ft.device.bundle import Bundle
from edge_ft.device.inference import EVAL_BATCH, session_runner
from edge_ft.device.ort_api import inference_session
from edge_ft.errors import UserError

CACHE_FILE = "feature-cache.npy"  # in the run folder while training, when the features do not fit in memory


@dataclass(frozen=True)
class CachePlan:
    use: bool  # train the head bundle on cached features
    reason: str  # why (or why not), for results.json
    bytes: int = 0  # size of the cached training and eval features
    in_memory: bool = True  # False: memory-mapped in the run folder
    prefix_runs_saved: int = 0  # examples the prefix does not run thanks to the cache (negative: it costs)


def features_shape(bundle: Bundle) -> tuple[int, ...]:
    entry = bundle.manifest["features"]
    return tuple(int(d) for d in entry.get("shape", [entry["dim"]]))  # older probe bundles record only "dim"


def plan(bundle: Bundle, requested: bool | None, n_train: int, n_eval: int, examples_read: int,
         budget_bytes: int) -> CachePlan:
    """Whether to cache. requested: True (--cache), False (--no-cache) or None (decide). examples_read: the
    training examples the run's steps read plus the eval examples its evaluations read, uncached."""
    if "features" not in bundle.manifest:
        if requested:
            raise UserError(f"{bundle.path}: this {bundle.method.method} bundle has no frozen prefix to cache (the "
                            "first layer trains, or it was exported before prefixes were); drop --cache")
        return CachePlan(False, f"{bundle.method.method}: no frozen prefix (the first layer trains)")
    size = (n_train + n_eval) * math.prod(features_shape(bundle)) * 4
    saved = examples_read - (n_train + n_eval)
    in_memory = size <= budget_bytes // 2
    if requested is False:
        return CachePlan(False, "--no-cache", size, in_memory, 0)
    if requested:
        return CachePlan(True, "--cache", size, in_memory, saved)
    if saved <= 0:
        return CachePlan(False, "the run reads each example at most once: caching would not save prefix runs",
                         size, in_memory, 0)
    return CachePlan(True, "saves prefix runs", size, in_memory, saved)


def features_runner(bundle: Bundle, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """`run(images) -> features`: an inference session on the bundle's features.onnx."""
    return session_runner(inference_session(bundle.file(bundle.manifest["features"]["file"]), threads))


def compute(bundle: Bundle, threads: int, x: np.ndarray, into: Path | None = None,
            run: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """features.onnx over all of x (edge_ft.data.npz inputs) -> float32 (N, *features), in memory or, with `into`,
    in a memory-mapped .npy file there. run: a features_runner to reuse (else one is opened)."""
    chunks = (to_float(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH))
    return compute_chunks(bundle, threads, len(x), chunks, into, run)


def compute_chunks(bundle: Bundle, threads: int, n: int, chunks: Iterable[np.ndarray], into: Path | None = None,
                   run: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """compute() over n examples handed over in float chunks of EVAL_BATCH (the last one may be shorter)."""
    shape = (n, *features_shape(bundle))
    out = np.zeros(shape, np.float32) if into is None else np.lib.format.open_memmap(into, "w+", np.float32, shape)
    if n:
        run = run or features_runner(bundle, threads)
        for i, chunk in zip(range(0, n, EVAL_BATCH), chunks, strict=True):
            out[i:i + len(chunk)] = run(chunk)
    return out


def cached_inputs(bundle: Bundle, threads: int, x: np.ndarray, x_eval: np.ndarray, cache: CachePlan,
                  folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Training and eval features; memory-mapped files (when they do not fit in memory) go into `folder`."""
    if not cache.in_memory:
        folder.mkdir(parents=True, exist_ok=True)
    where = (None, None) if cache.in_memory else (folder / CACHE_FILE, folder / f"eval-{CACHE_FILE}")
    return compute(bundle, threads, x, where[0]), compute(bundle, threads, x_eval, where[1])


def remove(folder: Path) -> None:
    for name in (CACHE_FILE, f"eval-{CACHE_FILE}"):
        (folder / name).unlink(missing_ok=True)
