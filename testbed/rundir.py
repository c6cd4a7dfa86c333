"""What a scenario's run folder keeps so that it can be judged again without a guest.

`testbed run` writes `scenario.json` (a `ScenarioRecord`) into every scenario's run
folder: which scenario of which design ran, in which paging mode, with which injected
bugs, which workloads, the file that holds their output, and the snapshot files in
checkpoint order. `judge_scenario` is THE judging step of a scenario that ran
workloads: `testbed run` calls it on what it has just seen, `testbed report RUN_DIR`
(testbed/report/rejudge.py) on what the run folder kept, so that the two give the same
verdicts on an unchanged tree, and a changed or new check can be tried on old runs.

What the run folder lacks (a snapshot file missing or unreadable, the output file
gone) makes the checks that needed it errors, never passes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.check.kernel_log import check_kernel_log
from testbed.check.model import Finding, Status, missing_checks
from testbed.designs import Design, Scenario
from testbed.errors import TestbedError

RECORD_FILE = "scenario.json"
SCHEMA = "testbed.scenario"
SCHEMA_VERSION = 1
CONSOLE_SCAN_LIMIT = 32 << 20  # bytes of a console log the kernel_log check reads

# how a scenario ran: its workloads over SSH (judged here), the kernel selftest, or a
# design's own runner (RPAL: explore); the last two are judged by their own code
KINDS = ("workloads", "selftest", "special")


@dataclass
class ScenarioRecord:
    """scenario.json: what ran in a scenario's run folder (paths relative to it)."""

    name: str  # the result's name, e.g. pair@l5
    scenario: str  # the design's scenario, e.g. pair
    design: str
    bugs: tuple[str, ...] = ()
    mode: str = ""  # paging mode name (testbed.runner.MODES), "" when none was given
    paging: int = 5
    pti: str = "auto"
    kind: str = "workloads"
    workloads: tuple[str, ...] = ()
    output_file: str = ""  # the workloads' stdout (command-N.stdout); "" if they never ran
    snapshots: list[str] = field(default_factory=list)  # in checkpoint order
    error: str = ""  # the scenario could not run (as ScenarioResult.error)
    seconds: float = 0.0
    kernel: dict[str, str] = field(default_factory=dict)  # path, key, series
    dump: str = ""  # the memory dump taken at the first failing checkpoint (dump.json)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "name": self.name,
            "scenario": self.scenario, "design": self.design, "bugs": list(self.bugs),
            "mode": self.mode, "paging": self.paging, "pti": self.pti, "kind": self.kind,
            "workloads": list(self.workloads), "output_file": self.output_file,
            "snapshots": list(self.snapshots), "error": self.error, "seconds": self.seconds,
            "kernel": dict(self.kernel), "dump": self.dump,
        }

    @classmethod
    def from_json(cls, d: Any, where: str = RECORD_FILE) -> ScenarioRecord:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ValueError(f"{where}: not a {SCHEMA} document")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{where}: schema_version {d.get('schema_version')!r}, this "
                             f"testbed reads {SCHEMA_VERSION}")
        try:
            rec = cls(
                name=str(d["name"]), scenario=str(d["scenario"]), design=str(d["design"]),
                bugs=tuple(str(b) for b in d.get("bugs", ())), mode=str(d.get("mode", "")),
                paging=int(d.get("paging", 5)), pti=str(d.get("pti", "auto")),
                kind=str(d.get("kind", "workloads")),
                workloads=tuple(str(w) for w in d.get("workloads", ())),
                output_file=str(d.get("output_file", "")),
                snapshots=[str(s) for s in d.get("snapshots", ())],
                error=str(d.get("error", "")), seconds=float(d.get("seconds", 0.0)),
                kernel={str(k): str(v) for k, v in dict(d.get("kernel", {})).items()},
                dump=str(d.get("dump", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: malformed ({exc!r})") from None
        if rec.kind not in KINDS:
            raise ValueError(f"{where}: kind {rec.kind!r} is not one of {', '.join(KINDS)}")
        for rel in [rec.output_file, *rec.snapshots, rec.dump]:
            if rel and (Path(rel).is_absolute() or ".." in Path(rel).parts):
                raise ValueError(f"{where}: {rel!r} is not a path inside the run folder")
        return rec

    def write(self, run_dir: Path) -> Path:
        path = run_dir / RECORD_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, run_dir: Path) -> ScenarioRecord:
        path = run_dir / RECORD_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise TestbedError(f"{run_dir} has no {RECORD_FILE}: not a scenario's run folder "
                               "(or one written by an older testbed): run it again") from None
        except (OSError, ValueError) as exc:
            raise TestbedError(f"{path} cannot be read ({exc}): run the scenario again"
                               ) from None
        try:
            return cls.from_json(doc, str(path))
        except ValueError as exc:
            raise TestbedError(f"{exc}: run the scenario again") from None


def snapshot_file(name: str, taken: Iterable[str]) -> str:
    """The file (relative to the run folder) for a snapshot at checkpoint `name`: a
    checkpoint reached again gets NAME@2.json, NAME@3.json... ('@' is in no checkpoint
    name), so that every snapshot is kept for judging it again."""
    taken = set(taken)
    rel = f"snapshots/{name}.json"
    n = 1
    while rel in taken:
        n += 1
        rel = f"snapshots/{name}@{n}.json"
    return rel


TIMINGS_FILE = "snapshot-timings.jsonl"


def save_snapshot(snap: Any, run_dir: Path, taken: Sequence[str], *, timing: bool = True
                  ) -> str:
    """Write a checkpoint's snapshot into the run folder (snapshot_file); its file name.

    Without `timing` the file holds the guest's state only (what a replay must give byte
    for byte): the snapshot's timings go to TIMINGS_FILE instead, one line per snapshot.
    """
    from dataclasses import replace

    from testbed.boot.machine import check_checkpoint_name

    check_checkpoint_name(snap.name)  # from the guest: also checked where it is parsed
    rel = snapshot_file(snap.name, taken)
    path = run_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if not timing:
        with open(run_dir / TIMINGS_FILE, "a") as log:
            log.write(json.dumps({"file": rel, "timing": snap.timing}) + "\n")
        snap = replace(snap, timing={})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(snap.dumps() + "\n")
    tmp.replace(path)
    return rel


def kernel_log_findings(console_log: Path, scenario: str) -> list[Finding]:
    """The kernel_log check over a guest's console log (an error when it can't be read).

    The guest controls how much it prints: at most CONSOLE_SCAN_LIMIT bytes are read.
    """
    try:
        with open(console_log, "rb") as f:
            data = f.read(CONSOLE_SCAN_LIMIT)
        text: str | None = data.decode(errors="replace")
        why = ""
    except OSError as exc:
        text, why = None, f"{console_log}: {exc.strerror}"
    return list(check_kernel_log(text, scenario=scenario, why_missing=why))


def checkpoint_error_findings(entries: Iterable[dict[str, Any]], scenario: str
                              ) -> list[Finding]:
    """A refused or failed checkpoint (checkpoints.jsonl) is a finding of its own."""
    return [
        Finding("snapshot", Status.ERROR, f"snapshot at {e.get('name', '?')} failed: "
                f"{e['error']}", scenario, str(e.get("name", "")))
        for e in entries if "error" in e
    ]


def judge_scenario(design: Design, sc: Scenario, snapshots: Sequence[Any],
                   outputs: Sequence[tuple[str, str, int | None]],
                   checkpoint_log: Iterable[dict[str, Any]], console_log: Path,
                   error: str = "") -> list[Finding]:
    """Every finding of a scenario that ran workloads (`sc` named as its result, e.g.
    pair@l5): the kernel log, failed checkpoints, the workloads' verdict lines and the
    design's host checks over the snapshots in checkpoint order, and an error for each
    declared check without a finding (unless the scenario could not run at all)."""
    out = kernel_log_findings(console_log, sc.name)
    out += checkpoint_error_findings(checkpoint_log, sc.name)
    out += design.judge(snapshots, sc, outputs)
    if not error:
        out += missing_checks(sc.checks, out, scenario=sc.name)
    return out
