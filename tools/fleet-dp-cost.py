"""The accuracy cost of differential privacy (edge_ft.fleet.dp) under Flower's Simulation Engine: the same fleet
(LoRA FedAvg, every device sampled each round) without DP, with clipping only, and with clipping and noise
multipliers NOISE..., each noised setting REPEATS times (the noise is drawn afresh, unseeded); global accuracy per
round. One JSON line per run on stdout.

    .venv/bin/python tools/fleet-dp-cost.py DEVICES ROUNDS OUT_DIR BASE.safetensors CLIP NOISE[,NOISE...] [REPEATS]
        (docs/fleet.md)
"""
import json
import os
import platform
import sys
import time
from pathlib import Path

from edge_ft.fleet.plan import PlanConfig, plan_fleet
from edge_ft.fleet.simulate import SimulationConfig, simulate

n, rounds, where, base = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]).resolve(), Path(sys.argv[4])
clip, noises = float(sys.argv[5]), [float(x) for x in sys.argv[6].split(",")]
repeats = int(sys.argv[7]) if len(sys.argv) > 7 else 1
settings = [(0.0, 0.0, 0)] + [(clip, noise, k) for noise in noises for k in range(repeats if noise else 1)]
for c, noise, k in settings:
    name = "no-dp" if c == 0 else f"clip{c:g}-noise{noise:g}" + (f"-{k}" if k else "")
    plan = plan_fleet(where / name, PlanConfig(
        "lora", task="mnist-digits", num_nodes=n, partitioning="dirichlet:1", rounds=rounds, local_steps=5, batch=16,
        aggregation="fedavg", seed=0, base=base, threads=1, min_train_nodes=n, min_available_nodes=n,
        simulation=True, dp_clip=c, dp_noise=noise))
    machine = simulate(plan, SimulationConfig())
    recs = [json.loads(line) for line in (plan.results_dir / "rounds.jsonl").read_text().splitlines()]
    print(json.dumps({
        "setting": name, "repeat": k, "devices": n, "rounds": rounds, "task": "mnist-digits",
        "partitioning": "dirichlet:1",
        "clip": c, "noise": noise, "noise_std": recs[-1].get("dp", {}).get("std", 0.0),
        "accuracy_by_round": [round(r["accuracy"], 4) for r in recs], "final_accuracy": round(recs[-1]["accuracy"], 4),
        "wall_s": machine["wall_seconds"], "date": time.strftime("%Y-%m-%d", time.gmtime()), "cpus": os.cpu_count(),
        "machine": machine["machine"], "versions": machine["versions"], "python": platform.python_version()}),
        flush=True)
