"""`make test-arm`'s pieces that run without qemu or root: the x86-vs-aarch64 comparison (tools/arm/compare.py),
suites and cache keys (tools/arm/rootfs.sh), the summary (tools/arm/summary.py),
and the wheel (tools/build-wheel.sh)."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from edge_ft import __version__

_SPEC = importlib.util.spec_from_file_location("arm_compare", Path(__file__).parents[1] / "tools/arm/compare.py")
compare_mod = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = compare_mod  # dataclasses look their module up while the class is built
_SPEC.loader.exec_module(compare_mod)

LOSSES = [2.3125, 2.2871, 2.25, 2.2013, 2.17, 2.1288, 2.0999, 2.05]


def test_identical_runs_pass_with_zero_difference():
    r = compare_mod.compare("full", LOSSES, list(LOSSES))
    assert (r.count, r.max_abs, r.max_rel, r.passed) == (8, 0.0, 0.0, True)


def test_kernel_noise_passes_but_a_real_divergence_fails():
    noisy = [v * (1 + 3e-6) for v in LOSSES]  # the size of AVX-vs-NEON summation differences
    assert compare_mod.compare("lora", LOSSES, noisy).passed
    diverged = list(LOSSES)
    diverged[-1] += 1e-3  # one step off by 5e-4 relative: beyond the tolerance
    r = compare_mod.compare("lora", LOSSES, diverged)
    assert not r.passed
    assert r.max_abs == pytest.approx(1e-3)


def test_tolerance_boundary_is_inclusive_and_relative():
    x86 = [2.0]
    at_bound = [2.0 + compare_mod.ATOL + compare_mod.RTOL * 2.0]
    assert compare_mod.compare("probe", x86, [at_bound[0] - 1e-12]).passed
    assert not compare_mod.compare("probe", x86, [at_bound[0] + 1e-9]).passed


@pytest.mark.parametrize("arm", [LOSSES[:-1], LOSSES[:-1] + [math.nan], LOSSES[:-1] + [math.inf]])
def test_missing_steps_and_non_finite_losses_fail(arm):
    assert not compare_mod.compare("full", LOSSES, arm).passed


def _write(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_main_prints_table_and_requires_aarch64(tmp_path, capsys):
    x86 = _write(tmp_path / "x86.json", {"losses": LOSSES})
    arm = _write(tmp_path / "arm.json", {"losses": [v + 1e-7 for v in LOSSES]})
    assert compare_mod.main(["--machine", "aarch64", "--case", "full", x86, arm]) == 0
    out = capsys.readouterr().out
    assert "full" in out and "pass" in out and "aarch64" in out
    # Same numbers, but the "emulated" side was really x86: qemu never ran, so the test must fail.
    assert compare_mod.main(["--machine", "x86_64", "--case", "full", x86, x86]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_main_fails_on_missing_results_and_follows_dotted_fields(tmp_path, capsys):
    x86 = _write(tmp_path / "x86.json", {"train": {"losses": LOSSES}})
    arm = _write(tmp_path / "arm.json", {"train": {"losses": LOSSES}})
    assert compare_mod.main(["--machine", "aarch64", "--field", "train.losses", "--case", "lora", x86, arm]) == 0
    assert compare_mod.main(["--machine", "aarch64", "--case", "lora", x86, arm]) == 1  # no top-level "losses"
    assert compare_mod.main(["--machine", "aarch64", "--case", "probe", x86, str(tmp_path / "absent.json")]) == 1
    assert "cannot read results" in capsys.readouterr().err


# --- the shell side: suites, cache keys and names (tools/arm/rootfs.sh), without debootstrap or root ---

REPO = Path(__file__).parents[1]
HOST_PYTHON = REPO / ".venv" / "bin" / "python"


def _bash(script: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """Run SCRIPT after sourcing rootfs.sh, with its cache in CACHE; stdout/stderr captured."""
    full_env = {**os.environ, "EDGE_FT_ARM_CACHE": str(cache), **env}
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source tools/arm/rootfs.sh; {script}'], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=60)


def _cache_names(cache: Path, suite: str, repo: Path = REPO) -> tuple[str, str]:
    r = _bash(f'arm_suite_select {suite}; cache_paths "{repo}"; echo "$ARM_BASE_TARBALL"; echo "$ARM_TARBALL"', cache)
    assert r.returncode == 0, r.stderr
    base, rootfs = r.stdout.split()
    return Path(base).name, Path(rootfs).name


def test_each_suite_has_its_own_cache_key_and_file_name(tmp_path):
    names = {suite: _cache_names(tmp_path, suite) for suite in ("bookworm", "trixie")}
    for suite, (base, rootfs) in names.items():
        assert re.fullmatch(rf"arm-base-{suite}-[0-9a-f]{{16}}\.tar\.zst", base)
        assert re.fullmatch(rf"arm-rootfs-{suite}-[0-9a-f]{{16}}\.tar\.zst", rootfs)
    # Same suite, same inputs: the same key (a cached tarball is found again); other suite: other keys.
    assert _cache_names(tmp_path, "trixie") == names["trixie"]
    key = lambda name: name.rsplit("-", 1)[1]  # noqa: E731
    assert key(names["bookworm"][0]) != key(names["trixie"][0])
    assert key(names["bookworm"][1]) != key(names["trixie"][1])


def test_a_device_requirements_change_rebuilds_the_venv_layer_but_keeps_debootstrap(tmp_path):
    repo = tmp_path / "repo"
    (repo / "requirements").mkdir(parents=True)
    device_txt = (REPO / "requirements/device.txt").read_text()
    (repo / "requirements/device.txt").write_text(device_txt)
    before = _cache_names(tmp_path, "trixie", repo)
    assert before == _cache_names(tmp_path, "trixie")
    (repo / "requirements/device.txt").write_text(device_txt.replace("numpy==", "numpy>="))
    after = _cache_names(tmp_path, "trixie", repo)
    assert after[0] == before[0] and after[1] != before[1]


def test_unknown_suite_is_refused_naming_the_known_ones(tmp_path):
    r = _bash("arm_suite_select buster", tmp_path)
    assert r.returncode == 1
    assert "unknown Debian suite 'buster' in ARM_SUITES (known: bookworm trixie)" in r.stderr
    # The harness checks ARM_SUITES before it needs root or touches anything.
    for value in ("bookworm buster", " "):
        r = subprocess.run(["bash", "tools/test-arm.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "ARM_SUITES": value, "EDGE_FT_ARM_CACHE": str(tmp_path)})
        assert r.returncode == 1 and "ARM_SUITES" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_pruning_keeps_the_other_suites_tarballs_and_drops_stale_and_suite_less_ones(tmp_path):
    current = _cache_names(tmp_path, "bookworm")
    other = ["arm-base-trixie-0123456789abcdef.tar.zst", "arm-rootfs-trixie-fedcba9876543210.tar.zst"]
    stale = ["arm-base-bookworm-0000000000000000.tar.zst", "arm-rootfs-bookworm-1111111111111111.tar.zst",
             "arm-base-9360af267cb64b72.tar.zst", "arm-rootfs-f5bd85dcbc2d813c.tar.zst"]  # the last two: one suite
    unrelated = ["arm-rootfs-bookworm-build.log", "notes.txt"]
    for name in [*current, *other, *stale, *unrelated]:
        (tmp_path / name).write_bytes(b"x")
    r = _bash(f'arm_suite_select bookworm; cache_paths "{REPO}"; prune_cache', tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*current, *other, *unrelated])


@pytest.mark.parametrize("layout", ["deb822", "one-line"])
def test_debian_mirror_is_the_hosts_main_archive_whatever_its_suite(tmp_path, layout):
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    if layout == "deb822":
        (apt / "sources.list.d/debian.sources").write_text(
            "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: trixie-security\n\n"
            "Types: deb\nURIs: http://mirror.test/debian\nSuites: trixie trixie-updates\nComponents: main\n")
    else:
        (apt / "sources.list").write_text("deb http://mirror.test/debian-security bookworm-security main\n"
                                          "deb [arch=amd64] http://mirror.test/debian bookworm main\n")
    r = _bash(f'debian_mirror "{apt}"', tmp_path)
    assert r.stdout.strip() == "http://mirror.test/debian"


def test_no_configured_mirror_is_refused_in_one_line(tmp_path):
    (tmp_path / "apt" / "sources.list.d").mkdir(parents=True)
    r = _bash(f'debian_mirror "{tmp_path / "apt"}"', tmp_path)
    assert r.returncode != 0 and r.stdout == "", r.stdout
    assert r.stderr.strip().startswith("no Debian mirror in") and len(r.stderr.strip().splitlines()) == 1
    assert "://" not in (REPO / "tools/arm/rootfs.sh").read_text().split("debian_mirror() {")[1].split("\n}")[0]


# --- the summary: one row per suite, a closing count, non-zero exit when any suite failed ---

sys.modules["compare"] = compare_mod  # summary.py imports its neighbour by that name
_SUMMARY_SPEC = importlib.util.spec_from_file_location("arm_summary", REPO / "tools/arm/summary.py")
summary_mod = importlib.util.module_from_spec(_SUMMARY_SPEC)
sys.modules[_SUMMARY_SPEC.name] = summary_mod
_SUMMARY_SPEC.loader.exec_module(summary_mod)

METHODS = ["full", "probe", "lora"]


def _versions(python: str) -> dict:
    return {"machine": "aarch64", "python": python, "numpy": "2.4.6", "onnxruntime": "1.32.0",
            "providers": ["CPUExecutionProvider"], "edge_ft": "0.1.0",
            "edge_ft_dir": f"/opt/edge-ft/venv/lib/python{python[:4]}/site-packages/edge_ft"}


def _fake_suite(work: Path, suite: str, python: str, *, exit_code: int = 0, methods=METHODS, drift: float = 0.0):
    folder = work / suite
    folder.mkdir(parents=True)
    (folder / "facts").write_text(f"rootfs=built in 371 s\nrestore_ms=2100\nos=Debian GNU/Linux 13 ({suite})\n"
                                  f"machine=aarch64\nrun_s=96\nexit={exit_code}\n")
    (folder / "smoke.json").write_text(json.dumps(_versions(python)))
    compare_mod.write_json(str(folder / "smoke-cases.json"),
                           [compare_mod.compare("smoke", [0.1, 0.9], [0.1, 0.9])], "aarch64", "outputs")
    if methods:
        cases = [compare_mod.compare(m, LOSSES, [v + drift for v in LOSSES]) for m in methods]
        compare_mod.write_json(str(folder / "train-cases.json"), cases, "aarch64", "losses")


def test_summary_has_a_row_per_suite_and_passes_when_all_do(tmp_path):
    _fake_suite(tmp_path, "bookworm", "3.11.2")
    _fake_suite(tmp_path, "trixie", "3.13.5")
    text, status = summary_mod.report(tmp_path, ["bookworm", "trixie"], METHODS, "cortex-a53", "0", "w.whl")
    assert status == 0
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("bookworm ", "trixie "))}
    assert rows["trixie"][1:5] == ["Debian", "13", "3.13.5", "2.4.6"] and rows["trixie"][-1] == "pass"
    assert rows["bookworm"][3] == "3.11.2"
    assert "imported from /opt/edge-ft/venv/lib/python3.13/site-packages/edge_ft" in text
    assert text.splitlines()[-1] == "test-arm: 8 passed, 0 failed"


def test_summary_fails_a_suite_that_diverged_stopped_early_or_crashed(tmp_path):
    _fake_suite(tmp_path, "bookworm", "3.11.2", drift=1e-2)  # every method beyond the tolerance
    _fake_suite(tmp_path, "trixie", "3.13.5", exit_code=1, methods=[])  # died before training
    text, status = summary_mod.report(tmp_path, ["bookworm", "trixie"], METHODS, "cortex-a53", "0", "w.whl")
    assert status == 1
    assert text.splitlines()[-1] == "test-arm: 2 passed, 6 failed"  # the two smoke runs passed
    assert "trixie: tools/arm/suite.sh exited 1" in text
    # A suite whose cases all passed but whose process failed afterwards still counts one failure.
    _fake_suite(tmp_path / "w2", "trixie", "3.13.5", exit_code=1)
    text, status = summary_mod.report(tmp_path / "w2", ["trixie"], METHODS, "cortex-a53", "0", "w.whl")
    assert status == 1 and text.splitlines()[-1] == "test-arm: 4 passed, 1 failed"
    # A suite that never got as far as a rootfs: all its cases are failures.
    text, status = summary_mod.report(tmp_path / "w3", ["trixie"], METHODS, "cortex-a53", "0", "w.whl")
    assert status == 1 and text.splitlines()[-1] == "test-arm: 0 passed, 4 failed"


# --- the wheel: built outside the checkout, installs on its own ---

def _checkout_state() -> tuple[str, list[str]]:
    """git status, plus the build leftovers git ignores (build/, *.egg-info other than the editable install's)."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    leftovers = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("build"), *REPO.glob("**/*.egg-info")]
                       if ".venv" not in p.parts)
    return status, leftovers


@pytest.mark.slow  # ~5-9 s: a setuptools build, a venv and a pip install
def test_built_wheel_installs_with_no_deps_into_a_fresh_venv_and_leaves_the_checkout_clean(tmp_path):
    before = _checkout_state()
    out = subprocess.run(["bash", "tools/build-wheel.sh", "--sdist", str(tmp_path / "dist")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel, sdist = (Path(p) for p in out.stdout.split())
    assert wheel.name == f"edge_ft-{__version__}-py3-none-any.whl" and sdist.name == f"edge_ft-{__version__}.tar.gz"
    assert wheel.is_file() and sdist.is_file()
    assert _checkout_state() == before
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(f"edge_ft-{__version__}.dist-info/METADATA").decode()
    assert "edge_ft/py.typed" in names
    assert "edge_ft/emulation/device_profiles/rpi-3b.toml" in names  # the profiles ride along as package data
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    assert "Requires-Python: >=3.10\n" in metadata
    assert 'onnxruntime-training-cpu==1.19.2; (platform_machine == "x86_64" and python_version < "3.13")' in metadata
    # A fresh venv (no pip of its own: the host's pip installs into it), the wheel alone.
    venv.create(tmp_path / "venv", with_pip=False)
    py = tmp_path / "venv" / "bin" / "python"
    r = subprocess.run([str(HOST_PYTHON), "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                        "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "venv" / "bin" / "edge-ft").is_file()
    code = "import edge_ft, importlib.metadata as m; print(m.version('edge-ft'), edge_ft.__file__)"
    r = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    version, path = r.stdout.split()
    assert version == __version__ and path.startswith(str(tmp_path / "venv"))


def test_build_refuses_a_python_without_new_enough_setuptools(tmp_path):
    venv.create(tmp_path / "bare", with_pip=False)  # no setuptools at all
    r = subprocess.run(["bash", "tools/build-wheel.sh", str(tmp_path / "dist")], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHON": str(tmp_path / "bare/bin/python")})
    assert r.returncode == 1 and "no setuptools>=77" in r.stderr
    assert _checkout_state()[1] == sorted(str(p.relative_to(REPO)) for p in REPO.glob("*.egg-info"))
