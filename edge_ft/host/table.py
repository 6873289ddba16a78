"""The accuracy table: every task x {zero-shot, full, probe, LoRA r=2/4/8}, mean ± spread over seeds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_ft.atomic import atomic_write_json, atomic_write_text
from edge_ft.checkpoint import load_base
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.data.tasks import TASKS, Task, target_split
from edge_ft.host.finetune import finetune, method_label
from edge_ft.host.methods import build_model
from edge_ft.host.train import DEFAULT_THREADS, accuracy
from edge_ft.training_defaults import DEFAULTS

TABLE_SEEDS = (0, 1, 2)
TABLE_RANKS = (2, 4, 8)


def table_methods(num_classes: int, ranks=TABLE_RANKS) -> list[MethodConfig]:
    return [MethodConfig("full", num_classes=num_classes), MethodConfig("probe", num_classes=num_classes)] + [
        MethodConfig("lora", rank=r, alpha=2.0 * r, num_classes=num_classes) for r in ranks  # alpha/r = 2 always
    ]


def run_table(
    base_path: str | Path,
    tasks: tuple[Task, ...] = TASKS,
    seeds=TABLE_SEEDS,
    ranks=TABLE_RANKS,
    shots: int | None = None,
    threads: int | None = DEFAULT_THREADS,
    quiet: bool = False,
) -> dict:
    """Fine-tune every method on every task with each seed using the default recipes; return the table as a dict."""
    base_state, base_meta = load_base(base_path)
    start = time.perf_counter()
    splits = {task.slug: target_split(task, shots) for task in tasks}  # shots=None: task default
    runs = [(task, cfg, seed) for task in tasks
            for cfg in table_methods(splits[task.slug].num_classes, ranks) for seed in seeds]
    rows: dict[str, dict] = {}
    with tqdm(runs, desc="accuracy table", disable=quiet, unit="run") as bar:
        for task, cfg, seed in bar:
            split, label = splits[task.slug], method_label(cfg)
            bar.set_postfix_str(f"{task.slug} {label} seed {seed}")
            row = rows.setdefault(task.slug, _task_row(task, split, base_state))
            recipe = DEFAULTS[cfg.method]
            _, res = finetune(split, base_state, cfg, OptimizerConfig(recipe.optimizer, lr=recipe.lr), recipe.epochs,
                              recipe.batch, seed, threads, quiet=True, schedule=recipe.schedule, eval_each_epoch=False)
            entry = row["methods"].setdefault(label, {
                "label": label, "method": cfg.to_dict(), "recipe": vars(recipe),
                "trainable_params": res["trainable_params"],
                "accuracies": [], "train_seconds": [], "ms_per_step_p50": []})
            entry["accuracies"].append(res["accuracy_after"])
            entry["train_seconds"].append(round(float(res["wall_time_s"]), 3))
            entry["ms_per_step_p50"].append(res["ms_per_step_p50"])
    for row in rows.values():
        for entry in row["methods"].values():
            acc = np.asarray(entry["accuracies"])
            entry["mean"] = round(float(acc.mean()), 4)
            entry["std"] = round(float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, 4)  # sample std over seeds
            entry["min"], entry["max"] = float(acc.min()), float(acc.max())
        row["methods"] = list(row["methods"].values())
    return {
        "base": {"path": str(base_path), "sha256": base_meta.get("sha256"), "accuracy": base_meta.get("accuracy"),
                 "source": base_meta.get("source")},
        "seeds": list(seeds),
        "engine": "torch",
        "threads": torch.get_num_threads(),
        "tasks": list(rows.values()),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }


def _task_row(task: Task, split, base_state) -> dict:
    """Task header: data counts and the zero-shot accuracy (base model, head unchanged, no training)."""
    model = build_model(MethodConfig("full", num_classes=10), {k: torch.from_numpy(v) for k, v in base_state.items()})
    zero_shot = accuracy(model, split.x_test, split.y_test) if split.num_classes == 10 else None
    return {"task": task.name, "slug": task.slug, "summary": task.summary, "n_train": len(split.y_train),
            "n_test": len(split.y_test), "shots": split.info.get("shots"), "zero_shot": zero_shot, "methods": {}}


def to_markdown(table: dict) -> str:
    labels = [m["label"] for m in table["tasks"][0]["methods"]]
    head = ["task", "zero-shot"] + [lbl.replace("lora-r", "LoRA r=") for lbl in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["tasks"]:
        shots = "whole pool" if row["shots"] is None else f"{row['shots']}/class"
        cells = [f"{row['task']} ({row['n_train']} train = {shots}, {row['n_test']} test)",
                 "n/a" if row["zero_shot"] is None else f"{row['zero_shot']:.3f}"]
        cells += [f"{m['mean']:.3f} ± {m['std']:.3f} ({m['trainable_params']:,} p)" for m in row["methods"]]
        lines.append("| " + " | ".join(cells) + " |")
    base = table["base"]
    lines += [
        "",
        f"Mean ± sample standard deviation of test accuracy over seeds {', '.join(map(str, table['seeds']))} "
        "(the seed sets initialisation and batch order; the data split is fixed); (N p) = trainable parameters.",
        f"Base: LeNet-5 pretrained on {base['source']}, held-out accuracy {base['accuracy']}.",
        "Zero-shot = the base model, MNIST head unchanged, no training. For Fashion-MNIST the MNIST head's classes "
        "mean nothing, so zero-shot is at or below chance (0.10).",
        f"Engine torch, {table['threads']} thread(s); whole table {table['wall_time_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def write_table(table: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "table.json", table)
    atomic_write_text(out_dir / "table.md", to_markdown(table))
    return out_dir / "table.md", out_dir / "table.json"
