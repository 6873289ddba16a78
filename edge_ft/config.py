"""Fine-tuning method configuration shared by the host (torch) and the device (numpy) halves."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("full", "probe", "lora")
LINEAR_LAYERS = ("fc1", "fc2", "fc3")
CONV_LAYERS = ("conv1", "conv2")
LAYERS = CONV_LAYERS + LINEAR_LAYERS  # in forward order
LORA_BIAS = ("none", "all", "lora_only")


def default_alpha(rank: int) -> float:
    """alpha = 2r keeps the LoRA update's scaling alpha / r at 2 for every rank (tuned in training_defaults)."""
    return 2.0 * rank


@dataclass(frozen=True)
class MethodConfig:
    method: str = "lora"  # full | probe | lora
    rank: int = 2  # LoRA rank r (lora only)
    alpha: float | None = None  # LoRA alpha; the update is scaled by alpha / r (None: default_alpha(rank))
    targets: tuple[str, ...] = LINEAR_LAYERS  # layers that get a LoRA adapter
    bias: str = "none"  # LoRA bias training: none | all | lora_only (PEFT semantics)
    num_classes: int = 10  # classes of the target task (the head is re-initialised if it changes)
    modules_to_save: tuple[str, ...] = ()  # lora only: layers trained whole beside the adapters (PEFT's name)
    freeze_lora_a: bool = False  # lora only: lora_A stays at its seeded start, only B trains (FFA-LoRA)

    def __post_init__(self):
        from edge_ft.errors import UserError

        if self.alpha is None:
            object.__setattr__(self, "alpha", default_alpha(self.rank))
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.num_classes < 2:
            raise UserError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.method == "lora":
            if self.rank < 1:
                raise UserError(f"LoRA rank must be a positive integer, got {self.rank}")
            if not self.alpha > 0:
                raise UserError(f"LoRA alpha must be positive, got {self.alpha}")
            if not self.targets:
                raise UserError("LoRA needs at least one target layer (--targets fc1,fc2,fc3)")
            bad = [t for t in self.targets if t not in LAYERS]
            if bad:
                raise UserError(f"unknown LoRA target {bad[0]!r}: choose from {', '.join(LINEAR_LAYERS)}")
            if any(t in CONV_LAYERS for t in self.targets):
                raise UserError("LoRA targets must be linear layers (fc1, fc2, fc3); conv layers are not supported")
            if self.bias not in LORA_BIAS:
                raise UserError(f"unknown LoRA bias mode {self.bias!r}: choose one of {', '.join(LORA_BIAS)}")
            bad = [m for m in self.modules_to_save if m not in LINEAR_LAYERS]
            if bad:
                raise UserError(f"unknown module to save {bad[0]!r}: choose from {', '.join(LINEAR_LAYERS)} "
                                "(--modules-to-save)")
            both = [m for m in self.modules_to_save if m in self.targets]
            if both:
                raise UserError(f"{both[0]} is both a LoRA target and a module to save: a layer either gets an "
                                "adapter or trains whole; drop it from --targets or --modules-to-save")
            # Keep layers in forward order so names and costs never depend on how the user listed them.
            object.__setattr__(self, "targets", tuple(t for t in LINEAR_LAYERS if t in self.targets))
            object.__setattr__(self, "modules_to_save", tuple(m for m in LINEAR_LAYERS if m in self.modules_to_save))
        elif self.modules_to_save:
            raise UserError(f"--modules-to-save is a LoRA option; {self.method} decides itself what trains")
        elif self.freeze_lora_a:
            raise UserError(f"freezing lora_A (FFA-LoRA) is a LoRA option; {self.method} has no lora_A")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = {"method": self.method, "num_classes": self.num_classes}
        if self.method == "lora":
            d.update(rank=self.rank, alpha=self.alpha, targets=list(self.targets), bias=self.bias)
            if self.modules_to_save:  # only when set: records of plain LoRA stay as they were
                d["modules_to_save"] = list(self.modules_to_save)
            if self.freeze_lora_a:  # likewise only when set
                d["freeze_lora_a"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        kw = dict(d)
        for key in ("targets", "modules_to_save"):  # JSON lists; dicts written before modules_to_save lack it
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)


def parse_targets(text: str) -> tuple[str, ...]:
    """'fc1,fc2' -> ('fc1', 'fc2'); 'none' or '' -> (); validation happens in MethodConfig."""
    return tuple(t.strip() for t in text.split(",") if t.strip() and t.strip().lower() != "none")


NEW_HEAD_TARGETS, NEW_HEAD_SAVED = ("fc1", "fc2"), ("fc3",)  # LoRA's default when the class count changes


def lora_layers_for(num_classes: int, base_classes: int, targets: tuple[str, ...] | None,
                    modules_to_save: tuple[str, ...] | None) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """(targets, modules_to_save, note) for LoRA; None means the user left that option unset.

    Same class count: adapters on fc1..fc3, nothing saved. A new class count gets a freshly initialised head, which
    an adapter on a frozen fc3 cannot learn, so unless told otherwise fc3 trains whole (PEFT's modules_to_save) and
    the hidden layers get adapters; `note` then says so in one line. Explicit choices are kept as given.
    """
    if num_classes == base_classes:
        return LINEAR_LAYERS if targets is None else targets, modules_to_save or (), None
    chosen = targets is not None and modules_to_save is not None
    if modules_to_save is None:
        modules_to_save = tuple(m for m in NEW_HEAD_SAVED if targets is None or m not in targets)
    if targets is None:
        targets = tuple(t for t in NEW_HEAD_TARGETS if t not in modules_to_save)
    note = None
    if not chosen and "fc3" in modules_to_save:
        adapted = ",".join(t for t in LAYERS if t in targets) or "no layer"
        note = (f"new class count ({base_classes} -> {num_classes}): LoRA on {adapted} "
                "and a new, fully trained head fc3 (modules_to_save)")
    return targets, modules_to_save, note


OPTIMIZERS = ("sgd", "sgd-momentum", "adamw")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # sgd | sgd-momentum | adamw (torch.optim semantics for each)
    lr: float = 1e-3  # learning rate at step 0 (schedules scale it)
    momentum: float = 0.9  # sgd-momentum only
    weight_decay: float = 0.01  # adamw only (decoupled), torch's default
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    eps: float = 1e-8  # adamw only

    def __post_init__(self):
        from edge_ft.errors import UserError

        if self.name not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.name!r}: choose one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")

    @property
    def state_per_param(self) -> int:
        """Optimizer state tensors kept per trainable tensor: momentum buffer, or Adam's two moments."""
        return {"sgd": 0, "sgd-momentum": 1, "adamw": 2}[self.name]

    def to_dict(self) -> dict:
        return {"name": self.name, "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "betas": list(self.betas), "eps": self.eps}
