"""Device half: bundles, on-device training and adapters on numpy + onnxruntime only.

Nothing under this package may import torch or onnx: a Raspberry Pi installs the wheel with its `[device]` extra alone.
The app-facing API lives in `edge_ft.device.api` and is importable from here (`from edge_ft.device import Trainer`);
it is imported on first use, so the device commands that do not need it do not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_ft.device.api import (EpochResult, Evaluation, FitProgress, FitResult, Prediction, Predictor, Trainer,
                                    UserError, merge, train_run)

__all__ = ["Trainer", "Predictor", "FitProgress", "FitResult", "EpochResult", "Evaluation", "Prediction",
           "UserError", "train_run", "merge"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from edge_ft.device import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
