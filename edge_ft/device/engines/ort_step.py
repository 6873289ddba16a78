"""The portable engine: one plain ai.onnx graph per training step, run by a standard onnxruntime InferenceSession.

onnxruntime-training has no aarch64 wheels (and no releases after 1.19.2); standard onnxruntime runs everywhere.
The bundle's train graph does forward, cross-entropy, backward and the optimizer update in one call, with every
tensor it reads or updates passed in and out. The engine keeps that state in two sets of buffers that onnxruntime
reads and writes in place (IOBinding): step k reads set A and writes set B, step k+1 reads B and writes A, so no
tensor is copied or allocated between steps; numpy copies are taken only for checkpoints and results. The frozen
tensors never change: the engine writes them into its in-memory copy of each graph as constants (initializers),
so onnxruntime folds what depends on them alone (a frozen weight's transpose) once, when the session starts.

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

from pathlib import Path
from typing import Any

import numpy as np

from edge_ft.atomic import atomic_save_safetensors, atomic_write_bytes
from edge_ft.checkpoint import load_safetensors
from edge_ft.contracts import INPUT, LABELS, LOGITS, LOSS, LR
from edge_ft.device.bundle import Bundle
from edge_ft.device.engines.onnx_wire import bake_weights
from edge_ft.device.ort_api import import_onnxruntime, inference_session
from edge_ft.errors import UserError

OPT_BUFFERS = {"sgd": (), "sgd-momentum": ("momentum",), "adamw": ("exp_avg", "exp_avg_sq")}
STEP_KEY = "step"
NEXT = "next."
FLAT = "flat:trainable"  # a flat step graph's input: every trainable tensor, flattened, in state-dict order
STATE_FORMAT = "edge-ft-ort-step-state"


def next_name(key: str) -> str:
    return NEXT + key


def optimizer_keys(optimizer: str, trainable: list[str]) -> list[str]:
    """Optimizer-state keys in graph order: per-tensor buffers, then AdamW's step count."""
    keys = [f"{buf}.{n}" for buf in OPT_BUFFERS[optimizer] for n in trainable]
    return keys + ([STEP_KEY] if optimizer == "adamw" else [])


class OrtStepEngine:
    """Engine over numpy + onnxruntime: the state lives in ping-pong numpy buffers bound to the step graph."""

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
        self.fixed = {n: np.ascontiguousarray(state[n]) for n in self.frozen}  # baked into the graphs, never written
        self.forward_path = bundle.file(forward_graph)
        self.train_session = self._session(bundle.file(train_graph), threads, mem_arena, profile_prefix)
        self.forward_session = self._session(self.forward_path, threads, mem_arena)
        # Two copies of every updated tensor and one IOBinding per direction (A -> B, B -> A), bound once. A flat
        # step graph reads and writes one vector per kind (the tensors, each optimizer buffer); self._views holds
        # every tensor and optimizer buffer by its own name, as views into those vectors.
        if FLAT in {i.name for i in self.train_session.get_inputs()}:
            self._buffers, self._views = zip(*(self._flat_buffers(state) for _ in range(2)))
        else:
            self._buffers = self._views = tuple({k: np.empty_like(state[k]) for k in self.trainable + self.opt_keys}
                                                for _ in range(2))
        self._updated = list(self._buffers[0])  # the graph's names of what each step reads and writes back
        self._current = 0  # which buffer set holds the state now
        self._bindings = [self._bind(reads, writes) for reads, writes in ((0, 1), (1, 0))]
        self._batch: int | None = None  # the loss/logits outputs and lr input are bound when they change
        self._lr: float | None = None
        self._initial = {k: state[k] for k in self.trainable + self.opt_keys}  # the bundle's state, for reset()
        self._set_state(state)

    def _session(self, path: Path, threads: int, mem_arena: bool | None, profile_prefix: str | None = None) -> Any:
        """A session on the graph at `path` with the frozen tensors baked in as initializers."""
        return inference_session(path, threads, mem_arena, profile_prefix,
                                 model=bake_weights(path.read_bytes(), self.fixed, str(path)))

    def _flat_buffers(self, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One buffer set of a flat step graph (FLAT and its optimizer keys) and its per-tensor views."""
        size = sum(state[n].size for n in self.trainable)
        buffers: dict[str, np.ndarray] = {FLAT: np.empty(size, np.float32)}
        for key in optimizer_keys(self._bundle.optimizer.name, [FLAT]):
            buffers[key] = np.empty((), np.int64) if key == STEP_KEY else np.empty(size, np.float32)
        views: dict[str, np.ndarray] = {STEP_KEY: buffers[STEP_KEY]} if STEP_KEY in buffers else {}
        start = 0
        for n in self.trainable:
            end = start + state[n].size
            views[n] = buffers[FLAT][start:end].reshape(state[n].shape)
            for buf in OPT_BUFFERS[self._bundle.optimizer.name]:
                views[f"{buf}.{n}"] = buffers[f"{buf}.{FLAT}"][start:end].reshape(state[n].shape)
            start = end
        return buffers, views

    def _bind(self, reads: int, writes: int) -> Any:
        """An IOBinding that reads buffer set `reads` and writes set `writes` in place."""
        ort = import_onnxruntime()
        binding = self.train_session.io_binding()
        wrap = ort.OrtValue.ortvalue_from_numpy  # on the CPU an OrtValue over the array's own memory, no copy
        for key in self._updated:
            binding.bind_ortvalue_input(key, wrap(self._buffers[reads][key]))
            binding.bind_ortvalue_output(next_name(key), wrap(self._buffers[writes][key]))
        return binding

    def _set_state(self, tensors: dict[str, np.ndarray]) -> None:
        """Copy the updated tensors present in `tensors` into the current buffer set."""
        for key, value in tensors.items():
            if key in self._views[self._current]:
                self._views[self._current][key][...] = value

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The trainable tensors as they are now (views of the current buffers: the next step overwrites the
        other set, then these)."""
        return {n: self._views[self._current][n] for n in self.trainable}

    @property
    def opt_state(self) -> dict[str, np.ndarray]:
        return {k: self._views[self._current][k] for k in self.opt_keys}

    @staticmethod
    def _check(state: dict[str, Any], shapes: dict[str, tuple[int, ...]], opt_keys: list[str], source: object) -> None:
        """Every tensor the graph reads is present with the shape and dtype the bundle says."""
        expected: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
            k: (tuple(s), np.float32) for k, s in shapes.items()}
        for key in opt_keys:  # a buffer has its tensor's shape: "exp_avg.fc1.weight" -> fc1.weight
            expected[key] = ((), np.int64) if key == STEP_KEY else (tuple(shapes[key.split(".", 1)[1]]), np.float32)
        for key, (shape, dtype) in expected.items():
            if key not in state:
                raise UserError(f"{source}: missing tensor {key!r}; was it written for another bundle?")
            if state[key].shape != shape or state[key].dtype != dtype:
                raise UserError(f"{source}: {key!r} is {state[key].dtype} {state[key].shape}, this bundle needs "
                                f"{np.dtype(dtype)} {shape}; was it written for another bundle?")

    def _check_batch(self, x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
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
        x, labels = self._check_batch(x, y)
        if len(x) != self._batch:  # loss and logits land in arrays kept per batch size
            self._loss = np.empty((), np.float32)
            self._logits = np.empty((len(x), self._bundle.num_classes), np.float32)
            self._bind_everywhere("output", LOSS, self._loss)
            self._bind_everywhere("output", LOGITS, self._logits)
            self._batch = len(x)
        if lr != self._lr:
            self._lr_value = np.asarray(lr, dtype=np.float32)
            self._bind_everywhere("input", LR, self._lr_value)
            self._lr = lr
        binding = self._bindings[self._current]
        binding.bind_cpu_input(INPUT, x)  # x and y stay alive until run returns; the next step rebinds them
        binding.bind_cpu_input(LABELS, labels)
        self.train_session.run_with_iobinding(binding)
        self._current = 1 - self._current
        return float(self._loss), self._logits.copy()

    def _bind_everywhere(self, kind: str, name: str, array: np.ndarray) -> None:
        """Bind `array` (which the engine keeps alive) as input or output `name` of both directions."""
        value = import_onnxruntime().OrtValue.ortvalue_from_numpy(array)
        for binding in self._bindings:
            getattr(binding, f"bind_ortvalue_{kind}")(name, value)

    def end_profiling(self) -> str:
        """Stop the step graph's profiler (started with profile_prefix); the path of its trace."""
        return str(self.train_session.end_profiling())

    def logits(self, x: np.ndarray) -> np.ndarray:
        x, _ = self._check_batch(x)
        logits: np.ndarray = self.forward_session.run([LOGITS], {INPUT: x, **self.params})[0]
        return logits

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self.params.items()}

    def parameters(self) -> dict[str, np.ndarray]:
        """Every model tensor (frozen ones included), for checks that nothing frozen moved."""
        return {n: v.copy() for n, v in {**self.params, **self.fixed}.items()}

    def load_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            if name not in self.params:
                raise UserError(f"{name} is not a trainable tensor of bundle {self._bundle.path}")
            if np.shape(value) != self.params[name].shape:  # written in place: a mismatch must not broadcast
                raise UserError(f"{name} has shape {np.shape(value)}, bundle {self._bundle.path} needs "
                                f"{self.params[name].shape}")
        self._set_state(tensors)

    def reset(self) -> None:
        """Back to the bundle's own state (trainable tensors and optimizer state), as a newly opened engine: one
        engine, its sessions built once, serves run after run (a fleet device's rounds)."""
        self._set_state(self._initial)

    def save_state(self, path: str) -> None:
        atomic_save_safetensors(path, {**self.params, **self.opt_state},
                                metadata={"format": STATE_FORMAT, "optimizer": self._bundle.optimizer.name})

    def load_state(self, path: str) -> None:
        state = load_safetensors(path)
        self._check(state, self._bundle.trainable, self.opt_keys, path)
        self._set_state(state)

    def export_inference(self, path: str) -> None:
        """The forward graph with the current weights baked in as initializers: a model that needs only `input`."""
        weights = {**self.params, **self.fixed}
        atomic_write_bytes(path, bake_weights(self.forward_path.read_bytes(), weights, str(self.forward_path)))
