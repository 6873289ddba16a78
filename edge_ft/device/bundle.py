"""A bundle is what `edge-ft export` writes and the device trains: graphs + weights + manifest.json.

The manifest says which engine runs the bundle, what the method trains, and the sha256 and size of every file,
so a truncated copy or a file from another export is caught here, before onnxruntime ever sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ft.checkpoint import load_safetensors, sha256_file
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.errors import UserError

FORMAT = "edge-ft-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
APPLIED_ADAPTER = "applied_adapter.safetensors"  # written by `edge-ft adapter apply`
REQUIRED = ("engine", "method", "optimizer", "num_classes", "input_shape", "trainable", "frozen", "base", "files")


@dataclass(frozen=True)
class Bundle:
    path: Path  # the bundle folder
    manifest: dict  # manifest.json as read
    engine: str  # "ort-training" | "ort-step"
    method: MethodConfig
    optimizer: OptimizerConfig
    num_classes: int
    input_shape: tuple[int, ...]  # one example, e.g. (1, 28, 28); (84,) for a probe's head-only bundle
    trainable: dict[str, tuple[int, ...]]  # name -> shape, in state-dict order
    frozen: dict[str, tuple[int, ...]]
    base_sha256: str  # sha256 of the base .safetensors the bundle was exported from

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def head(self) -> "Bundle | None":
        """A probe bundle's head-only bundle (trains fc3 on cached 84-d features), if exported with one."""
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
    if not path.is_dir():
        raise UserError(f"{path}: no such bundle folder (create one with `edge-ft export`)")
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path}: missing; {path} is not an edge-ft bundle (re-run `edge-ft export`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
    if verify:
        verify_files(path, manifest["files"])
    try:
        return Bundle(
            path=path,
            manifest=manifest,
            engine=str(manifest["engine"]),
            method=MethodConfig.from_dict(manifest["method"]),
            optimizer=OptimizerConfig(**{**manifest["optimizer"], "betas": tuple(manifest["optimizer"]["betas"])}),
            num_classes=int(manifest["num_classes"]),
            input_shape=tuple(int(d) for d in manifest["input_shape"]),
            trainable={k: tuple(v) for k, v in manifest["trainable"].items()},
            frozen={k: tuple(v) for k, v in manifest["frozen"].items()},
            base_sha256=str(manifest["base"]["sha256"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{manifest_path}: malformed field ({e!r}); re-export the bundle") from None

def verify_files(folder: Path, files: dict[str, dict]) -> None:
    """Every listed file exists with the recorded size and sha256 (size first: it is free)."""
    for name, entry in files.items():
        f = folder / name
        if not f.is_file():
            raise UserError(f"{f}: missing from the bundle; copy the whole bundle folder again")
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise UserError(f"{f}: contents do not match manifest.json (corrupt or from another export); "
                            "copy the bundle again")


def file_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def list_files(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file under `folder` except the manifest itself, keyed by relative path."""
    return {
        p.relative_to(folder).as_posix(): file_entry(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    }
