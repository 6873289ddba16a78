r"""Signed global models: the ServerApp signs what each message carries, a ClientApp verifies it before applying.

The signed body (Ed25519 over ROUND_DOMAIN + "\n" + canonical JSON, edge_ft.trust.keys):

  {"domain": "edge-ft-fleet-round-v1", "run": "<fleet run name>", "round": 3, "purpose": "train" | "canary",
   "expires": "...Z", "keyid": "<server key id>", "tensors": "<sha256 of the tensor listing>",
   "config": {the round's training settings}}

The tensor listing is every tensor of every ArrayRecord in the message, sorted by record and tensor name, each with
its dtype, shape and the sha256 of its bytes, so a changed value, name, dtype or shape changes the digest. The
signature and the fields a node cannot recompute travel in the message's ConfigRecord (SIGNED_KEYS).

A node refuses (one line, returned as the reply's Flower error with code REFUSED): an unsigned message, a key it
does not trust, a signature that does not verify, tensors that are not the signed ones, another run's or an
expired message, and a round not newer than the last it trained for that run (a replay or stale update).
Device-side: numpy and cryptography only.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from edge_ft.atomic import atomic_write_json
from edge_ft.trust.keys import PublicKey, canonical, load_private_key, public_of, short, sign_body, verify_body
from edge_ft.trust.signature import TIME_FORMAT, now_utc

ROUND_DOMAIN = "edge-ft-fleet-round-v1"
REFUSED = 4240  # Flower error code of a node's refusal of the server's message (not a failure of the node)
SIGNATURE, KEYID, RUN, ROUND, PURPOSE, EXPIRES, TENSORS, START = (
    "signature", "signer-keyid", "run-name", "signed-round", "purpose", "expires", "tensors-sha256", "server-start")
SIGNED_KEYS = (SIGNATURE, KEYID, RUN, ROUND, PURPOSE, EXPIRES, TENSORS, START)
PURPOSES = ("train", "canary")
LIFETIME = timedelta(days=1)  # a round's signature is good for a day: a stored message cannot be replayed later


class Refused(Exception):
    """A node's one-line refusal of the server's message."""


def tensor_digest(content) -> str:
    """sha256 over (record, tensor, dtype, shape, sha256 of bytes) of every array in a RecordDict, sorted."""
    listing = []
    for record_name, record in sorted(content.array_records.items()):
        for name, array in sorted(record.items()):
            value = np.ascontiguousarray(array.numpy())
            listing.append([record_name, name, value.dtype.str, list(value.shape),
                            hashlib.sha256(value.tobytes()).hexdigest()])
    return hashlib.sha256(canonical(listing)).hexdigest()


def settings_of(config) -> dict:
    """The config entries the signature covers: everything but the signature fields themselves."""
    return {k: v if isinstance(v, (bool, int, float, str, list)) else repr(v)
            for k, v in sorted(config.items()) if k not in SIGNED_KEYS}


def body_of(config, tensors: str) -> dict:
    return {"domain": ROUND_DOMAIN, "run": config[RUN], "round": config[ROUND], "purpose": config[PURPOSE],
            "expires": config[EXPIRES], "keyid": config[KEYID], "tensors": tensors, "start": config[START],
            "config": settings_of(config)}


@dataclass
class RoundSigner:
    """The server's side: its private key and the run's name."""

    private: object  # cryptography's Ed25519PrivateKey
    run: str
    start: int = 0  # when this server process started (ns): a resumed server's retried round is newer than the first

    @property
    def keyid(self) -> str:
        return public_of(self.private).keyid

    def sign(self, content, config_name: str, round_: int, purpose: str = "train") -> None:
        """Add the signature of `content` (its arrays and its ConfigRecord `config_name`) to that ConfigRecord."""
        config = content.config_records[config_name]
        for k in SIGNED_KEYS:
            config.pop(k, None)
        expires = (now_utc() + LIFETIME).strftime(TIME_FORMAT)
        config.update({RUN: self.run, ROUND: int(round_), PURPOSE: purpose, EXPIRES: expires, KEYID: self.keyid,
                       TENSORS: tensor_digest(content), START: int(self.start)})
        config[SIGNATURE] = sign_body(self.private, ROUND_DOMAIN, body_of(config, config[TENSORS]))


def load_signer(key_path: str | Path, run: str) -> RoundSigner:
    return RoundSigner(load_private_key(key_path), run, time.time_ns())


def verify_message(content, config_name: str, key: PublicKey, purpose: str, accepted: dict,
                   now: datetime | None = None) -> dict:
    """The signed body of a server message `key` signed for `purpose`, else Refused in one line.
    `accepted` maps run name -> the last round this node trained for it."""
    config = content.config_records.get(config_name)
    if config is None or SIGNATURE not in config:
        raise Refused(f"unsigned global model; this node accepts only models signed by key {short(key.keyid)}")
    missing = [k for k in SIGNED_KEYS if k not in config]
    if missing:
        raise Refused(f"signed message lacks {missing[0]!r}; refusing it")
    if isinstance(config[ROUND], bool) or not isinstance(config[ROUND], int) or not isinstance(config[RUN], str):
        raise Refused(f"signed message has round {config[ROUND]!r} of run {config[RUN]!r}; refusing it")
    body = body_of(config, config[TENSORS])
    where = f"round {config[ROUND]} of run {config[RUN]}"
    if config[KEYID] != key.keyid:
        raise Refused(f"{where}: signed by key {short(str(config[KEYID]))}, which this node does not trust "
                      f"(trusted: {short(key.keyid)})")
    if not verify_body(key, ROUND_DOMAIN, body, config[SIGNATURE], where):
        raise Refused(f"{where}: the signature of key {short(key.keyid)} does not verify; the round's signed "
                      "fields were altered")
    if tensor_digest(content) != config[TENSORS]:
        raise Refused(f"{where}: the global tensors are not the ones key {short(key.keyid)} signed (sha256 "
                      "differs); refusing a forged update")
    return check_current(body, purpose, accepted, now)


def check_current(body: dict, purpose: str, accepted: dict, now: datetime | None) -> dict:
    where = f"round {body['round']} of run {body['run']}"
    if body["purpose"] != purpose:
        raise Refused(f"{where}: signed for {body['purpose']}, received for {purpose}; refusing it")
    try:
        expires = datetime.strptime(str(body["expires"]), TIME_FORMAT).replace(tzinfo=(now or now_utc()).tzinfo)
    except ValueError:
        raise Refused(f"{where}: unreadable expiry {body['expires']!r}; refusing it") from None
    if (now or now_utc()) > expires:
        raise Refused(f"{where}: expired {body['expires']}; refusing a stale update")
    last = accepted.get(str(body["run"]))
    # The same round from a server started later is a retry (a server resumed after a crash sends the round it was
    # in once more), not a replay: the node accepts it. The same round from the same server start, or older, it
    # refuses.
    first_start = accepted.get(f"{body['run']}{START_SUFFIX}")
    retried = last == int(body["round"]) and first_start is not None and int(body["start"]) > int(first_start)
    if isinstance(last, int) and purpose == "train" and not int(body["round"]) > last and not retried:
        raise Refused(f"{where}: not newer than round {last} already accepted; refusing a replayed or stale "
                      "update")
    if isinstance(last, int) and purpose == "canary" and int(body["round"]) < last:  # a canary scores round r's
        raise Refused(f"{where}: older than round {last} already accepted; refusing a stale canary model")  # result
    return body


START_SUFFIX = "#server-start"  # beside a run's last accepted round: the start of the server that sent it


class AcceptedRounds:
    """The last round a node trained per run: in a JSON file when the node config names one (it survives a
    restarted SuperNode), else in the ClientApp's context state (the run's lifetime)."""

    STATE_KEY = "edge-ft-accepted-rounds"

    def __init__(self, path: Path | None, context_state):
        self.path, self.state = path, context_state

    def load(self) -> dict:
        if self.path is not None:
            try:
                data = json.loads(self.path.read_text()) if self.path.is_file() else {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise Refused(f"{self.path}: unreadable round state ({e}); restore it (deleting it forgets which "
                              "rounds were accepted)") from None
            return data if isinstance(data, dict) else {}
        record = self.state.config_records.get(self.STATE_KEY)
        return dict(record) if record is not None else {}

    def remember(self, run: str, round_: int, start: int) -> None:
        data = {**self.load(), run: int(round_), f"{run}{START_SUFFIX}": int(start)}
        if self.path is not None:
            atomic_write_json(self.path, data)
        else:
            from flwr.app import ConfigRecord

            self.state[self.STATE_KEY] = ConfigRecord(data)
