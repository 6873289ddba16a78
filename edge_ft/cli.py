"""The `edge-ft` command line.

Each sub-command lives in edge_ft/commands/<name>.py with a `register(subparsers)` function. Command modules
import only the standard library and torch-free parts of edge_ft at module level, so device commands
(`train`, `adapter`, `analyze`, ...) run on a device-only install; host commands import torch inside their handler.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from edge_ft import __version__
from edge_ft.errors import UserError

# Order here is the order in `edge-ft --help`.
COMMAND_MODULES = [
    "data",
    "pretrain",
    "finetune",
    "analyze",
    "export",
    "train",
    "adapter",
    "keys",
    "deploy",
    "predict",
    "profile",
    "bench",
    "gate",
    "speed",
    "report",
    "recommend",
    "fleet",
    "demo",
]


class DefaultsFormatter(argparse.HelpFormatter):
    """Show an option's real default unless its help already says it; never "(default: None)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings or action.required
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; a user needs only the line naming the option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="edge-ft",
        description="Measure and run full fine-tuning, linear probing and LoRA of LeNet-5 on the device.",
    )
    parser.add_argument("--version", action="version", version=f"edge-ft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"edge_ft.commands.{name}").register(sub)
    _name_each_parser(parser)
    return parser


def _name_each_parser(parser: argparse.ArgumentParser) -> None:
    """Every parser stores its own prog ("edge-ft adapter merge") as args.prog_name, the innermost one winning, so
    an error names the action that failed, not only its command."""
    parser.set_defaults(prog_name=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _name_each_parser(sub)


def main(argv: list[str] | None = None) -> int:
    from edge_ft.emulation import lifetime

    parser = build_parser()
    args = parser.parse_args(argv)
    from edge_ft.trust.policy import clear_notices, flush_notices

    lifetime.reset()
    clear_notices()  # of an earlier call in this process that failed
    prog = args.prog_name
    try:
        with lifetime.cancellable():  # SIGTERM, SIGHUP, SIGINT end what the command started, then it exits
            swept = lifetime.sweep()
            if swept:
                print(f"edge-ft: removed {swept} cgroup{'s' * (swept > 1)} left by edge-ft processes that are gone",
                      file=sys.stderr)
            code = int(args.func(args) or 0)
        if code == 0:
            flush_notices()  # "artifacts are unverified", once, after a command that succeeded
        return code
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except MemoryError:  # under a memory cap (ulimit, `edge-ft profile run`'s rlimit) Python raises, not dies
        print(f"{prog}: error: out of memory (MemoryError); use a smaller --batch or less data, "
              "or a device with more free RAM", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or a signal lifetime turned into one
        print(lifetime.summary(prog, e), file=sys.stderr)
        return lifetime.exit_status(e)
    except BrokenPipeError:  # `edge-ft analyze | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
