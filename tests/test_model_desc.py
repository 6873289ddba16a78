"""The model description: traced once by torch.fx, JSON round trip, LeNet-5's shipped copy, and the cost model
and method rules computed from it for networks that are not LeNet-5, checked against what torch really does."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from edge_ft.architecture import count_params, param_shapes, trainable_names
from edge_ft.config import MethodConfig
from edge_ft.costmodel import estimate
from edge_ft.errors import UserError
from edge_ft.host.describe import describe, lenet5_desc, model_class
from edge_ft.host.methods import build_model
from edge_ft.model_desc import ModelDesc, lenet5
from tests.models.small_nets import Gated, TinyConvNet, WideNet

NETS = {"tiny": (TinyConvNet, (1, 28, 28)), "wide": (WideNet, (1, 16, 16))}


def test_lenet5_ships_what_the_tracer_writes():
    assert lenet5() == lenet5_desc()
    assert lenet5().to_dict() == json.loads(lenet5_desc().to_json())
    assert dict(lenet5().parameters) == {k: tuple(v.shape) for k, v in
                                         build_model(MethodConfig("full")).state_dict().items()}


@pytest.mark.parametrize("net", NETS)
def test_json_round_trip(net):
    cls, shape = NETS[net]
    desc = describe(cls(), shape)
    assert ModelDesc.from_dict(json.loads(desc.to_json())) == desc
    assert desc.with_num_classes(3).num_classes == 3 and desc.with_num_classes(3).with_num_classes(10) == desc


def test_unsupported_layer_is_named_in_one_line():
    with pytest.raises(UserError, match=r"^model Gated: sigmoid \(sigmoid\) is a layer kind edge-ft does not "
                                        r"support") as e:
        describe(Gated(), (1, 2, 2))
    assert "\n" not in str(e.value)


def test_model_class_from_a_file_and_a_module(tmp_path):
    assert model_class("tests.models.small_nets:TinyConvNet") is TinyConvNet
    path = tmp_path / "net.py"
    path.write_text("import torch.nn as nn\nclass Net(nn.Module):\n    pass\n")
    assert model_class(f"{path}:Net").__name__ == "Net"
    for bad in ("nocolon", f"{path}:Missing", "no.such.module:Net"):
        with pytest.raises(UserError):
            model_class(bad)


def measure(make, shape, cfg: MethodConfig, batch: int) -> dict:
    """One real training step in torch: parameters, FLOPs (forward, backward) and bytes autograd saves."""
    torch.manual_seed(0)
    model = build_model(cfg, make=make).train()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, cfg.num_classes, (batch,))
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in state:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with flop_counter.FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        forward = counter.get_total_flops()
        loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"forward": forward, "backward": counter.get_total_flops() - forward,
            "saved": sum(saved.values()) - 8 * batch - 4,  # less the labels and nll_loss's weight sum
            "trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in model.parameters()),
            "names": [n for n, p in model.named_parameters() if p.requires_grad],
            "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()}}


CASES = [("full", {}), ("probe", {}), ("lora", {}), ("lora", {"bias": "all"}), ("bias", {}),
         ("last-k", {"last_k": 1}), ("last-k", {"last_k": 2}), ("last-k", {"last_k": 3}), ("probe", {"num_classes": 3}),
         ("bias", {"num_classes": 3, "modules_to_save": "head"})]


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{kw}" for m, kw in CASES])
def test_cost_model_matches_torch(net, method, kw):
    cls, shape = NETS[net]
    desc = describe(cls(), shape)
    kw = dict(kw)
    if kw.get("modules_to_save") == "head":
        kw["modules_to_save"] = (desc.output,)
    cfg = MethodConfig(method, model=desc, **kw)
    est, real = estimate(cfg, batch=5), measure(cls, shape, cfg, batch=5)
    assert (est.params["trainable"], est.params["total"]) == (real["trainable"], real["total"])
    assert trainable_names(cfg) == real["names"] and param_shapes(cfg) == real["shapes"]
    assert est.flops["forward"] == real["forward"]
    # flop_counter prices a grouped conv's weight gradient as if ungrouped (groups x the real MACs)
    overcount = sum((cfg.network.layer(r.layer).attrs.get("groups", 1) - 1) * r.backward_weight for r in est.layers)
    assert est.flops["backward"] + overcount == real["backward"]
    assert est.memory["activations"] == real["saved"], est.saved


def test_method_rules_on_lenet5():
    assert trainable_names(MethodConfig("probe", head="fc2")) == ["fc2.weight", "fc2.bias"]
    assert count_params(MethodConfig("bias"))["trainable"] == 6 + 16 + 120 + 84 + 10
    assert [count_params(MethodConfig("last-k", last_k=k))["trainable"] for k in (1, 2, 3, 5)] == [
        850, 11_014, 41_854, 44_426]
    assert MethodConfig.from_dict(MethodConfig("last-k", last_k=3).to_dict()) == MethodConfig("last-k", last_k=3)
    assert MethodConfig.from_dict(MethodConfig("probe", head="fc2").to_dict()).head == "fc2"
    for bad in (dict(method="probe", head="conv1"), dict(method="last-k", last_k=6),
                dict(method="full", modules_to_save=("fc3",))):
        with pytest.raises(UserError):
            MethodConfig(**bad)
