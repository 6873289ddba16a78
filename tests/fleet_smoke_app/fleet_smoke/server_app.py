"""ServerApp: Flower's FedAvg over a 4-element vector for num-server-rounds rounds."""

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = int(cfg["min-nodes"])
    # All nodes must be connected before round 1; a round then goes on with whoever answers (a node killed
    # mid-round is reported as failed once the SuperLink misses its heartbeats).
    strategy = FedAvg(min_available_nodes=nodes, min_train_nodes=1, min_evaluate_nodes=1)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(4)]),
                            num_rounds=int(cfg["num-server-rounds"]), timeout=float(cfg["round-timeout"]))
    print(f"final arrays: {result.arrays.to_numpy_ndarrays()[0].tolist()}", flush=True)
