"""Classify images or a .npz with a trained model.onnx, applying the preprocessing the model says it needs.

    model = open_model("runs/lora")                # a run folder or a .onnx file; refuses one without a card
    batch = gather_inputs(["photos/", "a.png"])    # images (pillow) or one .npz; labels when they are known
    probs = model.probabilities(batch.pixels)      # (N, C) softmax
    rows = top_k(probs, 2, model.card.classes, batch.names, batch.labels)
Torch- and onnx-free: numpy, onnxruntime and, for image files, pillow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ft.contracts import MANIFEST
from edge_ft.data.npz import LENET5_INPUT
from edge_ft.device.inference import EVAL_BATCH
from edge_ft.device.model_card import ModelCard, read_card
from edge_ft.device.ort_api import inference_session
from edge_ft.errors import UserError

MODEL_FILE = "model.onnx"  # what `edge-ft train` writes into a run folder


@dataclass
class Model:
    path: Path  # the .onnx file
    card: ModelCard  # input name, shape, scaling, class names
    session: object  # onnxruntime.InferenceSession

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels (uint8 (N,H,W) or (N,C,H,W)) or float32 inputs -> float32 (N,C) class probabilities."""
        logits = [self.session.run(None, {self.card.input_name: self.card.inputs(pixels[i : i + EVAL_BATCH])})[0]
                  for i in range(0, len(pixels), EVAL_BATCH)]
        return softmax(np.concatenate(logits))


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits -> float32 (N, C) class probabilities."""
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Prediction:
    """One input's most probable classes."""

    input: str  # the image path, "FILE.npz[i]" or "x[i]"
    label: str | None  # its true class name when known (a class folder, a .npz's y)
    top: list[tuple[str, int, float]]  # (class name, index, probability), most probable first

    @property
    def name(self) -> str:
        """The most probable class's name."""
        return self.top[0][0]

    @property
    def correct(self) -> bool | None:
        """Whether the most probable class is the known label (None when the label is unknown)."""
        return None if self.label is None else self.name == self.label

    def to_dict(self) -> dict:
        """As `edge-ft predict --json` prints it."""
        return {"input": self.input, "label": self.label,
                "top": [{"class": c, "index": i, "probability": round(p, 6)} for c, i, p in self.top]}


def top_k(probs: np.ndarray, k: int, classes: list[str] | None, names: list[str],
          labels: list[str | None]) -> list[Prediction]:
    """The `k` most probable classes of every row of `probs` (ties keep class order)."""
    if k < 1:
        raise UserError(f"top-k must be at least 1, got {k}")
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [Prediction(name, label, [(classes[c] if classes else str(c), int(c), float(p[c])) for c in row])
            for name, label, p, row in zip(names, labels, probs, order)]


@dataclass
class Inputs:
    names: list[str]  # one per example: the image path, or "FILE.npz[i]"
    pixels: np.ndarray  # uint8 (N,H,W) / (N,C,H,W) white on black, or float32 model inputs from a .npz
    labels: list[str | None]  # the true class name when known (an npz's y, or an image's class folder)


def open_model(path: str | Path, threads: int = 0) -> Model:
    """A model.onnx (or a run folder holding one) with its edge-ft card; anything else is one clear line."""
    path = Path(path)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            raise UserError(f"{path}: is a bundle (the untrained starting point); predict with the model.onnx of "
                            "a run (`edge-ft train --out RUN`) or of `edge-ft adapter merge`")
        if not (path / MODEL_FILE).is_file():
            raise UserError(f"{path}: holds no {MODEL_FILE}; pass a run folder of `edge-ft train` or a .onnx file")
        path = path / MODEL_FILE
    elif not path.is_file():
        raise UserError(f"{path}: no such model file or run folder")
    session = inference_session(path, threads)
    card = read_card(path, session.get_modelmeta().custom_metadata_map)
    inputs = [i.name for i in session.get_inputs()]
    if inputs != [card.input_name]:
        raise UserError(f"{path}: graph inputs {inputs} differ from its card's {card.input_name!r}")
    outputs = session.get_outputs()[0].shape
    if card.classes is not None and outputs[-1] != len(card.classes):
        raise UserError(f"{path}: {outputs[-1]} outputs but {len(card.classes)} class names in its card")
    return Model(path, card, session)


def gather_inputs(items: list[str | Path], classes: list[str] | None,
                  input_shape: tuple[int, ...] = LENET5_INPUT) -> Inputs:
    """Image files, folders of images (searched recursively; a parent folder named like a class is its label)
    or a single .npz (its y, named by `classes`, are the labels), for a model taking `input_shape`."""
    paths = [Path(p) for p in items]
    npz = [p for p in paths if p.suffix == ".npz"]
    if npz:
        if len(paths) > 1:
            raise UserError(f"{npz[0]}: give one .npz alone, not mixed with other inputs")
        return _npz_inputs(npz[0], classes, input_shape)
    if tuple(input_shape) != LENET5_INPUT:
        raise UserError(f"{paths[0]}: image files are read as 28x28 grey; this model takes {list(input_shape)}: "
                        "give its inputs as one .npz (x uint8 or float32 (N,C,H,W))")
    from edge_ft.data.readers import IMAGE_SUFFIXES, read_image

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise UserError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such image, folder or .npz")
    known = set(classes or ())
    return Inputs([str(f) for f in files], np.stack([read_image(f) for f in files]),
                  [f.parent.name if f.parent.name in known else None for f in files])


def _npz_inputs(path: Path, classes: list[str] | None, input_shape: tuple[int, ...]) -> Inputs:
    from edge_ft.data.npz import load_labelled_npz

    x, y, named = load_labelled_npz(path, input_shape=input_shape)
    if named is not None and classes is not None and named != classes:
        raise UserError(f"{path}: names its classes {', '.join(named)}; the model's are {', '.join(classes)}")
    names = classes or named
    labels = [names[int(v)] if names and v < len(names) else str(int(v)) for v in y]
    return Inputs([f"{path}[{i}]" for i in range(len(x))], x, labels)
