"""Render the command-line reference (docs/cli.md) from the argparse parser itself.

``python -m musefast.cli_docs > docs/cli.md`` rewrites the page; ``tests/test_docs.py`` compares
the committed page with a fresh render, so an option added, removed or given a new default
without the page changing fails the tests instead of leaving the documentation behind.
"""
from __future__ import annotations

import argparse
import sys

from musefast.cli import DefaultsHelpFormatter, build_parser

_HEADER = """\
# Command-line reference

Every `musefast` subcommand and option, with its default. This page is generated from the
command's own parser (`python -m musefast.cli_docs > docs/cli.md`) and a test compares it with a
fresh render, so it says what `musefast COMMAND --help` says.

Every value is checked before a model loads: a mistake prints one line naming it and the fix
and exits with code 2; a model that cannot be loaded, or a run that fails, exits with code 1.
`--debug` (on every subcommand) shows the Python traceback instead.
"""


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _cell(text: str) -> str:
    """Markdown table cell: no pipes or raw angle brackets (they would end the cell or open HTML)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def _option(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{name}`" for name in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices is not None:
        return f"{names} `{{{','.join(map(str, action.choices))}}}`"
    return f"{names} `{formatter._metavar_formatter(action, action.dest.upper())(1)[0]}`"


def _help_and_default(action: argparse.Action, formatter: argparse.HelpFormatter) -> tuple[str, str]:
    """(what it does, its default): the default is the ``(default: ...)`` the --help text ends with."""
    text = formatter._expand_help(action) if action.help else ""
    if not action.option_strings:
        return text, "optional" if action.nargs == "?" else "required"
    if text.endswith("(required)"):
        return text[: -len("(required)")].rstrip(), "required"
    start = text.rfind("(default:")
    if start < 0:
        return text, ""
    return text[:start].rstrip(), text[start + len("(default:"):].rstrip().removesuffix(")").strip()


def _usage(parser: argparse.ArgumentParser) -> str:
    """``musefast NAME [options] POSITIONALS``: written here rather than taken from argparse, whose
    usage wrapping differs between Python versions (the page must render the same everywhere)."""
    words = [parser.prog, "[options]"]
    for action in parser._actions:
        if not action.option_strings:
            name = action.metavar or action.dest
            words.append(f"[{name}]" if action.nargs == "?" else name)
    return " ".join(words)


def _command(name: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    formatter = DefaultsHelpFormatter(parser.prog)
    lines = [f"## musefast {name}", "", summary[:1].upper() + summary[1:] + ".", "", "```text",
             _usage(parser), "```", ""]
    rows = [a for a in parser._actions
            if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
    lines += ["| argument | default | what it does |", "|---|---|---|"]
    for action in rows:
        text, default = _help_and_default(action, formatter)
        lines.append(f"| {_option(action, formatter)} | {_cell(default)} | {_cell(text)} |")
    return lines + [""]


def render() -> str:
    parser = build_parser(["train-demo"])  # train-demo's options are added only when it is named
    sub = _subparsers(parser)
    summaries = {choice.dest: choice.help for choice in sub._choices_actions}
    lines = [_HEADER, "| command | what it does |", "|---|---|"]
    lines += [f"| [`musefast {name}`](#musefast-{name}) | {_cell(summaries[name])} |" for name in sub.choices]
    lines += ["", "`musefast --version` prints the version; `musefast --help` and `python -m musefast --help` "
              "list the commands.", ""]
    for name, command in sub.choices.items():
        lines += _command(name, command, summaries[name])
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
