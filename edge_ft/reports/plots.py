"""The report's figures (matplotlib, Agg backend), each a PNG written atomically; every function returns its path.

  accuracy_vs_payload  held-out accuracy against the bytes a device ships back (log x)
  peak_rss             peak RSS per method and engine, one panel per profile, the profile's budget as a line
  step_time            ms per training step per method and engine, one panel per profile (log y)
  epoch_time           seconds per epoch after the first, one panel per profile (cached probing vs the rest)
  flops_vs_time        analytical FLOPs per step against measured ms per step: how well FLOPs predict time
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from edge_ft.atomic import atomic_write_bytes
from edge_ft.bench.measure import LABELS
from edge_ft.bench.records import BenchRecord, step_ms
from edge_ft.contracts import ENGINES, MB
from edge_ft.reports.format import SHORT_STATUS

ENGINE_COLOURS = {"torch": "#d62728", "ort-training": "#1f77b4", "ort-step": "#2ca02c"}
LABEL_MARKERS = {"full": "o", "probe": "s", "probe-cached": "D", "lora": "^", "lora-cached": "v",
                 "last-k-cached": "P"}
DPI = 110


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """The figure as a PNG at `path`, written atomically; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _labels(records: list[BenchRecord]) -> list[str]:
    present = {r["label"] for r in records}
    return [x for x in LABELS if x in present]


def _engines(records: list[BenchRecord]) -> list[str]:
    present = {r["engine"] for r in records}
    return [e for e in ENGINES if e in present]


def _profiles(records: list[BenchRecord]) -> list[str]:
    return list(dict.fromkeys(r["profile"] for r in records))


def accuracy_vs_payload(records: list[BenchRecord], path: Path) -> Path:
    """One point per method and engine (every profile trains the same numbers, so the first finished run counts)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    seen = set()
    for r in records:
        if r.get("accuracy") is None or not r.get("payload_bytes") or (r["label"], r["engine"]) in seen:
            continue
        seen.add((r["label"], r["engine"]))
        ax.scatter(r["payload_bytes"], r["accuracy"], s=90 if r["engine"] == "torch" else 45,
                   marker=LABEL_MARKERS[r["label"]], facecolors="none" if r["engine"] == "torch" else
                   ENGINE_COLOURS[r["engine"]], edgecolors=ENGINE_COLOURS[r["engine"]], linewidths=1.5, zorder=3)
    # One text per spot: engines train the same numbers, probe and probe-cached ship the same head. A method
    # found at two spots (engines that round differently) names its engines there.
    spots: list[list] = []  # [payload, accuracy, {label: [engines]}]
    for r in records:
        if r.get("accuracy") is None or not r.get("payload_bytes"):
            continue
        spot = next((sp for sp in spots if abs(sp[1] - r["accuracy"]) < 5e-4
                     and max(sp[0], r["payload_bytes"]) / min(sp[0], r["payload_bytes"]) < 1.15), None)
        if spot is None:
            spots.append(spot := [r["payload_bytes"], r["accuracy"], {}])
        engines = spot[2].setdefault(r["label"], [])
        if r["engine"] not in engines:
            engines.append(r["engine"])
    split = {label for label in _labels(records) if sum(label in sp[2] for sp in spots) > 1}
    for x, y, names in spots:
        text = " / ".join(f"{label} ({', '.join(e)})" if label in split else label for label, e in names.items())
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(9, 6), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("shipped payload (adapter / head / weights file), bytes, log scale")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Accuracy vs what the device sends back")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.25, y=0.15)
    _legend(ax, _labels(records), _engines(records))
    return save_figure(fig, path)


def _legend(ax, labels: list[str], engines: list[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker=LABEL_MARKERS[x], ls="", color="grey", label=x) for x in labels]
    handles += [Line2D([], [], marker="o", ls="", color=ENGINE_COLOURS[e],
                       markerfacecolor="none" if e == "torch" else ENGINE_COLOURS[e], label=e) for e in engines]
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)


def _grouped_bars(records: list[BenchRecord], path: Path, value, ylabel: str, title: str, log: bool,
                  budget_line: bool = False) -> Path:
    """One panel per profile; x = method, one bar per engine; value(record) -> float or None (not measured)."""
    plt = pyplot()
    profiles, labels, engines = _profiles(records), _labels(records), _engines(records)
    fig, axes = plt.subplots(1, len(profiles), figsize=(max(5.0, 4.6 * len(profiles)), 4.4), squeeze=False)
    width = 0.8 / max(len(engines), 1)
    for ax, profile in zip(axes[0], profiles):
        rows = {(r["label"], r["engine"]): r for r in records if r["profile"] == profile}
        top = 0.0
        for i, engine in enumerate(engines):
            for j, label in enumerate(labels):
                r = rows.get((label, engine))
                x = j + (i - (len(engines) - 1) / 2) * width
                v = value(r) if r else None
                if v is None:
                    if r is not None:  # measured, but no figure: say why instead of a silent gap
                        ax.text(x, 0.02, _short_status(r), rotation=90, ha="center", va="bottom", fontsize=7,
                                transform=ax.get_xaxis_transform(), color=ENGINE_COLOURS[engine])
                    continue
                fits = r.get("fits", True)
                ax.bar(x, v, width, color=ENGINE_COLOURS[engine], alpha=1.0 if fits else 0.45,
                       hatch=None if fits else "//", edgecolor="black" if not fits else ENGINE_COLOURS[engine])
                top = max(top, v)
                if not fits:  # inside the bar, so it never collides with titles or the budget line
                    ax.text(x, 0.5, _short_status(r), rotation=90, ha="center", va="center", fontsize=7,
                            transform=ax.get_xaxis_transform(), bbox=dict(fc="white", ec="none", alpha=0.8, pad=1))
        sample = next(iter(rows.values()))
        if budget_line and not sample.get("native"):
            ax.axhline(sample["budget_mb"], color="black", ls="--", lw=1)
            ax.text(-0.45, sample["budget_mb"], f"budget {sample['budget_mb']} MB", ha="left", va="bottom",
                    fontsize=8, bbox=dict(fc="white", ec="none", alpha=0.8, pad=1))
            top = max(top, sample["budget_mb"])
        elif budget_line:
            ax.text(0.02, 0.97, "native: no memory budget", transform=ax.transAxes, ha="left", va="top", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=9)
        ax.set_title(f"{profile} ({sample['emulation']}{', time-scaled' if sample.get('time_scaled') else ''})",
                     fontsize=10)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, top * 1.25 if top else 1)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _engine_legend(fig, engines)
    return save_figure(fig, path)


def _engine_legend(fig, engines: list[str]) -> None:
    """Below the panels, in one row: it never covers a bar."""
    from matplotlib.patches import Patch

    handles = [Patch(color=ENGINE_COLOURS[e], label=e) for e in engines]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="does not fit"))
    fig.legend(handles=handles, fontsize=9, loc="lower center", ncol=len(handles), frameon=False)


def _short_status(r: BenchRecord) -> str:
    return SHORT_STATUS.get(r["status"], "over budget")


def peak_rss(records: list[BenchRecord], path: Path) -> Path:
    return _grouped_bars(records, path, lambda r: r["peak_rss_bytes"] / MB if r["peak_rss_bytes"] else None,
                         "peak RSS of the training process, MB", "Peak memory per method and engine (dashed: the "
                         "profile's memory budget; hatched: does not fit)", log=False, budget_line=True)


def step_time(records: list[BenchRecord], path: Path) -> Path:
    return _grouped_bars(records, path, lambda r: step_ms(r) if r["status"] == "ok" else None,
                         "ms per training step (log)", "Time per training step (p50 natively, board time under a "
                         "CPU quota)", log=True)


def epoch_time(records: list[BenchRecord], path: Path) -> Path:
    return _grouped_bars(records, path, lambda r: r.get("epoch_seconds_later") if r["status"] == "ok" else None,
                         "seconds per epoch after the first (log)", "Time per epoch (-cached: the layers after the "
                         "frozen prefix, on features computed once)", log=True)


def flops_vs_time(records: list[BenchRecord], path: Path) -> Path:
    """Log-log scatter; the legend gives each engine x profile's slope and correlation in log space."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    profiles = _profiles(records)
    markers = ["o", "^", "s", "D", "v", "P"]
    for pi, profile in enumerate(profiles):
        for engine in _engines(records):
            pts = [(r["flops_per_step"], step_ms(r)) for r in records if r["profile"] == profile
                   and r["engine"] == engine and r["status"] == "ok" and step_ms(r)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            fit = _loglog_fit(xs, ys)
            label = f"{engine} @ {profile}" + (f" (slope {fit[0]:.2f}, r={fit[1]:.2f})" if fit else "")
            ax.scatter(xs, ys, marker=markers[pi % len(markers)], color=ENGINE_COLOURS[engine], s=45, label=label,
                       alpha=0.85)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _method_ticks(ax, records)
    ax.set_xlabel("analytical FLOPs per training step (cost model), log scale")
    ax.set_ylabel("measured ms per step, log scale")
    ax.set_title("Do FLOPs predict step time? (slope 1 = time proportional to FLOPs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
    return save_figure(fig, path)


def _method_ticks(ax, records: list[BenchRecord]) -> None:
    """Name the methods along the bottom at their FLOPs (probe and LoRA, 5% apart, share one text)."""
    spots: list[tuple[float, list[str]]] = []
    for label in _labels(records):
        x = next(r["flops_per_step"] for r in records if r["label"] == label)
        near = next((s for s in spots if abs(s[0] - x) / s[0] < 0.15), None)
        if near:
            near[1].append(label)
        else:
            spots.append((x, [label]))
    for x, names in spots:
        ax.text(x, 0.02, " / ".join(names), transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=8, color="dimgrey")
    xs = [x for x, _ in spots]
    ax.set_xlim(min(xs) / 3, max(xs) * 3)  # room for the centred method names at both ends


def _loglog_fit(xs, ys) -> tuple[float, float] | None:
    """(slope, Pearson r) of log10(y) on log10(x); None with fewer than 3 distinct x."""
    if len(set(xs)) < 3:
        return None
    lx, ly = [math.log10(x) for x in xs], [math.log10(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    syy = sum((b - my) ** 2 for b in ly)
    sxy = sum((a - mx) * (b - my) for a, b in zip(lx, ly))
    return sxy / sxx, (sxy / math.sqrt(sxx * syy) if syy else 0.0)


FIGURES = {"accuracy_vs_payload.png": accuracy_vs_payload, "peak_rss.png": peak_rss, "step_time.png": step_time,
           "epoch_time.png": epoch_time, "flops_vs_time.png": flops_vs_time}


def write_all(records: list[BenchRecord], out: Path) -> dict[str, Path]:
    return {name: fn(records, out / name) for name, fn in FIGURES.items()}
