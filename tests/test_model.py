"""LeNet-5, the three methods and the torch-free parameter table agree with each other and with the seed."""

import pytest
import torch

from edge_ft.architecture import count_params, param_shapes, trainable_names
from edge_ft.config import MethodConfig
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
    ],
)
def test_table_matches_module(cfg):
    model = build_model(cfg)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == param_shapes(cfg)
    assert list(param_shapes(cfg)) == [n for n, _ in model.named_parameters()]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable_names(cfg)


def test_state_dict_matches_seed_layout():
    keys = list(LeNet5().state_dict())
    assert keys == [f"{l}.{k}" for l in ("conv1", "conv2", "fc1", "fc2", "fc3") for k in ("weight", "bias")]


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
     dict(targets=("conv1",)), dict(bias="some"), dict(num_classes=1)],
)
def test_bad_configs_are_user_errors(kw):
    with pytest.raises(UserError):
        MethodConfig(**kw)
