"""Checks of what a user hands a command, done before any work starts, so a bad path fails in one line at once.

Torch-free: device commands call these.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_ft.errors import UserError


def _nearest_existing(path: Path) -> Path:
    """`path` itself or the closest ancestor that exists (what mkdir -p would create into)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_folder(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """A folder the command may create or write into: not a file, no file on the way, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path}: is a file, not a folder; choose a folder path")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, so no folder can be made under it; "
                        "choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: {existing} is not writable (read-only or no permission); "
                        "choose a writable folder")
    return path


def writable_file(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """A file path the command may (re)write: not a folder, its folder creatable and writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name, e.g. {path / 'model.onnx'}")
    writable_folder(path.parent if str(path.parent) else Path("."), option=f"{option} {path}: folder")
    return path
