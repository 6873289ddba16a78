"""One measured job: a fine-tuning run in a child process confined to a device profile, turned into a record.

    job = Job(task="mnist→digits", label="lora", engine="ort-step", profile=load_profile("rpi-zero-2w"),
              settings=SweepSettings(epochs=3))
    record = measure(job, prepared, timeout=900)   # never raises for OOM, timeout or a failed child

The child is `edge-ft finetune --engine torch` (host interpreter) or `edge-ft train BUNDLE` (ort-training in the
host interpreter, ort-step in the device one), always with the profile's thread count passed explicitly
(onnxruntime's default ignores the cpuset). Its peak RSS is sampled by the parent (plus ru_maxrss), the rest
comes from the run's results.json; the shipped adapter is written by `edge-ft adapter export`.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from edge_ft.architecture import count_params
from edge_ft.bench.prepare import Prepared, installable
from edge_ft.bench.records import SCHEMA, BenchRecord, Epoch, host_fields, run_key
from edge_ft.config import MethodConfig
from edge_ft.contracts import MB, RESULTS, SWEEP_LABELS
from edge_ft.costmodel import estimate
from edge_ft.data.tasks import task_slug
from edge_ft.emulation.emulate import ConfinedResult, run_confined, threads_to_run
from edge_ft.emulation.hostspeed import HostSpeed
from edge_ft.emulation.profiles import DeviceProfile
from edge_ft.run_record import read_results, read_summary
from edge_ft.training_defaults import DEFAULTS

TORCH_WEIGHTS = "weights.safetensors"  # edge_ft.host.finetune.WEIGHTS_FILE; that module imports torch
LABELS = SWEEP_LABELS  # method tokens of a sweep -> (method, train on the cached frozen prefix)


@dataclass(frozen=True)
class SweepSettings:
    epochs: int | None = None  # passes over the train set (None: the method's recipe, unless steps is set)
    steps: int | None = None  # exact optimizer steps (ORT engines only; torch trains whole epochs)
    batch: int | None = None  # examples per step (None: the recipe's)
    seed: int = 0  # batch order (and LoRA/head init of the torch engine)
    rank: int = 2  # LoRA rank
    alpha: float = 4.0  # LoRA alpha
    last_k: int = 2  # last-k: weight layers trained whole, counted back from the output (LeNet-5: fc2, fc3)
    host_speed: float = 1.0  # this machine's core speed vs the reference core (scales the CPU quota)
    target_accuracy: float = 0.9  # time-to-accuracy threshold (derived from per-epoch figures, not part of the key)
    timing: str = "quota"  # an emulated board's time: paced by a CPU quota, or "cpu" (contracts.TIMINGS)

    def identity(self) -> dict:
        """What makes two runs comparable; last_k only for last-k runs (Job.key), so other runs keep their keys;
        timing only when it is not the quota, so runs measured before it existed keep theirs."""
        skip = ("target_accuracy", "last_k") + (("timing",) if self.timing == "quota" else ())
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def timing_for(self, engine: str) -> str:
        """The timing a job of `engine` runs under: the torch engine has no CPU meter, so a quota paces it."""
        return "quota" if engine == "torch" else self.timing


@dataclass(frozen=True)
class Job:
    task: str  # canonical task name, e.g. "mnist→digits", or the absolute path of a data folder (--data)
    label: str  # a key of SWEEP_LABELS
    engine: str  # torch | ort-training | ort-step
    profile: DeviceProfile
    settings: SweepSettings
    base_sha256: str = ""  # the base every run starts from (part of the key)

    @property
    def method(self) -> str:
        return LABELS[self.label][0]

    @property
    def cache_features(self) -> bool:
        return LABELS[self.label][1]

    @property
    def key(self) -> str:
        settings = self.settings.identity()
        if self.method == "last-k":
            settings["last_k"] = self.settings.last_k
        return run_key({"task": self.task, "label": self.label, "engine": self.engine,
                        "profile": profile_identity(self.profile), "settings": settings, "base": self.base_sha256})

    def method_config(self, num_classes: int) -> MethodConfig:
        return label_config(self.label, self.settings, num_classes)

    def run_dir(self, root: Path) -> Path:
        return root / "runs" / self.profile.name / task_slug(self.task) / f"{self.label}-{self.engine}"


def label_config(label: str, s: SweepSettings, num_classes: int = 10) -> MethodConfig:
    """The MethodConfig a sweep label trains with these settings."""
    return MethodConfig(LABELS[label][0], rank=s.rank, alpha=s.alpha, last_k=s.last_k, num_classes=num_classes)


def step_flops(cfg: MethodConfig, label: str, batch: int) -> dict[str, int]:
    """The cost model's FLOPs of one training step of a sweep label: forward, backward_input, backward_weight and
    total (a record's flops_per_step); a cached label's step runs the suffix after the cached frozen prefix."""
    est = estimate(cfg, batch, DEFAULTS[cfg.method].optimizer, cached=LABELS[label][1])
    return {k: est.flops[k] for k in ("forward", "backward_input", "backward_weight", "total")}


def profile_identity(p: DeviceProfile) -> dict:
    """What makes two measurements under a profile comparable; a native profile's budget is read live, so not it."""
    d = {"name": p.name, "cores": p.cores, "threads": p.threads, "cpu_speed": p.cpu_speed}
    return d if p.native else {**d, "budget_mb": p.budget_mb}


def job_argv(job: Job, prep: Prepared, bundle: Path | None, data: Path, run_dir: Path, mode: str = "auto") -> list[str]:
    s = job.settings
    threads = str(threads_to_run(job.profile, job.profile.threads, s.timing_for(job.engine), mode))
    python = prep.python_for(job.engine)
    if job.engine == "torch":
        argv = [python, "-m", "edge_ft.cli", "finetune", "--engine", "torch", "--method", job.method,
                "--task", str(data), "--base", str(prep.base), "--seed", str(s.seed), "--threads", threads,
                "--quiet", "--out", str(run_dir)]
        if job.method == "lora":
            argv += ["--rank", str(s.rank), "--alpha", f"{s.alpha:g}"]
    else:
        argv = [python, "-m", "edge_ft.cli", "train", str(bundle), "--data", str(data / "train.npz"),
                "--eval", str(data / "test.npz"), "--seed", str(s.seed), "--threads", threads, "--quiet",
                "--force", "--out", str(run_dir)]
        argv.append("--cache" if job.cache_features else "--no-cache")  # uncached labels measure the full step
        if s.steps:
            argv += ["--steps", str(s.steps)]
    if s.epochs and not s.steps:
        argv += ["--epochs", str(s.epochs)]
    if s.batch:
        argv += ["--batch", str(s.batch)]
    return argv


def measure(job: Job, prep: Prepared, bundle: Path | None, data: Path, num_classes: int,
            timeout: float | None = None, mode: str = "auto", host: HostSpeed | None = None) -> BenchRecord:
    """Run the job confined to its profile and return its record (every outcome is a record)."""
    run_dir = job.run_dir(prep.root)
    shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted earlier left files that are not this run's
    argv = job_argv(job, prep, bundle, data, run_dir, mode)
    started, spawner_peak = time.time(), own_peak_rss()
    result = run_confined(argv, job.profile, env=prep.child_env(), timeout=timeout, mode=mode, host=host,
                          timing=job.settings.timing_for(job.engine))
    record = base_record(job, prep, num_classes, result, spawner_peak)
    record.update(host_fields(host or HostSpeed.reference()))  # the speed every quota of this run was scaled by
    record["started"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
    if result.status == "ok":
        try:
            record.update(torch_fields(run_dir) if job.engine == "torch" else device_fields(run_dir))
        except (OSError, ValueError, KeyError, TypeError) as e:
            record.update({"status": "failed", "fits": False, "verdict": f"failed: unreadable run output ({e!r})"})
            return record
        if result.timing == "cpu":
            record.update(board_clock_fields(record))
        record["time_to_accuracy_s"] = time_to_accuracy(record, job.settings.target_accuracy)
        # The trainer samples itself every 5 ms (the parent every 20 ms): a short spike only it saw still counts.
        record["peak_rss_bytes"] = max(record["peak_rss_bytes"], record["train_peak_rss_bytes"] or 0)
    record.update(verdict_fields(record, job.profile, result, timeout))
    return record


def own_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_peak_rss(r: ConfinedResult, spawner_peak: int) -> int:
    """The job's own peak RSS. Linux carries the RSS high-water mark across fork and exec, so a ru_maxrss no
    higher than the spawner's own peak may be the spawner's: then only the sampled figure is the job's."""
    return max(r.sampled_rss_bytes, r.ru_maxrss_bytes) if r.ru_maxrss_bytes > spawner_peak else r.sampled_rss_bytes


def base_record(job: Job, prep: Prepared, num_classes: int, r: ConfinedResult, spawner_peak: int) -> BenchRecord:
    cfg = job.method_config(num_classes)
    est = estimate(cfg, job.settings.batch or DEFAULTS[job.method].batch, DEFAULTS[job.method].optimizer)
    flops = step_flops(cfg, job.label, est.batch)["total"]
    p = job.profile
    return {
        "schema": SCHEMA, "key": job.key,
        "task": job.task, "method": job.method, "label": job.label, "cache_features": job.cache_features,
        "engine": job.engine, "profile": p.name, "arch": p.arch, "budget_mb": p.budget_mb, "native": p.native,
        "installable_on_device": installable(job.engine, p.arch),
        "emulation": r.emulation, "time_scaled": r.time_scaled, "timing": r.timing, "board_scale": None,
        "cpu_quota": r.cpu_quota, "threads": r.threads,
        "total_quota": r.total_quota, "quota_efficiency": r.quota_efficiency,
        "cpus": r.cpus or [], "status": r.status, "exit_code": r.exit_code,
        "settings": asdict(job.settings), "base_sha256": job.base_sha256,
        "accuracy": None, "epochs": [], "steps": None,
        "ms_per_step_p50": None, "ms_per_step_p95": None, "ms_per_step_mean": None,
        "cpu_ms_per_step": None, "busiest_thread_ms_per_step": None, "wall_ms_per_step": None,
        "typical_ms_per_step": None,
        "board_ms_per_step": None,
        "epoch_seconds_mean": None, "epoch_seconds_later": None, "time_to_accuracy_s": None,
        "feature_cache_seconds": None,
        "peak_rss_bytes": child_peak_rss(r, spawner_peak), "sampled_rss_bytes": r.sampled_rss_bytes,
        "ru_maxrss_bytes": r.ru_maxrss_bytes, "cgroup_peak_bytes": r.cgroup_peak_bytes,
        "rss_after_imports_bytes": None, "train_peak_rss_bytes": None,
        # Work against waiting: the CPU time the job used, and how long its quota held the job (and its threads)
        # stopped; None outside a cgroup.
        "wall_seconds": round(r.wall_seconds, 3), "cpu_seconds": round(r.cpu_seconds, 3),
        "throttled_seconds": r.throttled_seconds, "thread_throttled_seconds": r.thread_throttled_seconds,
        "throttled_periods": r.throttled_periods, "periods": r.periods,
        "flops_per_step": flops, "trainable_params": est.params["trainable"],
        "total_params": count_params(cfg)["total"],
        "bundle_bytes": None, "payload_bytes": None, "payload_files": {}, "merged_model_bytes": None,
        "versions": prep.versions(job.engine),
        "notes": list(r.notes), "stderr_tail": r.stderr_tail[-600:] if r.status != "ok" else "",
    }


def _run_fields(results: Mapping[str, Any]) -> BenchRecord:
    """What every engine's run reports, through the one results schema (edge_ft.run_record)."""
    r = read_summary(results)
    rows: list[Epoch] = [{"seconds": e["seconds"], "accuracy": e["accuracy"]} for e in r["epochs"]]
    secs = [e["seconds"] for e in rows]
    later = secs[1:] or secs  # the first epoch carries warm-up (graph optimisation, allocator growth)
    ms, mem = r["ms_per_step"], r["memory_mb"]
    return {"accuracy": r["accuracy"], "epochs": rows, "steps": r["steps"],
            "epoch_seconds_mean": round(sum(secs) / len(secs), 4) if secs else None,
            "epoch_seconds_later": round(sum(later) / len(later), 4) if later else None,
            "ms_per_step_p50": ms["p50"], "ms_per_step_p95": ms["p95"], "ms_per_step_mean": ms["mean"],
            "rss_after_imports_bytes": None if mem["rss_after_imports"] is None else
            round(mem["rss_after_imports"] * MB),
            "train_peak_rss_bytes": None if mem["peak_rss"] is None else round(mem["peak_rss"] * MB)}


def cpu_fields(cpu: Mapping[str, Any] | None) -> BenchRecord:
    """The steps' CPU time and, on an emulated board, the board time it stands for (edge_ft.device.board_time)."""
    cpu = cpu or {}
    return {"cpu_ms_per_step": cpu.get("ms_per_step"),
            "busiest_thread_ms_per_step": cpu.get("busiest_thread_ms_per_step"),
            "wall_ms_per_step": cpu.get("wall_ms_per_step"), "typical_ms_per_step": cpu.get("typical_ms_per_step"),
            "board_ms_per_step": cpu.get("board_ms_per_step")}


def board_clock_fields(record: BenchRecord) -> BenchRecord:
    """A run timed by CPU time ran at this machine's speed: its time figures (per-step percentiles, epochs, the
    feature pass) are this machine's wall times. Each is scaled by the run's board time over its wall time per step
    (`board_scale`), so they read as the board's; without a board time the run is not time-scaled."""
    board, wall = record.get("board_ms_per_step"), record.get("wall_ms_per_step")
    if not board or not wall:
        return {"time_scaled": False, "board_scale": None}
    f = board / wall

    def scaled(key: str) -> float | None:
        v = record.get(key)
        return None if v is None else round(float(cast(float, v)) * f, 4)

    scaled_record: BenchRecord = {"board_scale": round(f, 4)}
    if "epochs" in record:  # task runs; a per-model probe has none
        scaled_record["epochs"] = [{**e, "seconds": round(e["seconds"] * f, 4)} for e in record["epochs"]]
    return {**scaled_record,
            "ms_per_step_p50": scaled("ms_per_step_p50"), "ms_per_step_p95": scaled("ms_per_step_p95"),
            "ms_per_step_mean": scaled("ms_per_step_mean"), "epoch_seconds_mean": scaled("epoch_seconds_mean"),
            "epoch_seconds_later": scaled("epoch_seconds_later"),
            "feature_cache_seconds": scaled("feature_cache_seconds")}


def device_fields(run_dir: Path) -> BenchRecord:
    """Fields from an `edge-ft train` run, plus the adapter `edge-ft adapter export` makes of it."""
    from edge_ft.device.adapter import CONFIG, RECORD, WEIGHTS, export_adapter

    r = read_results(run_dir)
    export_adapter(run_dir, run_dir / "adapter", force=True)  # the sweep owns this folder; --force re-runs
    adapter = {name: (run_dir / "adapter" / name).stat().st_size for name in (WEIGHTS, CONFIG, RECORD)}
    return {
        **_run_fields(r),
        "feature_cache_seconds": r.get("feature_cache_seconds"),
        **cpu_fields(r.get("cpu")),
        "bundle_bytes": sum(r["bundle_bytes"].values()),
        "payload_bytes": adapter[WEIGHTS], "payload_files": adapter,
        "merged_model_bytes": r["artifact_bytes"].get("model.onnx"),
    }


def torch_fields(run_dir: Path) -> BenchRecord:
    """Fields from an `edge-ft finetune --engine torch` run; its weights file is what it would ship."""
    r = json.loads((run_dir / RESULTS).read_text())
    weights = (run_dir / TORCH_WEIGHTS).stat().st_size
    return {**_run_fields(r), "payload_bytes": weights, "payload_files": {TORCH_WEIGHTS: weights}}


def time_to_accuracy(record: BenchRecord, target: float) -> float | None:
    """Training seconds (feature caching included) until the first epoch whose held-out accuracy >= target."""
    elapsed = record.get("feature_cache_seconds") or 0.0
    for e in record["epochs"]:
        elapsed += e["seconds"]
        if e["accuracy"] is not None and e["accuracy"] >= target:
            return round(elapsed, 4)
    return None


def verdict_fields(record: BenchRecord, profile: DeviceProfile, r: ConfinedResult,
                   timeout: float | None) -> BenchRecord:
    """fits + one line saying why: a run counts as fitting only if it finished and its RSS stayed in budget.

    The cgroup charges shared-library pages to whoever read them first (often another process here), so a job can
    finish under the cap with its RSS above the budget; on the board those pages take RAM like any other (or are
    paged from the SD card over and over), so it does not count as fitting.
    """
    budget, peak = profile.budget_mb, record["peak_rss_bytes"] / MB
    status = record["status"]
    if status == "out_of_memory":
        return {"fits": False, "verdict": f"does not fit in {budget} MB (killed at the cap)"}
    if status == "timeout":
        return {"fits": False, "verdict": f"timed out after {timeout:g} s"}
    if status != "ok":
        last = (r.stderr_tail.strip().splitlines() or [f"exit {r.exit_code}"])[-1]
        return {"fits": False, "verdict": f"failed: {last[:200]}"}
    if not profile.native and peak > budget:
        return {"fits": False, "verdict": f"does not fit in {budget} MB (peak RSS {peak:.0f} MB; the cap did not "
                                          "count its shared library pages, which the board must hold too)"}
    if profile.native:
        return {"fits": True, "verdict": f"ok: peak RSS {peak:.0f} MB"}
    return {"fits": True, "verdict": f"fits: peak RSS {peak:.0f} of {budget} MB"}
