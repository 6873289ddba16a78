"""Time and size a bundle's training step on synthetic inputs of the model's real shape (device side, no torch).

    python -m edge_ft.device.step_probe BUNDLE --batch 32 --steps 5 --warmup 2 --threads 4 --out probe.json

What a board's memory and step time depend on is the batch's shape, not its values, so the probe feeds standard
normal inputs of the bundle's input shape and uniform random labels: no data set has to exist on the board. It
runs `warmup` untimed steps (onnxruntime plans and allocates its buffers in the first one), then `steps` timed
ones, takes its own peak RSS from before the engine loads (edge_ft.device.metrics.PeakRSS), and writes the one
results schema's summary block (edge_ft.run_record) with accuracy None and no epochs, plus what it ran and the CPU
time per timed step (`cpu_ms_per_step`, every thread of the process: what the step costs, apart from how long it
waited) with the "cpu" block `edge-ft train` writes (edge_ft.device.board_time: on an emulated board, the board
time that CPU time stands for). `edge-ft bench --models` and `edge-ft profile check --workload train` run it
confined to each board.

With `--cache N` it measures a cached run instead (edge_ft.device.feature_cache): it first builds the feature cache
of N examples as `edge-ft train --cache` would (features.onnx over synthetic inputs, 32 at a time, in memory or,
beyond half of `--budget-mb`, memory-mapped in a scratch folder), then trains the bundle's head on batches gathered
from it. The peak RSS includes the cache and the prefix session; the step times are the head's steps alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_ft.atomic import atomic_write_json
from edge_ft.contracts import MB
from edge_ft.device import feature_cache
from edge_ft.device.board_time import CpuMeter, clock_every_step, quota_from_env, step_cpu
from edge_ft.device.bundle import Bundle, load_bundle
from edge_ft.device.engines import engine_class
from edge_ft.device.inference import EVAL_BATCH
from edge_ft.device.metrics import PeakRSS
from edge_ft.device.trainer import load_runtime
from edge_ft.errors import UserError
from edge_ft.run_record import SUMMARY, make_summary

INPUTS = "synthetic: standard normal inputs of the model's input shape, uniform random labels"


def synthetic_batch(input_shape: tuple[int, ...], num_classes: int, batch: int,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (batch, *input_shape), y int64 (batch,)) drawn from `seed`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *input_shape), dtype=np.float32)
    return x, rng.integers(0, num_classes, size=batch, dtype=np.int64)


def cached_features(bundle: Bundle, examples: int, budget_bytes: int | None, threads: int, folder: Path,
                    seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """The feature cache `edge-ft train --cache` keeps for `examples` examples: features.onnx over synthetic inputs,
    a chunk at a time, in memory or (beyond half the budget, as the trainer decides) memory-mapped in `folder`."""
    budget = budget_bytes if budget_bytes is not None else 2**62
    cache = feature_cache.plan(bundle, True, examples, 0, examples, budget)
    chunks = (synthetic_batch(bundle.input_shape, bundle.num_classes, min(EVAL_BATCH, examples - i), seed + 1 + i)[0]
              for i in range(0, examples, EVAL_BATCH))
    t0, c0 = time.perf_counter(), time.process_time()
    into = None if cache.in_memory else folder / feature_cache.CACHE_FILE
    features = feature_cache.compute_chunks(bundle, threads, examples, chunks, into)
    return features, {"examples": examples, "bytes": cache.bytes, "in_memory": cache.in_memory,
                      "features_shape": list(features.shape[1:]), "seconds": round(time.perf_counter() - t0, 4),
                      "cpu_seconds": round(time.process_time() - c0, 4)}


def probe(bundle_path: str | Path, batch: int, steps: int, warmup: int = 2, threads: int = 0, seed: int = 0,
          lr: float | None = None, cache_examples: int = 0, budget_bytes: int | None = None) -> dict[str, Any]:
    """Run warmup + steps training steps of the bundle at `batch`; return its results (summary block included).
    cache_examples > 0: train its head on a feature cache of that many examples, built first, as a cached run."""
    bundle = load_bundle(bundle_path)
    trains = bundle.head if cache_examples else bundle
    if trains is None:
        raise UserError(f"{bundle_path}: this {bundle.method.method} bundle has no frozen prefix to cache")
    rss_after_imports = load_runtime(bundle.engine)
    x, y = synthetic_batch(trains.input_shape, bundle.num_classes, batch, seed)
    lr = bundle.optimizer.lr if lr is None else lr
    seconds, cpu, losses, meter = [], [], [], CpuMeter()
    every_step = clock_every_step()  # timed by CPU time: the typical step's counts (edge_ft.device.board_time)
    cache: dict[str, Any] | None = None
    features, picks = None, np.zeros((warmup + steps, 0), np.int64)
    with PeakRSS(0.005) as peak, tempfile.TemporaryDirectory(prefix="step-probe-") as scratch:
        if cache_examples:
            features, cache = cached_features(bundle, cache_examples, budget_bytes, threads, Path(scratch), seed)
            picks = np.random.default_rng(seed).integers(0, cache_examples, size=(warmup + steps, batch))
        engine = engine_class(trains.engine)(trains, threads=threads)
        for i in range(warmup + steps):
            if i == warmup:
                meter.start()
            if features is not None:  # a gather from the cache, outside the step, like the loader
                x = np.ascontiguousarray(features[picks[i]])
            t0, c0 = time.perf_counter(), time.process_time() if every_step else 0.0
            loss, _ = engine.train_step(x, y, lr)
            if i >= warmup:
                seconds.append(time.perf_counter() - t0)
                if every_step:
                    cpu.append(time.process_time() - c0)
            losses.append(loss)
        used, busiest = meter.stop()  # all the process's threads
        del engine
        features = None  # a memory-mapped cache closes before its folder goes
    cpu_ms = used / steps * 1e3
    if not all(np.isfinite(losses)):
        raise UserError(f"{bundle_path}: the step's loss is not finite ({losses}); the bundle is broken")
    # PeakRSS only: ru_maxrss would include the spawner's high-water mark, which Linux carries across fork and exec.
    peak_mb = peak.bytes / MB
    return {"bundle": str(bundle_path), "engine": bundle.engine, "method": bundle.method.to_dict(),
            "optimizer": bundle.optimizer.name, "model": bundle.model.title if bundle.model else "LeNet-5",
            "input_shape": list(bundle.input_shape), "batch": batch, "warmup_steps": warmup, "threads": threads,
            "inputs": INPUTS, "feature_cache": cache, "losses": [round(float(v), 6) for v in losses],
            "cpu_ms_per_step": round(cpu_ms, 4),
            "cpu": step_cpu(steps, used, busiest, quota_from_env(), warmup_left_out=warmup > 0,
                            wall_seconds=sum(seconds), typical_seconds=float(np.median(cpu)) if cpu else None),
            SUMMARY: make_summary(bundle.engine, None, warmup + steps, [], [s * 1e3 for s in seconds],
                                  round(rss_after_imports / MB, 2), round(peak_mb, 2))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_ft.device.step_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="bundle folder (edge-ft export)")
    p.add_argument("--batch", type=int, required=True, help="examples per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default 0: its own)")
    p.add_argument("--cache", type=int, default=0, metavar="N",
                   help="train the head on a feature cache of N synthetic examples, built first (a cached run)")
    p.add_argument("--budget-mb", type=int, default=None, metavar="MB",
                   help="the board's memory budget: a cache above half of it is memory-mapped, as in edge-ft train")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    try:
        if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.cache < 0:
            raise UserError("--batch and --steps must be at least 1, --warmup and --cache at least 0")
        budget = None if args.budget_mb is None else args.budget_mb * MB
        atomic_write_json(args.out, probe(args.bundle, args.batch, args.steps, args.warmup, args.threads,
                                          cache_examples=args.cache, budget_bytes=budget))
    except UserError as e:
        print(f"step probe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
