"""What a method costs on a network, from the cost model: the library half of `edge-ft analyze` (no torch needed).

    from edge_ft.analysis import analyze
    report = analyze("export/lora-r2-ort-step")           # a bundle, described as exported
    report.estimates["lora"].flops["total"]              # FLOPs per training step, also params and memory
    analyze(methods=("full", "probe", "lora", "bias"), batch=64)   # LeNet-5 by default

A bundle folder or a model description .json is read without torch; a class (`PKG.MODULE:CLASS`) is traced on the
host and needs `input_shape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_ft.config import METHODS, SEED_METHODS, MethodConfig, MethodOptions, method_config_for
from edge_ft.costmodel import CostEstimate, estimate, estimate_all
from edge_ft.errors import UserError
from edge_ft.model_desc import ModelDesc, lenet5

if TYPE_CHECKING:
    from edge_ft.device.bundle import Bundle


@dataclass(frozen=True)
class Analysis:
    """The cost estimates of one network under each method."""

    model: ModelDesc  # the network described
    estimates: dict[str, CostEstimate]  # method -> its estimate (full, probe and lora always, then those asked for)
    bundle: Bundle | None  # the bundle analysed as exported, when `model` was a bundle folder


def load_model(spec: str | Path | None, shape: tuple[int, ...] | None) -> tuple[ModelDesc, Bundle | None]:
    """(description, the Bundle when `spec` is a bundle folder): a bundle folder or description .json read without
    torch, a class traced on the host, or LeNet-5 when neither is given."""
    from edge_ft.checkpoint import load_json_object

    if spec is None and shape is None:
        return lenet5(), None
    if spec is not None and Path(spec).is_dir():
        from edge_ft.device.bundle import load_bundle

        bundle = load_bundle(spec, verify=False)
        return bundle.model or lenet5(), bundle
    if spec is not None and str(spec).endswith(".json"):
        return ModelDesc.from_dict(load_json_object(spec, "a model description", "write it with `edge-ft export`"),
                                   str(spec)), None
    from edge_ft.errors import require_host

    require_host("analysing a model class")
    from edge_ft.host.describe import host_model

    return host_model(None if spec is None else str(spec), shape).desc, None


def method_configs(options: MethodOptions, model: ModelDesc, exported: Bundle | None, methods: list[str],
                   num_classes: int | None) -> dict[str, MethodConfig]:
    """The MethodConfig of LoRA and of every method asked for beyond full and probe (estimate_all's own); a
    bundle's method is taken as exported, and the others are sized for its class count."""
    classes = num_classes or model.num_classes
    if exported:
        if num_classes and num_classes != exported.num_classes:
            raise UserError(f"--num-classes {num_classes}: {exported.path} was exported for "
                            f"{exported.num_classes} classes; drop --num-classes to describe it")
        classes = exported.num_classes
    own = exported.method if exported else None
    configs = {"lora": own if own and own.method == "lora" else
               method_config_for(options, "lora", classes, model.num_classes, model)}
    for method in [*methods, *([own.method] if own else [])]:
        if own and method == own.method:
            configs[method] = own
        elif method not in ("full", "probe", "lora"):
            configs[method] = method_config_for(options, method, classes, model.num_classes, model)
    return configs


def analyze(model: str | Path | None = None, *, methods: tuple[str, ...] | list[str] = SEED_METHODS,
            input_shape: tuple[int, ...] | None = None, num_classes: int | None = None, batch: int = 32,
            optimizer: str | None = None, dtype: str = "float32",
            options: MethodOptions = MethodOptions()) -> Analysis:
    """Parameters, FLOPs and training memory of one step under each method, as `edge-ft analyze` prints them.

    Args:
        model: a bundle folder (described as exported: its method, class count, targets, optimizer), a model
            description .json, a class `PKG.MODULE:CLASS` or `FILE.py:CLASS` (host; needs input_shape), or None
            for LeNet-5.
        methods: methods to estimate beside full, probe and lora, from edge_ft.config.METHODS.
        input_shape: one example's shape, for a class.
        num_classes: classes of the task (default: the bundle's, else the model's).
        batch: examples per step.
        optimizer: sgd, sgd-momentum or adamw (default: the bundle's, else adamw).
        dtype: bytes per stored value: float32, float16 or bfloat16.
        options: the methods' settings (LoRA rank, targets, last-k's K, ...).

    Raises:
        UserError: an unknown method, a damaged bundle or description, or a class count a bundle was not made for.
    """
    desc, exported = load_model(model, input_shape)
    methods = [m.strip() for m in methods if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: unknown method {bad[0] if bad else '(none)'!r}; choose from {', '.join(METHODS)}")
    opt = optimizer or (exported.optimizer if exported else "adamw")
    configs = method_configs(options, desc, exported, methods, num_classes)
    estimates = estimate_all(configs.pop("lora"), batch, opt, dtype)
    for method, cfg in configs.items():
        estimates[method] = estimate(cfg, batch, opt, dtype)
    if exported:
        methods = [*methods, exported.method.method]
    ordered = {m: estimates[m] for m in [*SEED_METHODS, *methods] if m in estimates}
    return Analysis(desc, ordered, exported)
