"""Plan a fleet run on the host: the bundle, one data file per device, the test set and the configs Flower needs.

    plan = plan_fleet(Path("runs/fleet/lora-ffa"), PlanConfig("lora", task="mnist-digits", num_nodes=6,
                      partitioning="writers", rounds=10, aggregation="ffa"))
    flwr run plan.app_dir CONNECTION --run-config plan.run_config_file    # the deployment runs it
    # each SuperNode: flower-supernode ... --node-config <plan.node_config_files[i]>

out_dir gets (each file written atomically, plan.json last as the commit point):
  prep/base.safetensors + .json  the pretrained LeNet-5 (only when no `base` is given)
  bundle/                      the edge-ft bundle every device installs and the server starts from
  nodes/node-NN.npz            device NN's training data (its partition of the task's train pool)
  nodes/node-NN-holdout.npz    with a canary: every 5th example of the partition, kept out of training, on which
                               the node scores candidate global models (edge_ft.fleet.canary)
  keys/server.key, .pub        the server's signing key (0600; made for the plan unless signing_key is given) and
                               its public key, which every node config names (edge_ft.fleet.signing)
  test.npz                     the held-out test set the server evaluates on
  run_config.toml, nodes/node-NN.toml   the same configs as files (`--run-config FILE`, `--node-config FILE`)
  plan.json                    the settings, the partitions' sizes and label counts, both configs
  results/                     where the ServerApp writes (edge_ft.fleet.records)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ft.atomic import atomic_write_json, atomic_write_text, deferred_sync, ensure_dir
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.contracts import MANIFEST
from edge_ft.data.npz import save_npz
from edge_ft.data.tasks import get_task, target_split
from edge_ft.errors import UserError
from edge_ft.fleet.aggregate import check_aggregation
from edge_ft.fleet.canary import check_canary
from edge_ft.fleet.dp import check_dp
from edge_ft.fleet.partitions import label_histogram, partition
from edge_ft.training_defaults import DEFAULT_LR
from edge_ft.trust.keys import load_public_key, new_key_pair

PLAN, BUNDLE, NODES, TEST, RESULTS, RUN_CONFIG = "plan.json", "bundle", "nodes", "test.npz", "results", \
    "run_config.toml"
KEYS, SERVER_KEY = "keys", "server"
HOLDOUT_EVERY = 5  # under a canary, every 5th example of a node's partition is its holdout
DEFAULT_CANARY_TOLERANCE = 0.02
ConfigValue = int | float | str | bool


@dataclass(frozen=True)
class FleetPlan:
    app_dir: Path  # the Flower App folder `flwr run` points at
    run_config: dict[str, ConfigValue]  # `flwr run --run-config`; keys: edge_ft.fleet.server_app.RUN_KEYS
    node_configs: list[dict[str, ConfigValue]]  # one per SuperNode (`--node-config`); keys: client_app.NODE_KEYS
    results_dir: Path  # where the ServerApp writes per-round records, its state and the final adapter

    @property
    def run_config_file(self) -> Path:
        return self.results_dir.parent / RUN_CONFIG

    @property
    def node_config_files(self) -> list[Path]:
        return [self.results_dir.parent / NODES / f"node-{i:02d}.toml" for i in range(len(self.node_configs))]


def app_dir() -> Path:
    """The Flower App folder (pyproject.toml with [tool.flwr.app]) inside the installed package."""
    return Path(__file__).resolve().parent / "app"


def toml_line(key: str, value: ConfigValue) -> str:
    """One `key = value` TOML line (strings as basic strings; JSON's escapes are TOML's)."""
    if isinstance(value, bool):
        return f"{key} = {'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"{key} = {value!r}"
    return f"{key} = {json.dumps(str(value))}"


def config_arg(config: dict[str, ConfigValue]) -> str:
    """The config as Flower's `KEY=VALUE KEY=VALUE` argument (no value may contain a space)."""
    return " ".join(toml_line(k, v).replace(" = ", "=", 1) for k, v in config.items())


@dataclass(frozen=True)
class PlanConfig:
    """What plan_fleet plans: the task and its split, the method, the rounds and the server's settings."""

    method: str  # full | probe | lora
    task: str = "mnist-digits"  # transfer task (edge_ft.data.tasks)
    num_nodes: int = 6  # devices in the fleet (one data partition each)
    partitioning: str = "writers"  # how the train pool is split (edge_ft.fleet.partitions)
    rounds: int = 10  # federated rounds
    local_steps: int = 0  # optimizer steps per device per round (0: local_epochs passes instead)
    aggregation: str = "fedavg"  # fedavg | ffa (LoRA with lora_A frozen)
    seed: int = 0  # partitioning, bundle export, batch order, simulated devices
    local_epochs: int = 1  # passes over the device's data per round when local_steps is 0
    batch: int = 32  # examples per step on the device
    lr: float | None = None  # learning rate of round 1 (None: the method's recipe default)
    rank: int = 2  # LoRA rank
    engine: str = "ort-step"  # the devices' engine
    base: Path | None = None  # pretrained base weights (None: pretrained once under out_dir/prep)
    shots: int | None = None  # examples per class of the task's train pool (None: the task's default)
    fraction_train: float = 1.0  # share of connected devices sampled per round
    clients_per_round: int = 0  # simulated devices: this many online devices sampled per round (0: fraction_train)
    min_train_nodes: int | None = None  # devices sampled at least per round (None: num_nodes - 1, at least 1)
    min_available_nodes: int | None = None  # connected devices a round waits for (None: as above)
    round_timeout: float = 600.0  # seconds the server waits for a round's replies
    threads: int = 0  # onnxruntime threads per device (0: its default)
    resume: bool = False  # continue the run committed in the results folder
    quiet: bool = True  # no progress output while pretraining the base
    signing_key: Path | None = None  # the server's Ed25519 key (None: a key pair made in out_dir/keys)
    canary: float = 0.0  # share of nodes that score a new global model first (0: off)
    canary_tolerance: float = DEFAULT_CANARY_TOLERANCE  # accuracy drop a canary still accepts
    fleet_mix: str = ""  # simulated devices' boards, e.g. devices.DEFAULT_MIX ("": real devices, no device model)
    availability: str = "always"  # simulated devices' availability trace (edge_ft.fleet.devices)
    deadline: float = 0.0  # simulated seconds a round waits for a device (0: none)
    stragglers: str = "drop"  # drop | partial: what a device past the deadline contributes
    link_mbps: float = 10.0  # simulated devices' link speed, megabits per second
    simulation: bool = False  # for Flower's Simulation Engine: the run config names the node configs' folder
    secagg: bool = False  # SecAgg+ (edge_ft.fleet.secagg): the server sees only the weighted sum of the updates
    bundle_cache: Path | None = None  # folder of bundles exported before, by their export inputs (None: export anew)
    dp_noise: float = 0.0  # DP (edge_ft.fleet.dp): noise multiplier of the Gaussian noise on the average
    dp_clip: float = 0.0  # DP: L2 norm each device's update (delta) is clipped to (0: no DP)


def plan_fleet(out_dir: Path, cfg: PlanConfig) -> FleetPlan:
    """Write everything a fleet run needs into out_dir and return the plan (see the module docstring).

    min_train_nodes and min_available_nodes default to num_nodes - 1 (at least 1), so a round completes when one
    device dies. signing_key None makes a key pair for the plan (out_dir/keys); canary > 0 gives every node a
    holdout set.
    """
    from edge_ft.host.train import ensure_base

    out_dir = Path(out_dir).resolve()
    check_aggregation(cfg.aggregation, cfg.method)
    check_canary(cfg.canary, cfg.canary_tolerance)
    check_dp(cfg.dp_noise, cfg.dp_clip)
    if cfg.rounds < 1 or cfg.batch < 1 or cfg.local_steps < 0 or (cfg.local_steps == 0 and cfg.local_epochs < 1):
        raise UserError("rounds and batch must be positive, and local steps (or local epochs) too")
    if cfg.fleet_mix:
        from edge_ft.fleet.devices import parse_availability, parse_mix

        parse_mix(cfg.fleet_mix)
        parse_availability(cfg.availability)
    spec = get_task(cfg.task)
    split = target_split(spec, cfg.shots)
    parts = partition(cfg.partitioning, split.y_train, cfg.num_nodes, cfg.seed, spec.target)
    ensure_dir(out_dir / NODES)
    base, _ = ensure_base(out_dir, cfg.base, None, cfg.quiet)  # a given base is checked; without one, pretrained once
    method = MethodConfig(cfg.method, rank=cfg.rank, num_classes=split.num_classes,
                          freeze_lora_a=cfg.aggregation == "ffa")
    lr = DEFAULT_LR[cfg.method] if cfg.lr is None else cfg.lr
    (out_dir / PLAN).unlink(missing_ok=True)  # uncommitted until the new plan is written
    export = ExportInputs(method, OptimizerConfig("adamw", lr=lr), base, cfg.engine, cfg.seed, list(spec.classes))
    if cfg.bundle_cache is None:
        export.write(out_dir / BUNDLE)
    else:
        from edge_ft.fleet.shared_runs import install_bundle

        install_bundle(export.cached(cfg.bundle_cache), out_dir / BUNDLE)
    save_npz(out_dir / TEST, split.x_test, split.y_test, spec.classes)
    private, public = signing_keys(out_dir, cfg.signing_key)
    with deferred_sync():  # plan.json, written last, commits them: one flush to disk, not four per device
        node_configs = [_write_node(out_dir, cfg, i, idx, split, spec.classes, public) for i, idx in enumerate(parts)]
    run_config = _run_config(out_dir, cfg, lr, private, max(len(idx) for idx in parts))
    atomic_write_text(out_dir / RUN_CONFIG, "".join(toml_line(k, v) + "\n" for k, v in run_config.items()))
    ensure_dir(out_dir / RESULTS)
    atomic_write_json(out_dir / PLAN, {
        "task": spec.name, "engine": cfg.engine, "rank": cfg.rank if cfg.method == "lora" else None,
        "shots": cfg.shots, "partitioning": cfg.partitioning,
        "partitions": [{"examples": len(idx), "labels": label_histogram(split.y_train[idx], split.num_classes)}
                       for idx in parts],
        "test_examples": len(split.y_test), "run_config": run_config, "node_configs": node_configs})
    return FleetPlan(app_dir(), run_config, node_configs, out_dir / RESULTS)


@dataclass(frozen=True)
class ExportInputs:
    """What export_bundle makes a fleet's bundle from: the same inputs give the same bundle, so a plan may install
    one exported before (exporting traces the step graphs with torch: most of a plan's time)."""

    method: MethodConfig  # method, rank, classes, lora_A frozen
    optimizer: OptimizerConfig  # AdamW at the run's learning rate
    base: Path  # the pretrained base (.safetensors)
    engine: str  # the devices' engine
    seed: int  # LoRA's A draw
    classes: list[str]  # class names in the manifest

    def write(self, folder: Path) -> None:
        from edge_ft.host.export import export_bundle

        export_bundle(self.method, self.optimizer, self.base, folder, engine=self.engine, seed=self.seed,
                      classes=self.classes)

    def key(self) -> str:
        """A digest of the inputs, the base file's content and the exporter's source (edge_ft/host)."""
        import hashlib

        from edge_ft.checkpoint import sha256_file

        sources = sorted((Path(__file__).resolve().parents[1] / "host").rglob("*.py"))
        inputs = {"method": self.method.to_dict(), "optimizer": self.optimizer.to_dict(), "engine": self.engine,
                  "seed": self.seed, "classes": self.classes, "base": [self.base.name, sha256_file(self.base)]}
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
        for path in sources:
            digest.update(path.read_bytes())
        return digest.hexdigest()[:20]

    def cached(self, cache: Path) -> Path:
        """The bundle of these inputs in `cache`, exported there first when it is not (a folder appears whole)."""
        folder = Path(cache).resolve() / f"{self.method.method}-{self.key()}"
        if not (folder / MANIFEST).is_file():
            self.write(folder)
        return folder


def _write_node(out_dir: Path, cfg: PlanConfig, i: int, idx: np.ndarray, split, classes,
                public: Path) -> dict[str, ConfigValue]:
    """Device i's data file (and holdout under a canary) and its node config, also as nodes/node-NN.toml."""
    data = out_dir / NODES / f"node-{i:02d}.npz"
    train, holdout = (idx, None) if not cfg.canary else (np.delete(idx, np.s_[::HOLDOUT_EVERY]), idx[::HOLDOUT_EVERY])
    save_npz(data, split.x_train[train], split.y_train[train], classes)
    node: dict[str, ConfigValue] = {
        "partition-id": i, "num-partitions": cfg.num_nodes, "data": str(data), "bundle": str(out_dir / BUNDLE),
        "server-key": str(public), "round-state": str(out_dir / NODES / f"node-{i:02d}.rounds.json")}
    if holdout is not None:
        node["holdout"] = str(out_dir / NODES / f"node-{i:02d}-holdout.npz")
        save_npz(node["holdout"], split.x_train[holdout], split.y_train[holdout], classes)
    if cfg.threads:
        node["threads"] = cfg.threads
    atomic_write_text(out_dir / NODES / f"node-{i:02d}.toml", "".join(toml_line(k, v) + "\n" for k, v in node.items()))
    return node


def _run_config(out_dir: Path, cfg: PlanConfig, lr: float, private: Path,
                largest: int) -> dict[str, ConfigValue]:
    """The run config (server_app.RUN_KEYS, in that order)."""
    quorum = max(1, cfg.num_nodes - 1)
    return {
        "method": cfg.method, "aggregation": cfg.aggregation, "rounds": cfg.rounds, "local-steps": cfg.local_steps,
        "local-epochs": cfg.local_epochs, "batch": cfg.batch, "lr": float(lr), "seed": cfg.seed,
        "partitioning": cfg.partitioning, "num-nodes": cfg.num_nodes, "fraction-train": float(cfg.fraction_train),
        "min-train-nodes": quorum if cfg.min_train_nodes is None else cfg.min_train_nodes,
        "min-available-nodes": quorum if cfg.min_available_nodes is None else cfg.min_available_nodes,
        "round-timeout": float(cfg.round_timeout), "bundle": str(out_dir / BUNDLE),
        "test-data": str(out_dir / TEST), "results-dir": str(out_dir / RESULTS), "resume": cfg.resume,
        "signing-key": str(private), "canary": float(cfg.canary), "canary-tolerance": float(cfg.canary_tolerance),
        "fleet-mix": cfg.fleet_mix, "availability": cfg.availability, "deadline": float(cfg.deadline),
        "stragglers": cfg.stragglers, "link-mbps": float(cfg.link_mbps),
        "sim-nodes": str(out_dir / NODES) if cfg.simulation else "",
        "secagg-max-weight": float(largest) if cfg.secagg else 0.0,  # SecAgg+ weighs by examples: the most any holds
        "dp-noise": float(cfg.dp_noise), "dp-clip": float(cfg.dp_clip),
        "clients-per-round": cfg.clients_per_round,
    }


def signing_keys(out_dir: Path, given: Path | None) -> tuple[Path, Path]:
    """(private, public) key paths of the plan's server: `given` (its public key written beside the plan), or
    out_dir/keys/server.key made once and kept for later plans of the same folder."""
    from edge_ft.trust.keys import load_private_key, public_of

    folder = ensure_dir(out_dir / KEYS)
    public = folder / f"{SERVER_KEY}.pub"
    if given is not None:
        from cryptography.hazmat.primitives import serialization

        key = load_private_key(given).public_key()
        atomic_write_text(public, key.public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode())
        return Path(given).resolve(), public
    private = folder / f"{SERVER_KEY}.key"
    if private.is_file() and public.is_file():
        if public_of(load_private_key(private)).raw != load_public_key(public).raw:
            raise UserError(f"{public}: not the public key of {private}; delete both to make a new pair")
        return private, public
    private.unlink(missing_ok=True)
    public.unlink(missing_ok=True)
    new_key_pair(folder / SERVER_KEY)
    return private, public


def load_plan(out_dir: Path) -> FleetPlan:
    """The plan plan_fleet committed in out_dir."""
    path = Path(out_dir) / PLAN
    try:
        saved = json.loads(path.read_text())
        return FleetPlan(app_dir(), saved["run_config"], saved["node_configs"],
                         Path(saved["run_config"]["results-dir"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: no readable fleet plan ({e}); plan the run again") from None
