"""argparse value types shared by the sub-commands: one-line messages that name the bad value."""

from __future__ import annotations

import argparse
import math

from edge_ft.config import LINEAR_LAYERS, LORA_BIAS, parse_targets


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
    """--rank and --alpha (and, with `layers`, --targets and --bias): the same flags and defaults everywhere."""
    p.add_argument("--rank", type=int_at_least(1), default=2, metavar="R", help="LoRA rank r (default 2)")
    p.add_argument("--alpha", type=positive_float, default=None, metavar="A",
                   help="LoRA alpha (default 2·rank, so the scaling alpha/r is 2 at every rank)")
    if layers:
        p.add_argument("--targets", type=parse_targets, default=LINEAR_LAYERS, metavar="LAYERS",
                       help="LoRA target layers, comma-separated (default fc1,fc2,fc3)")
        p.add_argument("--bias", choices=LORA_BIAS, default="none", help="LoRA bias training (default none)")
