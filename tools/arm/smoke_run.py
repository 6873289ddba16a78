"""Run the smoke model with a plain onnxruntime InferenceSession and report what ran where, as JSON.

Device side (numpy + onnxruntime + torch-free edge_ft): `python smoke_run.py DIR OUT.json`, the same on x86 and
under qemu.
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime as ort

import edge_ft
from edge_ft.atomic import atomic_write_json


def main(folder: str, out: str) -> None:
    folder_path = Path(folder)
    session = ort.InferenceSession(str(folder_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(folder_path / "input.npy", allow_pickle=False)
    (probs,) = session.run(None, {"x": x})  # (B,10)
    report = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "providers": session.get_providers(),
        # The installed distribution's version and where the package was imported from: the wheel, not a source tree.
        "edge_ft": version("edge-ft"),
        "edge_ft_dir": str(Path(edge_ft.__file__).parent),
        "values": probs.ravel().astype(float).tolist(),
    }
    atomic_write_json(out, report)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
