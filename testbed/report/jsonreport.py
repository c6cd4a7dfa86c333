"""The machine-readable report: one JSON document, schema "testbed.report", version 2.

```
{
  "schema": "testbed.report", "schema_version": 2,
  "run": {design, title, kernel, osrelease, bugs, accel, started, seconds, timings, extra,
          "checks": [{name, title, invariant, bugs, source}],    # source: host | guest
          "kernel_info": {path, vmlinux, key, series, base_version, osrelease, version}},
          # extra: modes, append, shard, selection, interrupted, matrix (testbed matrix)
  "verdict": "PASS" | "FAIL",
  "totals": {scenarios, scenarios_failed, tests, passed, failures, errors, skipped, seconds},
  "scenarios": [
    {"scenario", "design", "passed", "error", "bugs", "seconds", "run_dir", "reproduce",
     "output",
     "counts": {pass, fail, error, skip},     # per test case, as in JUnit
     "failed_checks": [...],
     "findings": [{check, status, source, message, scenario, checkpoint, subject, evidence}],
     "snapshot_names": ["checkpoint", ...],
     "evidence": {console, snapshots, findings, reproduce, ...: path},  # files that exist
     "console_tail": "...",                   # last console lines of a scenario that failed
     "repeat": N,                             # repetition of `testbed matrix --repeat`
     "snapshots": {checkpoint: snapshot}}     # only with embed_snapshots (SNAPSHOT-SCHEMA.md)
  ]
}
```
`status` is pass, fail, error or skip; `source` host (judged from snapshots) or guest (a
guest program's own verdict line). report.schema.json beside this file is its JSON Schema.
Removing or renaming a field, or changing its meaning, raises schema_version; adding does not.
Version 2 replaced the findings' `passed` and `error` booleans with `status` and added
`source`, `skipped` and the checks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from testbed.check.model import Finding, ScenarioResult
from testbed.snapshot.model import Snapshot, SnapshotFormatError

from .common import RunMeta, case_counts, json_default, totals

SCHEMA = "testbed.report"
SCHEMA_VERSION = 2
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the report (report.schema.json)."""
    return dict(json.loads(SCHEMA_FILE.read_text()))


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
            "design": r.design,
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
            "evidence": dict(r.evidence),
            "console_tail": r.console_tail,
            "repeat": r.repeat,
        }
        if embed_snapshots:
            s["snapshots"] = {k: v.to_json() for k, v in r.snapshots.items()}
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


def from_report_dict(doc: Mapping[str, Any]) -> tuple[RunMeta, list[ScenarioResult]]:
    """Read a report back (e.g. to render HTML later). Without embedded snapshots each
    scenario's `snapshots` is empty: the pictures need them."""
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} document: schema {doc.get('schema')!r}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"unsupported {SCHEMA} schema_version {doc.get('schema_version')!r}")
    try:
        meta = RunMeta.from_dict(doc.get("run", {}))
        return meta, [_result(s) for s in doc.get("scenarios", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed {SCHEMA} document: {exc!r} missing or wrong") from None


def _result(s: Mapping[str, Any]) -> ScenarioResult:
    try:
        snapshots = {k: Snapshot.from_json(v) for k, v in dict(s.get("snapshots", {})).items()}
    except SnapshotFormatError as exc:
        raise ValueError(f"scenario {s.get('scenario')!r}: embedded snapshot: {exc}") from None
    return ScenarioResult(
        scenario=s["scenario"],
        findings=[Finding.from_dict(f) for f in s.get("findings", [])],
        run_dir=s.get("run_dir", ""),
        reproduce=s.get("reproduce", ""),
        bugs=tuple(s.get("bugs", ())),
        seconds=float(s.get("seconds", 0.0)),
        snapshots=snapshots,
        output=s.get("output", ""),
        error=s.get("error", ""),
        design=s.get("design", ""),
        evidence={str(k): str(v) for k, v in dict(s.get("evidence", {})).items()},
        console_tail=str(s.get("console_tail", "")),
        repeat=int(s.get("repeat", 0)),
    )


def read_json(path: str | Path) -> tuple[RunMeta, list[ScenarioResult]]:
    return from_report_dict(json.loads(Path(path).read_text(encoding="utf-8")))
