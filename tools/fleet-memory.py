"""The memory study of a device's Flower client stack: one SuperNode confined to a profile (default rpi-zero-2w),
the smoke app (numpy + onnxruntime + flwr in every ClientApp), for each supported configuration of Flower 1.42.

    .venv/bin/python tools/fleet-memory.py [--profile rpi-zero-2w] [--rounds 2] [--repeats 1] [--out DIR]

Prints per process role the peak RSS and PSS, their sum and the cgroup's peak, as a Markdown table.
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fleet_support import smoke_plan  # noqa: E402

from edge_ft.fleet.deploy import DeployConfig, run_federation  # noqa: E402

VARIANTS = {  # name -> (isolation, extra environment, run config[, lean])
    "subprocess, lean SuperExec and ClientApp (edge-ft's default)": ("subprocess", {}, {}, True),
    "subprocess (Flower's console scripts)": ("subprocess", {}, {}),
    "process (SuperExec started beside)": ("process", {}, {}),
    "subprocess, MALLOC_ARENA_MAX=2": ("subprocess", {"MALLOC_ARENA_MAX": "2"}, {}),
    "subprocess, PYTHONOPTIMIZE=2 (no docstrings)": ("subprocess", {"PYTHONOPTIMIZE": "2"}, {}),
    "subprocess, ClientApp without onnxruntime": ("subprocess", {}, {"import-onnxruntime": False}),
}


def measure(name, profile, rounds, out: Path) -> dict:
    isolation, env, run_config, *lean = VARIANTS[name]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        plan = smoke_plan(out / "plan", 1, rounds)
        plan.run_config.update(run_config)
        r = run_federation(plan, [profile], DeployConfig(run_dir=out / "run", cpu_cap=False, isolation=isolation,
                                                         lean=bool(lean), progress=False))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    n = r.nodes[0]
    return {"status": r.status, "rss": n.peak_rss_by_role, "pss": n.peak_pss_by_role, "sum_pss": n.sampled_peak_pss_bytes,
            "sum_rss": n.sampled_peak_bytes, "cgroup": n.cgroup_peak_bytes, "oom": n.oom_killed,
            "budget": n.budget_bytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="rpi-zero-2w")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated indices into VARIANTS (default all)")
    args = ap.parse_args()
    mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print("| configuration | SuperNode RSS / PSS | SuperExec RSS / PSS | ClientApp RSS / PSS | sum of PSS | "
          "cgroup peak | OOM |")
    print("|---|---|---|---|---|---|---|")
    names = list(VARIANTS)
    for name in [names[int(i)] for i in args.only.split(",")] if args.only else names:
        runs = []
        for k in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="edge-ft-fleet-mem.") as tmp:
                runs.append(measure(name, args.profile, args.rounds, Path(tmp)))
        cells = []
        for role in ("supernode", "superexec", "clientapp"):
            cells.append(f"{mb(med([r['rss'].get(role, 0) for r in runs]))} / "
                         f"{mb(med([r['pss'].get(role, 0) for r in runs]))} MB")
        print(f"| {name} | {' | '.join(cells)} | {mb(med([r['sum_pss'] for r in runs]))} MB | "
              f"{mb(med([r['cgroup'] or 0 for r in runs]))} MB | {any(r['oom'] for r in runs)} |", flush=True)
        if any(r["status"] != "ok" for r in runs):
            print(f"  ({name}: {[r['status'] for r in runs]})", flush=True)


if __name__ == "__main__":
    main()
