"""ExecuTorch as a training peer of `edge-ft speed`: one method's training step in ExecuTorch's runtime, timed.

Runs in its own venv (`make peers-venv` -> .venv-peers: torch and executorch, no onnx), started by
edge_ft.bench.peers, in two processes so the training process's memory is the runtime's alone. It imports only
torch and executorch (the edge_ft.host package needs the host extra, which that venv lacks):

  python -m edge_ft.bench.executorch_peer lower PROGRAM.pt2 TRAINABLE OUT.pte
      the joint forward-backward graph (torch.export.experimental._export_forward_backward) of PROGRAM.pt2, lowered
      with to_edge + to_executorch. PROGRAM.pt2: torch.export of the training module (x, y) -> mean cross-entropy,
      saved by the host, its average pools already written as reshape + mean (ExecuTorch's prebuilt runtime has
      no avg_pool2d_backward kernel); TRAINABLE: comma-separated names of the tensors that train.
  python -m edge_ft.bench.executorch_peer train BATCH.npz OUT.pte LR
      loads OUT.pte with the training API (SGD at LR, its only optimizer) and prints one JSON line: its versions
      and RSS after imports. Then each line "N" on stdin runs N steps (forward_backward + the SGD step) on the
      batch (BATCH.npz: x, y, the shapes the program was exported with), and prints {"cpu": [s, ...], "wall":
      [s, ...], "loss": [...]} (each step's loss, before its update); end of input prints the peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path


def _rss_bytes() -> int:
    """Resident set size now (Linux /proc; psutil is not in this venv)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def lower(program: Path, trainable: set[str], out: Path) -> None:
    """The joint forward-backward graph of the exported training module, lowered to an ExecuTorch program."""
    import torch
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward

    exported = torch.export.load(program)
    for name, tensor in exported.state_dict.items():
        if isinstance(tensor, torch.nn.Parameter):
            tensor.requires_grad_(name in trainable)
    out.write_bytes(to_edge(_export_forward_backward(exported)).to_executorch().buffer)


def train(batch: Path, pte: Path, lr: float) -> None:
    """Serve step requests on stdin (see the module's docstring) until it closes."""
    import numpy as np
    import torch
    from executorch.extension.training import _load_for_executorch_for_training, get_sgd_optimizer

    after_imports = _rss_bytes()
    torch.set_num_threads(1)
    with np.load(batch, allow_pickle=False) as held:
        x, y = torch.from_numpy(held["x"]), torch.from_numpy(held["y"])
    module = _load_for_executorch_for_training(str(pte))
    module.forward_backward("forward", (x, y))  # its parameters are known only after a first call
    optimizer = get_sgd_optimizer(module.named_parameters(), lr, 0, 0, 0, False)
    print(json.dumps({"rss_after_imports": after_imports, "torch": version("torch"),
                      "executorch": version("executorch"), "trains": sorted(module.named_gradients())}), flush=True)
    for line in sys.stdin:
        cpu, wall, losses = [], [], []
        for _ in range(int(line)):
            c0, w0 = time.process_time(), time.perf_counter()
            loss = module.forward_backward("forward", (x, y))[0]
            optimizer.step(module.named_gradients())
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            losses.append(float(loss))
        print(json.dumps({"cpu": cpu, "wall": wall, "loss": losses}), flush=True)
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


def main(argv: list[str]) -> int:
    if argv[0] == "lower":
        lower(Path(argv[1]), set(filter(None, argv[2].split(","))), Path(argv[3]))
    else:
        train(Path(argv[1]), Path(argv[2]), float(argv[3]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
