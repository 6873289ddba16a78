"""The fleet's server: a Flower ServerApp on the host that federates a bundle's trainable tensors.

Signs every message it sends with the run's key (edge_ft.fleet.signing); a node that refuses one is recorded as
refused and never averaged. With canary > 0 a round's new global model is promoted only when the canary nodes'
holdout accuracy holds (edge_ft.fleet.canary). Starts from the bundle (or the last committed round of an
interrupted run, with resume=true), runs Flower's
FedAvg (weighted by each device's examples) for the configured rounds, rejects malformed client updates with a
logged reason (edge_ft.fleet.updates), evaluates the global model after every round on the held-out test set
(the merged model on onnxruntime's inference session), commits each round (edge_ft.fleet.records) and ends by
writing the global model as an adapter in PEFT's layout (`edge-ft adapter merge` and PEFT load it).
The run config keys are RUN_KEYS; plan_fleet (edge_ft.fleet.plan) writes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from edge_ft.checkpoint import sha256_file
from edge_ft.data.npz import load_npz
from edge_ft.device.adapter import shipped_frozen, write_adapter
from edge_ft.device.bundle import MANIFEST, Bundle, load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.errors import UserError
from edge_ft.fleet import records
from edge_ft.fleet.aggregate import check_aggregation, product_gap
from edge_ft.fleet.canary import canary_nodes, check_canary, run_canary
from edge_ft.fleet.grid import PromptGrid
from edge_ft.fleet.holdout import GlobalEvaluator
from edge_ft.fleet.signing import REFUSED, RoundSigner, load_signer
from edge_ft.fleet.updates import WEIGHT_KEY, check_update, from_arrays, to_arrays
from edge_ft.training_defaults import epoch_lr

log = logging.getLogger("flwr")  # Flower's own logger: its handler prints to the server's log
app = ServerApp()


@dataclass(frozen=True)
class FleetSettings:
    """The run config (`flwr run --run-config`), one field per key (field_name -> key-name)."""

    method: str  # full | probe | lora (must be what the bundle trains)
    aggregation: str  # fedavg | ffa (LoRA with lora_A frozen; the bundle must be exported so)
    rounds: int  # federated rounds in total (a resumed run continues up to this count)
    local_steps: int  # optimizer steps per device per round (0: local-epochs passes instead)
    local_epochs: int  # passes over the device's data per round when local-steps is 0
    batch: int  # examples per step on the device
    lr: float  # learning rate of round 1; cosine decay over the rounds (as the centralised recipe per epoch)
    seed: int  # devices' batch order
    partitioning: str  # how the data was split (recorded; the split itself is in the node files)
    num_nodes: int  # devices in the fleet
    fraction_train: float  # share of connected devices asked to train each round
    min_train_nodes: int  # FedAvg's min_train_nodes: devices sampled at least per round
    min_available_nodes: int  # FedAvg's min_available_nodes: connected devices needed to start a round
    round_timeout: float  # seconds to wait for replies; a round ends with the devices that answered
    bundle: str  # the server's copy of the bundle (absolute path)
    test_data: str  # held-out test set (.npz, absolute path)
    results_dir: str  # where rounds, state and the final adapter go
    resume: bool  # continue the run committed in results-dir instead of refusing it
    signing_key: str  # the server's Ed25519 private key (PEM); the nodes hold its public key (node config)
    canary: float  # share of nodes that score a new global model before the rest get it (0: off)
    canary_tolerance: float  # accuracy drop on the canary holdouts that still promotes the new model

    @classmethod
    def from_run_config(cls, run_config) -> FleetSettings:
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                raise UserError(f"run config lacks {key!r}; plan the run with edge_ft.fleet.plan.plan_fleet")
            kind = {"int": int, "float": float, "str": str, "bool": bool}[f.type]
            values[f.name] = kind(run_config[key])
        s = cls(**values)
        check_aggregation(s.aggregation, s.method)
        check_canary(s.canary, s.canary_tolerance)
        if s.rounds < 1 or s.batch < 1 or s.num_nodes < 1 or (s.local_steps < 1 and s.local_epochs < 1):
            raise UserError("rounds, batch, num-nodes and local-steps (or local-epochs) must be positive")
        return s


RUN_KEYS = tuple(f.name.replace("_", "-") for f in fields(FleetSettings))


def run_identity(s: FleetSettings, bundle: Bundle) -> dict:
    """What a resumed run must share with the one it continues (rounds may grow; paths may move)."""
    kept = ("method", "aggregation", "local_steps", "local_epochs", "batch", "lr", "seed", "partitioning",
            "num_nodes")
    return {"bundle_manifest_sha256": sha256_file(bundle.path / MANIFEST), "test_data_sha256":
            sha256_file(Path(s.test_data)), **{k.replace("_", "-"): getattr(s, k) for k in kept}}


class FleetFedAvg(FedAvg):
    """Flower's FedAvg with the round's learning rate in the config, every message signed, every update checked
    before averaging, an optional canary before a new global model is kept, and what each round moved and measured
    kept for its record."""

    def __init__(self, s: FleetSettings, expected: dict[str, tuple[int, ...]], frozen: dict[str, np.ndarray],
                 first_round: int, signer: RoundSigner):
        super().__init__(fraction_train=s.fraction_train, fraction_evaluate=0.0, min_train_nodes=s.min_train_nodes,
                         min_evaluate_nodes=0, min_available_nodes=s.min_available_nodes, weighted_by_key=WEIGHT_KEY)
        self.s, self.expected, self.frozen, self.offset = s, expected, frozen, first_round - 1
        self.lora, self.signer = s.method == "lora", signer
        self.last: dict = {}  # the round in progress: clients, rejections, refusals, bytes, canary decision
        self.sent: tuple[ArrayRecord, Grid] | None = None  # the round's starting global model and the grid

    def round_of(self, server_round: int) -> int:
        return self.offset + server_round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        r = self.round_of(server_round)
        config = ConfigRecord(dict(config))  # signed per round: never the run's shared train config
        config["lr"] = epoch_lr(self.s.lr, r - 1, self.s.rounds, "cosine")
        messages = list(super().configure_train(r, arrays, config, grid))
        for content in {id(m.content): m.content for m in messages}.values():  # FedAvg shares one RecordDict
            self.signer.sign(content, self.configrecord_key, r)
        self.sent = (arrays, grid)
        # started_at (wall clock) is kept in the round record: the deployment files each node's message by it
        self.last = {"started_at": time.time(), "sampled": len(messages), "clients": [], "rejected": [],
                     "refused": [], "bytes_down": arrays.count_bytes() * len(messages), "bytes_up": 0,
                     "lora_product_gap": None, "canary": None}
        return messages

    def aggregate_train(self, server_round: int, replies):
        r, accepted, tensors, weights = self.round_of(server_round), [], [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() and msg.error.code == REFUSED:
                log.warning("round %d: node %d refused the global model: %s", r, node, msg.error.reason)
                self.last["refused"].append({"node": node, "reason": msg.error.reason})
                continue
            if msg.has_error():
                why = f"error reply: {msg.error.reason}"
            else:
                update, why = check_update(msg.content, self.expected)
            if why:
                log.warning("round %d: rejected the update of node %d: %s", r, node, why)
                self.last["rejected"].append({"node": node, "reason": why})
                continue
            metrics = dict(msg.content["metrics"])
            accepted.append(msg)
            tensors.append(update)
            weights.append(metrics[WEIGHT_KEY])
            self.last["bytes_up"] += msg.content["arrays"].count_bytes()
            self.last["clients"].append({"node": node, **metrics})
        if self.lora and tensors:
            self.last["lora_product_gap"] = product_gap(tensors, weights, self.frozen)
        if not accepted:
            log.warning("round %d: no update to aggregate; the global model stays as it was", r)
            return None, None
        arrays, metrics = super().aggregate_train(r, accepted)
        if self.s.canary > 0 and arrays is not None:
            arrays = self.canary(r, arrays)
        return arrays, metrics

    def canary(self, r: int, candidate: ArrayRecord) -> ArrayRecord:
        """The candidate when the canary nodes' holdout accuracy holds, else the round's starting model."""
        previous, grid = self.sent
        nodes = canary_nodes(list(grid.get_node_ids()), self.s.canary, self.s.seed, r)
        outcome = run_canary(grid, self.signer, candidate, previous, r, nodes, self.s.canary_tolerance,
                             self.s.round_timeout)
        self.last["canary"] = outcome
        log.info("round %d: canary on nodes %s: %s, %s", r, nodes, outcome["decision"], outcome["why"])
        return candidate if outcome["decision"] == "promoted" else previous


def _settings_record(s: FleetSettings) -> ConfigRecord:
    return ConfigRecord({"lr": s.lr, "local-steps": s.local_steps, "local-epochs": s.local_epochs,
                         "batch": s.batch, "seed": s.seed})


@app.main()
def main(grid: Grid, context: Context) -> None:
    s = FleetSettings.from_run_config(context.run_config)
    run(PromptGrid(grid), s)


def run(grid: Grid, s: FleetSettings) -> list[dict]:
    """The whole federated run on `grid`; returns every round's record (round 0 = the starting model)."""
    bundle = load_bundle(s.bundle)
    if bundle.method.method != s.method or bundle.method.freeze_lora_a != (s.aggregation == "ffa"):
        raise UserError(f"{s.bundle}: trains {bundle.method.method}"
                        f"{' with lora_A frozen' if bundle.method.freeze_lora_a else ''}, the run config asks for "
                        f"{s.method} with {s.aggregation}; plan the run again")
    results = Path(s.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    x_test, y_test = load_npz(s.test_data, num_classes=bundle.num_classes, input_shape=bundle.input_shape)
    identity = {**run_identity(s, bundle), "run-name": records.run_name(results, s.resume)}
    done, rounds, saved = records.start(results, identity, s.resume)
    engine = open_engine(bundle, threads=1)
    frozen = {n: v for n, v in engine.parameters().items() if n in shipped_frozen(bundle)}
    current = saved if saved is not None else engine.trainable_state()
    del engine
    evaluate = GlobalEvaluator(bundle, frozen, x_test, y_test)
    strategy = FleetFedAvg(s, dict(bundle.trainable), frozen, done + 1, load_signer(s.signing_key,
                                                                                       identity["run-name"]))
    base = {"method": s.method, "aggregation": s.aggregation, "partitioning": s.partitioning,
            "num_nodes": s.num_nodes}

    def on_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal current
        r = strategy.round_of(server_round)
        if server_round == 0 and done:  # a resumed run's starting model was recorded by the first run
            return MetricRecord({"accuracy": rounds[-1]["accuracy"]})
        current = from_arrays(arrays)
        info = strategy.last if server_round else {"sampled": 0, "clients": [], "rejected": [], "refused": [],
                                                   "bytes_down": 0, "bytes_up": 0, "lora_product_gap": None,
                                                   "canary": None}
        seconds = time.time() - info["started_at"] if "started_at" in info else 0.0
        record = {"round": r, **base, "accuracy": evaluate(current), "seconds": round(seconds, 3), **info}
        rounds.append(record)
        records.commit_round(results, identity, r, current, rounds)
        log.info("round %d: global accuracy %.4f, %d updates, %d rejected, %d refused, %d B down, %d B up", r,
                 record["accuracy"], len(record["clients"]), len(record["rejected"]), len(record["refused"]),
                 record["bytes_down"], record["bytes_up"])
        return MetricRecord({"accuracy": record["accuracy"]})

    if done < s.rounds:
        strategy.start(grid=grid, initial_arrays=to_arrays(current), num_rounds=s.rounds - done,
                       timeout=s.round_timeout, train_config=_settings_record(s), evaluate_fn=on_round)
    write_adapter(results / records.ADAPTER, {**frozen, **current}, bundle.method, bundle.manifest["base"],
                  bundle.classes)
    records.finish(results, {**base, "settings": asdict(s), "rounds": len(rounds) - 1,
                             "final_accuracy": rounds[-1]["accuracy"],
                             "bytes_total": sum(r["bytes_down"] + r["bytes_up"] for r in rounds),
                             "adapter": records.ADAPTER})
    return rounds
