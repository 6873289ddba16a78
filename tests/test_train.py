"""The PyTorch reference loop: determinism, what each method trains, pretrain/finetune commands and files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_ft.architecture import count_params, trainable_names
from edge_ft.checkpoint import load_base, load_safetensors, sha256_file
from edge_ft.cli import main
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.data.batches import epoch_batches
from edge_ft.data.tasks import Split, source_split, target_split
from edge_ft.host.finetune import finetune
from edge_ft.host.methods import build_model
from edge_ft.host.train import accuracy, pretrain, run_steps, set_determinism, train_epochs
from edge_ft.run_record import read_summary
from edge_ft.training_defaults import DEFAULTS, PRETRAIN, RecipeDefaults

METHODS = [
    MethodConfig("full"),
    MethodConfig("probe"),
    MethodConfig("lora", rank=2),
    MethodConfig("lora", rank=4, alpha=8, targets=("fc2", "fc3"), bias="all"),
]


@pytest.fixture(scope="module")
def digits5():
    """mnist→digits with 5 shots per class: 50 training examples, the real 597-example test set."""
    return target_split("mnist-digits", shots=5)


def _base_tensors(path) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in load_base(path)[0].items()}


def test_run_steps_is_deterministic_and_learns(base_checkpoint, digits5):
    batches = epoch_batches(digits5.x_train, digits5.y_train, 10, seed=0, epoch=0) * 4  # 20 steps
    runs = []
    for _ in range(2):
        set_determinism(0, threads=1)
        model = build_model(MethodConfig("full"), _base_tensors(base_checkpoint))
        runs.append(run_steps(model, batches, OptimizerConfig("adamw", lr=3e-3)))
    assert len(runs[0]) == 20 and runs[0] == runs[1]  # bit-identical losses
    assert np.mean(runs[0][-5:]) < 0.5 * np.mean(runs[0][:5])


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum", "adamw"])
def test_run_steps_matches_torch_optim_semantics(base_checkpoint, digits5, optimizer):
    """run_steps is exactly `loss.backward(); opt.step()` with torch.optim; the loss is the pre-update one."""
    batches = epoch_batches(digits5.x_train, digits5.y_train, 25, seed=1, epoch=0)
    cfg = OptimizerConfig(optimizer, lr=0.01)
    model = build_model(MethodConfig("lora"), _base_tensors(base_checkpoint), seed=0)
    reference = build_model(MethodConfig("lora"), _base_tensors(base_checkpoint), seed=0)
    losses = run_steps(model, batches, cfg)
    params = [p for p in reference.parameters() if p.requires_grad]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.01),
           "sgd-momentum": lambda: torch.optim.SGD(params, lr=0.01, momentum=0.9),
           "adamw": lambda: torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)}[optimizer]()
    expected = []
    for x, y in batches:
        loss = torch.nn.functional.cross_entropy(reference(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        expected.append(loss.item())
    assert losses == expected
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: f"{c.method}-{c.rank}-{c.bias}")
def test_frozen_stay_bit_identical_and_trainable_change(base_checkpoint, digits5, cfg):
    set_determinism(0, threads=1)
    model = build_model(cfg, _base_tensors(base_checkpoint))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_epochs(model, digits5, OptimizerConfig("adamw", lr=DEFAULTS[cfg.method].lr), epochs=2, batch=16, seed=0,
                 quiet=True, eval_each_epoch=False)
    trainable = set(trainable_names(cfg))
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_finetune_returns_only_trained_tensors(base_checkpoint, digits5):
    cfg = MethodConfig("lora", rank=2)
    weights, res = finetune(digits5, load_base(base_checkpoint)[0], cfg, OptimizerConfig(lr=0.02), epochs=2, batch=16,
                            threads=1, quiet=True)
    assert list(weights) == trainable_names(cfg) and res["trainable_params"] == count_params(cfg)["trainable"] == 1348
    model = build_model(MethodConfig("full"), _base_tensors(base_checkpoint))
    assert res["accuracy_before"] == round(accuracy(model, digits5.x_test, digits5.y_test), 6)  # B = 0: zero-shot
    assert [e["epoch"] for e in res["epochs"]] == [1, 2] and res["steps"] == 2 * 4
    assert res["ms_per_step_p50"] > 0 and res["peak_rss_mb"] > 50
    # The one results schema: the block both engines write equals what the reader derives from an older file.
    assert res["summary"] == read_summary({k: v for k, v in res.items() if k != "summary"})
    assert (res["summary"]["engine"], res["summary"]["accuracy"]) == ("torch", res["accuracy_after"])


def test_pretrain_is_deterministic():
    full = source_split()
    small = Split(full.x_train[:300], full.y_train[:300], full.x_test[:200], full.y_test[:200], {})
    recipe = RecipeDefaults("adamw", 2e-3, 1, 32, "cosine", max_shift=2)
    (a, meta), (b, _) = (pretrain(small, recipe, seed=5, threads=1, quiet=True) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert list(a) == list(build_model(MethodConfig("full")).state_dict())
    c, _ = pretrain(small, recipe, seed=6, threads=1, quiet=True)
    assert not np.array_equal(a["fc1.weight"], c["fc1.weight"])
    assert meta["seed"] == 5 and meta["n_train"] == 300 and 0 <= meta["accuracy"] <= 1


def test_pretrain_cli_writes_base_with_provenance(tmp_path):
    out = tmp_path / "base" / "b.safetensors"
    assert main(["pretrain", "--out", str(out), "--epochs", "1", "--threads", "1", "--quiet"]) == 0
    state, meta = load_base(out)
    assert meta["sha256"] == sha256_file(out) and meta["seed"] == 0 and meta["task"] == "mnist"
    assert meta["accuracy"] > 0.6 and meta["n_train"] == 4000 and state["fc3.weight"].shape == (10, 84)


def test_finetune_cli_on_exported_task(base_checkpoint, tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "export", "mnist-digits", "--shots", "4", "--out", str(data)]) == 0
    argv = ["finetune", "--method", "probe", "--task", str(data), "--base", str(base_checkpoint), "--engine", "torch",
            "--epochs", "2", "--batch", "8", "--seed", "3", "--threads", "1", "--out", str(run), "--quiet"]
    assert main(argv) == 0
    assert set(load_safetensors(run / "weights.safetensors")) == {"fc3.weight", "fc3.bias"}
    res = json.loads((run / "results.json").read_text())
    assert res["engine"] == "torch" and res["seed"] == 3 and res["data"]["n_train"] == 40
    assert res["optimizer"]["lr"] == DEFAULTS["probe"].lr and res["base"]["sha256"] == sha256_file(base_checkpoint)
    assert {"accuracy_before", "accuracy_after", "wall_time_s", "ms_per_step_p50", "peak_rss_mb"} <= set(res)
    assert "->" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--method", "lora", "--task", "mnist-digits", "--base", "/nonexistent.safetensors"], "edge-ft pretrain"),
    (["--method", "lora", "--task", "cifar"], "unknown task"),
    (["--method", "lora", "--task", "mnist-digits", "--rank", "0"], "rank"),
    (["--method", "lora", "--task", "mnist-digits", "--epochs", "0"], "--epochs"),
    (["--task", "mnist-digits"], "--method"),
    (["--all", "--lr", "0.1"], "default recipe"),
])
def test_finetune_cli_errors_are_one_line(base_checkpoint, capsys, argv, message):
    if "--base" not in argv:
        argv = argv + ["--base", str(base_checkpoint)]
    try:
        code = main(["finetune", *argv, "--quiet"])
    except SystemExit as e:  # values argparse itself rejects (e.g. --rank 0) exit from the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_only_the_torch_engine_is_offered(base_checkpoint):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--method", "full", "--task", "mnist-digits", "--engine", "ort-training"])
    assert e.value.code == 2


@pytest.mark.slow
def test_accuracy_table_command(base_checkpoint, tmp_path):
    assert main(["finetune", "--all", "--task", "mnist-digits", "--seeds", "1", "--base", str(base_checkpoint),
                 "--threads", "1", "--out", str(tmp_path), "--quiet"]) == 0
    table = json.loads((tmp_path / "table.json").read_text())
    (row,) = table["tasks"]
    assert [m["label"] for m in row["methods"]] == ["full", "probe", "lora-r2", "lora-r4", "lora-r8"]
    assert [m["trainable_params"] for m in row["methods"]][:3] == [44_426, 850, 1_348]
    assert all(m["mean"] > row["zero_shot"] for m in row["methods"])  # fine-tuning helps on new writers
    assert "LoRA r=2" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_default_recipes_reach_the_documented_accuracy(tmp_path):
    """Pretrain >= 0.95 held out; mnist→digits full >= 0.95; LoRA r=2 >= probe (seed 0, the shipped defaults)."""
    state, meta = pretrain(source_split(), PRETRAIN, seed=0, threads=1, quiet=True)
    assert meta["accuracy"] >= 0.95
    split = target_split("mnist-digits")
    acc = {}
    for cfg in (MethodConfig("full"), MethodConfig("probe"), MethodConfig("lora", rank=2)):
        r = DEFAULTS[cfg.method]
        _, result = finetune(split, state, cfg, OptimizerConfig(r.optimizer, lr=r.lr), r.epochs, r.batch,
                             threads=1, quiet=True, schedule=r.schedule, eval_each_epoch=False)
        acc[cfg.method] = result["accuracy_after"]
    assert acc["full"] >= 0.95 and acc["lora"] >= acc["probe"]
