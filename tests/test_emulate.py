"""Confined runs: memory caps end in a 'does not fit' result, cpusets and per-thread CPU quotas hold, thread
counts reach the child, the rlimit fallback works, and no cgroup is left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_ft.cli import main
from edge_ft.emulation import cgroups
from edge_ft.emulation.calibrate import relative_speed
from edge_ft.emulation.cgroups import CgroupJob, CgroupUnavailable
from edge_ft.emulation.cpu import THREAD_VARS, quota_period_us
from edge_ft.emulation.emulate import confine, plan_cpus, run_confined
from edge_ft.emulation.profiles import load_profile, load_profile_file

PY = sys.executable
MB = 2**20


def _cgroup_reason() -> str | None:
    try:
        CgroupJob.create(64 * MB, [sorted(os.sched_getaffinity(0))[0]], 0.5, 0.5, 20_000).remove()
    except CgroupUnavailable as e:
        return str(e)
    return None


CGROUP_REASON = _cgroup_reason()
needs_cgroups = pytest.mark.skipif(CGROUP_REASON is not None, reason=f"cgroups not writable: {CGROUP_REASON}")


def make_profile(tmp_path: Path, name="box", cores=1, budget_mb=128, threads=None, cpu_speed=0.5):
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'description = "test box"\narch = "x86_64"\ncpu = "test"\ncores = {cores}\nram_mb = {2 * budget_mb}\n'
        f"budget_mb = {budget_mb}\nthreads = {threads or cores}\ncpu_speed = {cpu_speed}\n"
        'cpu_speed_source = "chosen for a test"\n')
    return load_profile_file(path)


def alloc(mb: int) -> list[str]:
    """A child that touches `mb` MiB of fresh memory (np.ones writes every page), then reports its CPUs."""
    return [PY, "-c", f"import numpy as np, os; a = np.ones({mb} * 2**20 // 8); "
            "print(sorted(os.sched_getaffinity(0)))"]


def busy(threads: int, cpu_seconds: float) -> list[str]:
    """A child running `threads` GIL-free busy threads (sha256 of 1 MiB releases the GIL) until each has used
    `cpu_seconds` of CPU; prints the job's CPU time / wall time, i.e. the share of one CPU it obtained, then on a
    second line the cpu cgroup each thread ended in (a JSON list)."""
    code = f"""
import hashlib, json, threading, time
data = b"x" * (1 << 20)
where = []
def spin():
    t = time.thread_time()
    while time.thread_time() - t < {cpu_seconds}:
        hashlib.sha256(data).digest()
    lines = open("/proc/thread-self/cgroup").read().splitlines()
    where.append([l.split(":", 2)[2] for l in lines if l.split(":")[1] in ("cpu,cpuacct", "cpu", "")][0])
ts = [threading.Thread(target=spin) for _ in range({threads})]
w, c = time.perf_counter(), time.process_time()
[t.start() for t in ts]; [t.join() for t in ts]
print((time.process_time() - c) / (time.perf_counter() - w))
print(json.dumps(where))
"""
    return [PY, "-c", code]


def share(out: str) -> float:
    return float(out.split()[0])


def thread_cgroups(out: str) -> list[str]:
    return json.loads(out.strip().splitlines()[1])


def leftover_cgroups() -> list[Path]:
    return [path for parent in cgroups.job_parents() for path in parent.glob(f"{cgroups.PREFIX}{os.getpid()}.*")]


@needs_cgroups
def test_cgroup_allocation_beyond_cap_does_not_fit(tmp_path):
    r = run_confined(alloc(300), make_profile(tmp_path, budget_mb=128), timeout=60)
    assert r.emulation == "cgroup"
    assert r.oom_killed and r.exit_code == -9
    assert r.status == "out_of_memory" and not r.fits
    assert r.cgroup_peak_bytes == r.memory_limit_bytes == 128 * MB  # it reached the cap and went no further
    assert not leftover_cgroups()


@needs_cgroups
def test_cgroup_allocation_within_cap_succeeds_on_its_cpuset(tmp_path):
    r = run_confined(alloc(40), make_profile(tmp_path, budget_mb=150), timeout=60)
    assert r.status == "ok" and r.fits and not r.oom_killed and r.emulation == "cgroup"
    assert json.loads(r.stdout_tail) == r.cpus and len(r.cpus) == 1  # cpuset: the child sees one CPU
    assert 40 * MB < r.cgroup_peak_bytes <= 150 * MB
    # The kernel's high-water marks saw the 40 MB; the 20 ms sampler may miss a child this short-lived.
    assert r.peak_rss_bytes >= r.ru_maxrss_bytes > 40 * MB and r.peak_rss_bytes >= r.sampled_rss_bytes
    assert r.time_scaled and r.cpu_quota == pytest.approx(0.5)
    assert not leftover_cgroups()


@needs_cgroups
def test_memory_peak_starts_again_after_a_reset(tmp_path):
    """A fleet node serves several runs in one cgroup: each run's peak must not carry the earlier runs'."""
    conf = confine(make_profile(tmp_path, budget_mb=400))
    try:
        assert subprocess.run(conf.command(alloc(200)), env=conf.env, capture_output=True).returncode == 0
        assert conf.job.memory_peak() > 200 * MB
        if conf.job.reset_memory_peak():  # cgroup v1
            # the allocating process is gone: only what is charged now (page cache of the files it read, far less)
            assert conf.job.memory_peak() < 200 * MB
        else:
            assert conf.job.version == 2  # memory.peak resets only per file descriptor there
    finally:
        conf.remove()
    assert not leftover_cgroups()


@needs_cgroups
def test_threads_env_reaches_the_child(tmp_path):
    names = (*THREAD_VARS, "EDGE_FT_PROFILE")
    code = f"import os, json; print(json.dumps({{v: os.environ.get(v) for v in {names!r}}}))"
    profile = make_profile(tmp_path, name="duo", cores=2, threads=2)
    env = {**os.environ, "OMP_NUM_THREADS": "64"}  # the profile wins over the caller's environment
    seen = json.loads(run_confined([PY, "-c", code], profile, env=env).stdout_tail)
    assert seen == {**{v: "2" for v in THREAD_VARS}, "EDGE_FT_PROFILE": "duo"}
    seen = json.loads(run_confined([PY, "-c", code], profile, threads=1).stdout_tail)
    assert seen["OPENBLAS_NUM_THREADS"] == seen["EDGE_FT_THREADS"] == "1"


def written_quota(folder: Path) -> tuple[int, int]:
    """(quota, period) in microseconds as written in a cpu cgroup (v1 cfs files, v2 cpu.max); quota -1: none."""
    if (folder / "cpu.max").exists():
        quota, period = (folder / "cpu.max").read_text().split()
        return (-1 if quota == "max" else int(quota)), int(period)
    return int((folder / "cpu.cfs_quota_us").read_text()), int((folder / "cpu.cfs_period_us").read_text())


@needs_cgroups
def test_quota_caps_every_thread_at_one_device_core(tmp_path):
    # A 2-core device at 0.1 of a core here whose two cores together go 1.3x one: the job is capped at 0.13 of a
    # CPU, every thread's own leaf at one device core (0.1), all in one period; each busy thread of the child ends
    # in a leaf of its own. Asserted: the layout and the quotas as written, never what a busy machine lets a job reach.
    path = tmp_path / "duo.toml"
    path.write_text('description = "test box"\narch = "x86_64"\ncpu = "test"\ncores = 2\nram_mb = 256\n'
                    'budget_mb = 128\nthreads = 2\ncpu_speed = 0.1\ncpu_speed_source = "chosen for a test"\n'
                    'thread_scaling = [1.0, 1.3]\nthread_scaling_source = "chosen for a test"\n')
    profile = load_profile_file(path)
    conf = confine(profile)
    try:
        job, period = conf.job, quota_period_us(0.1)
        assert (conf.thread_share, conf.total_share) == (pytest.approx(0.1), pytest.approx(0.13))
        assert written_quota(job.dirs["cpu"]) == (round(0.13 * period), period)
        assert [written_quota(leaf) for leaf in job.leaves] == [(round(0.1 * period), period)]
        assert job.entry_files()[-1].startswith(str(job.leaves[0]))  # the child starts in the first leaf
        assert cgroups.parse_cpulist((job.dirs["cpuset"] / "cpuset.cpus").read_text()) == plan_cpus(profile)
    finally:
        conf.remove()
    two = run_confined(busy(2, 0.05), profile, timeout=60)
    assert two.status == "ok", two.stderr_tail
    leaves = thread_cgroups(two.stdout_tail)
    assert len(set(leaves)) == 2 and all(f"/{cgroups.PREFIX}" in leaf for leaf in leaves), leaves
    assert all(Path(leaf).name.startswith("t") for leaf in leaves), leaves


@needs_cgroups
def test_stale_cgroups_of_dead_runs_are_removed():
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    parent = cgroups.job_parents()[-1]  # v1: the cpu hierarchy, whose jobs have leaves; v2: the one hierarchy
    stale = parent / f"{cgroups.PREFIX}{pid}.0"
    stale.mkdir()
    (stale / "t0").mkdir()
    cgroups.remove_stale(parent)
    assert not stale.exists()


def test_rlimit_fallback_fails_cleanly_beyond_cap(tmp_path):
    profile = make_profile(tmp_path, budget_mb=128)
    r = run_confined(alloc(300), profile, mode="rlimit", timeout=60)
    assert r.emulation == "rlimit" and not r.time_scaled and r.cpu_quota is None
    assert r.exit_code == 1 and not r.oom_killed
    assert r.status == "out_of_memory" and not r.fits and "Unable to allocate" in r.stderr_tail
    ok = run_confined(alloc(40), profile, mode="rlimit", timeout=60)
    assert ok.status == "ok" and json.loads(ok.stdout_tail) == ok.cpus and len(ok.cpus) == 1  # affinity


def test_auto_falls_back_to_rlimit_when_not_root(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups.os, "geteuid", lambda: 1000)
    r = run_confined(alloc(10), make_profile(tmp_path), timeout=60)
    assert r.emulation == "rlimit" and r.status == "ok" and not r.time_scaled
    assert any("fell back to rlimit" in n and "not running as root" in n for n in r.notes)


def test_host_profile_runs_native_and_reports_failures_and_timeouts():
    host = load_profile("host")
    r = run_confined([PY, "-c", "import sys; print('hi'); sys.exit(3)"], host)
    assert (r.emulation, r.exit_code, r.status, r.stdout_tail) == ("native", 3, "failed", "hi\n")
    assert r.memory_limit_bytes is None and r.cpus is None
    slow = run_confined([PY, "-c", "import time; time.sleep(30)"], host, timeout=0.5)
    # killed, and before its sleep could have ended (how soon after 0.5 s depends on how busy the machine is)
    assert slow.status == "timeout" and slow.exit_code == -9 and slow.wall_seconds < 30
    missing = run_confined(["/nonexistent/program"], host)
    assert missing.exit_code == 127 and "cannot run" in missing.stderr_tail


@needs_cgroups
def test_cli_run_reports_does_not_fit(tmp_path, capsys):
    profile = make_profile(tmp_path, budget_mb=100)
    assert main(["profile", "run", str(profile.path), "--timeout", "60", "--", *alloc(250)]) == 1
    assert "does not fit in 100 MB" in capsys.readouterr().err
    assert main(["profile", "run", str(profile.path), "--json", "--", *alloc(20)]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"


@needs_cgroups
def test_calibrate_under_a_profile_reports_its_speed(tmp_path, capsys):
    # The session's host-speed cache calls this machine the reference, so the board gets 0.25 of a CPU here.
    profile = make_profile(tmp_path, cpu_speed=0.25)
    assert main(["profile", "calibrate", "--profile", str(profile.path), "--repeats", "1", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["emulation"] == "cgroup" and r["host"]["cpu_quota"] == pytest.approx(0.25)
    assert r["host"]["host_speed"] == 1.0 and r["host"]["host_speed_source"] == "cached"
    # Held to a quarter of a CPU: each part got at most that share of the wall time it took (one period's burst
    # allowed for). Timed against the free run above it is not, since a busy neighbour slows that one too.
    # How close to its quota a busy machine lets the job come is not asserted; the figure is the calibration's own.
    shares = {part: r["cpu_seconds"][part] / r["seconds"][part] for part in r["seconds"]}
    assert all(0 < got < 0.25 * 1.3 for got in shares.values()), shares
    assert r["speed"] == pytest.approx(relative_speed(r["seconds"])["speed"]) and r["speed"] > 0


@needs_cgroups
def test_threads_share_what_the_board_s_threads_achieve_together(tmp_path):
    # Two threads on a board whose two cores together go 1.3x one (shared L2 and memory): the job as a whole is
    # held to 1.3 device cores' worth of CPU, not 2.
    path = tmp_path / "shared.toml"
    path.write_text('description = "test box"\narch = "x86_64"\ncpu = "test"\ncores = 2\nram_mb = 256\n'
                    'budget_mb = 128\nthreads = 2\ncpu_speed = 0.2\ncpu_speed_source = "chosen for a test"\n'
                    'thread_scaling = [1.0, 1.3]\nthread_scaling_source = "chosen for a test"\n')
    r = run_confined(busy(2, 0.15), load_profile_file(path), timeout=30)
    assert r.cpu_quota == pytest.approx(0.2) and r.total_quota == pytest.approx(0.26)
    two = share(r.stdout_tail)
    assert 0 < two < 0.31, two  # at most 0.26 of a CPU; linear scaling would allow 0.4
    # The result says how long the quota held the job back (whole job, and summed over its threads): the kernel's
    # counters, whose values depend on what else the machine ran (test_throttling_reads_the_kernels_counters checks
    # the reading). The kernel adds up the time the job was throttled on each CPU it ran on.
    assert r.periods > 0 and 0 <= r.throttled_periods <= r.periods
    assert 0 <= r.throttled_seconds <= r.wall_seconds * len(r.cpus) and r.thread_throttled_seconds >= 0


@pytest.mark.parametrize("version", [1, 2])
def test_throttling_reads_the_kernels_counters(tmp_path, version):
    """What the quota held back, read from cpu.stat as each cgroup version writes it (v1 ns, v2 us)."""
    job_dir, leaves = tmp_path / "job", [tmp_path / "job" / "t0", tmp_path / "job" / "t1"]
    for leaf in leaves:
        leaf.mkdir(parents=True)

    def stat(periods, throttled, seconds):
        held = f"throttled_time {round(seconds * 1e9)}" if version == 1 else f"throttled_usec {round(seconds * 1e6)}"
        return f"nr_periods {periods}\nnr_throttled {throttled}\n{held}\n"

    (job_dir / "cpu.stat").write_text(stat(120, 30, 1.5))
    for leaf, seconds in zip(leaves, (0.25, 0.5)):
        leaf.joinpath("cpu.stat").write_text(stat(100, 10, seconds))
    job = CgroupJob(version, {"memory": job_dir, "cpuset": job_dir, "cpu": job_dir})
    job.leaves = leaves
    assert job.throttling() == {"periods": 120, "throttled_periods": 30, "throttled_seconds": 1.5,
                                "thread_throttled_seconds": 0.75}


# A confined child's pools sleep when idle: onnxruntime's (both engines build their sessions from session_options),
# OpenMP's and OpenBLAS's. The child builds the SessionOptions the engines use and reports what onnxruntime holds.
SPIN_PROBE = [PY, "-c", "import os\nfrom edge_ft.device.ort_api import session_options\no = session_options(2)\n"
              "def get(key):\n    try:\n        return o.get_session_config_entry(key)\n"
              "    except Exception:\n        return 'unset'\n"
              "print(get('session.intra_op.allow_spinning'), get('session.inter_op.allow_spinning'), "
              "os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"]


@pytest.mark.parametrize("mode", ["rlimit", pytest.param("cgroup", marks=needs_cgroups)])
def test_a_confined_child_s_thread_pools_do_not_spin(tmp_path, mode):
    profile = make_profile(tmp_path, name="quad", cores=4, threads=4, cpu_speed=0.2)
    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_FT_ORT_SPINNING", "OMP_WAIT_POLICY")}
    r = run_confined(SPIN_PROBE, profile, env=env, mode=mode, timeout=60)
    assert r.status == "ok", r.stderr_tail
    assert r.stdout_tail.split() == ["0", "0", "PASSIVE", "4"]
    # A caller who wants spinning on (to measure it) keeps it.
    r = run_confined(SPIN_PROBE, profile, env={**env, "EDGE_FT_ORT_SPINNING": "1"}, mode=mode, timeout=60)
    assert r.stdout_tail.split()[:2] == ["1", "1"]


def test_an_unconfined_process_keeps_onnxruntime_s_default_spinning():
    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_FT_ORT_SPINNING", "OMP_WAIT_POLICY")}
    r = run_confined(SPIN_PROBE, load_profile("host"), env=env, timeout=60)
    assert r.emulation == "native" and r.stdout_tail.split()[:3] == ["unset", "unset", "None"]


def test_a_bad_spinning_setting_is_one_clear_error(monkeypatch):
    from edge_ft.device.ort_api import session_options
    from edge_ft.errors import UserError

    monkeypatch.setenv("EDGE_FT_ORT_SPINNING", "sometimes")
    with pytest.raises(UserError, match="EDGE_FT_ORT_SPINNING='sometimes': use 0"):
        session_options(1)


@needs_cgroups
def test_a_capped_job_runs_first_when_its_quota_is_refilled_and_is_ordinary_uncapped():
    # The quota bounds what the job takes; the weight decides that it takes it when refilled, not after neighbours.
    name = "cpu.shares" if not cgroups.is_v2() else "cpu.weight"
    job = CgroupJob.create(64 * MB, [sorted(os.sched_getaffinity(0))[-1]], 0.1, 0.15, 20_000)
    try:
        weight = lambda: int((job.dirs["cpu"] / name).read_text())  # noqa: E731
        assert weight() == cgroups.CAPPED_WEIGHT[job.version]
        job.set_cpu_cap(False)
        assert weight() == cgroups.DEFAULT_WEIGHT[job.version]
        job.set_cpu_cap(True)
        assert weight() == cgroups.CAPPED_WEIGHT[job.version]
    finally:
        job.remove()
    free = CgroupJob.create(64 * MB, [sorted(os.sched_getaffinity(0))[-1]], None, None, 20_000)
    try:
        assert int((free.dirs["cpu"] / name).read_text()) == cgroups.DEFAULT_WEIGHT[free.version]
    finally:
        free.remove()

