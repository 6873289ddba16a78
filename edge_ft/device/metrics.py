"""What a device run measures: step latency percentiles, resident memory, artifact sizes."""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

import numpy as np
import psutil

from edge_ft.contracts import MB as MB  # edge_ft.contracts.MB, still imported from here by device.trainer


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def available_bytes() -> int:
    """Memory the machine can still hand out without swapping (what a run without a profile budgets against)."""
    return int(psutil.virtual_memory().available)


def ru_maxrss_bytes() -> int:
    """The kernel's high-water mark of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakRSS:
    """Sample RSS on a background thread (`with PeakRSS(0.005) as peak: ...; peak.bytes`).

    Sampling sees what the run itself allocates; ru_maxrss also counts the import peak, so report both.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.bytes = max(self.bytes, process.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, rss_bytes())


def latency_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p95/mean of per-step wall times, in milliseconds."""
    if not seconds:
        return {"p50": 0.0, "p95": 0.0, "mean": 0.0, "n": 0}
    ms = np.asarray(seconds) * 1000.0
    return {"p50": round(float(np.percentile(ms, 50)), 4), "p95": round(float(np.percentile(ms, 95)), 4),
            "mean": round(float(ms.mean()), 4), "n": int(ms.size)}


def file_sizes(folder: str | Path) -> dict[str, int]:
    """Bytes of every file under `folder`, keyed by relative path."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
