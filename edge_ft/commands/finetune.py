"""`edge-ft finetune`: reference fine-tuning in PyTorch, one run or the whole accuracy table (--all)."""

from __future__ import annotations

from pathlib import Path

from edge_ft.commands.argtypes import add_lora_options, method_config
from edge_ft.commands.pretrain import DEFAULT_BASE
from edge_ft.config import METHODS, OPTIMIZERS
from edge_ft.contracts import TORCH
from edge_ft.errors import UserError, require_host
from edge_ft.training_defaults import recipe_default

ENGINES = (TORCH,)  # the ORT engines train exported bundles through `edge-ft train`


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune the base model on a task (full, probe or LoRA) in PyTorch, or build the accuracy table",
        description="Fine-tune LeNet-5 from base weights on a transfer task with the PyTorch reference engine and "
        "write the trained tensors (LoRA: the adapter; probe: the head; full: all weights) and results.json. "
        "Unset training options take the method's defaults (edge_ft/training_defaults.py). "
        "--all fine-tunes every method on every task with 3 seeds and writes table.md and table.json.",
    )
    p.add_argument("--all", action="store_true", help="build the accuracy table (all tasks unless --task is given)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help=f"{' | '.join(METHODS)} (required without --all)")
    add_lora_options(p)
    p.add_argument("--task", default=None,
                   help="mnist-digits | mnist-fashion | a folder with train.npz + test.npz (`edge-ft data export`, "
                   "or `edge-ft data convert --test-fraction` of your images)")
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help=f"base weights (default: {DEFAULT_BASE})")
    p.add_argument("--engine", choices=ENGINES, default=TORCH, help=f"training engine (default: {TORCH})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the training set (default: {recipe_default('epochs')})")
    p.add_argument("--batch", type=int, default=None, help=f"examples per step (default: {recipe_default('batch')})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate, cosine-decayed per epoch (default: {recipe_default('lr')})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"{' | '.join(OPTIMIZERS)} (default: {recipe_default('optimizer')})")
    p.add_argument("--shots", type=int, default=None, help="training examples per class (default: the task's)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order (default: 0)")
    p.add_argument("--seeds", type=int, default=3, help="--all: number of seeds, 0..N-1 (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, fastest for LeNet-5)")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (default: runs/finetune/TASK-METHOD-sSEED; --all: runs/table)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    require_host("edge-ft finetune")
    if not args.base.is_file():
        raise UserError(f"{args.base}: no base weights; create them with `edge-ft pretrain --out {args.base}`")
    for name in ("epochs", "batch", "shots", "seeds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    return run_table(args) if args.all else run_one(args)


def run_one(args) -> int:
    from edge_ft.checkpoint import load_base
    from edge_ft.config import OptimizerConfig
    from edge_ft.data.tasks import resolve_split
    from edge_ft.host.finetune import finetune, method_label, save_run
    from edge_ft.training_defaults import DEFAULTS

    if args.method is None or args.task is None:
        raise UserError("give --method and --task (or --all for the accuracy table)")
    base_state, base_meta = load_base(args.base)
    split = resolve_split(args.task, args.shots)
    cfg = method_config(args, args.method, split.num_classes, int(base_state["fc3.bias"].shape[0]))
    recipe = DEFAULTS[cfg.method]
    opt = OptimizerConfig(args.optimizer or recipe.optimizer, lr=recipe.lr if args.lr is None else args.lr)
    weights, results = finetune(split, base_state, cfg, opt, args.epochs or recipe.epochs, args.batch or recipe.batch,
                                args.seed, args.threads, args.quiet, recipe.schedule)
    results["base"] = {"path": str(args.base), "sha256": base_meta.get("sha256"), "accuracy": base_meta.get("accuracy")}
    slug = Path(args.task).name if Path(args.task).is_dir() else args.task.replace("→", "-")
    out = args.out or Path("runs/finetune") / f"{slug}-{method_label(cfg)}-s{args.seed}"
    save_run(out, weights, results)
    print(f"{results['task']} {results['label']}: accuracy {results['accuracy_before']:.4f} -> "
          f"{results['accuracy_after']:.4f}, {results['trainable_params']:,} trainable params, "
          f"{results['ms_per_step_p50']:.2f} ms/step p50, {results['wall_time_s']:.1f} s -> {out}/")
    return 0


def run_table(args) -> int:
    from edge_ft.data.tasks import TASKS, get_task
    from edge_ft.host.table import run_table as build
    from edge_ft.host.table import to_markdown, write_table

    if args.method is not None:
        raise UserError("--all runs every method; drop --method (or drop --all for a single run)")
    overridden = [f"--{n}" for n in ("epochs", "batch", "lr", "optimizer") if getattr(args, n) is not None]
    if overridden:
        raise UserError(f"--all uses each method's default recipe; drop {', '.join(overridden)}")
    tasks = (get_task(args.task),) if args.task else TASKS
    table = build(args.base, tasks, seeds=tuple(range(args.seeds)), shots=args.shots, threads=args.threads,
                  quiet=args.quiet)
    md, js = write_table(table, args.out or Path("runs/table"))
    print(to_markdown(table), end="")
    print(f"-> {md}, {js}")
    return 0
