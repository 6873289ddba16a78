"""The cached frozen prefix on every described model: LeNet-5 (its shipped description), TinyConvNet (a user's own
model, tests/models) and MLPerf Tiny's reference models, under every method that has a prefix (probe, LoRA, LoRA
with a saved head, last-k).

A cached step is features.onnx on the batch, then the head bundle's step graph on those features. It must be the
uncached step's arithmetic: held to torch.optim from the engine's weights before every step (tests/lockstep.py)
with exactly the tolerances the uncached engine is held to for that model (test_ort_step for LeNet-5 and
TinyConvNet, test_reference_bundles for the reference models), so both runs are the reference step within the
same float32 rounding bound and differences cannot compound. The uncached engine runs the same batches beside it.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from lockstep import run_lockstep
from safetensors.numpy import save_file
from test_reference_bundles import MODELS as REFERENCE_MODELS
from test_reference_bundles import OPT as REFERENCE_OPT
from test_reference_bundles import base as reference_base
from test_reference_bundles import bundle as reference_bundle
from test_reference_bundles import host as reference_host
from test_step_graph_models import seeded

from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.device.bundle import Bundle, load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.device.inference import session_runner
from edge_ft.device.ort_api import inference_session
from edge_ft.host.describe import host_model
from edge_ft.host.export import export_bundle
from edge_ft.host.export.common import prepare_model

ROOT = Path(tempfile.mkdtemp(prefix="edge-ft-prefix-models-"))
OPT = OptimizerConfig("sgd", lr=0.05)  # no optimizer state: each lockstep step stands alone
assert OPT == REFERENCE_OPT
BATCH, STEPS, SEED = 4, 3, 0
TINY = (f"{Path(__file__).parent / 'models' / 'small_nets.py'}:TinyConvNet", (1, 28, 28))
# model -> (spec, input shape, {method: MethodConfig options}); LoRA targets the model's linear layers.
MODELS = {
    "lenet5": (None, (1, 28, 28), {"probe": {}, "lora": {"targets": ("fc1", "fc2", "fc3")},
                                   "lora-save": {"targets": ("fc1", "fc2"), "modules_to_save": ("fc3",)},
                                   "last-k": {"last_k": 2}}),
    "tiny": (*TINY, {"probe": {}, "lora": {"targets": ("hidden", "classifier")},
                     "lora-save": {"targets": ("hidden",), "modules_to_save": ("classifier",)},
                     "last-k": {"last_k": 2}}),
    **{name: (spec, shape, {"probe": {}, "lora": {"targets": ("classifier",)}, "last-k": {"last_k": 2}})
       for name, (spec, shape) in REFERENCE_MODELS.items()},
}
# The tolerances the uncached engine meets on that model: losses (forward rounding from the same weights, relative)
# and the update's excess over the lockstep rounding bound (relative to the largest single-step change).
TOLERANCE = {"lenet5": (2e-6, 1e-5), "tiny": (2e-6, 1e-5), **{m: (1e-5, 5e-5) for m in REFERENCE_MODELS}}
CASES = [(model, method) for model, (_, _, methods) in MODELS.items() for method in methods]


@cache
def host(model: str):
    return reference_host(model) if model in REFERENCE_MODELS else host_model(*MODELS[model][:2])


@cache
def base(model: str) -> tuple[Path, dict[str, np.ndarray]]:
    if model in REFERENCE_MODELS:
        return reference_base(model)
    torch.manual_seed(0)
    state = {k: v.numpy().copy() for k, v in seeded(host(model).make()).state_dict().items()}
    path = ROOT / f"{model}-base.safetensors"
    save_file(state, str(path))
    return path, state


def method_config(model: str, method: str) -> MethodConfig:
    desc = host(model).desc
    return MethodConfig(method.removesuffix("-save"), num_classes=desc.num_classes, model=desc,
                        **MODELS[model][2][method])


@cache
def bundle(model: str, method: str) -> Path:
    if model in REFERENCE_MODELS:  # the same export test_reference_bundles makes (and caches for the session)
        return reference_bundle(model, method, "ort-step")
    out = ROOT / f"{model}-{method}"
    export_bundle(method_config(model, method), OPT, base(model)[0], out, engine="ort-step", seed=SEED,
                  host=host(model))
    return out


class CachedEngine:
    """What `edge-ft train` does with the cache on, one step at a time: features.onnx, then the head's step."""

    def __init__(self, b: Bundle):
        self.features = session_runner(inference_session(b.file(b.manifest["features"]["file"]), threads=1))
        self.head = open_engine(b.head, threads=1)
        held = self.head.parameters()
        self.prefix = {n: v for n, v in open_engine(b, threads=1).parameters().items() if n not in held}

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float):
        return self.head.train_step(self.features(x), y, lr)

    def parameters(self) -> dict[str, np.ndarray]:
        return {**self.prefix, **self.head.parameters()}


def batches(model: str) -> list[tuple[np.ndarray, np.ndarray]]:
    shape, classes = MODELS[model][1], host(model).desc.num_classes
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((BATCH, *shape), dtype=np.float32), rng.integers(0, classes, BATCH))
            for _ in range(STEPS)]


def lockstep(model: str, method: str, engine):
    cfg = method_config(model, method)
    reference = prepare_model(cfg, base(model)[1], SEED, mean_pools=False, host=host(model)).eval()
    optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=OPT.lr)
    return run_lockstep(engine, reference, optimizer, batches(model), lambda step: OPT.lr)


@pytest.mark.slow
@pytest.mark.parametrize("model, method", CASES)
def test_cached_step_is_the_uncached_step_on_every_model(model, method):
    b = load_bundle(bundle(model, method))
    assert b.head is not None and set(b.head.trainable) == set(b.trainable), "no frozen prefix was cut"
    loss_rtol, update_rtol = TOLERANCE[model]
    cached, plain = lockstep(model, method, CachedEngine(b)), lockstep(model, method, open_engine(b, threads=1))
    for gaps in (cached, plain):
        np.testing.assert_allclose(gaps.losses, gaps.reference, rtol=loss_rtol)
        gaps.check(update_rtol)
    # Step 0 starts both from the bundle's weights: one torch loss, each engine within loss_rtol of it.
    assert cached.reference[0] == plain.reference[0]
    assert abs(cached.losses[0] - plain.losses[0]) <= 2 * loss_rtol * abs(plain.reference[0])
