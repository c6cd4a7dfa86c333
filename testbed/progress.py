"""Progress for long work: a live status line on a terminal, quiet in CI logs."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def interactive(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    if os.environ.get("TESTBED_PROGRESS") == "0" or os.environ.get("CI"):
        return False
    if os.environ.get("TESTBED_PROGRESS") == "1":
        return True
    return stream.isatty()


class Progress:
    """One status line rewritten in place; prints nothing unless interactive."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = interactive(self.stream)
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, detail: str, *, force: bool = False) -> None:
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

    def done(self, detail: str = "done") -> None:
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
