"""Where an ort-step training process's memory goes, phase by phase, in the device venv (no torch).

    .venv-device/bin/python tools/ort-step-memory.py BUNDLE [--batch 32] [--steps 60] [--setting SETTING]
    .venv-device/bin/python tools/ort-step-memory.py --compare SETTING,SETTING,... --rounds 5 --out FILE.jsonl \
        BUNDLE [BUNDLE ...]
    .venv-device/bin/python tools/ort-step-memory.py --summarize FILE.jsonl

Prints RSS after each phase: onnxruntime and the engine imported; onnxruntime's environment (the first session of
any graph, here a one-node graph, pays it); the bundle loaded; the engine (step and forward sessions, state, bound
buffers); the first step (onnxruntime's arena for the step's intermediates); the remaining steps. Each figure is
the process's RSS, its anonymous and file-backed parts (/proc/self/smaps_rollup) and its high-water mark, in MiB,
on a random batch of the bundle's input shape; then the CPU ms per step (median of 8 blocks of 25 more steps).

A SETTING is `default` (the engine as it ships: release+shared-arena-16m), `baseline` (onnxruntime's defaults, code
pages kept, each session its own arena: the engine before either), or tweaks on the baseline joined by `+` (TWEAKS
below). --compare runs every setting on every bundle in a process of its own, interleaved, --rounds times, and
appends one JSON line per process to --out; --summarize tabulates such a file (docs/peers.md, "Memory").
"""

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"}
# name: what it changes; session config entries are onnxruntime's (onnxruntime_session_options_config_keys.h)
TWEAKS = {
    "release": "give back onnxruntime's construction-time code pages (edge_ft.device.code_pages)",
    "pattern-off": "enable_mem_pattern = False",
    "trim": "glibc malloc_trim(0) after the environment and after the engine is built",
    "malloc-env": "the process starts with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()),
    "no-prepack": "session.disable_prepacking = 1",
    "opt-basic": "graph_optimization_level = ORT_ENABLE_BASIC",
    "opt-off": "graph_optimization_level = ORT_DISABLE_ALL",
    "init-device-alloc": "session.use_device_allocator_for_initializers = 1",
    "shared-arena": "one registered CPU arena (OrtArenaCfg defaults) for both sessions: session.use_env_allocators",
    "shared-arena-exact": "as shared-arena, arena_extend_strategy kSameAsRequested, initial chunk 64 KiB",
    "shared-arena-16m": "as the engine: shared-arena with a 16 MiB first region (ort_api.ARENA_FIRST_REGION)",
    "shared-arena-8m": "as shared-arena-16m with an 8 MiB first region",
    "shared-arena-64m": "as shared-arena-16m with a 64 MiB first region",
    "global-threads": "global thread pools (1 intra-op, 1 inter-op thread), use_per_session_threads = False",
}
_CONFIG = {"no-prepack": ("session.disable_prepacking", "1"),
           "init-device-alloc": ("session.use_device_allocator_for_initializers", "1"),
           "shared-arena": ("session.use_env_allocators", "1"),
           "shared-arena-exact": ("session.use_env_allocators", "1")}


def _split() -> dict:
    """RSS, its anonymous and file-backed parts and the high-water mark, MiB."""
    kib = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0].endswith(":"):
                kib[parts[0][:-1]] = int(parts[1])
    return {"rss": kib["Rss"] / 1024, "anon": kib["Anonymous"] / 1024, "file": (kib["Rss"] - kib["Anonymous"]) / 1024,
            "hwm": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _apply(tweaks: list[str], ort, ort_api) -> None:
    """Set the process up for `tweaks` before any session exists (memory pattern on unless `pattern-off`)."""
    sized = {"shared-arena-8m": 8 << 20, "shared-arena-16m": 16 << 20, "shared-arena-64m": 64 << 20}
    ort_api.set_memory_settings(release_code="release" in tweaks, shared_arena=bool(set(tweaks) & set(sized)))
    for tweak in set(tweaks) & set(sized):
        ort_api.ARENA_FIRST_REGION = sized[tweak]
    made = ort_api.session_options

    def options(*args, **kwargs):
        o = made(*args, **kwargs)
        o.enable_mem_pattern = "pattern-off" not in tweaks
        o.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if "opt-basic" in tweaks else
                                      ort.GraphOptimizationLevel.ORT_DISABLE_ALL if "opt-off" in tweaks else
                                      ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        o.use_per_session_threads = "global-threads" not in tweaks
        for tweak in tweaks:
            if tweak in _CONFIG:
                o.add_session_config_entry(*_CONFIG[tweak])
        return o

    ort_api.session_options = options
    if "global-threads" in tweaks:
        ort.set_global_thread_pool_sizes(1, 1)
    arenas = {"shared-arena": {}, "shared-arena-exact": {"arena_extend_strategy": 1, "initial_chunk_size_bytes": 65536}}
    for tweak in set(tweaks) & set(arenas):
        cfg = ort.OrtArenaCfg(arenas[tweak]) if arenas[tweak] else ort.OrtArenaCfg(0, -1, -1, -1)
        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(memory, cfg)


def measure(bundle_path: str, batch: int, steps: int, setting: str) -> dict:
    """One process's phases and CPU ms per step under `setting`."""
    tweaks = [] if setting in ("baseline", "default") else setting.split("+")
    unknown = sorted(set(tweaks) - set(TWEAKS))
    if unknown:
        sys.exit(f"unknown tweak {unknown[0]!r}: use baseline or {', '.join(TWEAKS)} joined by +")
    marks: list = []
    from edge_ft.device import ort_api
    from edge_ft.device.engines.ort_step import OrtStepEngine

    ort = ort_api.import_onnxruntime()
    trim = ctypes.CDLL(None).malloc_trim if "trim" in tweaks else (lambda _: None)
    marks.append({"phase": "imports", **_split()})
    if setting != "default":
        _apply(tweaks, ort, ort_api)
    ort_api.prepare_environment()  # the one-node session; its code pages are given back under `release`
    trim(0)
    marks.append({"phase": "onnxruntime environment", **_split()})
    from edge_ft.device.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    marks.append({"phase": "bundle", **_split()})
    x = np.random.default_rng(0).random((batch, *bundle.input_shape), dtype=np.float32)
    y = np.arange(batch) % bundle.num_classes
    engine = OrtStepEngine(bundle, threads=1)
    trim(0)
    marks.append({"phase": "engine", **_split()})
    engine.train_step(x, y, 0.01)
    marks.append({"phase": "first step", **_split()})
    for _ in range(steps - 1):
        engine.train_step(x, y, 0.01)
    marks.append({"phase": f"{steps} steps", **_split()})
    blocks = []
    for _ in range(8):
        start = time.process_time()
        for _ in range(25):
            engine.train_step(x, y, 0.01)
        blocks.append((time.process_time() - start) / 25 * 1000)
    method = bundle.method.method + (" head" if "prefix" in bundle.manifest else "")  # a head trains on features
    return {"setting": setting, "bundle": bundle_path, "method": method, "batch": batch, "steps": steps,
            "onnxruntime": ort.__version__, "after_imports_mb": marks[0]["rss"], "peak_mb": marks[-1]["hwm"],
            "peak_after_timing_mb": _split()["hwm"], "cpu_ms": float(np.median(blocks)), "phases": marks}


def compare(args: argparse.Namespace) -> None:
    """Every setting on every bundle, a fresh process each, interleaved round by round; JSON lines to --out."""
    for round_ in range(args.rounds):
        for bundle in args.bundles:
            for setting in args.compare.split(","):
                env = {**os.environ, **(MALLOC_ENV if "malloc-env" in setting.split("+") else {})}
                out = subprocess.run([sys.executable, __file__, bundle, "--batch", str(args.batch), "--steps",
                                      str(args.steps), "--setting", setting, "--json"],
                                     env=env, check=True, capture_output=True, text=True).stdout
                record = {**json.loads(out.strip().splitlines()[-1]), "round": round_}
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{round_} {bundle} {setting}: {record['after_imports_mb']:.1f} -> {record['peak_mb']:.1f} MB "
                      f"({record['peak_mb'] / record['after_imports_mb']:.3f}x), {record['cpu_ms']:.2f} ms/step")


def summarize(path: str, phases: list[str]) -> None:
    """Markdown tables of a --compare file: medians per batch, setting and method, then the phases (RSS, its
    anonymous and file-backed parts, high-water) of the `phases` settings."""
    groups: dict = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            groups.setdefault((r["batch"], r["setting"], r["method"]), []).append(r)
    first = next(iter(groups.values()))[0]
    print(f"onnxruntime {first['onnxruntime']}, one thread; medians over processes\n\n| batch | setting | method | "
          "processes | RSS after imports | peak RSS | peak / after imports | CPU ms/step (range) |\n"
          "|---:|---|---|---:|---:|---:|---:|---:|")
    for (batch, setting, method), rs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        ms = [r["cpu_ms"] for r in rs]
        print(f"| {batch} | {setting} | {method} | {len(rs)} | {np.median([r['after_imports_mb'] for r in rs]):.1f} MB "
              f"| {np.median([r['peak_mb'] for r in rs]):.1f} MB | "
              f"{np.median([r['peak_mb'] / r['after_imports_mb'] for r in rs]):.3f}x | "
              f"{np.median(ms):.2f} ({min(ms):.2f}–{max(ms):.2f}) |")
    for (batch, setting, method), rs in groups.items():
        if setting not in phases:
            continue
        print(f"\nbatch {batch}, {setting}, {method}\n\n| phase | RSS | anonymous | file-backed | high-water |\n"
              "|---|---:|---:|---:|---:|")
        for i, phase in enumerate(rs[0]["phases"]):
            med = {k: np.median([r["phases"][i][k] for r in rs]) for k in ("rss", "anon", "file", "hwm")}
            print(f"| {phase['phase']} | {med['rss']:.1f} MB | {med['anon']:.1f} MB | {med['file']:.1f} MB | "
                  f"{med['hwm']:.1f} MB |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="*", metavar="BUNDLE")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--setting", default="default",
                   help="default, baseline, or tweaks joined by +: " + ", ".join(TWEAKS))
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    p.add_argument("--compare", help="comma-separated settings: run each in its own process, interleaved")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="ort-step-memory-settings.jsonl")
    p.add_argument("--summarize", metavar="FILE.jsonl", help="print the tables of a --compare file")
    p.add_argument("--phases", default="baseline,default", help="with --summarize: the settings to show by phase")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize, args.phases.split(","))
        return
    if not args.bundles:
        p.error("a BUNDLE is needed")
    if args.compare:
        compare(args)
        return
    record = measure(args.bundles[0], args.batch, args.steps, args.setting)
    if args.json:
        print(json.dumps(record))
        return
    print(f"setting {args.setting}, onnxruntime {record['onnxruntime']}, CPU {record['cpu_ms']:.2f} ms/step\n"
          "| phase | RSS | anonymous | file-backed | high-water |\n|---|---:|---:|---:|---:|")
    for m in record["phases"]:
        print(f"| {m['phase']} | {m['rss']:.1f} MB | {m['anon']:.1f} MB | {m['file']:.1f} MB | {m['hwm']:.1f} MB |")


if __name__ == "__main__":
    main()
