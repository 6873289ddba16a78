"""`edge-ft demo` (what `make demo` runs): pretrain, export, fine-tune under device limits, report, recommend."""

from __future__ import annotations

from pathlib import Path

from edge_ft.commands.argtypes import int_at_least, positive_float
from edge_ft.commands.bench import DEFAULT_TIMING, add_host_speed_option, add_timing_option, comma_list


def register(subparsers) -> None:
    from edge_ft.bench.demo import DEMO_EPOCHS, DEMO_PROFILES

    p = subparsers.add_parser(
        "demo",
        help="the whole story: pretrain, export, fine-tune as host and as a Raspberry Pi Zero 2 W, report, recommend",
        description="Pretrains LeNet-5 on the MNIST 5k subset, exports every method for both ORT engines, "
        "fine-tunes every method x engine natively and confined to each device profile, then writes "
        "OUT/results.jsonl, OUT/report.md with plots, and prints a table and the recommendation for the "
        "Raspberry Pi Zero 2 W. Resumable: a re-run skips everything already done.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), metavar="DIR",
                   help="output folder (default runs/demo)")
    p.add_argument("--profiles", type=comma_list, default=list(DEMO_PROFILES), metavar="P1,P2",
                   help=f"device profiles (default {','.join(DEMO_PROFILES)})")
    p.add_argument("--task", default="mnist→digits",
                   help="transfer task: mnist-digits or mnist-fashion (default mnist-digits)")
    p.add_argument("--epochs", type=int_at_least(1), default=DEMO_EPOCHS, metavar="N",
                   help=f"fine-tuning epochs per run (default {DEMO_EPOCHS})")
    p.add_argument("--pretrain-epochs", type=int_at_least(1), metavar="N",
                   help="pretraining epochs (default: the pretraining recipe)")
    p.add_argument("--timeout", type=positive_float, default=900.0, metavar="S",
                   help="seconds per measured run (default 900)")
    add_host_speed_option(p)
    add_timing_option(p, DEFAULT_TIMING)
    p.add_argument("--quiet", action="store_true", help="only the final table and recommendation")
    p.set_defaults(func=handler)


def handler(args) -> int:
    from edge_ft.bench.demo import DemoSettings, run_demo
    from edge_ft.data.tasks import get_task
    from edge_ft.errors import require_host

    require_host("edge-ft demo")
    return run_demo(DemoSettings(out=args.out, profiles=tuple(args.profiles), task=get_task(args.task).name,
                                 epochs=args.epochs, pretrain_epochs=args.pretrain_epochs, timeout=args.timeout,
                                 host_speed=args.host_speed, timing=args.timing, quiet=args.quiet))
