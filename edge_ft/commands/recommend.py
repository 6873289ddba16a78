"""`edge-ft recommend`: which method and engine to fine-tune with on a device, from measured results."""

from __future__ import annotations

import argparse
import json

from edge_ft.commands.argtypes import positive_float
from edge_ft.commands.bench import accuracy_fraction, add_sweep_options
from edge_ft.errors import UserError


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
        "accuracy the fastest wins. With no measurements for the profile yet (or --measure) it runs the sweep "
        "first (host only; the sweep options below apply then).",
    )
    p.add_argument("--profile", required=True, metavar="NAME|PATH", help="device profile (edge-ft profile list)")
    p.add_argument("--max-rss", type=positive_float, metavar="MB", help="peak RSS limit (default: profile budget)")
    p.add_argument("--max-step-ms", type=positive_float, metavar="MS", help="step-time limit in milliseconds")
    p.add_argument("--min-accuracy", type=accuracy_fraction, metavar="F", help="held-out accuracy floor, e.g. 0.93")
    p.add_argument("--tolerance", type=tolerance, default=0.02, metavar="F",
                   help="accuracy a faster choice may give up against the most accurate feasible one (default 0.02)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--measure", action="store_true", help="run the sweep for the profile first (skips what is done)")
    when.add_argument("--no-measure", action="store_true", help="never run measurements; answer from the file only")
    p.add_argument("--json", action="store_true", help="print the choice and the reasons as JSON")
    add_sweep_options(p, profiles=None)
    p.set_defaults(func=handler)


def handler(args) -> int:
    from edge_ft.bench.profiles import load_profile
    from edge_ft.bench.recommend import Constraints, latest_runs, recommend
    from edge_ft.bench.records import read_records
    from edge_ft.data.tasks import get_task

    profile = load_profile(args.profile)
    task = get_task(args.task[0]).name
    records = read_records(args.results)
    if args.measure or (not latest_runs(records, profile.name, task) and not args.no_measure):
        from edge_ft.bench.sweep import run_sweep
        from edge_ft.commands.bench import sweep_from_args

        jobs, opts = sweep_from_args(args, [profile.name])
        run_sweep(jobs, args.results, opts)
        records = read_records(args.results)
    if not latest_runs(records, profile.name, task):
        raise UserError(f"{args.results}: no measurements for profile {profile.name} on {task}; run "
                        f"`edge-ft bench --profiles {profile.name} --results {args.results}`")
    constraints = Constraints(args.max_rss, args.max_step_ms, args.min_accuracy, args.tolerance)
    rec = recommend(records, profile, task, constraints)
    if args.json:
        print(json.dumps(rec.to_dict(), indent=2))
    else:
        print("\n".join(rec.lines))
    return 0  # "nothing fits" is an answer too; --json has "choice": null then
