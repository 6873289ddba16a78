"""Board time from CPU time: the meter counts this process's threads, the quota's arithmetic, the emulation hands
the child its shares, and a run's results.json and bench record carry the figures."""

import json
import threading
import time

import pytest

from edge_ft.bench.measure import cpu_fields
from edge_ft.bench.records import step_ms
from edge_ft.cli import main
from edge_ft.contracts import QUOTA_ENV
from edge_ft.device.board_time import CpuMeter, Quota, epochs_cpu, quota_from_env, step_cpu, thread_cpu_seconds
from tests.ort_step_support import bundle_path
from tests.ort_training_support import npz_pair
from tests.test_emulate import CGROUP_REASON, make_profile
from tests.test_prefix_cache import ADAMW, CACHED


def burn(seconds: float) -> None:
    """Spin until this thread has used `seconds` of CPU time (however long that takes on a busy machine)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_the_meter_counts_every_thread_and_finds_the_busiest():
    """Threads alive at stop() count (onnxruntime's pool lives as long as its session)."""
    done, release = threading.Event(), threading.Event()

    def work():
        burn(0.3)
        done.set()
        release.wait()

    meter = CpuMeter().start()
    worker = threading.Thread(target=work)
    worker.start()
    burn(0.1)
    done.wait()
    total, busiest = meter.stop()
    release.set()
    worker.join()
    assert 0.3 <= busiest < total  # the worker's 0.3 s, on its own thread
    assert total >= 0.4
    assert threading.get_native_id() in thread_cpu_seconds()



def test_the_running_thread_is_counted_to_the_moment_not_to_its_last_tick():
    """schedstat shows a running thread's runtime as of its last tick or switch (4 ms apart at HZ=250): work shorter
    than a tick, done without asking the kernel for the thread's clock (a training step does not), read as 0 or as 4 ms
    there. The meter reads the caller's own clock. Ten stretches of 1.5 ms of wall time spent computing."""
    for _ in range(10):
        meter = CpuMeter().start()
        t0 = time.thread_time()
        end = time.perf_counter() + 0.0015
        while time.perf_counter() < end:  # perf_counter leaves the kernel's runtime of this thread as it was
            pass
        total, busiest = meter.stop()
        own = time.thread_time() - t0
        # the caller was the busiest, counted to the moment; the meter's clock reads and this test's bracket it a
        # fraction of a microsecond apart, either way
        assert own - 0.0003 <= busiest <= own + 0.0003
        assert busiest <= total


def test_the_quota_bounds_a_step_by_its_busiest_thread_and_by_the_whole_job():
    quota = Quota(thread=0.05, job=0.09)
    assert quota.board_seconds(cpu_seconds=1.0, busiest_seconds=1.0) == pytest.approx(20.0)  # one thread
    assert quota.board_seconds(cpu_seconds=4.0, busiest_seconds=1.0) == pytest.approx(4.0 / 0.09)  # four, even
    assert quota_from_env({QUOTA_ENV: quota.env_value()}) == quota
    for bad in ("", "0.05", "x,y", "0,0.1", "0.2,0.1", "0.05,inf"):
        assert quota_from_env({QUOTA_ENV: bad}) is None
    epochs = [{"cpu_steps": 5, "cpu_seconds": 1.0, "busiest_cpu_seconds": 1.0, "seconds": 1.5},
              {"cpu_steps": 4, "cpu_seconds": 0.8, "busiest_cpu_seconds": 0.8, "seconds": 0.9}]
    assert epochs_cpu(epochs[:1], quota)["steps"] == 5
    later = epochs_cpu(epochs, quota)  # the first epoch left out: the same steps' CPU and wall time
    assert later["steps"] == 4 and later["warmup_left_out"]
    assert later["wall_ms_per_step"] == pytest.approx(225.0) and later["ms_per_step"] == pytest.approx(200.0)
    block = step_cpu(10, 0.02, 0.015, quota)
    assert block["ms_per_step"] == 2.0 and block["busiest_thread_ms_per_step"] == 1.5
    assert block["board_ms_per_step"] == pytest.approx(0.015 / 0.05 / 10 * 1e3)
    assert step_cpu(10, 0.02, 0.015, None)["board_ms_per_step"] is None


@pytest.mark.skipif(CGROUP_REASON is not None, reason=f"cgroups not writable: {CGROUP_REASON}")
def test_a_time_scaled_child_is_given_its_shares_and_an_unscaled_one_none(tmp_path, monkeypatch):
    from edge_ft.emulation.emulate import confine

    monkeypatch.setenv(QUOTA_ENV, "0.5,1")  # a caller's stale value never reaches a child
    scaled = confine(make_profile(tmp_path, cores=2, threads=2, cpu_speed=0.5), mode="cgroup")
    lifted = confine(make_profile(tmp_path, cores=2, threads=2, cpu_speed=0.5), mode="cgroup", cpu_cap=False)
    try:
        assert quota_from_env(scaled.env) == Quota(scaled.thread_share, scaled.total_share)
        assert QUOTA_ENV not in lifted.env
    finally:
        scaled.remove()
        lifted.remove()


def test_a_run_records_its_steps_cpu_time_and_the_board_time_under_a_quota(tmp_path, monkeypatch):
    train, _ = npz_pair()
    monkeypatch.setenv(QUOTA_ENV, Quota(0.05, 0.09).env_value())
    out = tmp_path / "run"
    assert main(["train", str(bundle_path(CACHED["lora"][0], ADAMW)), "--data", str(train), "--batch", "64",
                 "--epochs", "2", "--threads", "1", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    cpu = results["cpu"]
    epochs = results["epochs"]
    assert all(e["cpu_steps"] == e["steps"] and e["busiest_cpu_seconds"] <= e["cpu_seconds"] for e in epochs)
    assert cpu["warmup_left_out"] and cpu["steps"] == sum(e["steps"] for e in epochs[1:])  # the first: warm-up
    assert 0 < cpu["busiest_thread_ms_per_step"] <= cpu["ms_per_step"]
    assert cpu["quota"] == {"thread": 0.05, "job": 0.09}
    per_step = Quota(0.05, 0.09).board_seconds(cpu["ms_per_step"], cpu["busiest_thread_ms_per_step"])
    assert cpu["board_ms_per_step"] == pytest.approx(per_step, rel=1e-3)
    record = {"time_scaled": True, "ms_per_step_mean": 1.0, **cpu_fields(cpu)}
    assert step_ms(record) == cpu["board_ms_per_step"]  # what bench, report and recommend read
    assert step_ms({**record, "board_ms_per_step": None}) == 1.0  # records from before it


def test_cpu_timing_runs_one_unthrottled_thread_and_hands_it_the_boards_threads_together(tmp_path):
    """--timing cpu: no quota, the memory cap and cores kept, one thread standing for the board's threads (its CPU
    time over one board core's share x thread_scaling); rlimit mode (no root) is timed the same way."""
    from edge_ft.emulation.emulate import confine
    from edge_ft.emulation.hostspeed import HostSpeed

    board = make_profile(tmp_path, cores=2, threads=2, cpu_speed=0.3)
    host = HostSpeed(0.6, "given")
    for mode in ("rlimit",) + (("cgroup",) if CGROUP_REASON is None else ()):
        conf = confine(board, mode=mode, host=host, timing="cpu")
        try:
            fields = conf.fields()
            speedup = board.thread_speedup(2)
            assert quota_from_env(conf.env) == Quota(0.5 * speedup, 0.5 * speedup)
            assert (fields["timing"], fields["time_scaled"], fields["threads"]) == ("cpu", True, 1)
            assert conf.thread_share is None and conf.efficiency is None  # nothing throttles it
            assert conf.memory_limit_bytes == board.budget_bytes
            assert any("timed by CPU time" in note for note in fields["notes"])
        finally:
            conf.remove()
    paced = confine(board, mode="rlimit", host=host)  # the quota's timing without cgroups: not time-scaled
    assert QUOTA_ENV not in paced.env and paced.fields()["timing"] is None
    # what a job's command line asks for agrees with its confinement: one thread timed by CPU time on a board, the
    # profile's threads on this machine (native runs are never scaled) and under the quota
    from edge_ft.emulation.emulate import threads_to_run
    from edge_ft.emulation.profiles import load_profile

    here = load_profile("host")
    assert threads_to_run(board, 2, "cpu") == 1 and threads_to_run(board, 2, "quota") == 2
    assert threads_to_run(board, 2, "cpu", cpu_cap=False) == 2 and threads_to_run(board, 2, "cpu", "native") == 2
    native = confine(here, host=host, timing="cpu")
    assert threads_to_run(here, here.threads, "cpu") == native.threads == here.threads
    assert native.fields()["timing"] is None and QUOTA_ENV not in native.env


def test_a_cpu_timed_record_reads_as_the_board_every_time_figure_scaled_alike():
    from edge_ft.bench.measure import board_clock_fields

    record = {"board_ms_per_step": 40.0, "wall_ms_per_step": 2.0, "ms_per_step_p50": 1.9, "ms_per_step_p95": 2.5,
              "ms_per_step_mean": 2.2, "epoch_seconds_mean": 0.5, "epoch_seconds_later": 0.4,
              "feature_cache_seconds": None, "epochs": [{"seconds": 0.6, "accuracy": 0.5},
                                                         {"seconds": 0.4, "accuracy": 0.7}]}
    scaled = board_clock_fields(record)
    assert scaled["board_scale"] == 20.0
    assert (scaled["ms_per_step_p50"], scaled["ms_per_step_p95"], scaled["epoch_seconds_later"]) == (38.0, 50.0, 8.0)
    assert [e["seconds"] for e in scaled["epochs"]] == [12.0, 8.0] and scaled["feature_cache_seconds"] is None
    assert board_clock_fields({**record, "board_ms_per_step": None}) == {"time_scaled": False, "board_scale": None}
