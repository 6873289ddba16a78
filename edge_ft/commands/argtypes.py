"""argparse value types shared by the sub-commands: one-line messages that name the bad value."""

from __future__ import annotations

import argparse
import math
import sys

from edge_ft.config import LORA_BIAS, MethodConfig, lora_layers_for, parse_targets


def int_at_least(low: int):
    """argparse type: an integer >= low (argparse prefixes the message with the option's name)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def add_lora_options(p: argparse.ArgumentParser, layers: bool = True) -> None:
    """--rank and --alpha (and, with `layers`, --targets, --modules-to-save and --bias): the same flags and
    defaults everywhere; build the MethodConfig from them with method_config()."""
    p.add_argument("--rank", type=int_at_least(1), default=2, metavar="R", help="LoRA rank r (default 2)")
    p.add_argument("--alpha", type=positive_float, default=None, metavar="A",
                   help="LoRA alpha (default 2·rank, so the scaling alpha/r is 2 at every rank)")
    if layers:
        p.add_argument("--targets", type=parse_targets, default=None, metavar="LAYERS",
                       help="LoRA target layers, comma-separated (default fc1,fc2,fc3; fc1,fc2 for a new class "
                       "count)")
        p.add_argument("--modules-to-save", type=parse_targets, default=None, metavar="LAYERS",
                       help="LoRA: layers trained whole beside the adapters, as PEFT's modules_to_save (default "
                       "none; fc3 for a new class count, whose head is freshly initialised; 'none' turns it off)")
        p.add_argument("--bias", choices=LORA_BIAS, default="none", help="LoRA bias training (default none)")


def method_config(args: argparse.Namespace, method: str, num_classes: int, base_classes: int) -> MethodConfig:
    """The MethodConfig the options describe; for LoRA on a new class count, targets and modules_to_save default
    to fc1,fc2 + fc3 (edge_ft.config.lora_layers_for), said in one line on stderr."""
    targets, saved = getattr(args, "targets", None), getattr(args, "modules_to_save", None)
    if method == "lora":
        targets, saved, note = lora_layers_for(num_classes, base_classes, targets, saved)
        if note:
            print(note, file=sys.stderr)
    layers = {k: v for k, v in (("targets", targets), ("modules_to_save", saved)) if v is not None}
    return MethodConfig(method, rank=args.rank, alpha=args.alpha, bias=args.bias, num_classes=num_classes, **layers)
