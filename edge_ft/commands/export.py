"""`edge-ft export`: turn base weights + a method + an optimizer into a bundle the device trains without torch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edge_ft.architecture import numel
from edge_ft.commands.argtypes import (
    add_lora_options,
    add_method_options,
    input_shape,
    int_at_least,
    method_config,
    positive_float,
)
from edge_ft.config import METHODS, OPTIMIZERS
from edge_ft.contracts import BUNDLE_ENGINES, MANIFEST, ORT_STEP
from edge_ft.errors import UserError, require_host
from edge_ft.training_defaults import recipe_default


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a training bundle (graphs, weights, manifest) for on-device fine-tuning (host)",
        description="Build the method's model on the base weights and export the bundle an engine trains on the "
        "device: for ort-training ONNX Runtime training artifacts, for ort-step one ai.onnx graph per step. "
        "Bundles whose first layers stay frozen (probe, LoRA on linear layers, last-k) also carry features.onnx "
        "(those layers) and a head bundle (the rest), so `edge-ft train` computes the frozen prefix once per example.",
    )
    p.add_argument("--method", choices=METHODS, required=True, help=" | ".join(METHODS))
    p.add_argument("--base", required=True, metavar="BASE.safetensors",
                   help="base weights: a state dict in safetensors (from `edge-ft pretrain` for LeNet-5)")
    p.add_argument("--model", default=None, metavar="PKG.MODULE:CLASS|FILE.py:CLASS",
                   help="the network, an nn.Module class that builds with no arguments; traced once with torch.fx "
                   "and described in the manifest (default: LeNet-5)")
    p.add_argument("--input-shape", type=input_shape, default=None, metavar="C,H,W",
                   help="one example's shape, needed with --model (default: LeNet-5's 1,28,28)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="bundle folder to write (default: export/METHOD-ENGINE relative to the current directory, "
                   "with LoRA's rank or last-k's K in the name: export/full-ort-step, export/lora-r2-ort-step, "
                   "export/last-k1-ort-step)")
    p.add_argument("--engine", choices=BUNDLE_ENGINES, default=ORT_STEP,
                   help="device engine (default ort-step: plain onnxruntime, runs on every board; ort-training "
                   "needs the onnxruntime-training wheel, x86_64 only)")
    add_lora_options(p)
    add_method_options(p)
    p.add_argument("--num-classes", type=int_at_least(2), default=None, metavar="N",
                   help="classes of the target task (default: the base's; a new count re-initialises the head)")
    p.add_argument("--classes", metavar="NAME,NAME,...|DATA.npz|FOLDER",
                   help="class names of the target task, a .npz that carries them, or a folder of class folders "
                   "(their sorted names, as `edge-ft data convert` labels them) (sets --num-classes; "
                   "default: the base's names when the count is the base's)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"optimizer (default: {recipe_default('optimizer')}); ort-training offers sgd and adamw")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"learning rate stored in the bundle (default: {recipe_default('lr')})")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA A / a new head (default 0)")
    p.add_argument("--force", action="store_true", help="replace a bundle already in --out")
    p.add_argument("--sign-key", metavar="KEY", help="sign the bundle with this private key (`edge-ft keys new`), "
                   "so devices with a trust policy train it")
    p.add_argument("--sign-version", type=int_at_least(1), default=1, metavar="N",
                   help="release number of the signed bundle, monotonic per name")
    p.add_argument("--sign-name", metavar="NAME", help="name versions count for (default: the bundle folder's)")
    p.set_defaults(func=handler)


def handler(args) -> int:
    require_host("edge-ft export")
    from edge_ft.validate import writable_folder

    if args.sign_key:  # a bad key is refused before anything is written
        from edge_ft.trust.keys import load_private_key

        load_private_key(args.sign_key)

    args.out = args.out or default_out(args.method, args.engine, rank=args.rank, last_k=args.last_k)
    writable_folder(args.out)
    from edge_ft.checkpoint import load_base
    from edge_ft.config import OptimizerConfig
    from edge_ft.host.describe import host_model
    from edge_ft.host.export import export_bundle
    from edge_ft.training_defaults import DEFAULTS

    host = host_model(args.model, args.input_shape)
    _, meta = load_base(args.base, head=host.desc.output, model=host.desc.title)
    host = replace(host, desc=host.desc.with_num_classes(meta["num_classes"]))  # the base's head
    classes = task_classes(args.classes) if args.classes else None
    if classes and args.num_classes and args.num_classes != len(classes):
        raise UserError(f"--num-classes {args.num_classes} but --classes names {len(classes)} classes")
    num_classes = len(classes) if classes else args.num_classes or meta["num_classes"]
    if classes is None and num_classes == meta["num_classes"]:
        classes = meta.get("classes")  # same head: the base's names still hold
    if (Path(args.out) / MANIFEST).is_file() and not args.force:
        raise UserError(f"{args.out}: already holds a bundle (manifest.json); choose another --out, or add --force "
                        "to replace it")
    cfg = method_config(args, args.method, num_classes, meta["num_classes"], host.desc)
    recipe = DEFAULTS[args.method]
    opt = OptimizerConfig(args.optimizer or recipe.optimizer, lr=args.lr or recipe.lr, weight_decay=args.weight_decay)
    manifest = export_bundle(cfg, opt, args.base, args.out, engine=args.engine, seed=args.seed, classes=classes,
                             host=host)
    files = len(manifest["files"]) + 1  # the table lists every file but manifest.json itself
    total = sum(f["bytes"] for f in manifest["files"].values()) + (Path(args.out) / MANIFEST).stat().st_size
    trainable = sum(numel(s) for s in manifest["trainable"].values())
    print(f"{Path(args.out)}: {args.engine} bundle, {cfg.method}, {trainable:,} trainable values, "
          f"{files} files, {total / 1024:.1f} KiB")
    if args.sign_key:
        from edge_ft.trust.signature import sign_folder

        body = sign_folder(args.out, args.sign_key, args.sign_version, args.sign_name)
        print(f"{Path(args.out)}: signed by key {body['keyid'][:16]}, {body['name']} version {body['version']}, "
              f"expires {body['expires']}")
    return 0


def default_out(method: str, engine: str, rank: int, last_k: int) -> Path:
    """export/<method>-<engine>, the method named with what sets its size: lora-r2, last-k1."""
    name = {"lora": f"lora-r{rank}", "last-k": f"last-k{last_k}"}.get(method, method)
    return Path("export") / f"{name}-{engine}"


def task_classes(text: str) -> list[str]:
    """--classes: 'a,b,c', a .npz whose class names to use, or a folder of class folders (their sorted names)."""
    from edge_ft.data.npz import load_labelled_npz, parse_class_names

    if Path(text).is_dir():
        from edge_ft.data.readers import class_folders

        names = class_folders(Path(text))
        if len(names) < 2:
            raise UserError(f"--classes {text}: is a folder with {len(names)} class folder(s); give a folder of "
                            "class folders, NAME,NAME,..., or the .npz `edge-ft data convert` makes of your images")
        return names
    if not text.endswith(".npz"):
        return parse_class_names(text)
    classes = load_labelled_npz(text)[2]
    if classes is None:
        raise UserError(f"--classes {text}: the file names no classes; give them as --classes NAME,NAME,...")
    return classes
