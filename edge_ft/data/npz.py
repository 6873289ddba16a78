"""The `.npz` data format the device side consumes: x uint8 (N,28,28), y int64 (N,), optional class names.

    x        uint8 (N,28,28), white ink on black (MNIST's polarity)
    y        int64 (N,), labels 0..C-1
    classes  fixed-width unicode (C,), the name of each label (optional; a plain string array, so no pickle, ever)
"""

from __future__ import annotations

import struct
import tokenize
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_ft.atomic import atomic_open
from edge_ft.errors import UserError

IMAGE_SHAPE = (28, 28)


def save_npz(path: str | Path, x: np.ndarray, y: np.ndarray, classes: Sequence[str] | None = None) -> None:
    x, y = validate_xy(np.asarray(x), np.asarray(y), str(path))
    arrays = {"x": x, "y": y.astype(np.int64)}
    if classes is not None:
        classes = check_class_names(classes, str(path))
        if y.max() >= len(classes):
            raise UserError(f"{path}: label {y.max()} has no name; {len(classes)} class names given")
        arrays["classes"] = np.array(classes, dtype=str)  # dtype <U{longest}: readable without pickle
    with atomic_open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def check_class_names(names: Sequence[str], source: str, num_classes: int | None = None) -> list[str]:
    """Class names as a list of distinct, non-empty, one-line strings (`num_classes` of them when given)."""
    names = [str(n) for n in names]
    if num_classes is not None and len(names) != num_classes:
        raise UserError(f"{source}: {len(names)} class names for {num_classes} classes")
    bad = next((n for n in names if not n.strip() or "\n" in n or "\r" in n), None)
    if bad is not None:
        raise UserError(f"{source}: class name {bad!r} is empty or spans lines")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{source}: class name {twice!r} appears twice")
    return names


def parse_class_names(text: str, option: str = "--classes") -> list[str]:
    """'cat,dog,bird' -> ['cat', 'dog', 'bird'] (checked)."""
    return check_class_names([t.strip() for t in text.split(",")], option)


def validate_xy(x: np.ndarray, y: np.ndarray, source: str, num_classes: int | None = None):
    """Check shapes, dtypes and label range; return (x uint8 (N,28,28), y int64 (N,))."""
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
        raise UserError(f"{source}: x must have shape (N, 28, 28), got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{source}: y must have shape ({len(x)},) to match x, got {y.shape}")
    if len(x) == 0:
        raise UserError(f"{source}: the data set is empty")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
            raise UserError(f"{source}: x contains NaN/Inf or non-numeric values; pixels must be uint8 0..255")
        if x.min() < 0 or x.max() > 255:
            raise UserError(f"{source}: pixel values must lie in 0..255, got {x.min()}..{x.max()}")
        if np.any(x != np.round(x)):  # uint8 would floor 0..1-normalised images to black, silently
            raise UserError(f"{source}: pixels must be whole numbers 0..255, got fractions (images normalised "
                            "to 0..1?); save x as uint8, e.g. (x * 255).round().astype('uint8')")
        x = x.astype(np.uint8)
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{source}: labels y must be integers, got dtype {y.dtype}")
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        hi = "" if num_classes is None else f" and < {num_classes}"
        raise UserError(f"{source}: labels must be >= 0{hi}, got {y.min()}..{y.max()}")
    return x, y.astype(np.int64)


# What numpy and zipfile raise on a damaged .npz: bad zip structure or CRC, inflate errors, a header that does not
# parse (literal_eval/tokenize), encrypted or unsupported members, short reads.
_DAMAGED = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, struct.error, SyntaxError,
            tokenize.TokenError, NotImplementedError, RuntimeError)


def _check_sizes(path: Path) -> None:
    """Each array's header must declare no more bytes than its zip member holds, so a corrupt header saying
    (10**9, 28, 28) is refused here instead of numpy allocating it."""
    with zipfile.ZipFile(path) as archive:
        for name in ("x.npy", "y.npy", "classes.npy"):
            if name not in archive.namelist():
                continue
            info = archive.getinfo(name)
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"unsupported .npy version {version}")
                shape, _, dtype = read_header(member)
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > info.file_size:
                    raise ValueError(f"{name} declares {declared} bytes of data but holds {info.file_size}")


def load_npz(path: str | Path, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate a data file; every failure is a one-line UserError naming the file."""
    x, y, _ = load_labelled_npz(path, num_classes)
    return x, y


def load_labelled_npz(path: str | Path, num_classes: int | None = None):
    """(x, y, class names or None) of a data file, all checked."""
    path = Path(path)
    if path.is_dir():
        hint = ("it holds train.npz; pass that file" if (path / "train.npz").is_file() else
                "for a folder of class folders, convert it first: `edge-ft data convert FOLDER --out data.npz`")
        raise UserError(f"{path}: is a folder, not a .npz data file; {hint}")
    if not path.is_file():
        raise UserError(f"{path}: no such data file (create one with `edge-ft data export TASK`)")
    try:
        _check_sizes(path)
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise UserError(f"{path}: expected arrays 'x' and 'y', found {sorted(z.files)}")
            x, y = z["x"], z["y"]
            classes = z["classes"] if "classes" in z.files else None
    except UserError:
        raise
    except _DAMAGED as e:
        raise UserError(f"{path}: not a readable .npz data file ({e}); re-export it with `edge-ft data export`") from None
    x, y = validate_xy(x, y, str(path), num_classes)
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind != "U":
            raise UserError(f"{path}: 'classes' must be a 1-d string array, got {classes.dtype} {classes.shape}")
        classes = check_class_names(classes.tolist(), str(path), num_classes)
        if y.max() >= len(classes):
            raise UserError(f"{path}: label {y.max()} has no name among its {len(classes)} classes")
    return x, y, classes


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 (N,28,28) -> float32 (N,1,28,28) in [0,1]: the one input normalisation used everywhere."""
    return (x.astype(np.float32) / 255.0)[:, None, :, :]
