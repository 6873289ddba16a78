"""Accuracy of a global model on a labelled set, as the server (test set) and a canary node (its holdout) score it:
the trainable tensors merged into the plain network's weights and run by an onnxruntime inference session.
Device-side: numpy and onnxruntime only."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edge_ft.device.adapter import merged_weights, shipped_frozen
from edge_ft.device.bundle import Bundle
from edge_ft.device.engines import open_engine
from edge_ft.device.inference import accuracy, predict, session_runner, write_inference_model
from edge_ft.device.ort_api import inference_session


def frozen_shipped(bundle: Bundle) -> dict[str, np.ndarray]:
    """The frozen tensors the global model needs besides the trained ones (lora_A under FFA)."""
    engine = open_engine(bundle, threads=1)
    return {n: v for n, v in engine.parameters().items() if n in shipped_frozen(bundle)}


class GlobalEvaluator:
    """Accuracy of global trainable tensors: merged into plain LeNet-5 weights, run by an inference session."""

    def __init__(self, bundle: Bundle, frozen: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
        self.bundle, self.frozen, self.x, self.y = bundle, frozen, x, y

    def __call__(self, tensors: dict[str, np.ndarray]) -> float:
        with tempfile.TemporaryDirectory(prefix="edge-ft-fleet-eval-") as tmp:
            model = Path(tmp) / "model.onnx"
            write_inference_model(self.bundle, merged_weights(self.bundle, {**self.frozen, **tensors}), model)
            return accuracy(predict(session_runner(inference_session(model, 1)), self.x), self.y)
