"""What every engine's bundle shares: the prepared model, ONNX export settings and engine-independent graphs.

  inference_base.onnx  the plain network's forward graph holding the starting weights; the manifest records the
                       byte offset of every weight so the device writes trained or merged weights into a copy
                       without the onnx package (adapter merge, inference export of cached-feature runs)
  features.onnx        the frozen prefix (edge_ft.host.export.prefix): the layers before the first that trains
                       (LeNet-5 LoRA: (B,1,28,28) -> (B,256)), run once per example to cache features
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edge_ft.architecture import base_param_shapes
from edge_ft.atomic import atomic_write_bytes
from edge_ft.config import MethodConfig
from edge_ft.contracts import FEATURES, INPUT, LOGITS
from edge_ft.errors import UserError
from edge_ft.host.describe import HostModel, set_submodule
from edge_ft.host.lora import LoRALinear
from edge_ft.host.methods import build_model
from edge_ft.model_desc import ModelDesc

OPSET = 17  # ORT 1.19's training graph builder handles opsets <= 21; 17 is what its own samples use
INFERENCE_BASE = "inference_base.onnx"
FEATURES_GRAPH = "features.onnx"
HEAD_FOLDER = "head"


class MeanPool2x2(nn.Module):
    """A tiling nn.AvgPool2d (stride = kernel, no padding; LeNet-5's 2x2) as crop + reshape + mean: identical
    numbers, no weights, so state dicts do not change.

    With a dynamic batch axis ORT's CPU AveragePoolGrad divides by zero (SIGFPE) during full fine-tuning;
    ReduceMean's gradient is plain broadcasting. Channels and size are fixed so the graph gets constant shapes.
    Rows and columns the windows do not reach are cropped first, as the pool drops them (DS-CNN's 24x5 pool
    over a 25x5 map).
    """

    def __init__(self, channels: int, height: int, width: int | None = None, kernel: tuple[int, int] = (2, 2)):
        super().__init__()
        self.channels, self.height, self.width = channels, height, height if width is None else width
        self.kernel = tuple(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,C,H,W) -> (B,C,H/kh,W/kw)
        (kh, kw), h, w = self.kernel, self.height // self.kernel[0], self.width // self.kernel[1]
        if (h * kh, w * kw) != (self.height, self.width):
            x = x[:, :, : h * kh, : w * kw]
        return x.reshape(-1, self.channels, h, kh, w, kw).mean(dim=(3, 5))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, height={self.height}, width={self.width}, kernel={self.kernel}"


class FrozenBatchNorm2d(nn.Module):
    """nn.BatchNorm2d in eval mode as plain arithmetic, x * scale + shift with scale = weight / sqrt(var + eps):
    torch's own eval formula, holding the same Parameters and buffers under the same names.

    ORT's training-graph builder turns every BatchNormalization node into its training-mode kernel (batch
    statistics, running statistics updated each step) whatever the node says; these Mul/Add/Sqrt nodes it
    leaves alone, so the running statistics stay frozen inputs and the affine weight and bias get gradients.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.eps = bn.eps
        self.weight, self.bias = bn.weight, bn.bias  # the same Parameters: values and requires_grad kept
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1 / torch.sqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return x * scale[:, None, None] + shift[:, None, None]


def pool_shapes(desc: ModelDesc) -> dict[str, tuple[int, int, int, tuple[int, int]]]:
    """(channels, height, width, kernel) entering each average pool whose windows tile its input (stride = kernel,
    no padding) and that is called once (a module called on several shapes stays an AvgPool2d)."""
    shapes = {}
    reused = {layer.attrs["module"] for layer in desc.layers if "module" in layer.attrs}  # one module, many shapes
    for layer in desc.layers:
        a = layer.attrs
        if layer.name in reused or "module" in a:
            continue
        if layer.kind == "avgpool2d" and a.get("stride") == a.get("kernel_size") and a.get("padding") == [0, 0]:
            shapes[layer.name] = (*layer.input_shapes[0], tuple(a["kernel_size"]))
    return shapes


def prepare_model(cfg: MethodConfig, base_state: dict[str, np.ndarray], seed: int, mean_pools: bool = True,
                  host: HostModel | None = None, frozen_norms: bool = False) -> nn.Module:
    """The method's model on the base weights (LoRA A / a new head drawn from `seed`); with `mean_pools` the
    tiling average pools are swapped for MeanPool2x2 and with `frozen_norms` every BatchNorm2d for
    FrozenBatchNorm2d (what the ort-training engine needs)."""
    state = {k: torch.from_numpy(np.array(v)) for k, v in base_state.items()}
    model = build_model(cfg, state, seed, make=host.make if host else None)
    model.input_shape = cfg.model.input_shape  # one example's shape, read by the exporters
    for name, module in list(model.named_modules()) if frozen_norms else ():
        if isinstance(module, nn.BatchNorm2d) and module.running_mean is not None:
            set_submodule(model, name, FrozenBatchNorm2d(module))
    for name, shape in pool_shapes(cfg.model).items() if mean_pools else ():
        pool = _get(model, name)
        if isinstance(pool, nn.AvgPool2d) and not pool.ceil_mode:  # a module, not F.avg_pool2d
            set_submodule(model, name, MeanPool2x2(*shape))
    return model


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def check_base(state: dict[str, np.ndarray], path: Path, desc: ModelDesc) -> None:
    """The base checkpoint has exactly the described tensors and shapes (for its own class count)."""
    what = desc.title
    net = desc.with_num_classes(int(state[f"{desc.output}.bias"].shape[0]))
    expected = {**net.param_shapes, **dict(net.buffers)}
    for name, shape in expected.items():
        if name not in state:
            raise UserError(f"{path}: tensor {name!r} missing; not a {what} base" +
                            (" (use `edge-ft pretrain`)" if what == "LeNet-5" else ""))
        if tuple(state[name].shape) != shape:
            raise UserError(f"{path}: {name} has shape {tuple(state[name].shape)}, {what} needs {shape}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UserError(f"{path}: unexpected tensor {extra[0]!r}; not a plain {what} base checkpoint")


def input_shape_of(model: nn.Module) -> tuple[int, ...]:
    """One example's shape, as prepare_model (or a head-only model) set it."""
    return tuple(model.input_shape)


def onnx_bytes(model: nn.Module, training: bool, output: str = LOGITS) -> bytes:
    """TorchScript export (dynamo=False): initializer names equal parameter names, batch axis dynamic.

    No constant folding: every parameter stays an initializer under its own name, which ORT's gradient builder
    and the inference graph's weight offsets rely on. For training graphs the top module is in training mode, so
    the exporter keeps tensors of equal value apart (in eval mode it merges them: a fresh model's BatchNorm
    weights are all ones, and a merged one vanishes from the graph); BatchNorm and Dropout stay in eval mode, as
    on every engine: frozen running statistics (BatchNormalization training_mode=0), Dropout the identity.
    """
    example = torch.zeros(2, *input_shape_of(model))
    buffer = io.BytesIO()
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
            m.eval()
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
                training=torch.onnx.TrainingMode.PRESERVE,  # the modes set above
            )
    finally:
        for m, mode in modes.items():
            m.training = mode
    return buffer.getvalue()


def plain_network(model: nn.Module) -> nn.Module:
    """A copy of a prepared model with every LoRALinear back to a plain nn.Linear holding W0 (eval mode)."""
    net = copy.deepcopy(model).eval()
    for name, m in list(net.named_modules()):
        if isinstance(m, LoRALinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("lora_")})
            set_submodule(net, name, plain)
    return net


def write_inference_base(model: nn.Module, cfg: MethodConfig, out_dir: Path) -> dict:
    """Write inference_base.onnx and return its manifest entry with each weight's (offset, nbytes).

    The offsets are found by exporting once with distinct random placeholder values (so every tensor's bytes
    occur exactly once in the file), then the real starting weights are written over the placeholders.
    """
    net = plain_network(model)
    names = base_param_shapes(cfg.num_classes, cfg.model)
    weights = {name: t.detach().clone() for name, t in net.state_dict().items() if name in names}
    rng = np.random.default_rng(0)
    placeholders = {k: torch.from_numpy(rng.standard_normal(tuple(v.shape)).astype(np.float32))
                    for k, v in weights.items()}
    net.load_state_dict(placeholders, strict=False)  # buffers (BatchNorm statistics) keep their base values
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


def write_features_graph(prefix: nn.Module, entry: dict, out_dir: Path) -> dict:
    """features.onnx: a bundle's frozen prefix (eval mode; its weights never change) and the manifest's entry for it,
    `entry` being edge_ft.host.export.prefix.Split.manifest_entry()."""
    atomic_write_bytes(out_dir / FEATURES_GRAPH, onnx_bytes(prefix, training=False, output=FEATURES))
    return {"file": FEATURES_GRAPH, "input": INPUT, "output": FEATURES, "head": HEAD_FOLDER, **entry}


def parameter_split(model: nn.Module) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """(trainable, frozen): name -> shape, in state-dict order, as the model's requires_grad flags say; BatchNorm's
    running statistics are frozen tensors too (the step graph reads them, never updates them)."""
    trainable, frozen = {}, {}
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen)[name] = list(p.shape)
    frozen.update((n, list(b.shape)) for n, b in model.named_buffers() if b.is_floating_point())
    return trainable, frozen
