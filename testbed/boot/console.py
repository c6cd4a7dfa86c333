"""Reading the guest's serial console log: panics, oopses, readiness. Pure over text."""

from __future__ import annotations

import re
from dataclasses import dataclass

PANIC_RE = re.compile(r"Kernel panic - not syncing: ?(?P<why>.*)")
OOPS_RE = re.compile(r"(BUG: .*|Oops: .*|general protection fault.*|WARNING: CPU: \d+ PID: .*)")


@dataclass(frozen=True)
class ConsoleState:
    ready: str | None  # the ready line, once seen
    panic: str | None  # the panic reason, once seen
    oopses: tuple[str, ...]


def scan(text: str, ready_marker: str) -> ConsoleState:
    ready = panic = None
    oopses: list[str] = []
    for line in text.splitlines():
        line = line.strip("\r")
        if ready is None and line.startswith(ready_marker):
            ready = line
        m = PANIC_RE.search(line)
        if m and panic is None:
            panic = m.group("why").strip() or "(no reason given)"
        o = OOPS_RE.search(line)
        if o:
            oopses.append(o.group(1).strip())
    return ConsoleState(ready, panic, tuple(oopses))


_CONTROL_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


def tail(text: str, lines: int = 5) -> str:
    """The last `lines` non-empty lines, without terminal control sequences."""
    clean = [_CONTROL_RE.sub("", ln).strip() for ln in text.splitlines()]
    return "\n".join([ln for ln in clean if ln][-lines:])
