"""The sweep: every (task, method, engine, profile) combination measured once, appended to a JSONL file.

    jobs = plan(["mnist→digits"], ["full", "probe", "lora"], ENGINES, [host, zero], SweepSettings(epochs=3))
    records = run_sweep(jobs, Path("runs/bench/results.jsonl"), SweepOptions())

Re-running skips every job whose key is already in the file (`force` re-measures and appends). Preparation
(base, data, bundles) happens first, unconfined and cached. Native runs go one at a time; runs under a CPU quota
use a small, fixed share of this machine each, so up to `parallel` of them run side by side without slowing each
other (their quotas together stay under half the CPUs here).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from edge_ft.bench.measure import LABELS, Job, SweepSettings, measure
from edge_ft.bench.prepare import Prepared, prepare_in_child
from edge_ft.bench.records import BenchRecord, append_record, latest, read_records, step_ms
from edge_ft.checkpoint import base_sha256, default_base
from edge_ft.contracts import CPU_TIMED_REPEATS, ENGINES
from edge_ft.emulation import lifetime
from edge_ft.emulation.emulate import plan_cpus, usable_cpus
from edge_ft.emulation.hostspeed import HostSpeed
from edge_ft.emulation.profiles import DeviceProfile
from edge_ft.errors import UserError
from edge_ft.interpreters import find_device_python
from edge_ft.reports.format import fmt_ms, mb, short_result, text_table

MAX_PARALLEL = 4  # side-by-side quota-limited runs; more would only add sampling overhead in the parent


@dataclass(frozen=True)
class SweepOptions:
    base: str | None = None  # base weights; None: pretrain once under the results folder
    pretrain_epochs: int | None = None  # when pretraining here (None: the recipe's)
    force: bool = False  # re-measure jobs already in the results file
    timeout: float | None = 1800.0  # seconds per measured job
    mode: str = "auto"  # emulation mode for confined profiles (edge_ft.emulation.emulate)
    parallel: int = 0  # quota-limited runs side by side (0: as many as fit in half the CPUs, at most 4)
    repeats: int | None = None  # runs at this machine's speed: measure this often, keep the least disturbed one
    # (None: 3 natively, 5 timed by CPU time, whose timed steps are a few tenths of a second here)
    device_python: str | None = None  # interpreter for ort-step runs (default: .venv-device when present)
    quiet: bool = False  # no progress bar or per-run lines
    host: HostSpeed = field(default_factory=HostSpeed.reference)  # this machine's speed (scales every quota)


def plan(tasks: list[str], labels: list[str], engines: list[str], profiles: list[DeviceProfile],
         settings: SweepSettings) -> list[Job]:
    """Every combination, host-native profiles first; combinations that do not exist are left out
    (the torch engine has no cached-features mode; --steps is an ORT-engine option)."""
    from edge_ft.data.tasks import task_name

    bad = [x for x in labels if x not in LABELS] or [x for x in engines if x not in ENGINES]
    if bad:
        raise UserError(f"unknown method or engine {bad[0]!r}: methods {', '.join(LABELS)}; "
                        f"engines {', '.join(ENGINES)}")
    if settings.steps and "torch" in engines:
        raise UserError("--steps applies to the ORT engines; the torch engine (edge-ft finetune) trains whole "
                        "epochs: use --epochs, or drop torch from --engines")
    ordered = sorted(profiles, key=lambda p: not p.native)
    return [Job(task_name(t), label, engine, p, settings)
            for p in ordered for t in tasks for label in labels for engine in engines
            if not (engine == "torch" and LABELS[label][1])]


def prepare(jobs: list[Job], root: Path, opts: SweepOptions) -> tuple[Prepared, dict]:
    """Base, data and bundles the jobs need: (prepared paths, {"data": task -> (folder, classes),
    "bundles": (label, engine, task) -> bundle folder})."""
    from edge_ft.errors import require_host

    require_host("edge-ft bench (preparing bases and bundles)")
    settings = jobs[0].settings
    wanted = {(j.label, j.method, j.engine, j.task): None for j in jobs if j.engine != "torch"}
    got = prepare_in_child({"root": str(root), "base": opts.base, "pretrain_epochs": opts.pretrain_epochs,
                            "quiet": opts.quiet, "tasks": list(dict.fromkeys(j.task for j in jobs)),
                            "bundles": [list(k) for k in wanted], "rank": settings.rank, "alpha": settings.alpha,
                            "last_k": settings.last_k})
    prep = Prepared(root=root, base=Path(got["base"]), base_sha256=got["base_sha256"],
                    device_python=find_device_python(opts.device_python), host_python=sys.executable)
    data = {task: (Path(folder), classes) for task, (folder, classes) in got["data"].items()}
    bundles = {(label, engine, task): Path(folder) for label, engine, task, folder in got["bundles"]}
    return prep, {"data": data, "bundles": bundles}


def pending(jobs: list[Job], results: Path, force: bool) -> list[Job]:
    done = set(latest(read_records(results)))
    return [j for j in jobs if force or j.key not in done]


def run_sweep(jobs: list[Job], results: Path, opts: SweepOptions, log=None) -> list[BenchRecord]:
    """Measure what is not measured yet (each record appended to `results` as it finishes); return the latest
    record of every planned job."""
    results = Path(results)
    root = results.parent
    say = log or (lambda line: None if opts.quiet else print(line, file=sys.stderr, flush=True))
    # Keys include the base's sha256: with the base already there, a finished sweep stops before any torch work.
    known = base_sha256(Path(opts.base) if opts.base else default_base(root))
    keyed = [replace(j, base_sha256=known) for j in jobs]
    todo = pending(keyed, results, opts.force) if known else keyed
    if todo:
        prep, paths = prepare(todo, root, opts)
        keyed = [replace(j, base_sha256=prep.base_sha256) for j in jobs]
        todo = pending(keyed, results, opts.force) if prep.base_sha256 != known else todo
    if not todo:
        say(f"all {len(keyed)} measurements are in {results} (--force re-measures)")
        return records_for(keyed, results)
    say(f"measuring {len(todo)} of {len(keyed)} combinations -> {results}")
    if prep.device_python != prep.host_python:
        say(f"ort-step runs use {prep.device_python} "
            f"(onnxruntime {prep.versions('ort-step').get('onnxruntime', 'not installed')})")
    finished = len(keyed) - len(todo)
    lifetime.kept_runs(finished, results)
    with _progress(len(keyed), finished, opts.quiet) as bar:
        def finish(record: BenchRecord) -> None:
            nonlocal finished
            append_record(results, record)
            finished += 1
            lifetime.kept_runs(finished, results)
            bar.update(1)
            bar.write(run_line(record), file=sys.stderr) if not bar.disable else say(run_line(record))

        def once(job: Job) -> BenchRecord:
            bar.set_description(f"{job.profile.name} {job.label} {job.engine}")
            return measure(job, prep, paths["bundles"].get((job.label, job.engine, job.task)),
                           *paths["data"][job.task], timeout=opts.timeout, mode=opts.mode, host=opts.host)

        # On a shared machine one run at this machine's speed (native, or timed by CPU time) can land on another
        # process's busy seconds, or on seconds when this machine's core is slower; training is deterministic, so
        # repetitions differ only in timing and the fastest is the machine's own figure. They run in rounds, so a
        # slow stretch touches different jobs' repetitions, and one at a time (side by side they would take each
        # other's CPUs). Quota-paced runs are capped below what the machine offers: one run each.
        for native in (True, False):
            rounds = opts.repeats or (NATIVE_REPEATS if native else CPU_TIMED_REPEATS)
            for reps in _in_rounds([j for j in todo if repeated(j) and j.profile.native == native], once, rounds):
                finish(fastest(reps))
        for profile, group in _by_profile([j for j in todo if not repeated(j)]):
            width = parallel_width(profile, opts)
            if width == 1:
                for job in group:
                    finish(fastest([once(job)]))
            else:
                bar.set_description(f"{profile.name}, {width} runs at a time")
                _run_parallel(group, lambda job: fastest([once(job)]), width, finish)
    return records_for(keyed, results)


def repeated(job: Job) -> bool:
    """Whether the job runs at this machine's speed (natively, or timed by its CPU time) and so is repeated."""
    return job.profile.native or job.settings.timing_for(job.engine) == "cpu"


NATIVE_REPEATS = 3


def _in_rounds(jobs: list[Job], once: Callable[[Job], BenchRecord], repeats: int) -> Iterator[list[BenchRecord]]:
    """Every job `repeats` times, round by round; yields a job's records after its last repetition (after the first
    when that one did not finish: a run that does not fit does not fit faster)."""
    reps: dict[str, list[BenchRecord]] = {j.key: [] for j in jobs}
    for round_ in range(repeats):
        for job in jobs:
            runs = reps[job.key]
            if runs and runs[0]["status"] != "ok":
                continue
            runs.append(once(job))
            if round_ == repeats - 1 or runs[0]["status"] != "ok":
                yield runs


def fastest(reps: list[BenchRecord]) -> BenchRecord:
    """The repetition with the lowest step time (step_ms), each repetition's figure recorded in it."""
    ok = [r for r in reps if r["status"] == "ok"]
    best = min(ok, key=lambda r: step_ms(r) or float("inf")) if ok else reps[-1]
    best["repeats_ms_per_step_p50"] = [step_ms(r) for r in reps]
    return best


def records_for(jobs: list[Job], results: Path) -> list[BenchRecord]:
    by_key = latest(read_records(results))
    return [by_key[j.key] for j in jobs if j.key in by_key]


def run_line(r: BenchRecord) -> str:
    accuracy = f"; accuracy {r['accuracy']:.3f}, {fmt_ms(r)} ms/step" if r.get("accuracy") is not None else ""
    held = f", throttled {r['throttled_seconds']:.1f} s" if r.get("throttled_seconds") is not None else ""
    return (f"{r['profile']:<12} {r['label']:<12} {r['engine']:<12} {r['verdict']}{accuracy} "
            f"({r['wall_seconds']:.0f} s, CPU {r.get('cpu_seconds') or 0:.1f} s{held})")


def _by_profile(jobs: list[Job]):
    groups: dict[str, list[Job]] = {}
    for j in jobs:
        groups.setdefault(j.profile.name, []).append(j)
    for group in groups.values():
        # torch runs are the longest under a quota (importing torch alone is minutes there): start them first
        yield group[0].profile, sorted(group, key=lambda j: j.engine != "torch")


def parallel_width(profile: DeviceProfile, opts: SweepOptions) -> int:
    """How many of this profile's runs may share the machine: only quota-limited (time-scaled) ones, and only as
    many as keep their summed quotas (each job cgroup's cap) under half of the CPUs here. Measures the quota's
    throttling correction first (cached), so parallel runs never measure it side by side."""
    host = opts.host
    if (profile.native or opts.mode in ("native", "rlimit") or host.share(profile.cpu_speed) >= 1
            or opts.parallel == 1 or not _cgroups_work()):
        return 1
    thread_share, _ = host.thread_quota(profile.cpu_speed, plan_cpus(profile))
    fit = int(0.5 * len(usable_cpus()) / (thread_share * profile.thread_speedup(profile.threads)))
    return max(1, min(fit, opts.parallel or MAX_PARALLEL, MAX_PARALLEL))


@contextlib.contextmanager
def _progress(total: int, initial: int, quiet: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="run", disable=quiet, dynamic_ncols=True, file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()


def _run_parallel(jobs: list[Job], run, width: int, finish) -> None:
    """Run jobs `width` at a time; on Ctrl-C stop our own child processes (by pid) instead of waiting for them."""
    pool = cf.ThreadPoolExecutor(max_workers=width, thread_name_prefix="edge-ft-job")
    futures = [pool.submit(run, j) for j in jobs]
    try:
        for future in cf.as_completed(futures):
            finish(future.result())
    except BaseException:
        for f in futures:
            f.cancel()
        _kill_own_children()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _kill_own_children() -> None:
    """SIGKILL every descendant but the guardian, which must outlive us to clean up after a SIGKILL."""
    import psutil

    for child in psutil.Process().children():
        if child.pid != lifetime.guardian_pid():
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)  # each run is a process group of its own
                lifetime.stopped(f"ended a run in progress (pid {child.pid})")


def _cgroups_work() -> bool:
    from edge_ft.emulation.cgroups import CgroupJob, CgroupUnavailable

    try:
        CgroupJob.create(64 << 20, usable_cpus()[:1], 0.5, 0.5, 20_000).remove()
    except CgroupUnavailable:
        return False
    return True


def summarize(records: list[BenchRecord]) -> str:
    """A short plain-text table of records (one line per run)."""
    rows = [("profile", "method", "engine", "accuracy", "ms/step", "peak RSS MB", "payload B", "result")]
    for r in records:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        rows.append((r["profile"], r["label"], r["engine"], acc, fmt_ms(r), mb(r["peak_rss_bytes"]),
                     "-" if r.get("payload_bytes") is None else f"{r['payload_bytes']:,}",
                     short_result(r)))
    return text_table(rows)
