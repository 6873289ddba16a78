"""examples/pi-app/app.py, the device app of the docs: photos stream into an inbox, it fine-tunes and names new ones.

Run as a Pi runs it: the device venv, torch and onnx imports blocked, only the bundle and the photos on disk.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_ft.cli import main
from tests.test_device_api import PYTHON, blocked_env
from tests.test_predict import PICKED, write_class_folders

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "pi-app" / "app.py"


def run_app(tmp: Path, *argv: str) -> list[str]:
    done = subprocess.run([str(PYTHON), str(APP), str(tmp / "bundle"), "--inbox", str(tmp / "inbox"), "--state",
                           str(tmp / "state"), "--once", *argv], env=blocked_env(tmp), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp / "blocked.log").exists(), (tmp / "blocked.log").read_text()
    return done.stdout.splitlines()


def arrive(source: Path, inbox: Path, prefix: str = "", clock: int = 0) -> None:
    """Copy source/<class>/*.png into inbox/<class>/, the classes taking turns, each photo a second after the last
    (its modification time is its arrival time)."""
    per_class = [sorted(folder.iterdir()) for folder in sorted(source.iterdir())]
    for i, photo in enumerate(p for turn in zip(*per_class) for p in turn):
        target = inbox / photo.parent.name / f"{prefix}{photo.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, target)
        os.utime(target, ns=((clock + i) * 10**9, (clock + i) * 10**9))


@pytest.fixture(scope="module")
def app(tmp_path_factory, base_checkpoint):
    tmp = tmp_path_factory.mktemp("pi-app")
    write_class_folders(tmp / "first", per_class=12)
    assert main(["export", "--method", "lora", "--base", str(base_checkpoint), "--classes", str(tmp / "first"),
                 "--out", str(tmp / "bundle")]) == 0  # the class folders name the classes
    arrive(tmp / "first", tmp / "inbox")
    unseen = write_class_folders(tmp / "unseen", per_class=2, skip=12)  # never in the inbox's class folders
    (tmp / "inbox" / "unlabelled").mkdir()
    truth = {}
    for i, path in enumerate(sorted(unseen.rglob("*.png"))):
        target = tmp / "inbox" / "unlabelled" / f"photo-{i}.png"
        shutil.copy(path, target)
        truth[str(target)] = path.parent.name
    first = run_app(tmp)
    shutil.copy(tmp / "state" / "model.onnx", tmp / "first-model.onnx")  # the model that named the photos
    arrive(write_class_folders(tmp / "second", per_class=2, skip=14), tmp / "inbox", prefix="late-", clock=10**6)
    second = run_app(tmp)
    return tmp, first, second, truth


def test_the_app_learns_from_the_stream_and_names_new_photos(app):
    tmp, first, _, truth = app
    batches = [line for line in first if line.startswith("batch of ")]
    assert len(batches) == 5  # 36 photos in batches of 8
    assert "holdout accuracy" in batches[-1] and batches[-1].endswith("on 7")  # every 5th of 36 photos held out
    named = {line.split()[0]: line.split()[1] for line in first if "/unlabelled/" in line}
    assert set(named) == set(truth) and set(named.values()) <= set(PICKED.values())
    assert sum(named[p] == truth[p] for p in truth) >= 5  # 6 unseen photos of 3 easy classes


def test_the_state_is_what_the_cli_reads(app, capsys):
    tmp, first, _, _ = app
    record = json.loads((tmp / "state" / "checkpoint" / "checkpoint.json").read_text())
    assert record["steps"] > 0
    assert main(["predict", str(tmp / "first-model.onnx"), str(tmp / "inbox" / "unlabelled")]) == 0
    cli = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    app_named = {line.split()[0]: line.split()[1] for line in first if "/unlabelled/" in line}
    assert cli == app_named  # the exported model names them as the app did
    assert main(["adapter", "merge", str(tmp / "bundle"), str(tmp / "state" / "adapter"), "--out",
                 str(tmp / "merged.onnx")]) == 0


def test_a_restart_goes_on_with_new_photos_only(app):
    tmp, first, second, _ = app
    batches = [line for line in second if line.startswith("batch of ")]
    assert len(batches) == 1 and batches[0].startswith("batch of 6:")  # the late photos only, not those seen
    assert not any("/unlabelled/" in line for line in second)  # named photos are not named again
    seen = json.loads((tmp / "state" / "seen.json").read_text())
    assert seen["count"] == 42
