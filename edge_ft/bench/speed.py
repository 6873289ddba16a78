"""Step speed of the engines on this machine, measured in one run: torch eager, ort-training, ort-step, and the
on-device training peers whose venv exists (ExecuTorch: edge_ft.bench.peers).

    rows = measure_speed(SpeedSettings(methods=("full",), batches=(256,)))
    rows[0]["ms"]["ort-step"] / rows[0]["ms"]["torch"]     # a ratio measured in one run, interleaved

Every engine trains the same method on the same real MNIST batch with the same optimizer, one after another in
rounds (so a neighbour's burst hits all of them alike), and each cell reports the median step, wall ("ms") and CPU
("cpu_ms") time. A peer runs in its own process, which measures its steps and its memory. The FLOP limit is
the method's cost-model FLOPs at this machine's single-core sgemm rate (torch.mm, measured in the same run):
what a step would take if every multiply-accumulate ran at GEMM speed.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.contracts import BUNDLE_ENGINES
from edge_ft.costmodel import estimate
from edge_ft.device.ort_api import import_onnxruntime
from edge_ft.training_defaults import DEFAULTS

SGEMM_SIZE = 512  # square float32 matmul for the FLOP-limit rate: large enough to run at the kernel's peak


@dataclass(frozen=True)
class SpeedSettings:
    methods: tuple[str, ...] = ("full", "probe", "lora")  # fine-tuning methods (LoRA: rank 2 on fc1..fc3)
    batches: tuple[int, ...] = (32, 256)  # examples per step
    steps: int = 40  # timed steps per engine and cell (after 3 warm-up steps)
    rounds: int = 5  # the timed steps are split into this many interleaved rounds
    threads: int = 1  # torch and onnxruntime intra-op threads
    optimizer: str | None = None  # every engine's optimizer (None: each method's default; the peers offer sgd only)
    peers: tuple[str, ...] = ()  # on-device training peers to run beside the engines (edge_ft.bench.peers)


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


def _timed(step):
    """run(n) -> (CPU seconds, wall seconds) of each of n calls of step(x, y), for an in-process engine."""
    def run(n: int, x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
        cpu, wall = [], []
        for _ in range(n):
            c0, w0 = time.process_time(), time.perf_counter()
            step(x, y)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        return cpu, wall
    return run


def _time_cell(runs: dict, x: np.ndarray, y: np.ndarray, s: SpeedSettings) -> tuple[dict, dict]:
    """Median wall and CPU ms per step of each engine, interleaved round by round."""
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(3, x, y)  # warm-up: allocations, arenas, lazy kernel selection
    per_round = max(1, s.steps // s.rounds)
    for _ in range(s.rounds):
        for name, run in runs.items():
            c, w = run(per_round, x, y)
            cpu[name] += c
            wall[name] += w
    median = lambda t: {name: round(1e3 * statistics.median(v), 4) for name, v in t.items()}  # noqa: E731
    return median(wall), median(cpu)


def _optimizer(method: str, s: SpeedSettings) -> OptimizerConfig:
    default = OptimizerConfig(DEFAULTS[method].optimizer, lr=DEFAULTS[method].lr)
    return default if s.optimizer is None else replace(default, name=s.optimizer)


def _peer_runs(cfg: MethodConfig, opt: OptimizerConfig, base: dict, x: np.ndarray, y: np.ndarray, s: SpeedSettings,
               folder: Path) -> dict:
    """name -> Peer, each trained with SGD at the method's rate on this batch (the program has its shape)."""
    from edge_ft.bench.peers import open_peer
    from edge_ft.host.methods import build_model

    peers = {}
    for name in s.peers:
        model = build_model(cfg, {k: torch.from_numpy(v.copy()) for k, v in base.items()}, seed=0)
        peers[name] = open_peer(name, model, opt.lr, x, y, folder / f"{name}-{cfg.method}-{len(x)}")
    return peers


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
            cfg, opt = MethodConfig(method), _optimizer(method, s)
            runs = {"torch": _timed(_torch_step(cfg, opt, base))}
            for engine in BUNDLE_ENGINES:
                fn = _ort_engine_step(cfg, opt, base_path, engine, Path(tmp) / f"{method}-{engine}", s.threads)
                if fn is not None:
                    runs[engine] = _timed(fn)
            for batch in s.batches:
                x = (images[:batch, None].astype(np.float32) / 255.0)  # (B,1,28,28), a real batch
                y = labels[:batch].astype(np.int64)
                peers = _peer_runs(cfg, opt, base, x, y, s, Path(tmp))
                peer_runs = {name: (lambda n, _x, _y, p=p: p.run(n)) for name, p in peers.items()}  # its own batch
                try:
                    ms, cpu_ms = _time_cell({**runs, **peer_runs}, x, y, s)
                    memory = {n: p.close() for n, p in peers.items()}
                finally:
                    for p in peers.values():
                        p.stop()
                flops = estimate(cfg, batch, opt, "float32").flops["total"]
                limit_ms = flops / (gflops * 1e9) * 1e3
                rows.append({"method": method, "batch": batch, "optimizer": opt.name, "ms": ms, "cpu_ms": cpu_ms,
                             "flops": flops, "flop_limit_ms": round(limit_ms, 4), **_ratios(ms, limit_ms),
                             "peers": {n: {**memory[n], "optimizer": "sgd", **p.info} for n, p in peers.items()}})
                if progress is not None:
                    progress(rows[-1])
    return {"sgemm_gflops": round(gflops, 2), "threads": s.threads, "steps": s.steps, "rounds": s.rounds,
            "machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": {"torch": torch.__version__, "onnxruntime": import_onnxruntime().__version__}, "rows": rows}


def machine() -> str:
    """The CPU's model name and architecture, as /proc/cpuinfo and the platform say."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.machine() or "unknown"


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


def comparison_markdown(result: dict) -> str:
    """Every engine and peer per (method, batch): CPU and wall ms/step, CPU time as a multiple of ort-step's, and
    a peer's own memory (the engines share this process, torch included: `edge-ft train` reports ort-step's)."""
    peer_versions = sorted({f"executorch {p['executorch']}" for r in result["rows"]
                            for p in r.get("peers", {}).values() if "executorch" in p})
    versions = ", ".join([*(f"{k} {v}" for k, v in result.get("versions", {}).items()), *peer_versions])
    lines = [f"{result.get('machine', 'unknown machine')}, {result.get('date', 'undated')}, {versions}; "
             f"{result['threads']} thread(s), median of {result['steps']} steps in {result['rounds']} interleaved "
             "rounds.", "",
             "| method | batch | engine | optimizer | CPU ms/step | wall ms/step | CPU / ort-step | peak RSS | "
             "RSS after imports |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines += [_comparison_line(r, engine) for engine in r["ms"]]
    return "\n".join(lines)


def _comparison_line(r: dict, engine: str) -> str:
    cpu, peer = r.get("cpu_ms", {}), r.get("peers", {}).get(engine, {})
    mb = lambda key: f"{peer[key] / 2**20:.0f} MB" if key in peer else "–"  # noqa: E731
    ms = lambda t: f"{t[engine]:.2f}" if engine in t else "–"  # noqa: E731
    base = cpu.get("ort-step")
    ratio = f"{cpu[engine] / base:.2f}x" if base and engine in cpu else "–"
    optimizer = peer.get("optimizer", r.get("optimizer", "–"))
    return (f"| {r['method']} | {r['batch']} | {engine} | {optimizer} | {ms(cpu)} | {ms(r['ms'])} | {ratio} | "
            f"{mb('peak_rss')} | {mb('rss_after_imports')} |")
