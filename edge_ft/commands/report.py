"""`edge-ft report`: turn a results file from `edge-ft bench` into report.md with tables, plots and goals."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write report.md with tables, PNG plots, the performance goals and a recommendation",
        description="Reads RESULTS.jsonl (from `edge-ft bench`; the latest record of each run counts) and writes "
        "DIR/report.md with one table per device profile, the measured goal ratios, a recommendation per "
        "profile, and PNG plots: accuracy vs shipped bytes, peak RSS against the budget, ms/step, epoch time, "
        "and analytical FLOPs vs measured step time; per-model runs (`edge-ft bench --models`) add a table per model "
        "(peak RSS, ms/step and the largest batch that fits, per board and method) and peak RSS against batch size. "
        "Given fleet results folders (the ServerApp's results-dir, "
        "holding rounds.jsonl) instead, writes DIR/fleet.md and the fleet plots: global accuracy vs round and vs "
        "cumulative bytes transferred, one line per run (full / probe / LoRA).",
    )
    p.add_argument("results", type=Path, nargs="+", metavar="RESULTS",
                   help="results file from `edge-ft bench`, or one or more fleet results folders")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for report.md and the plots")
    p.add_argument("--task", metavar="TASK", help="only this task's runs (default: all)")
    p.set_defaults(func=handler)


def handler(args) -> int:
    import importlib.util

    from edge_ft.bench.records import TRADEOFF, read_records, require_fields
    from edge_ft.errors import UserError, install_hint

    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("edge-ft report draws its plots with matplotlib: pip install matplotlib, or "
                        + install_hint("host"))
    from edge_ft.fleet.records import is_fleet_records
    from edge_ft.reports.report import write_report

    if all(is_fleet_records(p) for p in args.results):
        from edge_ft.fleet.report import write_fleet_report

        path = write_fleet_report(args.results, args.out)
        print(f"{path} (fleet, {len(args.results)} runs)")
        return 0
    if len(args.results) > 1:
        raise UserError("several results are fleet results folders only; give one `edge-ft bench` results file")
    args.results = args.results[0]
    records = require_fields(read_records(args.results, missing_ok=False), args.results)
    models = [] if args.task else read_records(args.results, kind=TRADEOFF)
    if args.task:
        from edge_ft.data.tasks import get_task

        task = get_task(args.task).name
        records = [r for r in records if r["task"] == task]
    if not records and not models:
        raise UserError(f"{args.results}: no benchmark records{' for ' + args.task if args.task else ''}; "
                        "run `edge-ft bench` first")
    path = write_report(records, args.out, source=str(args.results), model_records=models)
    print(f"{path} ({len(list(args.out.glob('*.png')))} plots)")
    return 0
