"""Reference fine-tuning (engine `torch`): one method on one task from base weights, measured and saved."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import psutil
import torch

from edge_ft.atomic import atomic_save_safetensors, atomic_write_json
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.contracts import RESULTS
from edge_ft.data.tasks import Split
from edge_ft.host.methods import adapter_state, build_model, count_trainable
from edge_ft.host.train import DEFAULT_THREADS, accuracy, set_determinism, state_to_numpy, train_epochs
from edge_ft.run_record import SUMMARY, make_summary

WEIGHTS_FILE = "weights.safetensors"  # LoRA: the adapter alone; probe: the head alone; full: every weight


def method_label(cfg: MethodConfig) -> str:
    """'full', 'probe', 'lora-r2' (plus targets/saved modules/bias when they differ from the defaults)."""
    if cfg.method != "lora":
        return cfg.method
    label = f"lora-r{cfg.rank}"
    if cfg.targets != MethodConfig().targets:
        label += "-" + "+".join(cfg.targets)
    if cfg.modules_to_save:
        label += "-save-" + "+".join(cfg.modules_to_save)
    if cfg.bias != "none":
        label += f"-bias-{cfg.bias}"
    return label


def finetune(
    split: Split,
    base_state: dict[str, np.ndarray],
    method: MethodConfig,
    opt_cfg: OptimizerConfig,
    epochs: int,
    batch: int,
    seed: int = 0,
    threads: int | None = DEFAULT_THREADS,
    quiet: bool = False,
    schedule: str = "constant",
    eval_each_epoch: bool = True,
) -> tuple[dict[str, np.ndarray], dict]:
    """Fine-tune and return (the trained tensors only, results with accuracy before/after and costs)."""
    rss_after_imports = psutil.Process().memory_info().rss  # torch and the data loaded, nothing trained yet
    set_determinism(seed, threads)
    model = build_model(method, {k: torch.from_numpy(v) for k, v in base_state.items()}, seed=seed)
    before = accuracy(model, split.x_test, split.y_test)  # zero-shot, or a fresh head when classes changed
    history = train_epochs(model, split, opt_cfg, epochs, batch, seed, quiet, method_label(method), schedule,
                           eval_each_epoch=eval_each_epoch)
    trainable, total = count_trainable(model)
    results = {
        "engine": "torch",
        "task": split.info.get("task"),
        "data": split.info,
        "method": method.to_dict(),
        "label": method_label(method),
        "optimizer": opt_cfg.to_dict(),
        "epochs_run": epochs,
        "batch": batch,
        "schedule": schedule,
        "seed": seed,
        "accuracy_before": round(before, 6),
        "accuracy_after": history.epochs[-1]["test_accuracy"] if history.epochs else round(before, 6),
        "trainable_params": trainable,
        "total_params": total,
        **history.summary(),
        "rss_after_imports_mb": round(rss_after_imports / 2**20, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    results[SUMMARY] = make_summary(  # the keys every engine's results.json shares (edge_ft.run_record)
        "torch", results["accuracy_after"], results["steps"],
        [{"epoch": e["epoch"], "seconds": e["seconds"], "loss": e["loss"], "accuracy": e["test_accuracy"]}
         for e in history.epochs],
        np.asarray(history.step_seconds) * 1e3, results["rss_after_imports_mb"], results["peak_rss_mb"])
    return state_to_numpy(adapter_state(model)), results


def save_run(run_dir: str | Path, weights: dict[str, np.ndarray], results: dict) -> Path:
    """RUN_DIR/weights.safetensors (method and base recorded in its metadata) and RUN_DIR/results.json."""
    run_dir = Path(run_dir)
    metadata = {
        "format": "edge-ft-finetuned",
        "method": json.dumps(results["method"]),
        "base_sha256": str(results.get("base", {}).get("sha256", "")),
    }
    atomic_save_safetensors(run_dir / WEIGHTS_FILE, weights, metadata=metadata)
    atomic_write_json(run_dir / RESULTS, results)
    return run_dir
