"""Which Python runs the device half here: the interpreter with standard onnxruntime that a board would have.

    find_device_python(explicit)   # the given path, else $EDGE_FT_DEVICE_PYTHON, else the checkout's .venv-device,
                                   # else this interpreter

Used by the benchmark (ort-step runs) and the fleet (SuperNodes), each in a child process of that interpreter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import edge_ft
from edge_ft.errors import UserError

DEVICE_PYTHON_ENV = "EDGE_FT_DEVICE_PYTHON"


def find_device_python(explicit: str | None = None) -> str:
    """`explicit`, else $EDGE_FT_DEVICE_PYTHON, else the checkout's .venv-device, else this interpreter."""
    for candidate in (explicit, os.environ.get(DEVICE_PYTHON_ENV)):
        if candidate:
            if not Path(candidate).is_file():
                raise UserError(f"device python {candidate}: no such file (build it with `make device-venv`)")
            return candidate
    for root in (Path(edge_ft.__file__).resolve().parents[1], Path.cwd()):
        python = root / ".venv-device" / "bin" / "python"
        if python.is_file():
            return str(python)
    return sys.executable
