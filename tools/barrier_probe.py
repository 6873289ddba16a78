"""Parallel sections under a board's CPU quota: how long a barrier-synchronised step takes against what the quota
allows, for each board, N runs. The pattern of onnxruntime's intra-op pool, without onnxruntime's own noise:

    sudo python tools/barrier_probe.py --profiles rpi-zero-2w,rpi-3b,rpi-4b-2gb --runs 3

Each run is a confined child with the board's threads; every thread burns CHUNK_MS of CPU time (sha256, which
releases the GIL) and waits at a barrier, ITERATIONS times. The job needs threads x CHUNK_MS of CPU per iteration,
so under its quota an iteration cannot take less than threads x CHUNK_MS / total_quota; `ratio` is that floor over
the measured mean (1.0: no time lost to the way the quota is applied; below 1: threads waited at the barrier for a
sibling that was throttled). Run the same file with two checkouts' Pythons, alternating, to compare two designs.
Prints one JSON line per run;

    python tools/barrier_probe.py --summarise docs/steady/barrier-probe.jsonl
prints the Markdown table of such lines (per chunk size, board and label: each run's ratio and the median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict

CHUNK_MS = 0.5  # CPU time each thread spends between two barriers
ITERATIONS = 200
_CHILD = """
import hashlib, sys, threading, time
n, chunk, iterations = int(sys.argv[1]), float(sys.argv[2]) / 1000, int(sys.argv[3])
data = b"x" * 4096
barrier = threading.Barrier(n)
def work():
    for _ in range(iterations):
        t = time.thread_time()
        while time.thread_time() - t < chunk:
            hashlib.sha256(data).digest()
        barrier.wait()
threads = [threading.Thread(target=work) for _ in range(n)]
w = time.perf_counter()
[t.start() for t in threads]; [t.join() for t in threads]
print((time.perf_counter() - w) / iterations * 1000)
"""


def summarise(path: str) -> list[str]:
    """The Markdown table of a file of this probe's lines: per chunk size, board and label, each run's ratio."""
    runs = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            runs[(r["chunk_ms"], r["profile"], r["label"])].append(r)
    lines = ["| CPU ms per thread between barriers | profile | design | floor ms | ms per iteration per run "
             "| floor / measured per run | median |", "|---:|---|---|---:|---|---|---:|"]
    for (chunk, profile, label), rs in sorted(runs.items()):
        ratios = [r["ratio"] for r in rs]
        times = " / ".join(f"{r['ms_per_iteration']:.1f}" for r in rs)
        lines.append(f"| {chunk:g} | {profile} | {label} | {rs[0]['floor_ms']:.1f} | {times} | "
                     + " / ".join(f"{v:.2f}" for v in ratios) + f" | {statistics.median(ratios):.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profiles", default="rpi-zero-2w,rpi-3b,rpi-4b-2gb")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--label", default="", help="written into every line (which design ran)")
    p.add_argument("--chunk-ms", type=float, default=CHUNK_MS, help=f"CPU ms per thread per iteration ({CHUNK_MS})")
    p.add_argument("--iterations", type=int, default=ITERATIONS, help=f"barriers per run ({ITERATIONS})")
    p.add_argument("--summarise", metavar="FILE.jsonl", help="print the table of earlier runs' lines and stop")
    args = p.parse_args(argv)
    if args.summarise:
        print("\n".join(summarise(args.summarise)))
        return 0
    from edge_ft.emulation.emulate import run_confined
    from edge_ft.emulation.hostspeed import HostSpeed
    from edge_ft.emulation.profiles import load_profile

    host = HostSpeed.resolve(quiet=True)
    for k in range(args.runs):
        for name in args.profiles.split(","):
            profile = load_profile(name)
            r = run_confined([sys.executable, "-c", _CHILD, str(profile.threads), str(args.chunk_ms),
                              str(args.iterations)],
                             profile, host=host, timeout=600)
            ms = float(r.stdout_tail.split()[-1]) if r.status == "ok" else None
            floor = profile.threads * args.chunk_ms / r.total_quota if r.total_quota else None
            print(json.dumps({"label": args.label, "run": k + 1, "profile": name, "threads": profile.threads,
                              "ms_per_iteration": ms, "floor_ms": floor,
                              "ratio": floor / ms if ms and floor else None, "cpu_seconds": r.cpu_seconds,
                              "throttled_seconds": r.throttled_seconds, "chunk_ms": args.chunk_ms}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
