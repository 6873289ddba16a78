"""Apply a fine-tuning method to a torch module: decide what trains, wrap layers with LoRA, summarise.

What trains is decided once, torch-free, by edge_ft.architecture.trainable_names over the model's description;
this module only carries it out on the module (a new head, LoRA wrappers, requires_grad flags).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edge_ft.architecture import trainable_names
from edge_ft.config import MethodConfig
from edge_ft.errors import UserError
from edge_ft.host.describe import set_submodule
from edge_ft.host.lora import LoRALinear
from edge_ft.host.model import LeNet5


def apply_method(model: nn.Module, cfg: MethodConfig, seed: int | None = None) -> nn.Module:
    """Prepare `model` (in place) for fine-tuning with `cfg` and return it; cfg.model describes `model`.

    A head whose class count differs from cfg.num_classes is re-initialised first (seeded when `seed` is given).
    """
    if seed is not None:
        torch.manual_seed(seed)
    head_name = cfg.model.output
    head = model.get_submodule(head_name)
    if head.out_features != cfg.num_classes:
        if cfg.method == "lora" and head_name in cfg.targets:
            others = ",".join(t for t in cfg.model.linear_layers if t != head_name) or "none"
            raise UserError(
                f"the base model has {head.out_features} classes and the task {cfg.num_classes}: a LoRA adapter "
                f"cannot adapt a freshly initialised, frozen head; train it whole with --targets {others} "
                f"--modules-to-save {head_name} (the default for a new class count), or use --method probe or full"
            )
        set_submodule(model, head_name, nn.Linear(head.in_features, cfg.num_classes))  # new task, new head
    if cfg.method == "lora":
        for name in cfg.targets:
            layer = model.get_submodule(name)
            if not isinstance(layer, LoRALinear):
                set_submodule(model, name, LoRALinear.from_linear(layer, cfg.rank, cfg.alpha))
    trainable = set(trainable_names(cfg))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model


def build_model(cfg: MethodConfig, base_state: dict[str, torch.Tensor] | None = None, seed: int = 0,
                make: type[nn.Module] | None = None) -> nn.Module:
    """The model with the base weights loaded (if given) and the method applied; deterministic in `seed`.

    `make()` builds the untrained network cfg.model describes (default LeNet5); its head is resized to the base's
    class count before the base weights load.
    """
    torch.manual_seed(seed)
    head = cfg.model.output
    num_base_classes = base_state[f"{head}.bias"].shape[0] if base_state is not None else cfg.num_classes
    if make is None:
        model = LeNet5(num_base_classes)
    else:
        model = make()
        layer = model.get_submodule(head)
        if layer.out_features != num_base_classes:
            set_submodule(model, head, nn.Linear(layer.in_features, num_base_classes))
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
