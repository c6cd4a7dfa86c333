"""The machine-readable report: one JSON document, schema "testbed.report", version 1.

```
{
  "schema": "testbed.report", "schema_version": 1,
  "run": {kernel, osrelease, bugs, accel, started, seconds, timings, extra},
  "verdict": "PASS" | "FAIL",
  "totals": {scenarios, scenarios_failed, tests, passed, failures, errors, seconds},
  "scenarios": [
    {"scenario", "passed", "error", "bugs", "seconds", "run_dir", "reproduce", "output",
     "counts": {pass, fail, error},           # per test case, as in JUnit
     "failed_checks": [...],
     "findings": [Finding.to_dict() ...],     # + "status"
     "snapshot_names": ["checkpoint", ...],
     "snapshots": {checkpoint: snapshot}}     # only with embed_snapshots
  ]
}
```
Removing or renaming a field, or changing its meaning, raises schema_version; adding does not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from testbed.check.model import Finding, ScenarioResult

from .common import RunMeta, case_counts, json_default, totals

SCHEMA = "testbed.report"
SCHEMA_VERSION = 1


def report_dict(
    results: Sequence[ScenarioResult],
    meta: RunMeta | None = None,
    *,
    embed_snapshots: bool = False,
) -> dict[str, Any]:
    meta = meta or RunMeta()
    t = totals(results)
    scenarios = []
    for r in results:
        s: dict[str, Any] = {
            "scenario": r.scenario,
            "passed": r.passed,
            "error": r.error,
            "bugs": list(r.bugs),
            "seconds": r.seconds,
            "run_dir": r.run_dir,
            "reproduce": r.reproduce,
            "output": r.output,
            "counts": case_counts(r),
            "failed_checks": sorted(r.failed_checks()),
            "findings": [f.to_dict() for f in r.findings],
            "snapshot_names": list(r.snapshots),
        }
        if embed_snapshots:
            s["snapshots"] = r.snapshots
        scenarios.append(s)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "run": meta.to_dict(),
        "verdict": t.verdict,
        "totals": asdict(t),
        "scenarios": scenarios,
    }


def render_json(
    results: Sequence[ScenarioResult],
    meta: RunMeta | None = None,
    *,
    embed_snapshots: bool = False,
    indent: int | None = 1,
) -> str:
    doc = report_dict(results, meta, embed_snapshots=embed_snapshots)
    return json.dumps(doc, indent=indent, default=json_default, ensure_ascii=False) + "\n"


def write_json(
    results: Sequence[ScenarioResult],
    path: str | Path,
    meta: RunMeta | None = None,
    *,
    embed_snapshots: bool = False,
) -> Path:
    p = Path(path)
    p.write_text(render_json(results, meta, embed_snapshots=embed_snapshots), encoding="utf-8")
    return p


def _finding(d: Mapping[str, Any]) -> Finding:
    return Finding(
        check=d["check"],
        passed=bool(d["passed"]),
        message=d.get("message", ""),
        scenario=d.get("scenario", ""),
        checkpoint=d.get("checkpoint", ""),
        subject=d.get("subject", ""),
        evidence=dict(d.get("evidence", {})),
        error=bool(d.get("error", False)),
    )


def from_report_dict(doc: Mapping[str, Any]) -> tuple[RunMeta, list[ScenarioResult]]:
    """Read a report back (e.g. to render HTML later). Without embedded snapshots each
    scenario's `snapshots` is empty: the pictures need them."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} document: schema {doc.get('schema')!r}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"unsupported {SCHEMA} schema_version {doc.get('schema_version')!r}")
    results = [
        ScenarioResult(
            scenario=s["scenario"],
            findings=[_finding(f) for f in s.get("findings", [])],
            run_dir=s.get("run_dir", ""),
            reproduce=s.get("reproduce", ""),
            bugs=tuple(s.get("bugs", ())),
            seconds=float(s.get("seconds", 0.0)),
            snapshots=dict(s.get("snapshots", {})),
            output=s.get("output", ""),
            error=s.get("error", ""),
        )
        for s in doc.get("scenarios", [])
    ]
    return RunMeta.from_dict(doc.get("run", {})), results


def read_json(path: str | Path) -> tuple[RunMeta, list[ScenarioResult]]:
    return from_report_dict(json.loads(Path(path).read_text(encoding="utf-8")))
