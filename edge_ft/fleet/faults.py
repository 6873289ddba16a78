"""Device faults on purpose, for the tests of how the server counts them: a node config key, never planned.

A node whose config holds FAULT_KEY ("test-fault") misbehaves in its train replies as the value says:
  raise       the ClientApp raises (the runtime answers the server with an error reply)
  nan         the reply carries a tensor with NaN in it
  malformed   the reply lacks one of the tensors the server sent
  hang:S      the ClientApp sleeps S seconds before it replies (past a shorter round timeout: no reply in time)
optionally "@R": only in server round R. plan_fleet never writes the key and no command sets it; a test adds it to a
node's config (for the Simulation Engine: to the plan's nodes/node-NN.toml).
"""

from __future__ import annotations

import time

import numpy as np

FAULT_KEY = "test-fault"  # node config key
KINDS = ("raise", "nan", "malformed", "hang")


class InjectedFault(RuntimeError):
    """What a node configured to raise raises."""


def parse(spec: str) -> tuple[str, float, int | None]:
    """'hang:30@2' -> ("hang", 30.0, 2); 'nan' -> ("nan", 0.0, None)."""
    what, _, when = spec.partition("@")
    kind, _, arg = what.partition(":")
    if kind not in KINDS or (kind == "hang") != bool(arg) or (when and not when.isdigit()):
        raise ValueError(f"{FAULT_KEY} {spec!r}: expected raise, nan, malformed or hang:SECONDS, optionally @ROUND")
    return kind, float(arg or 0.0), int(when) if when else None


def inject(spec: str, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors a device configured with `spec` replies with in `server_round` (raises or sleeps as told)."""
    if not spec:
        return arrays
    kind, seconds, only = parse(spec)
    if only is not None and only != server_round:
        return arrays
    if kind == "raise":
        raise InjectedFault(f"{FAULT_KEY}: raise in round {server_round}")
    if kind == "hang":
        time.sleep(seconds)
        return arrays
    first = sorted(arrays)[0]
    if kind == "malformed":
        return {n: v for n, v in arrays.items() if n != first}
    return {**arrays, first: np.full_like(arrays[first], np.nan)}
