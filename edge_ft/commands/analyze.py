"""`edge-ft analyze`: parameters, FLOPs and memory of one training step for full, probe and LoRA, from the cost model.

Runs on a device install (no torch): everything comes from edge_ft.costmodel. The pros/cons text is built from the
numbers so it stays true when --rank, --targets, --batch, ... change; `pros_and_cons` and `recommendation` are
importable for reports.
"""

from __future__ import annotations

import json
import sys
import textwrap

from edge_ft.architecture import count_params, lowest_trainable_layer
from edge_ft.commands.argtypes import add_lora_options, add_method_options, input_shape, int_at_least
from edge_ft.config import METHODS, OPTIMIZERS, SEED_METHODS, MethodConfig, MethodOptions
from edge_ft.costmodel import DTYPES, CostEstimate, estimate, input_grad_layers, layer_macs
from edge_ft.reports.format import text_table

WIDTH = 110  # prose wraps here; tables are as wide as their columns
CHEAP_ENOUGH = 1.5  # LoRA is recommended when it costs at most this many times a probing step (FLOPs and memory)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="parameters, FLOPs and memory per training step of full, probe and LoRA (no torch needed)",
        description="Analytical cost of one training step of LeNet-5 (or --model) under full fine-tuning, linear "
        "probing and LoRA (and --methods bias, last-k), with pros and cons derived from the numbers. FLOPs follow "
        "torch.utils.flop_counter (2 x multiply-accumulates of conv and linear ops).",
    )
    p.add_argument("--model", default=None, metavar="BUNDLE|DESC.json|PKG.MODULE:CLASS|FILE.py:CLASS",
                   help="the network: a bundle folder (described as exported: its method, class count, LoRA "
                   "targets and optimizer) or a model description .json (no torch needed), or a class to trace "
                   "(host; needs --input-shape) (default: LeNet-5)")
    p.add_argument("--input-shape", type=input_shape, default=None, metavar="C,H,W",
                   help="one example's shape for a class given to --model (default: none)")
    p.add_argument("--methods", default=",".join(SEED_METHODS), metavar="M,M",
                   help=f"methods to compare, from {', '.join(METHODS)} (default {','.join(SEED_METHODS)}; full, probe "
                   "and lora are always computed for the discussion)")
    add_method_options(p)
    p.add_argument("--num-classes", type=int_at_least(2), default=None, metavar="N",
                   help="classes of the task (default: the bundle's, else the model's, 10 for LeNet-5)")
    add_lora_options(p)
    p.add_argument("--batch", type=int_at_least(1), default=32, metavar="N", help="examples per step (default 32)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="optimizer (default: the bundle's, else adamw)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="bytes per stored value (default float32)")
    p.add_argument("--per-layer", action="store_true", help="also print each method's FLOPs layer by layer")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=handler)


def handler(args) -> int:
    from edge_ft.analysis import analyze

    report = analyze(args.model, methods=args.methods.split(","), input_shape=args.input_shape,
                     num_classes=args.num_classes, batch=args.batch, optimizer=args.optimizer, dtype=args.dtype,
                     options=MethodOptions.from_args(args))
    exported, estimates = report.bundle, report.estimates
    if args.json:
        doc = to_json(estimates)
        if exported:
            doc["bundle"] = {"path": str(exported.path), "method": exported.method.method}
        print(json.dumps(doc, indent=2))
    else:
        if exported:
            print(f"{exported.path}: a {exported.method.method} bundle for {exported.num_classes} classes, "
                  "described as exported\n")
        sys.stdout.write(render(estimates, per_layer=args.per_layer))
    return 0


def to_json(estimates: dict[str, CostEstimate]) -> dict:
    lora = estimates["lora"]
    base = count_params(MethodConfig("full", num_classes=lora.config.num_classes, model=lora.config.model))
    return {
        "model": {"name": lora.config.model.title, "num_classes": lora.config.num_classes,
                  "total_params": base["total"], "description": lora.config.model.to_dict()},
        "settings": {"batch": lora.batch, "optimizer": lora.optimizer, "dtype": lora.dtype,
                     "lora": lora.config.to_dict(),
                     "flops_convention": "torch.utils.flop_counter: 2 x multiply-accumulates of conv/linear ops"},
        "methods": {name: est.to_dict() for name, est in estimates.items()},
        "pros_and_cons": pros_and_cons(estimates),
        "recommendation": recommendation(estimates),
    }


# ---------------------------------------------------------------------------------------------- formatting


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """First column left-aligned, the figures right-aligned."""
    return text_table([headers, *rows], right_aligned=True)


def _n(x: int) -> str:
    return f"{x:,}"


def _kib(nbytes: int) -> str:
    return f"{nbytes / 1024:,.1f}"


def _pct(part: float, whole: float, digits: int = 1) -> str:
    return f"{100 * part / whole:.{digits}f}%" if whole else "n/a"


def _mflops(x: int) -> str:
    return f"{x / 1e6:,.2f} MFLOPs" if x >= 1_000_000 else f"{x:,} FLOPs"


def _names(layers) -> str:
    layers = list(layers)
    return layers[0] if len(layers) == 1 else ", ".join(layers[:-1]) + " and " + layers[-1]


def _wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, WIDTH, subsequent_indent="  ", break_on_hyphens=False)


def render(estimates: dict[str, CostEstimate], per_layer: bool = False) -> str:
    full, lora = estimates["full"], estimates["lora"]
    cfg = lora.config
    base_total = full.params["total"]
    name, head = cfg.model.title, cfg.model.output
    out = [
        f"{name} fine-tuning, one training step: batch {lora.batch}, {cfg.num_classes} classes, {lora.optimizer}, "
        f"{lora.dtype}",
        f"LoRA: rank {cfg.rank}, alpha {cfg.alpha:g}, targets {','.join(cfg.targets)}, bias {cfg.bias}"
        + (f", modules_to_save {','.join(cfg.modules_to_save)}" if cfg.modules_to_save else "")
        + ". FLOPs count 2 x multiply-accumulates of conv/linear ops (torch.utils.flop_counter).",
        "",
        f"1a. Parameters ({name} has {_n(base_total)})",
        format_table(
            ["method", "trainable", f"% of {name}", "frozen", "all params"],
            [[m, _n(e.params["trainable"]), _pct(e.params["trainable"], base_total, 2), _n(e.params["frozen"]),
              _n(e.params["total"])] for m, e in estimates.items()],
        ),
        "",
        f"1b. FLOPs per training step (batch {lora.batch})",
        format_table(
            ["method", "forward", "backward input", "backward weight", "backward", "total", "vs full"],
            [[m, *(_n(e.flops[k]) for k in ("forward", "backward_input", "backward_weight", "backward", "total")),
              _pct(e.flops["total"], full.flops["total"])] for m, e in estimates.items()],
        ),
        "",
        f"1c. Memory for training (KiB, {lora.dtype})",
        format_table(
            ["method", "weights", "gradients", "optimizer state", "activations", "total", "vs full"],
            [[m, *(_kib(e.memory[k]) for k in ("weights", "gradients", "optimizer_state", "activations", "total")),
              _pct(e.memory["total"], full.memory["total"])] for m, e in estimates.items()],
        ),
    ]
    if per_layer:
        for m, e in estimates.items():
            out += ["", f"FLOPs by layer: {m}", format_table(
                ["layer", "forward", "backward input", "backward weight"],
                [[r.layer, _n(r.forward), _n(r.backward_input), _n(r.backward_weight)] for r in e.layers],
            )]
    out += ["", "2a. Pros and cons"]
    out += [_wrap(f"{m}: {text}") for m, text in pros_and_cons(estimates).items()]
    out += ["", _wrap(f"2b. {recommendation(estimates)}")]
    base_classes = cfg.model.num_classes
    if cfg.num_classes != base_classes and head in cfg.targets:
        others = ",".join(t for t in cfg.model.linear_layers if t != head)
        out += ["", _wrap(f"Note: a {base_classes}-class base model gets a fresh {cfg.num_classes}-class head, which a "
                          f"frozen {head} with an adapter cannot learn (`edge-ft finetune` refuses it); use --targets "
                          f"{others} --modules-to-save {head} for LoRA (the default for a new class count).")]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ pros and cons (2a, 2b)


def _saved_kib(est: CostEstimate, layers: tuple[str, ...]) -> int:
    """Bytes saved under these layers' names ("conv1.input", "conv1.relu", ...)."""
    return sum(b for name, b in est.saved.items() if name.rsplit(".", 1)[0] in layers)


def _state_text(est: CostEstimate) -> str:
    state = est.memory["optimizer_state"]
    return f"{_kib(state)} KiB of {est.optimizer} state" if state else f"no {est.optimizer} state"


def pros_and_cons(estimates: dict[str, CostEstimate]) -> dict[str, str]:
    """One paragraph per method whose every figure comes from the estimates."""
    full, probe, lora = estimates["full"], estimates["probe"], estimates["lora"]
    base_total = full.params["total"]
    model = lora.config.model
    name, head_name, convs = model.title, probe.config.head, model.layers_of("conv2d")
    first = model.layers_of("conv2d", "linear")[0]
    upstream = [n for n in model.layers_of("conv2d", "linear") if n != head_name]
    feature_layer = upstream[-1] if upstream else "input"
    feature_dim = model.dims(head_name)[0]
    conv_names = _names(convs) if convs else "the convolutions"
    ff, pf, lf = full.flops, probe.flops, lora.flops
    fm, pm, lm = full.memory, probe.memory, lora.memory
    texts = {}

    texts["full"] = (
        f"trains all {_n(full.params['trainable'])} parameters, so every layer, the convolutions included, can adapt "
        f"to the new task and inference costs nothing extra. It is the most expensive: a step costs "
        f"{_mflops(ff['total'])}, {ff['total'] / ff['forward']:.1f}x a forward pass, because every weight gets a "
        f"gradient ({_mflops(ff['backward_weight'])}) and every layer above {first} passes an input gradient down "
        f"({_mflops(ff['backward_input'])}). It needs {_kib(fm['total'])} KiB, {_pct(fm['activations'], fm['total'])} "
        f"of it activations kept for backward ({conv_names} alone {_kib(_saved_kib(full, convs))} KiB), "
        f"plus {_kib(fm['gradients'])} KiB of gradients and {_state_text(full)}; every task ships a whole "
        f"{_kib(fm['weights'])} KiB copy of the weights."
    )

    head = next(r for r in probe.layers if r.layer == head_name)
    cached_step = head.forward + head.backward_input + head.backward_weight
    texts["probe"] = (
        f"trains only {head_name}'s {_n(probe.params['trainable'])} parameters "
        f"({_pct(probe.params['trainable'], base_total, 2)} of {name}). "
        f"Its backward is {head_name}'s weight gradient alone "
        f"({_mflops(pf['backward'])}, {_pct(pf['backward'], ff['backward'])} of full fine-tuning's backward), so a "
        f"step costs {_mflops(pf['total'])} ({_pct(pf['total'], ff['total'])} of full), "
        f"{_pct(pf['forward'], pf['total'])} of it the frozen forward. Memory drops to {_kib(pm['total'])} KiB "
        f"({_pct(pm['total'], fm['total'])} of full): only {head_name}'s input and the log-probabilities are kept "
        f"({_kib(pm['activations'])} KiB). Since nothing below {head_name} changes, "
        f"the {feature_dim}-wide {feature_layer} features can be computed "
        f"once and cached, and a step then costs {_mflops(cached_step)}, {pf['total'] / cached_step:,.0f}x less. "
        f"The price is capacity: the features stay those of the base task, so accuracy is capped by how well they "
        f"separate the new classes."
    )

    cfg = lora.config
    grad_layers = input_grad_layers(cfg)
    lowest = lowest_trainable_layer(cfg)
    if grad_layers:
        through_frozen = sum(2 * lora.batch * layer_macs(layer, cfg.num_classes, cfg.model) for layer in grad_layers)
        backward_text = (
            f"Its backward still runs through {_names(reversed(grad_layers))} to reach {lowest} "
            f"({_mflops(lf['backward_input'])} of input gradients, {_pct(through_frozen, lf['backward_input'])} of "
            f"them through frozen weights), so a step costs "
            f"{_mflops(lf['total'])}: {_pct(lf['total'], ff['total'])} of full fine-tuning's and "
            f"{lf['total'] / pf['total']:.2f}x probing's."
        )
    else:
        backward_text = (
            f"Only {lowest} trains, so the backward stops there and a step costs {_mflops(lf['total'])}: "
            f"{_pct(lf['total'], ff['total'])} of full fine-tuning's and {lf['total'] / pf['total']:.2f}x probing's."
        )
    conv_saved = _saved_kib(lora, convs)
    act_reason = (f"a trained conv bias makes autograd keep the conv activations too ({_kib(conv_saved)} KiB)"
                  if conv_saved else "the frozen convolutions keep nothing for backward")
    biases = {"none": "", "all": " plus every bias", "lora_only": " plus their biases"}[cfg.bias]
    if cfg.modules_to_save:
        biases += f", and {_names(cfg.modules_to_save)} trained whole (PEFT's modules_to_save)"
    adapter_bytes = lm["gradients"]  # the trained tensors are exactly what a task ships
    conv_forward = sum(r.forward for r in full.layers if r.layer in convs)
    texts["lora"] = (
        f"trains {_n(lora.params['trainable'])} parameters ({_pct(lora.params['trainable'], base_total, 2)} of "
        f"{name}; {lora.params['trainable'] / lora.params['total']:.2%} of all {_n(lora.params['total'])} with the "
        f"adapters, as PEFT reports it): rank-{cfg.rank} adapters on {_names(cfg.targets)}{biases}. {backward_text} "
        f"Gradients and optimizer state shrink to {_kib(lm['gradients'] + lm['optimizer_state'])} KiB (full: "
        f"{_kib(fm['gradients'] + fm['optimizer_state'])} KiB) and activations to {_kib(lm['activations'])} KiB, "
        f"because {act_reason}; in all {_kib(lm['total'])} KiB, {_pct(lm['total'], fm['total'])} of full. The "
        f"unmerged adapters add {_mflops(lf['forward'] - ff['forward'])} to each forward "
        f"({_pct(lf['forward'] - ff['forward'], ff['forward'])}), which merging removes for inference, and a task "
        f"ships a {_kib(adapter_bytes)} KiB adapter instead of a model. The convolution weights, "
        f"{_pct(conv_forward, ff['forward'])} of the forward FLOPs, stay frozen, and rank {cfg.rank} bounds how far "
        f"the adapted layers can move."
    )
    return texts


def _lora_cost_driver(lora: CostEstimate) -> str:
    if _saved_kib(lora, lora.config.model.layers_of("conv2d")):
        return ("here most of its cost comes from the trained conv biases (--bias all), which pull the backward "
                "down to conv2 and keep the conv activations; --bias none or lora_only avoids that")
    return f"a smaller rank than {lora.config.rank} or fewer targets brings its cost closer to probing's"


def cached_comparison(probe: CostEstimate, lora: CostEstimate) -> str:
    """The same two methods with the frozen prefix cached, as edge-ft train runs them where it pays."""
    p, lo = (estimate(e.config, e.batch, e.optimizer, e.dtype, cached=True).flops["total"] for e in (probe, lora))
    return (f"With the frozen prefix cached (`edge-ft train` does it where it pays), both steps shed the frozen "
            f"forward: LoRA's costs {_mflops(lo)} against probing's {_mflops(p)}, {lo / p:.0f}x, and "
            f"{lora.flops['total'] / lo:.0f}x less than uncached; on a board the step's fixed cost narrows that ratio "
            "(`edge-ft bench --methods probe-cached,lora-cached` measures it, `edge-ft recommend` weighs it).")


def recommendation(estimates: dict[str, CostEstimate]) -> str:
    """Seed question 2b from the numbers: LoRA if it costs at most CHEAP_ENOUGH x probing, else probing."""
    full, probe, lora = estimates["full"], estimates["probe"], estimates["lora"]
    flops_ratio = lora.flops["total"] / probe.flops["total"]
    memory_ratio = lora.memory["total"] / probe.memory["total"]
    question = "Limited compute and memory but reasonable accuracy: "
    measured = f"{cached_comparison(probe, lora)} Measured accuracies: `edge-ft finetune --all`, then `edge-ft report`."
    if flops_ratio <= CHEAP_ENOUGH and memory_ratio <= CHEAP_ENOUGH:
        return (
            f"{question}LoRA. A LoRA step costs {flops_ratio:.2f}x a probing step in FLOPs and {memory_ratio:.2f}x "
            f"in memory ({_pct(lora.flops['total'], full.flops['total'])} and "
            f"{_pct(lora.memory['total'], full.memory['total'])} of full fine-tuning), yet it adapts "
            f"{_n(lora.params['trainable'])} parameters in {_names(lora.config.targets)} where probing can only move "
            f"the head, so it can reshape the features probing must take as they are. Full fine-tuning costs "
            f"{full.flops['total'] / lora.flops['total']:.1f}x LoRA's FLOPs and "
            f"{full.memory['total'] / lora.memory['total']:.1f}x its memory. {measured}"
        )
    return (
        f"{question}linear probing. Here LoRA costs {flops_ratio:.2f}x a probing step in FLOPs and "
        f"{memory_ratio:.2f}x in memory, more than the {CHEAP_ENOUGH}x this advice allows, while probing needs "
        f"{_pct(probe.flops['total'], full.flops['total'])} of full fine-tuning's FLOPs and "
        f"{_pct(probe.memory['total'], full.memory['total'])} of its memory (less with cached features). "
        f"If its accuracy falls short, LoRA is the next step; {_lora_cost_driver(lora)}. {measured}"
    )
