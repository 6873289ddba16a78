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


def test_every_action_is_described_alike():
    """Sub-commands of sub-commands are ACTIONs, each with a description; every argument says what it is."""
    for command, parser in PARSERS.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert action.metavar == ("COMMAND" if command == "edge-ft" else "ACTION"), command
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                assert action.help, (command, action.option_strings or action.dest)
        if command.count(" ") == 2:
            assert parser.description, command
        assert "→" not in parser.format_help(), command  # tasks are named by their slugs, mnist-digits


def test_finetune_help_lists_every_method_and_the_recipe_defaults():
    from edge_ft.config import METHODS

    text = " ".join(PARSERS["edge-ft finetune"].format_help().split())
    assert " | ".join(METHODS) + " (required without --all)" in text
    for option in ("--epochs", "--batch", "--lr", "--optimizer"):
        help_text = next(a.help for a in PARSERS["edge-ft finetune"]._actions if option in a.option_strings)
        assert "(default: " in help_text, option


def test_errors_name_the_action_that_failed(tmp_path, capsys):
    from edge_ft.cli import main

    assert main(["adapter", "merge", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.startswith("edge-ft adapter merge: error: ")
    assert main(["data", "export", "cifar", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("edge-ft data export: error: unknown task 'cifar': choose one of "
                                              "mnist-digits, mnist-fashion")
    assert main(["data", "list"]) == 0
    assert capsys.readouterr().out.split()[:3] == ["TASK", "SHOTS/CLASS", "DESCRIPTION"]
