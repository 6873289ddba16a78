"""Every command's --help states real defaults: never "(default: None)", nor a default on a required option."""

import argparse

import pytest

from edge_ft.cli import build_parser


def all_parsers(parser: argparse.ArgumentParser, prefix: str = "edge-ft"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{prefix} {name}")


PARSERS = dict(all_parsers(build_parser()))


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_shows_no_empty_defaults(command):
    parser = PARSERS[command]
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text, command
    for action in parser._actions:
        if action.required and action.option_strings:
            assert "default" not in (action.help or "").lower(), (command, action.option_strings)


def test_recipe_defaults_are_figures_not_words():
    text = PARSERS["edge-ft train"].format_help()
    assert "default: recipe)" not in text and "(default: 20 for every method)" in " ".join(text.split())
