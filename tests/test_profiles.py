"""Device profiles load and validate; the CLI lists, shows and calibrates; the calibration workload is a real LeNet."""

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest

from edge_ft.cli import main
from edge_ft.emulation import calibrate
from edge_ft.emulation.profiles import (PROFILES_ENV, list_profiles, load_profile, profile_paths, shipped_profiles_dir)
from edge_ft.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"rpi-zero-2w", "rpi-3b", "rpi-4b-2gb", "rpi-5-4gb", "cpu-1core-256mb", "host"}
GOOD = {
    "description": '"test board"', "arch": '"aarch64"', "cpu": '"4x Cortex-A53"', "cores": "4", "ram_mb": "512",
    "budget_mb": "320", "threads": "4", "cpu_speed": "0.05", "cpu_speed_source": '"estimate: test"',
}


def write_profile(folder: Path, name: str = "board", **changes) -> Path:
    """A profile file from GOOD with keys changed (value None drops the key); values are TOML literals."""
    table = {**GOOD, **changes}
    path = folder / f"{name}.toml"
    path.write_text("".join(f"{k} = {v}\n" for k, v in table.items() if v is not None))
    return path


def test_shipped_profiles_all_load():
    profiles = {p.name: p for p in list_profiles()}
    assert SHIPPED <= set(profiles)
    for p in profiles.values():
        assert 0 < p.budget_mb <= p.ram_mb and 1 <= p.threads <= p.cores and p.cpu_speed > 0
        assert p.cpu_speed_source and p.description
    zero = profiles["rpi-zero-2w"]
    assert (zero.arch, zero.cores, zero.ram_mb, zero.native) == ("aarch64", 4, 512, False)
    assert zero.cpu_speed_is_estimate  # shipped speeds are estimates and must say so
    for name in ("rpi-zero-2w", "rpi-3b", "rpi-4b-2gb", "rpi-5-4gb"):  # every Pi cites what its figures rest on
        pi = profiles[name]
        assert "ncnn" in pi.cpu_speed_source and "ncnn" in pi.thread_scaling_source
        assert 1.4 <= pi.thread_speedup(4) <= 1.9 and pi.thread_speedup(9) == pi.thread_speedup(4)
    assert profiles["cpu-1core-256mb"].thread_speedup(4) == 1.0  # one core: threads add nothing
    assert profiles["rpi-3b"].ram_mb == 1024 and profiles["cpu-1core-256mb"].cores == 1


def test_thread_speedup_defaults_to_linear(tmp_path):
    board = load_profile(str(write_profile(tmp_path, "linear")))
    assert [board.thread_speedup(n) for n in (1, 2, 4)] == [1.0, 2.0, 4.0]
    scaled = load_profile(str(write_profile(tmp_path, "scaled", thread_scaling="[1, 1.25, 1.5, 1.75]",
                                            thread_scaling_source='"measured"')))
    assert [scaled.thread_speedup(n) for n in (1, 2, 3, 4)] == [1.0, 1.25, 1.5, 1.75]
    assert scaled.to_dict()["thread_scaling"] == [1.0, 1.25, 1.5, 1.75]


def test_host_profile_reads_this_machine():
    host = load_profile("host")
    assert host.native
    assert host.cores == len(os.sched_getaffinity(0)) == host.threads
    assert 0 < host.budget_mb <= host.ram_mb


def test_repo_folder_is_the_shipped_folder():
    # The checkout's install reads device_profiles/ at the repository root in place (the wheel carries a copy).
    assert (REPO / "device_profiles").resolve() == shipped_profiles_dir().resolve()
    assert {p.stem for p in (REPO / "device_profiles").glob("*.toml")} >= SHIPPED


def test_load_by_path_and_env_override(tmp_path, monkeypatch):
    path = write_profile(tmp_path, "rpi-3b", cpu_speed="0.061", cpu_speed_source='"measured: on my board"')
    assert load_profile(str(path)).cpu_speed == pytest.approx(0.061)
    assert load_profile("rpi-3b").cpu_speed != pytest.approx(0.061)
    monkeypatch.setenv(PROFILES_ENV, str(tmp_path))
    mine = load_profile("rpi-3b")  # the user's folder wins over the shipped estimate
    assert mine.path == path and not mine.cpu_speed_is_estimate
    assert profile_paths()["rpi-zero-2w"].parent == shipped_profiles_dir()


@pytest.mark.parametrize("changes, key", [
    ({"colour": '"red"'}, "colour"),  # unknown key
    ({"budget_mb": None}, "budget_mb"),  # missing key
    ({"cpu_speed_source": None}, "cpu_speed_source"),
    ({"ram_mb": "-512"}, "ram_mb"),  # negative memory
    ({"budget_mb": "0"}, "budget_mb"),
    ({"budget_mb": "600"}, "budget_mb"),  # budget > RAM
    ({"threads": "8"}, "threads"),  # threads > cores
    ({"cores": "0", "threads": "1"}, "cores"),
    ({"cpu_speed": "0"}, "cpu_speed"),  # speed <= 0
    ({"cpu_speed": "-1.5"}, "cpu_speed"),
    ({"cpu_speed": "nan"}, "cpu_speed"),
    ({"arch": '"mips"'}, "arch"),  # unknown arch
    ({"cores": '"four"'}, "cores"),  # wrong type
    ({"threads": "true"}, "threads"),  # a bool is not a count
    ({"cpu_speed": '"auto"'}, "cpu_speed"),  # "auto" only where it can be measured
    ({"native": '"yes"'}, "native"),
    ({"thread_scaling": "[1.0, 1.5]", "thread_scaling_source": '"x"'}, "thread_scaling"),  # not one per core
    ({"thread_scaling": "[1.2, 1.5, 1.8, 2.0]", "thread_scaling_source": '"x"'}, "thread_scaling"),  # not from 1
    ({"thread_scaling": "[1, 1.5, 1.4, 2.0]", "thread_scaling_source": '"x"'}, "thread_scaling"),  # falls
    ({"thread_scaling": "[1, 2.5, 2.6, 2.7]", "thread_scaling_source": '"x"'}, "thread_scaling"),  # 2 threads > 2x
    ({"thread_scaling": '[1, "a", 2, 3]', "thread_scaling_source": '"x"'}, "thread_scaling"),
    ({"thread_scaling": "[1, 1.3, 1.6, 1.9]"}, "thread_scaling"),  # no source
    ({"thread_scaling": "1.9", "thread_scaling_source": '"x"'}, "thread_scaling"),  # not a list
])
def test_bad_profile_names_file_and_key(tmp_path, changes, key):
    path = write_profile(tmp_path, **changes)
    with pytest.raises(UserError) as e:
        load_profile(str(path))
    assert str(path) in str(e.value) and repr(key) in str(e.value)


def test_unreadable_and_unknown_profiles(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("cores = = 4\n")
    with pytest.raises(UserError, match=r"broken\.toml: not valid TOML"):
        load_profile(str(bad))
    with pytest.raises(UserError, match="no such profile file"):
        load_profile(str(tmp_path / "missing.toml"))
    with pytest.raises(UserError, match=r"no device profile named 'rpi-9'.*rpi-3b"):
        load_profile("rpi-9")


def test_auto_values_resolve(tmp_path):
    p = load_profile(str(write_profile(tmp_path, arch='"auto"', cores='"auto"', threads='"auto"',
                                       ram_mb='"auto"', budget_mb='"auto"')))
    assert p.cores == p.threads == len(os.sched_getaffinity(0))
    assert p.arch in ("x86_64", "aarch64") and p.budget_mb <= p.ram_mb


def test_cli_list_and_show(capsys, tmp_path):
    assert main(["profile", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SHIPPED) and "est." in out
    assert main(["profile", "show", "rpi-4b-2gb", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["cpu"].startswith("4x Cortex-A72") and shown["budget_mb"] == 1536
    assert main(["profile", "show", str(write_profile(tmp_path, threads="9"))]) == 2
    assert "'threads'" in capsys.readouterr().err


def test_lenet_workload_gradients_match_finite_differences():
    x, y = calibrate.synthetic_batch(4, seed=1)
    base = calibrate.NumpyLeNet(seed=3)
    rng = np.random.default_rng(5)
    for layer in ("conv1", "conv2", "fc1", "fc3"):
        stepped = copy.deepcopy(base)
        stepped.step(x, y, lr=1.0)
        grad = base.w[layer] - stepped.w[layer]  # SGD with lr 1 moves by exactly the gradient
        d = rng.standard_normal(grad.shape).astype(np.float32)
        d /= np.linalg.norm(d)

        def loss(w):
            net = copy.deepcopy(base)
            net.w[layer] = w.astype(np.float32)
            return net.step(x, y, lr=0.0)

        numeric = (loss(base.w[layer] + 1e-2 * d) - loss(base.w[layer] - 1e-2 * d)) / 2e-2
        assert numeric == pytest.approx(float((grad * d).sum()), rel=0.15, abs=1e-3), layer


def test_relative_speed_is_a_geometric_mean():
    ref = calibrate.REFERENCE
    same = calibrate.relative_speed(dict(ref["seconds"]))
    assert same["speed"] == pytest.approx(1.0)
    slower = {"matmul": ref["seconds"]["matmul"] * 8, "lenet_step": ref["seconds"]["lenet_step"] * 4,
              "python": ref["seconds"]["python"] * 2}
    assert calibrate.relative_speed(slower)["speed"] == pytest.approx(0.25)  # (1/8 * 1/4 * 1/2) ** (1/3)


def test_cli_calibrate_measures_this_machine(capsys):
    assert main(["profile", "calibrate", "--repeats", "1", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["emulation"] == "native" and set(r["seconds"]) == set(calibrate.PARTS) and r["clock"] == "cpu"
    # A free core is timed by CPU time; its speed is that of the parts against the reference, whatever it comes to
    # on this machine and at this moment (that figure is what `profile calibrate` reports, not what it asserts).
    assert r["speed"] == pytest.approx(calibrate.relative_speed(r["cpu_seconds"])["speed"]) and r["speed"] > 0
