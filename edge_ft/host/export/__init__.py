"""`edge-ft export`: base weights + method + optimizer -> a bundle folder the device trains without torch.

Each engine is one module here with `build(model, cfg, opt, out_dir) -> dict` that writes its graphs and state
into out_dir and returns extra manifest fields; everything else (model preparation, the inference and features
graphs, the head bundle that trains on a cached frozen prefix, hashes, manifest.json) is shared and lives in this
package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import shutil
import tempfile
from pathlib import Path

import torch.nn as nn

from edge_ft import __version__
from edge_ft.atomic import atomic_write_json, ensure_dir, replace_folder
from edge_ft.checkpoint import load_base
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.contracts import ORT_STEP, ORT_TRAINING
from edge_ft.data.npz import check_class_names
from edge_ft.device.bundle import FORMAT, FORMAT_VERSION, MANIFEST, list_files
from edge_ft.errors import UserError
from edge_ft.host.describe import HostModel, host_model
from edge_ft.host.export.common import (
    HEAD_FOLDER,
    check_base,
    input_shape_of,
    parameter_split,
    prepare_model,
    write_features_graph,
    write_inference_base,
)
from edge_ft.host.export.prefix import split_frozen_prefix

ENGINE_MODULES = {ORT_TRAINING: "ort_training", ORT_STEP: "ort_step"}


def export_bundle(
    cfg: MethodConfig, opt: OptimizerConfig, base_path: str | Path, out_dir: str | Path, engine: str = "ort-training",
    seed: int = 0, classes: list[str] | None = None, host: HostModel | None = None,
) -> dict:
    """Write a complete bundle to out_dir (replacing a previous bundle there) and return its manifest.

    `host` is the network (its class and cfg.model's description; default LeNet-5); the description goes into
    the manifest as "model", which is all the device and the cost model know of it.
    """
    host = host or host_model(None)
    if cfg.model.with_num_classes(host.desc.num_classes) != host.desc:
        raise ValueError("cfg.model must be the description of the exported network")
    if engine not in ENGINE_MODULES:
        raise UserError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINE_MODULES)}")
    base_path, out_dir = Path(base_path), Path(out_dir)
    base_state, base_meta = load_base(base_path, head=cfg.model.output, model=cfg.model.title)
    check_base(base_state, base_path, cfg.model)
    _check_target(out_dir)
    engine_module = importlib.import_module(f"edge_ft.host.export.{ENGINE_MODULES[engine]}")
    build = engine_module.build
    model = prepare_model(cfg, base_state, seed, mean_pools=engine_module.MEAN_POOLS, host=host,
                          frozen_norms=engine_module.FROZEN_NORMS)
    common = {
        "engine": engine,
        "method": cfg.to_dict(),
        "optimizer": opt.to_dict(),
        "num_classes": cfg.num_classes,
        "classes": classes and check_class_names(classes, "--classes", cfg.num_classes),  # or None
        "seed": seed,
        "base": {"file": base_path.name, "sha256": base_meta["sha256"], "num_classes": base_meta["num_classes"]},
        "versions": _versions(),
        "model": cfg.model.to_dict(),
    }
    # Build in a hidden sibling folder and rename it into place: the device never sees half a bundle.
    ensure_dir(out_dir.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        extra = {"inference": write_inference_base(model, cfg, staging)}
        split = split_frozen_prefix(model)  # None when the first layer trains (full, bias): nothing to cache
        if split is not None:
            extra["features"] = write_features_graph(split.prefix, split.manifest_entry(), staging)
            (staging / HEAD_FOLDER).mkdir()
            _write_bundle(split.suffix, cfg, opt, staging / HEAD_FOLDER, build,
                          {**common, "prefix": split.manifest_entry()}, head=True)
        manifest = _write_bundle(model, cfg, opt, staging, build, {**common, **extra})
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _write_bundle(model: nn.Module, cfg, opt, folder: Path, build, fields: dict, head: bool = False) -> dict:
    trainable, frozen = parameter_split(model)
    engine_fields = build(model, cfg, opt, folder, head=head)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **fields,
        "input_shape": list(input_shape_of(model)),
        "trainable": trainable,
        "frozen": frozen,
        **engine_fields,
        "files": list_files(folder),  # last: hashes everything written above, the head bundle included
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file())):
        raise UserError(f"{out_dir}: exists and is not an edge-ft bundle; choose a new or empty folder for --out")


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    staging.chmod(0o755)  # mkdtemp creates 0700
    replace_folder(staging, out_dir)


def _versions() -> dict[str, str]:
    """Versions that shape the graphs; the onnxruntime entry names the wheel (training vs standard)."""
    versions = {"edge-ft": __version__}
    providers = importlib.metadata.packages_distributions()
    for module in ("torch", "onnx", "onnxruntime"):
        for dist in providers.get(module, [module]):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[dist] = importlib.metadata.version(dist)
    return versions
