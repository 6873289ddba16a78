"""The simulated fleet's part of the fleet report (runs of `edge-ft fleet simulate`, edge_ft.fleet.simulate).

A table per run: devices, the device model, devices sampled / returned / dropped / did not fit over all rounds,
the simulated fleet time (the sum of the rounds' slowest kept device), bytes, final accuracy, and this machine's
wall time and peak memory (RUN/simulation.json); and accuracy against simulated fleet time.
"""

from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path

from edge_ft.bench.report import md_table

PLOT = "fleet_accuracy_vs_sim_time.png"


def is_simulated(rounds: list[dict]) -> bool:
    return "simulated" in rounds[0]


def sim_seconds(rounds: list[dict]) -> list[float]:
    """Cumulative simulated fleet seconds after each round (round 0: 0)."""
    return list(accumulate(r.get("sim_seconds", 0.0) for r in rounds))


def _machine(results: Path) -> dict:
    try:
        return json.loads((Path(results).parent / "simulation.json").read_text())
    except (OSError, ValueError):
        return {}


def sim_row(label: str, rounds: list[dict], results: Path) -> list[str]:
    trained = rounds[1:]
    model = rounds[0]["simulated"]
    total = {k: sum(len(r.get(k, [])) if k != "sampled" else r.get(k, 0) for r in trained)
             for k in ("sampled", "clients", "dropped", "did_not_fit")}
    here = _machine(results)
    return [label, str(rounds[0]["num_nodes"]), rounds[0]["partitioning"], model["fleet_mix"], model["availability"],
            f"{model['deadline']:g} ({model['stragglers']})", f"{total['sampled']:,}", f"{total['clients']:,}",
            f"{total['dropped']:,}", f"{total['did_not_fit']:,}", f"{sim_seconds(rounds)[-1]:.1f}",
            f"{sum(r['bytes_down'] + r['bytes_up'] for r in rounds):,}", f"{rounds[-1]['accuracy']:.3f}",
            f"{here.get('wall_seconds', '–')}", f"{here.get('peak_memory_mb', '–')}"]


def sim_section(runs: list[list[dict]], results: list[Path], labels: list[str], out: Path, plot) -> list[str]:
    """Markdown lines of the simulated runs' table and plot (none when no run was simulated)."""
    picked = [(lab, rs, p) for lab, rs, p in zip(labels, runs, results) if is_simulated(rs)]
    if not picked:
        return []
    plot([rs for _, rs, _ in picked], out / PLOT, sim_seconds, "simulated fleet time, cumulative (s)", False)
    headers = ["run", "devices", "partitioning", "fleet mix", "availability", "deadline s", "sampled", "returned",
               "dropped", "did not fit", "sim. fleet s", "bytes", "final acc.", "wall s here", "peak MiB here"]
    return ["## Simulated fleet (Flower Simulation Engine)", "",
            md_table(headers, [sim_row(*x) for x in picked], text_columns=6), "",
            "sampled / returned / dropped / did not fit: device-rounds over all rounds; sim. fleet s: the sum of "
            "each round's slowest kept device (edge_ft/fleet/devices.py); wall s and peak MiB: this machine "
            "(simulation.json).", "", f"![accuracy vs simulated time]({PLOT})", ""]
