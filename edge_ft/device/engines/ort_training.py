"""The ort-training engine: ONNX Runtime's on-device training API (Module + Optimizer + CheckpointState).

ORT keeps the weights in the CheckpointState that the Module shares, so parameters are read and written
through the state, and only while the Module that owns them is alive (writing into a state whose Module is
gone crashes). Loading a saved state therefore rebuilds state, Module and Optimizer together.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_ft.atomic import atomic_write_bytes
from edge_ft.contracts import LOGITS
from edge_ft.device.bundle import Bundle
from edge_ft.device.ort_api import load_training_api, session_options
from edge_ft.errors import UserError


class OrtTrainingEngine:
    # onnxruntime.training.api objects (the package has no type information)
    _state: Any  # CheckpointState
    _module: Any  # Module
    _optimizer: Any  # Optimizer

    def __init__(self, bundle: Bundle, threads: int = 0):
        self._api = load_training_api()
        self._bundle = bundle
        self._files = bundle.manifest["ort_training"]
        self._options = session_options(threads)
        self._open(bundle.file(self._files["checkpoint"]))

    def _open(self, checkpoint: Path) -> None:
        """(Re)build state, Module and Optimizer from a checkpoint; the old trio is dropped together."""
        api, f = self._api, self._bundle.file
        try:
            state = api.CheckpointState.load_checkpoint(str(checkpoint))
            module = api.Module(str(f(self._files["training_model"])), state, str(f(self._files["eval_model"])),
                                session_options=self._options)
            optimizer = api.Optimizer(str(f(self._files["optimizer_model"])), module)
        except Exception as e:  # onnxruntime's own Fail/InvalidGraph/... derive from Exception only
            raise UserError(f"{checkpoint}: onnxruntime cannot open this training state "
                            f"({str(e).splitlines()[0]}); re-export the bundle with this device's edge-ft") from None
        self._optimizer = self._module = self._state = None
        self._state, self._module, self._optimizer = state, module, optimizer
        self._lr: float | None = None  # the optimizer's rate is only set when it changes

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32 or x.shape[1:] != self._bundle.input_shape:
            raise UserError(f"input must be float32 (B, {', '.join(map(str, self._bundle.input_shape))}), "
                            f"got {x.dtype} {x.shape}")
        return np.ascontiguousarray(x)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        x = self._check_input(x)
        if lr != self._lr:
            self._optimizer.set_learning_rate(float(lr))
            self._lr = lr
        self._module.train()
        loss, logits = self._module(x, np.ascontiguousarray(y, dtype=np.int64))
        self._optimizer.step()
        self._module.lazy_reset_grad()  # gradients are zeroed just before the next backward, not now
        return float(loss), logits

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = self._check_input(x)
        self._module.eval()
        _, logits = self._module(x, np.zeros(len(x), dtype=np.int64))  # the eval graph ends in the loss too
        out: np.ndarray = logits
        return out

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {name: self._state.parameters[name].data.copy() for name in self._bundle.trainable}

    def parameters(self) -> dict[str, np.ndarray]:
        """Every tensor in the checkpoint (frozen ones included), for checks that nothing frozen moved."""
        return {name: p.data.copy() for name, p in self._state.parameters}

    def load_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            if name not in self._bundle.trainable:
                raise UserError(f"{name} is not a trainable tensor of bundle {self._bundle.path}")
            self._state.parameters[name] = np.ascontiguousarray(value, dtype=np.float32)

    def save_state(self, path: str) -> None:
        """ORT checkpoint with optimizer state (Adam moments, step), written to a temp file then moved."""
        with tempfile.TemporaryDirectory() as tmp:
            self._api.CheckpointState.save_checkpoint(self._state, f"{tmp}/state", include_optimizer_state=True)
            atomic_write_bytes(path, Path(f"{tmp}/state").read_bytes())

    def load_state(self, path: str) -> None:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such training state")
        self._open(Path(path))

    def export_inference(self, path: str) -> None:
        """Module.export_model_for_inferencing: the eval graph cut at the logits, current weights inside."""
        with tempfile.TemporaryDirectory() as tmp:
            self._module.export_model_for_inferencing(f"{tmp}/model.onnx", [LOGITS])
            atomic_write_bytes(path, Path(f"{tmp}/model.onnx").read_bytes())
