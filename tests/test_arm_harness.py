"""The x86-vs-aarch64 comparison of `make test-arm` (tools/arm/compare.py): what passes, what fails, and why."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

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
