"""The peak RSS of a block (edge_ft.device.metrics.PeakRSS): on Linux the kernel's high-water mark, reset where the
block starts, so what the block allocates counts, what came before it does not, and no sampling thread runs (one
would be charged to the emulated board's CPU quota); elsewhere a sampling thread."""

import threading
import time

import numpy as np
import pytest

from edge_ft.device import metrics
from edge_ft.device.metrics import PeakRSS, reset_peak_rss, rss_bytes

MB = 2**20


@pytest.mark.skipif(not reset_peak_rss(), reason="no resettable high-water mark here (Linux 4.0+ /proc)")
def test_the_block_s_peak_counts_what_it_allocated_and_not_what_came_before():
    earlier = np.ones(96 * MB // 8)  # every page written
    del earlier
    base, threads = rss_bytes(), threading.active_count()
    with PeakRSS() as peak:
        assert threading.active_count() == threads  # nothing samples meanwhile
        transient = np.ones(48 * MB // 8)
        del transient
    assert peak.kernel
    assert base + 40 * MB < peak.bytes < base + 90 * MB, (base / MB, peak.bytes / MB)


def test_without_a_resettable_mark_a_thread_samples(monkeypatch):
    monkeypatch.setattr(metrics, "reset_peak_rss", lambda: False)
    base = rss_bytes()
    with PeakRSS(0.001) as peak:
        held = np.ones(48 * MB // 8)
        deadline = time.monotonic() + 60  # a busy machine may hold the sampler back; it only has to run once
        while peak.bytes < base + 40 * MB and time.monotonic() < deadline:
            time.sleep(0.01)
        del held
    assert not peak.kernel and peak.bytes >= base + 40 * MB
