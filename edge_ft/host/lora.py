"""LoRA for nn.Linear, in the manner of microsoft/LoRA's loralib.

h = W0 x + b + (B A x) * alpha / r, with W0 frozen, A (r x in) Kaiming-uniform and B (out x r) zero,
so an adapted model starts out computing exactly what the base model does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float = 1.0, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r  # keeps the update's size stable when r changes
        self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
        self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
        self.weight.requires_grad = False  # the pretrained matrix never trains
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # Same as nn.Linear's default for A; B = 0 makes the adapter a no-op at step 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float) -> LoRALinear:
        """Wrap a trained nn.Linear, keeping its weights (and device/dtype)."""
        lora = cls(linear.in_features, linear.out_features, r, lora_alpha, bias=linear.bias is not None)
        lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            lora.weight.copy_(linear.weight)
            if linear.bias is not None:
                lora.bias.copy_(linear.bias)
        return lora

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def merge(self) -> None:
        """Fold B A into W0 for inference: no extra latency, but the base weights change."""
        if not self.merged:
            with torch.no_grad():
                self.weight += self.delta_weight()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)  # (B, out)
        if self.merged:
            return result
        # (B,in) @ (in,r) @ (r,out): never materialise the (out,in) update during training.
        return result + (x @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"
