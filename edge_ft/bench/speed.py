"""Step speed of the three engines on this machine, measured in one run: torch eager, ort-training, ort-step.

    rows = measure_speed(SpeedSettings(methods=("full",), batches=(256,)))
    rows[0]["ms"]["ort-step"] / rows[0]["ms"]["torch"]     # a ratio measured in one process, interleaved

Every engine trains the same method on the same real MNIST batch with the same optimizer, one after another in
rounds (so a neighbour's burst hits all of them alike), and each cell reports the median step. The FLOP limit is
the method's cost-model FLOPs at this machine's single-core sgemm rate (torch.mm, measured in the same run):
what a step would take if every multiply-accumulate ran at GEMM speed.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.contracts import BUNDLE_ENGINES
from edge_ft.costmodel import estimate
from edge_ft.training_defaults import DEFAULTS

SGEMM_SIZE = 512  # square float32 matmul for the FLOP-limit rate: large enough to run at the kernel's peak


@dataclass(frozen=True)
class SpeedSettings:
    methods: tuple[str, ...] = ("full", "probe", "lora")  # fine-tuning methods (LoRA: rank 2 on fc1..fc3)
    batches: tuple[int, ...] = (32, 256)  # examples per step
    steps: int = 40  # timed steps per engine and cell (after 3 warm-up steps)
    rounds: int = 5  # the timed steps are split into this many interleaved rounds
    threads: int = 1  # torch and onnxruntime intra-op threads


def sgemm_gflops(threads: int, repeats: int = 20) -> float:
    """Median GFLOP/s of a SGEMM_SIZE^3 float32 torch.mm on `threads` threads."""
    torch.set_num_threads(threads)
    a, b = torch.rand(SGEMM_SIZE, SGEMM_SIZE), torch.rand(SGEMM_SIZE, SGEMM_SIZE)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * SGEMM_SIZE**3 / statistics.median(times) / 1e9


def _torch_step(cfg: MethodConfig, opt: OptimizerConfig, base: dict[str, np.ndarray]):
    """step(x, y) on the reference model: forward, loss, backward, optimizer step."""
    from edge_ft.host.methods import build_model
    from edge_ft.host.train import make_optimizer

    model = build_model(cfg, {k: torch.from_numpy(v.copy()) for k, v in base.items()}, seed=0).train()
    optimizer = make_optimizer(model.parameters(), opt)

    def step(x: np.ndarray, y: np.ndarray) -> float:
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _ort_engine_step(cfg: MethodConfig, opt: OptimizerConfig, base_path: Path, engine: str, folder: Path, threads: int):
    """step(x, y) of an ORT engine on a bundle exported here; None when this host cannot build that engine."""
    from edge_ft.device.bundle import load_bundle
    from edge_ft.device.engines import open_engine
    from edge_ft.errors import UserError
    from edge_ft.host.export import export_bundle

    try:
        export_bundle(cfg, opt, base_path, folder, engine=engine, seed=0)
        runner = open_engine(load_bundle(folder), threads=threads)
    except UserError:  # ort-training where its wheel does not install (aarch64, Python 3.13)
        return None
    return lambda x, y: runner.train_step(x, y, opt.lr)[0]


def _time_cell(steps: dict, x: np.ndarray, y: np.ndarray, s: SpeedSettings) -> dict[str, float]:
    """Median ms per step of each engine, interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        for _ in range(3):  # warm-up: allocations, arenas, lazy kernel selection
            fn(x, y)
    per_round = max(1, s.steps // s.rounds)
    for _ in range(s.rounds):
        for name, fn in steps.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn(x, y)
                times[name].append(time.perf_counter() - t0)
    return {name: round(1e3 * statistics.median(t), 4) for name, t in times.items()}


def measure_speed(s: SpeedSettings, progress=None) -> dict:
    """{"sgemm_gflops", "threads", "rows": [one per (method, batch): ms per engine, ratios, FLOP limit]}."""
    from edge_ft.checkpoint import save_base
    from edge_ft.data.readers import read_mnist_5k
    from edge_ft.host.model import LeNet5

    torch.set_num_threads(s.threads)
    torch.manual_seed(0)
    base = {k: v.numpy().copy() for k, v in LeNet5().state_dict().items()}  # speed does not depend on the weights
    images, labels = read_mnist_5k()
    gflops = sgemm_gflops(s.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edge-ft-speed-") as tmp:
        base_path = Path(tmp) / "base.safetensors"
        save_base(base_path, base, {"task": "seeded-init"})
        for method in s.methods:
            cfg = MethodConfig(method)
            opt = OptimizerConfig(DEFAULTS[method].optimizer, lr=DEFAULTS[method].lr)
            steps = {"torch": _torch_step(cfg, opt, base)}
            for engine in BUNDLE_ENGINES:
                fn = _ort_engine_step(cfg, opt, base_path, engine, Path(tmp) / f"{method}-{engine}", s.threads)
                if fn is not None:
                    steps[engine] = fn
            for batch in s.batches:
                x = (images[:batch, None].astype(np.float32) / 255.0)  # (B,1,28,28), a real batch
                y = labels[:batch].astype(np.int64)
                ms = _time_cell(steps, x, y, s)
                flops = estimate(cfg, batch, opt, "float32").flops["total"]
                limit_ms = flops / (gflops * 1e9) * 1e3
                rows.append({"method": method, "batch": batch, "ms": ms, "flops": flops,
                             "flop_limit_ms": round(limit_ms, 4), **_ratios(ms, limit_ms)})
                if progress is not None:
                    progress(rows[-1])
    return {"sgemm_gflops": round(gflops, 2), "threads": s.threads, "steps": s.steps, "rounds": s.rounds,
            "rows": rows}


def _ratios(ms: dict[str, float], limit_ms: float) -> dict:
    step = ms.get("ort-step")
    if step is None:
        return {}
    out = {"step_vs_torch": round(step / ms["torch"], 3), "step_vs_limit": round(step / limit_ms, 2)}
    if "ort-training" in ms:
        out["step_vs_training"] = round(step / ms["ort-training"], 3)
    return out


def to_markdown(result: dict) -> str:
    """The table the README shows: ms/step per engine, ort-step's ratios, the FLOP limit."""
    lines = [f"| method | batch | torch eager | ort-training | ort-step | ort-step / ort-training | "
             f"ort-step / torch | FLOP limit ({result['sgemm_gflops']:.0f} GFLOP/s sgemm) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ms = r["ms"]
        cell = lambda e: f"{ms[e]:.2f} ms" if e in ms else "–"  # noqa: E731
        vs_training = f"{r['step_vs_training']:.2f}x" if "step_vs_training" in r else "–"
        lines.append(f"| {r['method']} | {r['batch']} | {cell('torch')} | {cell('ort-training')} | {cell('ort-step')} | "
                     f"{vs_training} | {r.get('step_vs_torch', 0):.2f}x | {r['flop_limit_ms']:.2f} ms "
                     f"(ort-step {r.get('step_vs_limit', 0):.1f}x) |")
    return "\n".join(lines)
