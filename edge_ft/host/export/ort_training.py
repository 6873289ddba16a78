"""Bundle files for the ort-training engine: onnxruntime.training.artifacts.generate_artifacts output.

  training_model.onnx   forward + CrossEntropyLoss + gradient graph; outputs (loss, logits)
  eval_model.onnx       forward + loss, no gradients
  optimizer_model.onnx  one AdamW or SGD node over all trainable tensors
  checkpoint            every parameter (trainable and frozen) as ORT's flatbuffer checkpoint
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import onnx
import torch.nn as nn

from edge_ft.atomic import atomic_write_bytes
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.contracts import LOGITS, LOSS
from edge_ft.errors import UserError
from edge_ft.host.export.common import onnx_bytes, parameter_split

FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
MEAN_POOLS = True  # pools as reshape + mean: ORT's AveragePoolGrad divides by zero with a dynamic batch
FROZEN_NORMS = True  # BatchNorm as arithmetic: ORT's gradient builder would train it in training mode
TORCH_ADAMW = 0  # AdamWOptimizer adam_mode: 0 = torch.optim.AdamW (decay before the update), 1 = Hugging Face's


def build(model: nn.Module, cfg: MethodConfig, opt: OptimizerConfig, out_dir: Path, head: bool = False) -> dict:
    """Write ORT's training artifacts into out_dir; return the manifest's fields. head (the suffix of a cached
    prefix) changes nothing here."""
    from onnxruntime import __version__, set_default_logger_severity

    try:
        from onnxruntime.training import artifacts, onnxblock
    except ImportError:  # standard onnxruntime, or a platform without the training wheel (aarch64, Python 3.13)
        raise UserError(f"onnxruntime {__version__} here has no training artifacts API: --engine ort-training "
                        "needs onnxruntime-training-cpu (x86_64, Python 3.10-3.12); use --engine ort-step, which "
                        "every board runs") from None

    if opt.name == "adamw":
        optimizer = onnxblock.optim.AdamW(betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    elif opt.name == "sgd":
        optimizer = artifacts.OptimType.SGD
    else:
        raise UserError(f"the ort-training engine has no {opt.name} optimizer (ORT offers sgd and adamw); "
                        "use --optimizer sgd|adamw, or --engine ort-step for sgd-momentum")
    trainable, frozen = parameter_split(model)
    set_default_logger_severity(3)
    with tempfile.TemporaryDirectory() as tmp, _native_stderr_on_failure_only():
        artifacts.generate_artifacts(
            onnx.load_model_from_string(onnx_bytes(model, training=True)),
            requires_grad=list(trainable),
            frozen_params=list(frozen),  # listed so the checkpoint holds them: unlisted ones stay in the graphs
            loss=artifacts.LossType.CrossEntropyLoss,
            optimizer=optimizer,
            artifact_directory=tmp,
            additional_output_names=[LOGITS],
        )
        if opt.name == "adamw":
            _use_torch_adamw(Path(tmp) / "optimizer_model.onnx")
        for name in FILES:
            atomic_write_bytes(out_dir / name, (Path(tmp) / name).read_bytes())
    return {"ort_training": {"training_model": FILES[0], "eval_model": FILES[1], "optimizer_model": FILES[2],
                             "checkpoint": FILES[3], "outputs": [LOSS, LOGITS]}}


@contextlib.contextmanager
def _native_stderr_on_failure_only():
    """The gradient builder logs every graph pass at INFO from C++, ignoring the logger severity; keep it
    out of the terminal unless the export fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _use_torch_adamw(path: Path) -> None:
    """onnxblock hard-codes adam_mode=1 (Hugging Face AdamW); torch.optim.AdamW semantics are adam_mode=0."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "adam_mode":
                    attr.i = TORCH_ADAMW
    onnx.save(model, str(path))
