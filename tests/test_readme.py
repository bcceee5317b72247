"""The README's demo examples run and give what they say: the Python tour is executed
with every ``# True`` / ``# (256, 256)`` line turned into an assertion (the images are read back
by the exact checker), and the demo CLI lines are run, each generated PNG checked against its
prompt."""
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from musefast.cli import main
from musefast.demo_data.checker import check

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)
DEMO_PY = [code for lang, code in BLOCKS if lang == "python" and 'musefast.load("demo")' in code]
DEMO_CLI = [code for lang, code in BLOCKS if lang == "bash" and "--from-png" in code]
_EXPECT = re.compile(r"^(?P<expr>\S.*?)\s+# (?P<value>True|\(\d+, \d+\))\s*$")


def _with_assertions(code: str) -> str:
    lines = []
    for line in code.splitlines():
        m = _EXPECT.match(line)
        lines.append(f"assert ({m['expr']}) == {m['value']}, {m['expr']!r}" if m else line)
    return "\n".join(lines)


def test_the_readme_has_demo_examples():
    # the Python tour, then the generation engine's example
    assert len(DEMO_PY) == 2 and DEMO_PY[0].count("# True") >= 6 and "Engine(" in DEMO_PY[1] and len(DEMO_CLI) == 1


@pytest.mark.parametrize("code", DEMO_PY)
def test_python_tour_on_the_demo_model(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_with_assertions(code), "README.md", "exec"), {})


@pytest.mark.parametrize("code", DEMO_CLI)
def test_cli_examples_on_the_demo_model(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        assert words[0] == "musefast", line
        assert main(words[1:] + ["-q"]) == 0, line
        out = Path(words[words.index("-o") + 1])
        if "--from-png" in words:
            source = Path(words[words.index("--from-png") + 1])
            assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(source))), line
        else:
            prompt = words[2] if words[1] == "generate" else words[3]
            assert check(Image.open(out), prompt)["exact"], (line, check(Image.open(out), prompt))
