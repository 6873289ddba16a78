"""SecAgg+ against plain FedAvg through the deployment runtime (real SuperLink and SuperNodes, TLS, node auth, device
venv): per method the plain run, then the SecAgg+ run, on one federation started once (the same devices, data and
bundle); bytes and seconds per round, the run's wall time, each board's peak memory, the largest difference of the
global models, final accuracies. One JSON line per method on stdout.

    .venv/bin/python tools/fleet-secagg-deploy-cost.py ROUNDS OUT_DIR BASE.safetensors PROFILE[,PROFILE...] \
        [lora,probe,full]    (docs/fleet.md; CPU quotas lifted: times are this machine's)
"""
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from edge_ft.checkpoint import load_safetensors
from edge_ft.fleet import records
from edge_ft.fleet.deploy import DeployConfig, run_fleet
from edge_ft.fleet.plan import PlanConfig, plan_fleet, signing_keys

rounds, where, base = int(sys.argv[1]), Path(sys.argv[2]).resolve(), Path(sys.argv[3])
profiles = sys.argv[4].split(",")
methods = sys.argv[5].split(",") if len(sys.argv) > 5 else ["lora", "probe"]
key = signing_keys(where, None)[0]


def mean(values):
    return round(float(np.mean(values)), 3)


for method in methods:
    plans = [plan_fleet(where / method / ("secagg" if secure else "plain"), PlanConfig(
        method, task="mnist-digits", num_nodes=len(profiles), partitioning="writers", rounds=rounds, local_steps=5,
        batch=16, aggregation="fedavg", seed=0, base=base, threads=1, min_train_nodes=len(profiles),
        min_available_nodes=len(profiles), secagg=secure, signing_key=key)) for secure in (False, True)]
    t0 = time.monotonic()
    results = run_fleet(plans, profiles, DeployConfig(run_dir=where / method / "deploy", cpu_cap=False,
                                                      progress=False))
    if [r.status for r in results] != ["ok", "ok"]:
        sys.exit(f"{method}: {[r.message for r in results]}")
    recs = [[json.loads(line) for line in (p.results_dir / "rounds.jsonl").read_text().splitlines()][1:]
            for p in plans]
    states = [load_safetensors(records.state_file(p.results_dir, rounds)) for p in plans]
    (p, s), (pr, sr) = recs, results
    print(json.dumps({
        "method": method, "devices": len(profiles), "profiles": profiles, "rounds": rounds,
        "plain_s_per_round": mean([r["seconds"] for r in p]), "secagg_s_per_round": mean([r["seconds"] for r in s]),
        "secagg_protocol_s_per_round": mean([r["secagg"]["seconds"] for r in s]),
        "plain_wall_s": pr.wall_seconds, "secagg_wall_s": sr.wall_seconds,
        "plain_bytes_per_round": int(np.mean([r["bytes_down"] + r["bytes_up"] for r in p])),
        "secagg_bytes_per_round": int(np.mean([r["bytes_down"] + r["bytes_up"] for r in s])),
        "secagg_messages_per_round": int(np.mean([r["secagg"]["messages"] for r in s])),
        "plain_peak_pss_mb": [round(n.sampled_peak_pss_bytes / 2**20, 1) for n in pr.nodes],
        "secagg_peak_pss_mb": [round(n.sampled_peak_pss_bytes / 2**20, 1) for n in sr.nodes],
        "secagg_fits": [n.fits for n in sr.nodes],
        "final_acc_plain": round(p[-1]["accuracy"], 4), "final_acc_secagg": round(s[-1]["accuracy"], 4),
        "max_abs_diff_global": max(float(np.abs(states[0][k] - states[1][k]).max()) for k in states[0]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "cpus": os.cpu_count(),
        "load_1min": round(os.getloadavg()[0], 1), "python": platform.python_version(),
        "total_s": round(time.monotonic() - t0, 1)}), flush=True)
