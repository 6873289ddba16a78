"""argparse value types shared by the sub-commands: one-line messages that name the bad value."""

from __future__ import annotations

import argparse
import math

from edge_ft.config import LORA_BIAS, MethodConfig, MethodOptions, method_config_for, parse_targets
from edge_ft.model_desc import ModelDesc


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


def share(text: str) -> float:
    """argparse type: a share in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a share in (0, 1], got {text}")
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


def add_method_options(p: argparse.ArgumentParser) -> None:
    """--head (probe) and --last-k (last-k): what the two layer-choosing methods train."""
    p.add_argument("--head", default=None, metavar="LAYER",
                   help="probe: the linear layer that trains (default: the model's output layer, fc3 for LeNet-5)")
    p.add_argument("--last-k", type=int_at_least(1), default=1, metavar="K",
                   help="last-k: conv/linear layers, counted back from the output, trained whole with the "
                   "BatchNorms between them (default 1)")


def input_shape(text: str) -> tuple[int, ...]:
    """argparse type: 'C,H,W' -> (C, H, W) of positive integers."""
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers like 1,28,28, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers like 1,28,28, got {text!r}")
    return shape


def method_config(args: argparse.Namespace, method: str, num_classes: int, base_classes: int,
                  model: ModelDesc | None = None) -> MethodConfig:
    """The MethodConfig the command's options describe (edge_ft.config.method_config_for)."""
    return method_config_for(MethodOptions.from_args(args), method, num_classes, base_classes, model)
