"""On-device training peers for `edge-ft speed`: other runtimes that train the same model, in their own processes.

    peer = open_peer("executorch", model, trainable, lr, x, y, folder)   # None, reason when it cannot run here
    cpu, wall = peer.run(10)                                             # seconds per step, measured in the peer
    peer.losses                                                          # each step's loss
    memory = peer.close()                                                # RSS after imports and peak, bytes

ExecuTorch (PyTorch's on-device runtime, with a training API) wants torch and ~1.5 GB, so it lives in a venv of its
own (`make peers-venv` -> .venv-peers) and runs as a child process (edge_ft.bench.executorch_peer) that
edge_ft.bench.speed drives round by round, interleaved with the in-process engines. Its memory is its own process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edge_ft.atomic import atomic_open

REPO = Path(__file__).resolve().parents[2]
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
PEERS = ("executorch",)
INSTALL_HINT = "`make peers-venv` in the checkout installs it (its own venv, .venv-peers: torch + executorch, ~1.5 GB)"


def peers_available() -> tuple[str, ...]:
    """The peers this checkout can run: those whose venv exists."""
    return PEERS if PEERS_PYTHON.exists() else ()


class _MeanPool(nn.Module):
    """A k x k average pool of stride k as reshape + mean: the same numbers, and a backward ExecuTorch's prebuilt
    kernels have (they lack avg_pool2d_backward)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, h // self.k, self.k, w // self.k, self.k).mean((3, 5))


class _Loss(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)


def rewrite_pools(model: nn.Module) -> nn.Module:
    """Replace every non-overlapping, unpadded nn.AvgPool2d by _MeanPool (in place)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.AvgPool2d) and isinstance(child.kernel_size, int) and not child.padding \
                and child.stride in (child.kernel_size, None):
            setattr(model, name, _MeanPool(child.kernel_size))
        else:
            rewrite_pools(child)
    return model


@dataclass
class Peer:
    """A running peer process, one method and batch."""

    name: str
    process: subprocess.Popen
    info: dict  # what it printed when ready: versions, rss_after_imports, the tensors it trains
    closed: dict = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # every step's loss so far, before its update

    def run(self, steps: int) -> tuple[list[float], list[float]]:
        """CPU and wall seconds of each of `steps` more steps."""
        assert self.process.stdin is not None  # started with stdin=PIPE
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        answer = json.loads(self._line())
        self.losses += answer["loss"]
        return answer["cpu"], answer["wall"]

    def close(self) -> dict:
        """{"rss_after_imports": bytes, "peak_rss": bytes}; the process has ended."""
        if not self.closed:
            assert self.process.stdin is not None  # started with stdin=PIPE
            self.process.stdin.close()
            self.closed = {"rss_after_imports": self.info["rss_after_imports"], **json.loads(self._line())}
            self.process.wait(timeout=60)
        return self.closed

    def stop(self) -> None:
        """End the process if it still runs (a run cut short by an error)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)

    def _line(self) -> str:
        assert self.process.stdout is not None and self.process.stderr is not None  # started with PIPEs
        line: str = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=60)
            raise RuntimeError(f"{self.name} peer ended (exit {self.process.returncode}): "
                               f"{self.process.stderr.read().strip().splitlines()[-1:]}")
        return line


def open_peer(name: str, model: nn.Module, lr: float, x: np.ndarray, y: np.ndarray, folder: Path) -> Peer:
    """Start `name` training `model` (its requires_grad flags say what trains) with SGD at `lr` on the batch (x, y)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}")
    trainable = [f"model.{n}" for n, p in model.named_parameters() if p.requires_grad]
    module = _Loss(rewrite_pools(model)).eval()  # no dropout or batch statistics: the same step every time
    exported = torch.export.export(module, (torch.from_numpy(x), torch.from_numpy(y)))
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "executorch-train.pt2"
    torch.export.save(exported, program)
    worker = [str(PEERS_PYTHON), "-m", "edge_ft.bench.executorch_peer"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    pte = folder / "executorch-train.pte"
    lowered = subprocess.run([*worker, "lower", str(program), ",".join(trainable), str(pte)], cwd=REPO, env=env,
                             capture_output=True, text=True)
    if lowered.returncode:
        raise RuntimeError(f"{name} could not lower the training step: {lowered.stderr.strip().splitlines()[-1:]}")
    batch = folder / "batch.npz"
    with atomic_open(batch, "wb") as f:
        np.savez(f, x=x, y=y)
    process = subprocess.Popen([*worker, "train", str(batch), str(pte), repr(lr)], cwd=REPO, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peer = Peer(name, process, {})
    peer.info = json.loads(peer._line())
    if sorted(peer.info["trains"]) != sorted(trainable):
        print(f"note: {name} trains {peer.info['trains']}, not {trainable}", file=sys.stderr)
    return peer
