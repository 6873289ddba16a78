"""Shared by the ort-step tests: bundles exported once per test run (tracing a step takes seconds), real batches."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import torch

from edge_ft.checkpoint import save_base
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.data.batches import epoch_batches
from edge_ft.data.readers import read_mnist_5k
from edge_ft.host.export import export_bundle
from edge_ft.host.model import LeNet5

EXPORT_SEED = 0  # draws LoRA's A; the torch reference builds its model with the same seed
_ROOT = Path(tempfile.mkdtemp(prefix="edge-ft-ort-step-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@cache
def base_state() -> dict[str, np.ndarray]:
    """A seeded LeNet-5: parity and cost checks need real weights, not a trained model."""
    torch.manual_seed(1)
    return {k: v.numpy().copy() for k, v in LeNet5().state_dict().items()}


@cache
def base_path() -> Path:
    path = _ROOT / "base.safetensors"
    save_base(path, base_state(), {"task": "seeded-init"})
    return path


@cache
def bundle_path(cfg: MethodConfig, opt: OptimizerConfig) -> Path:
    out = _ROOT / f"bundle-{len(list(_ROOT.iterdir()))}"
    export_bundle(cfg, opt, base_path(), out, engine="ort-step", seed=EXPORT_SEED)
    return out


@cache
def mnist_batches(steps: int = 20, batch: int = 32, tail: int = 5,
                  classes: int = 10) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """`steps` real MNIST batches of digits < `classes` in the shared seeded order; the last has `tail` examples
    (a dynamic batch)."""
    x, y = read_mnist_5k()
    x, y = x[y < classes], y[y < classes]
    n = (steps - 1) * batch + tail
    return tuple(epoch_batches(x[:n], y[:n], batch, seed=0, epoch=0))
