"""`edge-ft analyze`: the seed's tables, JSON that matches the cost model, one-line errors, no torch needed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_ft.cli import main
from edge_ft.config import MethodConfig
from edge_ft.costmodel import estimate

REPO = Path(__file__).resolve().parents[1]
DEVICE_PYTHON = REPO / ".venv-device" / "bin" / "python"


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(["analyze", *argv])
    except SystemExit as e:  # argparse exits on its own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_seed_numbers_and_matches_the_cost_model(capsys):
    code, out, _ = run(capsys, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["model"]["total_params"] == 44_426
    methods = doc["methods"]
    assert set(methods) == {"full", "probe", "lora"}
    assert methods["full"]["trainable_params"] == 44_426
    assert methods["probe"]["trainable_params"] == 850
    assert (methods["lora"]["trainable_params"], methods["lora"]["total_params"]) == (1_348, 45_774)
    for name, cfg in {"full": MethodConfig("full"), "probe": MethodConfig("probe"),
                      "lora": MethodConfig("lora")}.items():
        est = estimate(cfg, 32, "adamw", "float32")
        assert methods[name]["flops"] == est.flops
        assert methods[name]["memory_bytes"] == est.memory
        assert set(methods[name]["flops"]) >= {"forward", "backward_input", "backward_weight", "backward", "total"}
        assert set(methods[name]["memory_bytes"]) >= {"weights", "gradients", "optimizer_state", "activations",
                                                      "total"}
        assert all(type(v) is int for v in [*methods[name]["flops"].values(), *methods[name]["memory_bytes"].values()])


def test_options_reach_the_estimate(capsys):
    code, out, err = run(capsys, "--json", "--num-classes", "4", "--rank", "8", "--alpha", "16", "--targets",
                         "fc2,fc1", "--bias", "lora_only", "--batch", "8", "--optimizer", "sgd-momentum", "--dtype",
                         "bfloat16")
    assert code == 0
    doc = json.loads(out)  # the new-head note goes to stderr, so stdout stays JSON
    assert err.strip() == ("new class count (10 -> 4): LoRA on fc1,fc2 and a new, fully trained head fc3 "
                           "(modules_to_save)")
    lora = MethodConfig("lora", rank=8, alpha=16, targets=("fc1", "fc2"), bias="lora_only", num_classes=4,
                        modules_to_save=("fc3",))
    for name, cfg in {"full": MethodConfig("full", num_classes=4), "probe": MethodConfig("probe", num_classes=4),
                      "lora": lora}.items():
        assert doc["methods"][name] == estimate(cfg, 8, "sgd-momentum", "bfloat16").to_dict()
    assert doc["methods"]["lora"]["config"]["targets"] == ["fc1", "fc2"]


def test_tables_and_discussion(capsys):
    code, out, _ = run(capsys)
    assert code == 0
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method  trainable"))
    rows = {line.split()[0]: line.split() for line in lines[header + 1:header + 4]}
    assert rows["full"][1:3] == ["44,426", "100.00%"]
    assert rows["probe"][1:3] == ["850", "1.91%"]
    assert rows["lora"][1:3] == ["1,348", "3.03%"] and rows["lora"][-1] == "45,774"
    # Columns line up: the last column is right-aligned, so every row of each table is as long as its header.
    for start in [i for i, line in enumerate(lines) if line.startswith("method  ")]:
        assert len({len(line) for line in lines[start:start + 4]}) == 1, lines[start:start + 4]
    full_flops = f"{estimate(MethodConfig('full')).flops['total']:,}"
    assert full_flops in out
    for method in ("full:", "probe:", "lora:"):
        assert any(line.startswith(method) for line in lines)
    assert "through fc3 and fc2 to reach fc1" in out  # derived from which layers need input gradients
    assert "2b. Limited compute and memory but reasonable accuracy: LoRA." in out
    assert "edge-ft report" in out
    # ... and the same pair on the cached prefix: the cost model's cached steps, their ratio and LoRA's saving
    probe, lora = (estimate(cfg, cached=True).flops["total"] for cfg in (MethodConfig("probe"), MethodConfig("lora")))
    answer = " ".join(out[out.index("2b."):].split())
    assert f"{probe:,} FLOPs, {lora / probe:.0f}x" in answer and lora / probe > 5
    assert f"{estimate(MethodConfig('lora')).flops['total'] / lora:.0f}x less than uncached" in answer


def test_a_new_class_count_gets_lora_with_a_saved_head(capsys):
    code, out, err = run(capsys, "--num-classes", "3")
    assert code == 0 and "modules_to_save" in err and len(err.strip().splitlines()) == 1
    assert "LoRA: rank 2, alpha 4, targets fc1,fc2, bias none, modules_to_save fc3." in out
    header = next(i for i, line in enumerate(out.splitlines()) if line.startswith("method  trainable"))
    rows = {line.split()[0]: line.split() for line in out.splitlines()[header + 1:header + 4]}
    assert rows["lora"][1] == "1,415" and rows["probe"][1] == "255"  # 1,160 in the adapters + the 3-class head
    assert "fc1 and fc2, and fc3 trained whole (PEFT's modules_to_save)" in out and "Note:" not in out
    code, out, err = run(capsys, "--num-classes", "3", "--targets", "fc1,fc2,fc3")  # explicitly asked: warned
    assert code == 0 and not err and "Note: a 10-class base model gets a fresh 3-class head" in out


def test_a_bundle_is_described_as_exported(capsys, tmp_path):
    pytest.importorskip("torch")
    from tests.ort_training_support import base_path

    bundle = tmp_path / "lora3"
    assert main(["export", "--method", "lora", "--classes", "ant,bee,cat", "--optimizer", "sgd", "--base",
                 str(base_path()), "--out", str(bundle)]) == 0
    trained = sum(int(np.prod(s)) for s in json.loads((bundle / "manifest.json").read_text())["trainable"].values())
    capsys.readouterr()
    code, out, err = run(capsys, "--model", str(bundle), "--json")
    assert code == 0 and not err
    doc = json.loads(out)
    assert doc["model"]["num_classes"] == 3 and doc["settings"]["optimizer"] == "sgd"
    assert doc["methods"]["lora"]["trainable_params"] == trained == 1_415
    assert doc["methods"]["lora"]["config"]["modules_to_save"] == ["fc3"]
    assert doc["methods"]["probe"]["trainable_params"] == 255  # the other methods for the bundle's 3 classes
    code, out, _ = run(capsys, "--model", str(bundle))
    assert code == 0 and "a lora bundle for 3 classes" in out and "batch 32, 3 classes, sgd" in out
    assert [line[:3] for line in out.splitlines() if line[:1] == "1"] == ["1a.", "1b.", "1c."]
    code, _, err = run(capsys, "--model", str(bundle), "--num-classes", "5")
    assert code == 2 and "exported for 3 classes" in err


def test_per_layer_breakdown(capsys):
    code, out, _ = run(capsys, "--per-layer")
    assert code == 0
    rows = estimate(MethodConfig("lora")).layers
    for r in rows:
        assert f"{r.forward:,}" in out and f"{r.backward_input:,}" in out


@pytest.mark.parametrize("argv", [
    ["--batch", "0"], ["--batch", "x"], ["--batch"], ["--rank", "0"], ["--rank", "two"], ["--alpha", "-1"],
    ["--targets", "fc9"], ["--targets", "conv1"], ["--targets", ","], ["--bias", "some"], ["--optimizer", "rmsprop"],
    ["--dtype", "float8"], ["--num-classes", "1"],
])
def test_bad_values_end_with_one_line(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("edge-ft analyze: error:")
    assert "Traceback" not in err


@pytest.mark.skipif(not DEVICE_PYTHON.exists(), reason="device venv not built (make device-venv)")
def test_runs_on_a_device_install_without_torch():
    code = ("import sys; from edge_ft.cli import main; rc = main(['analyze']); "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules; sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(DEVICE_PYTHON), "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "1,348" in proc.stdout


def test_module_imports_no_torch():
    code = "import sys, edge_ft.commands.analyze, edge_ft.costmodel; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0
