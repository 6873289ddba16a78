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

import numpy as np

from edge_ft.atomic import atomic_save_safetensors, atomic_write_json
from edge_ft.contracts import ORT_STEP, TRAINED
from edge_ft.data.batches import epoch_batch_indices
from edge_ft.data.npz import to_float
from edge_ft.device import feature_cache
from edge_ft.device.adapter import merged_weights
from edge_ft.device.board_time import CpuMeter, clock_every_step, epochs_cpu, quota_from_env
from edge_ft.device.bundle import MANIFEST, Bundle
from edge_ft.device.engines import engine_class
from edge_ft.device.inference import accuracy, predict, session_runner, write_inference_model
from edge_ft.device.metrics import (MB, PeakRSS, available_bytes, file_sizes, latency_ms, rss_bytes,
                                   ru_maxrss_bytes)
from edge_ft.device.model_card import model_source, stamp_model
from edge_ft.device.op_profile import PROFILE_FILE, summarize
from edge_ft.device.ort_api import import_onnxruntime, inference_session
from edge_ft.device.resume import Progress, run_identity, save_checkpoint, start
from edge_ft.device.train_progress import (CheckpointOnInterrupt, ProgressBar, StepDone, next_epoch,
                                          record_step)
from edge_ft.errors import UserError
from edge_ft.run_record import DeviceMemory, TrainResults, make_summary, write_results
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


def load_runtime(engine: str) -> int:
    """Import the engine and onnxruntime; return the RSS then: what the runtime costs before any data or session."""
    engine_class(engine)
    import_onnxruntime()
    return rss_bytes()


@dataclass
class _Run:
    """What the phases of one `train` call share: the data, the resolved settings and where the run stands."""

    bundle: Bundle  # the bundle as given (its head bundle trains when the cache is used)
    s: TrainSettings  # settings with cache_features resolved
    out: Path  # the run folder
    x: np.ndarray  # training inputs (edge_ft.data.npz form)
    y: np.ndarray  # training labels
    x_eval: np.ndarray  # eval inputs (empty: no eval set)
    y_eval: np.ndarray  # eval labels
    total: int  # optimizer steps of the whole run
    epochs: int  # epochs those steps span
    cache: feature_cache.CachePlan  # whether and where the prefix features are cached
    identity: dict  # what a checkpoint must match to continue this run
    pos: Progress  # where the run stands (restored on resume)
    resume_state: Path | None  # the checkpoint to continue from
    inputs: np.ndarray | None = None  # cached training features (cache on)
    eval_inputs: np.ndarray | None = None  # cached eval features (cache on)

    @property
    def train_bundle(self) -> Bundle:
        if self.s.cache_features:
            assert self.bundle.head is not None  # a bundle is cached only when it has a head graph
            return self.bundle.head
        return self.bundle

    def batch_x(self, idx: np.ndarray) -> np.ndarray:
        return self.inputs[idx] if self.s.cache_features else to_float(self.x[idx])

    def eval_accuracy(self, engine) -> float | None:
        if not len(self.y_eval):
            return None
        if self.s.cache_features:
            assert self.eval_inputs is not None  # set with the cache, before the first epoch
            return accuracy(predict(engine.logits, self.eval_inputs, images=False), self.y_eval)
        return accuracy(predict(engine.logits, self.x_eval), self.y_eval)


def train(bundle: Bundle, data: tuple[np.ndarray, np.ndarray], eval_data: tuple[np.ndarray, np.ndarray] | None,
          s: TrainSettings, out: str | Path, rss_after_imports: int | None = None, resume: bool = False,
          classes: list[str] | None = None, initial: dict[str, np.ndarray] | None = None,
          replace: bool = False) -> TrainResults:
    """Fine-tune `bundle` on data (x as edge_ft.data.npz validates it for the bundle's input shape, y int64 (N,));
    write the run folder; return results.

    rss_after_imports: measured by the caller with load_runtime() before it loaded the data (else measured here).
    resume: continue from the run folder's last checkpoint (same bundle, data and settings), if it has one.
    replace: train over a finished run in `out` (else it is refused: a finished run is never lost by accident).
    classes: the name of each label (from the data or the bundle), written into model.onnx and results.json.
    initial: trainable tensors to start from instead of the bundle's (a fleet's global model), set after any
    applied adapter; the caller checked names and shapes.
    """
    run = _prepare(bundle, data, eval_data, s, Path(out), resume, replace)
    if rss_after_imports is None:
        rss_after_imports = load_runtime(run.train_bundle.engine)
    started = time.perf_counter()
    try:
        with PeakRSS() as peak:
            feature_seconds = None
            if run.s.cache_features:
                t0 = time.perf_counter()
                run.inputs, run.eval_inputs = feature_cache.cached_inputs(bundle, run.s.threads, run.x, run.x_eval,
                                                                          run.cache, run.out)
                feature_seconds = time.perf_counter() - t0
            engine = _open_engine(run, initial)
            first_step = run.pos.step
            progress = ProgressBar(run.total, run.s.quiet, done=first_step)
            earlier_seconds = run.pos.train_seconds  # training time of the processes before a resume
            with CheckpointOnInterrupt(engine, run.out, run.identity, run.pos, run.s.keep, progress,
                                       started - earlier_seconds) as guard:
                _train_epochs(run, engine, guard, progress, started - earlier_seconds)
                progress.close()
                train_seconds = time.perf_counter() - (started - earlier_seconds)
                op_summary = _profile_summary(run, engine, first_step)
                final_accuracy = _write_artifacts(run, engine, classes)
    finally:  # memory-mapped features never outlive the run, whatever ends it (a resume computes them again)
        run.inputs = run.eval_inputs = None  # closes memory-mapped caches before their files go
        feature_cache.remove(run.out)
    results = _results(run, classes, final_accuracy, train_seconds, feature_seconds, op_summary,
                       {"rss_after_imports": round(rss_after_imports / MB, 2),
                        "peak_rss_sampled": round(peak.bytes / MB, 2), "ru_maxrss": round(ru_maxrss_bytes() / MB, 2)})
    write_results(run.out, results)
    return results


def plan_run(bundle: Bundle, s: TrainSettings, n_train: int, n_eval: int,
             budget: int) -> tuple[feature_cache.CachePlan, int, int]:
    """A run on n_train examples scored on n_eval after every epoch: the feature-cache decision within `budget`
    bytes, its total steps and the epochs they span."""
    per_epoch = math.ceil(n_train / s.batch)
    total = s.steps or s.epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    read = min(total * s.batch, epochs * n_train) + epochs * n_eval  # examples the prefix would run on
    return feature_cache.plan(bundle, s.cache_features, n_train, n_eval, read, budget), total, epochs


def _prepare(bundle: Bundle, data: tuple[np.ndarray, np.ndarray], eval_data: tuple[np.ndarray, np.ndarray] | None,
             s: TrainSettings, out: Path, resume: bool, replace: bool) -> _Run:
    """Resolve the cache choice, check the engine can do what was asked, and find where the run starts."""
    x, y = data
    x_eval, y_eval = eval_data if eval_data is not None else (x[:0], y[:0])
    cache, total, epochs = plan_run(bundle, s, len(x), len(x_eval),
                                    s.memory_budget - rss_bytes() if s.memory_budget else available_bytes())
    s = dataclasses.replace(s, cache_features=cache.use)  # the resolved choice: part of the run's identity
    train_bundle = bundle.head if cache.use else bundle
    engine_class(train_bundle.engine)
    if s.profile_ops and train_bundle.engine != ORT_STEP:
        raise UserError(f"{bundle.path}: --profile-ops profiles the ort-step graph; this bundle's engine is "
                        f"{train_bundle.engine} (export with --engine ort-step)")
    identity = run_identity(bundle.path / MANIFEST, x, y, s)
    pos, resume_state = start(out, identity, resume, replace)
    if resume:
        print(f"{out}: resuming from step {pos.step} ({resume_state.relative_to(out)})" if resume_state else
              f"{out}: no checkpoint to resume from; starting at step 0", file=sys.stderr, flush=True)
    return _Run(bundle, s, out, x, y, x_eval, y_eval, total, epochs, cache, identity, pos, resume_state)


def _open_engine(run: _Run, initial: dict[str, np.ndarray] | None):
    """The engine on the bundle that trains, holding the applied adapter, `initial`, or the resumed state."""
    profiling = {}
    if run.s.profile_ops:  # onnxruntime writes its trace into the run folder, which must exist by then
        run.out.mkdir(parents=True, exist_ok=True)
        profiling = {"profile_prefix": str(run.out / "ort-profile")}
    engine = engine_class(run.train_bundle.engine)(run.train_bundle, threads=run.s.threads, **profiling)
    applied = run.bundle.applied_adapter()  # the head bundle of a probe shares its parent's applied adapter
    if applied:
        engine.load_trainable(applied)
    if initial:
        engine.load_trainable(initial)
    if run.resume_state is not None:  # rebuilds the engine's state whole: nothing of the old one is written to
        engine.load_state(str(run.resume_state))
    return engine


def _train_epochs(run: _Run, engine, guard: CheckpointOnInterrupt, progress: ProgressBar, t_zero: float) -> None:
    """Every remaining step, epoch by epoch, with checkpoints and a per-epoch evaluation. t_zero: perf_counter of
    step 0, the processes before a resume included."""
    s, pos = run.s, run.pos
    for epoch in range(pos.epoch, run.epochs):
        lr = lr_for_epoch(s, epoch, run.epochs)
        if epoch != pos.epoch:
            next_epoch(pos)
        t_epoch = guard.epoch_started = time.perf_counter() - pos.epoch_seconds
        meter, first = CpuMeter().start(), pos.step  # the epoch's CPU time, for edge_ft.device.board_time
        step_cpu: list[float] | None = [] if clock_every_step() else None  # timed by CPU time: every step's
        for idx in epoch_batch_indices(len(run.x), s.batch, s.seed, epoch)[pos.batch:]:
            if pos.step == run.total:
                break
            c0 = time.process_time() if step_cpu is not None else 0.0  # under a quota the clock is read twice an epoch
            progress.step(_train_step(run, engine, guard, idx, lr))
            if step_cpu is not None:
                step_cpu.append(time.process_time() - c0)
            if s.checkpoint_every and pos.step % s.checkpoint_every == 0:
                pos.epoch_seconds = time.perf_counter() - t_epoch
                pos.train_seconds = time.perf_counter() - t_zero
                save_checkpoint(engine, run.out, run.identity, pos, s.keep)
        cpu, busiest = meter.stop()
        median = float(np.median(step_cpu)) if step_cpu else None
        _log_epoch(run, engine, progress, epoch, lr, time.perf_counter() - t_epoch,
                   (pos.step - first, cpu, busiest, median))


def _train_step(run: _Run, engine, guard: CheckpointOnInterrupt, idx: np.ndarray, lr: float) -> float:
    """One optimizer step on the batch `idx`, recorded in run.pos (whole even when an interrupt cuts it short);
    returns its loss."""
    pos = run.pos
    xb, yb = run.batch_x(idx), run.y[idx]
    t0 = time.perf_counter()
    loss, logits = engine.train_step(xb, yb, lr)
    seconds = time.perf_counter() - t0
    if not math.isfinite(loss):
        raise UserError(f"training diverged at step {pos.step} (loss {loss}); lower --lr")
    hits, seen = pos.hits, pos.seen
    if logits is not None:
        hits, seen = hits + int((logits.argmax(1) == yb).sum()), seen + len(yb)
    guard.pending = StepDone(pos.step + 1, pos.batch + 1, loss, seconds, hits, seen)
    record_step(pos, guard.pending)
    guard.pending = None
    return loss


def _log_epoch(run: _Run, engine, progress: ProgressBar, epoch: int, lr: float, seconds: float,
               cpu: tuple[int, float, float, float | None]) -> None:
    """Evaluate and log a finished epoch; `cpu`: (steps this process ran of it, their CPU seconds over all threads,
    the busiest thread's, the median step's where every step was clocked), edge_ft.device.board_time."""
    pos = run.pos
    acc = run.eval_accuracy(engine)
    pos.epoch_log.append({"epoch": epoch, "steps": len(pos.epoch_losses), "seconds": round(seconds, 4),
                          "lr": lr, "mean_loss": float(np.mean(pos.epoch_losses)),
                          "train_accuracy": pos.hits / pos.seen if pos.seen else None,
                          "eval_accuracy": acc, "cpu_steps": cpu[0], "cpu_seconds": round(cpu[1], 6),
                          "busiest_cpu_seconds": round(cpu[2], 6),
                          **({} if cpu[3] is None else {"cpu_median_seconds": round(cpu[3], 7)})})
    progress.epoch(f"epoch {epoch + 1}/{run.epochs}: loss {np.mean(pos.epoch_losses):.4f}  {seconds:.2f} s"
                   + ("" if acc is None else f"  eval accuracy {acc:.4f}"))


def _profile_summary(run: _Run, engine, first_step: int) -> dict | None:
    """--profile-ops: onnxruntime's trace of this process's steps, summarized into the run folder."""
    if not run.s.profile_ops:
        return None
    trace = Path(engine.end_profiling())
    summary = summarize(trace, runs=run.pos.step - first_step)
    trace.unlink(missing_ok=True)
    atomic_write_json(run.out / PROFILE_FILE, summary)
    return summary


def _write_artifacts(run: _Run, engine, classes: list[str] | None) -> float | None:
    """final.state, trained.safetensors and model.onnx (stamped); returns the accuracy of model.onnx itself."""
    out, bundle = run.out, run.bundle
    trained = engine.trainable_state()
    engine.save_state(str(out / "final.state"))
    atomic_save_safetensors(out / TRAINED, trained, metadata={"format": "edge-ft-trained"})
    if run.s.cache_features:  # the head bundle lacks the prefix: write the whole network from the inference graph
        write_inference_model(bundle, merged_weights(bundle, trained), out / "model.onnx")
    else:
        engine.export_inference(str(out / "model.onnx"))
    stamp_model(out / "model.onnx", classes, model_source(bundle, made_by="edge-ft train"), bundle.input_shape)
    # Score the exported file itself with plain onnxruntime: what a user deploys is what we report.
    if not len(run.y_eval):
        return None
    return accuracy(predict(session_runner(inference_session(out / "model.onnx", run.s.threads)), run.x_eval),
                    run.y_eval)


def _results(run: _Run, classes: list[str] | None, final_accuracy: float | None, train_seconds: float,
             feature_seconds: float | None, op_summary: dict | None, memory_mb: DeviceMemory) -> TrainResults:
    """results.json's content (edge_ft.run_record's shared summary included)."""
    bundle, pos = run.bundle, run.pos
    results: TrainResults = {
        "bundle": {"path": str(bundle.path), "engine": bundle.engine, "method": bundle.manifest["method"],
                   "optimizer": bundle.manifest["optimizer"], "num_classes": bundle.num_classes,
                   "base": bundle.manifest["base"], "trainable": {k: list(v) for k, v in bundle.trainable.items()},
                   "applied_adapter": bundle.manifest.get("applied_adapter"),
                   **({"model": bundle.manifest["model"]} if "model" in bundle.manifest else {})},
        "classes": classes,
        "settings": {**asdict(run.s), "train_examples": len(run.x), "eval_examples": len(run.y_eval)},
        "steps": pos.step,
        "resumed_from": pos.resumed_from,
        "epochs": pos.epoch_log,
        "losses": [round(v, 7) for v in pos.losses],
        "accuracy": final_accuracy,
        "step_latency_ms": latency_ms(pos.step_seconds),
        "train_seconds": round(train_seconds, 4),
        "feature_cache_seconds": None if feature_seconds is None else round(feature_seconds, 4),
        "feature_cache": {**asdict(run.cache), "split": bundle.manifest.get("features", {}).get("first_trained")},
        "op_profile": None if op_summary is None else {"file": PROFILE_FILE, "ms_per_step": op_summary["ms_per_step"],
                                                       "by_op": op_summary["by_op"][:10]},
        "memory_mb": memory_mb,
        "cpu": epochs_cpu(pos.epoch_log, quota_from_env()),
        "bundle_bytes": file_sizes(bundle.path),
    }
    results["summary"] = make_summary(  # the keys every engine's results.json shares (edge_ft.run_record)
        bundle.engine, final_accuracy, pos.step,
        [{"epoch": i + 1, "seconds": e["seconds"], "loss": e["mean_loss"], "accuracy": e["eval_accuracy"]}
         for i, e in enumerate(pos.epoch_log)],
        np.asarray(pos.step_seconds) * 1e3, memory_mb["rss_after_imports"], memory_mb["peak_rss_sampled"])
    results["artifact_bytes"] = file_sizes(run.out)  # before results.json itself exists
    return results
