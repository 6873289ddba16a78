"""`edge-ft speed`: ms per training step of torch eager, ort-training and ort-step on this machine, one run."""

from __future__ import annotations

from pathlib import Path

from edge_ft.commands.argtypes import int_at_least
from edge_ft.config import METHODS, SEED_METHODS
from edge_ft.errors import require_host


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "speed",
        help="compare the engines' ms/step on this machine in one interleaved run, with the FLOP limit (host)",
        description="Trains each method on one real MNIST batch with each engine (torch eager, ort-training where "
        "its wheel installs, ort-step), the engines taking turns in rounds, and reports the median ms/step, "
        "ort-step's ratios to the others, and the FLOP limit (cost-model FLOPs at this core's sgemm rate). "
        "A benchmark for a quiet machine; per-operator detail: `edge-ft train BUNDLE --profile-ops`.",
    )
    p.add_argument("--methods", default=",".join(SEED_METHODS), metavar="M,M",
                   help=f"methods to time (default {','.join(SEED_METHODS)})")
    p.add_argument("--batches", default="32,256", metavar="B,B", help="batch sizes to time")
    p.add_argument("--steps", type=int_at_least(5), default=40, metavar="N", help="timed steps per engine and cell")
    p.add_argument("--threads", type=int_at_least(1), default=1, metavar="N", help="intra-op threads of every engine")
    p.add_argument("--out", type=Path, metavar="FILE.json", help="also write the measurements as JSON")
    p.set_defaults(func=handler)


def handler(args) -> int:
    require_host("edge-ft speed")
    from edge_ft.atomic import atomic_write_json
    from edge_ft.bench.speed import SpeedSettings, measure_speed, to_markdown
    from edge_ft.errors import UserError

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: unknown method {bad[0] if bad else '(none)'!r}; choose from {', '.join(METHODS)}")
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise UserError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise UserError(f"--batches must be positive integers, got {args.batches!r}")
    settings = SpeedSettings(methods, batches, args.steps, threads=args.threads)

    def progress(row: dict) -> None:
        cells = ", ".join(f"{engine} {ms:.2f} ms" for engine, ms in row["ms"].items())
        print(f"{row['method']:>5} batch {row['batch']:>4}: {cells}", flush=True)

    result = measure_speed(settings, progress)
    print()
    print(to_markdown(result))
    if args.out:
        atomic_write_json(args.out, result)
    return 0
