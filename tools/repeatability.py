"""Summarise repeated bench runs of the same cells: per profile and method, each run's ms/step, the median and the
largest departure from it, with CPU-seconds and throttled seconds beside the times.

    python tools/repeatability.py docs/steady/before-alone-*.jsonl
prints one Markdown table (the docs site's results page, docs/hooks/results.py, builds the same tables from them).
Files are `edge-ft bench --results` files; every record of a task run counts, in file order. The last column divides
each run's ms/step by its CPU-seconds: when it stays put while ms/step moves, the quota delivered alike and what moved
was the CPU cost of the same work.

    python tools/repeatability.py --check docs/steady/check-train-lora-*.json
prints the table of `edge-ft profile check --workload train --json` outputs, the runs of every file pooled per
profile and method (files measured in turn, so a slow minute touches every file's runs alike).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

ORDER = {"rpi-zero-2w": 0, "rpi-3b": 1, "rpi-4b-2gb": 2, "rpi-5-4gb": 3}


def cells(paths: list[str]) -> dict[tuple[str, str], list[dict]]:
    runs = defaultdict(list)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r.get("status") == "ok" and r.get("kind", "task") == "task":
                    runs[(r["profile"], r["label"])].append(r)
    return runs


def departure(values: list[float]) -> float:
    """The largest |value / median - 1|: how far the furthest run strayed."""
    mid = statistics.median(values)
    return max(abs(v / mid - 1) for v in values)


def row(profile: str, label: str, runs: list[dict]) -> str:
    ms = [r["ms_per_step_mean"] for r in runs]
    mid, spread = statistics.median(ms), departure(ms)
    cpu = "/".join(f"{r['cpu_seconds']:.1f}" for r in runs)
    held = "/".join("-" if r.get("throttled_seconds") is None else f"{r['throttled_seconds']:.1f}" for r in runs)
    # ms/step per CPU-second of the run: steady when the quota delivers alike and only the work's cost moved
    per_cpu_spread = departure([v / r["cpu_seconds"] for v, r in zip(ms, runs)])
    # the board time the steps' CPU time stands for (edge_ft.device.board_time; records before it have none)
    board = [r.get("board_ms_per_step") for r in runs]
    board_cell = "-"
    if all(v is not None for v in board):
        board_cell = f"{' / '.join(f'{v:.1f}' for v in board)} (±{100 * departure(board):.0f}%)"
    return (f"| {profile} | {label} | {' / '.join(f'{v:.1f}' for v in ms)} | {mid:.1f} | ±{100 * spread:.0f}% | "
            f"{cpu} | {held} | ±{100 * per_cpu_spread:.0f}% | {board_cell} |")


BOARD_ORDER = ("rpi-zero-2w", "rpi-3b", "rpi-4b-2gb")  # each at least as fast as the one before


def inversions(runs: dict) -> list[str]:
    """Per method: how many (slower board run, faster board run) pairs have the faster board slower, by the step
    time the report, recommend and gates read (step_ms: the board time where a record has one)."""
    from edge_ft.bench.records import step_ms

    lines = []
    for label in sorted({k[1] for k in runs}):
        parts = []
        for slow, fast in zip(BOARD_ORDER, BOARD_ORDER[1:]):
            a, b = runs.get((slow, label)), runs.get((fast, label))
            if a and b:
                bad = sum((step_ms(y) or 0) > (step_ms(x) or 0) for x in a for y in b)
                parts.append(f"{fast} slower than {slow} in {bad} of {len(a) * len(b)} run pairs")
        if parts:
            lines.append(f"{label}: " + "; ".join(parts))
    return lines


def check_table(paths: list[str]) -> list[str]:
    """The `profile check --workload train` table (Markdown lines) over several --json outputs, runs pooled per
    cell."""
    from dataclasses import fields

    from edge_ft.emulation.check_train import TRAIN_HEADER, TrainCheck, train_table

    pooled: dict[tuple[str, str], TrainCheck] = {}
    names = [f.name for f in fields(TrainCheck)]
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for c in json.load(f)["checks"]:
                check = TrainCheck(**{k: c[k] for k in names if k in c})  # older files: no CPU per step
                old = pooled.setdefault((check.profile, check.method), check)
                if old is not check:
                    old.one_ms += check.one_ms
                    old.many_ms += check.many_ms
                    old.free_ms, old.expected_ms = min(old.free_ms, check.free_ms), min(old.expected_ms,
                                                                                        check.expected_ms)
    checks = sorted(pooled.values(), key=lambda c: (ORDER.get(c.profile, 9), c.profile, c.method))
    return (["| " + " | ".join(TRAIN_HEADER) + " |", "|" + "---|" * len(TRAIN_HEADER)]
            + ["| " + " | ".join(cells) + " |" for cells in train_table(checks)])


def main(paths: list[str]) -> int:
    if paths[:1] == ["--check"]:
        print("\n".join(check_table(paths[1:])))
        return 0
    print("| profile | method | ms/step per run | median | largest departure | CPU s per run | throttled s per run "
          "| departure of ms/step per CPU-s | board ms/step from CPU time |")
    print("|---|---|---|---:|---:|---|---|---:|---|")
    runs = cells(paths)
    for (profile, label) in sorted(runs, key=lambda k: (ORDER.get(k[0], 9), k[0], k[1])):
        print(row(profile, label, runs[(profile, label)]))
    print()
    for line in inversions(runs):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
