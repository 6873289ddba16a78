"""Differential privacy in the fleet app (edge_ft.fleet.dp): each device clips its update (the delta from the global
model) to the clipping norm, the server refuses one that is longer and adds Gaussian noise of std noise·C/n to the
average, and the round records it."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ft.errors import UserError
from edge_ft.fleet import dp


def test_clipping_acts_on_the_delta():
    rng = np.random.default_rng(0)
    start = {"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)}
    far = {k: v + 3.0 for k, v in start.items()}  # delta norm sqrt(27) * 3 > 1
    clipped = dp.clip_update(far, start, 1.0)
    assert dp.delta_norm(clipped, start) == pytest.approx(1.0, rel=1e-5)
    direction = np.concatenate([(clipped[k] - start[k]).ravel() for k in start])
    assert np.allclose(direction, direction[0], rtol=1e-4)  # scaled, not cut per value: the same direction
    near = {k: v + 0.01 for k, v in start.items()}
    assert all(np.array_equal(dp.clip_update(near, start, 1.0)[k], near[k]) for k in start)
    assert dp.unclipped(clipped, start, 1.0) is None and "exceeds" in dp.unclipped(far, start, 1.0)


def test_dp_settings_are_checked():
    dp.check_dp(0.0, 0.0)
    dp.check_dp(1.0, 0.5)
    for noise, clip in ((1.0, 0.0), (-1.0, 1.0), (0.0, -1.0), (float("nan"), 1.0)):
        with pytest.raises(UserError):
            dp.check_dp(noise, clip)


def _run(base, out, tamper=None, **kw):
    """One LoRA round of 4 devices on the in-process grid; (round record, global tensors, start, replies seen)."""
    from fleet_grid import LocalGrid

    from edge_ft.checkpoint import load_safetensors
    from edge_ft.device.bundle import load_bundle
    from edge_ft.device.engines import open_engine
    from edge_ft.fleet import client_app, records, server_app
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    plan = plan_fleet(out, PlanConfig("lora", task="mnist-digits", num_nodes=4, partitioning="writers", rounds=1,
                                      local_steps=5, batch=16, aggregation="fedavg", seed=0, base=base, threads=1,
                                      **kw))
    grid = LocalGrid(client_app.app, plan.node_configs, plan.run_config, tamper=tamper)
    rounds = server_app.run(grid, server_app.FleetSettings.from_run_config(plan.run_config))
    start = open_engine(load_bundle(plan.run_config["bundle"])).trainable_state()
    replies = {m.metadata.src_node_id: {n: a.numpy() for n, a in m.content["arrays"].items()} for m in grid.replies
               if not m.has_error() and "arrays" in m.content.array_records}  # the fleet's own (not SecAgg+'s)
    return rounds[1], load_safetensors(records.state_file(plan.results_dir, 1)), start, replies


@pytest.mark.slow
def test_devices_clip_and_the_server_adds_calibrated_noise(base_checkpoint, tmp_path):
    _, plain, start, plain_replies = _run(base_checkpoint, tmp_path / "plain")
    clip = 0.5 * min(dp.delta_norm(u, start) for u in plain_replies.values())  # every device's update is cut
    record, clipped, _, replies = _run(base_checkpoint, tmp_path / "clip", dp_clip=clip)
    assert len(replies) == len(record["clients"]) == 4
    for update in replies.values():
        assert dp.delta_norm(update, start) == pytest.approx(clip, rel=1e-4)
    assert dp.delta_norm(clipped, start) <= clip * (1 + 1e-4) < dp.delta_norm(plain, start)
    assert record["dp"] == {"clip": clip, "noise": 0.0, "std": 0.0}
    noisy_record, noisy, _, _ = _run(base_checkpoint, tmp_path / "noise", dp_clip=clip, dp_noise=2.0)
    std = 2.0 * clip / 4  # Flower's compute_stdv: noise multiplier x clipping norm / updates averaged
    assert noisy_record["dp"]["std"] == pytest.approx(std)
    noise = np.concatenate([(noisy[k] - clipped[k]).ravel() for k in clipped])  # the same clipped average below
    assert noise.size > 1000 and 0.85 * std < noise.std() < 1.15 * std and abs(noise.mean()) < 0.15 * std


@pytest.mark.slow
def test_an_unclipped_update_is_refused(base_checkpoint, tmp_path):
    from edge_ft.fleet.updates import to_arrays

    def unclipped(node, reply):
        if node == 101 and not reply.has_error():
            arrays = {n: a.numpy() + 1.0 for n, a in reply.content["arrays"].items()}
            reply.content["arrays"] = to_arrays(arrays)
        return reply

    record, _, _, _ = _run(base_checkpoint, tmp_path / "fleet", tamper=unclipped, dp_clip=0.05)
    assert [x["node"] for x in record["rejected"]] == [101] and "exceeds the clipping norm" in \
        record["rejected"][0]["reason"]
    assert record["drop_reasons"] == {"malformed": 1} and len(record["clients"]) == 3


@pytest.mark.slow
def test_secagg_rounds_clip_too(base_checkpoint, tmp_path):
    """Under SecAgg+ the devices clip the same way (in the ClientApp, not a mod): the clipped average is plain DP's
    within SecAgg+'s quantisation (1e-4, tests/test_fleet_secagg.py), and the server adds its noise to it."""
    _, plain, start, plain_replies = _run(base_checkpoint, tmp_path / "plain")
    clip = 0.5 * min(dp.delta_norm(u, start) for u in plain_replies.values())
    _, clipped, _, _ = _run(base_checkpoint, tmp_path / "clip", dp_clip=clip)
    record, secure, _, _ = _run(base_checkpoint, tmp_path / "secure", dp_clip=clip, secagg=True)
    assert len(record["clients"]) == 4 and record["dp"]["std"] == 0.0 and "secagg" in record
    for name, value in clipped.items():
        np.testing.assert_allclose(secure[name], value, atol=1e-4, rtol=0)
    assert dp.delta_norm(plain, start) > clip * 1.2 > dp.delta_norm(secure, start)
