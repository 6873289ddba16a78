"""The host half as functions: export a bundle for on-device training, the library half of `edge-ft export`.

    from edge_ft.host.api import export_bundle
    manifest = export_bundle(method="lora", base="kit/base.safetensors", classes="my-photos", out="kit/bundle")
    export_bundle("mypkg.nets:TinyNet", input_shape=(1, 28, 28), method="last-k", base="tiny.safetensors",
                  options=MethodOptions(last_k=2))

Needs the host extra (torch, onnx); the cost of each method is `edge_ft.analysis.analyze`, which does not.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_ft.config import MethodOptions, OptimizerConfig, method_config_for
from edge_ft.contracts import MANIFEST, ORT_STEP
from edge_ft.errors import UserError


def default_out(method: str, engine: str, rank: int, last_k: int) -> Path:
    """export/<method>-<engine>, the method named with what sets its size: lora-r2, last-k1."""
    name = {"lora": f"lora-r{rank}", "last-k": f"last-k{last_k}"}.get(method, method)
    return Path("export") / f"{name}-{engine}"


def task_classes(text: str | Path) -> list[str]:
    """Class names from 'a,b,c', a .npz that carries them, or a folder of class folders (their sorted names)."""
    from edge_ft.data.npz import load_labelled_npz, parse_class_names

    text = str(text)
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


def export_bundle(model: str | None = None, *, method: str, base: str | Path, out: str | Path | None = None,
                  input_shape: tuple[int, ...] | None = None, engine: str = ORT_STEP,
                  classes: str | Path | list[str] | None = None, num_classes: int | None = None,
                  options: MethodOptions = MethodOptions(), optimizer: str | None = None, lr: float | None = None,
                  weight_decay: float = 0.01, seed: int = 0, force: bool = False) -> dict[str, Any]:
    """Write the bundle a device trains, as `edge-ft export` does; returns its manifest.

    Args:
        model: the network, `PKG.MODULE:CLASS` or `FILE.py:CLASS` (a class that builds with no arguments), traced
            with torch.fx; None for LeNet-5.
        method: full, probe, lora, bias or last-k.
        base: the base weights (a state dict in safetensors, from `edge-ft pretrain` for LeNet-5).
        out: the bundle folder (default export/METHOD-ENGINE, e.g. export/lora-r2-ort-step).
        input_shape: one example's shape, needed with `model`.
        engine: ort-step (plain onnxruntime, every board) or ort-training (x86_64 only).
        classes: class names: a list, 'a,b,c', a .npz that carries them, or a folder of class folders.
        num_classes: classes of the target task when no names are given (default: the base's).
        options: the method's settings (LoRA rank, alpha, targets, modules_to_save, probe head, last-k's K).
        optimizer: sgd, sgd-momentum or adamw (default: the method's recipe).
        lr: learning rate stored in the bundle (default: the method's recipe).
        weight_decay: AdamW weight decay.
        seed: seed of LoRA A and of a new head.
        force: replace a bundle already in `out`.

    Raises:
        UserError: a bad base, class list, method option or output folder, in the CLI's one-line messages.
    """
    from edge_ft.checkpoint import load_base
    from edge_ft.host.describe import host_model
    from edge_ft.host.export import export_bundle as write_bundle
    from edge_ft.training_defaults import DEFAULTS
    from edge_ft.validate import writable_folder

    target = writable_folder(out or default_out(method, engine, rank=options.rank, last_k=options.last_k))
    host = host_model(model, input_shape)
    _, meta = load_base(base, head=host.desc.output, model=host.desc.title)
    host = replace(host, desc=host.desc.with_num_classes(meta["num_classes"]))  # the base's head
    names = classes if isinstance(classes, list) or classes is None else task_classes(classes)
    if names and num_classes and num_classes != len(names):
        raise UserError(f"--num-classes {num_classes} but --classes names {len(names)} classes")
    count = len(names) if names else num_classes or meta["num_classes"]
    if names is None and count == meta["num_classes"]:
        names = meta.get("classes")  # same head: the base's names still hold
    if (target / MANIFEST).is_file() and not force:
        raise UserError(f"{target}: already holds a bundle (manifest.json); choose another --out, or add --force "
                        "to replace it")
    if method not in DEFAULTS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(DEFAULTS)}")
    cfg = method_config_for(options, method, count, meta["num_classes"], host.desc)
    recipe = DEFAULTS[method]
    opt = OptimizerConfig(optimizer or recipe.optimizer, lr=lr or recipe.lr, weight_decay=weight_decay)
    manifest: dict[str, Any] = write_bundle(cfg, opt, base, target, engine=engine, seed=seed, classes=names,
                                            host=host)
    return manifest
