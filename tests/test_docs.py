"""The documentation says what the code does: the CLI page is the parser's own render, every
option's --help shows its default, and the README's commands, options, names and links exist."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

import musefast
from musefast import cli_docs
from musefast.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = ("models.md", "cli.md", "api.md", "performance.md", "batch.md", "architecture.md",
         "contributing.md", "migration.md")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser(["train-demo"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_cli_page_is_the_parsers_render():
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == cli_docs.render(), (
        "docs/cli.md differs from the parser: run `python -m musefast.cli_docs > docs/cli.md`")


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_option_help_shows_its_default(name, capsys):
    command = _commands()[name]
    formatter = command._get_formatter()
    for action in command._actions:
        if (not action.option_strings or action.help is argparse.SUPPRESS
                or isinstance(action, argparse._HelpAction) or (action.nargs == 0 and action.const is not True)):
            continue
        text = formatter._expand_help(action)
        assert "(default:" in text or text.endswith("(required)"), f"musefast {name} {action.option_strings[0]}: {text!r}"


def test_the_formatter_appends_defaults():
    # the generic cases, on a parser of its own: a value, an unset value, a flag, a required option
    p = argparse.ArgumentParser(formatter_class=musefast.cli.DefaultsHelpFormatter)
    p.add_argument("--size", default=3, help="size")
    p.add_argument("--name", default=None, help="name")
    p.add_argument("--fast", action="store_true", help="fast")
    p.add_argument("--out", required=True, help="out")
    p.add_argument("--said", default=None, help="said (default: the model's)")
    text = " ".join(p.format_help().split())
    for expected in ("size (default: 3)", "name (default: none)", "fast (default: off)", "out (required)",
                     "said (default: the model's)"):
        assert expected in text
