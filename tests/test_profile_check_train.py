"""`edge-ft profile check --workload train`: the real training step, confined, N runs per board and method."""

import json

import pytest

from edge_ft.cli import main
from edge_ft.emulation.cgroups import CgroupJob, CgroupUnavailable
from edge_ft.emulation.check_train import TrainCheck, train_table


def _cgroups_work() -> bool:
    try:
        CgroupJob.create(64 << 20, [0], 0.5, 0.5, 20_000).remove()
    except CgroupUnavailable:
        return False
    return True


def test_the_verdict_needs_both_the_ratio_and_the_spread_within_10_percent():
    steady = TrainCheck("b", "lora", 4, free_ms=2.0, expected_ms=40.0, one_ms=[40.8, 40.0, 39.2],
                        many_ms=[30.0, 31.0, 29.5], target_speedup=1.5)
    assert steady.ratio == pytest.approx(1.0) and steady.holds
    assert steady.speedup == pytest.approx(40.0 / 30.0)
    jumpy = TrainCheck("b", "lora", 4, 2.0, 40.0, [41.0, 40.0, 39.0], [30.0, 45.0, 29.5], 1.5)
    assert jumpy.ratio == pytest.approx(1.0) and not jumpy.holds  # the threaded runs moved by 50%
    slow = TrainCheck("b", "lora", 4, 2.0, 40.0, [50.0, 50.0, 50.0], [30.0, 30.0, 30.0], 1.5)
    assert slow.ratio == pytest.approx(0.8) and not slow.holds
    rows = train_table([steady, jumpy])
    assert rows[0][3] == "40.0 (±2%)" and rows[0][-1] == "within 10%" and rows[1][-1] == "off by more than 10%"
    assert steady.thread_cost is None and rows[0][7] == rows[0][8] == "-"  # CPU per step not recorded


def test_threads_that_cost_twice_the_cpu_per_step_are_allowed_half_the_profile_s_speed_up():
    # The quota hands two threads 1.5 cores' worth of CPU time; a step whose two threads burn 2x the CPU time of one
    # (waking each other between kernels) can only go 0.75x as fast as one thread under it, whatever the quota does.
    c = TrainCheck("b", "lora", 2, 2.0, 40.0, [40.0, 40.0], [53.0, 54.0], 1.5, one_cpu_ms=[2.0, 2.2],
                   many_cpu_ms=[4.2, 4.2])
    assert c.thread_cost == pytest.approx(2.0) and c.allowed_speedup == pytest.approx(0.75)
    row = train_table([c])[0]
    assert row[7:9] == ["2.00x", "0.75"] and c.to_dict()["allowed_speedup"] == pytest.approx(0.75)


@pytest.mark.skipif(not _cgroups_work(), reason="cgroups not writable here: nothing is time-scaled")
def test_check_train_measures_each_method_and_prints_its_table(tmp_path, base_checkpoint, capsys):
    board = tmp_path / "board.toml"
    board.write_text('description = "test board"\narch = "x86_64"\ncpu = "test"\ncores = 2\nram_mb = 1024\n'
                     'budget_mb = 512\nthreads = 2\ncpu_speed = 0.5\ncpu_speed_source = "chosen for a test"\n')
    args = ["profile", "check", "--workload", "train", "--profiles", str(board), "--methods", "probe",
            "--runs", "2", "--steps", "3", "--base", str(base_checkpoint), "--out", str(tmp_path / "check"),
            "--quiet", "--timing", "quota"]
    assert main(args + ["--json"]) == 0
    (check,) = json.loads(capsys.readouterr().out)["checks"]
    assert (check["profile"], check["method"], check["threads"]) == ("board", "probe", 2)
    assert len(check["one_ms"]) == len(check["many_ms"]) == 2 and check["free_ms"] > 0
    assert check["expected_ms"] == pytest.approx(check["free_ms"] * 1.0 / 0.5, rel=1e-3)  # host speed 1.0 (tests)
    assert check["ratio"] > 0 and check["one_spread"] >= 0 and isinstance(check["holds"], bool)
    assert len(check["one_cpu_ms"]) == len(check["many_cpu_ms"]) == 2 and check["thread_cost"] > 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 thread: median ms (spread)" in out and out.strip().splitlines()[-1].split()[:2] == ["board", "probe"]


def test_check_train_timed_by_cpu_time_needs_no_cgroup_and_lands_on_the_expectation(tmp_path, base_checkpoint,
                                                                                    capsys):
    """--timing cpu (rlimit: no root needed): every run is one unthrottled thread, its board time the typical
    step's CPU time over one board core's share (0.5 here), the board's 2 threads credited with 2x; so one thread's
    board time lands near the free run scaled by the same share (the expectation), and the threads cost no more."""
    board = tmp_path / "board.toml"
    board.write_text('description = "test board"\narch = "x86_64"\ncpu = "test"\ncores = 2\nram_mb = 1024\n'
                     'budget_mb = 512\nthreads = 2\ncpu_speed = 0.5\ncpu_speed_source = "chosen for a test"\n')
    assert main(["profile", "check", "--workload", "train", "--profiles", str(board), "--methods", "lora",
                 "--runs", "2", "--steps", "40", "--base", str(base_checkpoint), "--out", str(tmp_path / "check"),
                 "--quiet", "--timing", "cpu", "--mode", "rlimit", "--json"]) == 0
    (check,) = json.loads(capsys.readouterr().out)["checks"]
    assert check["timing"] == "cpu" and len(check["one_ms"]) == len(check["many_ms"]) == 2
    assert 0.5 < check["ratio"] < 1.5  # a wrong share or thread credit is off by 2x or more
    assert 0.5 < check["thread_cost"] < 1.5 and 1.2 < check["speedup"] < 3.3  # 2x by construction, give or take


def test_check_train_refuses_an_unknown_method(capsys):
    assert main(["profile", "check", "--workload", "train", "--profiles", "rpi-3b", "--methods", "bias"]) != 0
    assert "--methods: choose from full, probe, lora" in capsys.readouterr().err
