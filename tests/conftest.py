"""Session-wide fixtures shared by the test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """Path of a small LeNet-5 base (.safetensors + .json) pretrained once per session on the MNIST 5k subset.

    Two epochs on 2000 examples, one thread: a few seconds, ~0.85 held-out, good enough to fine-tune from.
    """
    from edge_ft.checkpoint import save_base
    from edge_ft.data.tasks import Split, source_split
    from edge_ft.host.train import pretrain
    from edge_ft.training_defaults import PRETRAIN, RecipeDefaults

    full = source_split()
    split = Split(full.x_train[:2000], full.y_train[:2000], full.x_test, full.y_test, dict(full.info, n_train=2000))
    recipe = RecipeDefaults(PRETRAIN.optimizer, PRETRAIN.lr, 2, PRETRAIN.batch, PRETRAIN.schedule)
    state, meta = pretrain(split, recipe, seed=0, threads=1, quiet=True)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_base(path, state, meta)
    return path


@pytest.fixture(scope="session", autouse=True)
def reference_host_speed(tmp_path_factory):
    """Tests read and write a host-speed cache of their own, never the user's. It says this machine is the
    reference core with no throttling correction, so a test profile's cpu_speed is its CPU share here and no
    test waits for a calibration; tests of the calibration itself point EDGE_FT_CACHE_DIR elsewhere."""
    from edge_ft.atomic import atomic_write_json
    from edge_ft.emulation import hostspeed

    folder = tmp_path_factory.mktemp("cache")
    entry = {"speed": 1.0, "measured": "reference for tests", "correct_quota": False}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(hostspeed.CACHE_ENV, str(folder))
        atomic_write_json(hostspeed.cache_path(), {"machines": {hostspeed._key_text(hostspeed.machine_key()): entry}})
        yield folder


# Areas a contributor can run alone (`pytest -m fleet`), besides `slow`: by test module, registered in pyproject.toml.
AREA_MARKERS = {
    "fleet": ("test_fleet", "test_fleet_deploy", "test_fleet_lean", "test_fleet_trust", "test_fleet_secagg",
              "test_fleet_sim", "test_fleet_dp", "test_fleet_faults"),
    "cgroup": ("test_cgroup_v2", "test_cgroup_v2_harness", "test_cancel", "test_emulate", "test_hostspeed"),
    "arm": ("test_arm_harness", "test_pi_path"),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for marker, modules in AREA_MARKERS.items():
            if item.module.__name__ in modules:
                item.add_marker(marker)
