"""`edge-ft fleet simulate`: a fleet of many virtual devices through Flower's Simulation Engine (host)."""

from __future__ import annotations

from pathlib import Path

from edge_ft.commands.argtypes import int_at_least, positive_float, share

DEFAULT_SIM_OUT = Path("runs/fleet-sim")


def register_simulate(sub) -> None:
    from edge_ft.commands.fleet import add_plan_options
    from edge_ft.fleet.devices import DEFAULT_MIX, LINK_MBPS, STRAGGLERS

    p = sub.add_parser(
        "simulate", help="many virtual devices: the same ServerApp and ClientApp under Flower's Simulation Engine",
        description="Plans the run for --devices virtual devices and runs edge-ft's own ServerApp and ClientApp "
        "under Flower's Simulation Engine (Ray): a pool of ClientApp workers (cores / --cpus-per-client) does each "
        "sampled device's round with the real device engine on its own data. Each device is a board of the "
        "--mix with its memory budget and speed; --availability takes devices offline, --deadline ends rounds, "
        "all in simulated time (edge_ft/fleet/devices.py). Writes DIR/results/rounds.jsonl (per round: simulated "
        "seconds, sampled / returned / dropped / did not fit, bytes, accuracy) and DIR/simulation.json (this "
        "machine's wall time and peak memory).")
    p.add_argument("--devices", type=int_at_least(1), default=100, metavar="N", help="virtual devices (default 100)")
    add_plan_options(p, DEFAULT_SIM_OUT)
    p.add_argument("--batch", type=int_at_least(1), default=32, metavar="B", help="examples per step (default 32)")
    p.add_argument("--shots", type=int_at_least(1), metavar="K",
                   help="examples per class of the task's train pool (default: the task's own)")
    p.add_argument("--fraction", type=share, default=0.1, metavar="F",
                   help="share of the online devices sampled per round (default 0.1)")
    p.add_argument("--clients-per-round", type=int_at_least(1), metavar="K",
                   help="sample this many online devices per round, seeded, instead of --fraction")
    p.add_argument("--mix", default=DEFAULT_MIX, metavar="P%BOARD,...",  # argparse formats help (not metavar) with %
                   help=f"the fleet's boards, device profiles by share (default {DEFAULT_MIX})".replace("%", "%%"))
    p.add_argument("--availability", default="always", metavar="TRACE",
                   help="always, random:P or diurnal:LOW-HIGH (online probability by local hour; default always)")
    p.add_argument("--deadline", type=float, default=0.0, metavar="S",
                   help="simulated seconds a round waits for a device (default 0: none)")
    p.add_argument("--stragglers", choices=STRAGGLERS, default="drop",
                   help="past the deadline: drop the update, or partial: each device runs the steps that fit")
    p.add_argument("--link-mbps", type=positive_float, default=LINK_MBPS, metavar="MBPS",
                   help=f"devices' link speed, both ways (default {LINK_MBPS:g})")
    p.add_argument("--cpus-per-client", type=positive_float, default=1.0, metavar="C",
                   help="CPUs one virtual ClientApp takes; cores / C run at once (default 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run planned in DIR (DIR/METHOD) from its last committed round, up to --rounds "
                   "(a killed simulation resumes as the deployment's server does); the plan is not made again")
    p.add_argument("--quiet", action="store_true", help="less output")
    p.set_defaults(func=simulate_handler)


def simulate_handler(args) -> int:
    from edge_ft.fleet.plan import PlanConfig, plan_fleet
    from edge_ft.fleet.simulate import SimulationConfig, simulate

    out = args.out.resolve()
    several = len(args.method) > 1
    for method in args.method:
        where = out / method if several else out
        if args.resume:
            from edge_ft.fleet.plan import load_plan

            plan = load_plan(where)
            plan.run_config.update(resume=True, rounds=args.rounds)
            result = simulate(plan, SimulationConfig(cpus_per_client=args.cpus_per_client))
            print(f"{method}: resumed up to round {args.rounds} in {result['wall_seconds']:.0f} s here")
            continue
        plan = plan_fleet(where, PlanConfig(
            method, task=args.task, num_nodes=args.devices, partitioning=args.partitioning, rounds=args.rounds,
            local_steps=args.local_steps, aggregation=args.aggregation if method == "lora" else "fedavg",
            seed=args.seed, batch=args.batch, base=args.base, shots=args.shots, fraction_train=args.fraction,
            min_train_nodes=1, min_available_nodes=1, round_timeout=24 * 3600.0, threads=1, quiet=args.quiet,
            fleet_mix=args.mix, availability=args.availability, deadline=args.deadline,
            stragglers=args.stragglers, link_mbps=args.link_mbps, simulation=True, secagg=args.secagg,
            dp_noise=args.dp_noise, dp_clip=args.dp_clip, clients_per_round=args.clients_per_round or 0,
            bundle_cache=out / "bundles"))
        result = simulate(plan, SimulationConfig(cpus_per_client=args.cpus_per_client))
        print(f"{method}: {args.devices} devices, {args.rounds} rounds in {result['wall_seconds']:.0f} s here, peak "
              f"memory {result['peak_memory_mb']:.0f} MiB ({result['peak_memory_mb_per_device']:.2f} per device); "
              f"results in {plan.results_dir}")
    return 0
