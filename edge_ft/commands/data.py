"""`edge-ft data`: list the transfer tasks, export a task's .npz files for a device, convert a data source."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edge_ft.commands.argtypes import positive_float
from edge_ft.data.npz import parse_class_names, save_npz
from edge_ft.data.tasks import export_task


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="list tasks, export a task's train/test .npz for a device, convert IDX/image folders to .npz",
        description="Data for fine-tuning: named transfer tasks with fixed splits, and the .npz files a device reads.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser("list", help="the named transfer tasks and their splits",
                       description="One line per built-in transfer task: its name, training examples per class and "
                       "what it tests. Splits are fixed (edge_ft/data/tasks.py).")
    p.set_defaults(func=list_tasks)

    p = sub.add_parser("export", help="write TASK's train.npz and test.npz (x uint8 N×28×28, y int64) to --out",
                       description="Writes a built-in task's fixed split as train.npz and test.npz (with class names) "
                       "and task.json for a device; for your own images use `edge-ft data convert`.")
    p.add_argument("task", metavar="TASK", help="mnist-digits or mnist-fashion (see `edge-ft data list`)")
    p.add_argument("--out", required=True, type=Path, help="folder to write train.npz, test.npz and task.json to")
    p.add_argument("--shots", type=int, default=None,
                   help="training examples per class (default: the task's own: all digits, 100 for fashion)")
    p.set_defaults(func=export)

    p = sub.add_parser(
        "convert", help="an IDX folder, a folder of class folders or a .npz -> a checked .npz (or a train/test pair)",
        description="Images in SOURCE/<class name>/*.png (jpg, bmp, gif, pgm) become grey 28x28 white-on-black "
        "examples; labels follow the sorted class-folder names, which are stored in the .npz as its class names. "
        "With --test-fraction, --out is a folder that gets train.npz and test.npz (a split per class).")
    p.add_argument("source", type=Path, help="IDX folder (flat or <root>/<Name>/raw), class-folder tree, or .npz")
    p.add_argument("--out", required=True, type=Path,
                   help="the .npz file to write (a folder with --test-fraction)")
    p.add_argument("--split", choices=("train", "test"),
                   help="which split of an IDX folder to read (IDX only; default train)")
    p.add_argument("--classes", type=class_names, metavar="NAME,NAME,...",
                   help="class names in label order (default: the folder names, or those the .npz carries)")
    p.add_argument("--test-fraction", type=fraction, metavar="F",
                   help="hold out this fraction of each class as test.npz (class folders and .npz only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --test-fraction split (default 0)")
    p.set_defaults(func=convert)


def list_tasks(args) -> int:
    from edge_ft.data import tasks

    print(f"{'TASK':15s} {'SHOTS/CLASS':11s}  DESCRIPTION")
    for task in tasks.TASKS:
        shots = "all" if task.default_shots is None else str(task.default_shots)
        print(f"{task.slug:15s} {shots:11s}  {task.summary}")
    print("\nSplits are fixed and documented in edge_ft/data/tasks.py; "
          "pretraining uses MNIST (see `edge-ft pretrain`).")
    return 0


def export(args) -> int:
    info = export_task(args.task, args.out, args.shots)
    print(f"{info['name']}: {info['n_train']} train / {info['n_test']} test examples -> {args.out}/")
    return 0


def class_names(text: str) -> list[str]:
    """argparse type: comma-separated class names."""
    from edge_ft.errors import UserError

    try:
        return parse_class_names(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--classes: ")) from None


def fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def convert(args) -> int:
    from edge_ft.data.readers import read_any, source_kind
    from edge_ft.errors import UserError

    kind = source_kind(args.source)
    if args.split and kind != "idx":  # an option that does not apply is refused, never silently ignored
        raise UserError(f"--split applies to IDX folders only; {args.source} is a {KIND_NAMES[kind]} "
                        "(use --test-fraction to hold out a test set)")
    if args.test_fraction and kind == "idx":
        raise UserError(f"{args.source}: IDX data has its own test split; convert it with --split test")
    x, y, classes = read_any(args.source, args.split or "train")
    if args.classes:
        if len(args.classes) <= y.max():
            raise UserError(f"--classes names {len(args.classes)} classes, but {args.source} has labels up to "
                            f"{y.max()}")
        if classes is not None and len(args.classes) != len(classes):
            raise UserError(f"--classes names {len(args.classes)} classes, {args.source} has {len(classes)}")
        classes = args.classes
    named = "" if classes is None else f": {', '.join(classes)}"
    count = len(classes) if classes is not None else int(y.max()) + 1
    if not args.test_fraction:
        save_npz(args.out, x, y, classes)
        print(f"{args.source}: {len(y)} examples, {count} classes{named} -> {args.out}")
        return 0
    if args.out.suffix == ".npz":
        raise UserError(f"--out {args.out}: with --test-fraction, --out is a folder for train.npz and test.npz")
    test = held_out(y, args.test_fraction, args.seed)
    save_npz(args.out / "train.npz", x[~test], y[~test], classes)
    save_npz(args.out / "test.npz", x[test], y[test], classes)
    print(f"{args.source}: {int((~test).sum())} train / {int(test.sum())} test examples, {count} classes{named} "
          f"-> {args.out}/train.npz, test.npz")
    return 0


KIND_NAMES = {"npz": ".npz file", "idx": "IDX folder", "images": "folder of class folders"}


def held_out(y: np.ndarray, fraction: float, seed: int):
    """Boolean mask (N,) of a per-class test split: round(fraction * n) of each class, at least 1, never all."""
    from edge_ft.errors import UserError

    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        if len(members) < 2:
            raise UserError(f"class {c} has {len(members)} example; --test-fraction needs at least 2 per class")
        test[members[: min(len(members) - 1, max(1, round(fraction * len(members))))]] = True
    return test
