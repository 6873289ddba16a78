"""This machine's speed: measured once per machine and cached, overridden by --host-speed, scaling every quota;
the throttling correction; `edge-ft profile check` on a real cgroup."""

import json

import pytest

from edge_ft.cli import main
from edge_ft.emulation import hostspeed
from edge_ft.emulation.hostspeed import HostSpeed, work_fractions
from tests.test_emulate import needs_cgroups


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty cache folder of this test's own (the session's says 'reference, no correction')."""
    monkeypatch.setenv(hostspeed.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / hostspeed.CACHE_FILE


def fake_calibration(monkeypatch, speeds):
    """calibrate_native returns these speeds in turn; returns the list of calls made."""
    calls = []

    def fake(repeats, cpus=None):
        calls.append(repeats)
        return {"speed": speeds[(len(calls) - 1) % len(speeds)], "per_part": {}, "seconds": {}}

    monkeypatch.setattr(hostspeed, "calibrate_native", fake)
    return calls


def test_measured_once_per_machine_then_cached(own_cache, monkeypatch):
    calls = fake_calibration(monkeypatch, [0.52, 0.40, 0.61])
    first = HostSpeed.resolve(quiet=True)
    assert (first.speed, first.source) == (0.52, "measured")  # the median of three whole calibrations
    assert len(calls) == hostspeed.SPEED_RUNS
    entry = next(iter(json.loads(own_cache.read_text())["machines"].values()))
    assert entry["speed"] == 0.52 and entry["speeds"] == [0.40, 0.52, 0.61] and entry["measured"]
    again = HostSpeed.resolve(quiet=True)
    assert (again.speed, again.source, again.measured) == (0.52, "cached", first.measured)
    assert len(calls) == hostspeed.SPEED_RUNS  # nothing measured the second time
    assert HostSpeed.resolve(given=0.8, quiet=True).to_record()["host_speed_source"] == "given"
    # Another CPU model or library version is another machine: measured again, the first entry kept.
    monkeypatch.setattr(hostspeed, "machine_key", lambda: {"cpu": "another", "numpy": "9"})
    assert HostSpeed.resolve(quiet=True).source == "measured"
    assert len(json.loads(own_cache.read_text())["machines"]) == 2
    assert HostSpeed.resolve(refresh=True, quiet=True).source == "measured"


def test_damaged_cache_is_measured_again(own_cache, monkeypatch):
    fake_calibration(monkeypatch, [0.5])
    own_cache.parent.mkdir(parents=True)
    own_cache.write_text("{not json")
    assert HostSpeed.resolve(quiet=True).source == "measured"
    assert json.loads(own_cache.read_text())["machines"]
    key = hostspeed._key_text(hostspeed.machine_key())
    for entry in ({"speed": "fast"}, {"speed": -1}, [1, 2], {"speed": 0.5, "quota_efficiency": {"0.1": "x"}}):
        own_cache.write_text(json.dumps({"machines": {key: entry}}))
        host = HostSpeed.resolve(quiet=True)  # never a traceback: bad figures are measured again or dropped
        assert host.speed == 0.5 and host.efficiency == {}


def test_quota_is_the_board_share_raised_by_the_efficiency():
    host = HostSpeed(0.5, "given", efficiency={"0.2": 0.8})
    assert host.share(0.1) == pytest.approx(0.2)  # a 0.1 board on a 0.5 host: a fifth of a CPU here
    assert host.thread_quota(0.1) == (pytest.approx(0.25), 0.8)  # raised so the job gets the work of 0.2
    assert host.thread_quota(0.7) == (pytest.approx(1.4), 1.0)  # a board faster than this core: no cap
    plain = HostSpeed(0.5, "given", correct_quota=False)
    assert plain.thread_quota(0.1) == (pytest.approx(0.2), 1.0)
    assert HostSpeed.reference().thread_quota(0.3) == (0.3, 1.0)


def test_real_calibration_is_cached(own_cache):
    host = HostSpeed.resolve(quiet=True)
    assert host.source == "measured" and host.speed > 0
    assert HostSpeed.resolve(quiet=True).speed == host.speed
    assert set(hostspeed.machine_key()) >= {"cpu", "cores", "python", "numpy", "blas", "calibration"}


@needs_cgroups
def test_work_fractions_gives_one_figure_per_capped_phase():
    fractions = work_fractions(0.3, cycles=3)
    # One figure per capped phase. Its value is a rate measured against the free phases beside it, which a busy
    # machine slows by any amount (then a capped phase does more than 0.3 of their work): `profile check` reports
    # it; the quota's own ceiling is asserted by CPU time in test_emulate.
    assert len(fractions) == 3 and all(f > 0 for f in fractions), fractions
    # Per CPU-second instead of per wall second: the throttling efficiency, likewise a measured figure.
    efficiencies = work_fractions(0.3, cycles=2, clock="cpu")
    assert len(efficiencies) == 2 and all(e > 0 for e in efficiencies), efficiencies


@needs_cgroups
def test_profile_check_measures_speed_threads_and_memory(tmp_path, capsys):
    board = tmp_path / "duo.toml"
    board.write_text('description = "two slow cores"\narch = "x86_64"\ncpu = "test"\ncores = 2\nram_mb = 256\n'
                     'budget_mb = 96\nthreads = 2\ncpu_speed = 0.3\ncpu_speed_source = "chosen for a test"\n'
                     'thread_scaling = [1.0, 1.3]\nthread_scaling_source = "chosen for a test"\n')
    assert main(["profile", "check", "--profiles", str(board), "--cycles", "3", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host"]["host_speed"] == 1.0  # the session's reference cache
    (c,) = out["checks"]
    assert c["emulation"] == "cgroup" and c["thread_quota"] == pytest.approx(0.3) and len(c["accuracy"]) == 3
    assert c["speed_ratio"] > 0 and all(a > 0 for a in c["accuracy"]), c["accuracy"]  # a measured figure
    # Two busy threads get at most 1.3x one thread's quota together (the board's shared caches), not 2x; beside
    # busy neighbours they may get less than their quota (0.61x of one thread's at a load of 10 on 2 vCPUs).
    assert 0 < c["achieved_speedup"] < 1.6, c["achieved_speedup"]
    # The cap stops the allocation: what survived is below the budget and above it less the interpreter.
    assert c["memory_end"] == "OOM-killed at the cap" and 96 - 64 <= c["largest_allocation_mb"] < 96


def test_profile_check_refuses_the_native_profile():
    assert main(["profile", "check", "--profiles", "host"]) == 2
