"""Base-model checkpoints: `NAME.safetensors` (state-dict keys, float32) beside `NAME.json` (provenance).

Torch-free on purpose: the device side reads base weights to check adapters against them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_ft.atomic import atomic_save_safetensors, atomic_write_json
from edge_ft.errors import UserError


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); check the path and its permissions") from None
    return h.hexdigest()


def meta_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_base(path: str | Path, state: dict[str, np.ndarray], meta: dict[str, Any], head: str = "fc3"
              ) -> dict[str, Any]:
    """Write weights then their JSON (task, accuracy, seed, ...); the JSON gets the weights' sha256 and the class
    count of the output layer `head`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: base weights must be written to a .safetensors file")
    arrays = {k: np.array(v, dtype=np.float32, order="C") for k, v in state.items()}  # 0-d stays 0-d
    atomic_save_safetensors(path, arrays, metadata={"format": "edge-ft-base"})
    meta = dict(meta, sha256=sha256_file(path), num_classes=int(arrays[f"{head}.bias"].shape[0]))
    atomic_write_json(meta_path(path), meta)
    return meta


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a safetensors file into numpy; a missing or corrupt file is a one-line UserError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}); re-create or re-copy it") from None


def load_json_object(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """A JSON object from `path`; unreadable or other JSON is a one-line UserError ending in `fix`."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: corrupt JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not {what} (a JSON object); {fix}")
    return data


def load_base(path: str | Path, head: str = "fc3", model: str = "LeNet-5"
              ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Base weights and their provenance (empty dict when the JSON is absent); `head` names the output layer
    whose bias gives the class count.

    The JSON is written after the weights and records their sha256: a mismatch means an interrupted save or
    files from two different runs, and the JSON's task and accuracy would describe other weights.
    """
    state = load_safetensors(path)
    head_bias = state.get(f"{head}.bias")
    if head_bias is None or head_bias.ndim != 1 or head_bias.shape[0] < 2:
        raise UserError(f"{path}: not a {model} checkpoint (no 1-d {head}.bias with 2+ classes); "
                        + ("use the output of `edge-ft pretrain`" if model == "LeNet-5" else
                           f"save the state dict of a trained {model} with safetensors"))
    meta: dict[str, Any] = {}
    mp = meta_path(path)
    if mp.is_file():
        meta = load_json_object(mp, "a checkpoint record", "re-run `edge-ft pretrain`")
        if "sha256" in meta and meta["sha256"] != sha256_file(path):
            raise UserError(f"{mp}: its sha256 does not match {Path(path).name} (an interrupted save or files of "
                            "two runs); copy both files again or re-run `edge-ft pretrain`")
    meta.setdefault("sha256", sha256_file(path))
    meta.setdefault("num_classes", int(head_bias.shape[0]))
    return state, meta


def default_base(root: Path) -> Path:
    """Where a results folder keeps the base pretrained for it."""
    return root / "prep" / "base.safetensors"


def base_sha256(base: Path) -> str:
    """The base's sha256 from its provenance JSON (hashing the file when the JSON is absent); '' if no base."""
    if not base.is_file():
        return ""
    try:
        return str(json.loads(meta_path(base).read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return sha256_file(base)
