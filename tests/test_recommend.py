"""Recommend for a board nobody measured: a predicted answer labelled as such, under the same feasibility rule, with
the command that measures it and its expected duration; predictions checked against measurements; a warning when
the compared runs were measured differently. Synthetic records in the shape of a real rpi-zero-2w sweep."""

import json

import pytest
from test_report import TASK, ZERO, ZERO_RUNS
from test_report import record as report_record

from edge_ft.advice import forecast as predict
from edge_ft.advice.recommend import Constraints, recommend
from edge_ft.bench import sweep as sweep_module
from edge_ft.bench.measure import SweepSettings
from edge_ft.bench.records import append_record
from edge_ft.cli import main
from edge_ft.emulation.profiles import load_profile

BOARD = "rpi-3b"  # never measured in these files


def record(*args, **extra) -> dict:
    r = report_record(*args, **extra)
    r["epochs"] = [{"seconds": 1.0, "accuracy": r["accuracy"]}] * 3  # 3 epochs of 38 steps, as the settings say
    if r["label"] == "probe-cached":
        r["flops_per_step"] = 2 * 32 * 84 * 10 * 2  # what measure records: fc3 alone on cached features
    return r


def zero_records() -> list[dict]:
    return [record(ZERO, label, engine, acc, ms, rss, payload, fits)
            for (label, engine), (acc, ms, rss, payload, fits) in ZERO_RUNS.items()]


def results_file(tmp_path, records) -> str:
    path = tmp_path / "results.jsonl"
    for r in records:
        append_record(path, r)
    return str(path)


@pytest.fixture
def no_sweep(monkeypatch):
    monkeypatch.setattr(sweep_module, "run_sweep", lambda *a, **k: pytest.fail("recommend ran a sweep"))


def speed(name: str) -> float:
    p = load_profile(name)
    return p.cpu_speed * p.thread_speedup(p.threads)


def test_unmeasured_board_gets_a_predicted_answer_labelled_as_such(tmp_path, capsys, no_sweep):
    results = results_file(tmp_path, zero_records())
    assert main(["recommend", "--profile", BOARD, "--results", results]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"{BOARD}: PREDICTED lora on ort-step (nothing measured for {BOARD} on {TASK} yet; a "
                        "prediction, not a measurement).")
    body = [line for line in lines[1:] if not line.startswith(("  to measure it", "  or `"))]
    assert body and all(line.startswith("  [predicted] ") for line in body)
    text = "\n".join(lines)
    # The zero's 74 ms LoRA step scaled by the two boards' speeds (cpu_speed x thread speed-up)
    assert f"{74 * speed(ZERO) / speed(BOARD):.1f} ms/step = 18.9 MFLOP/step" in text
    assert "accuracy 0.940 is not a prediction: measured with other settings (epochs 3) on rpi-zero-2w" in text
    assert "ruled out: ort-training (full, probe, probe-cached, lora): not installable on aarch64" in text
    command = f"edge-ft bench --profiles {BOARD} --task mnist-digits --results {results}"
    measure = next(line for line in lines if line.startswith("  to measure it"))
    assert measure.startswith("  to measure it (11 runs, expected ~") and measure.endswith(command)
    assert f"`edge-ft recommend --profile {BOARD} --measure --task mnist-digits --results {results}`" in text


def test_predicted_answer_as_json(tmp_path, capsys, no_sweep):
    results = results_file(tmp_path, zero_records())
    assert main(["recommend", "--profile", BOARD, "--results", results, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["basis"] == "predicted"
    assert (answer["choice"]["label"], answer["choice"]["engine"]) == ("lora", "ort-step")
    preds = {(p["label"], p["engine"]): p for p in answer["predictions"]}
    assert all(p["basis"] == "predicted" for p in preds.values()) and len(preds) == 11  # the default sweep's runs
    assert preds["probe", "torch"]["rate_source"] == predict.DEMO_SOURCE  # the zero measured no torch probe
    lora = preds["lora", "ort-step"]
    assert lora["ms_per_step_mean"] == pytest.approx(74 * speed(ZERO) / speed(BOARD))
    assert lora["flops"] == {"forward": 18_111_232, "backward_input": 752_384, "backward_weight": 86_272,
                                      "total": 18_949_888}  # the cost model at batch 32, as `edge-ft analyze`
    assert lora["memory_mb"]["import"] == 54 and lora["accuracy"] == 0.94
    # the recipe's 20 epochs of the task's 1,200 examples at batch 32 (the records ran 3 epochs)
    assert lora["steps"] == 20 * 38 and lora["job_seconds"] > 760 * lora["ms_per_step_mean"] / 1000
    assert answer["measure"]["command"].startswith(f"edge-ft bench --profiles {BOARD} ")
    assert answer["measure"]["runs"] == 11 and answer["measure"]["expected_seconds"] > 0
    assert answer["check"] == [] and answer["mixed_runs"] == []


def test_predicted_answer_applies_the_feasibility_rule(tmp_path, capsys, no_sweep):
    results = results_file(tmp_path, zero_records())
    assert main(["recommend", "--profile", BOARD, "--results", results, "--json", "--max-rss", "10"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["choice"] is None and answer["feasible"] == []
    assert {e["kind"] for e in answer["excluded"]} == {"rss", "arch"}
    assert answer["explanation"][0].startswith(f"{BOARD}: PREDICTED: no method/engine would meet the constraints "
                                               "(peak RSS <= 10 MB)")
    assert main(["recommend", "--profile", BOARD, "--results", results, "--max-step-ms", "5"]) == 0
    text = capsys.readouterr().out
    assert "PREDICTED: no method/engine would meet" in text
    assert "[predicted] ruled out: ort-step (full, probe, probe-cached, lora): slower than 5 ms/step" in text
    # the 1 GB board's budget lets torch in, the 320 MB zero's does not
    assert "torch (full, lora): does not fit in 320 MB" not in text


def test_accuracy_is_borrowed_or_unknown_never_predicted(tmp_path, capsys, no_sweep):
    board = load_profile(BOARD)
    settings = SweepSettings(steps=10)
    other = [dict(r, task="mnist→fashion") for r in zero_records()]  # measured, but on another task
    preds = predict.predict_runs(other, board, TASK, settings, ["probe", "lora"], ["ort-step"])
    assert all(p["accuracy"] is None for p in preds)
    assert {p["accuracy_source"] for p in preds} == {"never measured for this method on the task"}
    rec = predict_choice(preds, board, Constraints())
    assert rec.choice["label"] == "probe"  # accuracy cannot decide, so the cheaper step does
    assert predict_choice(preds, board, Constraints(min_accuracy=0.5)).choice is None
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"tasks": [{"task": TASK, "methods": [
        {"label": "probe", "mean": 0.953, "recipe": {"epochs": 20}, "accuracies": [0.95, 0.955, 0.954]},
        {"label": "lora-r2", "mean": 0.962, "recipe": {"epochs": 20}, "accuracies": [0.96, 0.96, 0.966]}]}]}))
    preds = predict.predict_runs(other, board, TASK, settings, ["probe", "lora"], ["ort-step"], table=table)
    assert [p["accuracy"] for p in preds] == [0.953, 0.962]
    assert preds[1]["accuracy_source"] == f"finetune table {table} (torch, 20 epochs, mean of 3 seeds)"


def predict_choice(preds, board, c):
    from edge_ft.advice.recommend import choose

    return choose(preds, board, TASK, c)


def test_no_records_at_all_predicts_from_the_documented_constants(tmp_path, capsys, no_sweep):
    results = results_file(tmp_path, [])
    assert main(["recommend", "--profile", BOARD, "--results", results, "--steps", "20", "--engines", "ort-step",
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    lora = next(p for p in answer["predictions"] if p["label"] == "lora")
    assert lora["rate_source"] == predict.DEMO_SOURCE and lora["gflops_per_reference_core"] == 4.45
    assert lora["accuracy"] is None and lora["steps"] == 20
    assert "--steps 20 --engines" not in answer["measure"]["command"]  # options in the sweep's own order
    assert answer["measure"]["command"].endswith(f"--engines ort-step --steps 20 --results {results}")


def test_prediction_checked_against_measurements(tmp_path, capsys, no_sweep):
    """Rates come from the other profiles only; a run measured 5x slower than its prediction is flagged."""
    # The 4B measured exactly as the zero's runs and the two boards' speeds predict, except one run
    four = [record("rpi-4b-2gb", label, engine, acc, ms * speed(ZERO) / speed("rpi-4b-2gb"), rss, payload)
            for (label, engine), (acc, ms, rss, payload, _) in ZERO_RUNS.items()]
    slow = next(r for r in four if (r["label"], r["engine"]) == ("full", "ort-step"))
    slow["ms_per_step_mean"] *= 5
    results = results_file(tmp_path, zero_records() + four)
    assert main(["recommend", "--profile", "rpi-4b-2gb", "--results", results, "--predict", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["basis"] == "predicted"
    rows = {row["run"]: row for row in answer["check"]}
    assert len(rows) == 8
    assert rows["full/ort-step"]["ms_ratio"] == pytest.approx(0.2) and rows["full/ort-step"]["off_by_3x"]
    others = [row for run, row in rows.items() if run != "full/ort-step"]
    assert all(row["ms_ratio"] == pytest.approx(1.0) and not row["off_by_3x"] for row in others)
    assert main(["recommend", "--profile", "rpi-4b-2gb", "--results", results, "--predict"]) == 0
    text = capsys.readouterr().out
    assert "rpi-4b-2gb: PREDICTED lora on ort-step (--predict; measured answer: lora on ort-step)." in text
    assert "check against the measurements of rpi-4b-2gb" in text and "<- OFF BY 5.0x" in text


def test_compared_runs_that_differ_get_one_warning_line(tmp_path, capsys):
    board = load_profile(ZERO)
    alike = recommend(zero_records(), board, TASK)
    assert alike.mixed == [] and not any("warning" in line for line in alike.lines)
    cpu_timed = zero_records()  # the ORT runs timed by CPU time ran one thread standing for the board's four
    for r in cpu_timed:
        if r["engine"] != "torch":
            r.update(timing="cpu", threads=1)
    assert recommend(cpu_timed, board, TASK).mixed == []
    assert recommend([{**r, "timing": None} for r in cpu_timed], board, TASK).mixed[0]["field"] == "threads"
    records = zero_records()
    short = next(r for r in records if (r["label"], r["engine"]) == ("lora", "ort-step"))
    short["settings"] = dict(short["settings"], epochs=1, batch=64)
    short.update(host_speed=0.5, host_speed_source="given")
    rec = recommend(records, board, TASK)
    warnings = [line for line in rec.lines if "warning" in line]
    assert len(warnings) == 1 and warnings[0] == rec.lines[-1]
    assert warnings[0] == ("  warning: the compared runs differ in run length (epochs 3: 7 runs; epochs 1: "
                           "lora/ort-step); batch (recipe: 7 runs; 64: lora/ort-step); host speed (1 (not recorded): "
                           "7 runs; 0.5 (given): lora/ort-step) - re-measure them alike (edge-ft bench --force with "
                           "one set of options) before trusting the ranking")
    assert [m["field"] for m in rec.mixed] == ["length", "batch", "host_speed"]
    path = results_file(tmp_path, records)
    assert main(["recommend", "--profile", ZERO, "--results", path, "--no-measure", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["basis"] == "measured" and answer["mixed_runs"][0] == {
        "field": "length", "what": "run length",
        "values": {"epochs 3": [f"{r['label']}/{r['engine']}" for r in records if r is not short],
                   "epochs 1": ["lora/ort-step"]}}


def test_measure_prints_the_expected_duration_then_answers_from_measurements(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results.jsonl"
    swept = []

    def fake_sweep(jobs, path, opts):
        swept.extend(jobs)
        for (label, engine), (acc, ms, rss, payload, _) in ZERO_RUNS.items():
            append_record(path, record(BOARD, label, engine, acc, ms, rss, payload, key=f"{BOARD}-{label}-{engine}"))

    monkeypatch.setattr(sweep_module, "run_sweep", fake_sweep)
    assert main(["recommend", "--profile", BOARD, "--results", str(results), "--measure", "--epochs", "1"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"measuring {BOARD}: 11 runs, expected ") and {j.profile.name for j in swept} == {BOARD}
    assert out.startswith(f"{BOARD}: lora on ort-step.") and "PREDICTED" not in out and "[predicted]" not in out
    assert {j.settings.epochs for j in swept} == {1}
