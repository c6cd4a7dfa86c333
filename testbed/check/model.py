"""Findings: what a check concluded, with the evidence to locate a bug without rerunning.

Four statuses:

- `pass`: the invariant holds where the check looked;
- `fail`: it is violated (or a workload's claim contradicts what the host read);
- `error`: the check could not be evaluated (data the host could not read, a missing
  snapshot, unparseable output, a declared check that produced nothing): never a pass;
- `skip`: the check has nothing to judge there (a selftest case the kernel skipped, a
  checkpoint without services); counted and shown, neither a pass nor a failure.

Each finding says where its verdict comes from (`source`): `host`, judged from what the
host read (snapshots, the kernel log), or `guest`, a guest program's own verdict line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

Source = Literal["host", "guest"]
SOURCES: tuple[Source, ...] = ("host", "guest")


class Status(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    ERROR = "error"
    SKIP = "skip"

    @classmethod
    def of(cls, ok: bool) -> Status:
        return cls.PASS if ok else cls.FAIL


STATUSES = tuple(s.value for s in Status)


@dataclass(frozen=True)
class Finding:
    """One conclusion of one check at one place (scenario, checkpoint, subject).

    `evidence` holds the facts a reader needs: addresses, entries, expected and
    actual values, the CPU and its TLB generation...
    """

    check: str
    status: Status
    message: str
    scenario: str = ""
    checkpoint: str = ""
    subject: str = ""  # e.g. "A (pid 123) slot 5"
    evidence: dict[str, Any] = field(default_factory=dict)
    source: Source = "host"

    def __post_init__(self) -> None:
        if not isinstance(self.status, Status):
            object.__setattr__(self, "status", Status(self.status))
        if self.source not in SOURCES:
            raise ValueError(f"finding source {self.source!r}: not one of {SOURCES}")

    @property
    def passed(self) -> bool:
        return self.status is Status.PASS

    @property
    def bad(self) -> bool:
        """A failure or an error: what makes a scenario fail."""
        return self.status in (Status.FAIL, Status.ERROR)

    @property
    def error(self) -> bool:
        return self.status is Status.ERROR

    @classmethod
    def verdict(cls, check: str, ok: bool, message: str, **kw: Any) -> Finding:
        """A pass or a fail."""
        return cls(check, Status.of(ok), message, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check, "status": self.status.value, "source": self.source,
            "message": self.message, "scenario": self.scenario, "checkpoint": self.checkpoint,
            "subject": self.subject, "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        return cls(
            check=str(d["check"]), status=Status(d["status"]), message=str(d.get("message", "")),
            scenario=str(d.get("scenario", "")), checkpoint=str(d.get("checkpoint", "")),
            subject=str(d.get("subject", "")), evidence=dict(d.get("evidence", {})),
            source=d.get("source", "host"),
        )


@dataclass(frozen=True)
class CheckInfo:
    """A named check: the invariant it verifies, where its verdict comes from (`host`:
    judged from snapshots; `guest`: a workload's verdict lines), the injected bugs it is
    named for."""

    name: str
    title: str
    invariant: str
    bugs: tuple[str, ...]
    source: Source = "host"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "invariant": self.invariant,
                "bugs": list(self.bugs), "source": self.source}


@dataclass
class ScenarioResult:
    scenario: str
    findings: list[Finding]
    run_dir: str = ""
    bugs: tuple[str, ...] = ()  # injected bugs the guest booted with
    seconds: float = 0.0
    snapshots: dict[str, Any] = field(default_factory=dict)  # checkpoint -> Snapshot
    output: str = ""  # guest output of the workloads
    error: str = ""  # the scenario could not run (guest panic, hang...)
    reproduce: str = ""  # a script that runs the scenario again (runner.write_reproducer)
    design: str = ""  # the design whose scenario this is (testbed.designs)
    # what a reader opens first when it failed: name -> path (console, snapshots, reproduce,
    # findings...), and the last lines of its console log
    evidence: dict[str, str] = field(default_factory=dict)
    console_tail: str = ""
    repeat: int = 0  # which repetition of `testbed matrix --repeat` (0 for run)

    @property
    def passed(self) -> bool:
        return not self.error and not any(f.bad for f in self.findings)

    def checks_with(self, status: Status) -> set[str]:
        """The checks with at least one finding of this status."""
        return {f.check for f in self.findings if f.status is status}

    def failed_checks(self) -> set[str]:
        out = {f.check for f in self.findings if f.bad}
        if self.error:
            out.add("scenario")
        return out


def summarize(results: Iterable[ScenarioResult]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for r in results:
        for f in r.findings:
            counts[f.status.value] += 1
        if r.error:
            counts["error"] += 1
    return counts


def missing_checks(declared: Iterable[str], findings: Iterable[Finding], *, scenario: str
                   ) -> list[Finding]:
    """An error finding for each declared check that produced no finding at all."""
    seen = {f.check for f in findings}
    return [
        Finding(c, Status.ERROR, f"declared check {c} produced no finding: not exercised",
                scenario, evidence={"declared": sorted(declared)})
        for c in declared if c not in seen
    ]
