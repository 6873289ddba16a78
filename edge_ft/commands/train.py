"""`edge-ft train`: fine-tune an exported bundle on the device (numpy + onnxruntime only, never torch)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edge_ft.commands.argtypes import int_at_least, positive_float
from edge_ft.contracts import MANIFEST, MEMORY_BUDGET_ENV, RESULTS
from edge_ft.errors import UserError, plural
from edge_ft.training_defaults import recipe_default
from edge_ft.trust.policy import add_trust_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a bundle on this device and measure it (no torch needed)",
        description="Train an `edge-ft export` bundle with the engine its manifest names. Writes the trained "
        "tensors, engine checkpoints, a forward-only model.onnx and results.json (losses, accuracy, ms/step, "
        "peak RSS, artifact sizes) to --out. Defaults come from the method's recipe.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder from `edge-ft export`")
    p.add_argument("--data", required=True, metavar="TRAIN.npz", help="training data: x uint8 images or float32 inputs in the bundle's input shape, y (LeNet-5: uint8 (N,28,28))")
    p.add_argument("--eval", metavar="TEST.npz", help="held-out data for accuracy after each epoch")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int_at_least(1), metavar="N", help=f"passes over the data (default: {recipe_default('epochs')})")
    length.add_argument("--steps", type=int_at_least(1), metavar="N", help="exact number of optimizer steps")
    p.add_argument("--batch", type=int_at_least(1), metavar="N", help=f"examples per step (default: {recipe_default('batch')})")
    p.add_argument("--lr", type=positive_float, help="learning rate (default: the bundle's)")
    p.add_argument("--schedule", choices=("constant", "cosine", "step"), help=f"per-epoch schedule (default: {recipe_default('schedule')})")
    p.add_argument("--threads", type=int_at_least(0), metavar="N",
                   help="onnxruntime intra-op threads (default: --profile's, else 0 = onnxruntime decides)")
    p.add_argument("--profile", metavar="NAME", help="device profile whose thread count to use (edge-ft profile)")
    p.add_argument("--mem-arena", choices=("on", "off"), help="onnxruntime CPU memory arena (default on)")
    p.add_argument("--seed", type=int, default=0, help="batch-order seed (default 0)")
    p.add_argument("--checkpoint-every", type=int_at_least(0), default=0, metavar="N",
                   help="save the training state every N steps into OUT/checkpoints (default: only at the end and "
                   "on Ctrl-C)")
    p.add_argument("--keep", type=int_at_least(1), default=3, metavar="K",
                   help="checkpoints to keep in OUT/checkpoints, the newest (default 3)")
    p.add_argument("--cache", "--cache-features", dest="cache", action=argparse.BooleanOptionalAction,
                   help="run the bundle's frozen prefix (the layers before the first that trains) once per example "
                   "and train the rest on the cached features; default: when that saves time and fits --profile's "
                   "memory budget (else the cache is memory-mapped in --out). Full and bias bundles have no prefix")
    p.add_argument("--profile-ops", action="store_true",
                   help="ort-step bundles: time every operator of the step graph with onnxruntime's profiler "
                   "(summary in RUN/op_profile.json and printed; steps run a little slower while profiled)")
    p.add_argument("--out", metavar="RUN", help="run folder (default runs/<bundle name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (same bundle, data and options; "
                   "starts from step 0 when it has none)")
    p.add_argument("--force", action="store_true", help="replace a finished run already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress output; the final summary line is still printed")
    add_trust_option(p)
    p.set_defaults(func=handler)


def handler(args) -> int:
    from edge_ft.data.npz import agreed_classes, load_labelled_npz
    from edge_ft.device import ort_api
    from edge_ft.device.api import run_settings
    from edge_ft.device.bundle import load_bundle
    from edge_ft.device.trainer import load_runtime, train
    from edge_ft.validate import writable_folder

    out = writable_folder(args.out or Path("runs") / Path(args.bundle).resolve().name)
    if (out / RESULTS).is_file() and not args.force:  # refused before any data loads (train() refuses it too)
        what = "there is nothing to resume" if args.resume else "choose another --out"
        raise UserError(f"{out}: holds a finished run (results.json); {what}, or add --force to train it again "
                        "from step 0 and replace it")
    from edge_ft.trust.policy import enforce

    enforce("train", [args.bundle], args.trust)
    bundle = load_bundle(args.bundle)
    threads, budget = args.threads, _confined_budget()
    if args.profile:  # read even when --threads overrides it: a broken profile is refused, never ignored
        from edge_ft.emulation.profiles import load_profile

        profile = load_profile(args.profile)
        budget = profile.budget_bytes
        threads = profile.threads if threads is None else threads
    if args.mem_arena:
        ort_api.set_mem_arena(args.mem_arena == "on")
    settings = run_settings(bundle, epochs=args.epochs, steps=args.steps, batch=args.batch, lr=args.lr,
                            schedule=args.schedule, seed=args.seed, threads=threads or 0,
                            checkpoint_every=args.checkpoint_every, keep=args.keep, cache_features=args.cache,
                            memory_budget=budget, profile_ops=args.profile_ops, quiet=args.quiet)
    rss_after_imports = load_runtime(bundle.engine)
    x, y, classes = load_labelled_npz(args.data, bundle.num_classes, bundle.input_shape)
    eval_data = None
    if args.eval:
        x_eval, y_eval, eval_classes = load_labelled_npz(args.eval, bundle.num_classes, bundle.input_shape)
        eval_data = (x_eval, y_eval)
        classes = agreed_classes(classes, args.data, eval_classes, args.eval)
    classes = agreed_classes(classes, args.data, bundle.classes, bundle.path / MANIFEST)
    try:
        r = train(bundle, (x, y), eval_data, settings, out, rss_after_imports, resume=args.resume, classes=classes,
                  replace=args.force)
    except KeyboardInterrupt:  # Ctrl-C or a signal: the trainer saved a checkpoint; the summary line names it
        from edge_ft.device.resume import RESUME
        from edge_ft.emulation import lifetime

        if (out / RESUME).is_file():
            lifetime.kept(f"a checkpoint in {out} (add --resume to continue); no result")
        raise
    acc = "" if r["accuracy"] is None else f", eval accuracy {r['accuracy']:.4f}"
    print(f"{out}: {plural(r['steps'], 'step')}, final loss {r['losses'][-1]:.4f}{acc}, "
          f"{r['step_latency_ms']['p50']:.2f} ms/step (p50), peak RSS {r['memory_mb']['peak_rss_sampled']:.0f} MB")
    if args.profile_ops:
        from edge_ft.device.op_profile import PROFILE_FILE, table

        print(table(json.loads((out / PROFILE_FILE).read_text())))
    return 0


def _confined_budget() -> int:
    """The memory budget a confined run's parent gave (bytes), or 0: the machine's free memory decides."""
    value = os.environ.get(MEMORY_BUDGET_ENV, "")
    return int(value) if value.isdigit() else 0

