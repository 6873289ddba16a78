"""Fine-tuning method configuration shared by the host (torch) and the device (numpy) halves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_ft.model_desc import ModelDesc, lenet5

METHODS = ("full", "probe", "lora", "bias", "last-k")
SEED_METHODS = METHODS[:3]  # the three the seed compares: analyze's and speed's default set
SAVES_MODULES = ("lora", "bias")  # methods that take PEFT's modules_to_save beside what they train
LINEAR_LAYERS = lenet5().linear_layers  # LeNet-5's, the default model: fc1, fc2, fc3
CONV_LAYERS = lenet5().layers_of("conv2d")
LAYERS = CONV_LAYERS + LINEAR_LAYERS  # in forward order
LORA_BIAS = ("none", "all", "lora_only")


def default_alpha(rank: int) -> float:
    """alpha = 2r keeps the LoRA update's scaling alpha / r at 2 for every rank (tuned in training_defaults)."""
    return 2.0 * rank


@dataclass(frozen=True)
class MethodConfig:
    method: str = "lora"  # full | probe | lora | bias | last-k
    rank: int = 2  # LoRA rank r (lora only)
    alpha: float | None = None  # LoRA alpha; the update is scaled by alpha / r (None: default_alpha(rank))
    targets: tuple[str, ...] | None = None  # layers that get a LoRA adapter (None: every linear layer)
    bias: str = "none"  # LoRA bias training: none | all | lora_only (PEFT semantics)
    num_classes: int = 10  # classes of the target task (the head is re-initialised if it changes)
    modules_to_save: tuple[str, ...] = ()  # lora, bias: layers trained whole beside the rest (PEFT's name)
    freeze_lora_a: bool = False  # lora only: lora_A stays at its seeded start, only B trains (FFA-LoRA)
    head: str | None = None  # probe: the linear layer that trains (None: the model's output layer)
    last_k: int = 1  # last-k: weight layers (conv/linear), counted back from the output, trained whole
    model: ModelDesc = field(default_factory=lenet5, repr=False)  # the network; manifests carry it as "model"

    def __post_init__(self) -> None:
        from edge_ft.errors import UserError

        model = self.model
        linear = model.linear_layers
        if self.alpha is None:
            object.__setattr__(self, "alpha", default_alpha(self.rank))
        if self.targets is None:
            object.__setattr__(self, "targets", linear)
        if self.head is None:
            object.__setattr__(self, "head", model.output)
        assert self.alpha is not None and self.targets is not None  # set just above when not given
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.num_classes < 2:
            raise UserError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.head not in linear:
            raise UserError(f"unknown head {self.head!r}: choose a linear layer of {model.name} "
                            f"({', '.join(linear)})")
        weighted = model.layers_of("conv2d", "linear")
        if self.method == "last-k" and not 1 <= self.last_k <= len(weighted):
            raise UserError(f"last_k must be between 1 and {len(weighted)} ({model.name}'s conv and linear "
                            f"layers), got {self.last_k}")
        if self.modules_to_save and self.method not in SAVES_MODULES:
            raise UserError(f"modules_to_save is an option of {' and '.join(SAVES_MODULES)}; {self.method} "
                            "decides itself what trains")
        bad = [m for m in self.modules_to_save if m not in linear]
        if bad:
            raise UserError(f"unknown module to save {bad[0]!r}: choose from {', '.join(linear)} "
                            "(modules_to_save)")
        object.__setattr__(self, "modules_to_save", tuple(m for m in linear if m in self.modules_to_save))
        if self.method == "lora":
            if self.rank < 1:
                raise UserError(f"LoRA rank must be a positive integer, got {self.rank}")
            if not self.alpha > 0:
                raise UserError(f"LoRA alpha must be positive, got {self.alpha}")
            if not self.targets:
                raise UserError(f"LoRA needs at least one target layer (targets {','.join(linear)})")
            bad = [t for t in self.targets if t not in linear]
            if any(t in model.layers_of("conv2d") for t in bad):
                raise UserError(f"LoRA targets must be linear layers ({', '.join(linear)}); conv layers are not "
                                "supported")
            if bad:
                raise UserError(f"unknown LoRA target {bad[0]!r}: choose from {', '.join(linear)}")
            if self.bias not in LORA_BIAS:
                raise UserError(f"unknown LoRA bias mode {self.bias!r}: choose one of {', '.join(LORA_BIAS)}")
            both = [m for m in self.modules_to_save if m in self.targets]
            if both:
                raise UserError(f"{both[0]} is both a LoRA target and a module to save: a layer either gets an "
                                "adapter or trains whole; drop it from targets or modules_to_save")
            # Keep layers in forward order so names and costs never depend on how the user listed them.
            object.__setattr__(self, "targets", tuple(t for t in linear if t in self.targets))
        elif self.freeze_lora_a:
            raise UserError(f"freezing lora_A (FFA-LoRA) is a LoRA option; {self.method} has no lora_A")

    @property
    def scaling(self) -> float:
        assert self.alpha is not None  # __post_init__ fills it
        return self.alpha / self.rank

    @property
    def network(self) -> ModelDesc:
        """The model as this method trains it: with a num_classes-way head."""
        return self.model.with_num_classes(self.num_classes)

    def to_dict(self) -> dict[str, Any]:
        """The method's settings (the model travels beside it, as the manifest's "model")."""
        d: dict[str, Any] = {"method": self.method, "num_classes": self.num_classes}
        if self.method == "lora":
            assert self.targets is not None  # __post_init__ fills it
            d.update(rank=self.rank, alpha=self.alpha, targets=list(self.targets), bias=self.bias)
            if self.freeze_lora_a:  # only when set: records of plain LoRA stay as they were
                d["freeze_lora_a"] = True
        if self.modules_to_save:  # only when set: records of plain LoRA stay as they were
            d["modules_to_save"] = list(self.modules_to_save)
        if self.method == "probe" and self.head != self.model.output:
            d["head"] = self.head
        if self.method == "last-k":
            d["last_k"] = self.last_k
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], model: ModelDesc | None = None) -> MethodConfig:
        kw = dict(d)
        for key in ("targets", "modules_to_save"):  # JSON lists; dicts written before modules_to_save lack it
            if key in kw:
                kw[key] = tuple(kw[key])
        extra: dict[str, Any] = {"model": model} if model is not None else {}
        return cls(**kw, **extra)


def parse_targets(text: str) -> tuple[str, ...]:
    """'fc1,fc2' -> ('fc1', 'fc2'); 'none' or '' -> (); validation happens in MethodConfig."""
    return tuple(t.strip() for t in text.split(",") if t.strip() and t.strip().lower() != "none")


def lora_layers_for(num_classes: int, base_classes: int, targets: tuple[str, ...] | None,
                    modules_to_save: tuple[str, ...] | None, model: ModelDesc | None = None,
                    ) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """(targets, modules_to_save, note) for LoRA; None means the user left that option unset.

    Same class count: adapters on every linear layer, nothing saved. A new class count gets a freshly initialised
    head, which an adapter on a frozen head cannot learn, so unless told otherwise the head trains whole (PEFT's
    modules_to_save) and the other linear layers get adapters; `note` then says so in one line. Explicit choices
    are kept as given.
    """
    model = model or lenet5()
    linear, head = model.linear_layers, model.output
    if num_classes == base_classes:
        return linear if targets is None else targets, modules_to_save or (), None
    chosen = targets is not None and modules_to_save is not None
    if modules_to_save is None:
        modules_to_save = tuple(m for m in (head,) if targets is None or m not in targets)
    if targets is None:
        targets = tuple(t for t in linear if t != head and t not in modules_to_save)
    note = None
    if not chosen and head in modules_to_save:
        adapted = ",".join(t for t in model.layers_of("conv2d", "linear") if t in targets) or "no layer"
        note = (f"new class count ({base_classes} -> {num_classes}): LoRA on {adapted} "
                f"and a new, fully trained head {head} (modules_to_save)")
    return targets, modules_to_save, note


@dataclass(frozen=True)
class MethodOptions:
    """What a user chooses about a method beyond its name (the CLI's --rank, --targets, ... options)."""

    rank: int = 2  # LoRA rank r
    alpha: float | None = None  # LoRA alpha (None: 2 x rank)
    bias: str = "none"  # LoRA bias training: none | all | lora_only
    targets: tuple[str, ...] | None = None  # LoRA target layers (None: every linear layer; not the head if new)
    modules_to_save: tuple[str, ...] | None = None  # layers trained whole beside LoRA or bias (None: a new head)
    head: str | None = None  # probe: the layer that trains (None: the model's output layer)
    last_k: int = 1  # last-k: conv/linear layers trained whole, counted back from the output

    @classmethod
    def from_args(cls, args: object) -> MethodOptions:
        """The options an argparse namespace holds; those a command does not offer keep their defaults."""
        return cls(**{f: getattr(args, f) for f in cls.__dataclass_fields__ if getattr(args, f, None) is not None})


def method_config_for(options: MethodOptions, method: str, num_classes: int, base_classes: int,
                      model: ModelDesc | None = None) -> MethodConfig:
    """The MethodConfig `options` describe for `model` (default LeNet-5); for LoRA and bias on a new class count
    the head trains whole (modules_to_save; LoRA's targets then the other linear layers, see lora_layers_for),
    said in one line on stderr."""
    import sys

    targets, saved = options.targets, options.modules_to_save
    if method == "lora":
        targets, saved, note = lora_layers_for(num_classes, base_classes, targets, saved, model)
        if note:
            print(note, file=sys.stderr)
    elif method == "bias" and saved is None and num_classes != base_classes:
        head = (model or MethodConfig().model).output
        saved = (head,)
        print(f"new class count ({base_classes} -> {num_classes}): biases and a new, fully trained head {head} "
              "(modules_to_save)", file=sys.stderr)
    if method != "lora":
        targets = None  # LoRA's option; other methods ignore it
    layers: dict[str, Any] = {k: v for k, v in (("targets", targets), ("modules_to_save", saved)) if v is not None}
    if model is not None:
        layers["model"] = model
    return MethodConfig(method, rank=options.rank, alpha=options.alpha, bias=options.bias, num_classes=num_classes,
                        head=options.head, last_k=options.last_k, **layers)


OPTIMIZERS = ("sgd", "sgd-momentum", "adamw")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # sgd | sgd-momentum | adamw (torch.optim semantics for each)
    lr: float = 1e-3  # learning rate at step 0 (schedules scale it)
    momentum: float = 0.9  # sgd-momentum only
    weight_decay: float = 0.01  # adamw only (decoupled), torch's default
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    eps: float = 1e-8  # adamw only

    def __post_init__(self) -> None:
        from edge_ft.errors import UserError

        if self.name not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.name!r}: choose one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")

    @property
    def state_per_param(self) -> int:
        """Optimizer state tensors kept per trainable tensor: momentum buffer, or Adam's two moments."""
        return {"sgd": 0, "sgd-momentum": 1, "adamw": 2}[self.name]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "betas": list(self.betas), "eps": self.eps}
