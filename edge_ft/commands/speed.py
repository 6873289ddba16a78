"""`edge-ft speed`: ms per training step of torch eager, ort-training, ort-step and the on-device training peers
(ExecuTorch, where its venv exists) on this machine, one run."""

from __future__ import annotations

from pathlib import Path

from edge_ft.commands.argtypes import int_at_least
from edge_ft.config import METHODS, OPTIMIZERS, SEED_METHODS
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
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="every engine's optimizer (default: each method's; the peers offer sgd only, so sgd compares "
                   "like with like)")
    p.add_argument("--peers", default=None, metavar="P,P",
                   help="on-device training peers to run beside the engines: executorch, or none (default: every "
                   "peer whose venv exists; `make peers-venv` installs them)")
    p.add_argument("--out", type=Path, metavar="FILE.json", help="also write the measurements as JSON")
    p.set_defaults(func=handler)


def handler(args) -> int:
    require_host("edge-ft speed")
    from edge_ft.atomic import atomic_write_json
    from edge_ft.bench.speed import SpeedSettings, comparison_markdown, measure_speed, to_markdown
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
    settings = SpeedSettings(methods, batches, args.steps, threads=args.threads, optimizer=args.optimizer,
                             peers=_peers(args.peers))

    def progress(row: dict) -> None:
        cells = ", ".join(f"{engine} {ms:.2f} ms" for engine, ms in row["ms"].items())
        print(f"{row['method']:>5} batch {row['batch']:>4}: {cells}", flush=True)

    result = measure_speed(settings, progress)
    print()
    print(to_markdown(result))
    print()
    print(comparison_markdown(result))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def _peers(given: str | None) -> tuple[str, ...]:
    """--peers as names; without it, every peer whose venv exists (and a note on how to get the others)."""
    from edge_ft.bench.peers import INSTALL_HINT, PEERS, peers_available
    from edge_ft.errors import UserError

    if given is None:
        found = peers_available()
        if not found:
            print(f"note: no on-device training peer (ExecuTorch) runs here: {INSTALL_HINT}", flush=True)
        return found
    names = tuple(n.strip() for n in given.split(",") if n.strip() and n.strip() != "none")
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise UserError(f"--peers: unknown peer {bad[0]!r}; choose from {', '.join(PEERS)} or none")
    missing = [n for n in names if n not in peers_available()]
    if missing:
        raise UserError(f"--peers {missing[0]}: its venv is missing; {INSTALL_HINT}")
    return names
