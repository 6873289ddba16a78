"""`edge-ft gate`: check a results file against assertions and a baseline, for CI (exit 1 when one fails).

The same options on `edge-ft bench` check the sweep it just ran; both go through check_records() here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_ft.bench.records import BenchRecord

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from edge_ft.contracts import SWEEP_LABELS

GATE_HELP = (
    "Gates: --assert 'PROFILE:METHOD[:ENGINE]:FIELD OP VALUE' (or PROFILE:METHOD[:ENGINE]:fits), repeatable. "
    f"PROFILE, METHOD (a sweep label: {', '.join(SWEEP_LABELS)}) and ENGINE take * patterns; ENGINE left out "
    "means every engine. FIELD is any record field; X_mb / X_kb read X_bytes in MiB / KiB (peak_rss_mb, payload_kb), "
    "ms_per_step is the quoted step time (mean under a CPU quota, else p50), accuracy is a fraction. OP is one of "
    "<= < >= > == != (== and != for true/false and words: emulation==cgroup). `fits` holds when every matched run "
    "finished within the profile's memory budget. Every matched run must hold, and a gate that matches no run "
    "fails. A time field of an emulated run that was not time-scaled (rlimit mode) fails the gate unless "
    "--allow-unscaled-time skips it. Exit codes: 0 all hold, 1 a gate or baseline comparison failed (a table says "
    "which), 2 a malformed assertion or option.")


def add_gate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gates (CI)", GATE_HELP)
    g.add_argument("--assert", dest="asserts", action="append", default=[], metavar="CHECK",
                   help="e.g. 'rpi-zero-2w:lora:peak_rss_mb<=200', 'rpi-zero-2w:*:fits', "
                        "'*:*:ort-step:accuracy>=0.9' (default: none)")
    g.add_argument("--baseline", type=Path, metavar="OLD.jsonl",
                   help="compare with the runs of an earlier results file that have the same task, method, engine, "
                        "profile and settings: accuracy, peak_rss_mb, payload_bytes and ms_per_step (native runs "
                        "times their host speed; runs without a CPU quota are not time-compared); "
                        "a run that fitted and no longer does fails too (default: no baseline)")
    g.add_argument("--max-regression", action="append", default=[], metavar="[FIELD=]N%|N",
                   help="how much worse a figure may get than in --baseline: N%% of the baseline figure or an "
                        "amount in the field's unit, for every field or one (accuracy=0.01); repeatable, later "
                        "ones win (default 10%% for every field)")
    g.add_argument("--allow-unscaled-time", action="store_true",
                   help="skip (instead of fail) time gates on emulated runs that were not time-scaled")
    g.add_argument("--junit", type=Path, metavar="FILE.xml",
                   help="write a JUnit XML file: one test case per gate and per baseline comparison")
    g.add_argument("--summary", type=Path, metavar="FILE.md",
                   help="write a Markdown summary (it is also appended to $GITHUB_STEP_SUMMARY when that is set)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "gate",
        help="check a results file against --assert gates and a --baseline (exit 1 when one fails), for CI",
        description="Checks the latest run of every (task, profile, method, engine) in RESULTS.jsonl, as written "
        "by `edge-ft bench`, without measuring anything: the same gates and baseline comparison as `edge-ft bench "
        "--assert ... --baseline ...`, with the same terminal table, JUnit XML and Markdown summary. (`edge-ft "
        "profile check` is something else: how well this machine emulates each board.)",
    )
    p.add_argument("results", type=Path, metavar="RESULTS.jsonl", help="results file from `edge-ft bench`")
    add_gate_options(p)
    p.set_defaults(func=handler)


@dataclass
class GatePlan:
    """The parsed gate options, checked before any measuring starts."""

    assertions: list  # gates.Assertion
    limits: dict  # field -> baseline.Limit
    baseline: list[BenchRecord] | None  # the baseline's records
    args: argparse.Namespace

    @property
    def active(self) -> bool:
        return bool(self.assertions) or self.baseline is not None


def plan_gates(args) -> GatePlan:
    """Parse and check every gate option (exit 2 on the first malformed one), before a sweep starts."""
    from edge_ft.bench.records import read_records
    from edge_ft.errors import UserError
    from edge_ft.gates.assertions import parse_assertion
    from edge_ft.gates.baseline import parse_limits
    from edge_ft.validate import writable_file

    assertions = [parse_assertion(text) for text in args.asserts]
    limits = parse_limits(args.max_regression)
    if args.max_regression and args.baseline is None:
        raise UserError("--max-regression needs --baseline OLD.jsonl (the results to compare with)")
    baseline = None
    if args.baseline is not None:
        baseline = read_records(args.baseline, missing_ok=False)
        if not baseline:
            raise UserError(f"--baseline {args.baseline}: no benchmark records in it")
    for option in ("junit", "summary"):
        if getattr(args, option) is not None:
            writable_file(getattr(args, option), option=f"--{option}")
    if (args.junit or args.summary) and not (assertions or baseline):
        raise UserError("--junit and --summary report gates: add --assert CHECK or --baseline OLD.jsonl")
    return GatePlan(assertions, limits, baseline, args)


def check_records(plan: GatePlan, records: list[BenchRecord]) -> int:
    """Evaluate the plan on `records` (one per run), print the outcome, write --junit/--summary; 1 if any failed."""
    from edge_ft.gates import cireport
    from edge_ft.gates.assertions import evaluate
    from edge_ft.gates.baseline import compare

    args = plan.args
    outcomes = evaluate(plan.assertions, records, args.allow_unscaled_time)
    notes: list[str] = []
    if plan.baseline is not None:
        compared, notes = compare(records, plan.baseline, plan.limits, source=str(args.baseline))
        outcomes += compared
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(cireport.terminal_text(outcomes), flush=True)
    if args.junit:
        cireport.write_junit(args.junit, outcomes)
    step_summary = cireport.write_summary(args.summary, outcomes, notes)
    written = [str(p) for p in (args.junit, args.summary, step_summary) if p]
    if written:
        print(f"-> {', '.join(written)}", file=sys.stderr)
    return 1 if any(o.failed for o in outcomes) else 0


def handler(args) -> int:
    from edge_ft.bench.records import latest_runs, read_records
    from edge_ft.errors import UserError

    plan = plan_gates(args)
    if not plan.active:
        raise UserError("nothing to check: give --assert CHECK (e.g. 'rpi-zero-2w:*:fits') and/or --baseline "
                        "OLD.jsonl")
    records = read_records(args.results, missing_ok=False)
    if not records:
        raise UserError(f"{args.results}: no benchmark records; run `edge-ft bench` first")
    return check_records(plan, latest_runs(records))
