"""Where a training step's time goes, per operator: onnxruntime's own profiler, summarised.

`edge-ft train --profile-ops` turns on profiling for the ort-step graph's session; the trace onnxruntime writes
(one event per node per run) is reduced here to milliseconds per step by operator type and by node, and the
raw trace is deleted (it grows by ~300 events a step).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from edge_ft.errors import UserError

PROFILE_FILE = "op_profile.json"  # the summary a run folder keeps
TOP_NODES = 15


def summarize(trace: str | Path, runs: int) -> dict[str, Any]:
    """{"runs", "ms_per_step", "by_op": [...], "by_node": [...]} from a trace of `runs` session runs."""
    trace = Path(trace)
    try:
        events = json.loads(trace.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{trace}: onnxruntime's profile is unreadable ({e})") from None
    by_op: Counter[str] = Counter()
    by_node: Counter[tuple[str, str]] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            by_op[op] += event["dur"]
            by_node[(event["name"].removesuffix("_kernel_time"), op)] += event["dur"]
    total = sum(by_op.values()) or 1
    per_step = 1e-3 / max(runs, 1)  # microseconds summed over runs -> milliseconds per step
    return {
        "runs": runs,
        "ms_per_step": round(total * per_step, 4),
        "by_op": [{"op": op, "ms_per_step": round(us * per_step, 4), "share": round(us / total, 4)}
                  for op, us in by_op.most_common()],
        "by_node": [{"node": node, "op": op, "ms_per_step": round(us * per_step, 4), "share": round(us / total, 4)}
                    for (node, op), us in by_node.most_common(TOP_NODES)],
    }


def table(summary: dict[str, Any], rows: int = 10) -> str:
    """The heaviest operator types as aligned text lines."""
    from edge_ft.errors import plural

    lines = [f"operator time per step (onnxruntime profiler, {plural(summary['runs'], 'step')}): "
             f"{summary['ms_per_step']:.2f} ms in kernels"]
    lines += [f"  {r['op']:<16} {r['ms_per_step']:8.3f} ms  {100 * r['share']:5.1f}%" for r in summary["by_op"][:rows]]
    return "\n".join(lines)
