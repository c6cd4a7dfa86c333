"""Designs under test: what the machinery (boot, snapshot, runner, reports) runs and judges.

A design (first: RPAL, `testbed/designs/rpal/`) brings its checks (each with its
source, `host` or `guest`), its scenarios, the names of its reference kernel's
injected bugs, the mapping of its workloads' verdict lines to checks, and a judge
from snapshots to findings. The machinery knows designs only through `Design`
and `get_design(name)`; it imports no design's names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.check.model import CheckInfo, Finding
from testbed.check.output import parse_workload_output
from testbed.errors import TestbedError
from testbed.snapshot.model import Snapshot

DEFAULT_DESIGN = "rpal"
# name -> module that defines DESIGN (imported on first use)
DESIGNS: dict[str, str] = {"rpal": "testbed.designs.rpal"}


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    workloads: tuple[str, ...]  # guest shell commands, run in order
    checks: tuple[str, ...]  # the checks it exercises; each must produce a finding
    smp: int = 2
    selftest: str | None = None  # a kernel selftest suite to run instead (testbed selftest)
    design: str = ""  # the design it belongs to (set by the design's registry)
    # CPUs it cannot do without, and why: QEMU records and replays one vCPU only, so a
    # scenario that needs two cannot be run with --record
    needs_cpus: int = 1
    needs_cpus_why: str = ""
    # a suite of its own (e.g. "security"): left out of the default selection, run with
    # `testbed run --suite NAME` (or by name)
    suite: str = ""


# judge(snapshots, scenario) -> findings of the design's host checks
Judge = Callable[[Sequence[Snapshot], Scenario], list[Finding]]


@dataclass(frozen=True)
class Design:
    name: str
    title: str
    kernel_series: str  # the reference kernel (testbed kernel build --series)
    checks: Mapping[str, CheckInfo]
    scenarios: Mapping[str, Scenario]
    bugs: tuple[str, ...]  # injected bugs of the reference kernel (NAME of bug=NAME)
    bug_param: str  # the kernel command line parameter that injects them, e.g. "rpal.bug"
    bug_sysfs: str  # where the guest shows the bugs in effect ("none" or "a,b")
    output_checks: Mapping[str, str]  # workload verdict-line name -> check
    judge_snapshots: Judge
    extra: dict[str, Any] = field(default_factory=dict)
    # check_kernel(bzImage): TestbedError, before any guest boots, for a kernel the
    # design's scenarios cannot run on (e.g. one without the feature at all)
    check_kernel: Callable[[Path], None] | None = None

    def judge(self, snapshots: Sequence[Snapshot], scenario: Scenario,
              outputs: Sequence[tuple[str, str, int | None]] = ()) -> list[Finding]:
        """Findings from the workloads' outputs ((workload, text, exit status), source
        guest) and from the snapshots (the design's host checks)."""
        out: list[Finding] = []
        for workload, text, status in outputs:
            out += parse_workload_output(text, scenario=scenario.name, workload=workload,
                                         status=status, checks=self.output_checks)
        out += self.judge_snapshots(snapshots, scenario)
        return out

    def bug_append(self, bugs: Sequence[str]) -> str:
        return f"{self.bug_param}={','.join(bugs)}" if bugs else ""

    @property
    def suites(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.suite for s in self.scenarios.values() if s.suite))

    def select(self, names: Sequence[str] | None, suite: str | None = None) -> list[Scenario]:
        """The scenarios named, else those of `suite`, else the default job (no suite)."""
        if suite is not None and suite not in self.suites:
            raise TestbedError(f"unknown suite {suite}: choose from "
                               f"{', '.join(self.suites) or 'none'}")
        if not names:
            return [s for s in self.scenarios.values() if s.suite == (suite or "")]
        unknown = [n for n in names if n not in self.scenarios]
        if unknown:
            raise TestbedError(
                f"unknown scenario {', '.join(unknown)}: choose from {', '.join(self.scenarios)}"
            )
        return [self.scenarios[n] for n in names]

    def check_bugs(self, bugs: Sequence[str]) -> None:
        unknown = [b for b in bugs if b not in self.bugs]
        if unknown:
            raise TestbedError(
                f"unknown bug {', '.join(unknown)}: choose from {', '.join(self.bugs)}")


def get_design(name: str = DEFAULT_DESIGN) -> Design:
    if name not in DESIGNS:
        raise TestbedError(f"unknown design {name}: choose from {', '.join(DESIGNS)}")
    design = importlib.import_module(DESIGNS[name]).DESIGN
    assert isinstance(design, Design)
    return design
