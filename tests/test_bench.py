"""The sweep: real confined runs produce complete records, a report with decodable plots, resumable re-runs,
an out-of-memory kill recorded as a result while the sweep carries on, and torn-line-proof appends."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from edge_ft.architecture import count_params
from edge_ft.bench import sweep as sweep_module
from edge_ft.bench.measure import SweepSettings
from edge_ft.bench.records import REQUIRED, append_record, latest, read_records, step_ms
from edge_ft.bench.sweep import SweepOptions, plan, run_sweep
from edge_ft.cli import main
from edge_ft.config import MethodConfig
from edge_ft.costmodel import estimate
from edge_ft.emulation.cgroups import CgroupJob, CgroupUnavailable
from edge_ft.emulation.profiles import load_profile, load_profile_file
from edge_ft.errors import UserError

MB = 2**20
TASK = "mnist→digits"
STEPS = 6  # enough to train, evaluate and export; the figures' size is not what is tested here
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cgroup_reason():
    try:
        CgroupJob.create(64 * MB, [sorted(os.sched_getaffinity(0))[0]], 0.5, 0.5, 20_000).remove()
    except CgroupUnavailable as e:
        return str(e)
    return None


needs_cgroups = pytest.mark.skipif(_cgroup_reason() is not None, reason="cgroups not writable here")


def make_profile(folder: Path, name: str, budget_mb: int, cpu_speed: float = 0.5):
    """An x86 board with one core at `cpu_speed` of this machine's and `budget_mb` for the application."""
    path = folder / f"{name}.toml"
    path.write_text(f'description = "test board"\narch = "x86_64"\ncpu = "test"\ncores = 1\nram_mb = {2 * budget_mb}\n'
                    f'budget_mb = {budget_mb}\nthreads = 1\ncpu_speed = {cpu_speed}\n'
                    'cpu_speed_source = "chosen for a test"\n')
    return load_profile_file(path)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, base_checkpoint):
    """One small sweep: probe-cached and LoRA on ort-training, natively and as a 1-core 512 MB board."""
    root = tmp_path_factory.mktemp("bench")
    board = make_profile(root, "board", 512)
    jobs = plan([TASK], ["probe-cached", "lora"], ["ort-training"], [board, load_profile("host")],
                SweepSettings(steps=STEPS))
    opts = SweepOptions(base=str(base_checkpoint), timeout=300, quiet=True, repeats=2)
    records = run_sweep(jobs, root / "results.jsonl", opts)
    return root, jobs, opts, records


@pytest.mark.slow
def test_sweep_records_carry_every_measurement(swept, base_checkpoint):
    root, jobs, _, records = swept
    assert [(r["profile"], r["label"]) for r in records] == [
        ("host", "probe-cached"), ("host", "lora"), ("board", "probe-cached"), ("board", "lora")]  # native first
    for r in records:
        assert set(REQUIRED) <= set(r)
        assert r["status"] == "ok" and r["fits"] is True, r["verdict"]
        assert r["emulation"] == ("native" if r["profile"] == "host" else "cgroup" if _cgroup_reason() is None
                                  else "rlimit")
        assert r["steps"] == STEPS and 0 < r["accuracy"] <= 1
        cfg = MethodConfig(r["method"])
        assert r["trainable_params"] == count_params(cfg)["trainable"] == {"probe": 850, "lora": 1348}[r["method"]]
        run = root / "runs" / r["profile"] / "mnist-digits" / f"{r['label']}-ort-training"
        assert r["payload_bytes"] == (run / "adapter" / "adapter_model.safetensors").stat().st_size
        assert r["merged_model_bytes"] == (run / "model.onnx").stat().st_size
        assert r["rss_after_imports_bytes"] < r["train_peak_rss_bytes"] <= r["peak_rss_bytes"]
        assert r["peak_rss_bytes"] == max(r["sampled_rss_bytes"], r["train_peak_rss_bytes"]) or \
            r["peak_rss_bytes"] == r["ru_maxrss_bytes"]  # the pytest parent is large, so usually not ru_maxrss
        assert r["ms_per_step_p50"] > 0 and r["ms_per_step_p95"] >= r["ms_per_step_p50"]
        assert r["installable_on_device"] is True and r["versions"]["onnxruntime-training-cpu"]
        assert (r["host_speed"], r["host_speed_source"]) == (1.0, "reference")  # the quota scale, stated
        # Work and waiting beside the wall time: CPU-seconds always, throttling wherever a cgroup quota applied.
        assert r["cpu_seconds"] > 0 and r["wall_seconds"] > 0
        if r["profile"] == "host" or _cgroup_reason():
            assert r["throttled_seconds"] is r["periods"] is None
        else:
            assert r["periods"] > 0 and 0 <= r["throttled_periods"] <= r["periods"]
            assert 0 <= r["throttled_seconds"] <= r["wall_seconds"] * len(r["cpus"])
            assert r["thread_throttled_seconds"] >= 0
        repeats = r["repeats_ms_per_step_p50"]  # native runs twice, keeping the faster; a quota-limited run once
        assert len(repeats) == (2 if r["profile"] == "host" else 1) and step_ms(r) == min(repeats)
    lora = next(r for r in records if r["label"] == "lora")
    assert lora["flops_per_step"] == estimate(MethodConfig("lora"), 32).flops["total"]
    cached = next(r for r in records if r["label"] == "probe-cached")
    assert cached["flops_per_step"] == 2 * 32 * 84 * 10 * 2  # fc3 forward + weight gradient on cached features
    assert cached["feature_cache_seconds"] > 0
    board = [r for r in records if r["profile"] == "board"]
    assert all(r["time_scaled"] and r["cpu_quota"] == pytest.approx(0.5) for r in board) or _cgroup_reason()
    lines = (root / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["key"] for line in lines)


@pytest.mark.slow
def test_a_board_timed_by_cpu_time_runs_unthrottled_and_without_root(swept):
    """--timing cpu under rlimit (what a user without root gets): one thread at this machine's speed, its board time
    its CPU time over one board core's share here (0.5), every time figure scaled alike, the fastest of 2 kept."""
    root, _, opts, _ = swept
    jobs = plan([TASK], ["lora"], ["ort-training"], [make_profile(root, "board", 512)],
                SweepSettings(steps=STEPS, timing="cpu"))
    [r] = run_sweep(jobs, root / "cpu-timed.jsonl", replace(opts, mode="rlimit"))
    assert (r["status"], r["timing"], r["time_scaled"], r["emulation"], r["threads"]) == ("ok", "cpu", True,
                                                                                         "rlimit", 1)
    assert r["throttled_seconds"] is None and r["cpu_quota"] == r["total_quota"] == 0.5
    assert r["board_ms_per_step"] == pytest.approx(r["typical_ms_per_step"] / 0.5, rel=0.01)  # the median step
    assert 0 < r["typical_ms_per_step"] <= r["cpu_ms_per_step"] * 1.5  # the mean carries the slower steps
    assert r["board_scale"] == pytest.approx(r["board_ms_per_step"] / r["wall_ms_per_step"], rel=1e-3)
    assert len(r["repeats_ms_per_step_p50"]) == 2 and r["board_ms_per_step"] == min(r["repeats_ms_per_step_p50"])


@pytest.mark.slow
def test_rerun_skips_done_work_and_force_appends(swept, monkeypatch):
    root, jobs, opts, records = swept
    results = root / "results.jsonl"
    before = results.read_text()
    monkeypatch.setattr(sweep_module, "prepare_in_child", lambda spec: pytest.fail("re-run prepared again"))
    again = run_sweep(jobs, results, opts)
    assert results.read_text() == before
    assert [r["key"] for r in again] == [r["key"] for r in records]
    monkeypatch.undo()
    forced = run_sweep(jobs[:1], results, SweepOptions(**{**opts.__dict__, "force": True}))
    lines = results.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])["key"] == forced[0]["key"] == records[0]["key"]
    assert latest(read_records(results))[records[0]["key"]]["started"] == forced[0]["started"]


@pytest.mark.slow
def test_report_from_the_sweep_writes_decodable_plots(swept, tmp_path, capsys):
    import matplotlib.image as mpimg

    root, *_ = swept
    assert main(["report", str(root / "results.jsonl"), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "### host" in text and "### board" in text and "## Goals" in text and "## Recommendation" in text
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["accuracy_vs_payload.png", "epoch_time.png", "flops_vs_time.png",
                                      "peak_rss.png", "step_time.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({png.name})" in text
        h, w, channels = mpimg.imread(png).shape
        assert h >= 300 and w >= 500 and channels in (3, 4)


@needs_cgroups
@pytest.mark.slow
def test_out_of_memory_is_a_result_and_the_sweep_continues(swept, base_checkpoint):
    root, *_ = swept
    # 16 MB: a cgroup charges shared-library pages to whoever read them first, so once onnxruntime's files sit in the
    # page cache a child is charged little beyond its own heap; the cap must sit below that heap, not below its RSS.
    tiny, board = make_profile(root, "tiny", 16), make_profile(root, "board", 512)
    jobs = plan([TASK], ["lora"], ["ort-training"], [tiny, board], SweepSettings(steps=STEPS))
    results = root / "oom.jsonl"
    records = run_sweep(jobs, results, SweepOptions(base=str(base_checkpoint), timeout=300, quiet=True))
    first, second = records
    assert (first["profile"], first["status"], first["fits"]) == ("tiny", "out_of_memory", False)
    assert first["verdict"].startswith("does not fit in 16 MB") and first["accuracy"] is None
    assert (second["profile"], second["status"]) == ("board", "ok")
    assert len(read_records(results)) == 2


def test_a_torn_last_line_is_skipped_and_never_glued_to_the_next(tmp_path):
    path = tmp_path / "results.jsonl"
    append_record(path, {"key": "a", "n": 1})
    with open(path, "a") as f:
        f.write('{"key": "b", "n"')  # a writer killed mid-line
    append_record(path, {"key": "c", "n": 3})
    assert [r["key"] for r in read_records(path)] == ["a", "c"]
    assert path.read_text().splitlines()[-1] == '{"key": "c", "n": 3}'


def test_plan_leaves_out_what_does_not_exist_and_refuses_what_is_wrong():
    host = load_profile("host")
    jobs = plan([TASK], ["probe", "probe-cached"], ["torch", "ort-step"], [host], SweepSettings(epochs=1))
    assert [(j.label, j.engine) for j in jobs] == [("probe", "torch"), ("probe", "ort-step"),
                                                   ("probe-cached", "ort-step")]  # torch has no cached features
    assert len({j.key for j in jobs}) == 3
    with pytest.raises(UserError, match="--steps applies to the ORT engines"):
        plan([TASK], ["lora"], ["torch"], [host], SweepSettings(steps=5))
    with pytest.raises(UserError, match="unknown method or engine 'adapter'"):
        plan([TASK], ["adapter"], ["ort-step"], [host], SweepSettings())


def test_run_key_changes_with_settings_and_board_limits(tmp_path):
    a = plan([TASK], ["lora"], ["ort-step"], [make_profile(tmp_path, "b", 256)], SweepSettings(epochs=1))[0]
    b = plan([TASK], ["lora"], ["ort-step"], [make_profile(tmp_path, "b", 128)], SweepSettings(epochs=1))[0]
    c = plan([TASK], ["lora"], ["ort-step"], [make_profile(tmp_path, "b", 256)], SweepSettings(epochs=2))[0]
    d = plan([TASK], ["lora"], ["ort-step"], [make_profile(tmp_path, "b", 256)],
             SweepSettings(epochs=1, target_accuracy=0.5))[0]
    assert len({a.key, b.key, c.key}) == 3 and a.key == d.key  # the target only changes a derived figure
    e = plan([TASK], ["lora"], ["ort-step"], [make_profile(tmp_path, "b", 256)],
             SweepSettings(epochs=1, timing="cpu"))[0]
    assert e.key != a.key  # timed by CPU time is another measurement; the quota's keys are those of older files


def test_repetitions_run_in_rounds_and_the_fastest_is_kept(tmp_path):
    """Runs at this machine's speed repeat in rounds (a slow stretch here touches different jobs' repetitions);
    a run that did not finish is not repeated; the record kept is the fastest, with every repetition's time."""
    jobs = plan([TASK], ["lora", "probe"], ["ort-step"], [make_profile(tmp_path, "b", 256)],
                SweepSettings(epochs=1, timing="cpu"))
    times = {jobs[0].key: iter([3.0, 2.0, 4.0]), jobs[1].key: iter([None])}
    order = []

    def once(job):
        order.append(job.label)
        ms = next(times[job.key])
        return {"status": "ok" if ms else "out_of_memory", "label": job.label, "time_scaled": True,
                "board_ms_per_step": ms, "ms_per_step_mean": ms}

    done = list(sweep_module._in_rounds(jobs, once, 3))
    assert order == ["lora", "probe", "lora", "lora"]
    assert [runs[0]["label"] for runs in done] == ["probe", "lora"]  # the failed run is done after its first
    best = sweep_module.fastest(done[1])
    assert best["board_ms_per_step"] == 2.0 and best["repeats_ms_per_step_p50"] == [3.0, 2.0, 4.0]


def _own_data(folder: Path) -> Path:
    """train.npz + test.npz of three named Fashion-MNIST classes, as `data convert --test-fraction` writes them."""
    import numpy as np

    from edge_ft.data.npz import save_npz
    from edge_ft.data.readers import read_fashion

    x, y = read_fashion("train", Path(__file__).parent / "fixtures" / "fashion-mnist")
    keep = np.isin(y, [1, 7, 8])
    x, y = x[keep], np.searchsorted([1, 7, 8], y[keep])
    save_npz(folder / "train.npz", x[::2], y[::2], ["Trouser", "Sneaker", "Bag"])
    save_npz(folder / "test.npz", x[1::2], y[1::2], ["Trouser", "Sneaker", "Bag"])
    return folder


def test_own_data_is_checked_and_named_before_any_sweep(tmp_path, capsys):
    own = _own_data(tmp_path / "photos")
    own.mkdir(exist_ok=True)
    results = str(tmp_path / "r" / "results.jsonl")
    for argv, message in [
        (["--data", str(own), "--task", "mnist-fashion"], "not both"),
        (["--data", str(own / "train.npz")], "add --eval TEST.npz"),
        (["--eval", str(own / "test.npz")], "--eval goes with --data"),
        (["--data", str(tmp_path)], "no train.npz in this folder"),
    ]:
        assert main(["bench", "--profiles", "host", "--results", results, *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    from edge_ft.bench.own_data import data_folder
    from edge_ft.data.tasks import task_name, task_slug

    folder = data_folder(own / "train.npz", own / "test.npz", tmp_path / "prep")
    assert folder == data_folder(own, None, tmp_path / "prep") and folder.name.startswith("photos-")
    assert task_name(str(folder)) == str(folder) and task_slug(str(folder)) == folder.name


@pytest.mark.slow
def test_bench_and_recommend_take_your_own_data(tmp_path, capsys, base_checkpoint):
    """They took only the built-in tasks; --data DIR|TRAIN.npz --eval TEST.npz now measures your classes."""
    own = tmp_path / "photos"
    own.mkdir()
    _own_data(own)
    results = tmp_path / "bench" / "results.jsonl"
    sweep = ["--methods", "probe", "--engines", "ort-step", "--steps", "4", "--base", str(base_checkpoint),
             "--results", str(results), "--repeats", "1", "--host-speed", "1", "--quiet"]
    assert main(["bench", "--profiles", "host", "--data", str(own / "train.npz"), "--eval", str(own / "test.npz"),
                 *sweep]) == 0
    (record,) = read_records(results)
    assert record["status"] == "ok" and Path(record["task"]).name.startswith("photos-")
    assert record["accuracy"] is not None and record["trainable_params"] == 84 * 3 + 3  # a 3-class head
    capsys.readouterr()
    assert main(["recommend", "--profile", "host", "--no-measure", "--data", str(own), *sweep[:-1]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("host: probe on ort-step") and "PREDICTED" not in out
