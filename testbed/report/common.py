"""What every report format shares: run metadata, test cases (finding groups), totals, evidence.

A *case* is what a CI UI shows as one test: the findings of one check at one checkpoint about
one subject (normally exactly one finding). A scenario that could not run (ScenarioResult.error)
is one more case, check "scenario", with status "error". A case's status is the worst of its
findings' (error, then fail), `skip` when all of them are skips, else `pass`. The terminal
summary, JUnit, JSON and HTML all count cases the same way, so their totals agree. Every case
shows its source: `host` (judged from snapshots) or `guest` (a guest program's verdict).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2

from testbed.check.model import STATUSES, CheckInfo, Finding, ScenarioResult, Status

from .text import TEMPLATES


@dataclass
class RunMeta:
    """Facts about the run as a whole, shown in every report header."""

    kernel: str = ""  # bzImage path or build id
    osrelease: str = ""  # uname -r of the guest
    bugs: tuple[str, ...] = ()  # injected bugs (rpal.bug=) of the run
    accel: str = ""  # kvm / tcg
    started: str = ""  # ISO 8601 time the run began
    seconds: float = 0.0  # wall time of the whole run
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds (build, boot...)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth showing
    design: str = ""  # the design under test (testbed.designs)
    title: str = "testbed report"
    checks: dict[str, CheckInfo] = field(default_factory=dict)  # the design's checks
    # the kernel under test: path, vmlinux, key, series, base_version, osrelease, version
    # (testbed.build.kernel.kernel_facts; key/series/base only for a cached build)
    kernel_info: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "design": self.design,
            "title": self.title,
            "kernel": self.kernel,
            "osrelease": self.osrelease,
            "bugs": list(self.bugs),
            "accel": self.accel,
            "started": self.started,
            "seconds": self.seconds,
            "timings": dict(self.timings),
            "extra": dict(self.extra),
            "checks": [c.to_dict() for c in self.checks.values()],
            "kernel_info": dict(self.kernel_info),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunMeta:
        return cls(
            kernel=str(d.get("kernel", "")),
            osrelease=str(d.get("osrelease", "")),
            bugs=tuple(d.get("bugs", ())),
            accel=str(d.get("accel", "")),
            started=str(d.get("started", "")),
            seconds=float(d.get("seconds", 0.0)),
            timings=dict(d.get("timings", {})),
            extra=dict(d.get("extra", {})),
            design=str(d.get("design", "")),
            title=str(d.get("title", "testbed report")),
            checks={c["name"]: CheckInfo(c["name"], c["title"], c["invariant"],
                                         tuple(c["bugs"]), c["source"])
                    for c in d.get("checks", [])},
            kernel_info={str(k): str(v) for k, v in dict(d.get("kernel_info", {})).items()},
        )


@dataclass(frozen=True)
class Case:
    scenario: str
    check: str
    checkpoint: str
    subject: str
    findings: tuple[Finding, ...]
    error_text: str = ""  # only for the "scenario could not run" case

    @property
    def status(self) -> str:
        if self.error_text or any(f.status is Status.ERROR for f in self.findings):
            return "error"
        if any(f.status is Status.FAIL for f in self.findings):
            return "fail"
        if self.findings and all(f.status is Status.SKIP for f in self.findings):
            return "skip"
        return "pass"

    @property
    def source(self) -> str:
        """host, guest, or host+guest; a scenario that could not run: host (the testbed's)."""
        return "+".join(sorted({f.source for f in self.findings}, reverse=True)) or "host"

    @property
    def name(self) -> str:
        """`check[checkpoint] subject`: short, and unique within a scenario."""
        out = self.check
        if self.checkpoint:
            out += f"[{self.checkpoint}]"
        if self.subject:
            out += f" {self.subject}"
        return out

    @property
    def message(self) -> str:
        if self.error_text:
            return self.error_text
        bad = [f for f in self.findings if f.bad] or list(self.findings)
        return "; ".join(dict.fromkeys(f.message for f in bad))


def cases(result: ScenarioResult) -> list[Case]:
    """The result's findings grouped by (check, checkpoint, subject), in first-seen order."""
    groups: dict[tuple[str, str, str], list[Finding]] = {}
    for f in result.findings:
        groups.setdefault((f.check, f.checkpoint, f.subject), []).append(f)
    out = [
        Case(result.scenario, check, cp, subj, tuple(fs))
        for (check, cp, subj), fs in groups.items()
    ]
    if result.error:
        out.append(Case(result.scenario, "scenario", "", "", (), error_text=result.error))
    return out


@dataclass(frozen=True)
class Totals:
    scenarios: int = 0
    scenarios_failed: int = 0
    tests: int = 0
    passed: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failures == 0 and self.errors == 0 and self.scenarios_failed == 0

    @property
    def verdict(self) -> str:
        return "PASS" if self.ok else "FAIL"


def totals(results: Iterable[ScenarioResult]) -> Totals:
    counts = dict.fromkeys(STATUSES, 0)
    n = failed = 0
    seconds = 0.0
    for r in results:
        n += 1
        failed += not r.passed
        seconds += r.seconds
        for c in cases(r):
            counts[c.status] += 1
    return Totals(
        scenarios=n,
        scenarios_failed=failed,
        tests=sum(counts.values()),
        passed=counts["pass"],
        failures=counts["fail"],
        errors=counts["error"],
        skipped=counts["skip"],
        seconds=seconds,
    )


def case_counts(result: ScenarioResult) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for c in cases(result):
        counts[c.status] += 1
    return counts


# Evidence keys a reader looks at first (the slot-copy and TLB checks name these).
_FIRST = (
    "pid", "peer_pid", "slot", "expected_table", "actual_table", "expected", "actual",
    "cpu", "tlb_gen", "mm_tlb_gen", "address", "pkey", "pkru",
)


def ordered_evidence(evidence: Mapping[str, Any]) -> list[tuple[str, Any]]:
    first = [(k, evidence[k]) for k in _FIRST if k in evidence]
    return first + [(k, v) for k, v in evidence.items() if k not in _FIRST]


def short_value(v: Any, limit: int = 60) -> str:
    if isinstance(v, str):
        s = v
    else:
        s = json.dumps(v, default=json_default, separators=(",", ":"))
    s = printable(s)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def compact_evidence(evidence: Mapping[str, Any], width: int = 200) -> str:
    """`k=v k=v ...` on one line of at most `width` characters, most telling keys first."""
    parts = [f"{k}={short_value(v)}" for k, v in ordered_evidence(evidence)]
    out = ""
    for i, p in enumerate(parts):
        cand = p if not out else f"{out} {p}"
        if len(cand) > width:
            rest = len(parts) - i
            return f"{out} (+{rest} more)" if out else p[: width - 1] + "…"
        out = cand
    return out


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """One line, with control characters (terminal escapes from guest output) shown as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", " ".join(text.split()))


def pretty_evidence(evidence: Mapping[str, Any]) -> str:
    return json.dumps(dict(ordered_evidence(evidence)), indent=2, default=json_default)


def json_default(o: Any) -> Any:
    """JSON for what evidence may hold besides plain values: sets, bytes, dataclasses."""
    if isinstance(o, set | frozenset):
        return sorted(o, key=str)
    if isinstance(o, bytes | bytearray):
        return o.hex()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def _env(**options: Any) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        **options,
    )


def text_env() -> jinja2.Environment:
    """Plain-text templates (no escaping: the terminal is not a browser)."""
    return _env(keep_trailing_newline=True, autoescape=False)


def file_url(path: str) -> str:
    """A link to a local file (absolute paths as file:// URLs, relative ones as they are)."""
    from pathlib import Path
    from urllib.parse import quote

    return "file://" + quote(path) if Path(path).is_absolute() else quote(path)


def html_env() -> jinja2.Environment:
    env = _env(autoescape=True)
    env.filters["file_url"] = file_url
    return env
