"""`edge-ft bench`: measure every method x engine x device profile, each run confined to its profile (host)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_ft.bench.prepare import MODEL_LABELS, MODEL_NAMES
from edge_ft.commands.argtypes import add_lora_options, int_at_least, positive_float
from edge_ft.commands.gate import add_gate_options
from edge_ft.config import default_alpha
from edge_ft.contracts import ENGINES, ORT_STEP, SWEEP_LABELS, TIMINGS
from edge_ft.errors import UserError
from edge_ft.training_defaults import recipe_default

DEFAULT_RESULTS = Path("runs/bench/results.jsonl")
DEFAULT_PROFILES = "host,rpi-zero-2w"
DEFAULT_METHODS = ",".join(SWEEP_LABELS)
DEFAULT_ENGINES = ",".join(ENGINES)
DEFAULT_TIMING = "cpu"  # needs no root, takes this machine's time, leaves out throttling (docs/emulation.md)


def comma_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("must name at least one item (comma-separated)")
    return list(dict.fromkeys(items))


def accuracy_fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def add_host_speed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host-speed", type=positive_float, metavar="X",
                   help="this machine's core speed relative to the reference core, which scales every CPU quota "
                        "(default: measured once per machine and cached; `edge-ft profile check` shows it)")


def add_timing_option(p: argparse.ArgumentParser, default: str, scope: str = "") -> None:
    p.add_argument("--timing", choices=TIMINGS, default=default,
                   help=f"{scope}an emulated board's step time: cpu runs the job on one thread at this machine's speed "
                        "(memory and cores still the board's) and scales its CPU time to the board's, its threads by "
                        "the profile's thread_scaling; quota paces the board's threads with CPU quotas so the wall "
                        f"time is the board's, and needs root (default {default})")


def add_sweep_options(p: argparse.ArgumentParser, profiles: str | None = DEFAULT_PROFILES) -> None:
    """The options that say what to measure and how; shared by `bench`, `recommend` and `demo`."""
    if profiles is not None:
        p.add_argument("--profiles", type=comma_list, default=comma_list(profiles), metavar="P1,P2",
                       help=f"device profiles (edge-ft profile list; default {profiles})")
    p.add_argument("--methods", type=comma_list, default=comma_list(DEFAULT_METHODS), metavar="M1,M2",
                   help=f"{', '.join(SWEEP_LABELS)} (-cached: trained on the cached frozen prefix) "
                        f"(default {DEFAULT_METHODS})")
    p.add_argument("--engines", type=comma_list, default=comma_list(DEFAULT_ENGINES), metavar="E1,E2",
                   help=f"torch, ort-training, ort-step (default {DEFAULT_ENGINES})")
    p.add_argument("--task", type=comma_list, default=None, metavar="TASK",
                   help="transfer task(s): mnist-digits, mnist-fashion, or a folder with train.npz + test.npz "
                   "(default mnist-digits)")
    p.add_argument("--data", type=Path, metavar="DIR|TRAIN.npz",
                   help="your own data instead of --task: a folder with train.npz and test.npz (`edge-ft data "
                   "convert --test-fraction`), or a training .npz with --eval")
    p.add_argument("--eval", type=Path, metavar="TEST.npz", help="held-out data for --data's accuracy")
    p.add_argument("--base", metavar="BASE.safetensors",
                   help="base weights (default: pretrain once into the results folder's prep/)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int_at_least(1), metavar="N",
                        help=f"passes over the data (default: {recipe_default('epochs')})")
    length.add_argument("--steps", type=int_at_least(1), metavar="N",
                        help="exact optimizer steps (ORT engines only)")
    p.add_argument("--batch", type=int_at_least(1), metavar="N",
                   help=f"examples per step (default: {recipe_default('batch')})")
    p.add_argument("--seed", type=int, default=0, help="batch-order seed (default 0)")
    add_lora_options(p, layers=False)
    p.add_argument("--target-accuracy", type=accuracy_fraction, default=0.9, metavar="F",
                   help="time-to-accuracy threshold (default 0.9)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, metavar="FILE.jsonl",
                   help=f"results file, appended to (default {DEFAULT_RESULTS}); prep/ and runs/ go beside it")
    p.add_argument("--timeout", type=positive_float, default=1800.0, metavar="S",
                   help="seconds per measured run before it counts as a timeout (default 1800)")
    p.add_argument("--mode", choices=("auto", "cgroup", "rlimit"), default="auto",
                   help="how confined profiles are imposed (default auto: cgroup, else rlimit)")
    p.add_argument("--parallel", type=int_at_least(0), default=0, metavar="N",
                   help="quota-paced runs side by side (default 0: as many as fit in half the CPUs, max 4); runs timed "
                        "by CPU time run one at a time")
    p.add_argument("--repeats", type=int_at_least(1), metavar="N",
                   help="runs at this machine's speed (native, or --timing cpu): measure N times, in rounds, and keep "
                        "the least disturbed (fastest) one; quota-paced runs once (default 3 native, 5 by CPU time)")
    add_host_speed_option(p)
    add_timing_option(p, DEFAULT_TIMING)
    p.add_argument("--device-python", metavar="PYTHON",
                   help="interpreter with standard onnxruntime for ort-step runs (default .venv-device/bin/python "
                        "when present, else this one)")
    p.add_argument("--pretrain-epochs", type=int_at_least(1), metavar="N",
                   help="epochs when the base is pretrained here (default: the pretraining recipe)")
    p.add_argument("--force", action="store_true", help="re-measure runs already in the results file")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-run lines")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure accuracy, memory, step time and payload of every method x engine x device profile",
        description="Fine-tunes every combination of --methods, --engines and --profiles, each run a child process "
        "confined to its profile (memory cap, cores, per-core speed; `host` runs natively), and appends one JSON "
        "record per run to --results. Runs already recorded are skipped, so an interrupted sweep resumes. "
        "An out-of-memory kill or a timeout is a result, not an error. Summarise with `edge-ft report`. With "
        "--assert or --baseline the sweep's runs are then checked (exit 1 when a check fails; `edge-ft gate` checks "
        "an existing results file the same way).",
    )
    add_sweep_options(p)
    models = p.add_argument_group(
        "per model (--models)", "With --models the sweep measures, per model x profile x method, the ort-step AdamW "
        "training step on synthetic inputs of the model's real shape (peak RSS, ms/step at --batch, default 32, "
        "over --steps timed steps, default 5) and searches the largest batch that fits the profile's memory budget. "
        f"--methods then defaults to {','.join(MODEL_LABELS)} (-cached: the head trained on a feature cache of "
        "--cache-examples examples, built first); task, engine and training-length options do not apply.")
    models.add_argument("--models", type=comma_list, default=None, metavar="M1,M2",
                        help=f"models to measure: {', '.join(MODEL_NAMES)} (default: none, the task sweep)")
    models.add_argument("--max-batch", type=int_at_least(1), default=1024, metavar="N",
                        help="largest batch the search tries (default 1024)")
    models.add_argument("--last-k", type=int_at_least(1), default=2, metavar="K",
                        help="last-k: conv/linear layers trained, counted back from the output (default 2)")
    models.add_argument("--cache-examples", type=int_at_least(1), default=5000, metavar="N",
                        help="examples in a cached label's feature cache: the training set it stands for "
                        "(default 5000)")
    add_gate_options(p)
    p.set_defaults(func=handler)


def model_settings(args, host_speed: float):
    """The TradeoffSettings of `bench --models`."""
    from edge_ft.bench.tradeoff import TradeoffSettings

    if args.epochs:
        raise UserError("--epochs applies to the task sweep; with --models give --steps (timed steps per run)")
    if args.engines != comma_list(DEFAULT_ENGINES) and args.engines != [ORT_STEP]:
        raise UserError("--models measures the ort-step engine (the one every board installs); drop --engines")
    return TradeoffSettings(batch=args.batch or 32, steps=args.steps or 5, max_batch=args.max_batch, rank=args.rank,
                            alpha=args.alpha if args.alpha is not None else default_alpha(args.rank),
                            last_k=args.last_k, host_speed=host_speed, timing=args.timing,
                            cache_examples=args.cache_examples)


def model_methods(args) -> list[str]:
    return list(MODEL_LABELS) if args.methods == comma_list(DEFAULT_METHODS) else args.methods


def settings_from_args(args, host_speed: float):
    """The SweepSettings the arguments describe, with every quota scaled by `host_speed`."""
    from edge_ft.bench.measure import SweepSettings

    return SweepSettings(epochs=args.epochs, steps=args.steps, batch=args.batch, seed=args.seed, rank=args.rank,
                         alpha=args.alpha if args.alpha is not None else default_alpha(args.rank),
                         host_speed=host_speed, target_accuracy=args.target_accuracy, timing=args.timing)


def resolve_tasks(args) -> list[str]:
    """args.task from --task, or --data/--eval as one data folder (checked, and copied beside the results so the
    sweep measures what it names); mnist-digits when neither is given."""
    if args.data is None:
        if args.eval is not None:
            raise UserError("--eval goes with --data (your training .npz); built-in tasks bring their test split")
        args.task = args.task or ["mnist-digits"]
        return args.task
    if args.task:
        raise UserError("give --task (a built-in task) or --data (your own), not both")
    from edge_ft.bench.own_data import data_folder

    args.task = [str(data_folder(args.data, args.eval, args.results.parent / "prep" / "data"))]
    args.data = args.eval = None  # resolved: a second call returns the folder
    return args.task


def sweep_from_args(args, profiles: list[str]):
    """(jobs, options) for the sweep the arguments describe."""
    from edge_ft.bench.sweep import SweepOptions, plan
    from edge_ft.emulation.hostspeed import HostSpeed
    from edge_ft.emulation.profiles import load_profile

    resolve_tasks(args)
    host = HostSpeed.resolve(args.host_speed, quiet=args.quiet)
    settings = settings_from_args(args, host.speed)
    jobs = plan(args.task, args.methods, args.engines, [load_profile(p) for p in profiles], settings)
    opts = SweepOptions(base=args.base, pretrain_epochs=args.pretrain_epochs, force=args.force,
                        timeout=args.timeout, mode=args.mode, parallel=args.parallel,
                        repeats=args.repeats,
                        device_python=args.device_python, quiet=args.quiet, host=host)
    return jobs, opts


def handler(args) -> int:
    from edge_ft.bench.sweep import run_sweep, summarize
    from edge_ft.commands.gate import check_records, plan_gates

    if args.models:
        return models_handler(args)
    gates = plan_gates(args)  # a malformed gate fails now, not after the sweep
    jobs, opts = sweep_from_args(args, args.profiles)
    records = run_sweep(jobs, args.results, opts)
    if records and not args.quiet:
        print(summarize(records))
        print(f"-> {args.results}; summarise with `edge-ft report {args.results} --out DIR`")
    return check_records(gates, records) if gates.active else 0


def models_handler(args) -> int:
    from edge_ft.bench.sweep import SweepOptions
    from edge_ft.bench.tradeoff import plan_models, run_models, summarize_models
    from edge_ft.emulation.hostspeed import HostSpeed
    from edge_ft.emulation.profiles import load_profile
    from edge_ft.errors import require_host

    require_host("edge-ft bench --models (exporting the step graphs)")
    if args.task or args.data or args.eval:
        raise UserError("--models measures synthetic inputs of each model's shape; drop --task, --data and --eval")
    if args.asserts or getattr(args, "baseline", None):
        raise UserError("--assert and --baseline check task sweeps; with --models use `edge-ft report`")
    profiles = [load_profile(p) for p in args.profiles]
    plan_models(args.models, model_methods(args), profiles, model_settings(args, 1.0))  # refuse before measuring
    host = HostSpeed.resolve(args.host_speed, quiet=args.quiet)
    jobs = plan_models(args.models, model_methods(args), profiles, model_settings(args, host.speed))
    opts = SweepOptions(force=args.force, timeout=args.timeout, mode=args.mode, device_python=args.device_python,
                        quiet=args.quiet, host=host)
    records = run_models(jobs, args.results, opts)
    if records and not args.quiet:
        print(summarize_models(records))
        print(f"-> {args.results}; summarise with `edge-ft report {args.results} --out DIR`")
    return 0
