"""The fleet app: partitions, update checks, FedAvg vs FFA-LoRA, and whole federated runs on an in-process grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tomllib

from edge_ft.errors import UserError
from edge_ft.fleet import partitions
from edge_ft.fleet.aggregate import lora_products, product_gap
from edge_ft.fleet.updates import ARRAYS, METRIC_KEYS, METRICS, check_update, to_arrays

REPO = Path(__file__).resolve().parents[1]
DEVICE_PYTHON = REPO / ".venv-device" / "bin" / "python"
sys.path.insert(0, str(Path(__file__).parent))


# --- partitions -------------------------------------------------------------------------------------------------

def test_writer_split_gives_each_device_whole_writer_blocks():
    parts = partitions.by_writer(1200, 6)
    blocks = partitions.writer_blocks(1200)
    assert len(blocks) == 9 and blocks[0] == (0, 138) and blocks[-1] == (1106, 1200)  # 1797/13 rows a writer
    starts, ends = {a for a, _ in blocks}, {b for _, b in blocks}
    assert np.array_equal(np.concatenate(parts), np.arange(1200))  # disjoint, contiguous, everything dealt
    for p in parts:
        assert p[0] in starts and p[-1] + 1 in ends  # cut only at writer edges
        assert 1 <= sum(a >= p[0] and b <= p[-1] + 1 for a, b in blocks) <= 2
    for many in (10, 100, 1000):  # more devices than writers: each device holds a run of one writer's block
        parts = partitions.by_writer(1200, many)
        assert len(parts) == many and np.array_equal(np.concatenate(parts), np.arange(1200))
        assert min(map(len, parts)) >= 1
        assert all(any(a <= p[0] and p[-1] < b for a, b in blocks) for p in parts)
        per_writer = [sum(a <= p[0] < b for p in parts) for a, b in blocks]
        assert all(abs(n - (b - a) * many / 1200) <= 1 for n, (a, b) in zip(per_writer, blocks))  # by their rows
    with pytest.raises(UserError, match="only 1200 examples"):
        partitions.by_writer(1200, 1201)


def test_dirichlet_skews_labels_more_for_small_alpha():
    y = np.repeat(np.arange(10), 100)

    def mean_entropy(parts):
        hist = [np.bincount(y[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([-(h[h > 0] * np.log(h[h > 0])).sum() for h in hist]))

    skewed, flat = partitions.by_dirichlet(y, 6, 0.1, seed=0), partitions.by_dirichlet(y, 6, 100.0, seed=0)
    for parts in (skewed, flat):
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y))) and min(map(len, parts)) >= 1
    assert mean_entropy(skewed) < 0.7 * np.log(10) < mean_entropy(flat)
    assert [len(p) for p in partitions.by_dirichlet(y, 6, 0.1, seed=0)] == [len(p) for p in skewed]  # seeded


@pytest.mark.parametrize("text,message", [("dirichlet:0", "positive concentration"), ("dirichlet:x", "positive"),
                                          ("random", "unknown partitioning"), ("writers:3", "unknown")])
def test_bad_partitioning_is_one_line(text, message):
    with pytest.raises(UserError, match=message):
        partitions.parse_partitioning(text)


def test_writer_split_needs_the_digits():
    with pytest.raises(UserError, match="no writers"):
        partitions.partition("writers", np.zeros(100, np.int64), 2, 0, "fashion")


# --- aggregation ------------------------------------------------------------------------------------------------

def _clients(shared_a: bool, n: int = 3):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 84))
    return [{"fc2.lora_A": a if shared_a else rng.standard_normal((2, 84)),
             "fc2.lora_B": rng.standard_normal((120, 2))} for _ in range(n)]


def test_fedavg_of_a_and_b_is_not_the_average_update_but_ffa_is():
    weights = [10.0, 30.0, 60.0]
    assert product_gap(_clients(shared_a=False), weights) > 0.3
    assert product_gap(_clients(shared_a=True), weights) < 1e-12
    clients = _clients(shared_a=True)
    frozen = {"fc2.lora_A": clients[0]["fc2.lora_A"]}
    only_b = [{"fc2.lora_B": c["fc2.lora_B"]} for c in clients]  # what travels under FFA
    assert product_gap(only_b, weights, frozen) < 1e-12
    assert lora_products(only_b[0], frozen)["fc2"].shape == (120, 84)


# --- update checks ----------------------------------------------------------------------------------------------

def _reply(tensors, metrics=None):
    from flwr.app import MetricRecord, RecordDict

    metrics = metrics or {k: 1 for k in METRIC_KEYS}
    return RecordDict({ARRAYS: to_arrays(tensors) if not isinstance(tensors, list) else tensors[0],
                       METRICS: MetricRecord(metrics)})


def test_check_update_names_what_is_wrong():
    from flwr.app import Array, ArrayRecord

    expected = {"fc3.weight": (10, 84), "fc3.bias": (10,)}
    good = {"fc3.weight": np.zeros((10, 84), np.float32), "fc3.bias": np.zeros(10, np.float32)}
    assert check_update(_reply(good), expected)[1] is None
    nan = {**good, "fc3.bias": np.full(10, np.nan, np.float32)}
    f64 = ArrayRecord({"fc3.weight": Array(np.zeros((10, 84))), "fc3.bias": Array(np.zeros(10, np.float32))})
    cases = [
        (_reply({"fc3.weight": good["fc3.weight"]}), "'fc3.bias' missing"),
        (_reply({**good, "fc2.weight": np.zeros((84, 120), np.float32)}), "unexpected tensor 'fc2.weight'"),
        (_reply({**good, "fc3.bias": np.zeros(11, np.float32)}), "shape (11,), expected (10,)"),
        (_reply([f64]), "float64, expected float32"),
        (_reply(nan), "NaN or Inf"),
        (_reply(good, {k: 1 for k in METRIC_KEYS if k != "num-examples"}), "metrics"),
        (_reply(good, {**{k: 1 for k in METRIC_KEYS}, "num-examples": 0}), "positive integer"),
    ]
    for content, reason in cases:
        tensors, why = check_update(content, expected)
        assert tensors is None and reason in why, why


# --- whole runs -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ffa_plan(base_checkpoint, tmp_path_factory):
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    return plan_fleet(tmp_path_factory.mktemp("fleet"), PlanConfig(
        "lora", task="mnist-digits", num_nodes=3, partitioning="writers", rounds=2, local_steps=4, batch=16,
        aggregation="ffa", seed=0, base=base_checkpoint, threads=1))


def _settings(plan, **overrides):
    from edge_ft.fleet.server_app import FleetSettings

    return FleetSettings.from_run_config({**plan.run_config, **overrides})


def test_plan_configs_match_the_app(ffa_plan):
    """The run config has exactly the app's keys, each node config names its data and the shared bundle, and
    Flower's own validator accepts the app folder (components importable)."""
    from flwr.common.config import validate_config

    from edge_ft.fleet.client_app import NODE_KEYS
    from edge_ft.fleet.server_app import RUN_KEYS

    app = tomllib.loads((ffa_plan.app_dir / "pyproject.toml").read_text())
    assert set(app["tool"]["flwr"]["app"]["config"]) == set(RUN_KEYS) == set(ffa_plan.run_config)
    assert validate_config(app, check_module=True, project_dir=ffa_plan.app_dir)[0]
    assert tomllib.loads(ffa_plan.run_config_file.read_text()) == ffa_plan.run_config
    for i, (node, file) in enumerate(zip(ffa_plan.node_configs, ffa_plan.node_config_files)):
        assert set(NODE_KEYS) <= set(node) and node["partition-id"] == i and Path(node["data"]).is_file()
        assert tomllib.loads(file.read_text()) == node
    plan = json.loads((ffa_plan.results_dir.parent / "plan.json").read_text())
    assert sum(p["examples"] for p in plan["partitions"]) == 1200  # the digits' whole train pool


@pytest.mark.slow
def test_fleet_round_rejects_bad_updates_survives_a_dead_device_and_averages_exactly(ffa_plan, tmp_path, caplog):
    """Round 1: device 102 sends NaN (rejected, logged, never averaged); round 2: device 101 dies (no reply).
    Both rounds complete; under FFA the global B applied with the shared A is the example-weighted average of the
    accepted devices' B·A, and the final adapter merges into the model the server evaluated last."""
    from fleet_grid import LocalGrid
    from flwr.app import Message, RecordDict

    from edge_ft.data.npz import load_npz
    from edge_ft.device.adapter import merge_adapter
    from edge_ft.device.bundle import load_bundle
    from edge_ft.device.engines import open_engine
    from edge_ft.device.inference import accuracy, predict, session_runner
    from edge_ft.device.ort_api import inference_session
    from edge_ft.fleet import client_app, server_app

    def tamper(node, reply):
        rnd = int(grid.sent[-1].content["config"]["server-round"])
        if rnd == 1 and node == 102:
            bad = {k: np.full_like(v.numpy(), np.nan) for k, v in reply.content[ARRAYS].items()}
            return Message(RecordDict({ARRAYS: to_arrays(bad), METRICS: reply.content[METRICS]}),
                           reply_to=grid.sent[-1])
        return None if rnd == 2 and node == 101 else reply

    grid = LocalGrid(client_app.app, ffa_plan.node_configs, ffa_plan.run_config, tamper=tamper)
    s = _settings(ffa_plan, **{"results-dir": str(tmp_path / "results")})
    with caplog.at_level("WARNING", logger="flwr"):
        rounds = server_app.run(grid, s)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [len(r["clients"]) for r in rounds] == [0, 2, 2]
    assert rounds[1]["rejected"] == [{"node": 102, "reason": "tensor 'fc1.lora_B' contains NaN or Inf"}]
    assert "rejected the update of node 102: tensor 'fc1.lora_B' contains NaN or Inf" in caplog.text
    assert rounds[2]["rejected"] == [] and {c["node"] for c in rounds[2]["clients"]} == {100, 102}
    bundle = load_bundle(s.bundle)
    assert rounds[1]["bytes_down"] == 3 * grid.sent[0].content[ARRAYS].count_bytes()
    assert rounds[1]["bytes_up"] == 2 * grid.sent[0].content[ARRAYS].count_bytes()  # the same tensors go back
    assert all(0 <= r["accuracy"] <= 1 for r in rounds) and rounds[1]["lora_product_gap"] < 1e-9

    # Exactness: round 2's messages carry the global model made from round 1's two accepted replies.
    accepted = [r for r in grid.replies[:3] if r.metadata.src_node_id != 102]
    weights = [r.content[METRICS]["num-examples"] for r in accepted]
    frozen = {n: v for n, v in open_engine(bundle).parameters().items() if n.endswith(".lora_A")}
    global_b = {k: v.numpy() for k, v in grid.sent[3].content[ARRAYS].items()}
    mine = lora_products(global_b, frozen)
    theirs = [lora_products({k: v.numpy() for k, v in r.content[ARRAYS].items()}, frozen) for r in accepted]
    for layer, product in mine.items():
        average = sum(w * t[layer] for w, t in zip(weights, theirs)) / sum(weights)
        np.testing.assert_allclose(product, average, rtol=1e-5, atol=1e-7)
        assert np.abs(average).max() > 1e-4  # the devices did move B

    x, y = load_npz(s.test_data)
    merge_adapter(bundle, tmp_path / "results" / "adapter", tmp_path / "merged.onnx")
    merged = accuracy(predict(session_runner(inference_session(tmp_path / "merged.onnx", 1)), x), y)
    assert merged == rounds[-1]["accuracy"]


@pytest.mark.slow
def test_server_killed_mid_run_resumes_from_its_last_round(ffa_plan, tmp_path):
    """A server that dies in round 2 leaves round 1 committed; without resume the folder is refused, with it the
    run continues at round 2 and ends where an uninterrupted run ends."""
    from fleet_grid import LocalGrid

    from edge_ft.fleet import client_app, server_app
    from edge_ft.fleet.records import read_rounds

    class Killed(Exception):
        pass

    def kill_in_round_2(node, reply):
        if int(reply.content["metrics"]["steps"]) and len(dying.sent) > 3:
            raise Killed
        return reply

    whole = server_app.run(LocalGrid(client_app.app, ffa_plan.node_configs),
                           _settings(ffa_plan, **{"results-dir": str(tmp_path / "whole")}))
    dying = LocalGrid(client_app.app, ffa_plan.node_configs, tamper=kill_in_round_2)
    with pytest.raises(Killed):
        server_app.run(dying, _settings(ffa_plan, **{"results-dir": str(tmp_path / "cut")}))
    assert [r["round"] for r in read_rounds(tmp_path / "cut")] == [0, 1]
    with pytest.raises(UserError, match="unfinished fleet run"):
        server_app.run(LocalGrid(client_app.app, ffa_plan.node_configs),
                       _settings(ffa_plan, **{"results-dir": str(tmp_path / "cut")}))
    resumed = server_app.run(LocalGrid(client_app.app, ffa_plan.node_configs),
                             _settings(ffa_plan, **{"results-dir": str(tmp_path / "cut"), "resume": True}))
    assert [r["round"] for r in resumed] == [0, 1, 2]
    first = read_rounds(tmp_path / "whole")[1]
    assert resumed[1]["accuracy"] == first["accuracy"]  # the committed round, as the first server recorded it
    assert {c["node"]: c["loss"] for c in resumed[1]["clients"]} == {c["node"]: c["loss"] for c in first["clients"]}
    assert abs(resumed[2]["accuracy"] - whole[2]["accuracy"]) <= 1 / 597 + 1e-12  # float order of the sum, one image
    with pytest.raises(UserError, match="run started with batch=16"):
        server_app.run(LocalGrid(client_app.app, ffa_plan.node_configs),
                       _settings(ffa_plan, **{"results-dir": str(tmp_path / "cut"), "resume": True, "batch": 8}))


BLOCKER = textwrap.dedent("""
    import sys

    class BlockTorchAndOnnx:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx", "onnxscript"):
                raise ImportError(f"{name} is blocked: the device side must not import it")
            return None

    sys.meta_path.insert(0, BlockTorchAndOnnx())
""")

CLIENT_ROUND = textwrap.dedent("""
    import json, sys
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from edge_ft.device.bundle import load_bundle
    from edge_ft.device.engines import open_engine
    from edge_ft.fleet.client_app import app
    from edge_ft.fleet.signing import load_signer
    from edge_ft.fleet.updates import to_arrays

    node = json.loads(sys.argv[1])
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    start = open_engine(load_bundle(node["bundle"])).trainable_state()
    config = ConfigRecord({"server-round": 1, "lr": 0.02, "local-steps": 3, "local-epochs": 1, "batch": 16,
                           "seed": 0})
    content = RecordDict({"arrays": to_arrays(start), "config": config})
    load_signer(sys.argv[2], "device-check").sign(content, "config", 1)
    msg = Message(content, 7, "train")
    reply = app(msg, Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={}))
    print(json.dumps({"keys": sorted(reply.content["arrays"]), "metrics": dict(reply.content["metrics"]),
                      "torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules}))
""")


@pytest.mark.slow
def test_client_app_trains_where_torch_and_onnx_cannot_be_imported(ffa_plan, tmp_path):
    """One round of the ClientApp in a process that refuses torch and onnx: the device venv (standard onnxruntime)
    when it is built, else this interpreter."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    python = DEVICE_PYTHON if DEVICE_PYTHON.exists() else Path(sys.executable)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}", "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run([str(python), "-c", CLIENT_ROUND, json.dumps(ffa_plan.node_configs[0]),
                           ffa_plan.run_config["signing-key"]], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["keys"] == ["fc1.lora_B", "fc2.lora_B", "fc3.lora_B"] and not out["torch"] and not out["onnx"]
    m = out["metrics"]
    assert m["steps"] == 3 and m["num-examples"] == 415 and m["bytes-up"] == m["bytes-down"] > 1712
    assert 0 <= m["local-accuracy"] <= 1 and m["peak-rss-mb"] > 0 and m["ms-per-step"] > 0


# --- the fleet report's memory plot -------------------------------------------------------------------------------

def test_memory_plot_names_every_node_and_each_boards_budget(tmp_path):
    """A deployed run's federation.json (written as run_fleet writes it, JSON's string round keys included) gives
    a figure whose legend names every node with its board and one budget line per board, and a table row per node
    that says whether its highest round fits the budget."""
    from edge_ft.atomic import atomic_write_json
    from edge_ft.emulation.profiles import load_profile
    from edge_ft.fleet.measure import FederationResult, NodeResult
    from edge_ft.fleet.records import ROUNDS
    from edge_ft.fleet.report import PLOTS, memory_plot, read_federation, write_fleet_report

    boards = ["rpi-zero-2w", "rpi-zero-2w", "rpi-4b-2gb"]
    nodes = [NodeResult(f"node-{i:02d}", b, "cgroup", load_profile(b).budget_bytes, None, 0, 0,
                        {1: (300 + 20 * i) << 20, 2: (310 + 20 * i) << 20}, {}, {}, False, True, {}, 2, 0, [0],
                        None, "") for i, b in enumerate(boards)]
    results = tmp_path / "lora" / "results"
    results.mkdir(parents=True)
    base = {"method": "lora", "aggregation": "fedavg", "partitioning": "writers", "rejected": [], "clients": []}
    rows = [{**base, "round": r, "accuracy": 0.8 + r / 100, "bytes_down": 100 * r, "bytes_up": 100 * r}
            for r in range(3)]
    (results / ROUNDS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(tmp_path / "lora" / "deploy" / "federation.json",
                      FederationResult("ok", str(tmp_path), True, True, nodes=nodes).to_dict())

    fed = read_federation(results)
    labels = memory_plot([("lora", fed), ("lora again", fed)], tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert labels == ["node-00 (rpi-zero-2w)", "node-01 (rpi-zero-2w)", "node-02 (rpi-4b-2gb)",
                      f"rpi-zero-2w budget ({load_profile('rpi-zero-2w').budget_bytes / 2**20:.0f} MiB)",
                      f"rpi-4b-2gb budget ({load_profile('rpi-4b-2gb').budget_bytes / 2**20:.0f} MiB)"]
    text = write_fleet_report([results], tmp_path / "report").read_text()
    assert (tmp_path / "report" / PLOTS["memory_per_node"]).is_file()
    fits = {n.name: max(n.pss_by_round.values()) <= n.budget_bytes for n in nodes}
    assert not all(fits.values()) and any(fits.values())  # the figures straddle the Zero 2 W's budget
    for n in nodes:
        assert f"| {n.name} | {n.profile} |" in text and text.split(f"| {n.name} |")[1].split("\n")[0].rstrip(
            " |").endswith("yes" if fits[n.name] else "no")
    # an in-process run (no deploy folder) has no memory section
    (tmp_path / "lora" / "deploy" / "federation.json").unlink()
    assert PLOTS["memory_per_node"] not in write_fleet_report([results], tmp_path / "report2").read_text()


@pytest.mark.slow
def test_fashion_with_dirichlet_label_skew_federates(base_checkpoint, tmp_path):
    """Fashion split by Dirichlet(0.3) over 5 devices: each device's data file holds the labels plan.json records,
    far more skewed than an even split of the same pool, and a federation over those devices (the real ServerApp and
    ClientApp on the in-process grid) ends with a finite accuracy well above chance (10 classes)."""
    from fleet_grid import LocalGrid

    from edge_ft.data.npz import load_npz
    from edge_ft.data.tasks import target_split
    from edge_ft.fleet import client_app, server_app
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    plan = plan_fleet(tmp_path / "fleet", PlanConfig(
        "probe", task="mnist-fashion", num_nodes=5, partitioning="dirichlet:0.3", rounds=3, local_steps=10,
        batch=16, aggregation="fedavg", seed=0, base=base_checkpoint, threads=1))
    recorded = [p["labels"] for p in json.loads((tmp_path / "fleet" / "plan.json").read_text())["partitions"]]
    held = [np.bincount(load_npz(n["data"])[1], minlength=10).tolist() for n in plan.node_configs]
    assert held == recorded

    def share_stats(hists):
        shares = [np.asarray(h) / sum(h) for h in hists]
        entropy = np.mean([-(s[s > 0] * np.log(s[s > 0])).sum() for s in shares])
        return float(entropy), float(np.mean([s.max() for s in shares]))

    y = target_split("mnist-fashion").y_train
    even = [np.bincount(y[p], minlength=10) for p in partitions.partition("iid", y, 5, 0, "fashion")]
    (skew_entropy, skew_top), (even_entropy, even_top) = share_stats(held), share_stats(even)
    assert skew_entropy < 0.75 * even_entropy and skew_top > 2 * even_top
    assert sum(map(sum, held)) == len(y)  # every example dealt once

    grid = LocalGrid(client_app.app, plan.node_configs, plan.run_config)
    rounds = server_app.run(grid, _settings(plan))
    accuracies = [r["accuracy"] for r in rounds]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and all(np.isfinite(accuracies))
    assert all(len(r["clients"]) == 5 and not r["rejected"] for r in rounds[1:])
    assert accuracies[-1] > 0.3 and accuracies[-1] > accuracies[0]  # chance is 0.1
