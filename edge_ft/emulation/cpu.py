"""How a child's CPU use is set: the thread-pool variables every library reads, and the CFS quota period.

Shared by the confined runs (edge_ft.emulation.emulate) and the host-speed measurement (edge_ft.emulation.hostspeed),
which emulate itself uses: kept apart so neither imports the other inside a function.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

# Thread-count variables of OpenMP (torch), OpenBLAS and MKL (numpy), macOS Accelerate, numexpr, and edge-ft's own.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS", "EDGE_FT_THREADS")


def thread_env(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with every thread pool set to `threads`."""
    env = dict(os.environ if base is None else base)
    env.update({var: str(threads) for var in THREAD_VARS})
    return env


def quota_period_us(share: float) -> int:
    """A short CFS period keeps throttling smooth; the kernel wants quota >= 1 ms, so slow cores get longer ones."""
    return min(1_000_000, max(20_000, math.ceil(1000 / share)))
