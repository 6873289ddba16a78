"""Engine-vs-torch parity that holds on any CPU: every step is compared from one shared state.

Two float32 implementations of a convolution's gradient (oneDNN/ATen in torch, MLAS in onnxruntime) sum in
different orders, and the order depends on the CPU's vector width (AVX2 vs AVX-512). One step differs by ~1e-7;
a 20-step trajectory of full fine-tuning with AdamW amplifies that to 1e-2 on some hosts and not on others.
So torch is re-seeded with the engine's weights before each step: each comparison measures one step's arithmetic
(forward loss, gradient, optimizer update) and differences cannot compound. torch's optimizer keeps its own moments,
which therefore drift only by the accumulated per-step gradient rounding, not by a diverged trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class StepGaps:
    losses: list[float] = field(default_factory=list)  # engine's loss at each step
    reference: list[float] = field(default_factory=list)  # torch's loss from the same weights and batch
    update_gap: dict[str, float] = field(default_factory=dict)  # tensor -> max |w_engine - w_torch| after any step
    max_update: dict[str, float] = field(default_factory=dict)  # tensor -> largest single-step |Δw| (the scale)


def run_lockstep(engine, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, lr_at) -> StepGaps:
    """Train `engine` and `model` side by side; before each step torch takes the engine's current weights."""
    gaps = StepGaps()
    params = dict(model.named_parameters())
    for step, (x, y) in enumerate(batches):
        before = engine.parameters()
        with torch.no_grad():  # in place, so the optimizer keeps its per-parameter state
            for name, p in params.items():
                p.copy_(torch.from_numpy(before[name]))
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, _ = engine.train_step(x, y, lr)
        optimizer.zero_grad()
        ref = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        ref.backward()
        optimizer.step()
        gaps.losses.append(loss)
        gaps.reference.append(ref.item())
        after = engine.parameters()
        for name, p in params.items():
            if p.requires_grad:
                gap = float(np.abs(after[name] - p.detach().numpy()).max())
                moved = float(np.abs(after[name] - before[name]).max())
                gaps.update_gap[name] = max(gaps.update_gap.get(name, 0.0), gap)
                gaps.max_update[name] = max(gaps.max_update.get(name, 0.0), moved)
    return gaps
