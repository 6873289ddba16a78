"""The analytical cost model against what torch really does: counted FLOPs, saved tensors, gradients, optimizer state.

FLOPs: torch.utils.flop_counter.FlopCounterMode around a real forward + cross-entropy backward must give exactly
the model's forward and backward totals, and the same per layer. The backward split is checked by a dispatch mode
that sorts every backward matmul / convolution_backward into parameter gradients (a matmul that contracts over the
batch: it sums per-example gradients) and activation gradients (everything else); convolution_backward's two parts
are counted separately from its output_mask.

Activations: autograd's saved_tensors_hooks see every tensor saved for backward; unique storages other than
parameters are counted. Tolerance: exactly the loss's bookkeeping that the model leaves out on purpose (int64
labels, 8 bytes per example, and nll_loss's scalar weight sum, one value of the dtype).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from edge_ft.architecture import LAYER_SPECS, layer_dims, layer_io_shapes
from edge_ft.config import LINEAR_LAYERS, MethodConfig, OptimizerConfig
from edge_ft.costmodel import estimate, layer_flops
from edge_ft.errors import UserError
from edge_ft.host.methods import build_model, count_trainable

aten = torch.ops.aten
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class GradientKindCounter(TorchDispatchMode):
    """Sorts backward FLOPs (flop_counter's formulas) into parameter gradients and activation gradients."""

    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch
        self.input = 0
        self.weight = 0
        self.unsorted: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet is aten.mm:
            (m, k), (_, n) = args[0].shape, args[1].shape
            if k == self.batch:  # dW = dy^T x sums over examples; dx = dy W does not
                self.weight += 2 * m * k * n
            else:
                self.input += 2 * m * k * n
        elif packet is aten.convolution_backward:
            count = flop_counter.flop_registry[packet]
            input_mask, weight_mask, _ = args[-1]
            self.input += count(*args[:-1], [input_mask, False, False], out_val=out)
            self.weight += count(*args[:-1], [False, weight_mask, False], out_val=out)
        elif packet in flop_counter.flop_registry:
            self.unsorted.append(str(func))
        return out


def measure(cfg: MethodConfig, batch: int, dtype: str = "float32", optimizer: str = "adamw") -> dict:
    """One real training step of the method: FLOPs, split, per-layer FLOPs, saved bytes, grads, optimizer state."""
    torch_dtype = TORCH_DTYPES[dtype]
    model = build_model(cfg, seed=0).to(torch_dtype)
    x = torch.randn(batch, 1, 28, 28, dtype=torch_dtype)
    y = torch.randint(0, cfg.num_classes, (batch,))
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, torch.dtype, int]] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = (storage.nbytes(), t.dtype, t.dim())
        return t

    with flop_counter.FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        forward = counter.get_total_flops()
        per_module_forward = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        with GradientKindCounter(batch) as kinds:
            loss.backward()
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_cfg = OptimizerConfig(optimizer)
    opt = {
        "sgd": lambda: torch.optim.SGD(trainable, lr=0.1),
        "sgd-momentum": lambda: torch.optim.SGD(trainable, lr=0.1, momentum=opt_cfg.momentum),
        "adamw": lambda: torch.optim.AdamW(trainable, lr=1e-3),
    }[optimizer]()
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                      if torch.is_tensor(t) and k != "step")  # AdamW's step counters: left out by the model too
    labels_and_weight_sum = [b for b, dt, dim in saved.values() if dt == torch.int64 or dim == 0]
    trainable_count, total_count = count_trainable(model)
    return {
        "forward": forward,
        "backward": counter.get_total_flops() - forward,
        "backward_input": kinds.input,
        "backward_weight": kinds.weight,
        "unsorted": kinds.unsorted,
        "layers": {layer: (per_module_forward.get(f"LeNet5.{layer}", 0),
                           per_module.get(f"LeNet5.{layer}", 0) - per_module_forward.get(f"LeNet5.{layer}", 0))
                   for layer in LAYER_SPECS},
        "saved_bytes": sum(b for b, _, _ in saved.values()),
        "saved_activation_sizes": sorted(b for b, dt, dim in saved.values() if dt != torch.int64 and dim > 0),
        "bookkeeping_bytes": sum(labels_and_weight_sum),
        "gradient_bytes": sum(p.grad.numel() * p.grad.element_size() for p in trainable),
        "optimizer_state_bytes": state_bytes,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "trainable": trainable_count,
        "total": total_count,
    }


def matmul_widths(cfg: MethodConfig) -> set[int]:
    """Widths a backward matmul may contract over besides the batch (convs are sorted by output_mask instead)."""
    return {cfg.rank} | {d for layer in LINEAR_LAYERS for d in layer_dims(layer, cfg.num_classes)}


def check_against_torch(cfg: MethodConfig, batch: int, dtype: str = "float32", optimizer: str = "adamw"):
    assert batch not in matmul_widths(cfg), "the batch must differ from every feature width to tell dW from dx"
    est = estimate(cfg, batch, optimizer, dtype)
    real = measure(cfg, batch, dtype, optimizer)
    flops = est.flops

    assert (est.params["trainable"], est.params["total"]) == (real["trainable"], real["total"])
    assert est.params["frozen"] == real["total"] - real["trainable"]
    assert flops["forward"] == real["forward"]
    assert flops["backward"] == real["backward"]
    assert real["unsorted"] == []
    assert (flops["backward_input"], flops["backward_weight"]) == (real["backward_input"], real["backward_weight"])
    assert {r.layer: (r.forward, r.backward_input + r.backward_weight) for r in est.layers} == real["layers"]

    itemsize = torch.finfo(TORCH_DTYPES[dtype]).bits // 8
    assert real["bookkeeping_bytes"] == 8 * batch + itemsize  # labels + nll_loss's total_weight, see docstring
    assert real["saved_bytes"] == est.memory["activations"] + 8 * batch + itemsize
    assert real["saved_activation_sizes"] == sorted(est.saved.values())  # tensor by tensor, not just the sum
    assert est.memory["weights"] == real["weight_bytes"]
    assert est.memory["gradients"] == real["gradient_bytes"]
    assert est.memory["optimizer_state"] == real["optimizer_state_bytes"]
    assert est.memory["total"] == sum(est.memory[k] for k in ("weights", "gradients", "optimizer_state",
                                                              "activations"))


def test_seed_numbers():
    full, probe = estimate(MethodConfig("full")), estimate(MethodConfig("probe"))
    lora = estimate(MethodConfig("lora", rank=2, targets=("fc1", "fc2", "fc3")))
    assert full.params == {"total": 44_426, "trainable": 44_426, "frozen": 0}
    assert probe.params == {"total": 44_426, "trainable": 850, "frozen": 43_576}
    assert lora.params == {"total": 45_774, "trainable": 1_348, "frozen": 44_426}
    for est in (full, probe, lora):
        real = measure(est.config, 32)
        assert (est.params["trainable"], est.params["total"]) == (real["trainable"], real["total"])


def test_layer_shapes_match_the_module():
    model = build_model(MethodConfig("full", num_classes=7))
    seen = {}
    for name in LAYER_SPECS:
        getattr(model, name).register_forward_hook(
            lambda mod, inp, out, name=name: seen.__setitem__(name, (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))))
    model(torch.zeros(2, 1, 28, 28))
    assert seen == layer_io_shapes(7)


CASES = [
    # (config, batch, optimizer, dtype)
    (MethodConfig("full"), 32, "adamw", "float32"),
    (MethodConfig("full", num_classes=5), 7, "sgd", "float32"),
    (MethodConfig("full"), 13, "sgd-momentum", "bfloat16"),
    (MethodConfig("probe"), 1, "adamw", "float32"),
    (MethodConfig("probe", num_classes=2), 32, "sgd-momentum", "float32"),
    (MethodConfig("lora", rank=2), 32, "adamw", "float32"),
    (MethodConfig("lora", rank=2), 1, "sgd", "float32"),
    (MethodConfig("lora", rank=1, bias="all"), 7, "adamw", "float32"),
    (MethodConfig("lora", rank=8, targets=("fc2",), bias="lora_only"), 13, "sgd-momentum", "float32"),
    (MethodConfig("lora", rank=4, targets=("fc1", "fc3"), bias="all", num_classes=3), 7, "adamw", "float32"),
    (MethodConfig("lora", rank=2, targets=("fc3",)), 32, "adamw", "bfloat16"),
    (MethodConfig("lora", rank=3, targets=("fc1",), bias="lora_only", num_classes=2), 5, "sgd", "float32"),
    (MethodConfig("lora", rank=2, targets=("fc1", "fc2"), modules_to_save=("fc3",), num_classes=3), 32, "adamw",
     "float32"),  # a new class count's default: adapters below a head that trains whole
    (MethodConfig("lora", rank=2, targets=("fc3",), modules_to_save=("fc1",), bias="all"), 7, "sgd", "float32"),
]


@pytest.mark.parametrize("cfg,batch,optimizer,dtype", CASES,
                         ids=[f"{c.method}-{c.to_dict()}-b{b}-{o}-{d}" for c, b, o, d in CASES])
def test_matches_torch(cfg, batch, optimizer, dtype):
    check_against_torch(cfg, batch, dtype, optimizer)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["full", "probe", "lora"]),
    rank=st.integers(1, 16),
    targets=st.sets(st.sampled_from(LINEAR_LAYERS), min_size=1),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    num_classes=st.integers(2, 12),
    batch=st.integers(1, 70),
    saved=st.sets(st.sampled_from(LINEAR_LAYERS)),
)
def test_matches_torch_for_any_setting(method, rank, targets, bias, num_classes, batch, saved):
    saved = tuple(saved - targets) if method == "lora" else ()
    cfg = MethodConfig(method, rank=rank, targets=tuple(targets), bias=bias, num_classes=num_classes,
                       modules_to_save=saved)
    assume(batch not in matmul_widths(cfg))
    check_against_torch(cfg, batch)


def test_default_split_by_hand():
    """The seed's LoRA: backward reaches fc1 through the frozen fc3 and fc2; the convs cost nothing in backward."""
    rows = {r.layer: r for r in layer_flops(MethodConfig("lora", rank=2), batch=1)}
    assert rows["conv1"] == ("conv1", 2 * 6 * 24 * 24 * 25, 0, 0)
    assert rows["conv2"] == ("conv2", 2 * 16 * 8 * 8 * 6 * 25, 0, 0)
    assert rows["fc1"] == ("fc1", 2 * (256 * 120 + 256 * 2 + 2 * 120), 2 * 120 * 2, 2 * (256 * 2 + 2 * 120))
    assert rows["fc3"].backward_input == 2 * (84 * 10 + 10 * 2 + 2 * 84)


@pytest.mark.parametrize("kw", [dict(batch=0), dict(batch=2.5), dict(batch=True), dict(batch="32"),
                                dict(dtype="float8"), dict(optimizer="rmsprop")])
def test_bad_arguments_are_user_errors(kw):
    with pytest.raises(UserError):
        estimate(MethodConfig("full"), **kw)


def test_a_cached_step_counts_the_layers_after_the_prefix():
    """estimate(cached=True): the prefix's layers count nothing; LoRA's first target keeps its adapter path alone
    (its frozen product comes cached); the head graphs' counted FLOPs hold it (test_step_graph_costs, slow)."""
    from edge_ft.bench.measure import step_flops

    def layers(cfg):
        return {r.layer: r for r in estimate(cfg, 32, "adamw", cached=True).layers}

    probe = layers(MethodConfig("probe"))
    assert list(probe) == ["fc3"] and sum(r.forward + r.backward_weight for r in probe.values()) == 107_520
    assert step_flops(MethodConfig("probe"), "probe-cached", 32)["total"] == 107_520  # the figure records carried
    lora = layers(MethodConfig("lora", rank=2))
    fc1 = estimate(MethodConfig("lora", rank=2), 32).layers[2]
    assert list(lora) == ["fc1", "fc2", "fc3"] and lora["fc1"].forward == fc1.forward - 2 * 32 * 256 * 120
    assert lora["fc2"] == estimate(MethodConfig("lora", rank=2), 32).layers[3]
    assert list(layers(MethodConfig("last-k", last_k=2))) == ["fc2", "fc3"]
    full = MethodConfig("full")
    assert estimate(full, 32, cached=True).flops == estimate(full, 32).flops  # no prefix: the first layer trains
