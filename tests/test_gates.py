"""Gates and baselines on synthetic results files: passing and failing gates with their exit codes and failure
table, malformed assertions in one line, a gate that matches nothing, time gates on runs that were not
time-scaled, a baseline regression, the JUnit file's shape and the Markdown summary."""

import xml.etree.ElementTree as ET

import pytest
from test_report import MB, ZERO, record, zero_records

from edge_ft.bench.records import append_record
from edge_ft.cli import main
from edge_ft.errors import UserError
from edge_ft.gates.assertions import evaluate, field_value, parse_assertion
from edge_ft.gates.baseline import compare, parse_limits
from edge_ft.gates.cireport import STEP_SUMMARY_ENV

pytestmark = pytest.mark.usefixtures("no_step_summary")


@pytest.fixture
def no_step_summary(monkeypatch):
    monkeypatch.delenv(STEP_SUMMARY_ENV, raising=False)  # the suite may itself run on GitHub Actions


def results_file(path, records):
    for r in records:
        append_record(path, r)
    return path


@pytest.fixture
def zero(tmp_path):
    """The shape of a real rpi-zero-2w sweep: ORT runs fit (86-97 MB), torch runs do not (325-328 MB of 320)."""
    return results_file(tmp_path / "results.jsonl", zero_records())


def gate(capsys, *argv):
    code = main(["gate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_gates_that_hold_exit_0(zero, capsys):
    code, out, _ = gate(capsys, zero, "--assert", "rpi-zero-2w:lora:ort-step:peak_rss_mb<=95",
                        "--assert", "rpi-zero-2w:*:ort-step:fits", "--assert", "rpi-*:probe*:ort-step:accuracy>=0.93",
                        "--assert", "rpi-zero-2w:full:emulation==cgroup")
    assert code == 0, out
    assert out.splitlines()[0] == "edge-ft gates passed: all 4 gates hold"
    assert "  pass  rpi-zero-2w:*:ort-step:fits" in out and "holds for 4 runs" in out  # full, probe, cached, lora
    assert "what failed" not in out


def test_a_failing_gate_exits_1_with_a_table_of_the_runs_that_broke_it(zero, capsys):
    code, out, _ = gate(capsys, zero, "--assert", "rpi-zero-2w:*:fits", "--assert", "rpi-zero-2w:lora:peak_rss_mb < 95")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "edge-ft gates FAILED: 2 of 2 gates failed"
    table = lines[lines.index("what failed:") + 1:]
    assert table[0].split() == ["check", "run", "measured", "expected", "/", "why"]
    rows = [" ".join(line.split()) for line in table[1:]]
    # every run over the budget is named with its verdict; lora on ort-step (95 MB) breaks the strict bound
    assert "rpi-zero-2w:*:fits rpi-zero-2w full torch peak RSS 328 MB does not fit in 320 MB" in rows
    assert "rpi-zero-2w:*:fits rpi-zero-2w lora torch peak RSS 325 MB does not fit in 320 MB" in rows
    assert "rpi-zero-2w:lora:peak_rss_mb < 95 rpi-zero-2w lora ort-step peak_rss_mb 95 not < 95" in rows
    assert "rpi-zero-2w:lora:peak_rss_mb < 95 rpi-zero-2w lora torch peak_rss_mb 325 not < 95" in rows
    assert len(rows) == 4 and not any("lora ort-training" in row for row in rows)  # its 89 MB holds


def test_a_gate_that_matches_no_run_fails_instead_of_passing(zero, capsys):
    code, out, _ = gate(capsys, zero, "--assert", "rpi-3b:*:fits")
    assert code == 1 and "matched no run (runs: rpi-zero-2w full ort-step" in out


@pytest.mark.parametrize("text, message", [
    ("rpi-zero-2w:peak_rss_mb<=200", "expected PROFILE:METHOD[:ENGINE]:FIELD OP VALUE"),
    ("rpi-zero-2w:lora:peak_rss_mb", "no comparison"),
    ("rpi-zero-2w:lora:peak_rss_mb=>200", "no operator after the field 'peak_rss_mb'; OP is one of <= >= == !="),
    ("rpi-zero-2w:lora:peak_rss_mb=200", "no operator after the field 'peak_rss_mb'"),
    ("rpi-zero-2w:lora:peak_rss_mb<=<200", "expected one value after <="),
    ("rpi-zero-2w:lora:peak_rss_mb<=200MB", "value '200MB' is not a number; give a bare number in the field's "
                                            "unit (peak_rss_mb is in MiB)"),
    ("rpi-zero-2w:lora:peak_rss_gb<=1", "unknown field 'peak_rss_gb'"),
    ("rpi-zero-2w:adapter:fits", "unknown method 'adapter'"),
    ("rpi-zero-2w:lora:onnx:fits", "unknown engine 'onnx'"),
    ("rpi-zero-2w:lora:accuracy>=90", "accuracy is a fraction in [0, 1] (write 0.9 for 90%)"),
    ("rpi-zero-2w:lora:fits<=1", "fits is true/false; compare it with == or !="),
    ("rpi-zero-2w:lora:time_scaled==yes", "time_scaled is true or false, not 'yes'"),
    ("rpi-zero-2w:lora::fits", "expected PROFILE:METHOD[:ENGINE]:FIELD OP VALUE"),
])
def test_a_malformed_assertion_exits_2_in_one_line(zero, capsys, text, message):
    code, out, err = gate(capsys, zero, "--assert", "rpi-zero-2w:*:fits", "--assert", text)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"edge-ft gate: error: assertion {text!r}: "), err
    assert message in err


def test_malformed_options_exit_2_before_anything_runs(zero, tmp_path, capsys):
    for argv, message in [(["--baseline", tmp_path / "none.jsonl"], "no such results file"),
                          (["--assert", "*:*:fits", "--max-regression", "ten"], "expected N% (of the baseline"),
                          (["--assert", "*:*:fits", "--max-regression", "5%"], "--max-regression needs --baseline"),
                          ([], "nothing to check"),
                          (["--junit", tmp_path / "j.xml"], "--junit and --summary report gates")]:
        code, out, err = gate(capsys, zero, *argv)
        assert (code, out, err.count("\n")) == (2, "", 1) and message in err, (argv, err)
    # bench parses its gates before preparing or measuring anything
    assert main(["bench", "--profiles", ZERO, "--assert", "rpi-zero-2w:lora:rss<=1",
                 "--results", str(tmp_path / "r.jsonl")]) == 2
    assert "unknown field 'rss'" in capsys.readouterr().err and not (tmp_path / "r.jsonl").exists()


def test_fields_read_in_the_unit_their_name_states():
    r = record(ZERO, "lora", "ort-step", 0.94, 74, 95, 6_008, wall_seconds=12.5)
    assert field_value(r, "peak_rss_mb") == pytest.approx(95) and field_value(r, "peak_rss_bytes") == 95 * MB
    assert field_value(r, "payload_kb") == pytest.approx(6_008 / 1024)
    assert field_value(r, "ms_per_step") == 74  # under a quota the mean is quoted; natively the p50
    assert field_value(record("host", "lora", "ort-step", 0.94, 5, 80, 6_008), "ms_per_step") == 5
    a = parse_assertion(" rpi-zero-2w : lora : payload_kb <= 5.8 ")
    assert (a.profile, a.method, a.engine, a.field, a.op, a.value) == (ZERO, "lora", "*", "payload_kb", "<=", 5.8)
    assert [o.status for o in evaluate([a], [r])] == ["fail"]
    with pytest.raises(UserError, match="unknown field"):
        parse_assertion("*:*:verdict==fits")  # free text is not gateable: its wording is not a contract


def test_time_gates_on_runs_that_were_not_time_scaled_fail_or_are_skipped_when_allowed(tmp_path, capsys):
    rlimit = [record(ZERO, "lora", "ort-step", 0.94, 20, 95, 6_008, emulation="rlimit", time_scaled=False,
                     cpu_quota=None)]
    path = results_file(tmp_path / "rlimit.jsonl", rlimit)
    code, out, _ = gate(capsys, path, "--assert", "rpi-zero-2w:lora:ms_per_step<=100",
                        "--assert", "rpi-zero-2w:lora:peak_rss_mb<=100")
    assert code == 1  # 20 ms is this machine's time, not the Zero 2 W's: no silent pass
    assert ("not time-scaled (rlimit emulation): this machine's time, not rpi-zero-2w's; gate time only on runs "
            "under a CPU quota (cgroup mode)") in out
    assert "pass  rpi-zero-2w:lora:peak_rss_mb<=100" in out  # memory is still judged
    junit = tmp_path / "gates.xml"
    code, out, _ = gate(capsys, path, "--assert", "rpi-zero-2w:lora:ms_per_step<=100", "--allow-unscaled-time",
                        "--junit", junit)
    assert code == 0 and "skip  rpi-zero-2w:lora:ms_per_step<=100  skipped: not time-scaled" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("skipped"), suite.get("failures")) == ("1", "1", "0")
    assert suite.find("testcase/skipped").get("message").startswith("skipped: not time-scaled (rlimit")
    # the host profile runs natively: its times are this machine's by definition and are judged
    host = [record("host", "lora", "ort-step", 0.94, 5, 80, 6_008)]
    assert [o.status for o in evaluate([parse_assertion("host:*:ms_per_step<=4")], host)] == ["fail"]


def old_and_new(tmp_path, **new_changes):
    """A baseline where lora on ort-step did better, and today's run of the same work on another machine."""
    old = [record(ZERO, "lora", "ort-step", 0.94, 74, 80, 6_008, key="old-lora"),
           record(ZERO, "probe", "ort-step", 0.93, 53, 93, 3_608, key="old-probe")]
    # another runner: other host speed (part of the key and the settings), other base bytes, same work
    other = {"host_speed": 0.6, "base_sha256": "f" * 60}
    new = [record(ZERO, "lora", "ort-step", 0.94, 74, 80, 6_008, **other),
           record(ZERO, "probe", "ort-step", 0.93, 53, 93, 3_608, **other)]
    for r in new:
        r["settings"] = {**r["settings"], "host_speed": 0.6}
    new[0].update(new_changes)
    return results_file(tmp_path / "old.jsonl", old), results_file(tmp_path / "new.jsonl", new)


def test_a_baseline_regression_says_which_figure_got_worse_and_by_how_much(tmp_path, capsys):
    old, new = old_and_new(tmp_path, peak_rss_bytes=int(92 * MB), accuracy=0.92)
    code, out, err = gate(capsys, new, "--baseline", old)
    assert code == 1
    rows = [" ".join(line.split()) for line in out.splitlines()[out.splitlines().index("what failed:") + 2:]]
    assert rows == ["rpi-zero-2w lora ort-step vs baseline rpi-zero-2w lora ort-step peak_rss_mb 80 -> 92 "
                    "worse by 15.0% (max 10%)"]  # accuracy fell by 2.1%: within 10%
    assert "pass  rpi-zero-2w probe ort-step vs baseline" in out
    assert "the baseline run started from other base weights" in err
    code, out, _ = gate(capsys, new, "--baseline", old, "--max-regression", "20%", "--max-regression", "accuracy=0.01")
    assert code == 1 and "accuracy 0.94 -> 0.92 worse by 0.02 (max 0.01)" in " ".join(out.split())
    assert gate(capsys, new, "--baseline", old, "--max-regression", "20%")[0] == 0


def test_a_run_that_no_longer_fits_regresses_whatever_its_figures(tmp_path):
    old, new = old_and_new(tmp_path, fits=False, status="out_of_memory", accuracy=None,
                           verdict="does not fit in 320 MB (killed at the cap)")
    from edge_ft.bench.records import read_records

    outcomes, _ = compare(read_records(new), read_records(old), parse_limits([]))
    assert [o.status for o in outcomes] == ["fail", "pass"]
    assert outcomes[0].message() == ("rpi-zero-2w lora ort-step: fits -> out_of_memory does not fit in 320 MB "
                                     "(killed at the cap)")


def test_baseline_step_times_are_compared_as_the_board_s_or_the_reference_core_s(tmp_path):
    limits = parse_limits([])
    # under a CPU quota the emulation already scaled time to the board: 74 -> 90 ms is 21.6% worse
    old = [record(ZERO, "lora", "ort-step", 0.94, 74, 80, 6_008)]
    new = [record(ZERO, "lora", "ort-step", 0.94, 90, 80, 6_008)]
    assert "ms_per_step 74 -> 90 worse by 21.6% (max 10%)" in compare(new, old, limits)[0][0].message()
    # natively, a machine at half the reference core's speed takes twice as long for the same work
    old = [record("host", "lora", "ort-step", 0.94, 5, 80, 6_008, host_speed=1.0)]
    new = [record("host", "lora", "ort-step", 0.94, 10, 80, 6_008, host_speed=0.5)]
    assert compare(new, old, limits)[0][0].status == "pass"
    new[0]["host_speed"] = 1.0
    assert "worse by 100.0%" in compare(new, old, limits)[0][0].message()
    # an emulated run without a quota has no board time: not compared, and a note says so
    new = [record(ZERO, "lora", "ort-step", 0.94, 900, 80, 6_008, emulation="rlimit", time_scaled=False)]
    outcomes, notes = compare(new, [record(ZERO, "lora", "ort-step", 0.94, 74, 80, 6_008)], limits)
    assert outcomes[0].status == "pass" and "ms_per_step" not in outcomes[0].detail
    assert notes == ["rpi-zero-2w lora ort-step: ms_per_step not compared: new run not time-scaled "
                     "(rlimit emulation)"]


def test_a_baseline_with_no_matching_run_fails(tmp_path, capsys):
    old = results_file(tmp_path / "old.jsonl", [record(ZERO, "lora", "ort-step", 0.94, 74, 80, 6_008)])
    new = results_file(tmp_path / "new.jsonl", [record(ZERO, "lora", "ort-step", 0.94, 74, 80, 6_008,
                                                       settings={"epochs": 1, "steps": None, "batch": None,
                                                                 "seed": 0, "rank": 2, "alpha": 4.0,
                                                                 "host_speed": 1.0, "target_accuracy": 0.9})])
    code, out, err = gate(capsys, new, "--baseline", old)
    assert code == 1 and "no run matches a run of" in out and "no baseline run in" in err


def test_junit_file_has_a_test_case_per_gate_and_per_baseline_comparison(tmp_path, capsys):
    old, new = old_and_new(tmp_path, peak_rss_bytes=int(92 * MB))
    junit = tmp_path / "ci" / "gates.xml"
    code, *_ = gate(capsys, new, "--assert", "rpi-zero-2w:*:fits", "--assert", "rpi-zero-2w:lora:accuracy>=0.99",
                    "--assert", "rpi-zero-2w:probe:payload_bytes<=4000", "--baseline", old, "--junit", junit)
    assert code == 1
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("5", "2", "0")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["edge-ft gates", "edge-ft baseline"]
    gates, baseline = suites["edge-ft gates"], suites["edge-ft baseline"]
    assert (gates.get("tests"), gates.get("failures")) == ("3", "1")
    assert [c.get("name") for c in gates.findall("testcase")] == [
        "rpi-zero-2w:*:fits", "rpi-zero-2w:lora:accuracy>=0.99", "rpi-zero-2w:probe:payload_bytes<=4000"]
    failure = gates.find("testcase[@name='rpi-zero-2w:lora:accuracy>=0.99']/failure")
    assert failure.get("message") == "rpi-zero-2w lora ort-step: accuracy 0.94 not >= 0.99"
    assert (baseline.get("tests"), baseline.get("failures")) == ("2", "1")
    assert len(baseline.findall("testcase/failure")) == 1
    assert "peak_rss_mb 80 -> 92 worse by 15.0% (max 10%)" in baseline.find("testcase/failure").get("message")
    assert not list(junit.parent.glob(".*.tmp"))  # written atomically: no temporary file left


def test_summary_is_written_and_appended_to_the_github_step_summary(zero, tmp_path, capsys, monkeypatch):
    step = tmp_path / "step_summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv(STEP_SUMMARY_ENV, str(step))
    summary = tmp_path / "summary.md"
    code, *_ = gate(capsys, zero, "--assert", "rpi-zero-2w:*:fits", "--assert", "rpi-zero-2w:*:ort-step:fits",
                    "--summary", summary)
    assert code == 1
    text = summary.read_text()
    assert text.startswith("## edge-ft gates FAILED: 1 of 2 gates failed\n")
    assert "| `rpi-zero-2w:*:ort-step:fits` | pass | holds for 4 runs |" in text
    assert "### What failed" in text
    assert "| `rpi-zero-2w:*:fits` | rpi-zero-2w full torch | peak RSS 328 MB | does not fit in 320 MB |" in text
    assert step.read_text() == "earlier step\n" + text + "\n"  # appended, never overwritten


def test_a_damaged_record_fails_its_gate_in_words_not_a_traceback(tmp_path, capsys):
    damaged = record(ZERO, "lora", "ort-step", "high", 74, 95, 6_008, fits="yes")
    path = results_file(tmp_path / "damaged.jsonl", [damaged])
    code, out, _ = gate(capsys, path, "--assert", "rpi-zero-2w:lora:accuracy>=0.9",
                        "--assert", "rpi-zero-2w:lora:fits==true")
    assert code == 1 and out.count("(a damaged record?)") == 2


def test_fits_compared_with_false_selects_the_runs_over_budget(zero, capsys):
    code, out, _ = gate(capsys, zero, "--assert", "rpi-zero-2w:*:torch:fits==false")
    assert code == 0 and "holds for 2 runs" in out  # full and lora on torch are over the 320 MB budget
