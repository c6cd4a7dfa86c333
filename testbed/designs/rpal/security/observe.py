"""The guest's observation lines: `ROW NAME OBSERVED key=value... | what happened`.

Guest output is hostile input: one pass over its lines, bounded lengths, names and
keys from a small alphabet; a line that does not parse is ignored (the row then has
no observation, which is an error of that row, never a pass). The first line of a
row counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

OBSERVED = ("blocked", "open", "skip", "error", "host")
MAX_LINE = 2048
MAX_FIELDS = 32
_HEAD = re.compile(r"ROW ([a-z][a-z0-9_]{0,47}) ([a-z]{1,8})(?: (.*))?")
_FIELD = re.compile(r"([a-z][a-z0-9_]{0,31})=([^\s=|]{1,80})")


@dataclass(frozen=True)
class Observation:
    row: str
    observed: str  # one of OBSERVED
    fields: dict[str, str] = field(default_factory=dict)
    message: str = ""
    line: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"row": self.row, "observed": self.observed, "fields": dict(self.fields),
                "message": self.message, "line": self.line}


def parse_line(line: str) -> Observation | None:
    """One observation line, or None when it is not one."""
    if len(line) > MAX_LINE or not line.startswith("ROW "):
        return None
    head, bar, message = line.partition(" | ")
    if not bar and head.endswith(" |"):
        head = head[:-2]
    m = _HEAD.fullmatch(head.rstrip())
    if m is None or m.group(2) not in OBSERVED:
        return None
    fields: dict[str, str] = {}
    for tok in (m.group(3) or "").split():
        f = _FIELD.fullmatch(tok)
        if f is None or len(fields) >= MAX_FIELDS:
            continue
        fields.setdefault(f.group(1), f.group(2))
    return Observation(m.group(1), m.group(2), fields, message.strip(), line)


def parse_output(text: str) -> dict[str, Observation]:
    """row name -> its first observation in the guest's output."""
    out: dict[str, Observation] = {}
    for line in text.splitlines():
        obs = parse_line(line.rstrip("\r"))
        if obs is not None and obs.row not in out:
            out[obs.row] = obs
    return out
