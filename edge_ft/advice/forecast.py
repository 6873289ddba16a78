"""Predicted runs for a board nobody has measured: what `edge-ft bench` would likely record there, and how far off
such predictions were where measurements exist.

    preds = predict_runs(records, load_profile("rpi-3b"), "mnist→digits", settings, labels, engines)
    rec = choose(preds, profile, task, constraints)   # the same feasibility rule as measured runs
    check(preds, latest_runs(records, "rpi-3b", task))  # predicted / measured, per run

Step time = FLOPs per step / (rate x board speed):
  FLOPs       the cost model's forward + input-gradient + weight-gradient FLOPs at the sweep's batch (a cached label:
              those of the layers after the cached prefix): `measure.step_flops`, the figure every record carries.
  board speed reference cores the board offers: cpu_speed x thread_speedup(threads) (native: this machine's
              cached host speed x threads).
  rate        effective GFLOP/s one reference core achieved for this engine and method label: FLOPs / measured
              seconds / the measured run's own board speed (under a CPU quota total_quota x quota_efficiency x
              host_speed, natively host_speed x threads), the median over the latest runs of the *other* profiles.
              Confined boards take rates from quota-limited runs and native ones from native runs: a throttled
              process gets ~4x fewer FLOP/s per reference core out of these tiny steps (per-step overheads, quota
              gaps), so mixing them would be 4x off. With no such records, DEMO_RATES below.
Peak RSS = the engine's import floor (median RSS after imports of its runs) + its working memory beyond that and the
  model (sessions, allocator arenas, evaluation batch: peak - import - cost-model memory, median per engine and
  label) + the cost model's training memory at the sweep's batch. Without records, the DEMO constants.
Accuracy is not predictable from FLOPs: the accuracy measured for the method on the task (records of any profile,
  same run length first), else the `edge-ft finetune --all` table (20 epochs, mean of 3 seeds), else unknown.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_ft.bench.measure import LABELS, SweepSettings, label_config, step_flops
from edge_ft.bench.records import BenchRecord, step_ms
from edge_ft.config import MethodConfig
from edge_ft.contracts import MB
from edge_ft.costmodel import estimate
from edge_ft.emulation.profiles import DeviceProfile
from edge_ft.reports.format import fmt_ms
from edge_ft.training_defaults import DEFAULTS

OFF_BY = 3.0  # a prediction this many times off the measurement (either way) is flagged as such

# Constants for a results file with nothing to learn from. Source: `make demo` on 2026-11-29 (2-core AMD EPYC VM,
# host speed 0.597; mnist→digits, 3 epochs, batch 32): DEMO_RATES is the median of rpi-zero-2w and rpi-4b-2gb
# (emulated), NATIVE_DEMO_RATES the host's own runs (2 threads), in effective GFLOP/s per reference core.
DEMO_SOURCE = "constant from the README's demo run (rpi-zero-2w, rpi-4b-2gb emulated; 2026-11-29)"
NATIVE_DEMO_SOURCE = "constant from the README's demo run (native on its 2-core host; 2026-11-29)"
DEMO_RATES = {
    ("full", "torch"): 0.70, ("probe", "torch"): 6.22, ("lora", "torch"): 4.20,
    ("full", "ort-training"): 4.91, ("probe", "ort-training"): 5.96, ("probe-cached", "ort-training"): 0.37,
    ("lora", "ort-training"): 4.63, ("full", "ort-step"): 4.79, ("probe", "ort-step"): 5.54,
    ("probe-cached", "ort-step"): 0.44, ("lora", "ort-step"): 4.45,
}
NATIVE_DEMO_RATES = {
    ("full", "torch"): 10.2, ("probe", "torch"): 11.5, ("lora", "torch"): 8.4,
    ("full", "ort-training"): 13.8, ("probe", "ort-training"): 22.3, ("probe-cached", "ort-training"): 1.04,
    ("lora", "ort-training"): 20.3, ("full", "ort-step"): 12.7, ("probe", "ort-step"): 20.1,
    ("probe-cached", "ort-step"): 0.71, ("lora", "ort-step"): 17.9,
}
DEMO_IMPORT_MB = {"torch": 224.7, "ort-training": 51.8, "ort-step": 55.1}  # RSS right after importing the runtime
DEMO_WORKING_MB = {"torch": 120.8, "ort-training": 21.5, "ort-step": 23.6}  # peak - import - model memory, median
DEMO_JOB_SECONDS = {"torch": 2.43, "ort-training": 0.38, "ort-step": 0.44}  # per run beyond its steps, reference core


@dataclass(frozen=True)
class Figure:
    value: float  # the figure
    source: str  # where it comes from, in words a user can check


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _latest_ok(records: list[BenchRecord]) -> list[BenchRecord]:
    """The last finished record per (profile, task, label, engine)."""
    out: dict[tuple[Any, ...], BenchRecord] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("basis") != "predicted":
            out[r["profile"], r["task"], r.get("label", r["method"]), r["engine"]] = r
    return list(out.values())


def _profile_speed(name: str, threads: int | None) -> tuple[float, float] | None:
    from edge_ft.emulation.profiles import load_profile
    from edge_ft.errors import UserError

    try:
        p = load_profile(name)
    except UserError:
        return None
    return p.cpu_speed, p.cpu_speed * p.thread_speedup(threads or p.threads)


def run_speed(r: BenchRecord) -> tuple[float, float] | None:
    """(one thread, all threads) of a measured run in reference cores: what its CPU quota delivered (the record's
    own quota figures, else its profile's stated speed), or this machine's host speed natively."""
    if r.get("timing") == "cpu":  # one thread stood for the board's: its profile's speeds are what it was timed at
        return _profile_speed(r["profile"], None)
    if r.get("time_scaled"):
        host, efficiency = r.get("host_speed"), r.get("quota_efficiency") or 1.0
        if host and r.get("cpu_quota") and r.get("total_quota"):
            return r["cpu_quota"] * efficiency * host, r["total_quota"] * efficiency * host
        return _profile_speed(r["profile"], r.get("threads"))
    host = r.get("host_speed") or (r.get("settings") or {}).get("host_speed")
    return (host, host * (r.get("threads") or 1)) if host else None


def board_speed(profile: DeviceProfile, host_speed: float | None) -> tuple[float, float]:
    """(one thread, all threads) of the target in reference cores."""
    if profile.native:
        one = host_speed or profile.cpu_speed
        return one, one * profile.threads
    return profile.cpu_speed, profile.cpu_speed * profile.thread_speedup(profile.threads)


def _sources(runs: list[BenchRecord]) -> str:
    return ", ".join(dict.fromkeys(r["profile"] for r in runs))


def _figures(groups: dict, constants: dict, fallback: str, what: str) -> dict:
    """key -> the median of its measured values (with the profiles they come from and their range), else the
    documented constant."""
    out = {k: Figure(v, fallback) for k, v in constants.items()}
    for k, items in groups.items():
        values = sorted(v for v, _ in items)
        spread = f", {values[0]:.3g} to {values[-1]:.3g}" if len(values) > 1 else ""
        out[k] = Figure(_median(values), f"{what} on {_sources([r for _, r in items])}{spread}")
    return out


def _others(records: list[BenchRecord], exclude: str) -> list[dict]:
    """The latest finished runs of every profile but `exclude`: a prediction never sees its own measurements."""
    return [r for r in _latest_ok(records) if r["profile"] != exclude]


def rates(records: list[BenchRecord], exclude: str, native: bool) -> dict[tuple[str, str], Figure]:
    """(label, engine) -> effective GFLOP/s per reference core, from the other profiles' latest runs of the same
    kind (quota-limited or native); DEMO constants where none."""
    groups: dict[tuple[str, str], list[tuple[float, dict]]] = {}
    for r in _others(records, exclude):
        speed, ms = run_speed(r), step_ms(r)
        if speed is None or not ms or not r.get("flops_per_step") or bool(r.get("time_scaled")) == native:
            continue
        gflops = r["flops_per_step"] / (ms / 1000) / speed[1] / 1e9
        groups.setdefault((r.get("label", r["method"]), r["engine"]), []).append((gflops, r))
    if native:
        return _figures(groups, NATIVE_DEMO_RATES, NATIVE_DEMO_SOURCE, "native runs")
    return _figures(groups, DEMO_RATES, DEMO_SOURCE, "quota-limited runs")


def memory_figures(records: list[BenchRecord], exclude: str) -> tuple[dict[str, Figure], dict[str, Figure]]:
    """(engine -> import floor MB, engine -> working memory MB beyond import and model) from the other profiles'
    runs."""
    floors: dict[str, list[tuple[float, dict]]] = {}
    working: dict[str, list[tuple[float, dict]]] = {}
    for r in _others(records, exclude):
        imported = r.get("rss_after_imports_bytes")
        if not imported or not r.get("peak_rss_bytes"):
            continue
        model = training_memory(r["method"], _batch(r), r.get("settings") or {})
        floors.setdefault(r["engine"], []).append((imported / MB, r))
        working.setdefault(r["engine"], []).append(((r["peak_rss_bytes"] - imported - model) / MB, r))
    return (_figures(floors, DEMO_IMPORT_MB, DEMO_SOURCE, "runs"),
            _figures(working, DEMO_WORKING_MB, DEMO_SOURCE, "runs"))


def job_seconds(records: list[BenchRecord], exclude: str) -> dict[str, Figure]:
    """engine -> seconds a run takes beyond its training steps (start-up, imports, evaluation, export), on one
    reference core; from the other profiles' wall times, else DEMO constants."""
    groups: dict[str, list[tuple[float, dict]]] = {}
    for r in _others(records, exclude):
        speed, ms = run_speed(r), step_ms(r)
        if speed and ms and r.get("steps") and r.get("wall_seconds"):
            extra = max(0.0, r["wall_seconds"] - r["steps"] * ms / 1000)
            groups.setdefault(r["engine"], []).append((extra * speed[0], r))
    return _figures(groups, DEMO_JOB_SECONDS, DEMO_SOURCE, "wall times of runs")


def _batch(r: BenchRecord) -> int:
    return (r.get("settings") or {}).get("batch") or DEFAULTS[r["method"]].batch


def training_memory(method: str, batch: int, settings: dict, num_classes: int = 10) -> int:
    """Bytes the cost model counts for training: weights, gradients, optimizer state, saved activations."""
    cfg = MethodConfig(method, rank=settings.get("rank") or 2, alpha=settings.get("alpha") or 4.0,
                       last_k=settings.get("last_k") or 2, num_classes=num_classes)
    return estimate(cfg, batch, DEFAULTS[method].optimizer).memory["total"]


def accuracy_figure(records: list[BenchRecord], task: str, label: str, settings: SweepSettings,
                    table: Path | None) -> Figure | None:
    """The accuracy measured for this method on the task: runs of the same length first, then any run, then the
    finetune table; None when nobody measured it."""
    method = LABELS[label][0]
    runs = [r for r in _latest_ok(records) if r["task"] == task and r["method"] == method
            and r.get("accuracy") is not None
            and (method != "lora" or (r.get("settings") or {}).get("rank") == settings.rank)]
    alike = [r for r in runs if all((r.get("settings") or {}).get(k) == getattr(settings, k)
                                    for k in ("epochs", "steps", "batch", "seed"))]
    for group, how in ((alike, "the same settings"), (runs, "other settings")):
        if group:
            epochs = dict.fromkeys(str((r.get("settings") or {}).get("epochs") or "recipe") for r in group)
            return Figure(_median([r["accuracy"] for r in group]),
                          f"measured with {how} (epochs {'/'.join(epochs)}) on {_sources(group)}")
    return table_accuracy(table, task, method, settings.rank)


def table_accuracy(table: Path | None, task: str, method: str, rank: int) -> Figure | None:
    """Mean accuracy of the method in an `edge-ft finetune --all` table.json (None when absent or not there)."""
    if table is None or not table.is_file():
        return None
    try:
        data = json.loads(table.read_text())
        row = next(t for t in data["tasks"] if t["task"] == task)
        want = method if method != "lora" else f"lora-r{rank}"
        entry = next(m for m in row["methods"] if m["label"] == want)
        return Figure(float(entry["mean"]), f"finetune table {table} (torch, {entry['recipe']['epochs']} epochs, "
                                            f"mean of {len(entry['accuracies'])} seeds)")
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


def steps_per_epoch(records: list[BenchRecord], task: str, batch: int) -> int | None:
    """Optimizer steps in one epoch of the task at `batch`: from a run's own count, else from the data."""
    for r in _latest_ok(records):
        if r["task"] == task and r.get("steps") and r.get("epochs") and _batch(r) == batch:
            return math.ceil(r["steps"] / len(r["epochs"]))
    from edge_ft.data.tasks import resolve_split
    from edge_ft.errors import UserError

    try:
        return math.ceil(len(resolve_split(task).y_train) / batch)
    except UserError:
        return None


def predict_runs(records: list[BenchRecord], profile: DeviceProfile, task: str, settings: SweepSettings,
                 labels: list[str], engines: list[str], host_speed: float | None = None,
                 table: Path | None = None) -> list[BenchRecord]:
    """One predicted run (a dict shaped like a record, "basis": "predicted") per label x engine the sweep has."""
    speed = rates(records, profile.name, profile.native)
    floors, working = memory_figures(records, profile.name)
    extra = job_seconds(records, profile.name)
    one, together = board_speed(profile, host_speed)
    out = []
    for label in labels:
        method = LABELS[label][0]
        batch = settings.batch or DEFAULTS[method].batch
        # --steps fixes every ORT run's length (and excludes torch); else it reads the task's data if no run says it
        per_epoch = None if settings.steps and "torch" not in engines else steps_per_epoch(records, task, batch)
        accuracy = accuracy_figure(records, task, label, settings, table)
        for engine in engines:
            if engine == "torch" and LABELS[label][1] or (label, engine) not in speed:
                continue
            flops = step_flops(label_config(label, settings), label, batch)
            ms = flops["total"] / (speed[label, engine].value * 1e9 * together) * 1000
            model = training_memory(method, batch, vars(settings))
            peak = floors[engine].value * MB + working[engine].value * MB + model
            steps = settings.steps if settings.steps and engine != "torch" else (
                None if per_epoch is None else per_epoch * (settings.epochs or DEFAULTS[method].epochs))
            out.append({
                "basis": "predicted", "key": f"predicted:{profile.name}:{label}:{engine}", "task": task,
                "method": method, "label": label, "engine": engine, "profile": profile.name, "status": "ok",
                "budget_mb": profile.budget_mb, "native": profile.native, "time_scaled": not profile.native,
                "fits": profile.native or peak <= profile.budget_bytes, "steps": steps,
                "accuracy": None if accuracy is None else accuracy.value,
                "accuracy_source": "never measured for this method on the task" if accuracy is None
                else accuracy.source,
                "ms_per_step_mean": ms, "ms_per_step_p50": ms, "peak_rss_bytes": peak,
                "flops_per_step": flops["total"], "flops": flops, "board_reference_cores": round(together, 4),
                "gflops_per_reference_core": round(speed[label, engine].value, 3),
                "rate_source": speed[label, engine].source,
                "memory_mb": {"import": round(floors[engine].value, 1), "working": round(working[engine].value, 1),
                              "model": round(model / MB, 2), "import_source": floors[engine].source,
                              "working_source": working[engine].source},
                "job_seconds": None if steps is None else steps * ms / 1000 + extra[engine].value / one,
            })
    return out


def sweep_seconds(preds: list[BenchRecord], profile: DeviceProfile, repeats: int | None, host_speed: float | None,
                  timing: str = "quota") -> float | None:
    """Expected wall seconds of measuring `preds` with `edge-ft bench` (cgroup emulation): every run's predicted
    steps plus its start-up, native runs `repeats` times one after another, runs timed by CPU time too (at this
    machine's speed: the board's time x its share here), quota-limited ones side by side as the sweep runs them
    (edge_ft.bench.sweep.parallel_width, before the throttling correction). None when a run's length is unknown.
    Preparation (pretraining, exports) and a first host-speed calibration come on top."""
    from edge_ft.bench.sweep import MAX_PARALLEL, NATIVE_REPEATS
    from edge_ft.contracts import CPU_TIMED_REPEATS
    from edge_ft.emulation.emulate import usable_cpus

    jobs = [p["job_seconds"] for p in preds]
    if not jobs or any(j is None for j in jobs):
        return None
    if profile.native:
        return sum(jobs) * (repeats or NATIVE_REPEATS)
    share = profile.cpu_speed / (host_speed or 1.0) * profile.thread_speedup(profile.threads)
    if timing == "cpu":
        return sum(jobs) * share * (repeats or CPU_TIMED_REPEATS)
    width = 1 if share >= 0.5 else max(1, min(MAX_PARALLEL, int(0.5 * len(usable_cpus()) / share)))
    return max(max(jobs), sum(jobs) / width)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (the task's size is unknown)"
    return f"~{seconds:.0f} s" if seconds < 120 else f"~{seconds / 60:.0f} min"


def check(preds: list[BenchRecord], measured: list[BenchRecord]) -> list[dict]:
    """Predicted / measured step time and peak RSS for every run both have (status ok)."""
    by_run = {(m.get("label", m["method"]), m["engine"]): m for m in measured if m["status"] == "ok"}
    rows = []
    for p in preds:
        m = by_run.get((p["label"], p["engine"]))
        ms = step_ms(m) if m else None
        if not ms or not m.get("peak_rss_bytes"):
            continue
        ratio = p["ms_per_step_mean"] / ms
        rows.append({"run": f"{p['label']}/{p['engine']}", "predicted_ms": round(p["ms_per_step_mean"], 3),
                     "measured_ms": round(ms, 3), "ms_ratio": round(ratio, 3),
                     "predicted_rss_mb": round(p["peak_rss_bytes"] / MB, 1),
                     "measured_rss_mb": round(m["peak_rss_bytes"] / MB, 1),
                     "rss_ratio": round(p["peak_rss_bytes"] / m["peak_rss_bytes"], 3),
                     "off_by_3x": not 1 / OFF_BY < ratio < OFF_BY})
    return rows


def check_lines(rows: list[dict], profile: str) -> list[str]:
    if not rows:
        return []
    ratios = [r["ms_ratio"] for r in rows]
    lines = [f"  check against the measurements of {profile} (predicted / measured; rates from the other profiles "
             f"only): step time {min(ratios):.2f}x to {max(ratios):.2f}x, median {_median(ratios):.2f}x"]
    for r in rows:
        flag = f"  <- OFF BY {max(r['ms_ratio'], 1 / r['ms_ratio']):.1f}x" if r["off_by_3x"] else ""
        lines.append(f"    {r['run']:<24} {r['predicted_ms']:>9.1f} / {r['measured_ms']:>8.1f} ms = "
                     f"{r['ms_ratio']:.2f}x   peak RSS {r['predicted_rss_mb']:.0f} / {r['measured_rss_mb']:.0f} MB "
                     f"= {r['rss_ratio']:.2f}x{flag}")
    return lines


def explain(rec, profile: DeviceProfile, c, why: str) -> list[str]:
    """The predicted answer, every line tagged: what is chosen, from which figures, and what rules out the rest."""
    from edge_ft.advice.recommend import describe, explain_exclusions, name

    tag = "  [predicted]"
    r = rec.choice
    if r is None:
        lines = [f"{profile.name}: PREDICTED: no method/engine would meet the constraints ({describe(c, profile)}); "
                 f"{why}."]
    else:
        budget = "" if profile.native else f" of the {profile.budget_mb} MB budget"
        mem, fl = r["memory_mb"], r["flops"]
        scaling = profile.thread_speedup(profile.threads)
        threads = "" if profile.native else (f" = cpu_speed {profile.cpu_speed:g} x {scaling:.2f} for "
                                             f"{profile.threads} threads")
        lines = [f"{profile.name}: PREDICTED {name(r)} ({why}).",
                 f"{tag} {fmt_ms(r)} ms/step = {fl['total'] / 1e6:.3g} MFLOP/step (cost model: forward "
                 f"{fl['forward'] / 1e6:.3g} + input gradients {fl['backward_input'] / 1e6:.3g} + weight gradients "
                 f"{fl['backward_weight'] / 1e6:.3g}) / {r['gflops_per_reference_core']:g} GFLOP/s per reference "
                 f"core ({r['rate_source']}) / {r['board_reference_cores']:g} reference cores{threads}",
                 f"{tag} peak RSS {r['peak_rss_bytes'] / MB:.0f} MB{budget} = import {mem['import']:.0f} + "
                 f"runtime working memory {mem['working']:.0f} + training memory {mem['model']:.2f} MB (cost model)",
                 f"{tag} accuracy " + (f"unknown ({r['accuracy_source']}; FLOPs say nothing about accuracy), so "
                                       "the cheapest step wins" if r["accuracy"] is None else
                                       f"{r['accuracy']:.3f} is not a prediction: {r['accuracy_source']} (FLOPs "
                                       "say nothing about accuracy)")]
        if rec.best is not None and rec.best is not r:
            lines.append(f"{tag} most accurate feasible: {name(rec.best)}, {rec.best['accuracy']:.3f}, "
                         f"{fmt_ms(rec.best)} ms/step; within the {c.tolerance:g} tolerance the "
                         "faster run wins")
        others = sorted((o for o in rec.near if o is not r), key=lambda o: o["ms_per_step_mean"])
        if others:
            o = others[0]
            lines.append(f"{tag} runner-up: {name(o)}, {fmt_ms(o)} ms/step "
                         f"({o['ms_per_step_mean'] / r['ms_per_step_mean']:.1f}x the time), peak RSS "
                         f"{o['peak_rss_bytes'] / MB:.0f} MB")
    unknown = [o for o in rec.feasible if o["accuracy"] is None]
    if unknown and rec.best is not None:
        lines.append(f"{tag} not compared (accuracy never measured): " + ", ".join(name(o) for o in unknown))
    lines += [line.replace("  ruled out:", f"{tag} ruled out:", 1) for line in explain_exclusions(rec.excluded)]
    return lines
