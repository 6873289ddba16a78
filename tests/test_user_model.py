"""A network that is not LeNet-5, end to end: `edge-ft export --model FILE.py:CLASS` -> device training with plain
onnxruntime and no torch (the device venv) -> adapter export -> PEFT loads it -> apply -> merge -> predict."""

import json
import logging
import os
import subprocess
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from edge_ft.architecture import count_params
from edge_ft.checkpoint import load_safetensors
from edge_ft.cli import main
from edge_ft.config import MethodConfig
from edge_ft.device.adapter import CONFIG, RECORD
from edge_ft.device.bundle import load_bundle
from edge_ft.device.ort_api import inference_session
from edge_ft.host.describe import describe
from tests.models.small_nets import TinyConvNet
from tests.ort_training_support import ROOT, mnist, npz_pair

REPO = Path(__file__).resolve().parents[1]
DEVICE_PYTHON = REPO / ".venv-device" / "bin" / "python"
SPEC = f"{REPO / 'tests' / 'models' / 'small_nets.py'}:TinyConvNet"
pytestmark = pytest.mark.skipif(not DEVICE_PYTHON.exists(), reason="device venv not built (make device-venv)")


@cache
def base() -> tuple[Path, dict[str, np.ndarray]]:
    """TinyConvNet pretrained for 150 AdamW steps on MNIST images the device's train/test files do not hold."""
    torch.manual_seed(3)
    model = TinyConvNet()
    x, y = mnist()
    x, y = torch.from_numpy(x[1000:3400, None].astype(np.float32) / 255), torch.from_numpy(y[1000:3400])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        i = slice(step * 16 % 2400, step * 16 % 2400 + 64)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    path = ROOT / "tiny-base.safetensors"
    save_file(state, str(path))
    return path, state


def device(*argv: str) -> subprocess.CompletedProcess:
    """edge-ft on the device venv (standard onnxruntime, no torch), from this checkout's source."""
    code = ("import sys; from edge_ft.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules; sys.exit(rc)")
    proc = subprocess.run([str(DEVICE_PYTHON), "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@cache
def trained(method: str, *extra: str) -> tuple[Path, Path, Path]:
    """(bundle, run, adapter) of one method on TinyConvNet, trained 40 steps on real digits on the device."""
    name = "-".join((method, *extra))
    bundle, run, adapter = ROOT / f"tiny-{name}", ROOT / f"tiny-run-{name}", ROOT / f"tiny-adapter-{name}"
    assert main(["export", "--model", SPEC, "--input-shape", "1,28,28", "--method", method, "--base",
                 str(base()[0]), "--out", str(bundle), "--lr", "0.01", *extra]) == 0
    train, test = npz_pair()
    device("train", str(bundle), "--data", str(train), "--eval", str(test), "--steps", "40", "--batch", "32",
           "--threads", "1", "--out", str(run), "--quiet")
    device("adapter", "export", str(run), "--out", str(adapter))
    return bundle, run, adapter


def images(n: int = 64) -> np.ndarray:
    return mnist()[0][-n:, None].astype(np.float32) / 255


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    return inference_session(path, threads=1).run(None, {"input": x})[0]


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,trainable", [("bias", (), 62), ("last-k", ("--last-k", "2"), 19_178)])
def test_export_train_adapter_merge_predict(method, extra, trainable, tmp_path, caplog):
    bundle, run, adapter = trained(method, *extra)
    loaded = load_bundle(bundle)
    assert loaded.model == describe(TinyConvNet(), (1, 28, 28), source=SPEC)  # the description travels
    assert sum(int(np.prod(s)) for s in loaded.trainable.values()) == trainable == \
        count_params(loaded.method)["trainable"]
    results = json.loads((run / "results.json").read_text())
    assert results["accuracy"] > 0.5 and np.isfinite(results["losses"]).all()
    trained_tensors = load_safetensors(run / "trained.safetensors")
    assert set(trained_tensors) == set(loaded.trainable)
    assert all(not np.array_equal(v, base()[1][k]) for k, v in trained_tensors.items())  # every one moved

    # PEFT loads the adapter into the torch module on the base weights and computes what the device trained.
    from peft import PeftModel

    model = TinyConvNet()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in base()[1].items()})
    caplog.clear()  # the export above logs torch's tracing at DEBUG; only what PEFT says matters here
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    assert not [str(w.message) for w in caught] and not caplog.records
    x = images()
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits(run / "model.onnx", x), expected, rtol=0, atol=1e-5)
    assert json.loads((adapter / CONFIG).read_text())["peft_type"] == "LORA"
    assert json.loads((adapter / RECORD).read_text())["peft_carrier"] == "conv_a"  # 17 zeros: its 1x9 A, 8x1 B

    # Merge on the device, apply into a copy of the bundle and merge again: the same model either way.
    device("adapter", "merge", str(bundle), str(adapter), "--out", str(tmp_path / "merged.onnx"))
    np.testing.assert_allclose(logits(tmp_path / "merged.onnx", x), expected, rtol=0, atol=1e-5)
    device("adapter", "apply", str(bundle), str(adapter), "--out", str(tmp_path / "applied"))
    device("adapter", "merge", str(tmp_path / "applied"), str(adapter), "--out", str(tmp_path / "again.onnx"))
    np.testing.assert_array_equal(logits(tmp_path / "again.onnx", x), logits(tmp_path / "merged.onnx", x))
    out = device("predict", str(tmp_path / "merged.onnx"), str(npz_pair()[1])).stdout
    assert "accuracy" in out


def test_lenet5_bias_and_last_k_counts():
    assert count_params(MethodConfig("bias"))["trainable"] == 236
    assert count_params(MethodConfig("last-k", last_k=2))["trainable"] == 11_014
    tiny = describe(TinyConvNet(), (1, 28, 28))
    assert count_params(MethodConfig("bias", model=tiny))["trainable"] == 62  # 8 + 12 + 32 + 10
    assert count_params(MethodConfig("last-k", last_k=2, model=tiny))["trainable"] == 588 * 32 + 32 + 32 * 10 + 10


def test_unsupported_layer_kind_is_one_line(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text("import torch, torch.nn as nn\nclass Net(nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.fc = nn.Linear(784, 10)\n        self.act = nn.GELU()\n"
                    "    def forward(self, x):\n        return self.fc(self.act(x).flatten(1))\n")
    save_file({"fc.weight": np.zeros((10, 784), np.float32), "fc.bias": np.zeros(10, np.float32)},
              str(tmp_path / "w.safetensors"))
    code = main(["export", "--model", f"{path}:Net", "--input-shape", "1,28,28", "--method", "full", "--base",
                 str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "act (GELU) is a layer kind edge-ft does not support" in err and not (tmp_path / "b").exists()


@pytest.mark.parametrize("cfg", [MethodConfig("bias", num_classes=3, modules_to_save=("fc3",)),
                                 MethodConfig("last-k", last_k=2), MethodConfig("bias")],
                         ids=["bias-new-head", "last-k-2", "bias"])
def test_lenet5_adapters_load_in_peft(cfg, tmp_path, caplog):
    """An adapter export of trained tensors (written as a device run leaves them) loads in PEFT on LeNet-5 and
    computes what LeNet-5 with those tensors computes."""
    from peft import PeftModel

    from edge_ft.architecture import param_shapes, trainable_names
    from edge_ft.device.adapter import export_adapter
    from edge_ft.host.model import LeNet5

    torch.manual_seed(0)
    base_state = LeNet5().state_dict()
    rng = np.random.default_rng(0)
    trained = {n: rng.standard_normal(param_shapes(cfg)[n]).astype(np.float32) for n in trainable_names(cfg)}
    run = tmp_path / "run"
    run.mkdir()
    save_file(trained, str(run / "trained.safetensors"))
    (run / "results.json").write_text(json.dumps({"bundle": {"method": cfg.to_dict(), "base": {"sha256": "0" * 64}}}))
    export_adapter(run, tmp_path / "adapter")

    model = LeNet5(cfg.num_classes)
    model.load_state_dict({k: v for k, v in base_state.items() if cfg.num_classes == 10 or not k.startswith("fc3.")},
                          strict=cfg.num_classes == 10)
    expected_model = LeNet5(cfg.num_classes)
    expected_model.load_state_dict({**model.state_dict(), **{k: torch.from_numpy(v) for k, v in trained.items()}})
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    assert not [str(w.message) for w in caught] and not caplog.records
    x = images(16)
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(torch.from_numpy(x)).numpy(),
                                   expected_model.eval()(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-5)
