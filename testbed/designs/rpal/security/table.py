"""The expected column of the security review: the table in ../SECURITY.md.

The table is documentation first: a reviewer who disagrees with a row changes it
there. This module only reads it (pure `parse_table`) and refuses a malformed one
with a one-line error naming the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from testbed.errors import TestbedError

EXPECTED = ("blocked", "weakness", "either")
DOC_NAME = "SECURITY.md"
_ROW = re.compile(r"^\|\s*`([a-z][a-z0-9_]{0,47})`\s*\|\s*([a-z_]+)\s*\|\s*([a-z]+)\s*\|"
                  r"\s*(.+?)\s*\|\s*$")


class TableError(TestbedError):
    pass


@dataclass(frozen=True)
class Row:
    name: str
    group: str
    expected: str  # one of EXPECTED
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "group": self.group, "expected": self.expected,
                "reason": self.reason}


def parse_table(text: str, where: str = DOC_NAME) -> tuple[Row, ...]:
    """The rows of the doc's table: lines `| \\`name\\` | group | expected | reason |`."""
    rows: list[Row] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.startswith("| `"):
            continue
        m = _ROW.match(line)
        if m is None:
            raise TableError(f"{where}:{n}: not a row `| \\`name\\` | group | expected | "
                             f"reason |`: {line[:80]!r}")
        name, group, expected, reason = m.groups()
        if expected not in EXPECTED:
            raise TableError(f"{where}:{n}: row {name}: expected {expected!r} is not one of "
                             f"{', '.join(EXPECTED)}")
        if name in seen:
            raise TableError(f"{where}:{n}: row {name} is listed twice")
        seen.add(name)
        rows.append(Row(name, group, expected, reason))
    if not rows:
        raise TableError(f"{where}: no rows")
    return tuple(rows)


def doc_text() -> str:
    return resources.files("testbed.designs.rpal").joinpath(DOC_NAME).read_text()


def load_table() -> tuple[Row, ...]:
    """The rows of the packaged SECURITY.md."""
    try:
        text = doc_text()
    except OSError as exc:
        raise TableError(f"{DOC_NAME} cannot be read: {exc}") from None
    return parse_table(text)
