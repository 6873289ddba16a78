"""On-device training engines, chosen by a bundle manifest's "engine" field.

  ort-training  ONNX Runtime's on-device training API (onnxruntime-training; x86_64 wheels only)
  ort-step      one plain ai.onnx graph per training step, run by a standard InferenceSession (any platform)

Every engine implements the same small interface (`Engine`) so the trainer, bench and adapters never care which
one runs. Engines are imported lazily: importing this package loads no runtime.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

ENGINES = {
    "ort-training": "edge_ft.device.engines.ort_training:OrtTrainingEngine",
    "ort-step": "edge_ft.device.engines.ort_step:OrtStepEngine",
}


class Engine(Protocol):
    """What the trainer needs from an engine. Shapes: x float32 (B,1,28,28), y int64 (B,), logits (B,C)."""

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        """One optimizer step; returns (mean cross-entropy loss before the update, logits)."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward pass in eval mode with the current weights."""

    def trainable_state(self) -> dict[str, np.ndarray]:
        """Current values of the trainable tensors (what an adapter ships), keyed by parameter name."""

    def save_state(self, path: str) -> None:
        """Everything needed to resume (trainable tensors + optimizer state), written atomically."""

    def load_state(self, path: str) -> None:
        """Restore what save_state wrote."""

    def export_inference(self, path: str) -> None:
        """Write a forward-only ONNX model with the current weights that plain onnxruntime runs."""


def engine_class(name: str):
    from edge_ft.errors import UserError

    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}: this edge-ft knows {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise UserError(f"engine {name!r} cannot load here ({e})") from None
