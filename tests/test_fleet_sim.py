"""The simulated fleet: the device model (boards, availability, memory, simulated time, deadline), skewed partitions,
and edge-ft's own ServerApp and ClientApp run for many virtual devices (in process, and under Flower's Simulation
Engine)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge_ft.fleet.devices import DEFAULT_MIX, DeviceModel, board_cost, deal_boards, online, parse_mix

TINY = """description = "a board too small for the fleet's client stack"
arch = "aarch64"
cpu = "1x test core"
cores = 1
ram_mb = 256
budget_mb = 200
threads = 1
cpu_speed = 0.05
cpu_speed_source = "estimate for tests"
"""


def test_boards_are_dealt_by_share():
    boards = deal_boards(DEFAULT_MIX, 1000, seed=0)
    assert Counter(boards) == {"rpi-zero-2w": 600, "rpi-4b-2gb": 300, "rpi-5-4gb": 100}
    assert boards == deal_boards(DEFAULT_MIX, 1000, seed=0) and boards != deal_boards(DEFAULT_MIX, 1000, seed=1)
    assert Counter(deal_boards("50%rpi-zero-2w,50%rpi-5-4gb", 7, 0)) in ({"rpi-zero-2w": 4, "rpi-5-4gb": 3},
                                                                        {"rpi-zero-2w": 3, "rpi-5-4gb": 4})
    from edge_ft.errors import UserError

    for bad in ("60%rpi-zero-2w", "50%rpi-zero-2w,50%no-such-board", "x%rpi-zero-2w"):
        with pytest.raises(UserError):
            parse_mix(bad)


def test_availability_traces():
    assert online("always", 50, 3, 0).all()
    shares = [online("random:0.5", 1000, r, 0).mean() for r in range(10)]
    assert all(0.4 < s < 0.6 for s in shares) and len(set(shares)) > 1  # a fresh draw each round
    assert (online("random:0.5", 1000, 4, 0) == online("random:0.5", 1000, 4, 0)).all()  # seeded
    day = [online("diurnal:0.1-0.9", 2000, r, 0).mean() for r in range(24)]
    assert 0.35 < np.mean(day) < 0.65  # time zones spread the fleet: about the mean probability overall
    # each device follows its own day: over 24 rounds a device is online more in its night than its afternoon
    zones = np.random.default_rng([0, 13]).random(2000) * 24.0
    hours = (zones[:, None] + np.arange(24)[None, :]) % 24
    up = np.stack([online("diurnal:0.1-0.9", 2000, r, 0) for r in range(24)], axis=1)
    night, afternoon = up[(hours >= 0) & (hours < 4)].mean(), up[(hours >= 12) & (hours < 16)].mean()
    assert night > 0.75 and afternoon < 0.25


def test_board_costs_follow_speed_and_memory():
    zero, pi4, pi5 = (board_cost(b, "lora", 32, 2, 10, False) for b in ("rpi-zero-2w", "rpi-4b-2gb", "rpi-5-4gb"))
    assert zero.step_seconds > pi4.step_seconds > pi5.step_seconds > 0
    assert zero.fits and pi4.fits and pi5.fits  # LoRA at batch 32 fits every board
    assert board_cost("rpi-zero-2w", "full", 32, 2, 10, False).step_seconds > zero.step_seconds
    big_zero, big_pi4 = (board_cost(b, "full", 4096, 2, 10, False) for b in ("rpi-zero-2w", "rpi-4b-2gb"))
    assert big_zero.memory_mb > big_zero.budget_mb and not big_zero.fits  # activations of 4096 examples
    assert big_pi4.fits and big_pi4.memory_mb == big_zero.memory_mb


def test_deadline_settles_devices():
    model = DeviceModel(DEFAULT_MIX, "always", 0.0, "drop", 10.0, 0, "lora", 16, 2, 10, False)
    zero = model.cost("rpi-zero-2w")
    secs, why = model.settle("rpi-zero-2w", 5, 6000, 6000)
    assert why is None and secs == pytest.approx(5 * zero.step_seconds + 12000 * 8 / 10e6)
    tight = DeviceModel(DEFAULT_MIX, "always", secs * 0.9, "partial", 10.0, 0, "lora", 16, 2, 10, False)
    assert tight.settle("rpi-zero-2w", 5, 6000, 6000)[1].startswith("past the")
    cap = tight.step_cap("rpi-zero-2w", 6000)
    assert cap == 4 and tight.settle("rpi-zero-2w", cap, 6000, 6000)[1] is None  # partial work fits


def test_skewed_partitions():
    from edge_ft.fleet.partitions import partition

    y = np.repeat(np.arange(10), 120)
    classes = {}
    for alpha in (0.1, 1.0, 100.0):
        parts = partition(f"dirichlet:{alpha}", y, 40, 0, "digits")
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(y))) and min(map(len, parts)) >= 1
        classes[alpha] = np.mean([len(np.unique(y[p])) for p in parts])
    assert classes[0.1] < 4 < classes[1.0] < classes[100.0] == 10  # few classes per device at alpha 0.1
    sizes = [len(p) for p in partition("quantity:0.3", y, 40, 0, "digits")]
    even = [len(p) for p in partition("iid", y, 40, 0, "digits")]
    assert sum(sizes) == len(y) and min(sizes) >= 1 and max(sizes) > 4 * max(even)
    tiny = partition("dirichlet:0.05", y, 600, 0, "digits")  # no draw gives 600 devices an example each: topped up
    assert min(map(len, tiny)) == 1 and sorted(np.concatenate(tiny).tolist()) == list(range(len(y)))


def _plan(out: Path, base: Path, num_nodes: int, **device_model):
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    return plan_fleet(out, PlanConfig(
        "lora", task="mnist-digits", num_nodes=num_nodes, partitioning="dirichlet:1", rounds=2, local_steps=6,
        batch=16, aggregation="fedavg", seed=0, base=base, threads=1, min_train_nodes=1, min_available_nodes=1,
        simulation=True, round_timeout=3600.0, **device_model))


@pytest.mark.slow
def test_partial_work_in_process(base_checkpoint, tmp_path):
    """Partial work: each board's devices get the steps that fit the deadline, on the in-process grid with nodes
    that know only their partition id (as the Simulation Engine's virtual SuperNodes)."""
    from fleet_grid import LocalGrid

    from edge_ft.fleet import client_app, server_app

    mix = "50%rpi-zero-2w,50%rpi-5-4gb"
    model = DeviceModel(mix, "always", 0.0, "partial", 10.0, 0, "lora", 16, 2, 10, False)
    nbytes = 6220  # LoRA r=2 on LeNet-5: fc1/fc2/fc3 adapters, float32
    deadline = model.settle("rpi-zero-2w", 2, nbytes, nbytes)[0] * 1.01  # a Zero 2 W fits 2 of its 6 steps
    plan = _plan(tmp_path / "fleet", base_checkpoint, 8, fleet_mix=mix, deadline=deadline, stragglers="partial")
    nodes = [{"partition-id": i, "num-partitions": 8} for i in range(8)]
    grid = LocalGrid(client_app.app, nodes, plan.run_config)
    rounds = server_app.run(grid, server_app.FleetSettings.from_run_config(plan.run_config))
    assert grid.sent[0].content["arrays"].count_bytes() == nbytes
    for r in rounds[1:]:
        steps = {c["board"]: set() for c in r["clients"]}
        for c in r["clients"]:
            steps[c["board"]].add(c["steps"])
        assert steps == {"rpi-zero-2w": {2}, "rpi-5-4gb": {6}}
        assert r["sampled"] == len(r["clients"]) == 8 and r["dropped"] == [] and r["did_not_fit"] == []
        assert 0 < r["sim_seconds"] <= deadline
    assert rounds[0]["simulated"]["stragglers"] == "partial"


@pytest.mark.slow
def test_simulation_engine_runs_the_fleet_app(base_checkpoint, tmp_path, monkeypatch):
    """60 virtual devices, 2 rounds under Flower's Simulation Engine (Ray): the same ServerApp and ClientApp objects
    as the deployment; every sampled device is counted as returned, dropped (past the deadline) or did not fit
    (a board whose budget is below the client stack); the accuracy moves; the records say so."""
    import importlib

    from edge_ft.fleet import client_app, server_app
    from edge_ft.fleet.simulate import SimulationConfig, simulate

    (tmp_path / "boards").mkdir()
    (tmp_path / "boards" / "tiny-board.toml").write_text(TINY)
    monkeypatch.setenv("EDGE_FT_PROFILES", str(tmp_path / "boards"))
    mix = "50%rpi-zero-2w,30%rpi-4b-2gb,20%tiny-board"
    model = DeviceModel(mix, "random:0.8", 0.0, "drop", 10.0, 0, "lora", 16, 2, 10, False)
    zero, pi4 = (model.settle(b, 6, 6220, 6220)[0] for b in ("rpi-zero-2w", "rpi-4b-2gb"))
    deadline = (zero + pi4) / 2  # Pi 4 devices make it, Zero 2 W devices do not
    plan = _plan(tmp_path / "fleet", base_checkpoint, 60, fleet_mix=mix, availability="random:0.8",
                 deadline=deadline, fraction_train=0.5)
    flower_sim = importlib.import_module("flwr.simulation.run_simulation")  # flwr.simulation's function shadows it
    seen = {}
    real = flower_sim._run_simulation

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(flower_sim, "_run_simulation", spy)
    environ = dict(os.environ)
    machine = simulate(plan, SimulationConfig())
    assert dict(os.environ) == environ  # Ray's PYTHONPATH for its workers does not leak into the caller
    assert seen["server_app"] is server_app.app and seen["client_app"] is client_app.app
    assert seen["num_supernodes"] == 60
    rounds = [json.loads(line) for line in (plan.results_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["fleet"] == 60 and 0 < r["online"] < 60 and r["sampled"] == r["online"] // 2
        assert r["rejected"] == [] and r["refused"] == []
        assert r["sampled"] == len(r["clients"]) + len(r["dropped"]) + len(r["did_not_fit"])
        assert {c["board"] for c in r["clients"]} <= {"rpi-4b-2gb"}
        assert {d["board"] for d in r["dropped"]} <= {"rpi-zero-2w"}
        assert {d["board"] for d in r["did_not_fit"]} <= {"tiny-board"}
        assert r["bytes_down"] == 6220 * (r["sampled"] - len(r["did_not_fit"]))
        assert r["bytes_up"] == 6220 * len(r["clients"]) and 0 < r["sim_seconds"] <= deadline
        assert r["partitioning"] == "dirichlet:1"
    trained = rounds[1:]  # FedAvg samples at random: over two rounds of ~24 devices each board shows up
    assert all(sum(len(r[k]) for r in trained) > 0 for k in ("clients", "dropped", "did_not_fit"))
    assert rounds[2]["accuracy"] != rounds[0]["accuracy"]
    assert rounds[0]["simulated"]["boards"]["tiny-board"]["fits"] is False
    assert machine["devices"] == 60 and machine["peak_memory_mb"] > 0
    assert json.loads((tmp_path / "fleet" / "simulation.json").read_text())["versions"]["ray"]
