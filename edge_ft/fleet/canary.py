"""Canary rounds: a round's new global model goes first to a fraction of the nodes.

Those nodes score it and the current global model on their holdout sets; the rest of the fleet gets it (in the
next round's train messages) only when
the canary nodes' example-weighted accuracy holds within a tolerance of the current model's. Otherwise the round's
update is rejected and the current global model is kept. Every decision goes into the round record:

  {"nodes": [...], "scored": [{"node", "accuracy", "previous-accuracy", "num-examples"}], "refused": [{"node",
   "reason"}], "accuracy", "previous_accuracy", "tolerance", "decision": "promoted" | "rejected", "why"}
"""

from __future__ import annotations

import math
import random
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from edge_ft.errors import UserError
from edge_ft.fleet.signing import REFUSED, RoundSigner
from edge_ft.fleet.updates import ARRAYS, CANDIDATE_KEYS, CONFIG, METRICS, PREVIOUS, WEIGHT_KEY


def check_canary(fraction: float, tolerance: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"canary {fraction}: give the share of nodes that see a new model first, from 0 (off) "
                        "up to but below 1")
    if not 0.0 <= tolerance <= 1.0:
        raise UserError(f"canary tolerance {tolerance}: give an accuracy drop between 0 and 1")


def canary_nodes(node_ids: list[int], fraction: float, seed: int, round_: int) -> list[int]:
    """ceil(fraction · N) nodes (at least one), a different seeded draw every round."""
    ids = sorted(node_ids)
    k = min(len(ids), max(1, math.ceil(fraction * len(ids))))
    return sorted(random.Random(seed * 100_003 + round_).sample(ids, k))


def _scores(reply: Message) -> dict | None:
    m: dict[str, Any] = dict(reply.content[METRICS]) if METRICS in reply.content.metric_records else {}
    keys = [*CANDIDATE_KEYS, WEIGHT_KEY]
    ok = all(isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool) and math.isfinite(m[k])
             for k in keys) and m[WEIGHT_KEY] > 0 and all(0 <= m[k] <= 1 for k in CANDIDATE_KEYS)
    return {k: m[k] for k in keys} if ok else None


def decide(scored: list[dict], tolerance: float) -> dict:
    """Promote when the candidate's weighted holdout accuracy is at least the current model's minus `tolerance`."""
    if not scored:
        return {"accuracy": None, "previous_accuracy": None, "decision": "rejected",
                "why": "no canary node scored the candidate"}
    total = sum(s[WEIGHT_KEY] for s in scored)
    acc, prev = (sum(s[k] * s[WEIGHT_KEY] for s in scored) / total for k in CANDIDATE_KEYS)
    holds = acc >= prev - tolerance
    why = (f"canary accuracy {acc:.4f} {'holds' if holds else 'fell'} against {prev:.4f} "
           f"(tolerance {tolerance})")
    return {"accuracy": acc, "previous_accuracy": prev, "decision": "promoted" if holds else "rejected", "why": why}


def run_canary(grid: Grid, signer: RoundSigner, candidate: ArrayRecord, previous: ArrayRecord, round_: int,
               nodes: list[int], tolerance: float, timeout: float | None) -> dict:
    """Send the signed candidate and current model to `nodes`, collect their holdout scores, decide."""
    content = RecordDict({ARRAYS: candidate, PREVIOUS: previous, CONFIG: ConfigRecord({"server-round": round_})})
    signer.sign(content, CONFIG, round_, "canary")
    messages = [Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE) for node in nodes]
    scored, refused = [], []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        scores = None if reply.has_error() else _scores(reply)
        if scores is None:
            why = reply.error.reason if reply.has_error() else "no valid holdout scores"
            code = reply.error.code if reply.has_error() else None
            refused.append({"node": node, "reason": why, "refused": code == REFUSED})
            continue
        scored.append({"node": node, **scores})
    return {"nodes": nodes, "scored": scored, "refused": refused, "tolerance": tolerance,
            **decide(scored, tolerance)}
