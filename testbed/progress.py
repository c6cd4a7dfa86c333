"""Progress for long work: a live status line on a terminal, timestamped lines in CI logs.

On a terminal (stderr a TTY, no ``CI``, ``TESTBED_PROGRESS`` not ``0``) one status
line is rewritten in place. Otherwise (a CI job, ``testbed run | cat 2>&1``) each
phase change is a timestamped line, and while a phase lasts a heartbeat line repeats
the latest detail (objects compiled, the scenarios running) at least every
``TESTBED_HEARTBEAT`` seconds (default 20): CI systems stop jobs that print nothing
for 10 minutes. ``-q`` (verbosity -1) silences both; ``-v`` (1) logs every detail
at most once a second.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

DEFAULT_HEARTBEAT = 20.0  # seconds; CI's limit is 10 minutes, the 30 s

_verbosity = 0  # -1 quiet (-q), 0 normal, 1 verbose (-v): set by the command line


def set_verbosity(level: int) -> None:
    global _verbosity
    _verbosity = level


def verbosity() -> int:
    return _verbosity


def heartbeat_interval() -> float:
    """Seconds between heartbeat lines: $TESTBED_HEARTBEAT (a positive number) or 20."""
    text = os.environ.get("TESTBED_HEARTBEAT", "")
    try:
        value = float(text) if text else DEFAULT_HEARTBEAT
    except ValueError:
        return DEFAULT_HEARTBEAT
    return value if value > 0 else DEFAULT_HEARTBEAT


def interactive(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    if os.environ.get("TESTBED_PROGRESS") == "0" or os.environ.get("CI"):
        return False
    if os.environ.get("TESTBED_PROGRESS") == "1":
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def log_line(text: str, stream: TextIO | None = None) -> None:
    """One timestamped line, flushed at once (a pipe would otherwise hold it)."""
    out = stream or sys.stdout
    out.write(f"[{stamp()}] {text}\n")
    out.flush()


class Progress:
    """A status line on a terminal; timestamped phase and heartbeat lines without one.

    ``detail_fn``, when set, gives the heartbeat's detail at the time it is printed
    (e.g. the scenarios running and for how long).
    """

    def __init__(self, label: str, stream: TextIO | None = None, *,
                 interval: float | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        quiet = _verbosity < 0
        self.enabled = not quiet and interactive(self.stream)
        self.logging = not quiet and not self.enabled
        self.interval = interval if interval is not None else heartbeat_interval()
        self.start = time.monotonic()
        self.detail = ""
        self.detail_fn: Callable[[], str] | None = None
        self._last = 0.0
        self._last_log = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, detail: str, *, force: bool = False) -> None:
        self.detail = detail
        if self.logging:
            now = time.monotonic()
            if force or (_verbosity > 0 and now - self._last_log >= 1.0):
                self._log(detail)
            self._heartbeat()
            return
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        line = f"{self.label}: {detail} [{now - self.start:5.1f}s]"
        width = 120
        self.stream.write("\r\x1b[K" + line[:width])
        self.stream.flush()

    def _log(self, detail: str) -> None:
        with self._lock:
            self._last_log = time.monotonic()
            elapsed = self._last_log - self.start
            self.stream.write(f"[{stamp()}] {self.label}: {detail} ({elapsed:.0f} s)\n")
            self.stream.flush()

    def _heartbeat(self) -> None:
        """Start the heartbeat thread (once): a line whenever `interval` passed silently."""
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.label}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while True:
            wait = self.interval - (time.monotonic() - self._last_log)
            if self._stop.wait(max(0.05, wait)):
                return
            if time.monotonic() - self._last_log >= self.interval:
                detail = self.detail
                if self.detail_fn is not None:
                    try:
                        detail = self.detail_fn()
                    except Exception:  # a heartbeat never breaks the work
                        pass
                self._log(f"{detail or 'working'} (still working)")

    def start_heartbeat(self) -> None:
        """Heartbeat lines from now on, even before the first update."""
        if self.logging:
            self._heartbeat()

    def close(self) -> None:
        """Stop the heartbeat without a final line."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def done(self, detail: str = "done") -> None:
        self.close()
        if self.logging:
            self._log(detail)
            return
        if not self.enabled:
            return
        self.update(detail, force=True)
        self.stream.write("\n")
        self.stream.flush()


@contextmanager
def progress(label: str) -> Iterator[Progress]:
    p = Progress(label)
    try:
        yield p
    finally:
        p.done()
