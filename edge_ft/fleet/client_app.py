"""The fleet's device runtime: a Flower ClientApp that trains the node's own data with its installed bundle.

Torch- and onnx-free (numpy + onnxruntime + safetensors + flwr). The node holds its data and bundle; the node
config names them (NODE_KEYS). Each train message brings the global trainable tensors and the round's settings;
the device first verifies the server's signature over them (edge_ft.fleet.signing: an unsigned, forged, foreign,
expired or replayed message is refused with a one-line error reply and never applied), then runs the device
trainer's steps from those tensors (edge_ft.fleet.local_round: the bundle's engine, kept per process and reset each
round, nothing written) for the configured local steps or epochs, and replies with only the trainable tensors plus
its metrics (edge_ft.fleet.updates.METRIC_KEYS). Nothing else leaves the device. Under a canary run, evaluate
messages bring a candidate global model and the current one; the device scores both on its holdout set (node config
"holdout").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_ft.data.npz import load_npz
from edge_ft.device.bundle import Bundle, load_bundle
from edge_ft.device.trainer import TrainSettings
from edge_ft.errors import UserError
from edge_ft.fleet import dp, faults, secagg
from edge_ft.fleet.local_round import train_round as train_round_in_memory
from edge_ft.fleet.signing import REFUSED, AcceptedRounds, Refused, verify_message
from edge_ft.fleet.updates import ARRAYS, CANDIDATE_KEYS, CONFIG, METRICS, WEIGHT_KEY, from_arrays, to_arrays
from edge_ft.trust.keys import PublicKey, load_public_key

# node_config keys (`flower-supernode --node-config`); optional: threads (0 = onnxruntime's default), round-state
# (a JSON file remembering the last round accepted per run), holdout (.npz the node scores canary models on)
NODE_KEYS = ("partition-id", "num-partitions", "data", "bundle", "server-key")
SEED_STRIDE = 1000  # batch order differs per round and per device: seed·STRIDE² + round·STRIDE + partition

app = ClientApp(mods=[secagg.secagg_when_asked])  # SecAgg+ for its own messages only


@dataclass(frozen=True)
class Node:
    partition: int  # this device's partition id
    data: Path  # the device's own training data (.npz)
    bundle: Path  # the bundle folder installed on the device
    threads: int  # onnxruntime intra-op threads
    server_key: Path  # the public key of the fleet's server: the only signer whose global models the node applies
    round_state: Path | None  # where the last accepted round per run is kept (None: the run's context state)
    holdout: Path | None  # the node's holdout set for canary evaluation


def simulated_node_config(context: Context):
    """The node config: the SuperNode's own, or under the Simulation Engine (whose virtual SuperNodes know only
    their partition id) the plan's node-NN.toml of that partition, in the run config's sim-nodes folder."""
    folder = context.run_config.get("sim-nodes") if "data" not in context.node_config else None
    if not folder:
        return context.node_config
    import tomllib

    path = Path(str(folder)) / f"node-{int(context.node_config['partition-id']):02d}.toml"
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{path}: no readable node config ({e}); plan the simulation again") from None


def node_from_config(node_config) -> Node:
    missing = [k for k in NODE_KEYS if k not in node_config]
    if missing:
        raise UserError(f"node config lacks {missing[0]!r} (a fleet node needs {', '.join(NODE_KEYS)})")

    def optional(key: str) -> Path | None:
        return Path(str(node_config[key])) if node_config.get(key) else None

    return Node(int(node_config["partition-id"]), Path(str(node_config["data"])), Path(str(node_config["bundle"])),
                int(node_config.get("threads", 0)), Path(str(node_config["server-key"])), optional("round-state"),
                optional("holdout"))


_keys: dict[Path, PublicKey] = {}


def _server_key(path: Path) -> PublicKey:
    if path not in _keys:
        _keys[path] = load_public_key(path)
    return _keys[path]


def refusal(msg: Message, why: Refused) -> Message:
    """The reply that tells the server this node refused its message (Flower error content, one line)."""
    return Message(Error(code=REFUSED, reason=str(why)), reply_to=msg)


_bundles: dict[Path, Bundle] = {}  # a ClientApp process may serve several rounds: verify each bundle once


def _bundle(path: Path) -> Bundle:
    if path not in _bundles:
        _bundles[path] = load_bundle(path)
    return _bundles[path]


def local_settings(config, partition: int) -> TrainSettings:
    """The round's training settings from the server's ConfigRecord."""
    steps = int(config["local-steps"])
    seed = (int(config["seed"]) * SEED_STRIDE + int(config["server-round"])) * SEED_STRIDE + partition
    return TrainSettings(batch=int(config["batch"]), epochs=int(config["local-epochs"]), steps=steps or None,
                         lr=float(config["lr"]), schedule="constant", seed=seed, quiet=True)


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """A train message: the fleet's own, or (under SecAgg+, edge_ft.fleet.secagg) its legacy FitIns form."""
    if "fitins.config" not in msg.content.config_records:
        reply = train_content(msg.content, context)
        return refusal(msg, reply) if isinstance(reply, Refused) else Message(reply, reply_to=msg)
    content = secagg.from_fitins(msg.content)
    reply = train_content(content, context)
    if isinstance(reply, Refused):
        raise reply  # SecAgg+ counts this node as dropped from the round
    return Message(secagg.to_fitres(reply, list(content[CONFIG][secagg.NAMES])), reply_to=msg)


def train_content(content: RecordDict, context: Context) -> RecordDict | Refused:
    """Train on the node's data from a signed {"arrays", "config"}; the reply's content, or why it is refused."""
    node_config = simulated_node_config(context)
    node = node_from_config(node_config)
    accepted = AcceptedRounds(node.round_state, context.state)
    try:
        signed = verify_message(content, CONFIG, _server_key(node.server_key), "train", accepted.load())
    except Refused as why:
        return why
    accepted.remember(signed["run"], signed["round"], signed["start"])
    bundle = _bundle(node.bundle)
    x, y = load_npz(node.data, num_classes=bundle.num_classes, input_shape=bundle.input_shape)
    received = content[ARRAYS]
    start = from_arrays(received)
    wrong = sorted(set(start) ^ set(bundle.trainable)) or [
        n for n, v in start.items() if tuple(v.shape) != bundle.trainable[n]]
    if wrong:
        raise UserError(f"the server's tensors do not fit bundle {node.bundle} ({wrong[0]!r}); "
                        "install the bundle of this fleet run")
    config = content[CONFIG]
    settings = local_settings(config, node.partition)
    settings = TrainSettings(**{**settings.__dict__, "threads": node.threads})
    if "max-steps" in config:  # partial work: the steps that fit the round's deadline on this board
        planned = settings.steps or settings.epochs * -(-len(y) // settings.batch)
        settings = TrainSettings(**{**settings.__dict__, "steps": min(planned, int(config["max-steps"]))})
    done = train_round_in_memory(bundle, x, y, settings, start)
    trained = done.trained
    if dp.CLIP_KEY in config:  # DP: the update (the delta from the global model) clipped before it leaves
        trained = dp.clip_update(trained, start, float(config[dp.CLIP_KEY]))
    trained = faults.inject(str(node_config.get(faults.FAULT_KEY, "")), int(config["server-round"]), trained)
    arrays = to_arrays(trained)
    metrics = MetricRecord({
        WEIGHT_KEY: len(y),  # FedAvg weighs a device by the examples it holds
        "steps": done.steps,
        "loss": float(sum(done.losses) / len(done.losses)),
        "local-accuracy": float(done.accuracy),
        "ms-per-step": float(done.ms_per_step),
        "peak-rss-mb": float(done.peak_rss_mb),
        "bytes-down": int(received.count_bytes()),
        "bytes-up": int(arrays.count_bytes()),
    })
    return RecordDict({ARRAYS: arrays, METRICS: metrics})


@app.evaluate()
def canary_round(msg: Message, context: Context) -> Message:
    """Score a signed candidate global model and the current one on this node's holdout set."""
    from edge_ft.fleet.holdout import GlobalEvaluator, frozen_shipped

    node = node_from_config(simulated_node_config(context))
    try:
        verify_message(msg.content, CONFIG, _server_key(node.server_key), "canary",
                       AcceptedRounds(node.round_state, context.state).load())
    except Refused as why:
        return refusal(msg, why)
    if node.holdout is None:
        raise UserError("node config lacks 'holdout' (a canary node scores candidate models on its holdout set)")
    bundle = _bundle(node.bundle)
    x, y = load_npz(node.holdout, num_classes=bundle.num_classes, input_shape=bundle.input_shape)
    score = GlobalEvaluator(bundle, frozen_shipped(bundle), x, y)
    metrics = {key: score(from_arrays(msg.content[name])) for key, name in CANDIDATE_KEYS.items()}
    return Message(RecordDict({METRICS: MetricRecord({**metrics, WEIGHT_KEY: len(y)})}), reply_to=msg)
