"""The fleet's view of the seed's tradeoff: global accuracy per round and per byte moved, for each method.

    write_fleet_report([Path("runs/fleet/full/results"), ...], Path("runs/fleet/report"))
writes fleet.md (one row per run: final accuracy, bytes per device per round, total bytes, LoRA's product gap)
and two plots: accuracy vs round, accuracy vs cumulative bytes transferred (up + down, all devices). Runs made
through the deployment runtime (RUN/deploy/federation.json beside RUN/results) add a third: per node, the highest
summed PSS of its client stack in each round against its board's memory budget, one panel per run. Simulated
runs (`edge-ft fleet simulate`) add their own table and accuracy vs simulated fleet time (edge_ft.fleet.sim_report).
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_ft.atomic import atomic_write_text
from edge_ft.bench.plots import LABEL_MARKERS, _pyplot, _save
from edge_ft.bench.report import md_table
from edge_ft.emulation.profiles import MB
from edge_ft.fleet.measure import RESULT_FILE
from edge_ft.fleet.records import read_rounds
from edge_ft.fleet.sim_report import sim_section

PLOTS = {"accuracy_vs_round": "fleet_accuracy_vs_round.png", "accuracy_vs_bytes": "fleet_accuracy_vs_bytes.png",
         "memory_per_node": "fleet_memory_per_node.png"}


def run_label(rounds: list[dict]) -> str:
    r = rounds[0]
    return r["method"] + (f" ({r['aggregation']})" if r["method"] == "lora" else "")


def cumulative_bytes(rounds: list[dict]) -> list[int]:
    total, out = 0, []
    for r in rounds:
        total += r["bytes_down"] + r["bytes_up"]
        out.append(total)
    return out


def summary_row(rounds: list[dict]) -> list[str]:
    trained = [r for r in rounds if r["clients"]]
    per_device = trained[0]["clients"][0]["bytes-up"] if trained else 0
    gaps = [r["lora_product_gap"] for r in trained if r.get("lora_product_gap") is not None]
    return [run_label(rounds), rounds[0]["partitioning"], str(rounds[-1]["round"]), f"{rounds[0]['accuracy']:.3f}",
            f"{rounds[-1]['accuracy']:.3f}", f"{max(r['accuracy'] for r in rounds):.3f}", f"{per_device:,}",
            f"{cumulative_bytes(rounds)[-1]:,}", f"{max(gaps):.3f}" if gaps else "–"]


def _plot(runs: list[list[dict]], path: Path, x_of, xlabel: str, log_x: bool) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for rounds in runs:
        ax.plot(x_of(rounds), [r["accuracy"] for r in rounds], marker=LABEL_MARKERS.get(rounds[0]["method"], "o"),
                markersize=4, label=run_label(rounds))
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("global accuracy (held-out test set)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def read_federation(results: Path) -> dict | None:
    """The deployment's measurements of a run (RUN/deploy/federation.json), or None for an in-process run."""
    path = Path(results).parent / "deploy" / RESULT_FILE
    try:
        fed = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    nodes = [n for n in fed.get("nodes", []) if n.get("pss_by_round")]
    return {**fed, "nodes": nodes} if nodes else None


def memory_plot(panels: list[tuple[str, dict]], path: Path) -> list[str]:
    """Per node, the highest summed PSS of its client stack per round against its board's budget (dashed), one
    panel per (run label, federation.json). Returns the legend's labels: what the figure names."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.6, 3.8), sharey=True, squeeze=False)
    profiles = sorted({n["profile"] for _, fed in panels for n in fed["nodes"]})
    colours = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(profiles)}
    styles = ("-", "--", "-.", ":")
    for ax, (label, fed) in zip(axes[0], panels):
        seen: dict[str, int] = {}
        for n in fed["nodes"]:
            rounds = sorted((int(r), v / MB) for r, v in n["pss_by_round"].items())
            k = seen[n["profile"]] = seen.get(n["profile"], -1) + 1
            ax.plot([r for r, _ in rounds], [v for _, v in rounds], color=colours[n["profile"]], marker=".",
                    ls=styles[k % len(styles)], alpha=0.85, label=f"{n['name']} ({n['profile']})")
        for profile in dict.fromkeys(n["profile"] for n in fed["nodes"]):
            budget = next(n["budget_bytes"] for n in fed["nodes"] if n["profile"] == profile) / MB
            ax.axhline(budget, color=colours[profile], lw=2, ls=(0, (6, 3)), alpha=0.6,
                       label=f"{profile} budget ({budget:.0f} MiB)")
        ax.set_yscale("log")  # budgets from 320 MiB to GBs: a log axis keeps the nodes' lines apart
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("client stack PSS, highest sum in round (MiB)")
    legend = {}  # label -> handle, every panel's nodes and budgets once
    for ax in axes[0]:
        legend.update((lab, h) for h, lab in zip(*ax.get_legend_handles_labels()) if lab not in legend)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(0.8, 0.5), fontsize=8)
    _save(fig, path)
    return list(legend)


def write_fleet_report(results: list[Path], out: Path) -> Path:
    runs = [read_rounds(p) for p in results]
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, out / PLOTS["accuracy_vs_round"], lambda rs: [r["round"] for r in rs], "round", log_x=False)
    # Round 0 moves no bytes: plotted from the first trained round so the log axis has a start.
    _plot([rs[1:] for rs in runs if len(rs) > 1], out / PLOTS["accuracy_vs_bytes"],
          lambda rs: [b for b in cumulative_bytes(rs)], "bytes transferred, cumulative (up + down, all devices)",
          log_x=True)
    deployed = [(run_label(rs), fed) for rs, p in zip(runs, results) if (fed := read_federation(p)) is not None]
    memory = []
    if deployed:
        memory_plot(deployed, out / PLOTS["memory_per_node"])
        rows = [[label, n["name"], n["profile"], f"{n['budget_bytes'] / MB:.0f}",
                 f"{max(n['pss_by_round'].values()) / MB:.0f}",
                 "yes" if max(n["pss_by_round"].values()) <= n["budget_bytes"] else "no"]
                for label, fed in deployed for n in fed["nodes"]]
        memory = ["## Client memory per node (deployment runtime)", "",
                  md_table(["run", "node", "profile", "budget MiB", "highest round PSS MiB", "within budget"],
                           rows, text_columns=3), "", f"![client memory per node]({PLOTS['memory_per_node']})", ""]
    simulated = sim_section(runs, results, [run_label(rs) for rs in runs], out, _plot)
    headers = ["run", "partitioning", "rounds", "start acc.", "final acc.", "best acc.", "bytes up per device-round",
               "total bytes", "LoRA product gap (max)"]
    text = "\n".join([
        "# Fleet report", "",
        md_table(headers, [summary_row(rs) for rs in runs], text_columns=2), "",
        f"![accuracy vs round]({PLOTS['accuracy_vs_round']})", "",
        f"![accuracy vs bytes]({PLOTS['accuracy_vs_bytes']})", "", *memory, *simulated,
        "Sources: " + ", ".join(str(p) for p in results), ""])
    path = out / "fleet.md"
    atomic_write_text(path, text)
    return path
