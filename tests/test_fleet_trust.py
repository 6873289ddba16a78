"""Signed fleet rounds: every node refuses an unsigned, forged, foreign, altered, expired or replayed global model,
in one line, the server records the refusal and never averages it; and the canary keeps a worse model from the
rest of the fleet."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from edge_ft.fleet.signing import Refused, RoundSigner, load_signer, verify_message
from edge_ft.fleet.updates import ARRAYS, CONFIG, METRICS, to_arrays
from edge_ft.trust.keys import load_private_key, load_public_key, new_key_pair
from edge_ft.trust.signature import now_utc

sys.path.insert(0, str(Path(__file__).parent))


def _content(round_: int = 3, lr: float = 0.02):
    from flwr.app import ConfigRecord, RecordDict

    tensors = {"fc3.lora_B": np.arange(20, dtype=np.float32).reshape(10, 2), "fc3.bias": np.ones(10, np.float32)}
    return RecordDict({ARRAYS: to_arrays(tensors), CONFIG: ConfigRecord({"server-round": round_, "lr": lr})})


@pytest.fixture
def keys(tmp_path):
    server, _, _ = new_key_pair(tmp_path / "server")
    attacker, _, _ = new_key_pair(tmp_path / "attacker")
    return load_signer(server, "digits-1"), load_public_key(tmp_path / "server.pub"), RoundSigner(
        load_private_key(attacker), "digits-1")


def _refusal(content, key, purpose="train", accepted=None, now=None) -> str:
    with pytest.raises(Refused) as e:
        verify_message(content, CONFIG, key, purpose, accepted or {}, now)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_signed_round_verifies_and_each_forgery_is_refused_in_one_line(keys):
    signer, key, attacker = keys
    good = _content()
    signer.sign(good, CONFIG, 3)
    body = verify_message(good, CONFIG, key, "train", {"digits-1": 2})
    assert (body["run"], body["round"], body["purpose"]) == ("digits-1", 3, "train")

    assert "unsigned global model" in _refusal(_content(), key)
    foreign = _content()
    attacker.sign(foreign, CONFIG, 3)
    assert f"signed by key {attacker.keyid[:16]}, which this node does not trust" in _refusal(foreign, key)
    tampered = _content()
    signer.sign(tampered, CONFIG, 3)
    tampered[ARRAYS]["fc3.bias"] = to_arrays({"b": np.full(10, 1.01, np.float32)})["b"]
    assert "not the ones key" in _refusal(tampered, key) and "forged update" in _refusal(tampered, key)
    altered = _content()
    signer.sign(altered, CONFIG, 3)
    altered[CONFIG]["lr"] = 5.0
    assert "signature of key" in _refusal(altered, key) and "altered" in _refusal(altered, key)
    renumbered = _content()
    signer.sign(renumbered, CONFIG, 3)
    renumbered[CONFIG]["signed-round"] = 9  # a replay dressed up as a newer round
    assert "does not verify" in _refusal(renumbered, key)
    assert "not newer than round 3 already accepted" in _refusal(good, key, accepted={"digits-1": 3})
    assert "expired" in _refusal(good, key, now=now_utc() + timedelta(days=2))
    assert "signed for train, received for canary" in _refusal(good, key, purpose="canary")
    canary = _content()
    signer.sign(canary, CONFIG, 3, "canary")
    verify_message(canary, CONFIG, key, "canary", {"digits-1": 3})  # a canary scores the round it follows
    assert "older than round 4" in _refusal(canary, key, purpose="canary", accepted={"digits-1": 4})


@pytest.fixture(scope="module")
def plan3(base_checkpoint, tmp_path_factory):
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    return plan_fleet(tmp_path_factory.mktemp("fleet-trust"), PlanConfig(
        "lora", task="mnist-digits", num_nodes=3, partitioning="writers", rounds=4, local_steps=2, batch=16,
        aggregation="ffa", seed=0, base=base_checkpoint, threads=1, canary=0.25, canary_tolerance=0.05))


def _run(plan, tmp_path, grid, **overrides):
    from edge_ft.fleet import server_app

    s = server_app.FleetSettings.from_run_config({**plan.run_config, "results-dir": str(tmp_path / "results"),
                                                  **overrides})
    return server_app.run(grid, s)


def test_plan_keeps_the_server_key_private_and_gives_nodes_its_public_key(plan3):
    private = Path(plan3.run_config["signing-key"])
    assert private.stat().st_mode & 0o777 == 0o600
    for node in plan3.node_configs:
        assert load_public_key(node["server-key"]).raw == load_public_key(private.with_suffix(".pub")).raw
        assert Path(node["holdout"]).is_file()


@pytest.mark.slow
def test_a_forged_fleet_update_is_refused_by_every_client(plan3, tmp_path, caplog):
    """Round 1 is honest. Round 2: node 100 gets tampered tensors under the server's signature, node 101 an unsigned
    message, node 102 one signed by another key. Round 3: every node gets round 1's signed message again. Every
    node refuses, the server records each refusal and keeps its model; round 4 is honest and all nodes train."""
    from flwr.app import ConfigRecord, RecordDict

    from edge_ft.fleet import client_app
    from edge_ft.fleet.signing import SIGNED_KEYS
    from fleet_grid import LocalGrid

    attacker = RoundSigner(load_private_key(new_key_pair(tmp_path / "attacker")[0]), "")

    first: dict[int, RecordDict] = {}  # what each node received in round 1, as it was then

    def forge(node, msg):
        rnd = int(msg.content[CONFIG]["server-round"])
        content = RecordDict({ARRAYS: to_arrays({k: v.numpy() for k, v in msg.content[ARRAYS].items()}),
                              CONFIG: ConfigRecord(dict(msg.content[CONFIG]))})
        if rnd == 1:
            first[node] = content
            return None
        if rnd == 2 and node == 100:
            content[ARRAYS] = to_arrays({k: v.numpy() + 0.5 for k, v in msg.content[ARRAYS].items()})
        elif rnd == 2 and node == 101:
            for k in SIGNED_KEYS:
                content[CONFIG].pop(k)
        elif rnd == 2 and node == 102:
            attacker.run = msg.content[CONFIG]["run-name"]
            attacker.sign(content, CONFIG, rnd)
        elif rnd == 3:
            return first[node]  # round 1's message, signature and all
        else:
            return None
        return content

    grid = LocalGrid(client_app.app, plan3.node_configs, forge=forge)
    with caplog.at_level("WARNING", logger="flwr"):
        rounds = _run(plan3, tmp_path, grid, canary=0.0)
    refused = {r["round"]: {x["node"]: x["reason"] for x in r["refused"]} for r in rounds}
    assert [len(r["clients"]) for r in rounds] == [0, 3, 0, 0, 3]
    assert "forged update" in refused[2][100] and "unsigned global model" in refused[2][101]
    assert f"signed by key {attacker.keyid[:16]}, which this node does not trust" in refused[2][102]
    assert set(refused[3]) == {100, 101, 102} and all(
        "round 1 of run" in why and "not newer than round 1 already accepted" in why for why in refused[3].values())
    assert all("\n" not in why for r in refused.values() for why in r.values())
    assert rounds[1]["accuracy"] == rounds[2]["accuracy"] == rounds[3]["accuracy"]  # the model stayed as it was
    assert all(r["rejected"] == [] for r in rounds)
    assert "node 101 refused the global model: round 2 of run" not in caplog.text  # unsigned: no round claimed
    assert "node 101 refused the global model: unsigned global model" in caplog.text
    for node, why in refused[2].items():
        print(f"node {node}: {why}")
    for node, why in refused[3].items():
        print(f"node {node}: {why}")


@pytest.mark.slow
def test_canary_promotes_a_model_that_holds_and_rejects_one_that_falls(plan3, tmp_path):
    """One canary node of three. Round 1 is honest: promoted. In round 2 every device sends B far off (finite, so it
    passes the update checks): the canary's holdout accuracy falls, the update is rejected and the global model
    stays round 1's; the other nodes never receive it."""
    from flwr.app import Message, RecordDict

    from edge_ft.fleet import client_app
    from fleet_grid import LocalGrid

    def wreck(node, reply):
        if reply.has_error() or reply.metadata.message_type != "train" or len(grid.sent) <= 4:
            return reply
        bad = {k: v.numpy() + 3.0 for k, v in reply.content[ARRAYS].items()}
        return Message(RecordDict({ARRAYS: to_arrays(bad), METRICS: reply.content[METRICS]}),
                       reply_to=grid.received[-1])

    grid = LocalGrid(client_app.app, plan3.node_configs, tamper=wreck)
    rounds = _run(plan3, tmp_path, grid, rounds=2)
    first, second = rounds[1]["canary"], rounds[2]["canary"]
    assert first["decision"] == "promoted" and len(first["nodes"]) == 1 and first["refused"] == []
    assert second["decision"] == "rejected" and second["accuracy"] < second["previous_accuracy"] - 0.05
    assert rounds[2]["accuracy"] == rounds[1]["accuracy"]  # the rejected update never became the global model
    evaluated = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert [m.metadata.dst_node_id for m in evaluated] == first["nodes"] + second["nodes"]
