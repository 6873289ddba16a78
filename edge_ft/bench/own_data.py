"""Your own data in a sweep: `bench`/`recommend --data DIR|TRAIN.npz [--eval TEST.npz]`.

The files are checked as `edge-ft train` reads them and copied into one folder per content (named after the data
and the sha256 of both files), which the sweep then treats like an exported task: runs and records name it, the
torch engine reads it as `finetune --task FOLDER`, the ORT engines as `train --data FOLDER/train.npz --eval ...`.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from edge_ft.checkpoint import sha256_file
from edge_ft.errors import UserError

FILES = ("train.npz", "test.npz")


def _sources(data: Path, eval_data: Path | None) -> tuple[Path, Path]:
    """(train, test) files that --data and --eval name."""
    if data.is_dir():
        train, test = data / FILES[0], eval_data or data / FILES[1]
        if not train.is_file():
            raise UserError(f"--data {data}: no {FILES[0]} in this folder; make train.npz and test.npz from your "
                            "images with `edge-ft data convert FOLDER --out DIR --test-fraction 0.2`")
        if not test.is_file():
            raise UserError(f"--data {data}: no {FILES[1]} in this folder; give held-out data with --eval TEST.npz")
        return train, test
    if eval_data is None:
        raise UserError(f"--data {data}: a training file needs held-out data to score the runs: add --eval TEST.npz")
    return data, eval_data


def data_folder(data: Path, eval_data: Path | None, root: Path) -> Path:
    """The folder under `root` holding checked copies of the data as train.npz and test.npz; made once."""
    from edge_ft.bench.prepare import data_classes
    from edge_ft.data.npz import load_labelled_npz

    train, test = _sources(Path(data), None if eval_data is None else Path(eval_data))
    for path in (train, test):
        load_labelled_npz(path)  # a bad file is refused here, in one line, not in every measured run
    digest = hashlib.sha256((sha256_file(train) + sha256_file(test)).encode()).hexdigest()[:12]
    name = (Path(data).resolve().name if Path(data).is_dir() else train.resolve().parent.name) or "data"
    folder = root / f"{name}-{digest}"
    if not all((folder / f).is_file() for f in FILES):
        staging = root / f".{folder.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copyfile(train, staging / FILES[0])
        shutil.copyfile(test, staging / FILES[1])
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    data_classes(folder)  # train and test must agree on their classes
    return folder.resolve()
