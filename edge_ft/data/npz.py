"""The `.npz` data format the device side consumes: x, y int64 (N,), optional class names.

    x        one of
               uint8 (N,28,28)   grey images, white ink on black (MNIST's polarity): LeNet-5's input, scaled /255
               uint8 (N,C,H,W)   images of any model input shape, scaled /255 to [0, 1] (C = 1 is kept as (N,H,W))
               float32 (N,C,H,W) model inputs as they are (e.g. MFCC frames, normalised images); any rank after N
             checked against the model's one-example input shape (a bundle manifest's "input_shape")
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
LENET5_INPUT = (1, *IMAGE_SHAPE)  # the input shape checked when a caller names none: every reader's images
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm")  # image files `data convert` and `predict` read


def save_npz(path: str | Path, x: np.ndarray, y: np.ndarray, classes: Sequence[str] | None = None,
             input_shape: tuple[int, ...] = LENET5_INPUT) -> None:
    x, y = validate_xy(np.asarray(x), np.asarray(y), str(path), input_shape=input_shape)
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


def agreed_classes(ours: list[str] | None, our_source: object, theirs: list[str] | None,
                   their_source: object) -> list[str] | None:
    """The class names two sources agree on (either may name none); a disagreement is the user's to fix."""
    if ours is not None and theirs is not None and ours != theirs:
        raise UserError(f"{our_source} names its classes {', '.join(ours)}; {their_source} names them "
                        f"{', '.join(theirs)}: labels would mean different things")
    return ours if ours is not None else theirs


def parse_class_names(text: str, option: str = "--classes") -> list[str]:
    """'cat,dog,bird' -> ['cat', 'dog', 'bird'] (checked)."""
    return check_class_names([t.strip() for t in text.split(",")], option)


def validate_xy(x: np.ndarray, y: np.ndarray, source: str, num_classes: int | None = None,
                input_shape: tuple[int, ...] = LENET5_INPUT):
    """Check shapes, dtypes and label range against one example's `input_shape`; return (x, y int64 (N,)) with x
    uint8 pixels ((N,H,W) for one channel, else (N,C,H,W)) or float32 (N, *input_shape) inputs."""
    input_shape = tuple(input_shape)
    if x.dtype == np.float32 and x.ndim == len(input_shape) + 1:
        x = _float_inputs(x, source, input_shape)  # model inputs, used as they are
    else:
        x = _pixels(x, source, input_shape)
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{source}: y must have shape ({len(x)},) to match x, got {y.shape}")
    if len(x) == 0:
        raise UserError(f"{source}: the data set is empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{source}: labels y must be integers, got dtype {y.dtype}")
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        hi = "" if num_classes is None else f" and < {num_classes}"
        advice = ("labels are class indices 0, 1, 2, ...; `edge-ft data convert` numbers class folders that way"
                  if y.min() < 0 else
                  f"the model has {num_classes} classes: export a bundle for this data's {int(y.max()) + 1} "
                  f"(`edge-ft export --classes {source}` or --num-classes {int(y.max()) + 1}), or relabel it "
                  f"0..{num_classes - 1}")
        raise UserError(f"{source}: labels must be >= 0{hi}, got {y.min()}..{y.max()}; {advice}")
    return x, y.astype(np.int64)


# What numpy and zipfile raise on a damaged .npz: bad zip structure or CRC, inflate errors, a header that does not
# parse (literal_eval/tokenize), encrypted or unsupported members, short reads.
_DAMAGED = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, struct.error, SyntaxError,
            tokenize.TokenError, NotImplementedError, RuntimeError)


def _batched(shape: tuple[int, ...]) -> str:
    return f"(N, {', '.join(str(d) for d in shape)})"


def _wanted(input_shape: tuple[int, ...]) -> str:
    """The x shapes a model input accepts, as the error messages state them."""
    if len(input_shape) == 3 and input_shape[0] == 1:
        return f"{_batched(input_shape[1:])} or {_batched(input_shape)}"
    return _batched(input_shape)


def _float_inputs(x: np.ndarray, source: str, input_shape: tuple[int, ...]) -> np.ndarray:
    if x.shape[1:] != input_shape:
        raise UserError(f"{source}: x must have shape {_wanted(input_shape)} for the model's input "
                        f"{list(input_shape)}, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise UserError(f"{source}: x contains NaN/Inf; float32 inputs must be finite")
    return x


def _pixels(x: np.ndarray, source: str, input_shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images (or whole numbers 0..255 of another numeric dtype) in the model's input shape: (N,H,W) when it
    has one channel, (N,C,H,W) otherwise."""
    if len(input_shape) != 3:
        raise UserError(f"{source}: the model's input {list(input_shape)} is not an image (C,H,W); save x as "
                        f"float32 {_wanted(input_shape)}")
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    shape = x.shape[1:] if x.ndim == 4 else (1, *x.shape[1:])
    if x.ndim not in (3, 4) or shape != input_shape:
        raise UserError(f"{source}: x must have shape {_wanted(input_shape)} for the model's input "
                        f"{list(input_shape)}, got {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
            raise UserError(f"{source}: x contains NaN/Inf or non-numeric values; pixels must be uint8 0..255")
        if x.size and (x.min() < 0 or x.max() > 255):
            raise UserError(f"{source}: pixel values must lie in 0..255, got {x.min()}..{x.max()}")
        if np.any(x != np.round(x)):  # uint8 would floor 0..1-normalised images to black, silently
            raise UserError(f"{source}: pixels must be whole numbers 0..255, got fractions (images normalised "
                            "to 0..1?); save x as uint8, e.g. (x * 255).round().astype('uint8'), or as float32 "
                            f"{_batched(input_shape)} model inputs")
        x = x.astype(np.uint8)
    return x


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


def load_npz(path: str | Path, num_classes: int | None = None,
             input_shape: tuple[int, ...] = LENET5_INPUT) -> tuple[np.ndarray, np.ndarray]:
    """Load and validate a data file; every failure is a one-line UserError naming the file."""
    x, y, _ = load_labelled_npz(path, num_classes, input_shape)
    return x, y


def load_labelled_npz(path: str | Path, num_classes: int | None = None, input_shape: tuple[int, ...] = LENET5_INPUT):
    """(x, y, class names or None) of a data file, all checked; x fits `input_shape` (one example's)."""
    path = Path(path)
    if path.is_dir():
        hint = ("it holds train.npz; pass that file" if (path / "train.npz").is_file() else
                "for a folder of class folders, convert it first: `edge-ft data convert FOLDER --out data.npz`")
        raise UserError(f"{path}: is a folder, not a .npz data file; {hint}")
    if not path.is_file():
        raise UserError(f"{path}: no such data file (make one from a folder of class folders of images with "
                        "`edge-ft data convert FOLDER --out data.npz`, or a built-in task's with "
                        "`edge-ft data export`)")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"{path}: is an image, not a .npz data file; put your images into one folder per class and "
                        "convert them: `edge-ft data convert FOLDER --out data.npz`")
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
        raise UserError(f"{path}: not a readable .npz data file ({e}); make it again with `edge-ft data convert` "
                        "(your images) or `edge-ft data export` (a built-in task)") from None
    x, y = validate_xy(x, y, str(path), num_classes, input_shape)
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind != "U":
            raise UserError(f"{path}: 'classes' must be a 1-d string array, got {classes.dtype} {classes.shape}")
        classes = check_class_names(classes.tolist(), str(path), num_classes)
        if y.max() >= len(classes):
            raise UserError(f"{path}: label {y.max()} has no name among its {len(classes)} classes")
    return x, y, classes


def to_float(x: np.ndarray) -> np.ndarray:
    """Validated x -> float32 model inputs: uint8 (N,H,W) -> (N,1,H,W) and (N,C,H,W) -> (N,C,H,W) in [0,1]
    (the one pixel normalisation used everywhere); float32 inputs pass as they are."""
    if x.dtype == np.float32:
        return x
    scaled = x.astype(np.float32) / 255.0
    return scaled[:, None] if x.ndim == 3 else scaled
