"""`edge-ft fleet scale`: the scale table, simulated fleets of several sizes × methods × partitionings (host)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_ft.commands.argtypes import int_at_least, positive_float, share

DEFAULT_SCALE_OUT = Path("runs/fleet-scale")


def _csv(kind: Callable[[str], Any] = str) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    return parse


def register_scale(sub: Any) -> None:
    from edge_ft.fleet.scale import ScaleConfig

    d = ScaleConfig()
    s = d.settings
    p = sub.add_parser(
        "scale", help="the scale table: simulated fleets of 10, 100 and 1,000 devices × methods × partitionings",
        description="Runs `fleet simulate` for every (devices, method, partitioning) with the same settings, each "
        "to --rounds, and writes DIR/fleet-scale.json: per cell the rounds to reach --target global accuracy (or "
        "not reached), the bytes and simulated fleet time to get there, the share of the fleet with the memory for "
        "the method, and this machine's wall time and peak memory (edge_ft/fleet/scale_record.py). The file is "
        "rewritten after each cell; run the command again to finish a stopped table.")
    p.add_argument("--devices", type=_csv(int), default=d.devices, metavar="N[,N...]",
                   help=f"fleet sizes (default {','.join(map(str, d.devices))})")
    p.add_argument("--methods", type=_csv(), default=d.methods, metavar="M[,M...]",
                   help=f"lora (FedAvg), ffa (FFA-LoRA), probe, full (default {','.join(d.methods)})")
    p.add_argument("--partitionings", type=_csv(), default=d.partitionings, metavar="P[,P...]",
                   help=f"data splits (default {','.join(d.partitionings)})")
    p.add_argument("--task", default=s.task, help=f"transfer task (default {s.task}: the one with writers)")
    p.add_argument("--target", type=share, default=s.target_accuracy, metavar="ACC",
                   help=f"global test accuracy a cell must reach (default {s.target_accuracy:g})")
    p.add_argument("--rounds", type=int_at_least(1), default=s.max_rounds, metavar="R",
                   help=f"rounds per cell: the cap of 'rounds to target' (default {s.max_rounds})")
    p.add_argument("--clients-per-round", type=int_at_least(1), default=s.clients_per_round, metavar="K",
                   help=f"online devices sampled per round (default {s.clients_per_round})")
    p.add_argument("--local-steps", type=int_at_least(1), default=s.local_steps, metavar="N",
                   help=f"optimizer steps per device per round (default {s.local_steps})")
    p.add_argument("--batch", type=int_at_least(1), default=s.batch, metavar="B",
                   help=f"examples per step (default {s.batch})")
    p.add_argument("--mix", default=s.fleet_mix, metavar="P%BOARD,...",
                   help=f"the fleet's boards (default {s.fleet_mix})".replace("%", "%%"))
    p.add_argument("--availability", default=s.availability, metavar="TRACE",
                   help=f"always, random:P or diurnal:LOW-HIGH (default {s.availability})")
    p.add_argument("--deadline", type=float, default=s.deadline, metavar="S",
                   help="simulated seconds a round waits for a device (default 0: none)")
    p.add_argument("--seed", type=int, default=s.seed, help="partitions, boards, availability, sampling (default 0)")
    p.add_argument("--base", type=Path, metavar="BASE.safetensors",
                   help="base weights from `edge-ft pretrain` (default: pretrained once under DIR/prep)")
    p.add_argument("--cpus-per-client", type=positive_float, default=d.cpus_per_client, metavar="C",
                   help="CPUs one virtual ClientApp takes (default 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_SCALE_OUT, metavar="DIR",
                   help=f"cells, bundles and fleet-scale.json (default {DEFAULT_SCALE_OUT})")
    p.set_defaults(func=scale_handler)


def scale_handler(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from edge_ft.fleet.scale import ScaleConfig, run_scale
    from edge_ft.fleet.scale_record import ScaleCell

    d = ScaleConfig()
    settings = replace(d.settings, task=args.task, target_accuracy=args.target, max_rounds=args.rounds,
                       clients_per_round=args.clients_per_round, local_steps=args.local_steps, batch=args.batch,
                       fleet_mix=args.mix, availability=args.availability, deadline=args.deadline, seed=args.seed)
    cfg = ScaleConfig(args.devices, args.methods, args.partitionings, settings, args.base, args.cpus_per_client)

    def done(cell: ScaleCell) -> None:
        reached = f"round {cell.rounds_to_target}" if cell.rounds_to_target else f"not in {cell.rounds_run} rounds"
        print(f"{cell.devices} devices, {cell.method}, {cell.partitioning}: target {reached}, final accuracy "
              f"{cell.accuracy[-1]:.3f}, {cell.wall_seconds:.0f} s here", flush=True)

    command = shlex.join(["edge-ft", *sys.argv[1:]]) if sys.argv[1:2] == ["fleet"] else "edge-ft fleet scale"
    results = run_scale(args.out, cfg, command, on_cell=done)
    print(f"{len(results.cells)} cells in {args.out.resolve()}/fleet-scale.json")
    return 0
