"""Apply a fine-tuning method to a LeNet-5: decide what trains, wrap layers with LoRA, summarise."""

from __future__ import annotations

import torch
import torch.nn as nn

from edge_ft.architecture import trainable_names
from edge_ft.config import MethodConfig
from edge_ft.errors import UserError
from edge_ft.host.lora import LoRALinear
from edge_ft.host.model import LeNet5


def apply_method(model: LeNet5, cfg: MethodConfig, seed: int | None = None) -> LeNet5:
    """Prepare `model` (in place) for fine-tuning with `cfg` and return it.

    A head whose class count differs from cfg.num_classes is re-initialised first (seeded when `seed` is given).
    """
    if seed is not None:
        torch.manual_seed(seed)
    if model.fc3.out_features != cfg.num_classes:
        if cfg.method == "lora" and "fc3" in cfg.targets:
            raise UserError(
                f"the base model has {model.fc3.out_features} classes and the task {cfg.num_classes}: a LoRA adapter "
                "cannot adapt a freshly initialised, frozen head; train it whole with --targets fc1,fc2 "
                "--modules-to-save fc3 (the default for a new class count), or use --method probe or full"
            )
        model.fc3 = nn.Linear(model.fc3.in_features, cfg.num_classes)  # new task, new head
    if cfg.method == "lora":
        for name in cfg.targets:
            layer = getattr(model, name)
            if not isinstance(layer, LoRALinear):
                setattr(model, name, LoRALinear.from_linear(layer, cfg.rank, cfg.alpha))
    trainable = set(trainable_names(cfg))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model


def build_model(cfg: MethodConfig, base_state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> LeNet5:
    """A LeNet-5 with the base weights loaded (if given) and the method applied; deterministic in `seed`."""
    torch.manual_seed(seed)
    num_base_classes = base_state["fc3.bias"].shape[0] if base_state is not None else cfg.num_classes
    model = LeNet5(num_base_classes)
    if base_state is not None:
        model.load_state_dict(base_state)
    return apply_method(model, cfg)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trained tensors (LoRA A/B, trained biases, or the probed head): what gets shipped."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def merge_lora(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


def count_trainable(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def summary(model: nn.Module) -> str:
    """PEFT's print_trainable_parameters line."""
    trainable, total = count_trainable(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
