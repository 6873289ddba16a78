"""LeNet-5, the three methods and the torch-free parameter table agree with each other and with the seed."""

import pytest
import torch

from edge_ft.architecture import count_params, param_shapes, trainable_names
from edge_ft.config import MethodConfig, lora_layers_for
from edge_ft.errors import UserError
from edge_ft.host.lora import LoRALinear
from edge_ft.host.methods import adapter_state, build_model, merge_lora, summary, unmerge_lora
from edge_ft.host.model import LeNet5


def test_seed_numbers():
    assert sum(p.numel() for p in LeNet5().parameters()) == 44_426
    assert count_params(MethodConfig("full"))["trainable"] == 44_426
    assert count_params(MethodConfig("probe"))["trainable"] == 850
    assert count_params(MethodConfig("lora", rank=2))["trainable"] == 1_348
    assert summary(build_model(MethodConfig("lora", rank=2))) == (
        "trainable params: 1,348 || all params: 45,774 || trainable%: 2.9449"
    )


@pytest.mark.parametrize(
    "cfg",
    [
        MethodConfig("full"),
        MethodConfig("probe", num_classes=5),
        MethodConfig("lora", rank=2),
        MethodConfig("lora", rank=8, targets=("fc2",), bias="lora_only"),
        MethodConfig("lora", rank=4, targets=("fc1", "fc3"), bias="all", num_classes=3),
        MethodConfig("lora", rank=2, targets=("fc1", "fc2"), modules_to_save=("fc3",), num_classes=3),
    ],
)
def test_table_matches_module(cfg):
    model = build_model(cfg)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == param_shapes(cfg)
    assert list(param_shapes(cfg)) == [n for n, _ in model.named_parameters()]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable_names(cfg)


def test_state_dict_matches_seed_layout():
    keys = list(LeNet5().state_dict())
    assert keys == [f"{layer}.{k}" for layer in ("conv1", "conv2", "fc1", "fc2", "fc3") for k in ("weight", "bias")]


def test_lora_starts_as_base_and_merges_exactly():
    torch.manual_seed(0)
    base = LeNet5()
    x = torch.randn(4, 1, 28, 28)
    model = build_model(MethodConfig("lora", rank=2), base_state=base.state_dict())
    assert torch.equal(model(x), base(x))  # B = 0: the adapter is a no-op at step 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()
    y = model(x)
    assert not torch.allclose(y, base(x))
    merge_lora(model)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model.fc1.weight, base.fc1.weight, rtol=0, atol=1e-6)
    assert set(adapter_state(model)) == {f"fc{i}.lora_{ab}" for i in (1, 2, 3) for ab in "AB"}


def test_probe_reinitialises_head_and_freezes_the_rest():
    model = build_model(MethodConfig("probe", num_classes=5), base_state=LeNet5().state_dict())
    assert model.fc3.out_features == 5
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc3.weight", "fc3.bias"]


@pytest.mark.parametrize(
    "kw",
    [dict(method="nope"), dict(rank=0), dict(alpha=0), dict(targets=()), dict(targets=("fc9",)),
     dict(targets=("conv1",)), dict(bias="some"), dict(num_classes=1), dict(modules_to_save=("conv2",)),
     dict(modules_to_save=("fc3",)), dict(method="probe", modules_to_save=("fc3",))],
)
def test_bad_configs_are_user_errors(kw):
    with pytest.raises(UserError):
        MethodConfig(**kw)


def test_modules_to_save_round_trips_and_older_records_load():
    cfg = MethodConfig("lora", targets=("fc2", "fc1"), modules_to_save=["fc3"], num_classes=3)
    assert cfg.targets == ("fc1", "fc2") and cfg.modules_to_save == ("fc3",)
    assert cfg.to_dict()["modules_to_save"] == ["fc3"] and MethodConfig.from_dict(cfg.to_dict()) == cfg
    old = {"method": "lora", "num_classes": 10, "rank": 2, "alpha": 4.0, "targets": ["fc1", "fc2", "fc3"],
           "bias": "none"}  # written before modules_to_save existed
    assert MethodConfig.from_dict(old) == MethodConfig("lora") and MethodConfig("lora").to_dict() == old
    with pytest.raises(UserError, match="both a LoRA target and a module to save"):
        MethodConfig("lora", modules_to_save=("fc3",))


@pytest.mark.parametrize("num_classes, targets, saved, expected, noted", [
    (10, None, None, (("fc1", "fc2", "fc3"), ()), False),  # same head: adapters everywhere, as before
    (3, None, None, (("fc1", "fc2"), ("fc3",)), True),  # new head: PEFT's answer, said in one line
    (3, ("fc1",), None, (("fc1",), ("fc3",)), True),
    (3, ("fc1", "fc2"), (), (("fc1", "fc2"), ()), False),  # --modules-to-save none: the head stays frozen
    (3, None, ("fc2", "fc3"), (("fc1",), ("fc2", "fc3")), True),
    (3, ("fc1", "fc3"), None, (("fc1", "fc3"), ()), False),  # explicit fc3 target: refused when the model is built
])
def test_new_class_count_defaults(num_classes, targets, saved, expected, noted):
    *layers, note = lora_layers_for(num_classes, 10, targets, saved)
    assert tuple(layers) == expected and (note is not None) == noted


def test_lora_with_a_new_head_trains_the_head_whole():
    base = LeNet5().state_dict()
    cfg = MethodConfig("lora", targets=("fc1", "fc2"), modules_to_save=("fc3",), num_classes=3)
    model = build_model(cfg, base_state=base)
    assert model.fc3.out_features == 3 and not isinstance(model.fc3, LoRALinear)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "fc1.lora_A", "fc1.lora_B", "fc2.lora_A", "fc2.lora_B", "fc3.weight", "fc3.bias"]
    assert summary(model) == "trainable params: 1,415 || all params: 44,991 || trainable%: 3.1451"
    assert count_params(cfg) == {"total": 44_991, "trainable": 1_415, "frozen": 43_576}
    with pytest.raises(UserError, match="--modules-to-save fc3"):
        build_model(MethodConfig("lora", num_classes=3), base_state=base)
