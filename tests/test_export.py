"""`edge-ft export` for the ort-training engine: the prepared model, the graphs, the manifest and its checks."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

from edge_ft.architecture import frozen_names, param_shapes, trainable_names
from edge_ft.checkpoint import sha256_file
from edge_ft.cli import main
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.device.bundle import FORMAT_VERSION, load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.device.inference import base_weights
from edge_ft.device.ort_api import inference_session
from edge_ft.errors import UserError
from edge_ft.host.export import export_bundle
from edge_ft.host.export.common import MeanPool2x2, prepare_model
from edge_ft.host.methods import build_model
from tests.ort_training_support import METHODS, ROOT, base_path, base_state, bundle, fresh_bundle, mnist


def test_mean_pool_is_avgpool():
    x = torch.randn(3, 6, 24, 24)
    torch.testing.assert_close(MeanPool2x2(6, 24)(x), nn.AvgPool2d(2, 2)(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_prepared_model_keeps_the_state_dict(method):
    cfg = METHODS[method]
    prepared = prepare_model(cfg, base_state(), seed=0)
    reference = build_model(cfg, {k: torch.from_numpy(v) for k, v in base_state().items()}, seed=0)
    assert not any(isinstance(m, nn.AvgPool2d) for m in prepared.modules())
    assert list(prepared.state_dict()) == list(reference.state_dict())
    for name, value in reference.state_dict().items():
        assert torch.equal(prepared.state_dict()[name], value), name
    x = torch.from_numpy(mnist()[0][:16, None].astype(np.float32) / 255)
    torch.testing.assert_close(prepared(x), reference(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_manifest_describes_the_bundle(method):
    cfg = METHODS[method]
    path = bundle(cfg)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["engine"] == "ort-training"
    assert manifest["method"] == cfg.to_dict() and manifest["optimizer"]["name"] == "adamw"
    shapes = param_shapes(cfg)
    assert manifest["trainable"] == {n: list(shapes[n]) for n in trainable_names(cfg)}
    assert manifest["frozen"] == {n: list(shapes[n]) for n in frozen_names(cfg)}
    assert manifest["base"]["sha256"] == sha256_file(base_path())
    assert manifest["input_shape"] == [1, 28, 28] and manifest["num_classes"] == cfg.num_classes
    assert {"torch", "onnx", "onnxruntime-training-cpu"} <= set(manifest["versions"])
    expected = {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "inference_base.onnx"}
    if method != "full":  # a frozen prefix (conv1, conv2 at least): features.onnx and the head bundle
        expected |= {"features.onnx", "head/manifest.json", "head/checkpoint", "head/training_model.onnx",
                     "head/eval_model.onnx", "head/optimizer_model.onnx"}
    assert set(manifest["files"]) == expected
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_and_inference_graph_hold_the_starting_weights(method):
    """Frozen weights travel in the checkpoint bit for bit; inference_base.onnx computes the prepared model."""
    cfg = METHODS[method]
    b = load_bundle(bundle(cfg))
    prepared = prepare_model(cfg, base_state(), seed=0)
    expected = {k: v.numpy() for k, v in prepared.state_dict().items()}
    params = open_engine(b, threads=1).parameters()
    assert set(params) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(params[name], expected[name], err_msg=name)
    for name, value in base_weights(b).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    x = mnist()[0][:64, None].astype(np.float32) / 255
    session = inference_session(b.file("inference_base.onnx"), threads=1)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x})[0], prepared(torch.from_numpy(x)).numpy(),
                                   rtol=0, atol=1e-5)


def test_probe_bundle_has_features_graph_and_head_bundle():
    b = load_bundle(bundle(METHODS["probe"]))
    prepared = prepare_model(METHODS["probe"], base_state(), seed=0)
    x = mnist()[0][:64, None].astype(np.float32) / 255
    features = inference_session(b.file("features.onnx"), threads=1).run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(features, prepared.features(torch.from_numpy(x)).numpy(), rtol=0, atol=1e-5)
    head = b.head
    assert head.input_shape == (84,) and set(head.trainable) == {"fc3.weight", "fc3.bias"} and not head.frozen
    head_params = open_engine(head, threads=1).trainable_state()
    np.testing.assert_array_equal(head_params["fc3.weight"], prepared.fc3.weight.detach().numpy())


def test_new_class_count_gets_a_seeded_head():
    cfg = MethodConfig("probe", num_classes=5)
    out = ROOT / "probe-5"
    manifest = export_bundle(cfg, OptimizerConfig("sgd"), base_path(), out, seed=3)
    assert manifest["num_classes"] == 5 and manifest["trainable"]["fc3.weight"] == [5, 84]
    expected = prepare_model(cfg, base_state(), seed=3).fc3.weight.detach().numpy()
    np.testing.assert_array_equal(base_weights(load_bundle(out))["fc3.weight"], expected)


def test_export_replaces_a_bundle_but_not_other_folders(tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundle(METHODS["lora"]), out)
    (out / "stale.bin").write_bytes(b"old")
    export_bundle(METHODS["lora"], OptimizerConfig("sgd"), base_path(), out)
    assert not (out / "stale.bin").exists() and load_bundle(out).optimizer.name == "sgd"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an edge-ft bundle"):
        export_bundle(METHODS["lora"], OptimizerConfig("sgd"), base_path(), other)
    assert (other / "a.txt").read_text() == "keep me"


def test_ort_training_refuses_sgd_momentum(tmp_path):
    with pytest.raises(UserError, match="sgd-momentum"):
        export_bundle(METHODS["lora"], OptimizerConfig("sgd-momentum"), base_path(), tmp_path / "b")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "checkpoint").unlink(), "checkpoint: missing"),
        (lambda p: (p / "training_model.onnx").write_bytes(b"\0" * 10), "training_model.onnx: contents do not match"),
        (lambda p: _edit_manifest(p, format_version=99), "format version 99"),
        (lambda p: (p / "manifest.json").write_text("{"), "corrupt JSON"),
        (lambda p: _edit_manifest(p, trainable=None), "malformed field"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
    ],
)
def test_load_bundle_names_the_bad_file(damage, message):
    path = fresh_bundle(METHODS["lora"])
    damage(path)
    with pytest.raises(UserError, match=message):
        load_bundle(path)


def _edit_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_export_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no --out: export/<method, sized>-<engine> under the current directory
    assert main(["export", "--method", "lora", "--rank", "4", "--targets", "fc2,fc1", "--optimizer", "sgd",
                 "--base", str(base_path())]) == 0
    out = tmp_path / "export" / "lora-r4-ort-step"
    b = load_bundle(out)
    assert b.method.rank == 4 and b.method.targets == ("fc1", "fc2") and b.optimizer.name == "sgd"
    assert "2,320 trainable values" in capsys.readouterr().out
    assert main(["export", "--method", "lora", "--base", str(tmp_path / "nope.safetensors"), "--out", str(out)]) == 2
    assert "nope.safetensors: no such file" in capsys.readouterr().err


def test_export_refuses_to_overwrite_a_bundle_without_force_and_counts_every_file(tmp_path, capsys):
    out = tmp_path / "bundle"
    argv = ["export", "--method", "probe", "--base", str(base_path()), "--out", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr().out
    written = [p for p in out.rglob("*") if p.is_file()]
    assert f"{len(written)} files, {sum(p.stat().st_size for p in written) / 1024:.1f} KiB" in said
    before = (out / "manifest.json").read_bytes()
    assert main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a bundle" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "manifest.json").read_bytes() == before
    assert main([*argv, "--seed", "1", "--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1


def test_export_classes_from_a_folder_of_class_folders(tmp_path, capsys):
    photos = tmp_path / "my-photos"
    for name in ("cat", "ant", "bee", ".cache"):
        (photos / name).mkdir(parents=True)
    assert main(["export", "--method", "probe", "--base", str(base_path()), "--classes", str(photos),
                 "--out", str(tmp_path / "bundle")]) == 0
    b = load_bundle(tmp_path / "bundle")
    assert b.classes == ["ant", "bee", "cat"] and b.num_classes == 3  # the labels `data convert` gives them
    (tmp_path / "flat").mkdir()
    assert main(["export", "--method", "probe", "--base", str(base_path()), "--classes", str(tmp_path / "flat"),
                 "--out", str(tmp_path / "b2")]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "data convert" in err
