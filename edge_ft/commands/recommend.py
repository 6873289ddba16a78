"""`edge-ft recommend`: which method and engine to fine-tune with on a device, from measured results."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_ft.bench.records import BenchRecord

import argparse
import json
import shlex
import sys
from pathlib import Path

from edge_ft.commands.argtypes import positive_float
from edge_ft.commands.bench import (
    DEFAULT_ENGINES,
    DEFAULT_METHODS,
    DEFAULT_RESULTS,
    DEFAULT_TIMING,
    accuracy_fraction,
    add_sweep_options,
    comma_list,
)
from edge_ft.errors import UserError

DEFAULT_TABLE = Path("runs/table/table.json")  # where `edge-ft finetune --all` writes it
# Preparing a sweep (base, data, 6 bundle exports): ~2 min on an idle 2-core VM, 4.7 min there beside other jobs.
PREPARE = "~2-5 min"


def tolerance(text: str) -> float:
    """argparse type: an accuracy difference in [0, 1] (0: only the most accurate runs compete)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "recommend",
        help="choose a method and engine for a device profile from measured results, and say why",
        description="Reads the results of `edge-ft bench` for --profile and picks the method/engine that fits the "
        "constraints: engine installable on the board, run finished within the memory limit (default: the "
        "profile's budget), step time and accuracy limits. Among feasible runs within --tolerance of the best "
        "accuracy the fastest wins. With no measurements for the profile yet it answers from predictions (step "
        "time from the cost model's FLOPs and the board's speed, peak RSS from the engines' measured memory, "
        "accuracy only as measured elsewhere), every line marked predicted, and prints the command that measures "
        "it with its expected duration; --measure runs that sweep (host only; the sweep options below apply then).",
    )
    p.add_argument("--profile", required=True, metavar="NAME|PATH", help="device profile (edge-ft profile list)")
    p.add_argument("--max-rss", type=positive_float, metavar="MB", help="peak RSS limit (default: profile budget)")
    p.add_argument("--max-step-ms", type=positive_float, metavar="MS", help="step-time limit in milliseconds")
    p.add_argument("--min-accuracy", type=accuracy_fraction, metavar="F", help="held-out accuracy floor, e.g. 0.93")
    p.add_argument("--tolerance", type=tolerance, default=0.02, metavar="F",
                   help="accuracy a faster choice may give up against the most accurate feasible one (default 0.02)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--measure", action="store_true",
                      help="run the sweep for the profile first, after printing its expected duration (skips what "
                           "is done)")
    when.add_argument("--no-measure", action="store_true",
                      help="answer from measurements in the file only; none for the profile is an error")
    p.add_argument("--predict", action="store_true",
                   help="answer from predictions even when the profile is measured, and compare the two")
    p.add_argument("--accuracy-table", type=Path, default=DEFAULT_TABLE, metavar="TABLE.json",
                   help="`edge-ft finetune --all` table used for the accuracy of a method no run measured on the "
                        f"task (default {DEFAULT_TABLE})")
    p.add_argument("--json", action="store_true", help="print the choice and the reasons as JSON")
    p.add_argument("--model", metavar="NAME",
                   help="answer for this model from the per-model runs of `edge-ft bench --models` (peak RSS, "
                        "ms/step and the largest fitting batch; --batch is the batch to fit, default the measured "
                        "one): the method that trains the most parameters among those that fit (default: none, "
                        "answer for --task from the task sweep)")
    add_sweep_options(p, profiles=None)
    p.set_defaults(func=handler)


def handler(args) -> int:
    from edge_ft.advice.recommend import Constraints, recommend
    from edge_ft.bench.records import latest_runs, read_records
    from edge_ft.commands.bench import resolve_tasks
    from edge_ft.data.tasks import task_name
    from edge_ft.emulation.profiles import load_profile

    profile = load_profile(args.profile)
    if args.model:
        return model_handler(args, profile)
    task = task_name(resolve_tasks(args)[0])
    records = read_records(args.results)
    measured = latest_runs(records, profile.name, task)
    if args.no_measure and not measured and not args.predict:
        raise UserError(f"{args.results}: no measurements for profile {profile.name} on {task}; run "
                        f"`edge-ft bench --profiles {profile.name} --results {args.results}`, or drop --no-measure "
                        "for a predicted answer")
    constraints = Constraints(args.max_rss, args.max_step_ms, args.min_accuracy, args.tolerance)
    if args.measure:
        from edge_ft.bench.sweep import run_sweep
        from edge_ft.commands.bench import sweep_from_args

        plan = predicted(args, profile, task, records, measured, constraints).extra["measure"]
        print(f"measuring {profile.name}: {plan['runs']} runs, expected {plan['expected']}", file=sys.stderr,
              flush=True)
        jobs, opts = sweep_from_args(args, [profile.name])
        run_sweep(jobs, args.results, opts)
        records = read_records(args.results)
        measured = latest_runs(records, profile.name, task)
    if measured and not args.predict:
        rec = recommend(records, profile, task, constraints)
    else:
        rec = predicted(args, profile, task, records, measured, constraints)
    if args.json:
        print(json.dumps(rec.to_dict(), indent=2))
    else:
        print("\n".join(rec.lines))
    return 0  # "nothing fits" is an answer too; --json has "choice": null then


def model_handler(args, profile) -> int:
    from edge_ft.advice.model_choice import recommend_model
    from edge_ft.advice.recommend import Constraints
    from edge_ft.bench.prepare import MODEL_NAMES
    from edge_ft.bench.records import TRADEOFF, read_records

    if args.model not in MODEL_NAMES:
        raise UserError(f"unknown model {args.model!r}: choose from {', '.join(MODEL_NAMES)}")
    if args.measure or args.predict or args.min_accuracy is not None:
        raise UserError("--measure, --predict and --min-accuracy apply to task sweeps; with --model measure with "
                        f"`edge-ft bench --models {args.model} --profiles {profile.name}`")
    records = read_records(args.results, kind=TRADEOFF)
    rec = recommend_model(records, profile, args.model, Constraints(args.max_rss, args.max_step_ms), args.batch)
    if not rec.feasible and not rec.excluded:
        raise UserError(f"{args.results}: no per-model measurements of {args.model} on {profile.name}; run "
                        f"`edge-ft bench --models {args.model} --profiles {profile.name} --results {args.results}`")
    print(json.dumps(rec.to_dict(), indent=2) if args.json else "\n".join(rec.lines))
    return 0


def predicted(args, profile, task: str, records: list[BenchRecord], measured: list[BenchRecord], constraints):
    """The predicted answer (edge_ft.advice.forecast), the command that would measure it and its expected duration,
    and, when the profile is measured, the prediction checked against the measurements."""
    from edge_ft.advice import forecast
    from edge_ft.advice.recommend import choose, name, recommend
    from edge_ft.bench.sweep import plan
    from edge_ft.commands.bench import settings_from_args
    from edge_ft.emulation.hostspeed import cached_speed

    host = args.host_speed or cached_speed()
    settings = settings_from_args(args, host or 1.0)
    plan([task], args.methods, args.engines, [profile], settings)  # refuses what the sweep would refuse
    preds = forecast.predict_runs(records, profile, task, settings, args.methods, args.engines, host,
                                 args.accuracy_table)
    rec = choose(preds, profile, task, constraints)
    rec.basis = "predicted"
    if measured:
        actual = recommend(records, profile, task, constraints).choice
        why = "--predict; measured answer: " + (name(actual) if actual else "nothing fits")
    else:
        why = f"nothing measured for {profile.name} on {task} yet; a prediction, not a measurement"
    rec.lines = forecast.explain(rec, profile, constraints, why)
    seconds = forecast.sweep_seconds(preds, profile, args.repeats, host, args.timing)
    extra = [] if host or profile.native else ["~2 min to calibrate this machine once"]
    if not (args.results.parent / "prep" / "bundles").is_dir():
        extra.append(f"{PREPARE} to prepare the sweep once (" + ("" if args.base else "pretrain the base, ")
                     + "export the bundles)")
    expected = forecast.fmt_duration(seconds) + "".join(f" + {e}" for e in extra)
    argv = sweep_argv(args)
    command = shlex.join(["edge-ft", "bench", "--profiles", profile.name, *argv])
    rec.lines.append(f"  to measure it ({len(preds)} runs, expected {expected}): {command}")
    if not args.measure:
        again = shlex.join(["edge-ft", "recommend", "--profile", profile.name, "--measure", *argv])
        rec.lines.append(f"  or `{again}`: the same sweep, then the answer from its measurements")
    rows = forecast.check(preds, measured)
    rec.lines += forecast.check_lines(rows, profile.name)
    rec.extra = {"predictions": preds, "check": rows,
                 "measure": {"command": command, "runs": len(preds), "expected_seconds": seconds,
                             "expected": expected}}
    return rec


def sweep_argv(args) -> list[str]:
    """The sweep options as given (defaults left out), for a command line that measures the same runs."""
    from edge_ft.config import MethodConfig
    from edge_ft.data.tasks import task_slug

    argv = ["--task", args.task[0] if Path(args.task[0]).is_dir() else task_slug(args.task[0])]
    if args.methods != comma_list(DEFAULT_METHODS):
        argv += ["--methods", ",".join(args.methods)]
    if args.engines != comma_list(DEFAULT_ENGINES):
        argv += ["--engines", ",".join(args.engines)]
    for option in ("epochs", "steps", "batch", "rank", "alpha", "base", "host_speed", "device_python"):
        value = getattr(args, option, None)
        if value is not None and not (option == "rank" and value == MethodConfig().rank):
            argv += [f"--{option.replace('_', '-')}", str(value)]
    if args.seed:
        argv += ["--seed", str(args.seed)]
    if args.timing != DEFAULT_TIMING:
        argv += ["--timing", args.timing]
    if args.results != DEFAULT_RESULTS:
        argv += ["--results", str(args.results)]
    return argv
