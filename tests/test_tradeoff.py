"""Per-model sweeps (`edge-ft bench --models`): the batch search, a real confined sweep of DS-CNN whose memory cap
forces "does not fit" inside the searched range, its report and the per-model recommendation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_ft.advice.model_choice import recommend_model
from edge_ft.advice.recommend import Constraints
from edge_ft.bench.prepare import MODEL_NAMES
from edge_ft.bench.records import REQUIRED, TASK, TRADEOFF, append_record, read_records
from edge_ft.bench.tradeoff import TradeoffSettings, plan_models, search_max_batch
from edge_ft.cli import main
from edge_ft.emulation.profiles import load_profile_file
from edge_ft.errors import UserError
from edge_ft.reports.format import fmt_ms
from edge_ft.reports.tradeoff_report import models_page

REPO = Path(__file__).resolve().parents[1]
DEVICE_PYTHON = REPO / ".venv-device" / "bin" / "python"
MB = 2**20
BUDGET_MB = 96  # DS-CNN's probe step: ~75 MB at batch 8, ~110 MB at 256 (onnxruntime's import alone is ~57 MB)
MAX_BATCH = 512


def board(folder: Path, budget_mb: int):
    """A 1-core x86 board as fast as this machine (no CPU quota: the test measures memory, not speed)."""
    path = folder / f"b{budget_mb}.toml"
    path.write_text(f'description = "test board"\narch = "x86_64"\ncpu = "test"\ncores = 1\nram_mb = {2 * budget_mb}\n'
                    f'budget_mb = {budget_mb}\nthreads = 1\ncpu_speed = 1.0\ncpu_speed_source = "chosen for a test"\n')
    return path


@pytest.mark.parametrize("limit", [1, 5, 100, 127, 128, 513, 5000])
@pytest.mark.parametrize("start", [1, 32])
def test_search_brackets_the_limit_with_few_probes(limit, start):
    probed = []

    def fits(batch):
        probed.append(batch)
        return batch <= limit

    lo, hi = search_max_batch(fits, start, 1024)
    if limit >= 1024:
        assert (lo, hi) == (1024, None)
    else:
        assert lo <= limit < hi and hi - lo <= max(1, lo // 8)
    assert len(probed) == len(set(probed)) <= 14 and max(probed) <= 1024


def test_search_when_nothing_fits_and_with_a_known_start():
    assert search_max_batch(lambda b: False, 8, 64) == (0, 1)
    probed = []
    assert search_max_batch(lambda b: probed.append(b) or b <= 40, 32, 64, known=True) == (40, 44)
    assert 32 not in probed  # the timed run already answered for the start batch


def test_records_of_each_kind_are_read_apart(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, {"key": "a", "task": "mnist→digits"})
    append_record(path, {"key": "b", "kind": TRADEOFF, "model": "ds-cnn"})
    assert [r["key"] for r in read_records(path)] == ["a"]  # task readers never see a per-model record
    assert [r["key"] for r in read_records(path, kind=TRADEOFF)] == ["b"]
    assert [r["key"] for r in read_records(path, kind=None)] == ["a", "b"] and TASK == "task"


def test_plan_refuses_unknown_models_and_methods(tmp_path):
    b = load_profile_file(board(tmp_path, 96))
    with pytest.raises(UserError, match="unknown model 'lenet'"):
        plan_models(["lenet"], ["full"], [b], TradeoffSettings())
    with pytest.raises(UserError, match="bias-cached"):  # bias has no frozen prefix
        plan_models(["ds-cnn"], ["bias-cached"], [b], TradeoffSettings())
    jobs = plan_models(list(MODEL_NAMES), ["full", "probe-cached"], [b], TradeoffSettings())
    assert len(jobs) == 2 * len(MODEL_NAMES)
    cached = [j for j in jobs if j.label == "probe-cached"]
    assert all(j.method == "probe" and j.cached for j in cached) and not any(j.cached for j in jobs if j not in cached)
    # the cache's size is part of a cached label's key only: uncached runs measured before keep theirs
    small = TradeoffSettings(cache_examples=100)
    assert cached[0].key != plan_models([cached[0].model], ["probe-cached"], [b], small)[0].key
    assert jobs[0].key == plan_models([jobs[0].model], ["full"], [b], small)[0].key


def test_model_names_are_the_reference_models():
    from edge_ft.host.models import REFERENCE_MODELS

    assert set(MODEL_NAMES) == {"lenet5", *REFERENCE_MODELS}


def test_step_probe_imports_neither_torch_nor_onnx():
    python = DEVICE_PYTHON if DEVICE_PYTHON.exists() else Path(sys.executable)
    code = ("import sys, edge_ft.device.step_probe, edge_ft.bench.tradeoff; "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules")
    subprocess.run([str(python), "-c", code], check=True, cwd=REPO)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """DS-CNN probe, LoRA and cached LoRA (the cheap exports) at batch 8 on a 96 MB board, searched up to 512."""
    root = tmp_path_factory.mktemp("models")
    profile = board(root, BUDGET_MB)
    results = root / "results.jsonl"
    argv = ["bench", "--models", "ds-cnn", "--methods", "probe,lora,lora-cached", "--profiles", str(profile),
            "--batch", "8", "--steps", "2", "--max-batch", str(MAX_BATCH), "--results", str(results), "--quiet"]
    assert main(argv) == 0
    return root, profile, results, argv


def _cgroups_work():
    from edge_ft.bench.sweep import _cgroups_work

    return _cgroups_work()


@pytest.mark.slow
@pytest.mark.skipif(not _cgroups_work(), reason="cgroups not writable here")
def test_a_memory_cap_stops_the_batch_search_where_the_budget_ends(swept):
    root, _, results, _ = swept
    records = read_records(results, kind=TRADEOFF)
    assert [r["label"] for r in records] == ["probe", "lora", "lora-cached"] and not read_records(results)
    for r in records:
        assert all(k in r for k in REQUIRED) and r["accuracy"] is None and r["emulation"] == "cgroup"
        assert r["status"] == "ok" and r["fits"] and r["batch"] == 8 and r["ms_per_step_mean"] > 0
        # timed by CPU time (bench's default): one thread, the board time of its median step, the means scaled alike
        assert (r["timing"], r["threads"], r["time_scaled"]) == ("cpu", 1, True) and r["board_ms_per_step"] > 0
        assert r["board_scale"] == pytest.approx(r["board_ms_per_step"] / r["wall_ms_per_step"], rel=1e-3)
        assert len(r["repeats_ms_per_step_p50"]) == 5 and r["board_ms_per_step"] == min(r["repeats_ms_per_step_p50"])
        assert r["total_params"] == 23_756 + (2 * (64 + 12) if r["method"] == "lora" else 0)  # + lora_A, lora_B
        assert r["cache_features"] == (r["label"] == "lora-cached")
        assert r["flops_per_step"] > 0
        lo, hi = r["max_fitting_batch"], r["first_failing_batch"]
        if r["cache_features"]:  # the prefix's activations are gone from the step: larger batches fit
            assert hi is None and lo == MAX_BATCH or 8 <= lo < hi <= MAX_BATCH and hi - lo <= max(1, lo // 8)
        else:
            assert 8 <= lo < hi <= MAX_BATCH and hi - lo <= max(1, lo // 8)  # the cap bites inside the range
        for p in r["search"]:  # every probe agrees with the bracket, and "fits" means within the budget
            assert p["fits"] == (p["batch"] <= lo)
            assert not p["fits"] or p["peak_rss_bytes"] <= BUDGET_MB * MB
    probe, lora, cached = records
    assert (probe["trainable_params"], lora["trainable_params"]) == (780, 2 * (64 + 12))
    # the cached label trains the same LoRA on a cache of 5000 examples' features (x and W0 x + b: 64 + 12 floats),
    # which its peak RSS carries; its step runs the head alone
    assert cached["method"] == "lora" and cached["trainable_params"] == lora["trainable_params"]
    assert cached["feature_cache"]["examples"] == 5000 and cached["feature_cache"]["in_memory"]
    assert cached["feature_cache"]["bytes"] == 5000 * (64 + 12) * 4
    assert cached["flops_per_step"] < lora["flops_per_step"]
    assert cached["max_fitting_batch"] > lora["max_fitting_batch"]
    # the bundles are cached: a re-run measures nothing and exports nothing
    bundles = sorted((root / "prep" / "models" / "ds-cnn" / "bundles").iterdir())
    mtimes = [(b / "manifest.json").stat().st_mtime for b in bundles]
    assert main(swept[3]) == 0 and len(read_records(results, kind=TRADEOFF)) == 3
    assert [(b / "manifest.json").stat().st_mtime for b in bundles] == mtimes


@pytest.mark.slow
@pytest.mark.skipif(not _cgroups_work(), reason="cgroups not writable here")
def test_report_and_recommend_per_model(swept, tmp_path, capsys):
    root, profile, results, _ = swept
    assert main(["report", str(results), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "### DSCNN (ds-cnn, input 1x49x10, 12 classes)" in text and "| b96 | probe | 23,756 | 780 |" in text
    png = (tmp_path / "peak_rss_vs_batch.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    records = read_records(results, kind=TRADEOFF)
    # the docs page sets each cached label beside its method: one row, LoRA, with both step times and the cache
    page = models_page(records, "results.jsonl", {"cpus": 2, "processor": "test", "command": "bench --models"})
    lora, cached = (next(r for r in records if r["label"] == name) for name in ("lora", "lora-cached"))
    row = next(line for line in page.splitlines() if line.startswith("| b96 | ds-cnn |"))
    assert row.startswith(f"| b96 | ds-cnn | lora | {fmt_ms(lora)} | {fmt_ms(cached)} | ")
    assert f"| {cached['feature_cache']['bytes'] / MB:.1f} |" in row and "### DSCNN" in page
    lora = next(r for r in records if r["method"] == "lora")
    device = load_profile_file(profile)
    rec = recommend_model(records, device, "ds-cnn", Constraints(), batch=8)
    assert rec.choice["method"] == "probe"  # fits, and trains more parameters (780) than LoRA (152)
    # beyond what probe and LoRA fit, the cached LoRA (its step keeps no prefix activations) is what is left
    beyond = max(r["first_failing_batch"] for r in records if not r["cache_features"])
    rec = recommend_model(records, device, "ds-cnn", Constraints(), batch=beyond)
    assert rec.choice["label"] == "lora-cached" and rec.choice["max_fitting_batch"] >= beyond
    rec = recommend_model(records, device, "ds-cnn", Constraints(max_rss_mb=lora["peak_rss_bytes"] / MB - 1), batch=8)
    assert all(r["peak_rss_bytes"] <= lora["peak_rss_bytes"] - MB for r in rec.feasible)
    capsys.readouterr()
    assert main(["recommend", "--model", "ds-cnn", "--profile", str(profile), "--results", str(results), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["choice"]["label"] == "probe" and "accuracy is not part" in answer["explanation"][-1]
    assert main(["recommend", "--model", "resnet8", "--profile", str(profile), "--results", str(results)]) == 2
    assert "no per-model measurements of resnet8" in capsys.readouterr().err


def _probe(bundle: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    python = DEVICE_PYTHON if DEVICE_PYTHON.exists() else Path(sys.executable)
    return subprocess.run([str(python), "-m", "edge_ft.device.step_probe", str(bundle), "--batch", "16", "--steps",
                           "3", "--warmup", "1", "--threads", "1", "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True)


def test_step_probe_trains_the_head_on_a_feature_cache_in_memory_or_mapped(tmp_path):
    from ort_step_support import bundle_path

    from edge_ft.config import MethodConfig, OptimizerConfig

    bundle = bundle_path(MethodConfig("lora", rank=2, targets=("fc1", "fc2", "fc3")), OptimizerConfig("adamw", lr=0.01))
    features = json.loads((bundle / "manifest.json").read_text())["features"]["shape"]
    runs = {}
    for name, budget in (("memory", []), ("mapped", ["--budget-mb", "1"])):  # 600 x features x 4 B > 0.5 MB
        done = _probe(bundle, tmp_path / f"{name}.json", "--cache", "600", *budget)
        assert done.returncode == 0, done.stderr
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for name, r in runs.items():
        cache = r["feature_cache"]
        assert cache["examples"] == 600 and cache["features_shape"] == features
        assert cache["bytes"] == 600 * features[0] * 4 and cache["in_memory"] == (name == "memory")
        assert r["method"]["method"] == "lora" and len(r["losses"]) == 4
    # the same features and batches, kept in memory or in a file: the same steps
    assert runs["memory"]["losses"] == runs["mapped"]["losses"]
    done = _probe(bundle, tmp_path / "plain.json")
    assert done.returncode == 0 and json.loads((tmp_path / "plain.json").read_text())["feature_cache"] is None


def test_step_probe_refuses_a_cache_where_there_is_no_prefix(tmp_path):
    from ort_step_support import bundle_path

    from edge_ft.config import MethodConfig, OptimizerConfig

    done = _probe(bundle_path(MethodConfig("full"), OptimizerConfig("adamw", lr=0.01)), tmp_path / "p.json",
                  "--cache", "10")
    assert done.returncode == 2 and "no frozen prefix to cache" in done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "p.json").exists()
