"""`edge-ft data`: list the transfer tasks, export a task's .npz files for a device, convert a data source."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_ft.atomic import atomic_write_json
from edge_ft.data.npz import save_npz


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="list tasks, export a task's train/test .npz for a device, convert IDX/image folders to .npz",
        description="Data for fine-tuning: named transfer tasks with fixed splits, and the .npz files a device reads.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser("list", help="the named transfer tasks and their splits")
    p.set_defaults(func=list_tasks)

    p = sub.add_parser("export", help="write TASK's train.npz and test.npz (x uint8 N×28×28, y int64) to --out",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("task", metavar="TASK", help="mnist-digits (mnist→digits) or mnist-fashion (mnist→fashion)")
    p.add_argument("--out", required=True, type=Path, help="folder to write train.npz, test.npz and task.json to")
    p.add_argument("--shots", type=int, default=None,
                   help="training examples per class (default: the task's own: all digits, 100 for fashion)")
    p.set_defaults(func=export)

    p = sub.add_parser("convert", help="an IDX folder, a folder of class folders or a .npz -> one checked .npz")
    p.add_argument("source", type=Path, help="IDX folder (flat or <root>/<Name>/raw), class-folder tree, or .npz")
    p.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    p.add_argument("--split", choices=("train", "test"), default="train", help="which IDX split (default: train)")
    p.set_defaults(func=convert)


def list_tasks(args) -> int:
    from edge_ft.data import tasks

    for task in tasks.TASKS:
        shots = "all" if task.default_shots is None else task.default_shots
        print(f"{task.slug:15s} {task.name:15s} default shots/class: {shots:<4}  {task.summary}")
    print("\nSplits are fixed and documented in edge_ft/data/tasks.py; pretraining uses MNIST (see `edge-ft pretrain`).")
    return 0


def export(args) -> int:
    from edge_ft.data.tasks import get_task, target_split

    task = get_task(args.task)
    split = target_split(task, args.shots)
    save_npz(args.out / "train.npz", split.x_train, split.y_train)
    save_npz(args.out / "test.npz", split.x_test, split.y_test)
    atomic_write_json(args.out / "task.json", dict(split.info, slug=task.slug, num_classes=split.num_classes))
    print(f"{task.name}: {len(split.y_train)} train / {len(split.y_test)} test examples -> {args.out}/")
    return 0


def convert(args) -> int:
    from edge_ft.data.readers import read_any

    x, y = read_any(args.source, args.split)
    save_npz(args.out, x, y)
    print(f"{args.source}: {len(y)} examples, {int(y.max()) + 1} classes -> {args.out}")
    return 0
