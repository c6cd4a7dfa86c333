"""Review tables: a scenario whose findings are rows of a review (the security suite).

A finding is a review row when its evidence names `row`, `expected` and `observed`
(testbed/designs/rpal/security/judge.py writes them); its `file` (relative to the
scenario's run folder) is the row's evidence. Design-independent and pure: the
terminal summary prints the table, the HTML report draws it with links.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.check.model import ScenarioResult

from .common import printable


@dataclass(frozen=True)
class ReviewRow:
    scenario: str
    row: str
    group: str
    expected: str
    observed: str
    status: str
    verdict: str
    message: str
    reason: str
    evidence: str  # path of the row's evidence file ("" when none)


def review_rows(result: ScenarioResult) -> list[ReviewRow]:
    out = []
    for f in result.findings:
        ev = f.evidence
        if not all(isinstance(ev.get(k), str) for k in ("row", "expected", "observed")):
            continue
        rel = ev.get("file")
        path = ""
        if isinstance(rel, str) and rel and not Path(rel).is_absolute() and ".." not in rel:
            path = str(Path(result.run_dir) / rel) if result.run_dir else rel
        out.append(ReviewRow(result.scenario, ev["row"], str(ev.get("group", "")),
                             ev["expected"], ev["observed"], f.status.value,
                             str(ev.get("verdict", "")), f.message, str(ev.get("reason", "")),
                             path))
    return out


def render_review_text(results: Iterable[ScenarioResult], width: int = 100) -> str:
    """One table per scenario with review rows: row | expected | observed | verdict."""
    blocks = []
    for r in results:
        rows = review_rows(r)
        if not rows:
            continue
        w = max(len(x.row) for x in rows)
        lines = [f"review {printable(r.scenario)}: {len(rows)} rows "
                 f"(expected: SECURITY.md; evidence: {printable(r.run_dir)}/security/ROW.json)",
                 f"  {'row':<{w}}  {'expected':<8}  {'observed':<8}  {'status':<5}  verdict"]
        for x in rows:
            lines.append(f"  {printable(x.row):<{w}}  {x.expected:<8}  {x.observed:<8}  "
                         f"{x.status.upper():<5}  {printable(x.verdict)[:width]}")
        counts = {s: sum(x.status == s for x in rows) for s in ("pass", "fail", "error", "skip")}
        weak = sum(x.expected == "weakness" and x.observed == "open" for x in rows)
        lines.append(f"  {counts['pass']} as designed ({weak} known weaknesses shown), "
                     f"{counts['fail']} contradict the design, {counts['error']} not judged, "
                     f"{counts['skip']} not run here")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def review_sections(results: Sequence[ScenarioResult]) -> dict[str, list[ReviewRow]]:
    """scenario name -> its review rows (the HTML report's review sections)."""
    return {r.scenario: rows for r in results if (rows := review_rows(r))}
