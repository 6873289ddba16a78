"""What travels in the fleet's messages, and the server's check of every client update before it is averaged.

A train message from the server holds RecordDict {"arrays": ArrayRecord of the global trainable tensors,
"config": ConfigRecord of CONFIG_KEYS}. A device replies with {"arrays": ArrayRecord of exactly those tensors after
local training, "metrics": MetricRecord of METRIC_KEYS}. Anything else in a reply (other keys, shapes, dtypes, NaN
or Inf, missing or impossible metrics) is rejected with a reason and never averaged in.
"""

from __future__ import annotations

import math

import numpy as np

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"  # record names inside a message's RecordDict
PREVIOUS = "previous"  # a canary message's second ArrayRecord: the global model the candidate would replace
CANDIDATE_KEYS = {"accuracy": ARRAYS, "previous-accuracy": PREVIOUS}  # canary reply metric -> array record scored
WEIGHT_KEY = "num-examples"  # FedAvg's weighted_by_key: examples the device trained on this round
CONFIG_KEYS = ("server-round", "lr", "local-steps", "local-epochs", "batch", "seed")
METRIC_KEYS = (WEIGHT_KEY, "steps", "loss", "local-accuracy", "ms-per-step", "peak-rss-mb", "bytes-down",
               "bytes-up")


def to_arrays(tensors: dict[str, np.ndarray]):
    """dict of numpy tensors -> ArrayRecord (each tensor float32, C order)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(np.ascontiguousarray(v, dtype=np.float32)) for name, v in tensors.items()})


def from_arrays(record) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def check_update(content, expected: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(tensors, None) for a reply content that may be averaged, else (None, why not) in one line."""
    arrays, metrics = dict(content.array_records), dict(content.metric_records)
    if set(arrays) != {ARRAYS} or set(metrics) != {METRICS} or content.config_records:
        return None, (f"records {sorted([*arrays, *metrics, *content.config_records])}, expected exactly "
                      f"{ARRAYS!r} (arrays) and {METRICS!r} (metrics)")
    keys = set(arrays[ARRAYS])
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        return None, (f"tensor {missing[0]!r} missing" if missing else f"unexpected tensor {extra[0]!r}")
    tensors = {}
    for name, array in arrays[ARRAYS].items():
        try:
            value = array.numpy()
        except (ValueError, TypeError, OSError, EOFError) as e:  # not an .npy payload
            return None, f"tensor {name!r} does not deserialise ({type(e).__name__})"
        if value.dtype != np.float32:
            return None, f"tensor {name!r} is {value.dtype}, expected float32"
        if tuple(value.shape) != tuple(expected[name]):
            return None, f"tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(expected[name])}"
        if not np.isfinite(value).all():
            return None, f"tensor {name!r} contains NaN or Inf"
        tensors[name] = value
    m = metrics[METRICS]
    if set(m) != set(METRIC_KEYS):
        return None, f"metrics {sorted(m)}, expected {sorted(METRIC_KEYS)}"
    if not all(isinstance(m[k], (int, float)) and not isinstance(m[k], bool) and math.isfinite(m[k])
               for k in METRIC_KEYS):
        return None, "metrics must be finite numbers"
    if not (isinstance(m[WEIGHT_KEY], int) and m[WEIGHT_KEY] > 0):
        return None, f"{WEIGHT_KEY} must be a positive integer, got {m[WEIGHT_KEY]!r}"
    return tensors, None
