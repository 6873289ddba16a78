"""Report, goals and recommendation on synthetic records: the choice follows the rules, cites the figures, says
which constraint rules out what, never picks ort-training for an aarch64 board, and the report's plots decode."""

import json

import pytest

from edge_ft.advice.recommend import Constraints, recommend
from edge_ft.bench.records import REQUIRED, append_record
from edge_ft.cli import main
from edge_ft.emulation.profiles import load_profile
from edge_ft.reports.report import all_goals, write_report

MB = 2**20
TASK = "mnist→digits"
ZERO = "rpi-zero-2w"
# (label, engine) -> accuracy, ms/step, peak RSS MB, payload bytes, fits; the shape of a real rpi-zero-2w sweep
ZERO_RUNS = {
    ("full", "torch"): (0.956, 760, 328, 178_624, False),
    ("lora", "torch"): (0.940, 300, 325, 6_104, False),
    ("full", "ort-training"): (0.956, 130, 93, 178_640, True),
    ("lora", "ort-training"): (0.940, 40, 89, 6_008, True),
    ("full", "ort-step"): (0.956, 250, 97, 178_640, True),
    ("probe", "ort-step"): (0.930, 53, 93, 3_608, True),
    ("probe-cached", "ort-step"): (0.930, 6, 86, 3_608, True),
    ("lora", "ort-step"): (0.940, 74, 95, 6_008, True),
}


def record(profile: str, label: str, engine: str, accuracy: float | None, ms: float | None, rss_mb: float,
           payload: int | None, fits: bool = True, status: str = "ok", **extra) -> dict:
    """A record as edge_ft.bench.measure writes it, with the fields the report and recommend read."""
    p = load_profile(profile)
    native = p.native
    r = {
        "key": f"{profile}-{label}-{engine}", "task": TASK, "method": label.split("-")[0], "label": label,
        "cache_features": label == "probe-cached", "engine": engine, "profile": profile, "arch": p.arch,
        "budget_mb": p.budget_mb, "native": native,
        "installable_on_device": not (engine == "ort-training" and p.arch != "x86_64"),
        "emulation": "native" if native else "cgroup", "time_scaled": not native,
        "cpu_quota": None if native else p.cpu_speed, "threads": p.threads, "status": status, "fits": fits,
        "verdict": "fits" if fits else f"does not fit in {p.budget_mb} MB", "accuracy": accuracy, "steps": 114,
        "ms_per_step_p50": None if ms is None else ms / 3, "ms_per_step_mean": ms, "ms_per_step_p95": ms,
        "epoch_seconds_later": None if ms is None else ms * 38 / 1000, "time_to_accuracy_s": None,
        "feature_cache_seconds": 0.5 if label == "probe-cached" else None,
        "peak_rss_bytes": int(rss_mb * MB), "rss_after_imports_bytes": 54 * MB,
        "train_peak_rss_bytes": int(rss_mb * MB), "flops_per_step": {"full": 48_545_280, "probe": 18_078_720,
                                                                      "lora": 18_949_888}[label.split("-")[0]],
        "trainable_params": {"full": 44_426, "probe": 850, "lora": 1_348}[label.split("-")[0]],
        "payload_bytes": payload, "bundle_bytes": 400_000, "merged_model_bytes": 188_000, "notes": [],
        "settings": {"epochs": 3, "steps": None, "batch": None, "seed": 0, "rank": 2, "alpha": 4.0,
                     "host_speed": 1.0, "target_accuracy": 0.9},
        "base_sha256": "e258395df527" * 5, "versions": {"python": "3.11"}, "wall_seconds": 10.0,
    }
    if native:
        r["ms_per_step_p50"] = ms
    r.update(extra)
    return r


def zero_records() -> list[dict]:
    return [record(ZERO, label, engine, acc, ms, rss, payload, fits)
            for (label, engine), (acc, ms, rss, payload, fits) in ZERO_RUNS.items()]


def test_small_board_gets_the_fastest_run_within_tolerance_and_never_ort_training():
    rec = recommend(zero_records(), load_profile(ZERO), TASK, Constraints())
    # ort-training's lora is faster (40 ms) but has no aarch64 wheel; full is 1.6 points better but 3.4x slower
    assert (rec.choice["label"], rec.choice["engine"]) == ("lora", "ort-step")
    text = "\n".join(rec.lines)
    assert "accuracy 0.940" in text and "74.0 ms/step" in text and "peak RSS 95 MB" in text
    assert "ships 6,008 bytes" in text and "most accurate feasible: full on ort-step, 0.956" in text
    assert ("ruled out: ort-training (full, lora): not installable on aarch64 (the onnxruntime-training wheel "
            "exists only for x86_64)") in text
    assert "ruled out: torch (full, lora): does not fit in 320 MB (full peak RSS 328 MB, lora peak RSS 325 MB)" in text
    assert "faster but 0.026 below the best accuracy" in text and "probe-cached on ort-step" in text
    assert all(r["engine"] != "ort-training" for r in rec.feasible)


def test_an_x86_board_may_choose_ort_training():
    records = [record("cpu-1core-256mb", label, engine, acc, ms, 90, payload)
               for (label, engine), (acc, ms, _, payload, _) in ZERO_RUNS.items() if engine != "torch"]
    rec = recommend(records, load_profile("cpu-1core-256mb"), TASK, Constraints())
    assert (rec.choice["label"], rec.choice["engine"]) == ("lora", "ort-training")


def test_constraints_pick_another_run_or_nothing_and_say_what_rules_out_what():
    zero = load_profile(ZERO)
    fast = recommend(zero_records(), zero, TASK, Constraints(max_step_ms=50))
    assert (fast.choice["label"], fast.choice["engine"]) == ("probe-cached", "ort-step")
    assert "ruled out: ort-step (full, probe, lora): slower than 50 ms/step (full 250 ms, probe 53.0 ms, " \
           "lora 74.0 ms)" in "\n".join(fast.lines)
    none = recommend(zero_records(), zero, TASK, Constraints(max_step_ms=100, min_accuracy=0.95))
    assert none.choice is None and not none.feasible
    text = "\n".join(none.lines)
    assert "no method/engine meets the constraints (peak RSS <= budget 320 MB, step <= 100 ms, " \
           "accuracy >= 0.95)" in text
    assert "ruled out: ort-step (full): slower than 100 ms/step (full 250 ms)" in text
    assert "ruled out: ort-step (probe, probe-cached, lora): accuracy below 0.95" in text
    tight = recommend(zero_records(), zero, TASK, Constraints(max_rss_mb=90))
    assert tight.choice["label"] == "probe-cached"  # the only ort-step run under 90 MB (86 MB)


def test_an_out_of_memory_kill_rules_a_run_out_with_the_cap():
    records = zero_records() + [record(ZERO, "probe", "torch", None, None, 320, None, False, "out_of_memory")]
    rec = recommend(records, load_profile(ZERO), TASK, Constraints())
    assert "probe killed at the cap" in "\n".join(rec.lines)


def test_recommend_cli_answers_from_the_file_as_json(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    for r in zero_records():
        append_record(results, r)
    assert main(["recommend", "--profile", ZERO, "--results", str(results), "--no-measure", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["choice"]["label"] == "lora" and answer["choice"]["engine"] == "ort-step"
    assert {"run": "full/torch", "kind": "memory", "reason": "does not fit in 320 MB",
            "figure": "peak RSS 328 MB"} in answer["excluded"]
    assert main(["recommend", "--profile", "rpi-3b", "--results", str(results), "--no-measure"]) == 2
    assert "no measurements for profile rpi-3b" in capsys.readouterr().err


def host_and_zero() -> list[dict]:
    host = [record("host", "full", "torch", 0.956, 4.0, 450, 178_624),
            record("host", "full", "ort-training", 0.956, 6.8, 100, 178_640),
            record("host", "lora", "torch", 0.940, 2.5, 447, 6_104),
            record("host", "lora", "ort-step", 0.940, 1.0, 98, 6_008, train_peak_rss_bytes=60 * MB),
            record("host", "probe-cached", "ort-step", 0.930, 0.1, 91, 3_608)]
    host[-1]["epoch_seconds_later"], host[-2]["epoch_seconds_later"] = 0.004, 0.125
    return host + zero_records()


def test_cached_lora_is_held_against_uncached_lora_and_cached_probe():
    records = host_and_zero() + [record("host", "lora-cached", "ort-step", 0.940, 0.2, 92, 3_700)]
    records[-1]["epoch_seconds_later"] = 0.007
    cache = {g.name: g for g in all_goals(records)["caching"]}
    against_lora = cache["host ort-step: lora-cached epoch / lora epoch"]
    assert against_lora.measured.startswith("7 / 125 ms = 0.056x") and against_lora.met is True
    against_probe = cache["host ort-step: lora-cached epoch / probe-cached epoch"]
    assert against_probe.measured.startswith("7 / 4 ms = 1.750x") and against_probe.met is False


def test_goal_ratios_are_the_measured_ones():
    goals = all_goals(host_and_zero())
    speed = {g.name: g for g in goals["speed"]}
    assert speed["host full: ort-training vs torch ms/step (p50)"].measured.startswith("6.80 / 4.00 ms = 1.70x")
    assert speed["host full: ort-training vs torch ms/step (p50)"].met is False
    assert speed["host lora: ort-step vs torch ms/step (p50)"].measured.startswith("1.00 / 2.50 ms = 0.40x")
    assert speed["host lora: ort-step vs torch ms/step (p50)"].met is True
    memory = {g.name: g for g in goals["memory"]}
    step = memory["host ort-step: peak / after-import RSS while training"]
    assert step.measured == "1.11x (lora: 60 / 54 MB) to 1.69x (probe-cached: 91 / 54 MB)" and step.met is False
    zero = memory["rpi-zero-2w ort-step: peak / after-import RSS while training"]
    assert zero.measured.startswith("1.59x (probe-cached: 86 / 54 MB) to 1.80x (full: 97 / 54 MB)")
    cache = {g.name: g for g in goals["caching"]}
    assert cache["host ort-step: probe-cached epoch / lora epoch"].measured.startswith("4 / 125 ms = 0.032x")
    board = {g.name: g for g in goals["small board"]}
    assert board["rpi-zero-2w ort-step: full, probe, LoRA fit"].met is True
    assert board["rpi-zero-2w ort-training: full, probe, LoRA fit"].met is False  # probe not measured, no wheel
    assert "probe: not measured" in board["rpi-zero-2w ort-training: full, probe, LoRA fit"].measured


def test_report_tables_plots_and_recommendations(tmp_path):
    import matplotlib.image as mpimg

    records = host_and_zero() + [record(ZERO, "probe", "torch", None, None, 320, None, False, "out_of_memory")]
    assert all(set(REQUIRED) <= set(r) for r in records)
    path = write_report(records, tmp_path, source="synthetic.jsonl")
    text = path.read_text()
    assert "### host (x86_64" in text and "### rpi-zero-2w (aarch64, budget 320 MB" in text
    assert "| probe | torch | OOM | - |" in text and "| full | torch | over budget (328 MB) | 0.956 |" in text
    assert "- probe / torch: does not fit in 320 MB" in text
    assert "| lora | ort-training (no wheel) | fits | 0.940 |" in text
    assert "rpi-zero-2w: lora on ort-step." in text
    for name in ("accuracy_vs_payload", "peak_rss", "step_time", "epoch_time", "flops_vs_time"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name}.png)" in text
        h, w, _ = mpimg.imread(png).shape
        assert h >= 300 and w >= 500


def test_report_cli_refuses_a_missing_or_empty_file(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "no such results file" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("not json\n")
    assert main(["report", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "no benchmark records" in capsys.readouterr().err
    # a record cut down by hand (the timing fields kept, the rest dropped) is named in one line, not a KeyError
    (tmp_path / "slim.jsonl").write_text(json.dumps({"key": "k1", "task": TASK, "method": "lora", "status": "ok",
                                                     "ms_per_step_p50": 12.5}) + "\n")
    assert main(["report", str(tmp_path / "slim.jsonl"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "record 'k1' lacks" in err[0] and "peak_rss_bytes" in err[0], err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bad", [["--max-rss", "0"], ["--min-accuracy", "1.5"], ["--tolerance", "x"]])
def test_recommend_refuses_bad_limits_in_one_line(bad, capsys):
    with pytest.raises(SystemExit) as e:
        main(["recommend", "--profile", ZERO, *bad])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_report_states_the_host_speed_and_the_quota_correction():
    from edge_ft.reports.report import host_speed_text

    records = [record(ZERO, "lora", "ort-step", 0.95, 60, 93, 6_008, True, host_speed_source="cached",
                      host_speed_measured="2026-11-29", quota_efficiency=q) for q in (0.66, 0.71)]
    for r in records:
        r["settings"]["host_speed"] = 0.57
    assert host_speed_text(records) == ("host speed 0.57 of the reference core (cached, measured 2026-11-29); CPU "
                                        "quotas raised by 1 / the measured throttling efficiency (0.66-0.71)")
    assert host_speed_text(zero_records()[:1]) == "host speed 1 of the reference core (not recorded)"
