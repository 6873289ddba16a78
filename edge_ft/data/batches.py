"""Seeded batch order for an epoch, in numpy only.

The torch reference loop and the device trainer both call this, so for the same (seed, epoch) they see the very
same examples in the very same batches; that is what makes engine-parity tests meaningful.
"""

from __future__ import annotations

import numpy as np

from edge_ft.data.npz import to_float
from edge_ft.errors import UserError


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch): int64 (n,)."""
    # SeedSequence([seed, epoch]) gives independent, reproducible streams per epoch on every platform.
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def epoch_batch_indices(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[np.ndarray]:
    """The epoch's permutation cut into batches; the last one is shorter unless drop_last."""
    if batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size}")
    order = epoch_order(n, seed, epoch)
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def epoch_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int, drop_last: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """uint8 (N,28,28), int (N,) -> [(float32 (B,1,28,28), int64 (B,)), ...] in the epoch's seeded order."""
    return [
        (to_float(x[idx]), y[idx].astype(np.int64))
        for idx in epoch_batch_indices(len(x), batch_size, seed, epoch, drop_last)
    ]


def random_shifts(x: np.ndarray, max_shift: int, seed: int, epoch: int) -> np.ndarray:
    """Each image moved by a seeded random offset in [-max_shift, max_shift]^2, zero-filled: uint8 (N,28,28).

    Pretraining uses it: 4000 MNIST digits overfit a LeNet-5, small translations are the classic cure.
    """
    if max_shift <= 0:
        return x
    n, h, w = x.shape
    rng = np.random.default_rng([seed, epoch, 1])  # stream 1: independent of epoch_order's stream
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=(2, n))
    padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
    rows = (np.arange(h)[None, :] + max_shift - dy[:, None])[:, :, None]  # (N,h,1)
    cols = (np.arange(w)[None, :] + max_shift - dx[:, None])[:, None, :]  # (N,1,w)
    return padded[np.arange(n)[:, None, None], rows, cols]
