"""`edge-ft train`: fine-tune a bundle on the device with whichever engine its manifest names, and measure it.

A run folder gets:
  model.onnx             forward-only model with the trained weights (plain onnxruntime runs it)
  trained.safetensors    the trainable tensors alone (what `edge-ft adapter export` ships)
  final.state            engine state (weights + optimizer) after the last step
  checkpoints/step-N.state  every --checkpoint-every steps and on an interrupt (Ctrl-C), each committed by
                         resume.json (edge_ft.device.resume); only the newest --keep stay
  results.json           settings, per-step losses, per-epoch times, accuracy, latency, memory, artifact sizes;
                         written last, so a run folder with results.json is a finished run
Bundles with a frozen prefix (probe, LoRA on linear layers, last-k; edge_ft.device.feature_cache) run it once
over the data and train their head bundle on the cached features: the same steps on the same numbers, far less
compute per epoch. On by default when that saves prefix runs and the features fit; --no-cache turns it off.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edge_ft.atomic import atomic_save_safetensors, atomic_write_json
from edge_ft.contracts import ORT_STEP, RESULTS, TRAINED
from edge_ft.data.batches import epoch_batch_indices
from edge_ft.data.npz import to_float
from edge_ft.device import feature_cache
from edge_ft.device.adapter import merged_weights
from edge_ft.device.bundle import MANIFEST, Bundle
from edge_ft.device.engines import engine_class
from edge_ft.device.inference import accuracy, predict, session_runner, write_inference_model
from edge_ft.device.metrics import (MB, PeakRSS, available_bytes, file_sizes, latency_ms, rss_bytes,
                                   ru_maxrss_bytes)
from edge_ft.device.model_card import model_source, stamp_model
from edge_ft.device.op_profile import PROFILE_FILE, summarize
from edge_ft.device.ort_api import import_onnxruntime, inference_session
from edge_ft.device.resume import Progress, run_identity, save_checkpoint, start
from edge_ft.errors import UserError
from edge_ft.run_record import SUMMARY, make_summary
from edge_ft.training_defaults import SCHEDULES as EPOCH_SCHEDULES
from edge_ft.training_defaults import epoch_lr

SCHEDULES = (*EPOCH_SCHEDULES, "step")
STEP_GAMMA = 0.1  # step schedule: factor applied every `step_every` epochs (torch's StepLR default gamma)


@dataclass(frozen=True)
class TrainSettings:
    batch: int = 32  # examples per optimizer step
    epochs: int = 1  # passes over the data (ignored when steps is set)
    steps: int | None = None  # exact optimizer steps, crossing epochs as needed
    lr: float = 1e-3  # learning rate of epoch 0
    schedule: str = "constant"  # constant | cosine (per epoch, as the host reference loop) | step
    step_every: int = 0  # step schedule: epochs per decay (0 = a third of the run)
    seed: int = 0  # batch order: edge_ft.data.batches, the same order the host loop uses
    threads: int = 0  # onnxruntime intra-op threads (0 = its default)
    checkpoint_every: int = 0  # save the engine state every N steps (0 = only at the end)
    keep: int = 3  # state files kept in checkpoints/, the newest (an interrupt saves one too)
    cache_features: bool | None = None  # train the head bundle on cached prefix features (None: if it saves)
    memory_budget: int = 0  # bytes the run may hold (a device profile's budget); 0: what the machine has free
    profile_ops: bool = False  # ort-step only: onnxruntime's per-operator profile of the step graph
    quiet: bool = False  # no progress bar

    def __post_init__(self):
        if self.batch < 1 or self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise UserError("--batch, --epochs and --steps must be positive integers")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")
        if self.checkpoint_every < 0:
            raise UserError("--checkpoint-every must be 0 (off) or a positive step count")
        if self.keep < 1:
            raise UserError(f"--keep must be at least 1 (the checkpoint a resume starts from), got {self.keep}")


def lr_for_epoch(s: TrainSettings, epoch: int, epochs: int) -> float:
    if s.schedule == "step":
        return s.lr * STEP_GAMMA ** (epoch // (s.step_every or max(epochs // 3, 1)))
    return epoch_lr(s.lr, epoch, epochs, s.schedule)


class _Progress:
    """tqdm when it is installed (host installs), a line per epoch otherwise (tqdm is not a device dependency)."""

    def __init__(self, total: int, quiet: bool, done: int = 0):
        self.bar, self.quiet = None, quiet
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def step(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def epoch(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Step(NamedTuple):
    """One finished optimizer step, as Progress records it: the counts after it and what it measured."""

    step: int
    batch: int
    loss: float
    seconds: float
    hits: int
    seen: int


def _record(pos: Progress, done: _Step) -> None:
    """Add `done` to `pos`; applying it again changes nothing, so a record cut short can be completed."""
    if len(pos.losses) < done.step:
        pos.losses.append(done.loss)
    if len(pos.step_seconds) < done.step:
        pos.step_seconds.append(done.seconds)
    if len(pos.epoch_losses) < done.batch:
        pos.epoch_losses.append(done.loss)
    pos.hits, pos.seen, pos.batch, pos.step = done.hits, done.seen, done.batch, done.step


def _next_epoch(pos: Progress) -> None:
    """Start the epoch after the last logged one; pos.epoch is set last, so a start cut short is redone whole."""
    pos.batch, pos.epoch_losses, pos.epoch_seconds, pos.hits, pos.seen = 0, [], 0.0, 0, 0
    pos.epoch = len(pos.epoch_log)


class _CheckpointOnInterrupt:
    """Save a checkpoint when training stops on a BaseException that is not an Exception (Ctrl-C, SystemExit, the
    exception a signal handler raises), say so in one line, and let it propagate. Errors (Exception) save nothing:
    their state may be what went wrong. The engine's state is whole between its steps; a step whose record was
    cut short is completed first (pending), so the checkpoint and the progress it names agree."""

    def __init__(self, engine, out: Path, identity: dict, pos: Progress, keep: int, progress: _Progress,
                 started: float):
        self.engine, self.out, self.identity, self.pos, self.keep = engine, out, identity, pos, keep
        self.progress, self.started = progress, started  # perf_counter of step 0, earlier processes included
        self.pending: _Step | None = None  # the step being recorded
        self.epoch_started: float | None = None  # perf_counter of the epoch in progress's start

    def __enter__(self) -> "_CheckpointOnInterrupt":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None or issubclass(kind, Exception):
            return False
        self.progress.close()
        pos, now = self.pos, time.perf_counter()
        if self.pending is not None:
            _record(pos, self.pending)
        if len(pos.epoch_log) > pos.epoch:  # an epoch was logged; the next had not started
            _next_epoch(pos)
        elif self.epoch_started is not None:
            pos.epoch_seconds = now - self.epoch_started
        pos.train_seconds = now - self.started
        try:
            save_checkpoint(self.engine, self.out, self.identity, pos, self.keep)
        except Exception as e:  # the interrupt is what the user must see; say why nothing was saved
            print(f"interrupted at step {pos.step}: no checkpoint saved ({e})", file=sys.stderr, flush=True)
            return False
        print(f"interrupted at step {pos.step}: checkpoint saved; add --resume to continue", file=sys.stderr,
              flush=True)
        return False


def load_runtime(engine: str) -> int:
    """Import the engine and onnxruntime; return the RSS then: what the runtime costs before any data or session."""
    engine_class(engine)
    import_onnxruntime()
    return rss_bytes()


def train(bundle: Bundle, data: tuple[np.ndarray, np.ndarray], eval_data: tuple[np.ndarray, np.ndarray] | None,
          s: TrainSettings, out: str | Path, rss_after_imports: int | None = None, resume: bool = False,
          classes: list[str] | None = None, initial: dict[str, np.ndarray] | None = None,
          replace: bool = False) -> dict:
    """Fine-tune `bundle` on data (x as edge_ft.data.npz validates it for the bundle's input shape, y int64 (N,));
    write the run folder; return results.

    rss_after_imports: measured by the caller with load_runtime() before it loaded the data (else measured here).
    resume: continue from the run folder's last checkpoint (same bundle, data and settings), if it has one.
    replace: train over a finished run in `out` (else it is refused: a finished run is never lost by accident).
    classes: the name of each label (from the data or the bundle), written into model.onnx and results.json.
    initial: trainable tensors to start from instead of the bundle's (a fleet's global model), set after any
    applied adapter; the caller checked names and shapes.
    """
    out = Path(out)
    x, y = data
    x_eval, y_eval = eval_data if eval_data is not None else (x[:0], y[:0])
    per_epoch = math.ceil(len(x) / s.batch)
    total = s.steps or s.epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    cache = feature_cache.plan(bundle, s.cache_features, len(x), len(x_eval),
                               min(total * s.batch, epochs * len(x)) + epochs * len(x_eval),
                               s.memory_budget - rss_bytes() if s.memory_budget else available_bytes())
    s = dataclasses.replace(s, cache_features=cache.use)  # the resolved choice: part of the run's identity
    train_bundle = bundle.head if cache.use else bundle
    engine_cls = engine_class(train_bundle.engine)
    if s.profile_ops and train_bundle.engine != ORT_STEP:
        raise UserError(f"{bundle.path}: --profile-ops profiles the ort-step graph; this bundle's engine is "
                        f"{train_bundle.engine} (export with --engine ort-step)")
    if rss_after_imports is None:
        rss_after_imports = load_runtime(train_bundle.engine)
    identity = run_identity(bundle.path / MANIFEST, x, y, s)
    pos, resume_state = start(out, identity, resume, replace)
    if resume:
        print(f"{out}: resuming from step {pos.step} ({resume_state.relative_to(out)})" if resume_state else
              f"{out}: no checkpoint to resume from; starting at step 0", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with PeakRSS() as peak:
        feature_seconds = None
        if s.cache_features:
            t0 = time.perf_counter()
            inputs, eval_inputs = feature_cache.cached_inputs(bundle, s.threads, x, x_eval, cache, out)
            feature_seconds = time.perf_counter() - t0
        profiling = {}
        if s.profile_ops:  # onnxruntime writes its trace into the run folder, which must exist by then
            out.mkdir(parents=True, exist_ok=True)
            profiling = {"profile_prefix": str(out / "ort-profile")}
        engine = engine_cls(train_bundle, threads=s.threads, **profiling)
        first_step = pos.step
        applied = bundle.applied_adapter()  # the head bundle of a probe shares its parent's applied adapter
        if applied:
            engine.load_trainable(applied)
        if initial:
            engine.load_trainable(initial)
        if resume_state is not None:  # rebuilds the engine's state whole: nothing of the old one is written to
            engine.load_state(str(resume_state))

        def batch_x(idx: np.ndarray) -> np.ndarray:
            return inputs[idx] if s.cache_features else to_float(x[idx])

        def eval_accuracy() -> float | None:
            if not len(y_eval):
                return None
            run = engine.logits
            logits = predict(run, eval_inputs, images=False) if s.cache_features else predict(run, x_eval)
            return accuracy(logits, y_eval)

        progress = _Progress(total, s.quiet, done=pos.step)
        earlier_seconds = pos.train_seconds  # training time of the processes before a resume
        with _CheckpointOnInterrupt(engine, out, identity, pos, s.keep, progress, started - earlier_seconds) as guard:
            for epoch in range(pos.epoch, epochs):
                lr = lr_for_epoch(s, epoch, epochs)
                if epoch != pos.epoch:
                    _next_epoch(pos)
                t_epoch = guard.epoch_started = time.perf_counter() - pos.epoch_seconds
                for idx in epoch_batch_indices(len(x), s.batch, s.seed, epoch)[pos.batch:]:
                    if pos.step == total:
                        break
                    xb, yb = batch_x(idx), y[idx]
                    t0 = time.perf_counter()
                    loss, logits = engine.train_step(xb, yb, lr)
                    seconds = time.perf_counter() - t0
                    if not math.isfinite(loss):
                        raise UserError(f"training diverged at step {pos.step} (loss {loss}); lower --lr")
                    hits, seen = pos.hits, pos.seen
                    if logits is not None:
                        hits, seen = hits + int((logits.argmax(1) == yb).sum()), seen + len(yb)
                    guard.pending = _Step(pos.step + 1, pos.batch + 1, loss, seconds, hits, seen)
                    _record(pos, guard.pending)
                    guard.pending = None
                    progress.step(loss)
                    if s.checkpoint_every and pos.step % s.checkpoint_every == 0:
                        pos.epoch_seconds = time.perf_counter() - t_epoch
                        pos.train_seconds = earlier_seconds + time.perf_counter() - started
                        save_checkpoint(engine, out, identity, pos, s.keep)
                seconds = time.perf_counter() - t_epoch
                acc = eval_accuracy()
                pos.epoch_log.append({"epoch": epoch, "steps": len(pos.epoch_losses), "seconds": round(seconds, 4),
                                      "lr": lr, "mean_loss": float(np.mean(pos.epoch_losses)),
                                      "train_accuracy": pos.hits / pos.seen if pos.seen else None,
                                      "eval_accuracy": acc})
                progress.epoch(f"epoch {epoch + 1}/{epochs}: loss {np.mean(pos.epoch_losses):.4f}  {seconds:.2f} s"
                               + ("" if acc is None else f"  eval accuracy {acc:.4f}"))
            progress.close()
            train_seconds = earlier_seconds + time.perf_counter() - started
            step, losses, step_seconds, epoch_log = pos.step, pos.losses, pos.step_seconds, pos.epoch_log

            op_summary = None
            if s.profile_ops:
                trace = Path(engine.end_profiling())
                op_summary = summarize(trace, runs=pos.step - first_step)
                trace.unlink(missing_ok=True)
                atomic_write_json(out / PROFILE_FILE, op_summary)
            trained = engine.trainable_state()
            engine.save_state(str(out / "final.state"))
            atomic_save_safetensors(out / TRAINED, trained, metadata={"format": "edge-ft-trained"})
            if s.cache_features:  # the head bundle lacks the prefix: write the whole network from the inference graph
                inputs = eval_inputs = None  # closes memory-mapped caches before their files go
                feature_cache.remove(out)
                write_inference_model(bundle, merged_weights(bundle, trained), out / "model.onnx")
            else:
                engine.export_inference(str(out / "model.onnx"))
            stamp_model(out / "model.onnx", classes, model_source(bundle, made_by="edge-ft train"), bundle.input_shape)
            # Score the exported file itself with plain onnxruntime: what a user deploys is what we report.
            final_accuracy = None
            if len(y_eval):
                final_accuracy = accuracy(predict(session_runner(inference_session(out / "model.onnx", s.threads)),
                                                  x_eval), y_eval)

    results = {
        "bundle": {"path": str(bundle.path), "engine": bundle.engine, "method": bundle.manifest["method"],
                   "optimizer": bundle.manifest["optimizer"], "num_classes": bundle.num_classes,
                   "base": bundle.manifest["base"], "trainable": {k: list(v) for k, v in bundle.trainable.items()},
                   "applied_adapter": bundle.manifest.get("applied_adapter"),
                   **({"model": bundle.manifest["model"]} if "model" in bundle.manifest else {})},
        "classes": classes,
        "settings": {**asdict(s), "train_examples": len(x), "eval_examples": len(y_eval)},
        "steps": step,
        "resumed_from": pos.resumed_from,
        "epochs": epoch_log,
        "losses": [round(v, 7) for v in losses],
        "accuracy": final_accuracy,
        "step_latency_ms": latency_ms(step_seconds),
        "train_seconds": round(train_seconds, 4),
        "feature_cache_seconds": None if feature_seconds is None else round(feature_seconds, 4),
        "feature_cache": {**asdict(cache), "split": bundle.manifest.get("features", {}).get("first_trained")},
        "op_profile": None if op_summary is None else {"file": PROFILE_FILE, "ms_per_step": op_summary["ms_per_step"],
                                                       "by_op": op_summary["by_op"][:10]},
        "memory_mb": {"rss_after_imports": round(rss_after_imports / MB, 2),
                      "peak_rss_sampled": round(peak.bytes / MB, 2), "ru_maxrss": round(ru_maxrss_bytes() / MB, 2)},
        "bundle_bytes": file_sizes(bundle.path),
    }
    results[SUMMARY] = make_summary(  # the keys every engine's results.json shares (edge_ft.run_record)
        bundle.engine, final_accuracy, step,
        [{"epoch": i + 1, "seconds": e["seconds"], "loss": e["mean_loss"], "accuracy": e["eval_accuracy"]}
         for i, e in enumerate(epoch_log)],
        np.asarray(step_seconds) * 1e3, results["memory_mb"]["rss_after_imports"],
        results["memory_mb"]["peak_rss_sampled"])
    results["artifact_bytes"] = file_sizes(out)  # before results.json itself exists
    atomic_write_json(out / RESULTS, results)
    return results
