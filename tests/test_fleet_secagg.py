"""SecAgg+ in the fleet app (edge_ft.fleet.secagg): the server's aggregate equals plain FedAvg's up to SecAgg+'s
quantisation, also when a device drops after sharing its keys, and the round records what it cost."""

from __future__ import annotations

import numpy as np
import pytest

QUANTISATION = 1e-4  # SecAgg+ quantises each weighted value to 16 / 2^22 (Flower's defaults): ~4e-6 per device


@pytest.fixture(scope="module")
def plans(base_checkpoint, tmp_path_factory):
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    def plan(secure: bool):
        return plan_fleet(tmp_path_factory.mktemp("secagg" if secure else "plain"), PlanConfig(
            "lora", task="mnist-digits", num_nodes=4, partitioning="writers", rounds=1, local_steps=3, batch=16,
            aggregation="fedavg", seed=0, base=base_checkpoint, threads=1, secagg=secure))

    return plan(False), plan(True)


def _run(plan, drop: int | None):
    """One round on the in-process grid; `drop`: the node whose update never arrives (under SecAgg+: it dropped
    after sharing its keys, in the masked-vector stage). Returns (the round's record, the global tensors after it)."""
    from edge_ft.checkpoint import load_safetensors
    from edge_ft.fleet import client_app, records, server_app
    from fleet_grid import LocalGrid

    def tamper(node, reply):
        if reply.has_error():
            return reply
        carries_update = "arrays" in reply.content.array_records or "fitres.parameters" in reply.content.array_records
        return None if node == drop and carries_update else reply

    grid = LocalGrid(client_app.app, plan.node_configs, plan.run_config, tamper=tamper)
    rounds = server_app.run(grid, server_app.FleetSettings.from_run_config(plan.run_config))
    return rounds[1], load_safetensors(records.state_file(plan.results_dir, 1))


@pytest.mark.slow
@pytest.mark.parametrize("drop", [None, 103])
def test_secagg_aggregates_what_fedavg_would(plans, drop):
    from edge_ft.device.bundle import load_bundle
    from edge_ft.device.engines import open_engine

    plain_plan, secure_plan = plans
    plain, plain_global = _run(plain_plan, drop)
    secure, secure_global = _run(secure_plan, drop)
    start = open_engine(load_bundle(plain_plan.run_config["bundle"])).trainable_state()
    assert set(secure_global) == set(plain_global)
    for name, value in plain_global.items():
        assert np.abs(value - start[name]).max() > 100 * QUANTISATION  # the round moved the model
        np.testing.assert_allclose(secure_global[name], value, atol=QUANTISATION, rtol=0)
    kept = {100, 101, 102, 103} - {drop}
    assert {c["node"] for c in plain["clients"]} == kept == {c["node"] for c in secure["clients"]}
    assert secure["secagg"]["messages"] > 0 and secure["secagg"]["seconds"] >= 0
    assert secure["bytes_down"] > plain["bytes_down"] and secure["bytes_up"] > 0  # keys, shares, masked vectors
    assert secure["lora_product_gap"] is None and "secagg" not in plain
