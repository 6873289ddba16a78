"""The report's per-model part: where each method stops fitting (records of `edge-ft bench --models`).

    parts = models_section(records, out)   # markdown lines; writes peak_rss_vs_batch.png into out

Per model one table (a row per board and method: parameters, trainable, FLOPs per step, peak RSS and ms/step at the
timed batch, the largest batch that fits) and one figure: peak RSS against batch per method, measured at every
batch the search probed, with each board's budget as a line.
"""

from __future__ import annotations

from pathlib import Path

from edge_ft.bench.prepare import MODEL_LABELS, MODEL_NAMES
from edge_ft.bench.records import BenchRecord, step_ms
from edge_ft.bench.tradeoff import fitting_text, label
from edge_ft.contracts import MB
from edge_ft.reports.format import fmt_ms, mb, md_table, short_result
from edge_ft.reports.plots import pyplot, save_figure

FIGURE = "peak_rss_vs_batch.png"
METHOD_COLOURS = {"full": "#d62728", "last-k": "#ff7f0e", "bias": "#9467bd", "lora": "#1f77b4", "probe": "#2ca02c"}


def _models(records: list[BenchRecord]) -> list[str]:
    present = {r["model"] for r in records}
    return [m for m in MODEL_NAMES if m in present]


def _ordered(records: list[BenchRecord]) -> list[BenchRecord]:
    return sorted(records, key=lambda r: (r["profile"], list(MODEL_LABELS).index(label(r))))


# How a timed run got the board's time, by TradeoffSettings.timing (edge_ft.emulation.emulate).
TIMED = {"quota": "memory cap, cores, CPU quota; ms/step is the mean under the quota",
         "cpu": "memory cap and cores, one thread; ms/step is the board time of the median step's CPU time"}


def mflops(flops: float) -> str:
    """MFLOPs with one decimal, or three for a step below one MFLOP (a cached head's)."""
    return f"{flops / 1e6:,.1f}" if flops >= 1e6 else f"{flops / 1e6:.3f}"


def model_table(records: list[BenchRecord]) -> str:
    rows = []
    for r in _ordered(records):
        rows.append([r["profile"], label(r), f"{r['total_params']:,}", f"{r['trainable_params']:,}",
                     mflops(r["flops_per_step"]), str(r["batch"]), mb(r["peak_rss_bytes"]), fmt_ms(r),
                     short_result(r), fitting_text(r), f"{r['budget_mb']}"])
    return md_table(["board", "method", "params", "trainable", "MFLOPs/step", "batch", "peak RSS MB", "ms/step",
                     "result", "largest fitting batch", "budget MB"], rows, text_columns=2)


def models_section(records: list[BenchRecord], out: Path | None) -> list[str]:
    """Markdown lines of the per-model part; draws its figure into `out` (None: the caller draws it)."""
    first = records[0]
    s = first["settings"]
    parts = ["## Per model: where each method stops fitting", "",
             f"The ort-step engine's AdamW training step (standard onnxruntime, no torch) on {first['inputs']}; "
             "weights are each network's seeded initialisation (memory and time do not depend on their values). "
             f"Peak RSS and ms/step at batch {s['batch']}: {s['steps']} timed steps after {s['warmup']} warm-up "
             f"steps, each run a child process confined to its board ({TIMED[s.get('timing', 'quota')]}). "
             "Largest fitting batch: doubling from that batch, then bisection to within "
             f"1/8, up to {s['max_batch']}; each probe one warm-up and one timed step under the board's memory cap, "
             "cores and threads at this machine's speed; a batch fits when the probe finishes within the budget "
             f"(an OOM kill at the cap does not). LoRA: rank {s['rank']} on the linear layers (the classifier of "
             f"the reference models); last-k: the last {s['last_k']} conv/linear layers. A -cached label trains its "
             f"method's head on the features of {s.get('cache_examples', 5000)} examples, computed first and kept as "
             "`edge-ft train --cache` keeps them (its peak RSS includes them). FLOPs per step from the cost model at "
             "the timed batch.", ""]
    for model in _models(records):
        rows = [r for r in records if r["model"] == model]
        shape = "x".join(map(str, rows[0]["input_shape"]))
        parts += [f"### {rows[0]['model_title']} ({model}, input {shape}, {rows[0]['num_classes']} classes)", "",
                  model_table(rows), ""]
    if out is not None:
        peak_rss_vs_batch(records, out / FIGURE)
    parts += [f"![{FIGURE}]({FIGURE})", "", "Peak RSS against batch size, one line per method, from every batch "
              "the search probed (filled: fits, cross: did not fit; an OOM kill shows the RSS it was killed at, the "
              "cap plus the shared library pages the cgroup charged elsewhere); the dashed line is the board's "
              "budget.", ""]
    return parts


def peak_rss_vs_batch(records: list[BenchRecord], path: Path) -> Path:
    """One panel per (model, board): peak RSS (MB) against batch (log 2), a line per method, the budget dashed."""
    plt = pyplot()
    panels = [(m, p) for m in _models(records) for p in dict.fromkeys(r["profile"] for r in records)
              if any(r["model"] == m and r["profile"] == p for r in records)]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (model, profile) in zip(axes.flat, panels):
        runs = [r for r in records if r["model"] == model and r["profile"] == profile]
        for r in _ordered(runs):
            points = sorted({p["batch"]: p for p in r.get("search") or []}.values(), key=lambda p: p["batch"])
            points = [p for p in points if p["peak_rss_bytes"]]
            if not points:
                continue
            colour = METHOD_COLOURS[r["method"]]  # a cached label: its method's colour, dashed
            ax.plot([p["batch"] for p in points], [p["peak_rss_bytes"] / MB for p in points],
                    "--" if r.get("cache_features") else "-", color=colour, label=label(r), linewidth=1.2)
            for p in points:
                ax.plot(p["batch"], p["peak_rss_bytes"] / MB, "o" if p["fits"] else "x", color=colour,
                        markersize=4 if p["fits"] else 6)
        ax.axhline(runs[0]["budget_mb"], color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} on {profile}", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("peak RSS (MB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def cached_table(records: list[BenchRecord]) -> str:
    """Each method measured both ways on one board and model: its step and memory uncached and on the cache."""
    by = {(r["profile"], r["model"], label(r)): r for r in records}
    rows = []
    for (profile, model, name), cached in by.items():
        plain = by.get((profile, model, MODEL_LABELS[name][0])) if cached.get("cache_features") else None
        if plain is None:
            continue
        a, b = step_ms(plain), step_ms(cached)
        cache = cached.get("feature_cache") or {}
        rows.append([profile, model, plain["method"], fmt_ms(plain), fmt_ms(cached),
                     f"{a / b:.1f}x" if a and b else "-", mb(plain["peak_rss_bytes"]), mb(cached["peak_rss_bytes"]),
                     f"{cache['bytes'] / MB:.1f}" if cache else "-", fitting_text(plain), fitting_text(cached)])
    return md_table(["board", "model", "method", "ms/step", "cached ms/step", "speed-up", "peak RSS MB",
                     "cached peak RSS MB", "cache MB", "largest batch", "cached largest batch"], rows, text_columns=3)


def models_page(records: list[BenchRecord], source: str, machine: dict[str, object]) -> str:
    """The per-model results page (docs/hooks/results.py): how it was measured, then the tables."""
    first = records[0]
    versions = ", ".join(f"{k} {v}" for k, v in sorted((first.get("versions") or {}).items()) if k != "interpreter")
    dates = sorted(r["started"][:10] for r in records if r.get("started"))
    parts = ["# Results: per model, cached and uncached", "",
             f"Generated by `docs/hooks/results.py` from `{source}` (`{machine.get('command')}`) when the site is "
             "built; what the columns mean is on [Bench, report, recommend](../bench.md).", "",
             f"- **machine**: {machine.get('cpus')} CPUs ({machine.get('processor')}); {machine.get('notes', '')}",
             f"- **date**: {dates[0] if dates else '?'}" + (f" to {dates[-1]}" if dates[-1:] != dates[:1] else ""),
             f"- **versions** (the device interpreter): {versions}", "",
             "## Each method on the cached prefix against the same method uncached", "", cached_table(records), "",
             "Speed-up: uncached ms/step over cached. The cached step is the head's alone; building the cache is a "
             "one-off pass over the examples (the records' `feature_cache`). Peak RSS of a cached run includes the "
             "cache.", ""]
    return "\n".join(parts + models_section(records, None))
