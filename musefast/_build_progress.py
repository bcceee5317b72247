"""Lines on stderr while a part of musefast._C compiles, so a first run never looks hung.

A cold JIT build takes one to several minutes on a small or busy machine (measured: 514 s for
the CPU part on a loaded 2-core machine), and torch's builder prints nothing unless asked to.
:func:`reporting` wraps a build: one line when it starts, ``... still compiling X: 45 s`` every
``interval`` seconds from a daemon thread, one line with the time when it ends (or the one-line
reason it failed). A build that turns out to be a cache hit says nothing: its start line waits
``announce_after`` seconds, and one that is done by then never prints. ``quiet()`` silences the
lines for commands whose quiet mode asks for that (``musefast generate -q``); the build itself is
unchanged, and ``musefast doctor`` still reports how long it took. ``MUSEFAST_BUILD_PROGRESS=1``
prints the lines even then; ``=0`` never prints them.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

# Seconds between progress lines: often enough that a wait never looks hung, rarely enough
# that a build of several minutes stays a dozen lines.
INTERVAL_S = 20.0

_quiet_depth = 0


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """No build lines inside this block (``enabled=False``: no change). Nests."""
    global _quiet_depth
    _quiet_depth += bool(enabled)
    try:
        yield
    finally:
        _quiet_depth -= bool(enabled)


def enabled() -> bool:
    """Whether build lines are printed now."""
    forced = os.environ.get("MUSEFAST_BUILD_PROGRESS", "")
    return forced == "1" or (forced != "0" and not _quiet_depth)


def _say(line: str, stream) -> None:
    # the stream is looked up when writing, so a redirected sys.stderr (pytest's capsys) is honoured
    out = stream if stream is not None else sys.stderr
    try:
        print(line, file=out, flush=True)
    except (OSError, ValueError):  # a closed stderr must not break a build
        pass


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


class _Reporter:
    def __init__(self, what: str, why: str, announce_after: float, interval: float, stream, clock):
        self.what, self.why = what, why
        self.announce_after, self.interval = announce_after, interval
        self.stream, self.clock = stream, clock
        self.start = clock()
        self.announced = False
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="musefast-build-progress", daemon=True)

    def _announce(self) -> None:
        with self.lock:
            if not self.announced and not self.done.is_set():
                self.announced = True
                _say(f"musefast: compiling {self.what} ({self.why}) ...", self.stream)

    def _run(self) -> None:
        if self.announce_after > 0 and self.done.wait(self.announce_after):
            return  # a cache hit: nothing to say
        self._announce()
        while not self.done.wait(self.interval):
            with self.lock:
                if not self.done.is_set():
                    _say(f"... still compiling {self.what}: {_seconds(self.clock() - self.start)}", self.stream)

    def finish(self, error: str | None) -> float:
        elapsed = self.clock() - self.start
        with self.lock:
            self.done.set()
            if self.announced:
                if error is None:
                    _say(f"musefast: compiled {self.what} in {_seconds(elapsed)}", self.stream)
                else:
                    _say(f"musefast: compiling {self.what} failed after {_seconds(elapsed)}: {error}", self.stream)
        self.thread.join(timeout=1.0)
        return elapsed


@contextlib.contextmanager
def reporting(what: str, why: str, *, expect_compile: bool, describe_error=str, interval: float | None = None,
              grace: float = 5.0, stream=None, clock=time.monotonic):
    """Report the build run inside this block. ``what``: "the C++ CPU kernels"; ``why``: the
    parenthesis of the start line ("first use, cached in DIR"). ``expect_compile``: announce at
    once; otherwise only if the block still runs after ``grace`` seconds (a cache hit that
    turned out to need work). ``describe_error`` turns an exception into its one line."""
    if not enabled():
        yield
        return
    reporter = _Reporter(what, why, 0.0 if expect_compile else grace,
                         INTERVAL_S if interval is None else interval, stream, clock)
    if expect_compile:
        reporter._announce()  # in this thread: the line is out before the compiler starts
    reporter.thread.start()
    try:
        yield
    except BaseException as exc:
        reporter.finish(describe_error(exc))
        raise
    reporter.finish(None)
