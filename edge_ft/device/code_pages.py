"""Give back the pages of onnxruntime's machine code that building a session touched and training never runs.

Building the first session of a process runs onnxruntime's one-off code: kernel registration for every operator
of every opset, graph transformers, session setup. Linux maps each executed page of the library's code (and its
neighbours, the kernel's fault-around) into the process, and it stays counted in RSS: on LeNet-5, building the
step and forward sessions adds 10-12 MB of such file-backed pages, more than the sessions' own heap. Those pages
are clean copies of the library file, so `madvise(MADV_DONTNEED)` on its code mappings drops them from the process
at no risk: whatever runs next (a training step's kernels, about 2.5 MB of them for LeNet-5) is faulted back in
from the page cache. Only read-only executable mappings with no private (anonymous) page are released: a page
written since the file was mapped would be lost. Elsewhere than Linux nothing happens.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys

SMAPS = "/proc/self/smaps"
MADV_DONTNEED = 4  # Linux <sys/mman.h>; the same value on every Linux architecture
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


def onnxruntime_folder() -> str | None:
    """The imported onnxruntime package's folder (its binding and libraries live in it), or None before its import."""
    module = sys.modules.get("onnxruntime")
    file = getattr(module, "__file__", None)
    return os.path.join(os.path.dirname(os.path.realpath(file)), "") if file else None


def code_mappings(folder: str | None = None, smaps: str = SMAPS) -> list[tuple[int, int, int, int]]:
    """(start, end, resident KiB, anonymous KiB) of each executable read-only mapping of a file under `folder`
    (default: onnxruntime's package folder; none before onnxruntime is imported)."""
    folder = folder or onnxruntime_folder()
    if folder is None:
        return []
    found: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    with open(smaps) as f:
        for line in f:
            header = _HEADER.match(line)
            if header:
                start, end, perms, path = header.groups()
                current = None
                if perms == "r-xp" and path.startswith(folder):
                    current = {"start": int(start, 16), "end": int(end, 16), "Rss": 0, "Anonymous": 0}
                    found.append(current)
            elif current is not None and line.split(":")[0] in ("Rss", "Anonymous"):
                current[line.split(":")[0]] = int(line.split()[1])
    return [(m["start"], m["end"], m["Rss"], m["Anonymous"]) for m in found]


def release_code_pages(folder: str | None = None) -> int:
    """Drop the resident code pages of the libraries under `folder` (default: onnxruntime's) from this process
    (Linux); the KiB released, 0 where there is no /proc or no madvise."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        mappings = code_mappings(folder)
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end, resident, anonymous in mappings:
        if anonymous == 0 and madvise(start, end - start, MADV_DONTNEED) == 0:
            released += resident
    return released
