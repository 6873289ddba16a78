"""What every engine's bundle shares: the prepared model, ONNX export settings and engine-independent graphs.

  inference_base.onnx  plain LeNet-5 forward graph holding the starting weights; the manifest records the byte
                       offset of every weight so the device writes trained or merged weights into a copy
                       without the onnx package (adapter merge, inference export of cached-feature runs)
  features.onnx        probe only: the frozen backbone, (B,1,28,28) -> (B,84), run once to cache features
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edge_ft.architecture import LAYER_SPECS, base_param_shapes
from edge_ft.atomic import atomic_write_bytes
from edge_ft.config import MethodConfig
from edge_ft.errors import UserError
from edge_ft.host.methods import build_model
from edge_ft.host.model import INPUT_SHAPE, LeNet5

OPSET = 17  # ORT 1.19's training graph builder handles opsets <= 21; 17 is what its own samples use
INPUT, LABELS, LOGITS, FEATURES = "input", "labels", "logits", "features"
INFERENCE_BASE = "inference_base.onnx"
FEATURES_GRAPH = "features.onnx"
HEAD_FOLDER = "head"


class MeanPool2x2(nn.Module):
    """nn.AvgPool2d(2, 2) as reshape + mean: identical numbers, no weights, so state dicts do not change.

    With a dynamic batch axis ORT's CPU AveragePoolGrad divides by zero (SIGFPE) during full fine-tuning;
    ReduceMean's gradient is plain broadcasting. Channels and size are fixed so the graph gets constant shapes.
    """

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.channels, self.size = channels, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,C,H,W) -> (B,C,H/2,W/2)
        half = self.size // 2
        return x.reshape(-1, self.channels, half, 2, half, 2).mean(dim=(3, 5))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, size={self.size}"


def pool_shapes() -> dict[str, tuple[int, int]]:
    """(channels, spatial size) entering avgpool1 and avgpool2, from the torch-free layer table."""
    size, shapes = INPUT_SHAPE[-1], {}
    for i, layer in enumerate(("conv1", "conv2"), start=1):
        _, _, channels, kernel = LAYER_SPECS[layer]
        size = size - kernel + 1  # valid convolution
        shapes[f"avgpool{i}"] = (channels, size)
        size //= 2
    return shapes


def prepare_model(cfg: MethodConfig, base_state: dict[str, np.ndarray], seed: int, mean_pools: bool = True) -> LeNet5:
    """The method's model on the base weights (LoRA A / a new head drawn from `seed`); with `mean_pools` the
    pools are swapped for MeanPool2x2 (what the ort-training engine needs)."""
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in base_state.items()}
    model = build_model(cfg, state, seed)
    for name, (channels, size) in pool_shapes().items() if mean_pools else ():
        setattr(model, name, MeanPool2x2(channels, size))
    return model


def check_base(state: dict[str, np.ndarray], path: Path) -> None:
    """The base checkpoint has exactly LeNet-5's tensors and shapes (for its own class count)."""
    expected = base_param_shapes(int(state["fc3.bias"].shape[0]))
    for name, shape in expected.items():
        if name not in state:
            raise UserError(f"{path}: tensor {name!r} missing; not a LeNet-5 base (use `edge-ft pretrain`)")
        if tuple(state[name].shape) != shape:
            raise UserError(f"{path}: {name} has shape {tuple(state[name].shape)}, LeNet-5 needs {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{path}: unexpected tensor {extra[0]!r}; not a plain LeNet-5 base checkpoint")


def input_shape_of(model: nn.Module) -> tuple[int, ...]:
    """One example's shape: LeNet-5 takes (1,28,28); a head-only model says its own (`input_shape`)."""
    return tuple(getattr(model, "input_shape", INPUT_SHAPE))


def onnx_bytes(model: nn.Module, training: bool, output: str = LOGITS) -> bytes:
    """TorchScript export (dynamo=False): initializer names equal parameter names, batch axis dynamic.

    No constant folding: every parameter stays an initializer under its own name, which ORT's gradient builder
    and the inference graph's weight offsets rely on.
    """
    example = torch.zeros(2, *input_shape_of(model))
    buffer = io.BytesIO()
    was_training = model.training
    model.train(training)  # the exporter's default TrainingMode.PRESERVE exports the mode set here
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but it is what ORT training reads
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                export_params=True,
                opset_version=OPSET,
                do_constant_folding=False,
                input_names=[INPUT],
                output_names=[output],
                dynamic_axes={INPUT: {0: "batch"}, output: {0: "batch"}},
            )
    finally:
        model.train(was_training)
    return buffer.getvalue()


def base_named_state(model: nn.Module, num_classes: int) -> dict[str, torch.Tensor]:
    """The plain LeNet-5 tensors of a prepared model (for LoRA: the frozen W0 and biases, not A and B)."""
    state = model.state_dict()
    return {name: state[name].detach().clone() for name in base_param_shapes(num_classes)}


def write_inference_base(model: nn.Module, num_classes: int, out_dir: Path) -> dict:
    """Write inference_base.onnx and return its manifest entry with each weight's (offset, nbytes).

    The offsets are found by exporting once with distinct random placeholder values (so every tensor's bytes
    occur exactly once in the file), then the real starting weights are written over the placeholders.
    """
    net = LeNet5(num_classes).eval()
    weights = base_named_state(model, num_classes)
    rng = np.random.default_rng(0)
    placeholders = {k: torch.from_numpy(rng.standard_normal(tuple(v.shape)).astype(np.float32))
                    for k, v in weights.items()}
    net.load_state_dict(placeholders)
    data = bytearray(onnx_bytes(net, training=False))
    offsets = {}
    for name, tensor in placeholders.items():
        raw = tensor.numpy().tobytes()
        at = data.find(raw)
        if at < 0 or data.find(raw, at + 1) >= 0:
            raise RuntimeError(f"cannot locate {name} exactly once in the exported inference graph")
        offsets[name] = [at, len(raw)]
        data[at : at + len(raw)] = weights[name].numpy().astype(np.float32).tobytes()
    atomic_write_bytes(out_dir / INFERENCE_BASE, bytes(data))
    return {"file": INFERENCE_BASE, "input": INPUT, "output": LOGITS, "offsets": offsets}


class Backbone(nn.Module):
    """LeNet-5 below the head: (B,1,28,28) -> (B,84)."""

    def __init__(self, model: LeNet5):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


class Head(nn.Module):
    """The probe's trainable part alone: fc3 on cached features, (B,84) -> (B,C); keeps the name fc3.*."""

    def __init__(self, fc3: nn.Linear):
        super().__init__()
        self.fc3 = fc3
        self.input_shape = (fc3.in_features,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(x)


def write_features_graph(model: LeNet5, out_dir: Path) -> dict:
    """features.onnx: the frozen backbone of a probe bundle (eval mode; its weights never change)."""
    atomic_write_bytes(out_dir / FEATURES_GRAPH, onnx_bytes(Backbone(model), training=False, output=FEATURES))
    return {"file": FEATURES_GRAPH, "input": INPUT, "output": FEATURES, "head": HEAD_FOLDER,
            "dim": model.fc3.in_features}


def parameter_split(model: nn.Module) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(trainable, frozen): name -> shape, in state-dict order, as the model's requires_grad flags say; BatchNorm's
    running statistics are frozen tensors too (the step graph reads them, never updates them)."""
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen)[name] = list(p.shape)
    frozen.update((n, list(b.shape)) for n, b in model.named_buffers() if b.is_floating_point())
    return trainable, frozen
