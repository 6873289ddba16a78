"""`edge-ft report`: the sweep's JSONL as report.md with tables, plots, the performance goals and a recommendation.

    text = write_report(read_records("runs/bench/results.jsonl"), Path("runs/bench/report"))

The goals are the project's targets for the engines; the report states each measured ratio and whether it is met:
  speed      on `host`, each ORT engine's ms/step <= 0.5x the torch engine's, for every method (p50: robust to
             other processes on a shared machine)
  memory     a device process's peak RSS while training <= 1.15x its RSS right after importing its runtime
  caching    probing on cached features: each epoch after the first <= 10% of a LoRA epoch (same engine, profile)
  zero-2w    rpi-zero-2w runs full, probe and LoRA on the ORT engines (finishes within its 320 MB budget)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_ft.advice.recommend import Constraints, recommend
from edge_ft.atomic import atomic_write_text
from edge_ft.bench.measure import LABELS
from edge_ft.bench.records import BenchRecord, latest
from edge_ft.contracts import BUNDLE_ENGINES, ENGINES
from edge_ft.reports.format import mb, md_table, short_result
from edge_ft.reports.tradeoff_report import models_section

SPEED_GOAL, MEMORY_GOAL, CACHE_GOAL = 0.5, 1.15, 0.10
# cached label -> (label its epoch is held against, the largest ratio that meets the goal)
CACHE_GOALS = {"probe-cached": (("lora", CACHE_GOAL),), "lora-cached": (("lora", 0.2), ("probe-cached", 1.5)),
               "last-k-cached": (("probe-cached", 1.5),)}
SMALL_BOARD = "rpi-zero-2w"
ORT = BUNDLE_ENGINES
BASE_METHODS = ("full", "probe", "lora")


@dataclass
class Goal:
    name: str  # what is compared
    measured: str  # the figures
    met: bool | None  # None: not measured

    @property
    def mark(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def _find(records: list[BenchRecord], profile: str, label: str, engine: str) -> dict | None:
    for r in reversed(records):
        if (r["profile"], r["label"], r["engine"]) == (profile, label, engine) and r["status"] == "ok":
            return r
    return None


def speed_goals(records: list[BenchRecord]) -> list[Goal]:
    goals = []
    for label in BASE_METHODS:
        torch = _find(records, "host", label, "torch")
        for engine in ORT:
            ort = _find(records, "host", label, engine)
            if not (torch and ort and torch["ms_per_step_p50"] and ort["ms_per_step_p50"]):
                continue
            ratio = ort["ms_per_step_p50"] / torch["ms_per_step_p50"]
            goals.append(Goal(f"host {label}: {engine} vs torch ms/step (p50)",
                              f"{ort['ms_per_step_p50']:.2f} / {torch['ms_per_step_p50']:.2f} ms = {ratio:.2f}x "
                              f"(means {ort['ms_per_step_mean']:.2f} / {torch['ms_per_step_mean'] or 0:.2f} ms)",
                              ratio <= SPEED_GOAL))
    return goals


def memory_goals(records: list[BenchRecord]) -> list[Goal]:
    """One row per profile and ORT engine: the range of peak / after-import RSS over its methods."""
    groups: dict[tuple[str, str], list[tuple[float, dict]]] = {}
    for r in records:
        if r["engine"] in ORT and r["status"] == "ok" and r.get("rss_after_imports_bytes"):
            ratio = r["train_peak_rss_bytes"] / r["rss_after_imports_bytes"]
            groups.setdefault((r["profile"], r["engine"]), []).append((ratio, r))
    goals = []
    for (profile, engine), items in groups.items():
        items.sort(key=lambda item: item[0])
        (low, best), (high, worst) = items[0], items[-1]
        goals.append(Goal(f"{profile} {engine}: peak / after-import RSS while training",
                          f"{low:.2f}x ({best['label']}: {mb(best['train_peak_rss_bytes'])} / "
                          f"{mb(best['rss_after_imports_bytes'])} MB) to {high:.2f}x ({worst['label']}: "
                          f"{mb(worst['train_peak_rss_bytes'])} / {mb(worst['rss_after_imports_bytes'])} MB)",
                          high <= MEMORY_GOAL))
    return goals


def cache_goals(records: list[BenchRecord]) -> list[Goal]:
    """Per board and engine: a cached run's epoch against the uncached run of its method (cached probe: against
    LoRA, the method it stands in for), and a cached LoRA or last-k epoch against a cached probe's."""
    goals = []
    for r in records:
        if r["label"] not in CACHE_GOALS or r["status"] != "ok" or r.get("epoch_seconds_later") is None:
            continue
        for other, most in CACHE_GOALS[r["label"]]:
            base = _find(records, r["profile"], other, r["engine"])
            if not base or not base.get("epoch_seconds_later"):
                continue
            ratio = r["epoch_seconds_later"] / base["epoch_seconds_later"]
            goals.append(Goal(f"{r['profile']} {r['engine']}: {r['label']} epoch / {other} epoch",
                              f"{r['epoch_seconds_later'] * 1000:.0f} / {base['epoch_seconds_later'] * 1000:.0f} ms "
                              f"= {ratio:.3f}x (one-off feature pass {r['feature_cache_seconds'] or 0:.2f} s)",
                              ratio <= most))
    return goals


def small_board_goals(records: list[BenchRecord]) -> list[Goal]:
    goals = []
    for engine in ORT:
        runs = {r["label"]: r for r in records if r["profile"] == SMALL_BOARD and r["engine"] == engine}
        if not runs:
            continue
        fit = [m for m in BASE_METHODS if runs.get(m, {}).get("fits")]
        missing = [f"{m}: {runs[m]['verdict']}" if m in runs else f"{m}: not measured"
                   for m in BASE_METHODS if m not in fit]
        installs = all(r.get("installable_on_device") for r in runs.values())
        note = "" if installs else " (emulated only: the onnxruntime-training wheel does not exist for aarch64)"
        goals.append(Goal(f"{SMALL_BOARD} {engine}: full, probe, LoRA fit", f"fit: {', '.join(fit) or 'none'}"
                          + (f"; {'; '.join(missing)}" if missing else "") + note,
                          len(fit) == len(BASE_METHODS) and installs))
    return goals


def all_goals(records: list[BenchRecord]) -> dict[str, list[Goal]]:
    return {"speed": speed_goals(records), "memory": memory_goals(records), "caching": cache_goals(records),
            "small board": small_board_goals(records)}


# ------------------------------------------------------------------------------------------------ markdown


def _n(v, fmt: str = ",") -> str:
    return "-" if v is None else format(v, fmt)


def results_table(rows: list[BenchRecord]) -> str:
    headers = ["method", "engine", "result", "accuracy", "ms/step p50", "mean", "p95", "s/epoch", "time to acc. s",
               "peak RSS MB", "RSS after import MB", "MFLOPs/step", "trainable", "payload B", "bundle B",
               "merged B"]
    out = []
    for r in rows:
        out.append([r["label"], r["engine"] + ("" if r.get("installable_on_device", True) else " (no wheel)"),
                    short_result(r), _n(r.get("accuracy"), ".3f"),
                    _n(r.get("ms_per_step_p50"), ".2f"), _n(r.get("ms_per_step_mean"), ".2f"),
                    _n(r.get("ms_per_step_p95"), ".1f"), _n(r.get("epoch_seconds_later"), ".3f"),
                    _n(r.get("time_to_accuracy_s"), ".2f"), mb(r["peak_rss_bytes"]),
                    mb(r.get("rss_after_imports_bytes")), f"{r['flops_per_step'] / 1e6:.2f}",
                    _n(r["trainable_params"]), _n(r.get("payload_bytes")), _n(r.get("bundle_bytes")),
                    _n(r.get("merged_model_bytes"))])
    table = md_table(headers, out, text_columns=3)
    failures = [f"- {r['label']} / {r['engine']}: {r['verdict']}" for r in rows if not r.get("fits")]
    return table + ("\n\n" + "\n".join(failures) if failures else "")


def write_report(records: list[BenchRecord], out: Path, source: str = "results.jsonl",
                 model_records: list[BenchRecord] = ()) -> Path:
    """report.md and its PNGs in `out` from task-sweep records and per-model records (`bench --models`, kind
    "tradeoff"); either list may be empty. Returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    parts = task_parts(list(latest(records).values()), out, source) if records else [
        "# edge-ft benchmark: per model", "", f"{len(latest(model_records))} runs from `{source}`.", ""]
    if model_records:
        parts += ["", *models_section(list(latest(model_records).values()), out)]
    text = "\n".join(parts).rstrip() + "\n"
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def task_parts(records: list[BenchRecord], out: Path, source: str) -> list[str]:
    """The task sweep's markdown lines (its figures written into `out`)."""
    from edge_ft.emulation.profiles import load_profile
    from edge_ft.reports import plots

    figures = plots.write_all(records, out)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    parts = [f"# edge-ft benchmark: {', '.join(tasks)}", "",
             f"{len(records)} runs from `{source}`. Every run is a child process confined to its device profile "
             "(memory cap, cores, per-core CPU quota via cgroups; `host` runs natively). Step times are p50 on "
             "native runs; under a CPU quota, the board time the steps' CPU time stands for (the quota's slices make "
             "per-step percentiles uneven, and wall time moves with how the host delivers the quota; runs recorded "
             "before it: the mean wall time); peak RSS is the training process's own (sampled every 20 ms, plus its "
             "ru_maxrss). s/epoch is "
             "the mean over epochs after the first; RSS after import is the ORT trainer's right after importing "
             "onnxruntime, the torch engine's after importing torch and loading the data.", "",
             "## Settings", "", settings_text(records), "", "## Results"]
    for profile in dict.fromkeys(r["profile"] for r in records):
        rows = sorted((r for r in records if r["profile"] == profile),  # file order is completion order
                      key=lambda r: (list(LABELS).index(r["label"]), ENGINES.index(r["engine"])))
        first = rows[0]
        scale = f", CPU quota {first['cpu_quota']:.3g} of a core per thread" if first.get("cpu_quota") else ""
        budget = "no limit" if first.get("native") else f"budget {first['budget_mb']} MB"
        parts += ["", f"### {profile} ({first['arch']}, {budget}, {first['threads']} threads, "
                      f"{first['emulation']}{scale})", "", results_table(rows)]
        notes = sorted({n for r in rows for n in r.get("notes", [])})
        parts += [""] + [f"- note: {n}" for n in notes] if notes else []
    parts += ["", "## Goals", "", goals_text(all_goals(records)), "", GOALS_NOTE]
    parts += ["", "## Plots", ""] + [f"![{name}]({name})\n\n{CAPTIONS[name]}\n" for name in figures]
    parts += ["## Recommendation", ""]
    for profile in dict.fromkeys(r["profile"] for r in records):
        try:
            device = load_profile(profile)
        except Exception:  # a profile file that is gone since: the records still say enough for the table
            continue
        for task in tasks:
            rec = recommend(records, device, task, Constraints())
            parts += ["```", *rec.lines, "```", ""]
    return parts


GOALS_NOTE = ("Speed compares p50 step times on `host`; the torch engine's 2-thread OpenMP pool waits for any "
              "thread another process has descheduled, so on a shared machine its p50 can be several times its "
              "idle figure while the ORT engines barely move: read the speed rows together with the means. "
              "The memory ratio uses the trainer's own samples while training (engine sessions, optimizer state, "
              "the evaluation batch) against its RSS right after importing onnxruntime.")

CAPTIONS = {
    "accuracy_vs_payload.png": "Held-out accuracy against the bytes a device sends back after training (filled: "
    "ORT engines, hollow: torch; the engines replay the same batches, so their points coincide or differ only by "
    "rounding).",
    "peak_rss.png": "Peak RSS of the training process per method and engine; the dashed line is the profile's "
    "memory budget, hatched bars did not fit.",
    "step_time.png": "Time per training step (log scale). Under a CPU quota the board time is shown (see above).",
    "epoch_time.png": "Seconds per epoch after the first: cached-feature probing trains only fc3 on features "
    "computed once.",
    "flops_vs_time.png": "Analytical FLOPs per step (cost model) against measured step time; a slope well below 1 "
    "means a fixed per-step overhead, not arithmetic, sets the time at LeNet-5's size.",
}


def host_speed_text(records: list[BenchRecord]) -> str:
    """The host speed every quota was scaled by, where it came from, and the throttling correction applied."""
    r = records[0]
    source = r.get("host_speed_source", "not recorded")
    when = f", measured {r['host_speed_measured']}" if r.get("host_speed_measured") else ""
    text = f"host speed {r['settings']['host_speed']:g} of the reference core ({source}{when})"
    effs = sorted({x["quota_efficiency"] for x in records if x.get("quota_efficiency")})
    if effs:
        span = f"{effs[0]:.2f}" if len(effs) == 1 else f"{effs[0]:.2f}-{effs[-1]:.2f}"
        text += f"; CPU quotas raised by 1 / the measured throttling efficiency ({span})"
    return text


def settings_text(records: list[BenchRecord]) -> str:
    s = records[0]["settings"]
    length = f"{s['steps']} steps" if s.get("steps") else (f"{s['epochs']} epochs" if s.get("epochs")
                                                          else "each method's recipe epochs")
    versions = {}
    for r in records:
        versions.setdefault(r["engine"], r.get("versions", {}))
    lines = [f"- training: {length}, batch {s.get('batch') or 'recipe'}, seed {s['seed']}, LoRA r={s['rank']} "
             f"alpha={s['alpha']:g}; base sha256 {records[0]['base_sha256'][:12]}; time-to-accuracy target "
             f"{s['target_accuracy']:g}",
             f"- {host_speed_text(records)}; native runs: the lowest-p50 of "
             f"{max((len(r.get('repeats_ms_per_step_p50') or [0]) for r in records if r.get('native')), default=1)} "
             "repetitions (training is deterministic, only the timing differs); runs under a CPU quota: one"]
    for engine, v in versions.items():
        runtime = ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("interpreter",))
        lines.append(f"- {engine}: {runtime} ({v.get('interpreter', '?')})")
    return "\n".join(lines)


def goals_text(goals: dict[str, list[Goal]]) -> str:
    rows = [[kind, g.name, g.measured, g.mark] for kind, items in goals.items() for g in items]
    if not rows:
        return "No goal could be evaluated from these runs."
    summary = []
    for kind, items in goals.items():
        if items:
            met = sum(g.met is True for g in items)
            summary.append(f"- {kind}: {met} of {len(items)} met")
    return "\n".join(summary) + "\n\n" + md_table(["goal", "compared", "measured", "status"], rows, text_columns=4)
