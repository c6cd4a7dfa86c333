"""Findings: what a check concluded, with the evidence to locate a bug without rerunning."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One conclusion of one check at one place (scenario, checkpoint, subject).

    `passed` False is a violation of the invariant; `error` says the check could
    not be evaluated (missing snapshot, unparseable output): that fails too.
    `evidence` holds the facts a reader needs: addresses, entries, expected and
    actual values, the CPU and its TLB generation...
    """

    check: str
    passed: bool
    message: str
    scenario: str = ""
    checkpoint: str = ""
    subject: str = ""  # e.g. "A (pid 123) slot 5"
    evidence: dict[str, Any] = field(default_factory=dict)
    error: bool = False

    @property
    def status(self) -> str:
        return "error" if self.error else ("pass" if self.passed else "fail")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status
        return d


@dataclass(frozen=True)
class CheckInfo:
    """A named check: what invariant it verifies and which injected bugs it is named for."""

    name: str
    title: str
    invariant: str
    bugs: tuple[str, ...]


@dataclass
class ScenarioResult:
    scenario: str
    findings: list[Finding]
    run_dir: str = ""
    bugs: tuple[str, ...] = ()  # injected bugs the guest booted with
    seconds: float = 0.0
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)  # checkpoint -> snapshot
    output: str = ""  # guest output of the workloads
    error: str = ""  # the scenario could not run (guest panic, hang...)
    reproduce: str = ""  # a script that runs the scenario again (runner.write_reproducer)

    @property
    def passed(self) -> bool:
        return not self.error and all(f.passed and not f.error for f in self.findings)

    def failed_checks(self) -> set[str]:
        out = {f.check for f in self.findings if not f.passed or f.error}
        if self.error:
            out.add("scenario")
        return out


def summarize(results: Iterable[ScenarioResult]) -> dict[str, int]:
    counts = {"pass": 0, "fail": 0, "error": 0}
    for r in results:
        for f in r.findings:
            counts[f.status] += 1
        if r.error:
            counts["error"] += 1
    return counts
