"""Adapters: PEFT layout and size, loading into Hugging Face PEFT, apply and merge on the device, refusals."""

import json
import logging
import shutil
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_ft.checkpoint import load_safetensors, sha256_file
from edge_ft.cli import main
from edge_ft.config import MethodConfig
from edge_ft.device.adapter import CONFIG, RECORD, WEIGHTS, apply_adapter, load_adapter, merge_adapter
from edge_ft.device.bundle import load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.device.ort_api import inference_session
from edge_ft.errors import UserError
from edge_ft.host.model import LeNet5
from tests.ort_training_support import ADAMW, METHODS, ROOT, base_state, bundle, fresh_bundle, mnist, npz_pair

LORA_R2_MAX_BYTES = 6500  # the shipped file for rank 2 on fc1..fc3 in float32


@cache
def trained_adapter(method: str, dtype: str = "float32") -> tuple[Path, Path]:
    """(run folder, adapter folder): 60 AdamW steps on real digits, then `edge-ft adapter export`."""
    classes = METHODS[method].num_classes
    train, _ = npz_pair() if classes == 10 else npz_pair(600, 300, classes)  # digits 0..2: ~1,500 in MNIST 5k
    run, adapter = ROOT / f"adapter-run-{method}", ROOT / f"adapter-{method}-{dtype}"
    if not run.exists():
        assert main(["train", str(bundle(METHODS[method])), "--data", str(train), "--steps", "60", "--batch", "32",
                     "--lr", "0.01", "--threads", "1", "--out", str(run), "--quiet"]) == 0
    assert main(["adapter", "export", str(run), "--out", str(adapter), "--dtype", dtype]) == 0
    return run, adapter


def images(n: int = 128) -> np.ndarray:
    return mnist()[0][-n:, None].astype(np.float32) / 255


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    return inference_session(path, threads=1).run(None, {"input": x})[0]


def test_lora_adapter_follows_peft_layout_and_size():
    _, adapter = trained_adapter("lora")
    tensors = load_safetensors(adapter / WEIGHTS)
    assert {k: v.shape for k, v in tensors.items()} == {
        f"base_model.model.{layer}.lora_{ab}.weight": shape
        for layer, (fan_in, fan_out) in {"fc1": (256, 120), "fc2": (120, 84), "fc3": (84, 10)}.items()
        for ab, shape in (("A", (2, fan_in)), ("B", (fan_out, 2)))
    }
    assert all(v.dtype == np.float32 for v in tensors.values())
    assert (adapter / WEIGHTS).stat().st_size <= LORA_R2_MAX_BYTES
    config = json.loads((adapter / CONFIG).read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "bias", "task_type",
                                   "modules_to_save")} == {
        "peft_type": "LORA", "r": 2, "lora_alpha": 4.0, "target_modules": ["fc1", "fc2", "fc3"], "bias": "none",
        "task_type": None, "modules_to_save": None}
    assert "edge_ft" not in config  # edge-ft's record lives beside it, where PEFT does not look
    record = json.loads((adapter / RECORD).read_text())
    assert record["base_sha256"] == load_bundle(bundle(METHODS["lora"])).base_sha256
    assert record["num_classes"] == 10 and record["method"] == "lora" and record["classes"] is None
    assert record["files"] == {WEIGHTS: sha256_file(adapter / WEIGHTS), CONFIG: sha256_file(adapter / CONFIG)}


def test_float16_halves_the_adapter():
    _, full = trained_adapter("lora")
    _, half = trained_adapter("lora", "float16")
    a, b = load_safetensors(full / WEIGHTS), load_safetensors(half / WEIGHTS)
    assert sum(v.nbytes for v in b.values()) * 2 == sum(v.nbytes for v in a.values())
    assert (half / WEIGHTS).stat().st_size < 0.6 * (full / WEIGHTS).stat().st_size
    for key in a:
        np.testing.assert_allclose(b[key].astype(np.float32), a[key], rtol=1e-3, atol=1e-4)


def peft_load(adapter: Path, num_classes: int, caplog) -> torch.nn.Module:
    """PeftModel.from_pretrained(LeNet5(num_classes) on the base weights, ADAPTER_DIR), asserting PEFT says nothing:
    no warning and no log record (it warned about the "edge_ft" block format-1 configs carried)."""
    from peft import PeftModel

    model = LeNet5(num_classes)
    state = {k: torch.from_numpy(v) for k, v in base_state().items()}
    if num_classes != 10:  # PEFT keeps this fresh head as the wrapped original; the adapter brings the trained one
        state = {k: v for k, v in state.items() if not k.startswith("fc3.")}
    model.load_state_dict(state, strict=num_classes == 10)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    assert not [str(w.message) for w in caught] and not caplog.records, (caught, caplog.records)
    return peft_model


@pytest.mark.parametrize("method", ["lora", "lora-new-head"])
def test_peft_loads_the_device_adapter_with_the_device_logits(method, caplog):
    """PeftModel.from_pretrained on the torch LeNet-5 computes what the device's model.onnx computes, silently."""
    run, adapter = trained_adapter(method)
    num_classes = METHODS[method].num_classes
    peft_model = peft_load(adapter, num_classes, caplog)
    x = images()
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_model(run / "model.onnx", x), expected, rtol=0, atol=1e-5)
    assert not np.allclose(expected, LeNet5(num_classes).eval()(torch.from_numpy(x)).detach().numpy(), atol=1e-3)


def test_new_head_adapter_uses_peft_keys_for_the_saved_head():
    """PEFT 0.21.2 saves a modules_to_save layer without its wrapper's `modules_to_save.default.` infix."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    _, adapter = trained_adapter("lora-new-head")
    cfg = METHODS["lora-new-head"]
    ours = {k: v.shape for k, v in load_safetensors(adapter / WEIGHTS).items()}
    theirs = get_peft_model_state_dict(get_peft_model(LeNet5(3), LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), modules_to_save=list(cfg.modules_to_save))))
    assert ours == {k: tuple(v.shape) for k, v in theirs.items()}
    assert ours["base_model.model.fc3.weight"] == (3, 84)
    config = json.loads((adapter / CONFIG).read_text())
    assert config["target_modules"] == ["fc1", "fc2"] and config["modules_to_save"] == ["fc3"]


@pytest.mark.parametrize("method", ["lora", "probe", "lora-new-head"])
def test_merged_model_equals_the_trained_model(method, tmp_path):
    run, adapter = trained_adapter(method)
    out = tmp_path / "merged.onnx"
    assert main(["adapter", "merge", str(bundle(METHODS[method])), str(adapter), "--out", str(out)]) == 0
    x = images()
    np.testing.assert_allclose(run_model(out, x), run_model(run / "model.onnx", x), rtol=0, atol=1e-5)
    merged = onnx.load(out)  # no LoRA tensors left: the update is folded into the weights
    assert merged.graph.initializer and not [t.name for t in merged.graph.initializer if "lora" in t.name.lower()]


def test_probe_adapter_ships_the_head():
    _, adapter = trained_adapter("probe")
    tensors = load_safetensors(adapter / WEIGHTS)
    assert {k: v.shape for k, v in tensors.items()} == {"base_model.model.fc3.weight": (10, 84),
                                                         "base_model.model.fc3.bias": (10,)}
    config = json.loads((adapter / CONFIG).read_text())  # no PEFT type: PEFT has no method for a bare head
    assert config == {"peft_type": None, "base_model_name_or_path": "base-1.safetensors", "task_type": None}
    assert json.loads((adapter / RECORD).read_text())["method"] == "probe"


def test_applied_adapter_is_where_training_and_inference_start(tmp_path):
    run, adapter = trained_adapter("lora")
    path = fresh_bundle(METHODS["lora"])
    assert main(["adapter", "apply", str(path), str(adapter)]) == 0
    b = load_bundle(path)  # the manifest now lists the adapter file with its hash
    engine = open_engine(b, threads=1)
    tensors = load_adapter(adapter).tensors
    for name, value in engine.trainable_state().items():
        np.testing.assert_array_equal(value, tensors[name])
    np.testing.assert_allclose(engine.logits(images()), run_model(run / "model.onnx", images()), rtol=0, atol=1e-5)
    train, _ = npz_pair()
    assert main(["train", str(path), "--data", str(train), "--steps", "5", "--lr", "0.001", "--out",
                 str(tmp_path / "run"), "--quiet"]) == 0
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["bundle"]["applied_adapter"]["file"] == "applied_adapter.safetensors"
    first = json.loads((run / "results.json").read_text())["losses"][0]
    assert r["losses"][0] < first - 0.05  # starts from the trained adapter, not from B = 0


def _tamper(adapter: Path, tmp_path: Path, config=None, tensors=None, record=None) -> Path:
    out = tmp_path / "tampered"
    shutil.copytree(adapter, out)
    for name, edit in ((CONFIG, config), (RECORD, record)):
        if edit:
            data = json.loads((out / name).read_text())
            edit(data)
            (out / name).write_text(json.dumps(data))
    if tensors:
        from safetensors.numpy import load_file, save_file

        data = load_file(str(out / WEIGHTS))
        tensors(data)
        save_file(data, str(out / WEIGHTS))
    return out


@pytest.mark.parametrize(
    "change, target, message",
    [
        (dict(config=lambda c: c.update(r=4)), "lora", "rank r=4"),
        (dict(config=lambda c: c.update(target_modules=["fc1", "fc2"])), "lora", "adapter targets"),
        (dict(config=lambda c: c.update(modules_to_save=["fc3"])), "lora", "adapter modules_to_save ['fc3']"),
        (dict(record=lambda c: c.update(base_sha256="0" * 64)), "lora", "different base model"),
        (dict(record=lambda c: c.update(dtype="float16")), "lora", "the config says float16"),
        (dict(config=lambda c: c.update(lora_dropout=0.5)), "lora", "adapter_config.json: does not match"),
        (dict(tensors=lambda t: t.update({"base_model.model.fc1.lora_A.weight": np.zeros((2, 255), np.float32)})),
         "lora", "has shape (2, 255)"),
        (dict(tensors=lambda t: t.pop("base_model.model.fc2.lora_B.weight")), "lora", "'fc2.lora_B' is missing"),
        ({}, "probe", "adapter is for method lora"),
        ({}, "other-base", "different base model"),
        ({}, "probe-5-classes", "adapter has 10 classes, the bundle 5"),
        ({}, "lora-new-head", "adapter has 10 classes, the bundle 3"),
    ],
)
def test_mismatched_adapters_are_refused_in_one_line(change, target, message, tmp_path, capsys):
    _, adapter = trained_adapter("probe" if target == "probe-5-classes" else "lora")
    adapter = _tamper(adapter, tmp_path, **change) if change else adapter
    if target == "probe-5-classes":
        path = fresh_bundle(MethodConfig("probe", num_classes=5), ADAMW)
    elif target == "lora-new-head":
        path = fresh_bundle(METHODS[target], ADAMW)
    else:
        path = fresh_bundle(METHODS["lora" if target == "other-base" else target], ADAMW,
                            base_seed=2 if target == "other-base" else 1)
    before = (path / "manifest.json").read_bytes()
    for argv in (["apply", str(path), str(adapter)], ["merge", str(path), str(adapter), "--out", str(tmp_path / "m")]):
        assert main(["adapter", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (path / "manifest.json").read_bytes() == before and not (tmp_path / "m").exists()


def test_adapter_export_needs_a_finished_run(tmp_path, capsys):
    assert main(["adapter", "export", str(tmp_path), "--out", str(tmp_path / "a")]) == 2
    assert "not a finished run" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_apply_then_load_bundle_detects_a_swapped_adapter_file(tmp_path):
    _, adapter = trained_adapter("lora")
    path = fresh_bundle(METHODS["lora"])
    apply_adapter(load_bundle(path), adapter)
    (path / "applied_adapter.safetensors").write_bytes((adapter / WEIGHTS).read_bytes())
    with pytest.raises(UserError, match="applied_adapter.safetensors: contents do not match"):
        load_bundle(path)
    with pytest.raises(UserError, match="no such file|not an adapter folder"):
        merge_adapter(load_bundle(bundle(METHODS["lora"])), tmp_path / "nothing", tmp_path / "m.onnx")


def test_cached_feature_training_starts_from_an_applied_probe_adapter(tmp_path):
    _, adapter = trained_adapter("probe")
    path = fresh_bundle(METHODS["probe"])
    apply_adapter(load_bundle(path), adapter)
    train, _ = npz_pair()
    first = {}
    for name, bundle_path, extra in [("plain", path, []), ("cached", path, ["--cache-features"]),
                                     ("fresh", bundle(METHODS["probe"]), ["--cache-features"])]:
        assert main(["train", str(bundle_path), "--data", str(train), "--steps", "1", "--threads", "1",
                     "--out", str(tmp_path / name), "--quiet", *extra]) == 0
        first[name] = json.loads((tmp_path / name / "results.json").read_text())["losses"][0]
    assert first["cached"] == pytest.approx(first["plain"], abs=1e-5)
    assert first["cached"] < first["fresh"] - 0.01  # the trained head, not the exported one (random base: small gap)


def _as_format_1(adapter: Path, out: Path) -> Path:
    """The layout edge-ft wrote before the record moved out of adapter_config.json (an "edge_ft" block)."""
    shutil.copytree(adapter, out)
    record = json.loads((out / RECORD).read_text())
    config = json.loads((out / CONFIG).read_text())
    config["edge_ft"] = {"method": record["method"], "base_sha256": record["base_sha256"], "format_version": 1,
                         "num_classes": record["num_classes"], "dtype": record["dtype"],
                         "weights_sha256": record["files"][WEIGHTS]}
    (out / CONFIG).write_text(json.dumps(config))
    (out / RECORD).unlink()
    return out


def test_format_1_adapters_still_load(tmp_path, capsys):
    run, adapter = trained_adapter("lora")
    old = _as_format_1(adapter, tmp_path / "old")
    merged = tmp_path / "merged.onnx"
    assert main(["adapter", "merge", str(bundle(METHODS["lora"])), str(old), "--out", str(merged)]) == 0
    np.testing.assert_allclose(run_model(merged, images()), run_model(run / "model.onnx", images()), rtol=0, atol=1e-5)
    assert main(["adapter", "apply", str(fresh_bundle(METHODS["lora"])), str(old)]) == 0
    capsys.readouterr()
    with open(old / WEIGHTS, "r+b") as f:  # its integrity check still holds
        f.seek(-3, 2)
        f.write(b"\x7f")
    assert main(["adapter", "merge", str(bundle(METHODS["lora"])), str(old), "--out", str(merged)]) == 2
    err = capsys.readouterr().err
    assert "adapter_model.safetensors: does not match adapter_config.json" in err and len(err.splitlines()) == 1


def test_export_never_overwrites_an_adapter_silently(tmp_path, capsys):
    run, adapter = trained_adapter("lora")
    out = tmp_path / "adapter"
    shutil.copytree(trained_adapter("probe")[1], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["adapter", "export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: already holds an adapter; pass --force" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["adapter", "export", str(run), "--out", str(out), "--force"]) == 0
    assert load_adapter(out).record["method"] == "lora"
    assert (out / WEIGHTS).read_bytes() == (adapter / WEIGHTS).read_bytes()


def test_apply_says_it_changes_the_bundle_or_writes_a_copy(tmp_path, capsys):
    run, adapter = trained_adapter("lora-new-head")
    original = fresh_bundle(METHODS["lora-new-head"])
    before = {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()}
    copy = tmp_path / "applied"
    assert main(["adapter", "apply", str(original), str(adapter), "--out", str(copy)]) == 0
    assert "(" + str(original) + " unchanged)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in original.iterdir() if p.is_file()} == before
    np.testing.assert_allclose(open_engine(load_bundle(copy), threads=1).logits(images()),
                               run_model(run / "model.onnx", images()), rtol=0, atol=1e-5)
    assert main(["adapter", "apply", str(original), str(adapter), "--out", str(copy)]) == 2
    assert "exists; choose a new folder" in capsys.readouterr().err
    assert main(["adapter", "apply", str(original), str(adapter)]) == 0
    assert "bundle changed in place" in capsys.readouterr().out
    assert load_bundle(original).manifest["applied_adapter"]["file"] == "applied_adapter.safetensors"
