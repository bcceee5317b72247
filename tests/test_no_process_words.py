"""The repository speaks of the product, not of how it was built: no tracker numbers, work
sessions or pointers to design notes that a user who clones the repository does not have."""
import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORDS = re.compile(
    r"\bsessions?\b"                      # a work session, numbered or not
    r"|\bhelpers?\b"
    r"|\blent\b"
    r"|\bother engineers\b"             # who else used the machine is not the product's business
    r"|\bthis\s+task\b"
    r"|\bissues? ?#?\d+"                  # "issue 14", "issues 8/15", "issue #5"
    r"|(?<![\w&/#])#\d{1,4}\b(?![\w-])"   # "#17" (not a colour, an anchor or an HTML entity)
    r"|\bthe issue'?s?\b"
    r"|\bDESIGN\b(?: ?§|\.md)"
    r"|shared[/]DESIGN",
    re.IGNORECASE,
)
# A design-notes file cited by name ("the DESIGN contract"); the ordinary word is lower case.
NOTES = re.compile(r"\bDESIGN\b")
# Committed measurements and model files are data, not prose.
# A peer's own test suite is kept unmodified (tests/peer_suites): its words are its authors'.
SKIP = ("tests/peer_suites/*/*", "*.json", "*.jsonl", "*.png", "*.safetensors", "*.bin", "*.npz", "*.msgpack", "*_checkpoint")
# pytest's own API names its run a "session" (hooks, the hook's argument and its config).
PYTEST_SESSION = re.compile(r"pytest_session\w*|\bsession\.(config|items)|\(session\)")
# (path, text) pairs that use a listed word in its ordinary sense.
ALLOWED = {
    ("tests/test_no_process_words.py", ""),  # this file names the words it looks for
}


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no tracked files to read")
    return [p for p in out.splitlines() if not any(fnmatch.fnmatch(p, pat) for pat in SKIP)]


def _hits(paths, pending=()):
    found = []
    for path in paths:
        if (path, "") in ALLOWED or any(fnmatch.fnmatch(path, pat) for pat in pending):
            continue
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue  # binary, or deleted in the working tree
        for number, line in enumerate(text.splitlines(), 1):
            match = WORDS.search(PYTEST_SESSION.sub("", line)) or NOTES.search(line)
            if match and (path, match.group(0)) not in ALLOWED:
                found.append(f"{path}:{number}: {line.strip()[:120]}")
    return found


def test_no_process_words_in_tracked_files():
    hits = _hits(_tracked())
    assert not hits, "say what the code does instead:\n" + "\n".join(hits)


def test_the_pattern_finds_what_it_is_for(tmp_path):
    for text in ("see issue 14", "Issue #5", "lent" " GPU", "in session" " 3", "(DESIGN" " §4)", "../shared/" "DESIGN.md",
                 "fixed in #17", "The issue's target", "a test helper"):
        assert WORDS.search(text), text
    for text in ("def pytest_sessionstart(session):", "session.config.pluginmanager"):
        assert not WORDS.search(PYTEST_SESSION.sub("", text)), text
    assert WORDS.search(PYTEST_SESSION.sub("", "a GPU session"))
    assert NOTES.search("the DESIGN contract") and not NOTES.search("a design choice")
    for text in ("color: #ffffff", "see [x](#musefast-batch)", "start_new_session=True", "&#8212;", "a tissue"):
        assert not WORDS.search(text), text
