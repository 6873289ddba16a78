"""Differential privacy for the fleet: Flower's central DP with client-side fixed clipping.

What Flower's fixedclipping_mod (device) and DifferentialPrivacyClientSideFixedClipping (server) do, with Flower's
own functions (flwr.supercore.differential_privacy), applied where the fleet's update format needs them:
- the signed train config carries the clipping norm C (CLIP_KEY, the key Flower's wrapper sends);
- the device clips its update, the delta (trained tensors - the global tensors it received, all trainable tensors
  as one vector), to L2 norm C before it leaves, so the reply is the global model + the clipped delta. This is done
  in the ClientApp, not as a mod: under SecAgg+ (edge_ft.fleet.secagg) the update travels inside secaggplus_mod as a
  legacy FitRes, which Flower's mod does not read;
- the server rejects an update whose delta is longer than C (a device that did not clip; SecAgg+ hides single
  updates, so there only the aggregate is seen), averages, and adds Gaussian noise of standard deviation
  noise·C/n to every value of the average, n the number of updates averaged (Flower's compute_stdv), before the
  canary and the commit.
The noise is calibrated as Flower's: for a uniform mean. FedAvg here weighs devices by their examples, so a device
with more than its share of the examples moves the mean by more than C/n; the guarantee holds as stated for
equal partitions (quantity-skewed fleets need a larger noise multiplier). No privacy accountant is kept.
"""

from __future__ import annotations

import math

import numpy as np

from edge_ft.errors import UserError

CLIP_KEY = "clipping_norm"  # flwr.supercore.differential_privacy.KEY_CLIPPING_NORM, in the signed train config
SLACK = 1e-4  # relative: float32 rounding of global + clipped delta, read back as a delta


def check_dp(noise: float, clip: float) -> None:
    """A usable DP setting: clip 0 (off, then no noise either) or positive, noise finite and not negative."""
    if not (math.isfinite(noise) and math.isfinite(clip)) or noise < 0 or clip < 0 or (noise > 0 and clip == 0):
        raise UserError(f"DP needs a positive clipping norm and a noise multiplier >= 0, got clip {clip:g}, "
                        f"noise {noise:g}")


def clip_update(trained: dict[str, np.ndarray], start: dict[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """The trained tensors with their delta from `start` clipped to L2 norm `clip` (Flower's function)."""
    from flwr.supercore.differential_privacy import compute_clip_model_update

    names = list(trained)
    values = [np.asarray(trained[n], dtype=np.float32) for n in names]
    compute_clip_model_update(values, [np.asarray(start[n], dtype=np.float32) for n in names], clip)
    return {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, values)}


def delta_norm(update: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> float:
    """L2 norm of the update's delta from `start`, all tensors as one vector (float64)."""
    return float(np.sqrt(sum(float(np.sum((update[n].astype(np.float64) - start[n]) ** 2)) for n in update)))


def unclipped(update: dict[str, np.ndarray], start: dict[str, np.ndarray], clip: float) -> str | None:
    """Why the server refuses an update under DP (its delta is longer than the clipping norm), else None."""
    norm = delta_norm(update, start)
    return f"update norm {norm:.4g} exceeds the clipping norm {clip:g}" if norm > clip * (1 + SLACK) else None


def add_noise(tensors: dict[str, np.ndarray], noise: float, clip: float, n: int) -> tuple[dict[str, np.ndarray], float]:
    """(the average with Flower's Gaussian noise of std noise·clip/n added, that std)."""
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

    names = list(tensors)
    values = [np.array(tensors[k], dtype=np.float32) for k in names]
    std = compute_stdv(noise, clip, max(n, 1))
    add_gaussian_noise_inplace(values, std)
    return dict(zip(names, values)), std
