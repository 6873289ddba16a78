"""A fleet device's round in memory (edge_ft.fleet.local_round) computes what the device trainer computes: the same
trained tensors, losses and accuracy from the same start, on real data with the real ort-step engine, also when its
kept engine has served another round before."""

from __future__ import annotations

import numpy as np
import pytest
from ort_step_support import bundle_path

from edge_ft.checkpoint import load_safetensors
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.contracts import TRAINED
from edge_ft.data.readers import read_mnist_5k
from edge_ft.device.bundle import load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.device.trainer import TrainSettings, train
from edge_ft.fleet import local_round


def _start(bundle, seed: int) -> dict[str, np.ndarray]:
    """The bundle's trainable tensors moved by seeded noise: a global model a server could send."""
    rng = np.random.default_rng(seed)
    return {n: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
            for n, v in open_engine(bundle, threads=1).trainable_state().items()}


@pytest.mark.parametrize("method", ["lora", pytest.param("probe", marks=pytest.mark.slow),
                                    pytest.param("full", marks=pytest.mark.slow)])
def test_round_in_memory_is_the_trainers_run(method, tmp_path):
    bundle = load_bundle(bundle_path(MethodConfig(method, rank=2), OptimizerConfig("adamw", lr=0.01)))
    x, y = read_mnist_5k()
    x, y = x[:37], y[:37]  # 3 batches of 16 an epoch: 7 steps cross two epochs, the last batch short
    s = TrainSettings(batch=16, steps=7, lr=0.01, seed=5, threads=1, quiet=True)
    start = _start(bundle, 1)
    local_round.train_round(bundle, x[:20], y[:20], s, _start(bundle, 2))  # the kept engine has trained before
    done = local_round.train_round(bundle, x, y, s, start)
    results = train(bundle, (x, y), (x, y), s, tmp_path / "run", initial=start)
    trained = load_safetensors(tmp_path / "run" / TRAINED)
    assert done.steps == results["steps"] == 7
    assert set(done.trained) == set(trained)
    for name, value in trained.items():
        np.testing.assert_array_equal(done.trained[name], value)
    np.testing.assert_allclose(done.losses, results["losses"], rtol=0, atol=1e-6)  # the trainer rounds to 7 places
    assert done.accuracy == results["accuracy"]
    assert (bundle.head is not None) == results["settings"]["cache_features"] == (method != "full")
