"""The fleet's view of the seed's tradeoff: global accuracy per round and per byte moved, for each method.

    write_fleet_report([Path("runs/fleet/full/results"), ...], Path("runs/fleet/report"))
writes fleet.md (one row per run: final accuracy, bytes per device per round, total bytes, LoRA's product gap)
and two plots: accuracy vs round, accuracy vs cumulative bytes transferred (up + down, all devices).
"""

from __future__ import annotations

from pathlib import Path

from edge_ft.atomic import atomic_write_text
from edge_ft.bench.plots import LABEL_MARKERS, _pyplot, _save
from edge_ft.bench.report import md_table
from edge_ft.fleet.records import read_rounds

PLOTS = {"accuracy_vs_round": "fleet_accuracy_vs_round.png", "accuracy_vs_bytes": "fleet_accuracy_vs_bytes.png"}


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


def write_fleet_report(results: list[Path], out: Path) -> Path:
    runs = [read_rounds(p) for p in results]
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, out / PLOTS["accuracy_vs_round"], lambda rs: [r["round"] for r in rs], "round", log_x=False)
    # Round 0 moves no bytes: plotted from the first trained round so the log axis has a start.
    _plot([rs[1:] for rs in runs if len(rs) > 1], out / PLOTS["accuracy_vs_bytes"],
          lambda rs: [b for b in cumulative_bytes(rs)], "bytes transferred, cumulative (up + down, all devices)",
          log_x=True)
    headers = ["run", "partitioning", "rounds", "start acc.", "final acc.", "best acc.", "bytes up per device-round",
               "total bytes", "LoRA product gap (max)"]
    text = "\n".join([
        "# Fleet report", "",
        md_table(headers, [summary_row(rs) for rs in runs], text_columns=2), "",
        f"![accuracy vs round]({PLOTS['accuracy_vs_round']})", "",
        f"![accuracy vs bytes]({PLOTS['accuracy_vs_bytes']})", "",
        "Sources: " + ", ".join(str(p) for p in results), ""])
    path = out / "fleet.md"
    atomic_write_text(path, text)
    return path
