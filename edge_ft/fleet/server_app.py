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
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from edge_ft.checkpoint import sha256_file
from edge_ft.data.npz import load_npz
from edge_ft.device.adapter import shipped_frozen, write_adapter
from edge_ft.device.bundle import MANIFEST, Bundle, load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.errors import UserError
from edge_ft.fleet import dp, outcomes, records, secagg
from edge_ft.fleet.aggregate import check_aggregation, product_gap
from edge_ft.fleet.canary import canary_nodes, check_canary, run_canary
from edge_ft.fleet.devices import DeviceModel
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
    fleet_mix: str  # simulated devices' boards (edge_ft.fleet.devices), "" for real devices: no device model
    availability: str  # simulated devices' availability trace: always | random:P | diurnal:LOW-HIGH
    deadline: float  # simulated seconds a round waits for a device (0: no deadline)
    stragglers: str  # drop | partial: what a device past the deadline contributes (edge_ft.fleet.devices)
    link_mbps: float  # simulated devices' link speed, megabits per second
    sim_nodes: str  # simulation: the folder of the plan's node configs (node-NN.toml, by partition id); else ""
    secagg_max_weight: float  # > 0: SecAgg+ (edge_ft.fleet.secagg), devices weigh at most this many examples; 0: off
    dp_noise: float  # DP (edge_ft.fleet.dp): noise multiplier; the average gets Gaussian noise of std noise·clip/n
    dp_clip: float  # > 0: DP, each device's update (delta) clipped to this L2 norm; 0: off
    clients_per_round: int = 0  # simulated devices: online devices sampled a round, seeded (0: fraction-train)

    @classmethod
    def from_run_config(cls, run_config) -> FleetSettings:
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config and f.default is not MISSING:  # a key added later: older run configs lack it
                continue
            if key not in run_config:
                raise UserError(f"run config lacks {key!r}; plan the run with edge_ft.fleet.plan.plan_fleet")
            kind = {"int": int, "float": float, "str": str, "bool": bool}[f.type]
            values[f.name] = kind(run_config[key])
        s = cls(**values)
        check_aggregation(s.aggregation, s.method)
        check_canary(s.canary, s.canary_tolerance)
        dp.check_dp(s.dp_noise, s.dp_clip)
        if s.rounds < 1 or s.batch < 1 or s.num_nodes < 1 or (s.local_steps < 1 and s.local_epochs < 1):
            raise UserError("rounds, batch, num-nodes and local-steps (or local-epochs) must be positive")
        if s.clients_per_round < 0 or (s.clients_per_round and not s.fleet_mix):
            raise UserError("clients-per-round samples simulated devices: it needs a fleet mix and must be >= 0")
        return s


RUN_KEYS = tuple(f.name.replace("_", "-") for f in fields(FleetSettings))


def run_identity(s: FleetSettings, bundle: Bundle) -> dict:
    """What a resumed run must share with the one it continues (rounds may grow; paths may move)."""
    kept = ("method", "aggregation", "local_steps", "local_epochs", "batch", "lr", "seed", "partitioning",
            "num_nodes", "fleet_mix", "availability", "deadline", "stragglers", "link_mbps", "secagg_max_weight",
            "dp_noise", "dp_clip", "clients_per_round")
    return {"bundle_manifest_sha256": sha256_file(bundle.path / MANIFEST), "test_data_sha256":
            sha256_file(Path(s.test_data)), **{k.replace("_", "-"): getattr(s, k) for k in kept}}


class FleetFedAvg(FedAvg):
    """Flower's FedAvg with the round's learning rate in the config, every message signed, every update checked
    before averaging, an optional canary before a new global model is kept, and what each round moved and measured
    kept for its record."""

    def __init__(self, s: FleetSettings, expected: dict[str, tuple[int, ...]], frozen: dict[str, np.ndarray],
                 first_round: int, signer: RoundSigner, devices: DeviceModel | None = None):
        super().__init__(fraction_train=s.fraction_train, fraction_evaluate=0.0, min_train_nodes=s.min_train_nodes,
                         min_evaluate_nodes=0, min_available_nodes=s.min_available_nodes, weighted_by_key=WEIGHT_KEY)
        self.s, self.expected, self.frozen, self.offset = s, expected, frozen, first_round - 1
        self.lora, self.signer = s.method == "lora", signer
        self.devices = devices  # simulated devices (boards, availability, deadline), None for real ones
        self.boards: dict[int, str] = {}  # node -> board under the device model
        self.pending: list[Message] = []  # under SecAgg+: the round's signed train messages, for its stages
        self.asked: list[int] = []  # the nodes the round's train messages went to
        self.last: dict = {}  # the round in progress: clients, rejections, refusals, bytes, canary decision
        self.sent: tuple[ArrayRecord, Grid] | None = None  # the round's starting global model and the grid

    def round_of(self, server_round: int) -> int:
        return self.offset + server_round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        r = self.round_of(server_round)
        config = ConfigRecord(dict(config))  # signed per round: never the run's shared train config
        config["lr"] = epoch_lr(self.s.lr, r - 1, self.s.rounds, "cosine")
        # started_at (wall clock) is kept in the round record: the deployment files each node's message by it
        self.last = {"started_at": time.time(), "clients": [], "rejected": [], "refused": [], "bytes_up": 0,
                     "lora_product_gap": None, "canary": None}
        if self.s.secagg_max_weight:  # the legacy Parameters SecAgg+ moves are nameless: the names are signed
            config[secagg.NAMES] = list(arrays.keys())
        if self.s.dp_clip:  # the devices clip their updates to this norm (edge_ft.fleet.dp)
            config[dp.CLIP_KEY] = self.s.dp_clip
        if self.devices is None:
            messages = list(super().configure_train(r, arrays, config, grid))
            self.last["sampled"] = len(messages)
        else:
            messages = self.device_messages(r, arrays, config, grid)
        for content in {id(m.content): m.content for m in messages}.values():  # FedAvg shares one RecordDict
            self.signer.sign(content, self.configrecord_key, r)
        self.sent, self.asked = (arrays, grid), [m.metadata.dst_node_id for m in messages]
        self.last["bytes_down"] = arrays.count_bytes() * len(messages)
        if self.s.secagg_max_weight:
            self.pending = messages  # sent by SecAgg+'s own stages in aggregate_train
            return []
        return messages

    def secure_aggregate(self, r: int):
        """The round through SecAgg+: the unmasked weighted mean, checked as a whole (no device's own update is
        seen); its bytes and seconds in the round record."""
        arrays, grid = self.sent
        t0 = time.monotonic()
        out = secagg.secure_round(grid, self.pending, r, list(arrays.keys()), self.s.secagg_max_weight,
                                  self.s.round_timeout)
        self.last.update(clients=out["clients"], bytes_down=out["bytes_down"], bytes_up=out["bytes_up"],
                         secagg={"messages": out["messages"], "seconds": round(time.monotonic() - t0, 3)})
        kept = {c["node"] for c in out["clients"]}
        self.last["no_reply"] = [{"node": n, "reason": "dropped out of SecAgg+ (no reply or an error in a stage)"}
                                 for n in self.asked if n not in kept]
        for client in out["clients"] if self.devices is not None else []:  # simulated time only: no drop after
            board = self.boards[client["node"]]  # the fact, the server cannot take one masked update out
            seconds, _ = self.devices.settle(board, int(client["steps"]), arrays.count_bytes(), arrays.count_bytes())
            client.update(board=board, **{"sim-seconds": round(seconds, 3)})
            self.last["sim_seconds"] = max(self.last["sim_seconds"], round(seconds, 3))
        aggregate = out["aggregate"]
        bad = aggregate is None or set(aggregate) != set(self.expected) or any(
            v.shape != tuple(self.expected[n]) or not np.isfinite(v).all() for n, v in aggregate.items())
        if bad:
            log.warning("round %d: SecAgg+ gave no usable aggregate; the global model stays as it was", r)
            return None, None
        result = self.with_noise(to_arrays(aggregate))
        return (self.canary(r, result) if self.s.canary > 0 else result), None

    def device_messages(self, r: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """The round's messages under the device model: sampled among the online devices; a device whose memory
        the method does not fit, or (partial work) where not one step fits the deadline, is counted, not sent;
        under partial work each board's devices are told their step cap ("max-steps")."""
        nodes = list(grid.get_node_ids())
        self.boards = self.devices.boards(nodes)
        up = self.devices.online_nodes(nodes, r)
        self.last.update(fleet=len(nodes), online=len(up), sampled=0, did_not_fit=[], dropped=[], sim_seconds=0.0)
        if not up:
            log.warning("round %d: no device online", r)
            return []
        if self.s.clients_per_round:  # a fixed number, seeded per round: runs that differ only in method compare
            pick = np.random.default_rng([self.s.seed, 17, r]).permutation(len(up))[:self.s.clients_per_round]
            sampled = [up[i] for i in sorted(pick)]
            config["server-round"] = r  # as FedAvg's own sampling puts it
        else:
            sampled = [m.metadata.dst_node_id for m in super().configure_train(r, arrays, config, _Online(up))]
        self.last["sampled"] = len(sampled)
        groups: dict[int | None, list[int]] = {}
        for node in sampled:
            board = self.boards[node]
            cost, cap = self.devices.cost(board), self.devices.step_cap(board, arrays.count_bytes())
            if not cost.fits:
                self.last["did_not_fit"].append({"node": node, "board": board, "memory_mb": cost.memory_mb,
                                                 "budget_mb": cost.budget_mb})
            elif cap == 0:
                self.last["dropped"].append({"node": node, "board": board, "reason": "not one step fits the "
                                             f"{self.devices.deadline:g} s deadline"})
            else:
                groups.setdefault(cap, []).append(node)
        messages = []
        for cap, ids in groups.items():
            cfg = config if cap is None else ConfigRecord({**dict(config), "max-steps": cap})
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages += self._construct_messages(record, ids, MessageType.TRAIN)
        return messages

    def kept_by_deadline(self, node: int, metrics: dict, bytes_down: int, bytes_up: int) -> bool:
        """Under the device model: the device's simulated round time into its metrics; False when past the deadline."""
        board = self.boards[node]
        seconds, why = self.devices.settle(board, int(metrics["steps"]), bytes_down, bytes_up)
        metrics.update(board=board, **{"sim-seconds": round(seconds, 3)})
        if why:
            self.last["dropped"].append({"node": node, "board": board, "reason": why})
            return False
        self.last["sim_seconds"] = max(self.last["sim_seconds"], round(seconds, 3))
        return True

    def aggregate_train(self, server_round: int, replies):
        r, accepted, tensors, weights = self.round_of(server_round), [], [], []
        if self.s.secagg_max_weight:
            return self.secure_aggregate(r)
        replies = list(replies)
        answered = {m.metadata.src_node_id for m in replies}
        self.last["no_reply"] = [{"node": n, "reason": f"no reply within the {self.s.round_timeout:g} s round "
                                  "timeout"} for n in self.asked if n not in answered]
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() and msg.error.code == REFUSED:
                log.warning("round %d: node %d refused the global model: %s", r, node, msg.error.reason)
                self.last["refused"].append({"node": node, "reason": msg.error.reason})
                continue
            if msg.has_error():
                why = outcomes.error_reason(msg.error.reason)
            else:
                update, why = check_update(msg.content, self.expected)
                if not why and self.s.dp_clip:
                    why = dp.unclipped(update, from_arrays(self.sent[0]), self.s.dp_clip)
            if why:
                log.warning("round %d: rejected the update of node %d: %s", r, node, why)
                self.last["rejected"].append({"node": node, "reason": why})
                continue
            metrics = dict(msg.content["metrics"])
            if self.devices is not None and not self.kept_by_deadline(
                    node, metrics, self.sent[0].count_bytes(), msg.content["arrays"].count_bytes()):
                continue
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
        arrays = self.with_noise(arrays) if arrays is not None else None
        if self.s.canary > 0 and arrays is not None:
            arrays = self.canary(r, arrays)
        return arrays, metrics

    def with_noise(self, average: ArrayRecord) -> ArrayRecord:
        """Under DP: the average with its Gaussian noise (edge_ft.fleet.dp), the noise in the round record."""
        if not self.s.dp_clip:
            return average
        noised, std = dp.add_noise(from_arrays(average), self.s.dp_noise, self.s.dp_clip, len(self.last["clients"]))
        self.last["dp"] = {"clip": self.s.dp_clip, "noise": self.s.dp_noise, "std": std}
        return to_arrays(noised)

    def canary(self, r: int, candidate: ArrayRecord) -> ArrayRecord:
        """The candidate when the canary nodes' holdout accuracy holds, else the round's starting model."""
        previous, grid = self.sent
        nodes = canary_nodes(list(grid.get_node_ids()), self.s.canary, self.s.seed, r)
        outcome = run_canary(grid, self.signer, candidate, previous, r, nodes, self.s.canary_tolerance,
                             self.s.round_timeout)
        self.last["canary"] = outcome
        log.info("round %d: canary on nodes %s: %s, %s", r, nodes, outcome["decision"], outcome["why"])
        return candidate if outcome["decision"] == "promoted" else previous


class _Online:
    """The part of a grid FedAvg samples from: the devices online this round."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def device_model(s: FleetSettings, bundle: Bundle) -> DeviceModel | None:
    """The run's simulated devices (None without a fleet mix: real devices)."""
    if not s.fleet_mix:
        return None
    return DeviceModel(s.fleet_mix, s.availability, s.deadline, s.stragglers, s.link_mbps, s.seed, s.method,
                       s.batch, bundle.method.rank, bundle.num_classes, bundle.method.freeze_lora_a)


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
    devices = device_model(s, bundle)
    strategy = FleetFedAvg(s, dict(bundle.trainable), frozen, done + 1, load_signer(s.signing_key,
                                                                                       identity["run-name"]), devices)
    base = {"method": s.method, "aggregation": s.aggregation, "partitioning": s.partitioning,
            "num_nodes": s.num_nodes, **({"simulated": devices.describe()} if devices else {})}

    def on_round(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal current
        r = strategy.round_of(server_round)
        if server_round == 0 and done:  # a resumed run's starting model was recorded by the first run
            return MetricRecord({"accuracy": rounds[-1]["accuracy"]})
        current = from_arrays(arrays)
        info = strategy.last if server_round else {"sampled": 0, "clients": [], "rejected": [], "refused": [],
                                                   "no_reply": [], "bytes_down": 0, "bytes_up": 0,
                                                   "lora_product_gap": None, "canary": None}
        seconds = time.time() - info["started_at"] if "started_at" in info else 0.0
        record = {"round": r, **base, "accuracy": evaluate(current), "seconds": round(seconds, 3), **info,
                  "drop_reasons": outcomes.drop_counts(info)}
        rounds.append(record)
        records.commit_round(results, identity, r, current, rounds)
        log.info("round %d: global accuracy %.4f, %d updates, not averaged %s, %d B down, %d B up", r,
                 record["accuracy"], len(record["clients"]), record["drop_reasons"] or "none", record["bytes_down"],
                 record["bytes_up"])
        if devices is not None and server_round:
            log.info("round %d: %d of %d devices online, %d sampled, %d did not fit, %d dropped, %.1f s simulated", r,
                     info["online"], info["fleet"], info["sampled"], len(info["did_not_fit"]), len(info["dropped"]),
                     info["sim_seconds"])
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
