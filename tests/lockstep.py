"""Engine-vs-torch parity that holds on any CPU: every step is compared from one shared state.

Two float32 implementations of a convolution's gradient (oneDNN/ATen in torch, MLAS in onnxruntime) sum in
different orders, and the order depends on the CPU's vector width (AVX2 vs AVX-512). One step differs by ~1e-7;
a 20-step trajectory of full fine-tuning with AdamW amplifies that to 1e-2 on some hosts and not on others.
So torch is re-seeded with the engine's weights before each step: each comparison measures one step's arithmetic
(forward loss, gradient, optimizer update) and differences cannot compound. torch's optimizer keeps its own moments,
which therefore drift only by the accumulated per-step gradient rounding, not by a diverged trajectory.

How far two correct float32 sums of the same n terms may differ is set by the terms, not by the result: each is
within γ·Σ|t| of the exact sum, γ = ⌈log2 n⌉·u for pairwise or vector-lane summation (u = 2^-24). A bias gradient
of 25,088 terms that nearly cancel has a result far smaller than Σ|t|, so a tolerance relative to the result fails
a correct program on a CPU that sums in another order. `rounding` below is that bound, per element of every
trainable tensor: Σ|t| is the gradient of the layer evaluated on absolute values (|x|, |W|, |upstream gradient|),
the gradient's bound is carried through the optimizer's own recurrences (momentum, Adam's moments) to the update,
and the stored weight's own roundings (half an ulp each, in each implementation) are added.
Tests compare each step's weight gap with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

UNIT_ROUNDOFF = 2.0 ** -24  # float32


@dataclass
class StepGaps:
    losses: list[float] = field(default_factory=list)  # engine's loss at each step
    reference: list[float] = field(default_factory=list)  # torch's loss from the same weights and batch
    update_gap: dict[str, float] = field(default_factory=dict)  # tensor -> max |w_engine - w_torch| after any step
    max_update: dict[str, float] = field(default_factory=dict)  # tensor -> largest single-step |Δw| (the scale)
    # tensor -> max over steps and elements of (|w_engine - w_torch| - the rounding bound), at least 0: what the
    # summation order cannot explain; tests bound it relative to max_update (forward and upstream rounding).
    excess: dict[str, float] = field(default_factory=dict)
    rounding: dict[str, float] = field(default_factory=dict)  # tensor -> largest rounding bound met (for messages)
    kinks: int = 0  # ReLU inputs met within rounding of zero, over all steps

    def check(self, rtol: float) -> None:
        """Every tensor's gap beyond the summation bound is within `rtol` of its largest single-step change."""
        for name, excess in self.excess.items():
            assert excess <= rtol * self.max_update[name], (
                name, f"gap {self.update_gap[name]:.3g}", f"rounding bound {self.rounding[name]:.3g}",
                f"excess {excess:.3g}", f"allowed {rtol * self.max_update[name]:.3g}")


class _Terms:
    """Σ|t| of every trainable tensor's gradient, per element, from hooks on the layers that own them."""

    def __init__(self, model: nn.Module):
        self.owners = {name: m for name, m in model.named_modules()
                       if any(p.requires_grad for p in m.parameters(recurse=False))}
        self.inputs: dict[str, torch.Tensor] = {}
        self.upstream: dict[str, torch.Tensor] = {}
        for name, module in self.owners.items():
            module.register_forward_hook(self._keep(name))

    def _keep(self, name):
        def hook(module, args, output):  # the layer's input now, the gradient reaching its output in backward
            self.inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: self.upstream.__setitem__(name, g.detach()))
        return hook

    def bounds(self) -> dict[str, torch.Tensor]:
        """Parameter name -> γ_n · Σ|t| (float64), for the step whose forward and backward just ran."""
        out = {}
        for name, module in self.owners.items():
            x, g = self.inputs[name].double(), self.upstream[name].double().abs()
            terms = max(g.numel() // g.shape[1], 2) if g.dim() > 1 else 2  # batch (x positions) per output
            gamma = math.ceil(math.log2(terms)) * UNIT_ROUNDOFF
            for pname, a in _abs_gradient(module, x, g).items():
                out[f"{name}.{pname}" if name else pname] = gamma * a
        return out


def _abs_gradient(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ|t| for each trainable tensor of `module` (input x, |upstream gradient| g): the layer's gradient with every
    factor taken by magnitude."""
    trainable = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # eval mode: y = x̂ w + b, x̂ from frozen statistics
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = ((x - module.running_mean.double().view(shape))
                 / torch.sqrt(module.running_var.double().view(shape) + module.eps))
        axes = [0, *range(2, x.dim())]
        found = {"weight": (g * x_hat.abs()).sum(axes), "bias": g.sum(axes)}
        return {n: found[n] for n in trainable}
    if not isinstance(module, (nn.Linear, nn.Conv2d)):  # LoRALinear is an nn.Linear
        raise TypeError(f"no rounding bound for trainable tensors of {type(module).__name__}")
    absolute = {n: p.detach().double().abs().requires_grad_(n in trainable)
                for n, p in module.named_parameters(recurse=False)}
    y = torch.func.functional_call(module, absolute, (x.abs(),))  # multilinear in (x, weights): all terms positive
    grads = torch.autograd.grad(y, [absolute[n] for n in trainable], grad_outputs=g)
    return dict(zip(trainable, grads))


class _Kinks:
    """ReLU inputs within rounding of zero, and how much the gradient moves when each is taken the other way."""

    MAX = 16  # more ambiguous kinks than this in one batch means the inputs are degenerate, not unlucky

    def __init__(self, model: nn.Module, trainable: dict[str, torch.Tensor]):
        self.model, self.trainable = model, trainable
        self.relus = {n: m for n, m in model.named_modules() if type(m) is nn.ReLU}

    def _run(self, x: torch.Tensor, hooks: dict[nn.Module, object]) -> torch.Tensor:
        handles = [m.register_forward_hook(h) for m, h in hooks.items()]
        try:
            return self.model(x)
        finally:
            for h in handles:
                h.remove()

    def ambiguous(self, x: np.ndarray) -> list[tuple[str, int]]:
        """(ReLU name, flat index) of every input whose sign the float32 rounding of the sums below can flip.

        A ReLU fed straight by a Linear/Conv2d (through a frozen BatchNorm or not) gets that sum's Σ|t|, times
        the roundings every sum up to it may have made in both implementations (Σ 2⌈log2 fan-in⌉)."""
        scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(activation) -> (activation, its bound)

        def bound_of(t: torch.Tensor) -> torch.Tensor | None:
            held = scales.get(id(t))  # the activation is held, so its id is never reused within this pass
            return held[1] if held is not None and held[0] is t else None

        depth, found, busy = [0], [], []

        def layer(module, args, output):
            if busy:  # the absolute-value call below runs this module's forward (and so this hook) again
                return
            depth[0] += 2 * math.ceil(math.log2(max(module.weight[0].numel(), 2)))
            magnitudes = {n: p.detach().double().abs() for n, p in module.named_parameters(recurse=False)}
            busy.append(module)
            terms = torch.func.functional_call(module, magnitudes, (args[0].double().abs(),))
            busy.pop()
            scales[id(output)] = (output, depth[0] * UNIT_ROUNDOFF * terms)

        def batchnorm(module, args, output):
            below = bound_of(args[0])
            if below is not None:
                shape = (1, -1) + (1,) * (args[0].dim() - 2)
                gain = (module.weight.abs() / torch.sqrt(module.running_var + module.eps)).double().view(shape)
                mean = module.running_mean.double().abs().view(shape)
                scales[id(output)] = (output, (below + depth[0] * UNIT_ROUNDOFF * mean) * gain)

        def relu(name):
            def hook(module, args, output):
                below = bound_of(args[0])
                if below is not None:
                    near = (args[0].double().abs() < below).flatten().nonzero().flatten()
                    found.extend((name, int(i)) for i in near)
            return hook

        hooks = {m: layer for m in self.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        hooks |= {m: batchnorm for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        hooks |= {m: relu(n) for n, m in self.relus.items()}
        with torch.no_grad():
            self._run(torch.from_numpy(x), hooks)
        assert len(found) <= self.MAX, f"{len(found)} ReLU inputs within rounding of zero in one batch"
        return found

    def moves(self, x: np.ndarray, y: np.ndarray, found: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """Σ over ambiguous inputs of |gradient with that input taken the other way - gradient as torch took it|."""
        total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in self.trainable.items()}
        base = self._grads(x, y, {})
        for name, index in found:
            flipped = self._grads(x, y, {self.relus[name]: _flip(index)})
            for n in total:
                total[n] += (flipped[n] - base[n]).abs()
        return total

    def _grads(self, x, y, hooks) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(self._run(torch.from_numpy(x), hooks), torch.from_numpy(y))
        grads = torch.autograd.grad(loss, list(self.trainable.values()))
        return {n: g.double() for n, g in zip(self.trainable, grads)}


def _flip(index: int):
    def hook(module, args, output):  # the one input taken the other way: passed through if it was cut, else cut
        z, out = args[0].flatten(), output.flatten().clone()
        out[index] = z[index] if out[index] == 0 else 0 * z[index]
        return out.view_as(output)
    return hook


class _UpdateBound:
    """Carries each step's gradient bound through the optimizer's recurrences to a bound on the weight update."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, name: str, p: torch.Tensor, dg: torch.Tensor, lr: float) -> torch.Tensor:
        group = next(gr for gr in self.optimizer.param_groups if any(q is p for q in gr["params"]))
        state = self.optimizer.state[p]
        dm, dv = self.moments.get(name, (torch.zeros_like(dg), torch.zeros_like(dg)))
        if "exp_avg" in state:  # Adam(W): u = lr m̂ / (sqrt(v̂) + eps)
            b1, b2 = group["betas"]
            t = float(state["step"])
            g = p.grad.detach().double().abs()
            dm, dv = b1 * dm + (1 - b1) * dg, b2 * dv + (1 - b2) * (2 * g * dg + dg * dg)
            m_hat = state["exp_avg"].double().abs() / (1 - b1 ** t)
            v_hat, dv_hat = state["exp_avg_sq"].double() / (1 - b2 ** t), dv / (1 - b2 ** t)
            s = v_hat.sqrt()
            denominator = s + group["eps"]
            du = lr * (dm / (1 - b1 ** t) / denominator
                       + m_hat * dv_hat / (2 * s.clamp_min(group["eps"]) * denominator ** 2))
        else:  # SGD, with or without momentum: u = lr (μ v + g)
            dm = group["momentum"] * dm + dg
            du = lr * dm
        self.moments[name] = (dm, dv)
        return du

    def stores(self, p: torch.Tensor) -> int:
        """Roundings of the stored weight in one step, both implementations: w - u (SGD); AdamW decays w first."""
        return 2 * (2 if "exp_avg" in self.optimizer.state[p] else 1)


def run_lockstep(engine, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, lr_at) -> StepGaps:
    """Train `engine` and `model` side by side; before each step torch takes the engine's current weights."""
    gaps = StepGaps()
    params = dict(model.named_parameters())
    terms, update_bound = _Terms(model), _UpdateBound(optimizer)
    kinks = _Kinks(model, {n: p for n, p in params.items() if p.requires_grad})
    for step, (x, y) in enumerate(batches):
        before = engine.parameters()
        with torch.no_grad():  # in place, so the optimizer keeps its per-parameter state
            for name, p in params.items():
                p.copy_(torch.from_numpy(before[name]))
        found = kinks.ambiguous(x)  # from the weights both sides start the step with
        kink_moves = kinks.moves(x, y, found) if found else {}
        gaps.kinks += len(found)
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
        after, grad_bounds = engine.parameters(), terms.bounds()
        for name, moved in kink_moves.items():
            grad_bounds[name] = grad_bounds[name] + moved
        for name, p in params.items():
            if p.requires_grad:
                ours, theirs = after[name], p.detach().numpy()
                bound = update_bound.step(name, p, grad_bounds[name], lr).numpy()
                bound = bound + update_bound.stores(p) * UNIT_ROUNDOFF * np.maximum(np.abs(ours), np.abs(theirs))
                gap = np.abs(ours - theirs)
                moved = float(np.abs(ours - before[name]).max())
                gaps.update_gap[name] = max(gaps.update_gap.get(name, 0.0), float(gap.max()))
                gaps.max_update[name] = max(gaps.max_update.get(name, 0.0), moved)
                gaps.excess[name] = max(gaps.excess.get(name, 0.0), float((gap - bound).max()))
                gaps.rounding[name] = max(gaps.rounding.get(name, 0.0), float(bound.max()))
    return gaps
