"""What a model.onnx must say about itself so that anyone can run it correctly: its metadata_props.

A trained or merged model carries, under keys starting with "edge_ft.":
  edge_ft.preprocessing  JSON: input name, per-example shape (C,H,W, the bundle's), dtype, pixel divisor, polarity
  edge_ft.classes        JSON list of class names in label order (absent when the data named none)
  edge_ft.source         JSON: method, engine, base sha256, and the run or adapter it came from
`edge-ft predict` applies the preprocessing and prints class names; a guessed scaling ([-1, 1] instead of
/255 drops digits accuracy from 0.97 to 0.36 without any error), so a model without this block is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_ft.architecture import INPUT_SHAPE
from edge_ft.atomic import atomic_write_bytes
from edge_ft.contracts import INPUT
from edge_ft.device.engines.onnx_wire import with_metadata
from edge_ft.errors import UserError

if TYPE_CHECKING:
    from edge_ft.device.bundle import Bundle

PREFIX = "edge_ft."
PIXEL_DIVISOR = 255.0  # float input = uint8 pixel / 255, in [0, 1] (edge_ft.data.npz.to_float)
POLARITY = "white-on-black"  # MNIST's: ink bright, background dark; image readers invert light pages


@dataclass(frozen=True)
class ModelCard:
    input_name: str  # graph input the pixels go to
    input_shape: tuple[int, ...]  # one example, (C, H, W)
    divisor: float  # float input = uint8 pixel / divisor
    polarity: str  # white-on-black
    classes: list[str] | None  # name of each logit, or None when the training data named none

    def to_props(self, source: dict[str, Any]) -> dict[str, str]:
        pixels = "uint8 0..255 grey, resized to HxW" if self.input_shape[0] == 1 else "uint8 0..255, CxHxW"
        pre = {"input": self.input_name, "shape": list(self.input_shape), "dtype": "float32", "divisor": self.divisor,
               "polarity": self.polarity, "pixels": pixels}
        props = {PREFIX + "preprocessing": json.dumps(pre), PREFIX + "source": json.dumps(source)}
        if self.classes is not None:
            props[PREFIX + "classes"] = json.dumps(self.classes)
        return props

    def inputs(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N,H,W) or (N,C,H,W) -> float32 (N,C,H,W) as the model was trained on; float32 inputs (from a
        .npz of model inputs) pass as they are."""
        if pixels.dtype == np.float32:
            return pixels
        scaled: np.ndarray = pixels.astype(np.float32) / np.float32(self.divisor)
        return scaled.reshape(len(pixels), *self.input_shape)

    def class_name(self, index: int) -> str:
        return self.classes[index] if self.classes else str(index)


def card_for(classes: list[str] | None, input_shape: tuple[int, ...] = INPUT_SHAPE) -> ModelCard:
    """The card of every model edge-ft writes (one example of `input_shape`, LeNet-5's 28x28 grey by default)."""
    return ModelCard(INPUT, tuple(input_shape), PIXEL_DIVISOR, POLARITY, classes)


def model_source(bundle: Bundle, **origin: str) -> dict[str, Any]:
    """Provenance stored with a model: what trained it and from which base (no paths: the same training gives
    the same model.onnx byte for byte, wherever its run folder is)."""
    return {"method": bundle.manifest["method"], "engine": bundle.engine, "base_sha256": bundle.base_sha256,
            **origin}


def stamp_model(path: str | Path, classes: list[str] | None, source: dict[str, Any],
                input_shape: tuple[int, ...] = INPUT_SHAPE) -> None:
    """Rewrite model.onnx at `path` (atomically) with its card in metadata_props."""
    path = Path(path)
    stamped = with_metadata(path.read_bytes(), card_for(classes, input_shape).to_props(source), PREFIX, str(path))
    atomic_write_bytes(path, stamped)


def read_card(path: str | Path, metadata: dict[str, str]) -> ModelCard:
    """The card from an onnxruntime session's custom metadata map; a model without one is refused."""
    raw = metadata.get(PREFIX + "preprocessing")
    if raw is None:
        raise UserError(f"{path}: the model does not say how its input was scaled (no edge_ft.preprocessing "
                        "metadata); use a model.onnx written by `edge-ft train` or `edge-ft adapter merge`")
    try:
        pre = json.loads(raw)
        classes = json.loads(metadata[PREFIX + "classes"]) if PREFIX + "classes" in metadata else None
        card = ModelCard(str(pre["input"]), tuple(int(d) for d in pre["shape"]), float(pre["divisor"]),
                         str(pre["polarity"]), None if classes is None else [str(c) for c in classes])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: damaged edge_ft metadata ({e!r}); re-run `edge-ft train` or `adapter merge`") \
            from None
    if not card.divisor > 0:
        raise UserError(f"{path}: edge_ft.preprocessing divisor must be positive, got {card.divisor}")
    if card.polarity != POLARITY or not card.input_shape or min(card.input_shape) < 1:
        raise UserError(f"{path}: expects input {card.input_shape} {card.polarity}; this edge-ft prepares "
                        f"{POLARITY} images of a positive shape")
    return card
