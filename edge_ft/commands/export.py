"""`edge-ft export`: turn base weights + a method + an optimizer into a bundle the device trains without torch."""

from __future__ import annotations

from pathlib import Path

from edge_ft.architecture import numel
from edge_ft.commands.argtypes import add_lora_options, add_method_options, input_shape, int_at_least, positive_float
from edge_ft.config import METHODS, OPTIMIZERS
from edge_ft.contracts import BUNDLE_ENGINES, MANIFEST, ORT_STEP
from edge_ft.errors import require_host
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
    if args.sign_key:  # a bad key is refused before anything is written
        from edge_ft.trust.keys import load_private_key

        load_private_key(args.sign_key)

    from edge_ft.config import MethodOptions
    from edge_ft.host.api import default_out, export_bundle

    args.out = args.out or default_out(args.method, args.engine, rank=args.rank, last_k=args.last_k)
    manifest = export_bundle(args.model, method=args.method, base=args.base, out=args.out,
                             input_shape=args.input_shape, engine=args.engine, classes=args.classes,
                             num_classes=args.num_classes, options=MethodOptions.from_args(args),
                             optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                             force=args.force)
    cfg_method = manifest["method"]["method"]
    files = len(manifest["files"]) + 1  # the table lists every file but manifest.json itself
    total = sum(f["bytes"] for f in manifest["files"].values()) + (Path(args.out) / MANIFEST).stat().st_size
    trainable = sum(numel(s) for s in manifest["trainable"].values())
    print(f"{Path(args.out)}: {args.engine} bundle, {cfg_method}, {trainable:,} trainable values, "
          f"{files} files, {total / 1024:.1f} KiB")
    if args.sign_key:
        from edge_ft.trust.signature import sign_folder

        body = sign_folder(args.out, args.sign_key, args.sign_version, args.sign_name)
        print(f"{Path(args.out)}: signed by key {body['keyid'][:16]}, {body['name']} version {body['version']}, "
              f"expires {body['expires']}")
    return 0
