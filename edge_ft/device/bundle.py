"""A bundle is what `edge-ft export` writes and the device trains: graphs + weights + manifest.json.

The manifest says which engine runs the bundle, what the method trains, and the sha256 and size of every file,
so a truncated copy or a file from another export is caught here, before onnxruntime ever sees it. The network
itself is the manifest's "model" (edge_ft.model_desc); bundles written before it existed were all LeNet-5 exports
and load as LeNet-5, so they need no re-export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_ft.checkpoint import load_safetensors, sha256_file
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.contracts import BUNDLE_ENGINES, MANIFEST, RESULTS
from edge_ft.data.npz import check_class_names
from edge_ft.errors import UserError
from edge_ft.model_desc import ModelDesc, model_from_manifest

FORMAT = "edge-ft-bundle"
FORMAT_VERSION = 1
APPLIED_ADAPTER = "applied_adapter.safetensors"  # written by `edge-ft adapter apply`
PENDING_ADAPTER = APPLIED_ADAPTER + ".pending"  # its next contents, until manifest.json names them
REQUIRED = ("engine", "method", "optimizer", "num_classes", "input_shape", "trainable", "frozen", "base", "files")


@dataclass(frozen=True)
class Bundle:
    path: Path  # the bundle folder
    manifest: dict[str, Any]  # manifest.json as read
    engine: str  # "ort-training" | "ort-step"
    method: MethodConfig
    optimizer: OptimizerConfig
    num_classes: int
    input_shape: tuple[int, ...]  # one example, e.g. (1, 28, 28); a head bundle's: its frozen prefix's output
    trainable: dict[str, tuple[int, ...]]  # name -> shape, in state-dict order
    frozen: dict[str, tuple[int, ...]]
    base_sha256: str  # sha256 of the base .safetensors the bundle was exported from
    classes: list[str] | None = None  # name of each class, when the export was told them
    model: ModelDesc | None = None  # the network (manifest "model"; LeNet-5 for bundles written before it)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def head(self) -> Bundle | None:
        """The bundle that trains everything after the frozen prefix on its cached features (features.onnx's
        output), if the export found a prefix (probe, LoRA on linear layers, last-k; not full or bias)."""
        features = self.manifest.get("features")
        return load_bundle(self.path / features["head"]) if features else None

    def applied_adapter(self) -> dict[str, np.ndarray] | None:
        """Trainable tensors that `edge-ft adapter apply` stored in the bundle (None when nothing was applied)."""
        applied = self.manifest.get("applied_adapter")
        return load_safetensors(self.file(applied["file"])) if applied else None


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and validate a bundle folder; any problem is a one-line UserError naming the file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if path.is_file():
        what = ("pass the folder it is in" if path.name == MANIFEST else
                "a model.onnx is what `edge-ft predict` takes" if path.suffix == ".onnx" else "")
        raise UserError(f"{path}: is a file, not a bundle folder (the folder `edge-ft export` writes)"
                        + (f"; {what}" if what else ""))
    if not path.is_dir():
        raise UserError(f"{path}: no such bundle folder (create one with `edge-ft export`)")
    if not manifest_path.is_file():
        if (path / RESULTS).is_file():
            raise UserError(f"{path}: this is a run folder (from `edge-ft train`), not a bundle; pass the bundle it "
                            "trained (results.json names it under bundle.path), or its model.onnx to `edge-ft predict`")
        raise UserError(f"{manifest_path}: missing; {path} is not an edge-ft bundle (re-run `edge-ft export`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{manifest_path}: corrupt JSON ({e}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path}: not an edge-ft bundle manifest; re-export the bundle")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{manifest_path}: bundle format version {version}, this edge-ft reads version {FORMAT_VERSION}; "
            "export the bundle with the same edge-ft version as the device"
        )
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise UserError(f"{manifest_path}: missing field {missing[0]!r}; re-export the bundle")
    check_file_table(manifest, manifest_path)
    finish_adapter_apply(path, manifest)
    if verify:
        verify_files(path, manifest["files"])
    model = model_from_manifest(manifest, f"{manifest_path}: model")
    try:
        bundle = Bundle(
            path=path,
            manifest=manifest,
            engine=str(manifest["engine"]),
            method=MethodConfig.from_dict(manifest["method"], model=model),
            optimizer=OptimizerConfig(**{**manifest["optimizer"], "betas": tuple(manifest["optimizer"]["betas"])}),
            num_classes=int(manifest["num_classes"]),
            input_shape=tuple(int(d) for d in manifest["input_shape"]),
            trainable=_shapes(manifest["trainable"]),
            frozen=_shapes(manifest["frozen"]),
            base_sha256=str(manifest["base"]["sha256"]),
            classes=None if manifest.get("classes") is None else
            check_class_names(manifest["classes"], str(manifest_path), int(manifest["num_classes"])),
            model=model,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{manifest_path}: malformed field ({e!r}); re-export the bundle") from None
    check_model(bundle, manifest_path)
    return bundle


def check_model(bundle: Bundle, manifest_path: Path) -> None:
    """The manifest's tensors are what its model description (manifest "model") has under its method: input shape,
    every tensor's name and shape, which ones train. Engines size what they hand onnxruntime from these fields."""
    from edge_ft.architecture import param_shapes, trainable_names

    cfg = bundle.method
    net = cfg.network
    if bundle.num_classes != cfg.num_classes:
        raise UserError(f"{manifest_path}: num_classes {bundle.num_classes} differs from the method's "
                        f"{cfg.num_classes}; re-export the bundle")
    head = cfg.head or ""  # MethodConfig fills it in (the model's output layer by default)
    head_in = net.layer(head).input_shapes[0]
    prefix = bundle.manifest.get("prefix")
    if isinstance(prefix, dict) and bundle.input_shape == tuple(prefix.get("shape", ())):  # a head bundle
        dropped = set(prefix.get("tensors", ()))
        shapes = {n: s for n, s in {**param_shapes(cfg), **net.statistics}.items() if n not in dropped}
        trainable = trainable_names(cfg)
    elif bundle.input_shape == net.input_shape:  # BatchNorm statistics are frozen tensors of the bundle
        shapes, trainable = {**param_shapes(cfg), **net.statistics}, trainable_names(cfg)
    elif bundle.input_shape == head_in and cfg.method == "probe":  # a probe's head-only bundle of older exports
        shapes = {n: s for n, s in param_shapes(cfg).items() if n in net.layer(head).param_names()}
        trainable = list(shapes)
    else:
        raise UserError(f"{manifest_path}: input_shape {list(bundle.input_shape)} is not {net.title}'s "
                        f"{list(net.input_shape)}; re-export the bundle")
    described = {**bundle.trainable, **bundle.frozen}
    if described != shapes or sorted(bundle.trainable) != sorted(trainable):
        wrong = next((n for n in shapes if described.get(n) != shapes[n]), None) or next(
            (n for n in described if n not in shapes), None) or "the trainable set"
        raise UserError(f"{manifest_path}: {wrong} does not match a {cfg.method} {net.title} "
                        f"({bundle.num_classes} classes); re-export the bundle")


def finish_adapter_apply(folder: Path, manifest: dict[str, Any]) -> None:
    """Complete or undo an `edge-ft adapter apply` that was cut short: rename its pending tensors into place if
    manifest.json (the commit point) already names their hash, else delete them."""
    pending = folder / PENDING_ADAPTER
    if not pending.is_file():
        return
    entry = manifest["files"].get(APPLIED_ADAPTER)
    try:
        if isinstance(entry, dict) and file_entry(pending) == {"sha256": entry["sha256"], "bytes": entry["bytes"]}:
            os.replace(pending, folder / APPLIED_ADAPTER)
        else:
            pending.unlink()
    except OSError:
        pass  # a read-only copy: verify_files says what is wrong with it


def _referenced_files(manifest: dict[str, Any]) -> list[str]:
    """Every file the engines and the device read, by the manifest's own entries (all must be hash-checked)."""
    names = [v for entry in (manifest.get("ort_step"), manifest.get("ort_training")) if isinstance(entry, dict)
             for k, v in entry.items() if k != "outputs"]
    for key in ("inference", "features", "applied_adapter"):
        if isinstance(manifest.get(key), dict) and "file" in manifest[key]:
            names.append(manifest[key]["file"])
    if isinstance(manifest.get("features"), dict) and "head" in manifest["features"]:  # the head-only bundle
        names.append(f"{manifest['features']['head']}/{MANIFEST}")
    return names


def check_file_table(manifest: dict[str, Any], manifest_path: Path) -> None:
    """The "files" table is {relative path: {"sha256": hex, "bytes": int}}, stays inside the bundle, and covers
    every file the manifest points an engine at: nothing reaches onnxruntime unverified."""
    if not isinstance(manifest.get("engine"), str) or manifest["engine"] not in BUNDLE_ENGINES:
        raise UserError(f"{manifest_path}: unknown engine {manifest.get('engine')!r} (this edge-ft runs "
                        f"{', '.join(BUNDLE_ENGINES)}); export the bundle with this edge-ft version")
    files = manifest["files"]
    ok = isinstance(files, dict) and all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and type(e.get("bytes")) is int
        for e in files.values())
    if not ok:
        raise UserError(f"{manifest_path}: malformed field 'files' (want name -> sha256 and bytes); "
                        "re-export the bundle")
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise UserError(f"{manifest_path}: file {name!r} lies outside the bundle folder; re-export the bundle")
    for name in _referenced_files(manifest):
        if not isinstance(name, str) or name not in files:
            raise UserError(f"{manifest_path}: {name} is not listed in 'files', so it cannot be verified; "
                            "re-export the bundle")


def _shapes(table: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """{name: [d0, d1, ...]} -> {name: (d0, d1, ...)}; anything but lists of non-negative ints is malformed."""
    shapes = {str(k): tuple(v) for k, v in table.items()}
    if not all(type(d) is int and d >= 0 for shape in shapes.values() for d in shape):
        raise ValueError("tensor shapes must be lists of non-negative integers")
    return shapes


def verify_files(folder: Path, files: dict[str, dict[str, Any]]) -> None:
    """Every listed file exists with the recorded size and sha256 (size first: it is free)."""
    for name, entry in files.items():
        f = folder / name
        if not f.is_file():
            raise UserError(f"{f}: missing from the bundle; copy the whole bundle folder again")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise UserError(f"{f}: contents do not match manifest.json (corrupt or from another export); "
                            "copy the bundle again")


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def list_files(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `folder` except the manifest itself, keyed by relative path."""
    return {
        p.relative_to(folder).as_posix(): file_entry(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    }
