"""Secure aggregation for the fleet: Flower's SecAgg+ (SecAggPlusWorkflow on the server, secaggplus_mod on the
device) around edge-ft's own round, so the server learns only the weighted sum of the sampled devices' tensors.

Server: a round's train messages (sampled, signed as usual) are not sent as such; secure_round runs Flower's
SecAggPlusWorkflow over the same nodes: setup (keys), share keys, collect masked vectors (each device gets the
signed global model and config as legacy FitIns, trains, and returns its tensors x its example count, quantised and
masked), unmask (enough devices' shares rebuild the masks of those that dropped after sharing keys). The result is
FedAvg's weighted mean of the surviving devices' updates, up to quantisation (clipping_range / quantization_range
per value and per device, Flower's defaults: 8 / 2^22).
Device: the ClientApp's mod runs secaggplus_mod on SecAgg+ messages only; from_fitins / to_fitres convert between
the legacy FitIns/FitRes the workflow speaks and the fleet's own {"arrays", "config"} / {"arrays", "metrics"}, with
the tensor names in the signed config ("tensor-names"), so the device verifies the server's signature and trains
exactly as without SecAgg.
The server never sees one device's update, so it cannot check one (edge_ft.fleet.updates.check_update): only the
aggregate is checked (names, shapes, finite).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NAMES = "tensor-names"  # config key: the trainable tensors' names, in the order of the legacy Parameters
NUM_SHARES = 3  # SecAgg+: each device's secrets go to this many neighbours (0 < threshold <= shares)
THRESHOLD = 2  # shares that rebuild a secret: the round survives devices dropping after sharing keys as long as
#                every survivor's neighbourhood keeps this many


def is_secagg_message(msg) -> bool:
    from flwr.app import MessageType
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_when_asked(msg, context, call_next):
    """ClientApp mod: SecAgg+ for the messages of its protocol, everything else passes through."""
    if not is_secagg_message(msg):
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


def from_fitins(content):
    """A SecAgg+ train message's legacy FitIns -> the fleet's {"arrays", "config"} RecordDict."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    from flwr.common import bytes_to_ndarray

    config = ConfigRecord(dict(content.config_records["fitins.config"]))
    tensors = [bytes_to_ndarray(a.data) for a in content.array_records["fitins.parameters"].values()]
    names = list(config.get(NAMES, []))
    if len(names) != len(tensors):
        names = [f"tensor-{i}" for i in range(len(tensors))]  # unsigned or foreign: the signature check refuses it
    return RecordDict({"arrays": ArrayRecord({n: Array(t) for n, t in zip(names, tensors)}), "config": config})


def to_fitres(reply_content, names: list[str]):
    """The fleet's reply {"arrays", "metrics"} -> legacy FitRes content (tensors in the signed names' order)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    arrays, metrics = reply_content["arrays"], dict(reply_content["metrics"])
    tensors = [arrays[n].numpy() for n in names]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(tensors), int(metrics["num-examples"]), metrics)
    return fitres_to_recorddict(res, keep_input=True)


@dataclass
class _Proxy:
    node_id: int  # what SecAggPlusWorkflow reads of a legacy ClientProxy


@dataclass
class _Round:
    """The legacy Strategy SecAggPlusWorkflow drives: hands it the round's FitIns, keeps what it aggregates."""

    fitins: dict  # node -> FitIns
    aggregate: list | None = None  # the unmasked weighted mean, legacy tensors in NAMES order
    reports: list = field(default_factory=list)  # (node, num_examples, metrics) of the devices aggregated

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(n), ins) for n, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        self.reports = [(p.node_id, r.num_examples, dict(r.metrics)) for p, r in results]
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return (results[0][1].parameters if results else None), {}


class _Counting:
    """A grid that counts the bytes of every message SecAgg+ sends and receives."""

    def __init__(self, grid):
        self.grid, self.down, self.up, self.messages = grid, 0, 0, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.down += sum(_content_bytes(m.content) for m in messages)
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        self.up += sum(_content_bytes(m.content) for m in replies if not m.has_error())
        self.messages += len(messages) + len(replies)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def _value_bytes(value) -> int:
    """Payload bytes of a config value (Flower's ConfigRecord.count_bytes refuses lists): keys, shares, vectors."""
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, (bytes, str)):
        return len(value.encode() if isinstance(value, str) else value)
    return 8


def _content_bytes(content) -> int:
    arrays = sum(r.count_bytes() for r in [*content.array_records.values(), *content.metric_records.values()])
    return arrays + sum(len(k) + _value_bytes(v) for r in content.config_records.values() for k, v in r.items())


def secure_round(grid, messages, round_: int, names: list[str], max_weight: float, timeout: float | None) -> dict:
    """Run SecAgg+ over the signed train messages of one round; returns {"aggregate": {name: tensor} or None,
    "clients": [{"node", num-examples, metrics...}], "bytes_down", "bytes_up", "messages"}."""
    from flwr.app import ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    fitins = {}
    for m in messages:
        arrays, config = m.content["arrays"], m.content["config"]
        fitins[m.metadata.dst_node_id] = FitIns(ndarrays_to_parameters([arrays[n].numpy() for n in names]),
                                                dict(config))
    strategy = _Round(fitins)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            ServerConfig(num_rounds=1), strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_})
    if fitins:  # the workflow hands the strategy the current global model (ours ignores it: the FitIns carry it)
        context.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
            next(iter(fitins.values())).parameters, keep_input=True)
    counting = _Counting(grid)
    shares = min(NUM_SHARES, len(fitins)) | 1 if len(fitins) > 2 else len(fitins)
    SecAggPlusWorkflow(shares, min(THRESHOLD, shares), max_weight=max_weight, timeout=timeout)(counting, context)
    aggregate = None if strategy.aggregate is None else {
        n: np.asarray(t, dtype=np.float32) for n, t in zip(names, strategy.aggregate)}
    return {"aggregate": aggregate, "clients": [{"node": n, "num-examples": k, **m} for n, k, m in strategy.reports],
            "bytes_down": counting.down, "bytes_up": counting.up, "messages": counting.messages}
