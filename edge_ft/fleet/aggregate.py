"""LoRA under federated averaging: what FedAvg averages, and how far that is from averaging the updates.

A LoRA layer's update is ΔW = s·B·A (s = alpha / r). FedAvg averages A and B separately (what FlowerTune does), so
the global model gets s·mean(B)·mean(A), which is not the mean of the devices' updates s·mean(B·A): the cross terms
of the devices' differences are lost or invented. Two aggregations are offered:

  fedavg  every trainable tensor averaged, weighted by examples (full, probe, and LoRA's A and B)
  ffa     FFA-LoRA (Sun et al., 2024): lora_A frozen at its seeded start, shared by every device (the bundle is
          exported with MethodConfig.freeze_lora_a), only B trains; mean(B)·A == mean(B·A) exactly, so the
          average of the updates is what the global model gets.
product_gap() measures the difference for a round's replies; the server records it for every LoRA round.
"""

from __future__ import annotations

import numpy as np

from edge_ft.errors import UserError

AGGREGATIONS = ("fedavg", "ffa")


def check_aggregation(aggregation: str, method: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise UserError(f"unknown aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    if aggregation == "ffa" and method != "lora":
        raise UserError(f"aggregation ffa freezes LoRA's A matrices; method {method} has none (use fedavg)")


def weighted_mean(tensors: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Example-weighted average of each tensor (float64 accumulation): FedAvg's arithmetic."""
    total = float(sum(weights))
    return {name: sum(t[name].astype(np.float64) * (w / total) for t, w in zip(tensors, weights))
            for name in tensors[0]}


def lora_products(tensors: dict[str, np.ndarray], frozen: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per adapted layer, B·A in float64 (A from `frozen` when it does not travel, as under FFA)."""
    both = {**(frozen or {}), **tensors}
    layers = sorted(n.split(".")[0] for n in both if n.endswith(".lora_B"))
    return {layer: both[f"{layer}.lora_B"].astype(np.float64) @ both[f"{layer}.lora_A"].astype(np.float64)
            for layer in layers}


def product_gap(clients: list[dict[str, np.ndarray]], weights: list[float],
                frozen: dict[str, np.ndarray] | None = None) -> float:
    """‖mean(B)·mean(A) − mean(B·A)‖ / ‖mean(B·A)‖ (Frobenius, over all adapted layers): 0 when exact."""
    averaged = lora_products(weighted_mean(clients, weights), frozen)
    products = [lora_products(c, frozen) for c in clients]
    exact = weighted_mean(products, weights)
    diff = sum(float(np.sum((averaged[k] - exact[k]) ** 2)) for k in exact)
    norm = sum(float(np.sum(exact[k] ** 2)) for k in exact)
    return float(np.sqrt(diff / norm)) if norm > 0 else 0.0
