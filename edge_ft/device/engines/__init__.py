"""On-device training engines, chosen by a bundle manifest's "engine" field.

  ort-training  ONNX Runtime's on-device training API (onnxruntime-training; x86_64 wheels only)
  ort-step      one plain ai.onnx graph per training step, run by a standard InferenceSession (any platform)

Every engine implements the same small interface (`Engine`) so the trainer, bench and adapters never care which
one runs. Engines are imported lazily: importing this package loads no runtime.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edge_ft.contracts import ORT_STEP, ORT_TRAINING

if TYPE_CHECKING:
    from edge_ft.device.bundle import Bundle

ENGINES = {
    ORT_TRAINING: "edge_ft.device.engines.ort_training:OrtTrainingEngine",
    ORT_STEP: "edge_ft.device.engines.ort_step:OrtStepEngine",
}


class Engine(Protocol):
    """What the trainer needs from an engine. Shapes: x float32 (B, *input_shape), y int64 (B,), logits (B,C).

    Constructed as `EngineClass(bundle, threads=0)`: `bundle` is a validated edge_ft.device.bundle.Bundle,
    `threads` the intra-op thread count (0 = onnxruntime's default); session options come from
    edge_ft.device.ort_api.session_options so every engine runs with the same settings.
    """

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray | None]:
        """One optimizer step at learning rate `lr`; returns (mean cross-entropy loss before the update, logits).

        logits may be None when the engine's graph cannot return them without extra work.
        """

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward pass in eval mode with the current weights."""

    def trainable_state(self) -> dict[str, np.ndarray]:
        """Current values of the trainable tensors (what an adapter ships), keyed by parameter name."""

    def load_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite the trainable tensors named in `tensors` (an applied adapter); the caller checked shapes."""

    def save_state(self, path: str) -> None:
        """Everything needed to resume (trainable tensors + optimizer state), written atomically."""

    def load_state(self, path: str) -> None:
        """Restore what save_state wrote."""

    def export_inference(self, path: str) -> None:
        """Write a forward-only ONNX model with the current weights that plain onnxruntime runs."""


def engine_class(name: str) -> Callable[..., Engine]:
    from edge_ft.errors import UserError

    if name not in ENGINES:
        raise UserError(f"unknown engine {name!r}: this edge-ft knows {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    try:
        found: Callable[..., Engine] = getattr(importlib.import_module(module), cls)
        return found
    except ImportError as e:
        raise UserError(f"engine {name!r} cannot load here ({e})") from None


def open_engine(bundle: Bundle, threads: int = 0) -> Engine:
    """The bundle's engine, started from the bundle's weights plus any adapter `edge-ft adapter apply` put in it."""
    engine = engine_class(bundle.engine)(bundle, threads=threads)
    applied = bundle.applied_adapter()
    if applied:
        engine.load_trainable(applied)
    return engine
