"""The portable engine: one plain ai.onnx graph per training step, run by a standard onnxruntime InferenceSession.

onnxruntime-training has no aarch64 wheels (and no releases after 1.19.2); standard onnxruntime runs everywhere.
The bundle's train graph does forward, cross-entropy, backward and the optimizer update in one call, with every
tensor it reads or updates passed in and out, so the engine just feeds the current state and keeps the result.

State file (state.safetensors) keys, shared with the exporter:
  <param>                every model tensor by its state-dict name (trainable and frozen), float32
  momentum.<param>       sgd-momentum buffer of a trainable tensor
  exp_avg.<param>        AdamW first moment;  exp_avg_sq.<param>  AdamW second moment
  step                   AdamW step count, int64 0-d (bias correction)
Train graph inputs: input float32 (B, *input_shape), labels int64 (B,), lr float32 0-d, the trainable tensors,
the frozen ones, the optimizer state; outputs: loss, logits (B,C), then `next.<key>` for each trainable tensor
and optimizer-state key. Forward graph: (input, every model tensor) -> logits.
"""

from __future__ import annotations

import numpy as np

from edge_ft.atomic import atomic_save_safetensors, atomic_write_bytes
from edge_ft.checkpoint import load_safetensors
from edge_ft.contracts import INPUT, LABELS, LOGITS, LOSS, LR
from edge_ft.device.bundle import Bundle
from edge_ft.device.engines.onnx_wire import bake_weights
from edge_ft.device.ort_api import inference_session
from edge_ft.errors import UserError

OPT_BUFFERS = {"sgd": (), "sgd-momentum": ("momentum",), "adamw": ("exp_avg", "exp_avg_sq")}
STEP_KEY = "step"
NEXT = "next."
STATE_FORMAT = "edge-ft-ort-step-state"


def next_name(key: str) -> str:
    return NEXT + key


def optimizer_keys(optimizer: str, trainable: list[str]) -> list[str]:
    """Optimizer-state keys in graph order: per-tensor buffers, then AdamW's step count."""
    keys = [f"{buf}.{n}" for buf in OPT_BUFFERS[optimizer] for n in trainable]
    return keys + ([STEP_KEY] if optimizer == "adamw" else [])


class OrtStepEngine:
    """Engine over numpy + onnxruntime: the state lives in numpy arrays fed to the step graph every call."""

    def __init__(self, bundle: Bundle, threads: int = 0, mem_arena: bool | None = None,
                 profile_prefix: str | None = None):
        self._bundle = bundle
        try:
            files = bundle.manifest["ort_step"]
            train_graph, forward_graph, state_file = files["train_graph"], files["forward_graph"], files["state"]
        except (KeyError, TypeError) as e:
            raise UserError(f"{bundle.path}: manifest lacks the ort_step entry ({e}); re-export the bundle") from None
        self.trainable, self.frozen = list(bundle.trainable), list(bundle.frozen)
        self.opt_keys = optimizer_keys(bundle.optimizer.name, self.trainable)
        state = load_safetensors(bundle.file(state_file))
        self._check(state, {**bundle.trainable, **bundle.frozen}, self.opt_keys, bundle.file(state_file))
        self.params = {n: state[n] for n in self.trainable}  # what the step updates
        self.fixed = {n: state[n] for n in self.frozen}  # fed unchanged every step
        self.opt_state = {k: state[k] for k in self.opt_keys}
        self.forward_path = bundle.file(forward_graph)
        self.train_session = inference_session(bundle.file(train_graph), threads, mem_arena, profile_prefix)
        self.forward_session = inference_session(self.forward_path, threads, mem_arena)
        self._outputs = [LOSS, LOGITS, *(next_name(k) for k in self.trainable + self.opt_keys)]

    @staticmethod
    def _check(state: dict, shapes: dict[str, tuple], opt_keys: list[str], source) -> None:
        """Every tensor the graph reads is present with the shape and dtype the bundle says."""
        expected = {k: (tuple(s), np.float32) for k, s in shapes.items()}
        for key in opt_keys:  # a buffer has its tensor's shape: "exp_avg.fc1.weight" -> fc1.weight
            expected[key] = ((), np.int64) if key == STEP_KEY else (tuple(shapes[key.split(".", 1)[1]]), np.float32)
        for key, (shape, dtype) in expected.items():
            if key not in state:
                raise UserError(f"{source}: missing tensor {key!r}; was it written for another bundle?")
            if state[key].shape != shape or state[key].dtype != dtype:
                raise UserError(f"{source}: {key!r} is {state[key].dtype} {state[key].shape}, this bundle needs "
                                f"{np.dtype(dtype)} {shape}; was it written for another bundle?")

    def _check_batch(self, x: np.ndarray, y: np.ndarray | None = None):
        shape = self._bundle.input_shape
        if x.dtype != np.float32 or x.shape[1:] != shape or len(x) == 0:
            raise UserError(f"input must be float32 (B, {', '.join(map(str, shape))}), got {x.dtype} {x.shape}")
        if y is None:
            return np.ascontiguousarray(x), None
        y = np.ascontiguousarray(y, dtype=np.int64)
        if y.shape != (len(x),):
            raise UserError(f"labels must have shape ({len(x)},), got {y.shape}")
        if y.min() < 0 or y.max() >= self._bundle.num_classes:  # out-of-range labels would index past the logits
            raise UserError(f"labels must lie in 0..{self._bundle.num_classes - 1}, got {y.min()}..{y.max()}")
        return np.ascontiguousarray(x), y

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        x, y = self._check_batch(x, y)
        feeds = {INPUT: x, LABELS: y, LR: np.asarray(lr, dtype=np.float32), **self.params, **self.fixed,
                 **self.opt_state}
        loss, logits, *updated = self.train_session.run(self._outputs, feeds)
        n = len(self.trainable)
        self.params = dict(zip(self.trainable, updated[:n]))
        self.opt_state = dict(zip(self.opt_keys, updated[n:]))
        return float(loss), logits

    def end_profiling(self) -> str:
        """Stop the step graph's profiler (started with profile_prefix); the path of its trace."""
        return self.train_session.end_profiling()

    def logits(self, x: np.ndarray) -> np.ndarray:
        x, _ = self._check_batch(x)
        return self.forward_session.run([LOGITS], {INPUT: x, **self.params, **self.fixed})[0]

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self.params.items()}

    def parameters(self) -> dict[str, np.ndarray]:
        """Every model tensor (frozen ones included), for checks that nothing frozen moved."""
        return {n: v.copy() for n, v in {**self.params, **self.fixed}.items()}

    def load_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            if name not in self.params:
                raise UserError(f"{name} is not a trainable tensor of bundle {self._bundle.path}")
            self.params[name] = np.ascontiguousarray(value, dtype=np.float32)

    def save_state(self, path: str) -> None:
        atomic_save_safetensors(path, {**self.params, **self.opt_state},
                                metadata={"format": STATE_FORMAT, "optimizer": self._bundle.optimizer.name})

    def load_state(self, path: str) -> None:
        state = load_safetensors(path)
        self._check(state, self._bundle.trainable, self.opt_keys, path)
        self.params = {n: state[n] for n in self.trainable}
        self.opt_state = {k: state[k] for k in self.opt_keys}

    def export_inference(self, path: str) -> None:
        """The forward graph with the current weights baked in as initializers: a model that needs only `input`."""
        weights = {**self.params, **self.fixed}
        atomic_write_bytes(path, bake_weights(self.forward_path.read_bytes(), weights, str(self.forward_path)))
