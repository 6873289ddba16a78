"""Faults at scale: a device whose ClientApp raises, hangs past the round timeout, or returns a malformed or
non-finite update is counted as not averaged for that round with its reason (edge_ft.fleet.outcomes), the rest are
averaged, and the run finishes; under Flower's Simulation Engine, with faults injected by the node config's
test-only key (edge_ft.fleet.faults)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edge_ft.fleet import faults, outcomes

ROUND_TIMEOUT = 120.0  # seconds: far above what a healthy device's round takes here, even on a busy machine


def test_fault_specs_parse_and_act():
    arrays = {"a": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}
    assert faults.parse("hang:2.5@3") == ("hang", 2.5, 3) and faults.parse("nan") == ("nan", 0.0, None)
    for bad in ("hang", "nan:1", "explode", "raise@x"):
        with pytest.raises(ValueError):
            faults.parse(bad)
    assert faults.inject("", 1, arrays) is arrays and faults.inject("nan@2", 1, arrays) is arrays
    assert set(faults.inject("malformed", 1, arrays)) == {"b"}
    assert np.isnan(faults.inject("nan", 1, arrays)["a"]).all()
    with pytest.raises(faults.InjectedFault):
        faults.inject("raise@1", 1, arrays)


def test_reasons_are_counted_by_kind():
    info = {"rejected": [{"node": 1, "reason": f"{outcomes.ERROR_REPLY}InjectedFault: raise"},
                         {"node": 2, "reason": "tensor 'w' contains NaN or Inf"},
                         {"node": 3, "reason": "tensor 'w' missing"}, {"node": 4, "reason": "metrics must be finite "
                                                                                               "numbers"}],
            "no_reply": [{"node": 5, "reason": "no reply"}], "refused": [], "dropped": [{"node": 6, "reason": "x"}]}
    assert outcomes.drop_counts(info) == {"raised": 1, "non-finite": 2, "malformed": 1, "no-reply": 1,
                                          "deadline": 1}
    assert outcomes.drop_counts({"rejected": [], "refused": []}) == {}
    traceback = "\x1b[36mray::ClientAppActor.run()\x1b[39m\n  File x\nInjectedFault: boom\n\n"
    assert outcomes.error_reason(traceback) == f"{outcomes.ERROR_REPLY}InjectedFault: boom"


def _plan(out: Path, base: Path, num_nodes: int, rounds: int, **kw):
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    return plan_fleet(out, PlanConfig("lora", task="mnist-digits", num_nodes=num_nodes, partitioning="writers",
                                      rounds=rounds, local_steps=3, batch=16, aggregation="fedavg", seed=0, base=base,
                                      threads=1, min_train_nodes=1, min_available_nodes=1, **kw))


def _inject(plan, partition: int, spec: str) -> None:
    """Give one device a fault: in its node config (the in-process grid's) and its node-NN.toml (the simulation's)."""
    plan.node_configs[partition][faults.FAULT_KEY] = spec
    toml = Path(plan.run_config["sim-nodes"]) / f"node-{partition:02d}.toml"
    toml.write_text(toml.read_text() + f'{faults.FAULT_KEY} = "{spec}"\n')


@pytest.mark.slow
def test_faulty_devices_are_counted_in_process(base_checkpoint, tmp_path):
    """On the in-process grid: a raising, a NaN, a malformed and a silent device; the round averages the others."""
    from fleet_grid import LocalGrid

    from edge_ft.fleet import client_app, server_app

    plan = _plan(tmp_path / "fleet", base_checkpoint, 5, 1, simulation=True)
    for partition, spec in ((1, "raise"), (2, "nan"), (3, "malformed")):
        _inject(plan, partition, spec)
    grid = LocalGrid(client_app.app, plan.node_configs, plan.run_config,
                     tamper=lambda node, reply: None if node == 104 else reply)
    rounds = server_app.run(grid, server_app.FleetSettings.from_run_config(plan.run_config))
    r = rounds[1]
    assert r["drop_reasons"] == {"raised": 1, "non-finite": 1, "malformed": 1, "no-reply": 1}
    assert [c["node"] for c in r["clients"]] == [100] and [n["node"] for n in r["no_reply"]] == [104]
    reasons = {x["node"]: x["reason"] for x in r["rejected"]}
    assert "InjectedFault" in reasons[101] and "NaN" in reasons[102] and "missing" in reasons[103]
    assert rounds[0]["drop_reasons"] == {} and math.isfinite(r["accuracy"])


@pytest.mark.slow
def test_faulty_devices_never_stop_a_simulation(base_checkpoint, tmp_path):
    """Under Flower's Simulation Engine, 6 virtual devices, 2 rounds: one raises, one returns NaN, one a malformed
    update, every round; one hangs past the round timeout in round 1 only. Each round records the reason counts,
    averages the healthy devices, and the run finishes."""
    from edge_ft.checkpoint import load_safetensors
    from edge_ft.fleet import records
    from edge_ft.fleet.simulate import SimulationConfig, simulate

    plan = _plan(tmp_path / "fleet", base_checkpoint, 6, 2, simulation=True, round_timeout=ROUND_TIMEOUT)
    for partition, spec in ((1, "raise"), (2, "nan"), (3, "malformed"), (4, f"hang:{ROUND_TIMEOUT + 60:g}@1")):
        _inject(plan, partition, spec)
    simulate(plan, SimulationConfig())
    rounds = [json.loads(line) for line in (plan.results_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, second = rounds[1:]
    assert first["drop_reasons"] == {"raised": 1, "non-finite": 1, "malformed": 1, "no-reply": 1}
    assert second["drop_reasons"] == {"raised": 1, "non-finite": 1, "malformed": 1}
    assert first["sampled"] == second["sampled"] == 6
    assert len(first["clients"]) == 2 and len(second["clients"]) == 3  # the hung device is back in round 2
    raised = [x["reason"] for x in second["rejected"] if x["reason"].startswith(outcomes.ERROR_REPLY)]
    assert len(raised) == 1 and "test-fault: raise in round 2" in raised[0] and "\n" not in raised[0]
    state = load_safetensors(records.state_file(plan.results_dir, 2))
    assert all(np.isfinite(v).all() for v in state.values())
    assert (plan.results_dir / "fleet.json").is_file()  # the run finished
