"""One fleet round on the device, in memory: the device trainer's steps without its run folder.

`edge-ft train` (edge_ft.device.trainer) writes a run folder: checkpoints, model.onnx, results.json, each committed
with fsync, and it opens its onnxruntime sessions afresh for every run. A fleet device trains a few steps a round and
ships only its trainable tensors, so the ClientApp does the same steps here and keeps, per process, one engine per
bundle (its sessions built once) that is reset to the bundle's state before each round: the Simulation Engine's
workers serve one virtual device after another, and a real node one round after another.

What is computed is the trainer's: the same cache decision (edge_ft.device.feature_cache.plan, the trainer's
inputs), the same batch order (edge_ft.data.batches), learning rate per epoch, start state (bundle state, applied
adapter, then the global tensors) and step graph. The local accuracy is that of the trained tensors on the device's
data through the engine's forward graph (the trainer scores its exported model.onnx: the same graph with the
weights baked in).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ft.data.batches import epoch_batch_indices
from edge_ft.data.npz import to_float
from edge_ft.device import feature_cache
from edge_ft.device.bundle import Bundle
from edge_ft.device.engines import Engine, engine_class
from edge_ft.device.inference import accuracy, predict
from edge_ft.device.metrics import MB, PeakRSS, available_bytes, latency_ms
from edge_ft.device.trainer import TrainSettings, lr_for_epoch, plan_run
from edge_ft.errors import UserError


@dataclass(frozen=True)
class RoundResult:
    trained: dict[str, np.ndarray]  # the trainable tensors after the round
    steps: int  # optimizer steps run
    losses: list[float]  # per step
    accuracy: float  # the trained tensors on the device's own data
    ms_per_step: float  # median step wall time here
    peak_rss_mb: float  # this process's peak RSS during the round


Features = Callable[[np.ndarray], np.ndarray]
_kept: dict[tuple[Path, str, int, bool], tuple[Engine, Features | None]] = {}  # (bundle, threads, cached) -> kept


def _engine_and_features(bundle: Bundle, threads: int, cached: bool) -> tuple[Engine, Features | None]:
    """The engine that trains `bundle` (its head bundle when cached) in the bundle's own state, and the features
    runner when cached: kept per process and reset when the engine can reset, else opened anew. A bundle is known
    by its folder and manifest (a re-exported bundle in the same folder is another bundle)."""
    key = (bundle.path, json.dumps(bundle.manifest, sort_keys=True), threads, cached)
    if key in _kept:
        engine, features = _kept[key]
        engine.reset()  # type: ignore[attr-defined]  # kept only when it can (below)
        return engine, features
    trains = bundle.head if cached and bundle.head is not None else bundle
    engine = engine_class(trains.engine)(trains, threads=threads)
    features = feature_cache.features_runner(bundle, threads) if cached else None
    if hasattr(engine, "reset"):
        _kept[key] = engine, features
    return engine, features


def train_round(bundle: Bundle, x: np.ndarray, y: np.ndarray, s: TrainSettings,
                initial: dict[str, np.ndarray]) -> RoundResult:
    """Train from `initial` (the global trainable tensors; names and shapes checked by the caller) on (x, y)."""
    if not len(y):
        raise UserError("the device holds no training examples")
    with PeakRSS() as peak:
        cache, total, epochs = plan_run(bundle, s, len(y), len(y), available_bytes())  # scored on its own data
        cached = cache.use and bundle.head is not None
        engine, features = _engine_and_features(bundle, s.threads, cached)
        inputs = feature_cache.compute(bundle, s.threads, x, run=features) if cached else None
        applied = bundle.applied_adapter()
        if applied:
            engine.load_trainable(applied)
        engine.load_trainable(initial)
        losses: list[float] = []
        seconds: list[float] = []
        for epoch in range(epochs):
            lr = lr_for_epoch(s, epoch, epochs)
            for idx in epoch_batch_indices(len(y), s.batch, s.seed, epoch):
                if len(losses) == total:
                    break
                xb = inputs[idx] if inputs is not None else to_float(x[idx])
                t0 = time.perf_counter()
                loss, _ = engine.train_step(xb, y[idx], lr)
                seconds.append(time.perf_counter() - t0)
                if not math.isfinite(loss):
                    raise UserError(f"training diverged at step {len(losses)} (loss {loss}); lower --lr")
                losses.append(loss)
        logits = predict(engine.logits, inputs, images=False) if inputs is not None else predict(engine.logits, x)
        score = accuracy(logits, y)
        trained = engine.trainable_state()
    return RoundResult(trained, len(losses), losses, score, latency_ms(seconds)["p50"], round(peak.bytes / MB, 2))
