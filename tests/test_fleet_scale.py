"""The scale table: a fixed, seeded number of devices sampled per round, cells summarised from real round records, and
the results file's schema (edge_ft.fleet.scale_record) — in process for speed, and once through the command under
Flower's Simulation Engine."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from edge_ft.errors import UserError
from edge_ft.fleet.devices import DEFAULT_MIX
from edge_ft.fleet.scale import ScaleConfig, fleet_fits, summarise
from edge_ft.fleet.scale_record import SCALE_FORMAT, ScaleCell, ScaleResults, load_scale, save_scale

MIX = "50%rpi-zero-2w,50%rpi-5-4gb"


def _run_in_process(out: Path, base: Path, clients: int, availability: str):
    from fleet_grid import LocalGrid

    from edge_ft.fleet import client_app, server_app
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    plan = plan_fleet(out, PlanConfig(
        "probe", task="mnist-digits", num_nodes=12, partitioning="writers", rounds=3, local_steps=3, batch=16,
        seed=0, base=base, threads=1, min_train_nodes=1, min_available_nodes=1, simulation=True,
        round_timeout=3600.0, fleet_mix=MIX, availability=availability, clients_per_round=clients,
        bundle_cache=out.parent / "bundles"))
    grid = LocalGrid(client_app.app, [{"partition-id": i, "num-partitions": 12} for i in range(12)], plan.run_config)
    rounds = server_app.run(grid, server_app.FleetSettings.from_run_config(plan.run_config))
    return plan, grid, rounds


def test_fixed_seeded_sampling_and_cells_from_real_rounds(base_checkpoint, tmp_path):
    """clients-per-round samples that many online devices (all of them when fewer are online), the same ones for the
    same seed; a cell summarises the run's own records and survives the results file's round trip."""
    plan, grid, rounds = _run_in_process(tmp_path / "a", base_checkpoint, 4, "random:0.5")
    _, again, _ = _run_in_process(tmp_path / "b", base_checkpoint, 4, "random:0.5")
    assert (tmp_path / "b" / "bundle" / "manifest.json").read_bytes() == \
        (tmp_path / "a" / "bundle" / "manifest.json").read_bytes()  # installed from the cache, not exported again
    for r in rounds[1:]:
        assert r["sampled"] == min(4, r["online"]) == len(r["clients"]) and r["did_not_fit"] == []
    sent = [(m.metadata.dst_node_id, m.content["config"]["server-round"]) for m in grid.sent]
    assert sent == [(m.metadata.dst_node_id, m.content["config"]["server-round"]) for m in again.sent]
    assert {s for _, s in sent} == {1, 2, 3}

    target = sorted(r["accuracy"] for r in rounds[1:])[1]  # reached, but not necessarily in round 1
    cell = summarise(12, "probe", "writers", rounds, target, 1.0, 1.5,
                     {"wall_seconds": 3.0, "peak_memory_mb": 120.0, "peak_memory_mb_per_device": 10.0})
    reached = next(r["round"] for r in rounds[1:] if r["accuracy"] >= target)
    assert cell.rounds_to_target == reached and cell.rounds_run == 3
    assert cell.bytes == sum(r["bytes_down"] + r["bytes_up"] for r in rounds[: reached + 1]) > 0
    assert cell.accuracy == [r["accuracy"] for r in rounds] and cell.sim_seconds_cumulative[0] == 0
    assert cell.sim_seconds == cell.sim_seconds_cumulative[reached] > 0
    assert cell.sampled == cell.returned == sum(r["sampled"] for r in rounds[1:])
    never = summarise(12, "probe", "writers", rounds, 1.01, 1.0, 1.5,
                      {"wall_seconds": 3.0, "peak_memory_mb": 120.0, "peak_memory_mb_per_device": 10.0})
    assert never.rounds_to_target is None and never.sim_seconds == never.sim_seconds_cumulative[-1]
    assert never.bytes == sum(r["bytes_down"] + r["bytes_up"] for r in rounds)

    results = ScaleResults(SCALE_FORMAT, "2026-12-06T00:00:00+00:00", {"cpus": 2}, {"flwr": "1.42.0"}, "test",
                           ScaleConfig().settings, [cell, never])
    save_scale(tmp_path / "scale.json", results)
    assert load_scale(tmp_path / "scale.json") == results


def test_results_schema_is_enforced(tmp_path):
    good = asdict(ScaleResults(SCALE_FORMAT, "d", {}, {}, "c", ScaleConfig().settings, []))
    cell = {f: 0 for f in ScaleCell.__dataclass_fields__} | {
        "method": "lora", "partitioning": "writers", "accuracy": [0.5], "sim_seconds_cumulative": [0.0],
        "rounds_to_target": None}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**good, "cells": [cell]}))
    assert load_scale(path).cells[0].rounds_to_target is None
    no_bytes = {k: v for k, v in cell.items() if k != "bytes"}
    for broken in ({**cell, "devices": "10"}, {**cell, "accuracy": 0.5}, no_bytes, {**cell, "extra": 1}):
        path.write_text(json.dumps({**good, "cells": [broken]}))
        with pytest.raises(UserError, match=str(path)):
            load_scale(path)
    path.write_text(json.dumps({**good, "format": "other"}))
    with pytest.raises(UserError, match="format"):
        load_scale(path)


def test_fleet_share_that_fits_follows_the_boards(tmp_path, monkeypatch):
    (tmp_path / "tiny-board.toml").write_text((Path(__file__).parent / "test_fleet_sim.py").read_text()
                                              .split('TINY = """', 1)[1].split('"""', 1)[0])
    monkeypatch.setenv("EDGE_FT_PROFILES", str(tmp_path))
    s = replace(ScaleConfig().settings, fleet_mix="70%rpi-zero-2w,30%tiny-board")
    assert fleet_fits(s, "lora", 100, 10) == 0.7  # the tiny board has no room for the client stack
    assert fleet_fits(replace(s, fleet_mix=DEFAULT_MIX), "full", 100, 10) == 1.0


@pytest.mark.slow
def test_scale_command_writes_the_documented_file(base_checkpoint, tmp_path):
    """`edge-ft fleet scale` under the Simulation Engine: every cell in the file with the schema, a second run of the
    same settings adds nothing, other settings in the same folder are refused."""
    from edge_ft.cli import main

    args = ["fleet", "scale", "--devices", "6", "--methods", "probe", "--partitionings", "writers,dirichlet:1",
            "--rounds", "2", "--clients-per-round", "3", "--local-steps", "2", "--availability", "always",
            "--base", str(base_checkpoint), "--out", str(tmp_path / "scale")]
    assert main(args) == 0
    results = load_scale(tmp_path / "scale" / "fleet-scale.json")
    assert [(c.devices, c.method, c.partitioning) for c in results.cells] == [(6, "probe", "writers"),
                                                                              (6, "probe", "dirichlet:1")]
    for c in results.cells:
        assert c.rounds_run == 2 and c.sampled == 6 and len(c.accuracy) == 3 and c.wall_seconds > 0
        assert c.peak_memory_mb_per_device == pytest.approx(c.peak_memory_mb / 6, abs=0.01)  # both rounded
    assert results.versions["ray"] and results.machine["cpus"] and results.settings.clients_per_round == 3
    assert main(args) == 0 and load_scale(tmp_path / "scale" / "fleet-scale.json").cells == results.cells
    assert main([*args[:-2], "--target", "0.5", "--out", str(tmp_path / "scale")]) != 0
