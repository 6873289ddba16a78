"""Why a sampled device's update was not averaged into a round: one reason per device, counted in the round record.

The round record keeps each such device with its one-line reason in its list (rejected, refused, no_reply, dropped,
did_not_fit); "drop_reasons" counts them by kind (REASONS), so a round of a thousand devices reads at a glance.
"""

from __future__ import annotations

import re
from typing import Any

# kind -> what it means
REASONS = {
    "raised": "the ClientApp failed: the runtime sent an error reply",
    "no-reply": "no reply within the round timeout (the device hung, died or is too slow)",
    "non-finite": "the update holds NaN or Inf",
    "malformed": "the update's records, tensors, shapes, dtypes or metrics are not the fleet's",
    "refused": "the device refused the server's message (signature, run or round)",
    "deadline": "the simulated device could not make the round's deadline",
    "did-not-fit": "the method does not fit the simulated board's memory",
}
ERROR_REPLY = "error reply: "  # how a rejected error reply's reason starts
REASON_CHARS = 240  # an error reply's reason is cut to this many characters
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_reason(reason: str) -> str:
    """An error reply's reason (a runtime's traceback, maybe in colour) as one line: its last, where the exception
    is named."""
    lines = [line.strip() for line in _ANSI.sub("", reason).splitlines() if line.strip()]
    return ERROR_REPLY + (lines[-1] if lines else "no reason given")[:REASON_CHARS]


def rejection_kind(why: str) -> str:
    """The kind of a rejected reply from its reason (edge_ft.fleet.updates.check_update or an error reply)."""
    if why.startswith(ERROR_REPLY):
        return "raised"
    return "non-finite" if "NaN or Inf" in why or "must be finite" in why else "malformed"


def drop_counts(info: dict[str, Any]) -> dict[str, int]:
    """{kind: devices} for one round's record (kinds with none left out)."""
    counts = dict.fromkeys(REASONS, 0)
    for item in info.get("rejected", []):
        counts[rejection_kind(item["reason"])] += 1
    counts["no-reply"] += len(info.get("no_reply", []))
    counts["refused"] += len(info.get("refused", []))
    counts["deadline"] += len(info.get("dropped", []))
    counts["did-not-fit"] += len(info.get("did_not_fit", []))
    return {k: v for k, v in counts.items() if v}
