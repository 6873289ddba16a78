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


CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark of this process's RSS (VmHWM) at its current RSS: Linux 4.0+ takes "5"
    in /proc/self/clear_refs. False where that is not possible (another OS, a restricted /proc)."""
    try:
        CLEAR_REFS.write_text("5")
        return kernel_peak_rss() is not None
    except OSError:
        return False


def kernel_peak_rss() -> int | None:
    """VmHWM of /proc/self/status in bytes: the highest RSS since exec or the last reset_peak_rss()."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakRSS:
    """The highest RSS of this process inside the block (`with PeakRSS() as peak: ...; peak.bytes`).

    On Linux the kernel keeps it: the block starts by resetting the process's high-water mark (reset_peak_rss) and
    ends by reading it, so no allocation is missed and nothing runs meanwhile. Elsewhere a background thread samples
    RSS every `interval_s`. That sampler is not free: at 5 ms it cost 0.019 CPU-seconds per second on a 2-vCPU EPYC,
    a quarter to a third of an emulated Pi Zero 2 W's quota, charged to the job it measured (docs/steady-emulation.md).
    What is measured is what the run itself allocates; ru_maxrss also counts the import peak, so report both (after
    the reset, ru_maxrss keeps an import peak only while it is below the run's own).
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.bytes = 0
        self.kernel = False  # True: the kernel's high-water mark was reset and is read at the end
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.bytes = max(self.bytes, process.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> PeakRSS:
        self.kernel = reset_peak_rss()
        if not self.kernel:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kernel:
            self.bytes = max(self.bytes, kernel_peak_rss() or 0)
        else:
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
