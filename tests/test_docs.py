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


# -- the README and the docs pages ---------------------------------------------------------

SETUP = 'pip install -e . && musefast generate "a red circle on the left" -o out.png'
TESTS = 'pip install -e ".[test]" && pytest'
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Modules that the docs already name by the layout being merged in parallel; empty once it is.
PENDING_MODULES = ()
# The compiled extension: built on first use, so not importable in every test environment.
BUILT_ON_FIRST_USE = ("musefast._C",)


def _slug(heading: str) -> str:
    """GitHub's and mkdocs' anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_readme_is_a_short_guide_with_the_two_ci_commands():
    assert len(README.splitlines()) <= 250
    lines = [line.split("  #")[0].strip() for line in README.splitlines()]
    assert SETUP in lines and TESTS in lines
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"readme '{SETUP}'" in ci and f"readme '{TESTS}'" in ci


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_and_anchors_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to a missing file: {target}"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{page.name}: no heading for #{anchor} in {file.name}"


def test_every_docs_page_is_in_the_site_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert {p.name for p in DOCS} == set(re.findall(r":\s*(\S+\.md)\s*$", nav, flags=re.M))
    for name in PAGES:
        assert (ROOT / "docs" / name).is_file(), name


def _command_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("musefast ")]
    return lines + re.findall(r"`(musefast [a-z-]+ [^`]*)`", text)


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_commands_name_real_subcommands_and_options(page):
    commands = _commands()
    for line in _command_lines(page.read_text()):
        words = shlex.split(line.split("  #")[0].replace("--left/--right/--top/--bottom", "--left"), comments=True)
        assert words[1] in commands, f"{page.name}: unknown subcommand in {line!r}"
        known = {s for a in commands[words[1]]._actions for s in a.option_strings}
        for word in words[2:]:
            if word.startswith("-") and not re.fullmatch(r"-\d.*", word):
                assert word.split("=")[0] in known, f"{page.name}: musefast {words[1]} has no option {word}"


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_python_names_exist(page):
    names = set(re.findall(r"\bmusefast(?:\.[A-Za-z_][A-Za-z0-9_]*)+", page.read_text()))
    names = {n.removesuffix(".py") for n in names
             if not n.startswith(PENDING_MODULES + BUILT_ON_FIRST_USE) and not n.endswith("_")}  # convert_*
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{page.name} names what musefast does not have: {missing}"


def test_committed_plots_are_small_and_shown():
    pngs = sorted((ROOT / "docs" / "img").glob("*.png"))
    assert {p.name for p in pngs} >= {"cpu-latency.png", "step-cache.png", "batch-throughput.png"}
    for png in pngs:
        assert png.stat().st_size < 150_000, f"{png.name}: {png.stat().st_size} bytes"
    assert "](docs/img/" in README


def test_plots_render_from_the_committed_results(tmp_path):
    pytest.importorskip("matplotlib")
    import runpy

    plot = runpy.run_path(str(ROOT / "benchmarks" / "plot.py"))
    assert plot["main"](["--out", str(tmp_path)]) == 0
    screenshots = {"server-page.png"}  # scripts/screenshot_server_page.py makes it, not the plots
    committed = {p.name for p in (ROOT / "docs" / "img").glob("*.png")} - screenshots
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(committed)
