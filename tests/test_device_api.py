"""edge_ft.device's Python API, run where an app runs it: the device venv, with torch and onnx imports blocked.

One probe process (tests/device_api_probe.py) fits, evaluates, checkpoints and resumes, stops early, exports an
adapter and a model, merges and predicts on real images, and feeds the API bad input; the tests read what it saw.
`edge-ft train` on the same bundle and data is the reference: the API must run the same training, not a second one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_ft.cli import main
from tests.test_device_train import BLOCKER
from tests.test_predict import PICKED, write_class_folders

REPO = Path(__file__).resolve().parents[1]
DEVICE_PYTHON = REPO / ".venv-device" / "bin" / "python"
PYTHON = DEVICE_PYTHON if DEVICE_PYTHON.exists() else Path(sys.executable)


def blocked_env(tmp: Path) -> dict:
    """PYTHONPATH with a sitecustomize that makes importing torch, onnx or onnxscript raise, and this checkout."""
    (tmp / "site").mkdir(exist_ok=True)
    (tmp / "site" / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": f"{tmp / 'site'}{os.pathsep}{REPO}",
            "EDGE_FT_BLOCK_LOG": str(tmp / "blocked.log")}


@pytest.fixture(scope="module")
def probe(tmp_path_factory, base_checkpoint):
    tmp = tmp_path_factory.mktemp("device-api")
    images = write_class_folders(tmp / "images")
    assert main(["data", "convert", str(images), "--out", str(tmp / "data"), "--test-fraction", "0.25"]) == 0
    assert main(["export", "--method", "lora", "--base", str(base_checkpoint), "--classes",
                 str(tmp / "data" / "train.npz"), "--out", str(tmp / "bundle")]) == 0
    assert main(["train", str(tmp / "bundle"), "--data", str(tmp / "data" / "train.npz"), "--eval",
                 str(tmp / "data" / "test.npz"), "--epochs", "2", "--batch", "9", "--threads", "1", "--no-cache",
                 "--quiet", "--out", str(tmp / "run")]) == 0
    (tmp / "work").mkdir()
    done = subprocess.run([str(PYTHON), str(REPO / "tests" / "device_api_probe.py"), str(tmp / "bundle"),
                           str(tmp / "data"), str(images), str(tmp / "work")], env=blocked_env(tmp),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp / "blocked.log").exists(), (tmp / "blocked.log").read_text()
    return json.loads(done.stdout), json.loads((tmp / "run" / "results.json").read_text())


def test_fit_is_the_training_edge_ft_train_runs(probe):
    seen, run = probe
    assert seen["fit"]["steps"] == run["steps"] == 6  # 27 examples, batch 9, 2 epochs
    assert seen["fit"]["lr"] == [e["lr"] for e in run["epochs"]]  # the recipe's cosine schedule
    np.testing.assert_allclose(seen["fit"]["losses"], [e["mean_loss"] for e in run["epochs"]], rtol=1e-5)
    assert seen["fit"]["eval_accuracy"] == pytest.approx(run["accuracy"])
    assert [p[:3] for p in seen["progress"]] == [[1, 2, 3], [2, 2, 6]]  # one callback per epoch
    assert seen["evaluate"]["examples"] == 9 and seen["evaluate"]["accuracy"] == seen["fit"]["eval_accuracy"]
    assert seen["evaluate"]["loss"] > 0


def test_exported_model_predicts_what_the_trainer_predicts(probe):
    seen, _ = probe
    np.testing.assert_allclose(seen["model_probs"], seen["trainer_probs"], atol=1e-5)
    assert seen["classes"] == sorted(PICKED.values())


def test_checkpoint_resume_continues_the_same_run(probe):
    seen, _ = probe
    resume = seen["resume"]
    assert resume["resumed"] == resume["straight"][1] and resume["same_weights"] and resume["steps"] == 6


def test_callback_stops_the_fit_early(probe):
    seen, _ = probe
    assert seen["early"] == {"epochs": 2, "stopped_early": True, "steps": 6}


def test_adapter_merge_and_predict_on_image_files(probe):
    seen, _ = probe
    images = seen["images"]
    assert images["n"] == 36 and all(images["agree"])  # merged model and trainer name every photo alike
    assert images["labels"] == sorted(PICKED.values())  # class folders label the photos
    assert images["correct"] >= 27  # 3 easy classes after 2 epochs; 12 of the 36 were never trained on


@pytest.mark.parametrize("case, fragment", [
    ("labels", "labels must be >= 0 and < 3, got 0..7"),
    ("shape", "x must have shape (N, 28, 28) or (N, 1, 28, 28)"),
    ("nan", "contains NaN/Inf"),
    ("ragged", "x and y must be arrays"),
    ("checkpoint", "not a readable edge-ft checkpoint"),
    ("adapter exists", "already holds an adapter; pass force=True"),
    ("no bundle", "no such bundle folder"),
    ("lr", "learning rate must be positive"),
])
def test_bad_input_raises_edge_fts_own_one_line_error(probe, case, fragment):
    message = probe[0]["refusals"][case]
    assert message is not None and not message.startswith("LEAKED"), message
    assert fragment in message and "\n" not in message


@pytest.mark.skipif(subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True).returncode,
                    reason="mypy is not installed (requirements/host.txt has it)")
def test_the_api_module_passes_mypy_strict():
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "edge_ft/device/api.py"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
