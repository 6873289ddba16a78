"""The Python API for apps on the device: fine-tune an exported bundle from the app's own loop, torch-free.

    from edge_ft.device import Trainer

    trainer = Trainer("kit/bundle")                       # a folder `edge-ft export` wrote
    trainer.fit(x, y, epochs=3, eval_data=(x_test, y_test),
                callback=lambda p: p.stop() if p.eval_accuracy and p.eval_accuracy > 0.98 else None)
    trainer.evaluate(x_test, y_test).accuracy
    trainer.predict(["photo.png"], top_k=2)               # arrays, image files, folders or one .npz
    trainer.save_checkpoint("state/")                     # and Trainer.resume("kit/bundle", "state/")
    trainer.export_adapter("adapter/")                    # what `edge-ft adapter export` writes
    trainer.export_model("model.onnx")                    # forward-only, with its card: `edge-ft predict` runs it

Everything runs on numpy + onnxruntime (the `[device]` extra; pillow for image files) and goes through the code the
CLI runs: the bundle's own engine, the trainer's batch order and learning-rate schedule, the data checks of
`edge-ft train`, the adapter writer of `edge-ft adapter export`. Bad input raises `edge_ft.errors.UserError` with the
one-line message the CLI prints; nothing of onnxruntime or numpy leaks out as an error of its own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_ft.atomic import atomic_write_json
from edge_ft.checkpoint import sha256_file
from edge_ft.contracts import MANIFEST, RESULTS
from edge_ft.data.batches import epoch_batch_indices
from edge_ft.data.npz import agreed_classes, load_labelled_npz, to_float, validate_xy
from edge_ft.device import trainer as run_trainer
from edge_ft.device.adapter import check_adapter, holds_adapter, load_adapter, merge_adapter, write_adapter
from edge_ft.device.bundle import Bundle, load_bundle
from edge_ft.device.classify import Model, Prediction, gather_inputs, open_model, softmax, top_k
from edge_ft.device.engines import Engine, open_engine
from edge_ft.device.inference import EVAL_BATCH, accuracy
from edge_ft.device.model_card import model_source, stamp_model
from edge_ft.errors import UserError
from edge_ft.run_record import TrainResults
from edge_ft.training_defaults import DEFAULTS
from edge_ft.validate import writable_file, writable_folder

__all__ = ["Trainer", "Predictor", "FitProgress", "FitResult", "EpochResult", "Evaluation", "Prediction",
           "UserError", "train_run", "merge"]

Array = npt.NDArray[Any]
Inputs = npt.ArrayLike | str | Path | Sequence[str | Path]  # arrays, or image files / folders / one .npz
CHECKPOINT_STATE, CHECKPOINT_RECORD = "state.safetensors", "checkpoint.json"  # a Trainer checkpoint folder
CHECKPOINT_FORMAT = "edge-ft-api-checkpoint"


@dataclass(frozen=True)
class EpochResult:
    """One pass over the data given to `Trainer.epoch`."""

    epoch: int  # index of this epoch among every epoch the trainer has run (0 = its first)
    steps: int  # optimizer steps in it
    mean_loss: float  # mean training loss over its steps
    seconds: float  # wall time of its steps
    lr: float  # learning rate used


@dataclass
class FitProgress:
    """What `Trainer.fit` hands its callback after each epoch; call `stop()` to end training there."""

    epoch: int  # epochs finished in this fit (1 after the first)
    epochs: int  # epochs this fit was asked for
    step: int  # optimizer steps the trainer has taken in all
    loss: float  # mean training loss of the epoch just finished
    eval_accuracy: float | None  # accuracy on fit's eval_data, when given
    history: list[EpochResult] = field(default_factory=list)  # every epoch of this fit so far
    stopped: bool = False  # set by stop()

    def stop(self) -> None:
        """End the fit after this epoch (early stopping); the trainer keeps the weights it has now."""
        self.stopped = True


@dataclass(frozen=True)
class FitResult:
    """What `Trainer.fit` did."""

    epochs: list[EpochResult]  # the epochs run, in order
    steps: int  # optimizer steps taken by this fit
    stopped_early: bool  # the callback called stop() before the last epoch
    eval_accuracy: float | None  # on eval_data after the last epoch, when given


@dataclass(frozen=True)
class Evaluation:
    """Scores of the current weights on labelled data."""

    accuracy: float  # top-1 accuracy
    loss: float  # mean cross-entropy
    examples: int  # how many were scored


def _xy(x: npt.ArrayLike, y: npt.ArrayLike, bundle: Bundle, source: str) -> tuple[Array, Array]:
    """x and y checked as `edge-ft train` checks a .npz: x uint8 pixels or float32 inputs in the bundle's input
    shape, y integer labels below its class count. Returns (x as stored, y int64)."""
    try:
        xa, ya = np.asarray(x), np.asarray(y)
    except (ValueError, TypeError) as e:  # ragged lists
        raise UserError(f"{source}: x and y must be arrays ({e})") from None
    checked: tuple[Array, Array] = validate_xy(xa, ya, source, bundle.num_classes, bundle.input_shape)
    return checked


def _x(x: npt.ArrayLike, input_shape: tuple[int, ...], source: str) -> Array:
    """Unlabelled inputs, checked as `_xy` checks them."""
    xa = np.asarray(x)
    checked: Array = validate_xy(xa, np.zeros(len(xa) if xa.ndim else 0, np.int64), source, None,
                                 input_shape)[0]
    return checked


def _is_paths(inputs: Inputs) -> bool:
    return isinstance(inputs, (str, Path)) or (isinstance(inputs, (list, tuple)) and len(inputs) > 0
                                               and all(isinstance(i, (str, Path)) for i in inputs))


def _read(inputs: Inputs, classes: list[str] | None,
          input_shape: tuple[int, ...]) -> tuple[list[str], list[str | None], Array]:
    """(names, known labels, pixels or inputs) of an array, or of image files, folders or one .npz as
    `edge-ft predict` reads them."""
    if _is_paths(inputs):
        items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)  # type: ignore[arg-type]
        batch = gather_inputs([str(i) for i in items], classes, input_shape)
        return batch.names, batch.labels, batch.pixels
    x = _x(inputs, input_shape, "x")  # type: ignore[arg-type]
    return [f"x[{i}]" for i in range(len(x))], [None] * len(x), x


def _cross_entropy(logits: Array, y: Array) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean())


class Trainer:
    """Fine-tune one exported bundle in memory with the engine its manifest names (ort-step runs everywhere).

    Args:
        bundle: the bundle folder `edge-ft export` wrote.
        threads: onnxruntime intra-op threads (0: onnxruntime decides).
        lr: learning rate of the first epoch (default: the bundle's, i.e. the method's recipe).
        batch: examples per optimizer step in `epoch` and `fit` (default: the method's recipe).
        trust: public keys the bundle must be signed by (as `--trust`); keys installed with `edge-ft keys trust`
            apply too, and with neither the bundle is not checked.

    Raises:
        UserError: the bundle is missing, damaged, unsigned under a trust policy, or its engine cannot load here.

    """

    def __init__(self, bundle: str | Path, *, threads: int = 0, lr: float | None = None, batch: int | None = None,
                 trust: list[str] | None = None) -> None:
        _verify(trust, [bundle])
        self.bundle: Bundle = load_bundle(bundle)
        recipe = DEFAULTS[self.bundle.method.method]
        self.lr: float = float(lr if lr is not None else self.bundle.optimizer.lr)
        self.batch: int = batch if batch is not None else recipe.batch
        self.schedule: str = recipe.schedule
        self.epochs_default: int = recipe.epochs
        self.threads = threads
        if not self.lr > 0 or self.batch < 1:
            raise UserError(f"lr must be positive and batch at least 1, got lr={self.lr}, batch={self.batch}")
        run_trainer.load_runtime(self.bundle.engine)
        self._engine: Engine = open_engine(self.bundle, threads)
        self.steps: int = 0  # optimizer steps taken, across step(), epoch() and fit() (and a resumed checkpoint)
        self.epochs: int = 0  # epochs finished by epoch() and fit()

    @classmethod
    def resume(cls, bundle: str | Path, checkpoint: str | Path, **options: Any) -> Trainer:
        """A trainer on `bundle` continuing from a `save_checkpoint` folder (weights, optimizer state, counts).

        Raises:
            UserError: the checkpoint is missing, damaged or was saved from another bundle.

        """
        trainer = cls(bundle, **options)
        trainer.load_checkpoint(checkpoint)
        return trainer

    @property
    def classes(self) -> list[str] | None:
        """The class names the bundle was exported with (None when it was told none)."""
        return self.bundle.classes

    @property
    def num_classes(self) -> int:
        """The number of outputs of the bundle's head."""
        return self.bundle.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, e.g. (1, 28, 28); x holds (N, *input_shape) or, for one channel, (N, H, W)."""
        return self.bundle.input_shape

    def step(self, x: npt.ArrayLike, y: npt.ArrayLike, lr: float | None = None) -> float:
        """One optimizer step on one batch; returns its loss (before the update).

        Args:
            x: uint8 pixels (B, H, W) / (B, C, H, W), scaled by /255 as in training, or float32 model inputs.
            y: integer labels (B,), each below `num_classes`.
            lr: learning rate of this step (default: the trainer's `lr`).

        """
        xb, yb = _xy(x, y, self.bundle, "step")
        return self._step(to_float(xb), yb, self.lr if lr is None else lr)

    def _step(self, x: Array, y: Array, lr: float) -> float:
        if not lr > 0:
            raise UserError(f"learning rate must be positive, got {lr}")
        loss, _ = self._engine.train_step(x, y, lr)
        if not math.isfinite(loss):
            raise UserError(f"training diverged at step {self.steps} (loss {loss}); lower the learning rate")
        self.steps += 1
        return loss

    def epoch(self, x: npt.ArrayLike, y: npt.ArrayLike, *, lr: float | None = None, seed: int = 0) -> EpochResult:
        """One pass over (x, y) in shuffled batches of `batch`, in the order `edge-ft train` uses for this epoch."""
        xs, ys = _xy(x, y, self.bundle, "epoch")
        return self._epoch(xs, ys, self.lr if lr is None else lr, seed)

    def _epoch(self, x: Array, y: Array, lr: float, seed: int) -> EpochResult:
        losses, started = [], time.perf_counter()
        for idx in epoch_batch_indices(len(x), self.batch, seed, self.epochs):
            losses.append(self._step(to_float(x[idx]), y[idx], lr))
        result = EpochResult(self.epochs, len(losses), float(np.mean(losses)), time.perf_counter() - started, lr)
        self.epochs += 1
        return result

    def fit(self, x: npt.ArrayLike, y: npt.ArrayLike, *, epochs: int | None = None,
            eval_data: tuple[npt.ArrayLike, npt.ArrayLike] | None = None, schedule: str | None = None,
            seed: int = 0, callback: Callable[[FitProgress], object] | None = None) -> FitResult:
        """Train for `epochs` epochs with the recipe's learning-rate schedule, as `edge-ft train` does.

        Args:
            x: training inputs, as for `step`.
            y: training labels.
            epochs: passes over the data (default: the method's recipe, 20).
            eval_data: (x, y) scored after every epoch; the accuracy goes to the callback.
            schedule: "constant" or "cosine" over this fit's epochs (default: the recipe's).
            seed: batch-order seed.
            callback: called with a `FitProgress` after every epoch; `progress.stop()` ends the fit there.

        """
        xs, ys = _xy(x, y, self.bundle, "fit")
        held = None if eval_data is None else _xy(eval_data[0], eval_data[1], self.bundle, "eval_data")
        settings = run_trainer.TrainSettings(batch=self.batch, epochs=epochs or self.epochs_default, lr=self.lr,
                                             schedule=schedule or self.schedule, seed=seed)
        history: list[EpochResult] = []
        first_step, acc, stopped = self.steps, None, False
        for i in range(settings.epochs):
            history.append(self._epoch(xs, ys, run_trainer.lr_for_epoch(settings, i, settings.epochs), seed))
            acc = None if held is None else self._evaluate(*held).accuracy
            if callback is not None:
                progress = FitProgress(i + 1, settings.epochs, self.steps, history[-1].mean_loss, acc, list(history))
                callback(progress)
                if progress.stopped:
                    stopped = i + 1 < settings.epochs
                    break
        return FitResult(history, self.steps - first_step, stopped, acc)

    def logits(self, x: npt.ArrayLike) -> Array:
        """Raw outputs (N, num_classes) of the current weights for inputs x (as for `step`)."""
        return self._logits(_x(x, self.input_shape, "x"))

    def _logits(self, x: Array) -> Array:
        parts = [self._engine.logits(to_float(x[i : i + EVAL_BATCH])) for i in range(0, len(x), EVAL_BATCH)]
        return np.concatenate(parts)

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike) -> Evaluation:
        """Accuracy and mean cross-entropy of the current weights on (x, y)."""
        return self._evaluate(*_xy(x, y, self.bundle, "evaluate"))

    def _evaluate(self, x: Array, y: Array) -> Evaluation:
        logits = self._logits(x)
        return Evaluation(accuracy(logits, y), _cross_entropy(logits, y), len(y))

    def predict(self, inputs: Inputs, top_k: int = 1) -> list[Prediction]:
        """Classify with the current weights: an array of inputs (as for `step`), or image files, folders of
        images (a parent folder named like a class is the label) or one .npz, read as `edge-ft predict` reads them.
        """
        names, labels, x = _read(inputs, self.classes, self.input_shape)
        return top_k_of(softmax(self._logits(x)), top_k, self.classes, names, labels)

    def trained_tensors(self) -> dict[str, Array]:
        """Copies of the tensors training changes (what an adapter ships), by parameter name."""
        return self._engine.trainable_state()

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Weights, optimizer state and counts into `folder` (each file atomic; checkpoint.json, written last,
        commits it). `Trainer.resume(bundle, folder)` continues from it."""
        out = writable_folder(folder, option="checkpoint")
        out.mkdir(parents=True, exist_ok=True)
        (out / CHECKPOINT_RECORD).unlink(missing_ok=True)  # uncommitted until the new record is written
        self._engine.save_state(str(out / CHECKPOINT_STATE))
        atomic_write_json(out / CHECKPOINT_RECORD, {
            "format": CHECKPOINT_FORMAT, "format_version": 1, "steps": self.steps, "epochs": self.epochs,
            "bundle_manifest_sha256": sha256_file(self.bundle.path / MANIFEST),
            "state_sha256": sha256_file(out / CHECKPOINT_STATE)})
        return out

    def load_checkpoint(self, folder: str | Path) -> None:
        """Continue from what `save_checkpoint` wrote for this bundle."""
        folder = Path(folder)
        record_path, state = folder / CHECKPOINT_RECORD, folder / CHECKPOINT_STATE
        try:
            record = json.loads(record_path.read_text())
            if record.get("format") != CHECKPOINT_FORMAT or record.get("format_version") != 1:
                raise ValueError(f"format {record.get('format')!r}")
            steps, epochs = record["steps"], record["epochs"]
            if type(steps) is not int or type(epochs) is not int or steps < 0 or epochs < 0:
                raise ValueError("steps and epochs must be counts")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError,
                AttributeError) as e:
            raise UserError(f"{record_path}: not a readable edge-ft checkpoint ({e}); save one with "
                            "Trainer.save_checkpoint") from None
        if record.get("bundle_manifest_sha256") != sha256_file(self.bundle.path / MANIFEST):
            raise UserError(f"{folder}: saved from another bundle than {self.bundle.path}; resume with the bundle "
                            "it was trained from")
        if not state.is_file() or sha256_file(state) != record.get("state_sha256"):
            raise UserError(f"{state}: missing or does not match {record_path}; the checkpoint was changed")
        self._engine.load_state(str(state))
        self.steps, self.epochs = steps, epochs

    def export_adapter(self, folder: str | Path, dtype: str = "float32", force: bool = False) -> Path:
        """Write the trained tensors as an adapter folder, as `edge-ft adapter export` does for a run.

        Raises:
            UserError: `folder` already holds an adapter and `force` is not set, or dtype is unknown.

        """
        out = writable_folder(folder, option="adapter folder")
        if holds_adapter(out) and not force:
            raise UserError(f"{out}: already holds an adapter; pass force=True to replace it, or choose another "
                            "folder")
        out.mkdir(parents=True, exist_ok=True)
        write_adapter(out, self.trained_tensors(), self.bundle.method, self.bundle.manifest["base"], self.classes,
                      dtype)
        check_adapter(self.bundle, load_adapter(out))  # what `adapter apply` and `merge` will check
        return out

    def export_model(self, path: str | Path) -> Path:
        """Write a forward-only model.onnx with the current weights and its card (class names, input scaling):
        what `edge-ft adapter merge` writes, for `Predictor`, `edge-ft predict` or plain onnxruntime."""
        out = writable_file(path, option="model")
        self._engine.export_inference(str(out))
        stamp_model(out, self.classes, model_source(self.bundle, made_by="edge_ft.device.api"),
                    self.input_shape)
        return out


class Predictor:
    """A trained model.onnx (or a run folder holding one), read with its card, as `edge-ft predict` reads it.

    Args:
        model: model.onnx from `edge-ft train`, `edge-ft adapter merge` or `Trainer.export_model`, or a run folder.
        threads: onnxruntime intra-op threads (0: onnxruntime decides).

    """

    def __init__(self, model: str | Path, *, threads: int = 0) -> None:
        self.model: Model = open_model(model, threads)

    @property
    def classes(self) -> list[str] | None:
        """The class names in the model's card."""
        return self.model.card.classes

    def probabilities(self, x: npt.ArrayLike) -> Array:
        """Class probabilities (N, C) for uint8 pixels or float32 inputs of the model's input shape."""
        probs: Array = self.model.probabilities(_x(x, self.model.card.input_shape, "x"))
        return probs

    def predict(self, inputs: Inputs, top_k: int = 1) -> list[Prediction]:
        """Top-k classes for an array of inputs, image files, folders of images or one .npz."""
        names, labels, x = _read(inputs, self.classes, self.model.card.input_shape)
        probs: Array = self.model.probabilities(x)
        return top_k_of(probs, top_k, self.classes, names, labels)


def top_k_of(probs: Array, k: int, classes: list[str] | None, names: list[str],
             labels: list[str | None]) -> list[Prediction]:
    rows: list[Prediction] = top_k(probs, k, classes, names, labels)
    return rows


def _verify(trust: list[str] | None, folders: list[str | Path]) -> None:
    """Under a trust policy (`trust` keys or installed ones) every folder must be signed by a trusted key."""
    from edge_ft.trust.policy import check, load_policy

    policy = load_policy(trust)
    if policy is not None:
        for folder in folders:
            check(policy, folder)


def merge(bundle: str | Path, adapter: str | Path, out: str | Path, *, trust: list[str] | None = None) -> Path:
    """Fold an adapter into the bundle's weights: one forward-only model.onnx with its card, as
    `edge-ft adapter merge` writes it."""
    target = writable_file(out, option="model")
    _verify(trust, [bundle, adapter])
    merge_adapter(load_bundle(bundle), adapter, target)
    return target


def train_run(bundle: str | Path, data: str | Path | tuple[npt.ArrayLike, npt.ArrayLike], out: str | Path, *,
              eval_data: str | Path | tuple[npt.ArrayLike, npt.ArrayLike] | None = None, epochs: int | None = None,
              steps: int | None = None, batch: int | None = None, lr: float | None = None,
              schedule: str | None = None, seed: int = 0, threads: int = 0, checkpoint_every: int = 0,
              keep: int = 3, cache_features: bool | None = None, resume: bool = False, force: bool = False,
              quiet: bool = True, trust: list[str] | None = None) -> TrainResults:
    """`edge-ft train` as a function: train a bundle into a run folder (model.onnx, trained tensors,
    checkpoints, results.json) and return results.json's contents. Data is a .npz path or an (x, y) pair.

    The same trainer runs, with the same recipe defaults, the same refusals (a finished run is replaced only with
    `force`, an unfinished one continued only with `resume`) and the same Ctrl-C checkpoint.
    """
    folder = writable_folder(out, option="run folder")
    if (folder / RESULTS).is_file() and not force:
        what = "there is nothing to resume" if resume else "choose another out"
        raise UserError(f"{folder}: holds a finished run (results.json); {what}, or pass force=True to train it "
                        "again from step 0 and replace it")
    _verify(trust, [bundle])
    b = load_bundle(bundle)
    settings = run_settings(b, epochs=epochs, steps=steps, batch=batch, lr=lr, schedule=schedule, seed=seed,
                            threads=threads, checkpoint_every=checkpoint_every, keep=keep,
                            cache_features=cache_features, quiet=quiet)
    rss = run_trainer.load_runtime(b.engine)
    x, y, classes = _labelled(data, b, "data")
    held = None
    if eval_data is not None:
        xe, ye, eval_classes = _labelled(eval_data, b, "eval_data")
        held = (xe, ye)
        classes = agreed_classes(classes, str(data), eval_classes, str(eval_data))
    classes = agreed_classes(classes, "data", b.classes, str(b.path / MANIFEST))
    results: TrainResults = run_trainer.train(b, (x, y), held, settings, folder, rss, resume=resume,
                                                classes=classes, replace=force)
    return results


def run_settings(bundle: Bundle, *, epochs: int | None = None, steps: int | None = None, batch: int | None = None,
                 lr: float | None = None, schedule: str | None = None, **rest: Any) -> run_trainer.TrainSettings:
    """TrainSettings for `bundle`: what is not given comes from its method's recipe and the bundle's optimizer."""
    recipe = DEFAULTS[bundle.method.method]
    return run_trainer.TrainSettings(batch=batch or recipe.batch, epochs=epochs or recipe.epochs, steps=steps,
                                     lr=lr or bundle.optimizer.lr, schedule=schedule or recipe.schedule, **rest)


def _labelled(data: str | Path | tuple[npt.ArrayLike, npt.ArrayLike], bundle: Bundle,
              name: str) -> tuple[Array, Array, list[str] | None]:
    if isinstance(data, (str, Path)):
        loaded: tuple[Array, Array, list[str] | None] = load_labelled_npz(data, bundle.num_classes,
                                                                          bundle.input_shape)
        return loaded
    x, y = _xy(data[0], data[1], bundle, name)
    return x, y, None
