"""SecAgg+ against plain FedAvg on the in-process grid (tests/fleet_grid.py, the fleet's own ServerApp and ClientApp):
bytes and seconds per round, the largest difference of the global models, final accuracies; one JSON line per method.

    .venv/bin/python tools/fleet-secagg-cost.py DEVICES ROUNDS OUT_DIR BASE.safetensors    (docs/fleet-simulation.md)
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from fleet_grid import LocalGrid  # noqa: E402

from edge_ft.checkpoint import load_safetensors  # noqa: E402
from edge_ft.fleet import client_app, records, server_app  # noqa: E402
from edge_ft.fleet.plan import PlanConfig, plan_fleet  # noqa: E402

n, rounds, where, base = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
out = {}
for method in ("lora", "probe", "full"):
    for secure in (False, True):
        d = where / f"{method}-{'secagg' if secure else 'plain'}"
        plan = plan_fleet(d, PlanConfig(method, num_nodes=n, rounds=rounds, local_steps=5, batch=16, threads=1,
                                        base=base, secagg=secure))
        grid = LocalGrid(client_app.app, plan.node_configs, plan.run_config)
        rs = server_app.run(grid, server_app.FleetSettings.from_run_config(plan.run_config))
        out[(method, secure)] = (rs, load_safetensors(records.state_file(plan.results_dir, rounds)))
for method in ("lora", "probe", "full"):
    (p, pg), (s, sg) = out[(method, False)], out[(method, True)]
    diff = max(float(np.abs(pg[k] - sg[k]).max()) for k in pg)
    row = {"method": method, "devices": n, "rounds": rounds,
           "plain_s_per_round": round(np.mean([r["seconds"] for r in p[1:]]), 3),
           "secagg_s_per_round": round(np.mean([r["seconds"] for r in s[1:]]), 3),
           "secagg_protocol_s_per_round": round(np.mean([r["secagg"]["seconds"] for r in s[1:]]), 3),
           "plain_bytes_per_round": int(np.mean([r["bytes_down"] + r["bytes_up"] for r in p[1:]])),
           "secagg_bytes_per_round": int(np.mean([r["bytes_down"] + r["bytes_up"] for r in s[1:]])),
           "secagg_messages_per_round": int(np.mean([r["secagg"]["messages"] for r in s[1:]])),
           "final_acc_plain": round(p[-1]["accuracy"], 4), "final_acc_secagg": round(s[-1]["accuracy"], 4),
           "max_abs_diff_global": diff}
    print(json.dumps(row), flush=True)
