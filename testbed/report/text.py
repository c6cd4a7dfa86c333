"""Human-readable text renderings (jinja2 templates in testbed/report/templates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).parent / "templates"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.ChainableUndefined,
    keep_trailing_newline=True,
)


def render_snapshot(snapshot: dict[str, Any], *, show_mappings: bool = False) -> str:
    return _env.get_template("snapshot.txt.j2").render(s=snapshot, show_mappings=show_mappings)
