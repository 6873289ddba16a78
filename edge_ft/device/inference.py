"""Forward-only models on the device: write weights into the bundle's inference graph, run it, score it.

inference_base.onnx is the plain network's forward graph (LeNet-5's by default) whose weights sit at byte offsets
recorded in the manifest, so a trained or merged model is a byte copy with new weights: no onnx package, no graph
surgery, one portable file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_ft.atomic import atomic_write_bytes
from edge_ft.data.npz import to_float
from edge_ft.device.bundle import Bundle
from edge_ft.errors import UserError

EVAL_BATCH = 32  # examples per scoring call: peak RSS of a LoRA run 91 MB at 32, 106 MB at 128, ~150 MB at 512


def _inference_entry(bundle: Bundle) -> dict[str, Any]:
    entry = bundle.manifest.get("inference")
    if not entry:
        raise UserError(f"{bundle.path}: this bundle has no inference graph (a head-only bundle?); use its parent")
    return dict(entry)


def base_weights(bundle: Bundle) -> dict[str, np.ndarray]:
    """The starting weights of the plain network's tensors (base W0 for LoRA, the new head for probe)."""
    entry = _inference_entry(bundle)
    data = bundle.file(entry["file"]).read_bytes()
    return {name: np.frombuffer(data, np.float32, count=n // 4, offset=at).copy()
            .reshape(_shape(bundle, name)) for name, (at, n) in entry["offsets"].items()}


def _shape(bundle: Bundle, name: str) -> tuple[int, ...]:
    return bundle.trainable.get(name) or bundle.frozen[name]


def write_inference_model(bundle: Bundle, weights: dict[str, np.ndarray], path: str | Path) -> None:
    """Copy inference_base.onnx to `path` with `weights` (the plain network's names) in place of the starting ones."""
    entry = _inference_entry(bundle)
    data = bytearray(bundle.file(entry["file"]).read_bytes())
    offsets = entry["offsets"]
    for name, value in weights.items():
        if name not in offsets:
            raise UserError(f"{name} is not a tensor of the bundle's inference graph")
        at, n = offsets[name]
        raw = np.ascontiguousarray(value, dtype=np.float32)
        if raw.nbytes != n or raw.shape != _shape(bundle, name):
            raise UserError(f"{name}: shape {raw.shape} does not fit the inference graph's {_shape(bundle, name)}")
        data[at : at + n] = raw.tobytes()
    atomic_write_bytes(path, bytes(data))


def predict(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = EVAL_BATCH,
            images: bool = True) -> np.ndarray:
    """Logits for all of x in batches; `run(batch) -> logits`. images: x as edge_ft.data.npz validates it (pixels
    are scaled by to_float), else float features."""
    out = [run(to_float(x[i : i + batch]) if images else x[i : i + batch]) for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean()) if len(y) else 0.0


def session_runner(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    """`run(x) -> first output` for an onnxruntime InferenceSession with one input."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]
