"""`testbed report RUN_DIR`: every check again on what a finished run kept, no guest booted.

A run folder (`testbed run`'s, or one scenario's folder inside it) keeps, per
scenario, `scenario.json` (testbed/rundir.py), the snapshots, the workloads' output,
`checkpoints.jsonl` and the console log. Judging them again with the checks of the
tree at hand (the same `judge_scenario` that `testbed run` calls) gives the same
verdicts on an unchanged tree, and lets a changed or new check be tried on old runs.

What the folder lacks makes checks errors, never passes: a snapshot file missing or
unreadable is an error of each host check the scenario declares, at that checkpoint;
a missing output file an error of each guest check; an unreadable console log an
error of kernel_log. Scenarios the testbed does not judge from these files (the kernel
selftest, a design's own runner such as RPAL's explore, whose judgments are made live
against the guest's answers) keep the findings they had (findings.json), with only
kernel_log judged again; the report says which scenarios were judged which way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from testbed.check.model import Finding, ScenarioResult, Status
from testbed.designs import Design, get_design
from testbed.errors import TestbedError
from testbed.report.common import RunMeta
from testbed.rundir import RECORD_FILE, ScenarioRecord, judge_scenario, kernel_log_findings
from testbed.snapshot.model import Snapshot, SnapshotFormatError

OUTPUT_LIMIT = 16 << 20  # what the runner judged of a command's output (ssh.MAX_KEPT_OUTPUT)


@dataclass(frozen=True)
class Judged:
    """One scenario judged again: its result, how, and what differs from the run's."""

    result: ScenarioResult
    how: str  # "judged again" or why the findings were carried over
    changes: list[str]  # verdict changes against the findings the run wrote


def rejudge_scenario(run_dir: Path) -> Judged:
    """One scenario's run folder judged again (with its evidence files, as run names them)."""
    from testbed.runner import console_tail, evidence_files

    j = _rejudge_scenario(run_dir)
    j.result.evidence = evidence_files(run_dir, j.result)
    if not j.result.passed:
        j.result.console_tail = console_tail(run_dir / "console.log")
    return j


def _rejudge_scenario(run_dir: Path) -> Judged:
    rec = ScenarioRecord.load(run_dir)
    design = get_design(rec.design)
    result = ScenarioResult(rec.name, [], str(run_dir), rec.bugs, seconds=rec.seconds,
                            error=rec.error, design=design.name)
    for script in ("reproduce.sh", "failure-1.sh"):  # explore's failure replaces the first
        if (run_dir / script).is_file():
            result.reproduce = str(run_dir / script)
    old, old_error = _old_findings(run_dir, rec.name)
    if rec.kind != "workloads":
        result.findings = [f for f in old if f.check != "kernel_log"]
        result.findings += kernel_log_findings(run_dir / "console.log", rec.name)
        if old_error:
            result.findings.append(Finding("scenario", Status.ERROR, old_error, rec.name))
        how = (f"{rec.kind}: findings carried over from findings.json (judged live, not "
               "from files), kernel_log judged again")
        return Judged(result, how, _changes(old, result.findings, old_error))
    sc = design.scenarios.get(rec.scenario)
    if sc is None:
        result.error = (f"scenario {rec.scenario} is not in design {design.name} any more: "
                        "nothing to judge it by")
        return Judged(result, "not judged", [])
    named = replace(sc, name=rec.name)
    snapshots, lost = _snapshots(run_dir, rec)
    text, outputs, output_error = _outputs(run_dir, rec)
    result.output = text
    log, log_error = _checkpoint_log(run_dir, rec)
    result.findings = judge_scenario(design, named, snapshots, outputs, log,
                                     run_dir / "console.log", rec.error)
    result.findings += _lost_findings(design, named.checks, rec.name, lost, output_error,
                                      log_error)
    result.snapshots = {s.name: s for s in snapshots}
    return Judged(result, "judged again", _changes(old, result.findings, old_error))


def _snapshots(run_dir: Path, rec: ScenarioRecord) -> tuple[list[Snapshot], list[tuple[str, str]]]:
    """The snapshots in checkpoint order, and (checkpoint, why) of each one not readable."""
    snaps: list[Snapshot] = []
    lost: list[tuple[str, str]] = []
    for rel in rec.snapshots:
        checkpoint = Path(rel).stem.split("@")[0]
        try:
            snaps.append(Snapshot.load(run_dir / rel))
        except FileNotFoundError:
            lost.append((checkpoint, f"snapshot {rel} is missing from the run folder"))
        except OSError as exc:
            lost.append((checkpoint, f"snapshot {rel} cannot be read ({exc.strerror})"))
        except (SnapshotFormatError, ValueError) as exc:
            lost.append((checkpoint, f"snapshot {rel} is unusable: {exc}"))
    return snaps, lost


def _outputs(run_dir: Path, rec: ScenarioRecord
             ) -> tuple[str, list[tuple[str, str, int | None]], str]:
    """The workloads' output as the runner split it, or why it can't be read."""
    from testbed.runner import split_output

    if not rec.output_file:
        return "", [], ""  # the workloads never finished: the run judged no output either
    try:
        with open(run_dir / rec.output_file, "rb") as f:
            text = f.read(OUTPUT_LIMIT).decode(errors="replace")
    except OSError as exc:
        return "", [], (f"the workloads' output {rec.output_file} cannot be read from the "
                        f"run folder ({exc.strerror})")
    outs = [(w.split()[0], out, status) for w, (out, status)
            in zip(rec.workloads, split_output(text, len(rec.workloads)), strict=True)]
    return text, outs, ""


def _checkpoint_log(run_dir: Path, rec: ScenarioRecord) -> tuple[list[dict[str, Any]], str]:
    path = run_dir / "checkpoints.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        # written at the first checkpoint request: none means none was made
        return [], ("checkpoints.jsonl is missing but the run took snapshots"
                    if rec.snapshots else "")
    except OSError as exc:
        return [], f"checkpoints.jsonl cannot be read ({exc.strerror})"
    out: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            return out, f"checkpoints.jsonl line {n} is not JSON"
        if isinstance(entry, dict):
            out.append(entry)
    return out, ""


def _lost_findings(design: Design, declared: tuple[str, ...], scenario: str,
                   lost: list[tuple[str, str]], output_error: str, log_error: str
                   ) -> list[Finding]:
    """Errors for what the run folder lacks: never a pass for a check that could not look."""
    def source(c: str) -> str:
        info = design.checks.get(c)
        return info.source if info is not None else "host"

    host = [c for c in declared if source(c) == "host" and c != "kernel_log"] or ["snapshot"]
    guest = [c for c in declared if source(c) == "guest"]
    out = [Finding(c, Status.ERROR, f"{why}: cannot judge {c} at {checkpoint}", scenario,
                   checkpoint) for checkpoint, why in lost for c in host]
    if output_error:
        out += [Finding(c, Status.ERROR, f"{output_error}: cannot judge {c}", scenario)
                for c in guest or ["output"]]
    if log_error:
        out.append(Finding("snapshot", Status.ERROR, f"{log_error}: refused checkpoints "
                           "cannot be judged", scenario))
    return out


def _old_findings(run_dir: Path, scenario: str) -> tuple[list[Finding], str]:
    """The findings the run wrote (findings.json), or an error when they can't be read."""
    try:
        raw = json.loads((run_dir / "findings.json").read_text())
        return [Finding.from_dict(d) for d in raw], ""
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [], f"findings.json of {scenario} cannot be read ({exc})"


def _verdicts(findings: list[Finding]) -> dict[tuple[str, str, str], str]:
    out: dict[tuple[str, str, str], str] = {}
    rank = {"pass": 0, "skip": 0, "fail": 1, "error": 2}
    for f in findings:
        key = (f.check, f.checkpoint, f.subject)
        if rank[f.status.value] >= rank.get(out.get(key, "pass"), 0):
            out[key] = f.status.value
    return out


def _changes(old: list[Finding], new: list[Finding], old_error: str) -> list[str]:
    """Each (check, checkpoint, subject) whose status differs from the run's, as a line."""
    if old_error:
        return [old_error]
    a, b = _verdicts(old), _verdicts(new)
    lines = []
    for key in dict.fromkeys([*a, *b]):
        if a.get(key) != b.get(key):
            check, cp, subj = key
            name = check + (f"[{cp}]" if cp else "") + (f" {subj}" if subj else "")
            lines.append(f"{name}: {a.get(key, 'none')} -> {b.get(key, 'none')}")
    return lines


def scenario_dirs(run_dir: Path) -> list[Path]:
    """A scenario's folder itself, or the scenario folders of a run, in the run's order."""
    if not run_dir.is_dir():
        raise TestbedError(f"run folder {run_dir} does not exist: pass the folder `testbed "
                           "run` printed (or one scenario's folder in it)")
    if (run_dir / RECORD_FILE).is_file():
        return [run_dir]
    found = sorted(d for d in run_dir.iterdir() if (d / RECORD_FILE).is_file())
    order = {Path(s.get("run_dir", "")).name: i
             for i, s in enumerate(_report_doc(run_dir).get("scenarios", []))}
    found.sort(key=lambda d: (order.get(d.name, len(order)), d.name))
    if not found:
        raise TestbedError(f"{run_dir} holds no scenario run folder (none with "
                           f"{RECORD_FILE}): pass a folder of `testbed run` (a run of an "
                           "older testbed can't be judged again)")
    return found


def _report_doc(folder: Path) -> dict[str, Any]:
    try:
        doc = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def rejudge(run_dir: Path) -> tuple[RunMeta, list[Judged]]:
    """Every scenario of a run folder judged again, with the run's metadata."""
    from testbed.run_commands import all_checks

    dirs = scenario_dirs(run_dir)
    judged = [rejudge_scenario(d) for d in dirs]
    parent = run_dir if dirs != [run_dir] else run_dir.parent
    doc = _report_doc(parent)
    meta = RunMeta.from_dict(doc.get("run", {})) if doc else RunMeta()
    designs = {j.result.design for j in judged} or {meta.design or "rpal"}
    design = get_design(sorted(designs)[0])
    meta.design, meta.title, meta.checks = design.name, design.title, all_checks(design)
    if not meta.bugs and judged:
        meta.bugs = judged[0].result.bugs
    meta.extra["rejudged"] = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": str(run_dir),
        "how": {j.result.scenario: j.how for j in judged},
        "changes": {j.result.scenario: j.changes for j in judged if j.changes},
    }
    return meta, judged
