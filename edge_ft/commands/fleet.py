"""`edge-ft fleet run`: federated fine-tuning on a fleet of emulated devices through Flower (host)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from edge_ft.commands.argtypes import int_at_least
from edge_ft.commands.bench import add_host_speed_option

DEFAULT_NODES = "4xrpi-zero-2w,2xrpi-4b-2gb"
DEFAULT_OUT = Path("runs/fleet")
METHODS = ("full", "probe", "lora")
_COUNTED = re.compile(r"^(\d+)x(.+)$")


def node_list(text: str) -> list[str]:
    """'4xrpi-zero-2w,2xrpi-4b-2gb' -> one profile name per node, in order."""
    nodes: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        m = _COUNTED.match(item)
        count, name = (int(m.group(1)), m.group(2)) if m else (1, item)
        if count < 1:
            raise argparse.ArgumentTypeError(f"a node count must be at least 1, got {item!r}")
        nodes += [name] * count
    if not nodes:
        raise argparse.ArgumentTypeError("must name at least one device profile, e.g. 4xrpi-zero-2w,2xrpi-4b-2gb")
    return nodes


def method_list(text: str) -> list[str]:
    """'lora,probe,full' -> the methods in order, each once."""
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    wrong = [m for m in methods if m not in METHODS]
    if wrong or not methods:
        raise argparse.ArgumentTypeError(f"methods are {', '.join(METHODS)} (comma-separated), got {text!r}")
    return methods


def fault_spec(text: str):
    """'NODE@ROUND' -> Fault(node, round)."""
    from edge_ft.fleet.deploy import Fault

    node, sep, rnd = text.partition("@")
    if not (sep and node.isdigit() and rnd.isdigit() and int(rnd) >= 1):
        raise argparse.ArgumentTypeError(f"expected NODE@ROUND (e.g. 1@2), got {text!r}")
    return Fault(node=int(node), round=int(rnd))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fleet", help="federated fine-tuning on a fleet of emulated devices (Flower SuperLink + SuperNodes)",
        description="Federated fine-tuning with Flower 1.42 on this machine: one SuperLink (host venv) and one "
        "SuperNode per device (device venv, no torch), each confined to its device profile.")
    sub = p.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    run = sub.add_parser(
        "run", help="plan the fleet (data per node, bundle), run the federation, measure every node",
        description="Plans the run (edge_ft.fleet.plan: one data partition per node, the bundle, the test set), "
        "starts a SuperLink with TLS and SuperNode authentication on 127.0.0.1, one SuperNode per --nodes entry "
        "(memory cap, cores and CPU speed of its profile), runs `flwr run --stream` (once per method: several "
        "methods share the SuperLink and SuperNodes, started once), and writes DIR/deploy/federation.json "
        "(DIR/METHOD/deploy/ for several): per node the peak memory of the SuperNode and its ClientApp processes "
        "against the profile's budget, per round its peak PSS and wall time, OOM kills. Nothing is left running, "
        "also on Ctrl-C.")
    run.add_argument("--nodes", type=node_list, default=node_list(DEFAULT_NODES), metavar="NxPROFILE,...",
                     help=f"device profiles, one node each, NxPROFILE for N alike (default {DEFAULT_NODES})")
    add_plan_options(run, DEFAULT_OUT)
    run.add_argument("--no-tls", action="store_true", help="plain HTTP between SuperNodes and the SuperLink "
                     "(also turns node authentication off)")
    run.add_argument("--no-auth", action="store_true", help="accept SuperNodes without registered keys")
    run.add_argument("--no-cpu-cap", action="store_true",
                     help="keep each device's memory cap, cores and threads but lift its CPU quota (faster; times "
                     "are then this machine's)")
    run.add_argument("--mode", choices=("auto", "cgroup", "rlimit"), default="auto",
                     help="how profiles are imposed (default auto: cgroup, else rlimit)")
    run.add_argument("--fault", type=fault_spec, metavar="NODE@ROUND",
                     help="SIGKILL node NODE (0-based) while it trains in round ROUND; it rejoins once that "
                     "round's training is aggregated")
    run.add_argument("--signing-key", type=Path, metavar="KEY",
                     help="the server's Ed25519 private key (`edge-ft keys new`) that signs every round's global "
                     "model; nodes get its public key (default: a key made in DIR/keys, mode 0600)")
    run.add_argument("--canary", type=float, default=0.0, metavar="FRACTION",
                     help="share of nodes that score each new global model on a holdout first; the rest get it "
                     "only when their accuracy holds (default 0: off)")
    run.add_argument("--canary-tolerance", type=float, default=0.02, metavar="DROP",
                     help="holdout accuracy drop a canary still accepts (default 0.02)")
    add_host_speed_option(run)
    run.add_argument("--device-python", metavar="PYTHON",
                     help="interpreter of the device venv (default .venv-device/bin/python when present)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or round lines")
    run.set_defaults(func=handler)
    from edge_ft.commands.fleet_scale import register_scale
    from edge_ft.commands.fleet_simulate import register_simulate

    register_simulate(sub)
    register_scale(sub)


def add_plan_options(p, default_out: Path) -> None:
    """What both `fleet run` and `fleet simulate` plan: rounds, methods, task and split, local work, output."""
    p.add_argument("--rounds", type=int_at_least(1), default=10, metavar="N", help="federated rounds (default 10)")
    p.add_argument("--method", type=method_list, default=["lora"], metavar="M[,M...]",
                   help="what each device trains: full, probe or lora; several, comma-separated, run one after "
                   "another (deployed: on the same SuperLink and SuperNodes), each in DIR/METHOD (default lora)")
    p.add_argument("--aggregation", default="fedavg", metavar="A",
                   help="how the server combines updates: fedavg, or ffa for LoRA with frozen A (default fedavg)")
    p.add_argument("--task", default="mnist-digits", metavar="TASK",
                   help="transfer task (default mnist-digits: new writers, split by writer)")
    p.add_argument("--partitioning", default="writers", metavar="P",
                   help="how the task's training data is split over the nodes: writers, dirichlet:ALPHA (label "
                   "skew), quantity:ALPHA (quantity skew), iid (default writers)")
    p.add_argument("--local-steps", type=int_at_least(0), default=0, metavar="N",
                   help="optimizer steps per round on each device (default 0: one pass over its data)")
    p.add_argument("--seed", type=int, default=0, help="partitioning, batch-order and device-model seed (default 0)")
    p.add_argument("--base", type=Path, metavar="BASE.safetensors",
                   help="base weights from `edge-ft pretrain` (default: pretrained on MNIST once under DIR/prep)")
    p.add_argument("--secagg", action="store_true",
                   help="secure aggregation (Flower's SecAgg+): the server sees only the weighted sum of the "
                   "devices' updates, never one device's")
    p.add_argument("--dp-clip", type=float, default=0.0, metavar="C",
                   help="differential privacy (Flower's central DP, client-side fixed clipping): each device clips "
                   "its update (the change it made to the global model) to L2 norm C (default 0: off)")
    p.add_argument("--dp-noise", type=float, default=0.0, metavar="SIGMA",
                   help="with --dp-clip: the server adds Gaussian noise of std SIGMA*C/n to the average of n updates "
                   "(default 0)")
    p.add_argument("--out", type=Path, default=default_out, metavar="DIR",
                   help=f"plan, results and the deployment's files (default {default_out})")


def make_plan(args, method: str, out: Path, num_nodes: int, signing_key: Path | None):
    """The FleetPlan of one method for these arguments (edge_ft.fleet.plan.plan_fleet)."""
    from edge_ft.fleet.plan import PlanConfig, plan_fleet

    return plan_fleet(out, PlanConfig(method, task=args.task, num_nodes=num_nodes, partitioning=args.partitioning,
                                      rounds=args.rounds, local_steps=args.local_steps, aggregation=args.aggregation,
                                      seed=args.seed, base=args.base, quiet=args.quiet, signing_key=signing_key,
                                      canary=args.canary, canary_tolerance=args.canary_tolerance,
                                      secagg=args.secagg, dp_noise=args.dp_noise, dp_clip=args.dp_clip))


def handler(args) -> int:
    from edge_ft.emulation.hostspeed import HostSpeed
    from edge_ft.emulation.profiles import load_profile
    from edge_ft.errors import UserError
    from edge_ft.fleet.deploy import DeployConfig, run_fleet
    from edge_ft.fleet.measure import node_table

    for name in dict.fromkeys(args.nodes):
        load_profile(name)  # an unknown profile fails here, before anything is planned or started
    if args.fault is not None and not args.fault.node < len(args.nodes):
        raise UserError(f"--fault names node {args.fault.node}, but the fleet has nodes 0..{len(args.nodes) - 1}")
    host = HostSpeed.resolve(args.host_speed, quiet=args.quiet) if not args.no_cpu_cap else HostSpeed.reference()
    out = args.out.resolve()
    several = len(args.method) > 1  # each method in DIR/METHOD, one federation for all of them
    key = args.signing_key
    if several and key is None:  # the SuperNodes are shared, so one server key signs every method's rounds
        from edge_ft.fleet.plan import signing_keys

        key = signing_keys(out, None)[0]
    plans = [make_plan(args, m, out / m if several else out, len(args.nodes), key) for m in args.method]
    echo = None if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    results = run_fleet(plans, args.nodes, DeployConfig(
        tls=not args.no_tls, auth=not (args.no_auth or args.no_tls), run_dir=out / "deploy", fault=args.fault,
        host=host, device_python=args.device_python, mode=args.mode, cpu_cap=not args.no_cpu_cap,
        progress=not args.quiet, echo=echo))
    for method, plan, result in zip(args.method, plans, results):
        print(f"{method}:" if several else "", node_table(result), sep="\n" if several else "")
        print(f"-> {plan.results_dir.parent / 'deploy' if several else out / 'deploy'}/federation.json; "
              f"results in {plan.results_dir}")
    failed = [r for r in results if r.status != "ok"]
    if failed or len(results) < len(plans):
        raise UserError(failed[0].message if failed else "a run did not start")
    return 0
