"""Make small digit images look like MNIST, in numpy only.

MNIST's recipe (LeCun et al.): size-normalise each digit to fit a 20x20 box preserving its aspect ratio, with
anti-aliasing, then place it in a 28x28 field so that its centre of mass sits at the centre. UCI digits (8x8,
values 0..16) go through the same recipe so a network pretrained on MNIST sees familiar geometry.
"""

from __future__ import annotations

import numpy as np

MNIST_SIZE = 28  # output field
MNIST_BOX = 20  # the digit's longer side after size normalisation
# Where MNIST's centre of mass lies in index coordinates: measured on the 5k subset, mean (13.99, 14.00).
MNIST_CENTRE = (14.0, 14.0)


def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a triangle (bilinear) filter, widened when shrinking so it anti-aliases."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # PIL's rule: the filter covers every input pixel an output pixel spans
    centres = (np.arange(n_out) + 0.5) * scale  # output pixel centres in input coordinates
    taps = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)  # rows sum to 1: flat regions keep their value


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float (h,w) -> float64 (height,width), separable and anti-aliased."""
    rows = _resample_matrix(image.shape[0], height)  # (height, h)
    cols = _resample_matrix(image.shape[1], width)  # (width, w)
    return rows @ image.astype(np.float64) @ cols.T


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """(row, col) of the intensity-weighted mean pixel index; the field's centre for an empty image."""
    total = float(image.sum())
    if total <= 0:
        return (image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2
    rows, cols = np.indices(image.shape)
    return float((rows * image).sum() / total), float((cols * image).sum() / total)


def mnist_style(image: np.ndarray, max_value: float) -> np.ndarray:
    """One digit, float (h,w) in 0..max_value -> uint8 (28,28) normalised the MNIST way."""
    ink = np.argwhere(image > 0)
    if len(ink) == 0:
        return np.zeros((MNIST_SIZE, MNIST_SIZE), np.uint8)
    (r0, c0), (r1, c1) = ink.min(axis=0), ink.max(axis=0) + 1
    digit = image[r0:r1, c0:c1] * (255.0 / max_value)  # crop to the ink's bounding box
    scale = MNIST_BOX / max(digit.shape)
    h, w = (max(1, round(s * scale)) for s in digit.shape)
    patch = np.clip(resize(digit, h, w), 0, 255)
    cy, cx = centre_of_mass(patch)
    # Integer shift, clipped so the whole 20x20 box stays inside the 28x28 field.
    top = int(np.clip(round(MNIST_CENTRE[0] - cy), 0, MNIST_SIZE - h))
    left = int(np.clip(round(MNIST_CENTRE[1] - cx), 0, MNIST_SIZE - w))
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float64)
    out[top : top + h, left : left + w] = patch
    return np.rint(out).astype(np.uint8)


def digits_to_mnist(images: np.ndarray, max_value: float = 16.0) -> np.ndarray:
    """UCI digits (N,8,8) in 0..16 -> uint8 (N,28,28)."""
    return np.stack([mnist_style(img, max_value) for img in images])
