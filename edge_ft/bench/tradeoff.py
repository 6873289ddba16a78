"""Where each method stops fitting: per model, board and method, the ort-step AdamW step's peak RSS and time, and
the largest batch that still fits the board's memory budget (`edge-ft bench --models`).

    jobs = plan_models(["ds-cnn"], ["full", "probe"], [load_profile("rpi-zero-2w")], TradeoffSettings())
    records = run_models(jobs, Path("runs/bench/results.jsonl"), SweepOptions())

Every figure comes from `python -m edge_ft.device.step_probe` (numpy + onnxruntime, the device interpreter) on
synthetic inputs of the model's real shape, each run a child process confined to the board:
  timed run  the board's emulation (memory cap, cores; timing cpu: one unthrottled thread, the board time of its
             median step's CPU time, as the sweep's, the fastest of CPU_TIMED_REPEATS runs; timing quota: the
             board's threads under the CPU quota, the mean ms/step): `steps` timed steps after `warmup`, at `batch`
             -> ms/step and peak RSS
  search     the largest batch that fits: doubling from `batch`, then bisection until the gap is at most 1/8 of
             the fitting batch (or one example), each probe 1 warm-up + 1 step under the board's memory cap,
             cores and threads but this machine's speed (memory does not depend on speed; under the quota one
             probe of a large batch takes minutes). A probe fits when it finishes and its peak RSS is within the
             budget; an OOM kill at the cap is "does not fit". The search stops at `max_batch`.
A cached label (lora-cached, ...) first builds the feature cache of `cache_examples` examples, as `edge-ft train
--cache` would, and trains its method's head on it: its peak RSS includes the cache, its steps are the head's.
One record per (model, board, label), of kind "tradeoff" (edge_ft.bench.records), in the sweep's results file.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import cast

from edge_ft.bench.measure import board_clock_fields, cpu_fields, verdict_fields
from edge_ft.bench.prepare import MODEL_LABELS, MODEL_NAMES, Prepared, installable, prepare_in_child
from edge_ft.bench.records import (
    SCHEMA,
    TRADEOFF,
    BenchRecord,
    SearchStep,
    append_record,
    host_fields,
    latest,
    read_records,
    run_key,
)
from edge_ft.contracts import CPU_TIMED_REPEATS, MB, ORT_STEP
from edge_ft.emulation import lifetime
from edge_ft.emulation.emulate import run_confined, threads_to_run
from edge_ft.emulation.profiles import DeviceProfile
from edge_ft.errors import UserError
from edge_ft.interpreters import find_device_python

ENGINE = ORT_STEP  # the engine every board installs
SEARCH_STEPS = 1  # timed steps per search probe, after one warm-up step (the first step allocates the buffers)


@dataclass(frozen=True)
class TradeoffSettings:
    batch: int = 32  # examples per step of the timed run; the batch search starts here
    steps: int = 5  # timed steps of the timed run
    warmup: int = 2  # untimed steps before them
    max_batch: int = 1024  # the batch search tests no larger batch
    rank: int = 2  # LoRA rank (LoRA on the model's linear layers: the classifier of the reference models)
    alpha: float = 4.0  # LoRA alpha
    last_k: int = 2  # last-k: conv/linear layers trained, counted back from the output
    host_speed: float = 1.0  # this machine's core vs the reference core (scales the CPU quota)
    timing: str = "quota"  # how the timed run gets the board's time (contracts.TIMINGS; edge_ft.emulation.emulate)
    cache_examples: int = 5000  # a cached label's feature cache: the training examples it stands for (MNIST 5k)

    def identity(self) -> dict:
        """What makes two runs comparable; timing only when it is not the quota, so older runs keep their keys, and
        the cache's size only in a cached label's key (ModelJob.key)."""
        return {k: v for k, v in asdict(self).items()
                if (k != "timing" or v != "quota") and k != "cache_examples"}


@dataclass(frozen=True)
class ModelJob:
    model: str  # lenet5 | resnet8 | ds-cnn | mobilenet-v1-0.25
    label: str  # a key of MODEL_LABELS: full | last-k | bias | lora | probe, or one of them -cached
    profile: DeviceProfile
    settings: TradeoffSettings
    base_sha256: str = ""  # the seeded initialisation the bundle was exported from

    @property
    def method(self) -> str:
        return MODEL_LABELS[self.label][0]

    @property
    def cached(self) -> bool:
        return MODEL_LABELS[self.label][1]

    @property
    def key(self) -> str:
        from edge_ft.bench.measure import profile_identity

        cache = {"cache_examples": self.settings.cache_examples} if self.cached else {}
        return run_key({"kind": TRADEOFF, "model": self.model, "method": self.label, "engine": ENGINE,
                        "profile": profile_identity(self.profile), "settings": self.settings.identity(),
                        "base": self.base_sha256, **cache})

    def run_dir(self, root: Path) -> Path:
        return root / "runs" / "models" / self.profile.name / self.model / self.label


def plan_models(models: list[str], methods: list[str], profiles: list[DeviceProfile],
                settings: TradeoffSettings) -> list[ModelJob]:
    bad = [m for m in models if m not in MODEL_NAMES]
    if bad:
        raise UserError(f"unknown model {bad[0]!r}: choose from {', '.join(MODEL_NAMES)}")
    bad = [m for m in methods if m not in MODEL_LABELS]
    if bad:
        raise UserError(f"method {bad[0]!r} is not measured per model: choose from {', '.join(MODEL_LABELS)}")
    if settings.max_batch < settings.batch:
        raise UserError(f"--max-batch {settings.max_batch} is below --batch {settings.batch}")
    return [ModelJob(m, method, p, settings) for p in profiles for m in models for method in methods]


def search_max_batch(fits: Callable[[int], bool], start: int, max_batch: int, known: bool | None = None
                     ) -> tuple[int, int | None]:
    """(largest batch that fits, smallest that does not; None when max_batch fits), probing as few batches as
    doubling then bisection allows; `known` is start's answer when already measured. 0 fits nothing."""
    lo, hi = 0, None
    if (fits(start) if known is None else known):
        lo, b = start, start
        while hi is None and lo < max_batch:
            b = min(2 * lo, max_batch)
            if fits(b):
                lo = b
            else:
                hi = b
    else:
        hi, b = start, start
        while lo == 0 and b > 1:
            b //= 2
            if fits(b):
                lo = b
            else:
                hi = b
    while hi is not None and hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def probe_argv(prep: Prepared, job: ModelJob, bundle: Path, batch: int, steps: int, warmup: int, threads: int,
               out: Path) -> list[str]:
    cache = ["--cache", str(job.settings.cache_examples), "--budget-mb", str(job.profile.budget_mb)]
    return [prep.device_python, "-m", "edge_ft.device.step_probe", str(bundle), "--batch", str(batch),
            "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads), "--out", str(out),
            *(cache if job.cached else [])]


def run_probe(job: ModelJob, prep: Prepared, bundle: Path, batch: int, steps: int, warmup: int, timed: bool,
              opts) -> tuple[dict, dict]:
    """One confined step probe: (its fields for a record, the probe's own results or {})."""
    import json

    out = job.run_dir(prep.root) / f"probe-b{batch}{'-timed' if timed else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    threads = threads_to_run(job.profile, job.profile.threads, job.settings.timing, opts.mode, cpu_cap=timed)
    argv = probe_argv(prep, job, bundle, batch, steps, warmup, threads, out)
    r = run_confined(argv, job.profile, env=prep.child_env(), timeout=opts.timeout, mode=opts.mode,
                     host=opts.host, cpu_cap=timed, timing=job.settings.timing)
    fields = {"batch": batch, "status": r.status, "exit_code": r.exit_code, "emulation": r.emulation,
              "time_scaled": r.time_scaled, "peak_rss_bytes": r.sampled_rss_bytes,
              "wall_seconds": round(r.wall_seconds, 3), "result": r}
    own = {}
    if r.status == "ok":
        try:
            own = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            fields.update(status="failed", exit_code=None)
            own = {"error": f"unreadable probe output ({e!r})"}
        else:  # the probe samples itself every 5 ms (the parent every 20 ms): a spike only it saw counts too.
            # Neither uses ru_maxrss, which starts at the spawner's high-water mark (Linux keeps it across exec).
            own_peak = round(own["summary"]["memory_mb"]["peak_rss"] * MB)
            fields["peak_rss_bytes"] = max(fields["peak_rss_bytes"], own_peak)
    return fields, own


def timed_run(job: ModelJob, prep: Prepared, bundle: Path, opts) -> tuple[dict, dict, list[float | None]]:
    """The timed probe at the start batch: under CPU timing CPU_TIMED_REPEATS of them, back to back, and the one with
    the fastest board time kept, as `bench` keeps its fastest repetition (a slower one waited on the host); each
    repetition's board ms/step comes with it."""
    s = job.settings
    runs: list[tuple[dict, dict]] = []
    for _ in range(CPU_TIMED_REPEATS if s.timing == "cpu" else 1):
        runs.append(run_probe(job, prep, bundle, s.batch, s.steps, s.warmup, True, opts))
        if runs[-1][0]["status"] != "ok":  # a run that does not fit does not fit faster
            break
    boards: list[float | None] = [(own.get("cpu") or {}).get("board_ms_per_step") for _, own in runs]
    if runs[-1][0]["status"] != "ok":
        return *runs[-1], boards
    fastest = min(zip(boards, runs), key=lambda pair: float("inf") if pair[0] is None else pair[0])
    return *fastest[1], boards


def measure_model(job: ModelJob, prep: Prepared, bundle: Path, manifest: dict, opts) -> BenchRecord:
    """The timed run, then the batch search; every outcome is a record."""
    from edge_ft.run_record import read_summary

    s, p = job.settings, job.profile
    started = time.time()
    timed, own, repeats = timed_run(job, prep, bundle, opts)
    r = timed.pop("result")
    record = base_model_record(job, manifest, prep)
    record.update(cast(BenchRecord, timed))  # batch, status, emulation, peak RSS, wall time (run_probe)
    record.update({"cpus": r.cpus or [], "threads": r.threads, "cpu_quota": r.cpu_quota, "total_quota": r.total_quota,
                   "quota_efficiency": r.quota_efficiency, "cpu_seconds": round(r.cpu_seconds, 3),
                   "throttled_seconds": r.throttled_seconds, "thread_throttled_seconds": r.thread_throttled_seconds,
                   "ru_maxrss_bytes": r.ru_maxrss_bytes, "sampled_rss_bytes": r.sampled_rss_bytes,
                   "cgroup_peak_bytes": r.cgroup_peak_bytes, "notes": list(r.notes),
                   "stderr_tail": r.stderr_tail[-600:] if r.status != "ok" else "",
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))})
    record.update(host_fields(opts.host))
    if own.get("summary"):
        summary = read_summary(own)
        ms, mem = summary["ms_per_step"], summary["memory_mb"]
        assert mem["rss_after_imports"] is not None and mem["peak_rss"] is not None  # the step probe measures both
        record.update({"steps": summary["steps"], "ms_per_step_p50": ms["p50"], "ms_per_step_p95": ms["p95"],
                      "ms_per_step_mean": ms["mean"], "rss_after_imports_bytes": round(mem["rss_after_imports"] * MB),
                      "train_peak_rss_bytes": round(mem["peak_rss"] * MB), "timing": r.timing,
                      "feature_cache": own.get("feature_cache"), **cpu_fields(own.get("cpu"))})
        if r.timing == "cpu":
            record.update(board_clock_fields(record))
            record["repeats_ms_per_step_p50"] = repeats
    record.update(verdict_fields(record, p, r, opts.timeout))
    if record["status"] == "timeout":  # no figure for the start batch: the search would only time out again
        record.update({"max_fitting_batch": None, "first_failing_batch": None, "search": []})
        return record
    search: list[SearchStep] = [{"batch": s.batch, "fits": record["fits"], "status": record["status"],
               "peak_rss_bytes": record["peak_rss_bytes"], "timed": True}]

    def fits(batch: int) -> bool:
        fields, _ = run_probe(job, prep, bundle, batch, SEARCH_STEPS, 1, False, opts)
        result = fields.pop("result")
        verdict = verdict_fields(cast(BenchRecord, fields), p, result, opts.timeout)
        search.append({"batch": batch, "fits": verdict["fits"], "status": fields["status"],
                       "peak_rss_bytes": fields["peak_rss_bytes"], "timed": False})
        return verdict["fits"]

    lo, hi = search_max_batch(fits, s.batch, s.max_batch, known=record["fits"])
    record.update({"max_fitting_batch": lo, "first_failing_batch": hi, "search": search,
                  "wall_seconds": round(time.time() - started, 3)})
    return record


def base_model_record(job: ModelJob, manifest: dict, prep: Prepared) -> BenchRecord:
    """The fields a model record shares with the task sweep's (edge_ft.bench.records.REQUIRED) and its own."""
    from edge_ft.architecture import count_params
    from edge_ft.config import MethodConfig
    from edge_ft.costmodel import estimate
    from edge_ft.model_desc import model_from_manifest

    desc = model_from_manifest(manifest, "manifest")
    cfg = MethodConfig.from_dict(manifest["method"], model=desc)
    flops = estimate(cfg, job.settings.batch, "adamw", cached=job.cached).flops
    counts = count_params(cfg)
    p = job.profile
    return {
        "schema": SCHEMA, "kind": TRADEOFF, "key": job.key, "task": "synthetic", "model": job.model,
        "model_title": desc.title, "input_shape": manifest["input_shape"], "num_classes": manifest["num_classes"],
        "inputs": "synthetic: standard normal inputs of the model's input shape, uniform random labels",
        "method": job.method, "label": job.label, "cache_features": job.cached, "engine": ENGINE,
        "optimizer": "adamw",
        "profile": p.name, "arch": p.arch, "budget_mb": p.budget_mb, "native": p.native,
        "installable_on_device": installable(ENGINE, p.arch), "settings": asdict(job.settings),
        "base_sha256": job.base_sha256, "accuracy": None, "payload_bytes": None,
        "ms_per_step_p50": None, "ms_per_step_p95": None, "ms_per_step_mean": None,
        "rss_after_imports_bytes": None, "train_peak_rss_bytes": None,
        "trainable_params": counts["trainable"], "total_params": counts["total"],
        "flops_per_step": flops["total"], "flops": {k: flops[k] for k in ("forward", "backward_input",
                                                                            "backward_weight", "total")},
        "versions": prep.versions(ENGINE),
    }


def run_models(jobs: list[ModelJob], results: Path, opts, log=None) -> list[BenchRecord]:
    """Export what is missing, then measure what is not measured yet (each record appended as it finishes);
    return the latest record of every job."""
    from tqdm import tqdm

    results = Path(results)
    root = results.parent
    say = log or (lambda line: None if opts.quiet else print(line, file=sys.stderr, flush=True))
    s = jobs[0].settings
    got = prepare_in_child({"root": str(root), "quiet": opts.quiet,
                            "models": list(dict.fromkeys(j.model for j in jobs)),
                            "methods": list(dict.fromkeys(j.method for j in jobs)), "rank": s.rank,
                            "alpha": s.alpha, "last_k": s.last_k})
    bundles = {(model, method): (Path(folder), sha, manifest)
               for model, method, folder, sha, manifest in got["bundles"]}
    jobs = [replace(j, base_sha256=bundles[(j.model, j.method)][1]) for j in jobs]
    done = set(latest(read_records(results, kind=TRADEOFF)))
    todo = [j for j in jobs if opts.force or j.key not in done]
    # Per-model bases live in the jobs; Prepared supplies the interpreters, the child environment and versions.
    prep = Prepared(root=root, base=Path(), base_sha256="", device_python=find_device_python(opts.device_python),
                    host_python=sys.executable)
    say(f"measuring {len(todo)} of {len(jobs)} model x method x board combinations -> {results}"
        if todo else f"all {len(jobs)} measurements are in {results} (--force re-measures)")
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="run", disable=opts.quiet or not todo,
              file=sys.stderr, dynamic_ncols=True) as bar:
        finished = len(jobs) - len(todo)
        lifetime.kept_runs(finished, results)
        for job in todo:
            bar.set_description(f"{job.profile.name} {job.model} {job.label}")
            folder, _, manifest = bundles[(job.model, job.method)]
            record = measure_model(job, prep, folder, manifest, opts)
            append_record(results, record)
            finished += 1
            lifetime.kept_runs(finished, results)
            bar.update(1)
            bar.write(model_line(record), file=sys.stderr) if not bar.disable else say(model_line(record))
    by_key = latest(read_records(results, kind=TRADEOFF))
    return [by_key[j.key] for j in jobs if j.key in by_key]


def label(r: BenchRecord) -> str:
    """A per-model record's label (records written before cached labels carry their method)."""
    return r.get("label") or r["method"]


def fitting_text(r: BenchRecord) -> str:
    """'96' (largest fitting batch), '>= 1024' (the search's cap fits), 'none' or '-' (not searched)."""
    if r.get("max_fitting_batch") is None:
        return "-"
    if r["first_failing_batch"] is None:
        return f">= {r['max_fitting_batch']}"
    return str(r["max_fitting_batch"]) if r["max_fitting_batch"] else "none"


def model_line(r: BenchRecord) -> str:
    from edge_ft.reports.format import fmt_ms

    return (f"{r['profile']:<12} {r['model']:<18} {label(r):<13} batch {r['batch']}: {r['verdict']}, "
            f"{fmt_ms(r)} ms/step; largest fitting batch {fitting_text(r)}")


def summarize_models(records: list[BenchRecord]) -> str:
    """A short plain-text table of model records (one line per model, board and method)."""
    from edge_ft.reports.format import fmt_ms, mb, short_result, text_table

    rows: list[tuple[object, ...]] = [("profile", "model", "method", "trainable", "batch", "ms/step", "peak RSS MB",
                                       "result", "largest fitting batch")]
    for r in records:
        rows.append((r["profile"], r["model"], label(r), f"{r['trainable_params']:,}", r["batch"], fmt_ms(r),
                     mb(r["peak_rss_bytes"]), short_result(r), fitting_text(r)))
    return text_table(rows)
