"""Terminal summary: a line per scenario, every failing finding with its key evidence, totals."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from testbed.check.model import ScenarioResult

from .common import RunMeta, case_counts, compact_evidence, printable, text_env, totals

_STYLES = {"red": "31", "green": "32", "yellow": "33", "bold": "1", "dim": "2"}


def _colorizer(color: bool) -> Any:
    def c(text: str, style: str) -> str:
        code = _STYLES.get(style)
        return f"\x1b[{code}m{text}\x1b[0m" if color and code else text

    return c


def _finding_name(check: str, checkpoint: str, subject: str) -> str:
    return check + (f"[{checkpoint}]" if checkpoint else "") + (f" {subject}" if subject else "")


def render_summary(
    results: Sequence[ScenarioResult],
    meta: RunMeta | None = None,
    *,
    color: bool = False,
    evidence_width: int = 160,
) -> str:
    """The summary as text; ANSI colours only when `color` (see `use_color`)."""
    meta = meta or RunMeta()
    scenarios = []
    for r in results:
        bad = [
            {
                "status": f.status.value,
                "source": f.source,
                "name": printable(_finding_name(f.check, f.checkpoint, f.subject)),
                "message": printable(f.message),
                "evidence": compact_evidence(f.evidence, evidence_width),
            }
            for f in r.findings
            if f.bad
        ]
        verdict = "PASS" if r.passed else ("ERROR" if r.error else "FAIL")
        scenarios.append(
            {
                "name": printable(r.scenario),
                "verdict": f"{verdict:<5}",
                "verdict_style": "green" if r.passed else "red",
                "counts": case_counts(r),
                "seconds": r.seconds,
                "bugs": list(r.bugs),
                "error": printable(r.error),
                "bad": bad,
                "reproduce": printable(r.reproduce) if not r.passed else "",
                # the files to open for a scenario that did not pass (reproduce has its line)
                "evidence": [] if r.passed else [
                    (name, printable(path)) for name, path in r.evidence.items()
                    if name != "reproduce"],
            }
        )
    name_width = max((len(printable(r.scenario)) for r in results), default=0)
    from .review import render_review_text

    review = render_review_text(results)
    return (review + "\n" if review else "") + text_env().get_template("summary.txt.j2").render(
        meta=meta,
        by_source=check_sources(meta),
        scenarios=scenarios,
        name_width=name_width,
        t=totals(results),
        c=_colorizer(color),
    )


def check_sources(meta: RunMeta) -> dict[str, list[str]]:
    """source -> the design's checks judged that way (host: snapshots; guest: verdict lines)."""
    out: dict[str, list[str]] = {}
    for c in meta.checks.values():
        out.setdefault(c.source, []).append(c.name)
    return out


def use_color(stream: TextIO) -> bool:
    """Colour when the stream is a terminal, unless NO_COLOR is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def print_summary(
    results: Sequence[ScenarioResult], meta: RunMeta | None = None, stream: TextIO | None = None
) -> None:
    out = stream if stream is not None else sys.stdout
    out.write(render_summary(results, meta, color=use_color(out)))
    out.flush()
