"""CPU calibration: a fixed single-threaded workload whose timing, against the reference core, gives `cpu_speed`.

Three parts, each a stand-in for something on-device training spends time on:
  matmul      float32 GEMM through numpy's BLAS (the dense layers' arithmetic)
  lenet_step  LeNet-5 forward + backward + SGD step on a batch of 32 in plain numpy (im2col convolutions,
              pooling, ReLU, cross-entropy): the shape of a training step without any runtime
  python      interpreter-bound loop (the trainer's own bookkeeping between kernel calls)
The speed is the geometric mean of reference_seconds / seconds over the parts, so 0.5 means "half as fast as the
reference core". Each part is timed `repeats` times and the fastest run counts, which rejects noise from other
processes. Run it in a child with one BLAS thread: `python -m edge_ft.emulation.calibrate` prints JSON.

`--rate SECONDS` runs the same three parts in small interleaved units (about 16 ms on the reference core) for that
many wall seconds and prints units per second: under a CPU quota, where a part can straddle throttled periods, the
rate over many units is what measures how much work the quota really lets through (edge_ft.emulation.hostspeed).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from numpy.typing import NDArray

# The reference core: every shipped cpu_speed is relative to it. Fastest run of each part over 11 invocations x 7
# repeats (the machine was shared, so the minimum is the uncontended figure), one BLAS thread.
REFERENCE = {
    "date": "2026-11-25",
    "machine": "x86_64 Intel Xeon (KVM guest, 2 vCPUs, AVX-512), numpy 2.4.6 with OpenBLAS 0.3.31, Python 3.11",
    "seconds": {"matmul": 0.0873, "lenet_step": 0.1074, "python": 0.1081},
}
MATMUL_SIZE, MATMUL_REPS = 384, 120  # (384,384) @ (384,384) float32, 120 times
LENET_BATCH, LENET_STEPS = 32, 20
PYTHON_ITERS = 600_000
PARTS = ("matmul", "lenet_step", "python")


def _matmul() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=np.float32)
    b = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=np.float32)
    out = np.empty_like(a)
    for _ in range(MATMUL_REPS):
        np.matmul(a, b, out=out)  # same inputs every time: chained products would drift into denormals


def _python() -> int:
    return _python_loop(PYTHON_ITERS)


def _python_loop(iters: int) -> int:
    table: dict[int, int] = {}
    x = 1
    for i in range(iters):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        key = x & 1023
        table[key] = table.get(key, 0) + (i if x & 1 else -i)
    return len(table)


class NumpyLeNet:
    """LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, fc 120, 84, 10) with hand-written gradients."""

    def __init__(self, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        shapes = {"conv1": (25, 6), "conv2": (150, 16), "fc1": (256, 120), "fc2": (120, 84), "fc3": (84, 10)}
        self.w = {k: (rng.standard_normal(s) / math.sqrt(s[0])).astype(np.float32) for k, s in shapes.items()}
        self.b = {k: np.zeros(s[1], np.float32) for k, s in shapes.items()}

    @staticmethod
    def _cols(x: NDArray[Any], k: int = 5) -> tuple[NDArray[Any], tuple[int, int, int, int]]:
        """(B,C,H,W) -> (B*Ho*Wo, C*k*k) patches for a valid k x k convolution."""
        import numpy as np

        win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # (B,C,Ho,Wo,k,k)
        b, c, ho, wo = win.shape[:4]
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * k * k), (b, c, ho, wo)

    @staticmethod
    def _uncols(dcols: NDArray[Any], dims: tuple[int, int, int, int], k: int = 5) -> NDArray[Any]:
        """Gradient of _cols: scatter-add (B*Ho*Wo, C*k*k) back onto (B,C,Ho+k-1,Wo+k-1)."""
        import numpy as np

        b, c, ho, wo = dims
        d = dcols.reshape(b, ho, wo, c, k, k)
        dx = np.zeros((b, c, ho + k - 1, wo + k - 1), np.float32)
        for i in range(k):
            for j in range(k):
                dx[:, :, i:i + ho, j:j + wo] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return dx

    @staticmethod
    def _pool(x: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
        """2x2 max pool of (B,C,H,W) and the mask of the winners (ties share the gradient)."""
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
        mask = x == y.repeat(2, axis=2).repeat(2, axis=3)
        return y, mask

    def step(self, x: NDArray[Any], y: NDArray[Any], lr: float = 0.05) -> float:
        """One SGD step on x float32 (B,1,28,28), y int (B,); returns the mean cross-entropy before the step."""
        import numpy as np

        w, bias, grads = self.w, self.b, {}
        n = len(x)
        c1, d1 = self._cols(x)  # (B*576, 25)
        a1 = np.maximum(c1 @ w["conv1"] + bias["conv1"], 0)  # (B*576, 6)
        h1 = a1.reshape(n, 24, 24, 6).transpose(0, 3, 1, 2)  # (B,6,24,24)
        p1, m1 = self._pool(h1)  # (B,6,12,12)
        c2, d2 = self._cols(p1)  # (B*64, 150)
        a2 = np.maximum(c2 @ w["conv2"] + bias["conv2"], 0)  # (B*64, 16)
        h2 = a2.reshape(n, 8, 8, 16).transpose(0, 3, 1, 2)  # (B,16,8,8)
        p2, m2 = self._pool(h2)  # (B,16,4,4)
        f0 = p2.reshape(n, 256)
        f1 = np.maximum(f0 @ w["fc1"] + bias["fc1"], 0)
        f2 = np.maximum(f1 @ w["fc2"] + bias["fc2"], 0)
        logits = f2 @ w["fc3"] + bias["fc3"]  # (B,10)
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = float(-logp[np.arange(n), y].mean())

        g = np.exp(logp)
        g[np.arange(n), y] -= 1
        g /= n  # d loss / d logits
        for layer, inp, out in (("fc3", f2, None), ("fc2", f1, f2), ("fc1", f0, f1)):
            if out is not None:
                g = g * (out > 0)
            grads[layer] = (inp.T @ g, g.sum(axis=0))
            g = g @ w[layer].T
        g = (g.reshape(n, 16, 4, 4).repeat(2, axis=2).repeat(2, axis=3) * m2).transpose(0, 2, 3, 1)
        g = g.reshape(n * 64, 16) * (a2 > 0)
        grads["conv2"] = (c2.T @ g, g.sum(axis=0))
        g = self._uncols(g @ w["conv2"].T, d2)  # (B,6,12,12)
        g = (g.repeat(2, axis=2).repeat(2, axis=3) * m1).transpose(0, 2, 3, 1).reshape(n * 576, 6) * (a1 > 0)
        grads["conv1"] = (c1.T @ g, g.sum(axis=0))
        for layer, (gw, gb) in grads.items():
            w[layer] -= np.float32(lr) * gw.astype(np.float32)
            bias[layer] -= np.float32(lr) * gb.astype(np.float32)
        return loss


def synthetic_batch(n: int = LENET_BATCH, seed: int = 0) -> tuple[NDArray[Any], NDArray[Any]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n)


def _lenet_step() -> None:
    net = NumpyLeNet()
    x, y = synthetic_batch()
    for _ in range(LENET_STEPS):
        net.step(x, y)


WORKLOADS = {"matmul": _matmul, "lenet_step": _lenet_step, "python": _python}


# One rate unit: about 5 ms of each part on the reference core.
RATE_UNIT = {"lenet_steps": 1, "matmuls": 7, "python_iters": 30_000}


def work_rate(seconds: float, stamps: bool = False) -> dict[str, Any]:
    """Rate units completed per wall second over `seconds` (after one warm-up unit); with `stamps`, also every
    unit's end time (time.perf_counter, the system-wide monotonic clock a parent process can compare with)."""
    import numpy as np

    net, (x, y) = NumpyLeNet(), synthetic_batch()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=np.float32)
    out = np.empty_like(a)

    def unit() -> None:
        net.step(x, y, lr=0.0)  # lr 0: the same arithmetic every unit, no drift
        for _ in range(RATE_UNIT["matmuls"]):
            np.matmul(a, a, out=out)
        _python_loop(RATE_UNIT["python_iters"])

    unit()
    units, t0, c0, ends = 0, time.perf_counter(), time.process_time(), []
    print(json.dumps({"started": t0}), flush=True)  # the parent starts its clock on this line
    while (elapsed := time.perf_counter() - t0) < seconds:
        unit()
        units += 1
        if stamps:
            ends.append(time.perf_counter())
            # live, so a parent can tell how many units a phase held; CPU time too, to rate uncapped phases by it
            print(ends[-1], time.process_time(), flush=True)
    result = {"units": units, "wall_seconds": elapsed, "cpu_seconds": time.process_time() - c0,
              "rate": units / elapsed}
    return {**result, "ends": ends} if stamps else result


def measure(repeats: int = 3, clock: str = "wall") -> tuple[dict[str, float], dict[str, float]]:
    """(wall, CPU) seconds of each part's fastest run by `clock` over `repeats` runs, after one warm-up run."""
    best, cpu = {}, {}
    pick = 0 if clock == "wall" else 1
    for part, fn in WORKLOADS.items():
        fn()  # warm-up: imports, BLAS buffers, page faults
        times = []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        best[part], cpu[part] = min(times, key=lambda t: t[pick])
    return best, cpu


def relative_speed(seconds: dict[str, float], reference: dict[str, Any] = REFERENCE) -> dict[str, Any]:
    """Per-part and overall (geometric mean) speed against the reference figures."""
    per_part = {p: reference["seconds"][p] / seconds[p] for p in PARTS}
    overall = math.exp(sum(math.log(v) for v in per_part.values()) / len(per_part))
    return {"speed": overall, "per_part": per_part}


def report(repeats: int = 3, clock: str = "wall") -> dict[str, Any]:
    """The speed by `clock`: wall time for a confined run (what the board would take), CPU time for a free one
    (what this core does while the job runs, so a neighbour that takes the core away does not count as slowness:
    here, beside a load of 12 on 2 vCPUs, 0.15 by wall time and 0.36-0.40 by CPU time against 0.53 when quiet)."""
    import numpy as np

    seconds, cpu_seconds = measure(repeats, clock)
    # Both clocks recorded: under a quota their ratio is the share of a CPU the run really got.
    speed = relative_speed(seconds if clock == "wall" else cpu_seconds)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "clock": clock, **speed, "repeats": repeats,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(), "numpy": np.__version__,
            "reference": {"date": REFERENCE["date"], "machine": REFERENCE["machine"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time the calibration workload; prints JSON.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate", type=float, metavar="SECONDS", help="print the work rate over SECONDS instead")
    ap.add_argument("--stamps", action="store_true", help="with --rate: every unit's end time too")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="time parts by wall or CPU time")
    args = ap.parse_args(argv)
    result = work_rate(args.rate, args.stamps) if args.rate else report(max(1, args.repeats), args.clock)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
