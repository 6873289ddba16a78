"""The CI example cannot rot: both workflow files run examples/ci/edge-ft-ci.sh, and that script, run here with
small settings, measures a real sweep, passes its gates (exit 0, JUnit file, summary, report), and fails with the
table of what failed when a gate cannot hold (exit 1). It runs in rlimit mode, as on a runner that cannot write
cgroups: its board times come from the runs' CPU time (the script's default timing), which needs no cgroup."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from edge_ft.bench.records import read_records
from edge_ft.gates.assertions import BOOL_FIELDS, NUMBER_FIELDS, WORD_FIELDS
from edge_ft.gates.cireport import STEP_SUMMARY_ENV

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "examples" / "ci"
SCRIPT = "examples/ci/edge-ft-ci.sh"


def run_script(out: Path, base: Path, **env) -> subprocess.CompletedProcess:
    settings = {"EDGE_FT_CI_OUT": str(out), "EDGE_FT_CI_BASE": str(base), "EDGE_FT_CI_STEPS": "30",
                "EDGE_FT_CI_METHODS": "lora",
                "EDGE_FT_CI_MODE": "rlimit", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    child_env = {k: v for k, v in os.environ.items() if k != STEP_SUMMARY_ENV}
    return subprocess.run(["bash", str(ROOT / SCRIPT)], cwd=ROOT, env={**child_env, **settings},
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory, base_checkpoint):
    out = tmp_path_factory.mktemp("ci")
    return out, run_script(out, base_checkpoint)


@pytest.mark.slow
def test_the_ci_script_measures_the_board_and_passes_its_gates(ci_run):
    out, run = ci_run
    assert run.returncode == 0, run.stdout + run.stderr
    assert "edge-ft gates passed: all 3 gates hold" in run.stdout
    records = read_records(out / "results.jsonl")
    assert [(r["profile"], r["label"], r["engine"], r["steps"]) for r in records] == [
        ("rpi-zero-2w", "lora", "ort-step", 30)]
    suite = ET.parse(out / "gates.xml").getroot().find("testsuite")
    assert (suite.get("name"), suite.get("tests"), suite.get("failures")) == ("edge-ft gates", "3", "0")
    assert (out / "summary.md").read_text().startswith("## edge-ft gates passed: all 3 gates hold")
    assert "### rpi-zero-2w" in (out / "report" / "report.md").read_text()


@pytest.mark.slow
def test_rlimit_runs_are_timed_by_their_cpu_time(ci_run):
    out, _ = ci_run
    for r in read_records(out / "results.jsonl"):
        assert (r["emulation"], r["time_scaled"], r["timing"], r["threads"]) == ("rlimit", True, "cpu", 1)
        assert r["board_ms_per_step"] > r["cpu_ms_per_step"] > 0  # a Zero 2 W core is slower than one here
        assert any(n.startswith("timed by CPU time") for n in r["notes"])


@pytest.mark.slow
def test_an_impossible_gate_fails_the_ci_script_with_the_table_of_what_failed(ci_run, base_checkpoint):
    out, _ = ci_run
    before = (out / "results.jsonl").read_text()
    (out / "baseline.jsonl").write_text(before)  # a baseline identical to this run: it must hold
    run = run_script(out, base_checkpoint, EDGE_FT_CI_EXTRA_GATES="rpi-zero-2w:lora:peak_rss_mb<=1\n"
                                                                  "rpi-zero-2w:*:ms_per_step<=0.001",
                     EDGE_FT_CI_BASELINE=str(out / "baseline.jsonl"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert (out / "results.jsonl").read_text() == before  # the measured runs are reused, not re-measured
    lines = run.stdout.splitlines()
    assert "edge-ft gates FAILED: 2 of 5 gates failed; the baseline comparison holds" in lines
    assert "  pass  rpi-zero-2w lora ort-step vs baseline" in run.stdout
    after = lines[lines.index("what failed:") + 2:]
    table = [" ".join(line.split()) for line in after[:next(i for i, x in enumerate(after) if x[:2] != "  ")]]
    assert len(table) == 2 and table[0].startswith("rpi-zero-2w:lora:peak_rss_mb<=1 rpi-zero-2w lora ort-step "
                                                   "peak_rss_mb ")
    assert table[0].endswith(" not <= 1")
    # a time gate reads the board's time, which rlimit runs have when timed by their CPU time
    assert table[1].startswith("rpi-zero-2w:*:ms_per_step<=0.001 rpi-zero-2w lora ort-step ms_per_step ")
    assert table[1].endswith(" not <= 0.001")
    suite = ET.parse(out / "gates.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("5", "2")
    assert (out / "report" / "report.md").is_file()


@pytest.mark.slow
def test_every_gateable_field_is_a_record_field_and_back(ci_run):
    out, _ = ci_run
    record = read_records(out / "results.jsonl")[0]
    assert set(NUMBER_FIELDS + BOOL_FIELDS + WORD_FIELDS) <= set(record)
    scalar = {k for k, v in record.items() if isinstance(v, (bool, int, float)) or v is None}
    not_gateable = {"schema", "repeats_ms_per_step_p50"}  # a format number; a list
    gateable = set(NUMBER_FIELDS + BOOL_FIELDS + WORD_FIELDS)  # a word field may be None (timing outside a board)
    assert scalar - not_gateable <= gateable, scalar - gateable


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_both_workflows_run_the_script_and_keep_its_output(name):
    doc = yaml.safe_load((CI / name).read_text())
    if name == "github-actions.yml":
        steps = doc["jobs"]["edge-ft"]["steps"]
        commands = [s.get("run", "") for s in steps]
        env = next(s["env"] for s in steps if SCRIPT in s.get("run", ""))
        kept = next(s["with"]["path"] for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
        assert next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))["if"] == "always()"
    else:
        job = doc["edge-ft-gates"]
        commands, env, kept = job["script"], job["variables"], job["artifacts"]["paths"][0]
        assert job["artifacts"]["when"] == "always" and job["artifacts"]["reports"]["junit"] == "runs/ci/gates.xml"
    assert any(SCRIPT in c for c in commands) and any("make venv device-venv" in c for c in commands)
    assert commands.index(next(c for c in commands if "make venv" in c)) < commands.index(
        next(c for c in commands if SCRIPT in c))  # installed before it runs
    assert kept.rstrip("/") == env["EDGE_FT_CI_OUT"] == "runs/ci"  # the artifact is the script's output folder


def test_the_script_parses_and_reads_its_settings_from_the_environment():
    text = (CI / "edge-ft-ci.sh").read_text()
    assert subprocess.run(["bash", "-n", str(CI / "edge-ft-ci.sh")]).returncode == 0
    read = {line.split("${", 1)[1].split(":-", 1)[0] for line in text.splitlines() if "=${EDGE_FT" in line}
    assert {"EDGE_FT_CI_OUT", "EDGE_FT_CI_STEPS", "EDGE_FT_CI_EXTRA_GATES", "EDGE_FT_CI_BASELINE"} <= read
