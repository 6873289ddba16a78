"""MLPerf Tiny's reference models travel in bundles and train on the device: every shipped model (ResNet-8, DS-CNN,
MobileNetV1-0.25) under every method (full, probe, LoRA on the classifier, bias, last-k with K = 2) on both ORT
engines, exported once per (model, method, engine) through `export_bundle`, as `edge-ft export --model` does.

  parity   the engine against torch.optim.SGD from the same weights (tests/lockstep.py), 2 steps of batch 4 on
           seeded random inputs of the model's real shape (no CIFAR-10, speech or VWW data ships here): losses,
           each step's weight change, and every frozen tensor bit-identical after training, BatchNorm's running
           statistics included, on both engines (torch runs the model in eval mode: BatchNorm on frozen statistics)
  FLOPs    the ort-step graph's Conv/ConvTranspose/MatMul/Gemm FLOPs equal the cost model's for the method
  device   ResNet-8 pretrained briefly here on real Fashion-MNIST images (28x28 grey zero-padded to 32x32 and
           replicated to three channels; not CIFAR-10) and fine-tuned from an ort-step bundle by `edge-ft train` in
           the device venv (no torch), then `edge-ft predict`; a DS-CNN ort-training bundle trained by `edge-ft
           train` on a float32 .npz of synthetic MFCC-shaped inputs; data of another shape refused in one line
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from lockstep import run_lockstep
from safetensors.numpy import load_file, save_file
from test_step_graph_costs import node_flops
from test_step_graph_models import seeded
from test_user_model import DEVICE_PYTHON, device

from edge_ft.cli import main
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.costmodel import estimate
from edge_ft.data.npz import save_npz
from edge_ft.data.readers import DEBIAN_FASHION_ROOT, read_fashion
from edge_ft.device.bundle import load_bundle
from edge_ft.device.engines import engine_class
from edge_ft.host.describe import host_model
from edge_ft.host.export import export_bundle
from edge_ft.host.export.common import prepare_model
from tests.ort_training_support import ROOT

MODELS = {"resnet8": ("edge_ft.host.models.tiny:ResNet8", (3, 32, 32)),
          "ds-cnn": ("edge_ft.host.models.tiny:DSCNN", (1, 49, 10)),
          "mobilenet-v1-0.25": ("edge_ft.host.models.tiny:MobileNetV1", (3, 96, 96))}
METHODS = {"full": {}, "probe": {}, "lora": {"targets": ("classifier",)}, "bias": {}, "last-k": {"last_k": 2}}
ENGINES = ("ort-step", "ort-training")
OPT = OptimizerConfig("sgd", lr=0.05)  # both engines offer it; no optimizer state, so each lockstep step stands alone
BATCH, STEPS, SEED = 4, 2, 0


@cache
def host(model: str):
    return host_model(*MODELS[model])


@cache
def base(model: str) -> tuple[Path, dict[str, np.ndarray]]:
    """Seeded weights with BatchNorm's statistics and affine parameters moved off their identity start, so a graph
    that ignored or updated them would fail."""
    torch.manual_seed(0)
    net = seeded(host(model).make())
    state = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    path = ROOT / f"{model}-base.safetensors"
    save_file(state, str(path))
    return path, state


def method_config(model: str, method: str) -> MethodConfig:
    desc = host(model).desc
    return MethodConfig(method, num_classes=desc.num_classes, model=desc, **METHODS[method])


@cache
def bundle(model: str, method: str, engine: str) -> Path:
    out = ROOT / f"{model}-{method}-{engine}"
    export_bundle(method_config(model, method), OPT, base(model)[0], out, engine=engine, seed=SEED, host=host(model))
    return out


def batches(model: str, n: int, batch: int = BATCH, seed: int = 0):
    shape, classes = MODELS[model][1], host(model).desc.num_classes
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, *shape), dtype=np.float32), rng.integers(0, classes, batch))
            for _ in range(n)]


CASES = [(m, meth, e) for m in MODELS for meth in METHODS for e in ENGINES]


@pytest.mark.slow
@pytest.mark.parametrize("model, method, engine", CASES)
def test_every_reference_model_trains_from_its_bundle_like_torch(model, method, engine):
    loaded = load_bundle(bundle(model, method, engine))
    assert loaded.model == host(model).desc and loaded.input_shape == MODELS[model][1]
    runner = engine_class(engine)(loaded, threads=1)
    start = runner.parameters()
    cfg = method_config(model, method)
    reference = prepare_model(cfg, base(model)[1], SEED, mean_pools=False, host=host(model)).eval()
    trainable = [n for n, p in reference.named_parameters() if p.requires_grad]
    assert trainable == list(loaded.trainable)
    statistics = {n for n, b in reference.named_buffers() if b.is_floating_point()}
    assert set(start) == set(dict(reference.named_parameters())) | statistics  # what the engine holds
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=OPT.lr)
    gaps = run_lockstep(runner, reference, optimizer, batches(model, STEPS), lambda step: OPT.lr)
    # Forward rounding from the same weights: float32 convolutions summed in another order, up to 28 layers deep.
    np.testing.assert_allclose(gaps.losses, gaps.reference, rtol=1e-5)
    gaps.check(5e-5)  # beyond lockstep's rounding bound: the forward's relative rounding (measured 4.8e-6)
    after = runner.parameters()
    moved = [n for n in trainable if not np.array_equal(after[n], start[n])]
    # The head always moves; deep in a seeded, untrained MobileNet the first conv's gradient is so small that
    # lr * gradient rounds away against the weight in float32, in torch as on the engine (the gaps above agree).
    assert trainable[-1] in moved and len(moved) >= len(trainable) // 2, (len(moved), len(trainable))
    for name, value in start.items():
        if name not in trainable:  # frozen weights and BatchNorm's running statistics never move
            np.testing.assert_array_equal(after[name], value, err_msg=f"frozen {name} moved")
    assert statistics <= set(loaded.frozen)


@pytest.mark.slow
@pytest.mark.parametrize("model, method", [(m, meth) for m in MODELS for meth in METHODS])
def test_step_graph_flops_equal_the_cost_model(model, method):
    folder = bundle(model, method, "ort-step")
    state = load_file(folder / "state.safetensors")
    (x, y), = batches(model, 1, batch=61)  # 61: no weight has that size
    counted = node_flops(folder / "train_step.onnx", {"input": x, "labels": y, "lr": np.array(OPT.lr, np.float32),
                                                     **state})
    assert sum(f for *_, f in counted) == estimate(method_config(model, method), 61, OPT, "float32").flops["total"]


# ------------------------------------------------------------------------------------------------ on the device
def fashion_rgb(split: str, n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images zero-padded to 32x32 and replicated to three channels: uint8 (N,3,32,32)."""
    x, y = read_fashion(split)
    x, y = x[offset:offset + n], y[offset:offset + n]
    return np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1), y


@cache
def fashion_base() -> Path:
    """ResNet-8 trained 120 AdamW steps (batch 32) on 2,400 Fashion-MNIST training images the device never sees."""
    torch.manual_seed(0)
    net = host("resnet8").make()
    x, y = fashion_rgb("train", 2400)
    x, y = torch.from_numpy(x.astype(np.float32) / 255), torch.from_numpy(y)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    net.train()  # BatchNorm learns its statistics here, as a base's pretraining would
    for step in range(120):
        i = slice(step * 32 % 2400, step * 32 % 2400 + 32)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[i]), y[i]).backward()
        opt.step()
    path = ROOT / "resnet8-fashion.safetensors"
    save_file({k: v.detach().numpy().copy() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not DEVICE_PYTHON.exists() or not (DEBIAN_FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs the device venv (make device-venv) and dataset-fashion-mnist")
def test_resnet8_fine_tunes_on_fashion_mnist_in_the_device_venv(tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", "--model", MODELS["resnet8"][0], "--input-shape", "3,32,32", "--method", "bias",
                 "--base", str(fashion_base()), "--out", str(out), "--lr", "0.01"]) == 0
    train, test, digits = tmp_path / "train.npz", tmp_path / "test.npz", tmp_path / "digits.npz"
    save_npz(train, *fashion_rgb("train", 640, offset=50_000), input_shape=(3, 32, 32))
    save_npz(test, *fashion_rgb("test", 300), input_shape=(3, 32, 32))
    grey, labels = read_fashion("test")
    save_npz(digits, grey[:8], labels[:8])  # LeNet-5's 28x28 grey format
    run = tmp_path / "run"
    device("train", str(out), "--data", str(train), "--eval", str(test), "--steps", "20", "--batch", "32",
           "--threads", "1", "--out", str(run), "--quiet")
    results = json.loads((run / "results.json").read_text())
    assert results["accuracy"] > 0.5 and results["steps"] == 20  # 10 classes: chance is 0.1
    assert results["bundle"]["model"]["name"] == "ResNet8"
    trained = load_file(str(run / "trained.safetensors"))
    assert set(trained) == set(load_bundle(out).trainable)
    predicted = device("predict", str(run), str(test)).stdout
    assert f"accuracy {results['accuracy']:.4f} on 300 labelled inputs" in predicted
    # 28x28 grey digits-shaped data for a 3x32x32 model: one line, exit 2, nothing trained.
    code = main(["train", str(out), "--data", str(digits), "--out", str(tmp_path / "wrong"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "x must have shape (N, 3, 32, 32) for the model's input [3, 32, 32], got (8, 28, 28)" in err


@pytest.mark.slow
def test_ds_cnn_trains_on_float_inputs_with_ort_training(tmp_path):
    (x, y), = batches("ds-cnn", 1, batch=96, seed=1)
    data = tmp_path / "mfcc.npz"
    save_npz(data, x * 20, y, input_shape=(1, 49, 10))  # MFCC-like range; float32 inputs are used as they are
    run = tmp_path / "run"
    assert main(["train", str(bundle("ds-cnn", "bias", "ort-training")), "--data", str(data), "--eval", str(data),
                 "--steps", "6", "--batch", "16", "--threads", "1", "--out", str(run), "--quiet"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 6 and np.isfinite(results["losses"]).all() and results["accuracy"] is not None
    frozen = load_bundle(bundle("ds-cnn", "bias", "ort-training")).frozen
    assert {"features.1.running_mean", "features.1.running_var"} <= set(frozen)
