"""Self-contained HTML report (templates/report.html.j2, jinja2 with autoescape, no JS).

Header with the verdict, run metadata and JUnit-like totals; per scenario the findings (evidence
in <details>) and, per snapshot, the slot picture of slotgraph.py as inline SVG.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.check.model import ScenarioResult

from . import slotgraph
from .common import (
    RunMeta,
    case_counts,
    cases,
    compact_evidence,
    html_env,
    pretty_evidence,
    totals,
)
from .review import review_rows


def _anchor(name: str, used: set[str]) -> str:
    base = "s-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "scenario")
    out, n = base, 1
    while out in used:
        n += 1
        out = f"{base}-{n}"
    used.add(out)
    return out


def _scenario_view(
    r: ScenarioResult, anchor: str, fig_base: int, all_processes: bool
) -> dict[str, Any]:
    rows = []
    for f in r.findings:
        rows.append(
            {
                "status": f.status.value,
                "source": f.source,
                "check": f.check,
                "checkpoint": f.checkpoint,
                "subject": f.subject,
                "message": f.message,
                "evidence_short": compact_evidence(f.evidence, 140),
                "evidence": pretty_evidence(f.evidence) if f.evidence else "",
            }
        )
    bad = [x for x in rows if x["status"] in ("fail", "error")]
    good = [x for x in rows if x["status"] in ("pass", "skip")]
    figures = []
    for k, (checkpoint, snap) in enumerate(r.snapshots.items()):
        fs = [f for f in r.findings if f.checkpoint == checkpoint]
        fig = slotgraph.slot_figure(
            snap, fs, uid=f"f{fig_base + k}", all_processes=all_processes
        )
        fig.checkpoint = checkpoint
        figures.append(fig)
    return {
        "name": r.scenario,
        "anchor": anchor,
        "passed": r.passed,
        "error": r.error,
        "bugs": list(r.bugs),
        "seconds": r.seconds,
        "run_dir": r.run_dir,
        "reproduce": r.reproduce if not r.passed else "",
        "counts": case_counts(r),
        "tests": len(cases(r)),
        "bad": bad,
        "good": good,
        "figures": figures,
        "output": r.output,
        "review": review_rows(r),
        "evidence": [] if r.passed else list(r.evidence.items()),
        "console_tail": r.console_tail,
    }


def render_html(
    results: Sequence[ScenarioResult],
    meta: RunMeta | None = None,
    *,
    title: str = "",
    all_processes: bool = False,
) -> str:
    """The whole page as one string (inline CSS and SVG, nothing external)."""
    meta = meta or RunMeta()
    used: set[str] = set()
    scenarios = []
    nfig = 0
    for r in results:
        s = _scenario_view(r, _anchor(r.scenario, used), nfig, all_processes)
        nfig += len(s["figures"])
        scenarios.append(s)
    return html_env().get_template("report.html.j2").render(
        title=title or meta.title,
        checks=list(meta.checks.values()),
        meta=meta,
        t=totals(results),
        scenarios=scenarios,
        g=slotgraph,
    )


def write_html(
    results: Sequence[ScenarioResult],
    path: str | Path,
    meta: RunMeta | None = None,
    *,
    all_processes: bool = False,
) -> Path:
    p = Path(path)
    p.write_text(render_html(results, meta, all_processes=all_processes), encoding="utf-8")
    return p
