"""Guest verdict lines: a workload's own claims, as findings with source `guest`.

Workloads print one line per check, "ROLE: ok NAME: detail" or
"ROLE: FAIL NAME: detail" (guest/lib/rpal.c, rpal_check()). A design maps
each NAME to the check that covers the same invariant (`checks`); a NAME it
does not know becomes a finding of check "workload".
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from testbed.check.model import Finding, Status

MAX_VERDICTS = 2000  # verdict lines read from one workload's output
LINE_RE = re.compile(r"^(?P<role>[\w-]+): (?P<verdict>ok|FAIL) (?P<name>[\w-]+): (?P<detail>.*)$")


def parse_workload_output(text: str, *, scenario: str, workload: str, status: int | None,
                          checks: Mapping[str, str]) -> list[Finding]:
    """Findings from a workload's output; an exit status that disagrees is an error finding."""
    out: list[Finding] = []
    for line in text.splitlines():
        m = LINE_RE.match(line.strip())
        if not m or m["name"] == "checkpoint":
            continue
        if len(out) == MAX_VERDICTS:  # the guest's output is hostile: bounded findings
            out.append(Finding("workload", Status.ERROR, f"{workload} printed more than "
                               f"{MAX_VERDICTS} verdict lines: the rest were not read",
                               scenario, workload, source="guest"))
            break
        check = checks.get(m["name"], "workload")
        out.append(Finding(
            check, Status.of(m["verdict"] == "ok"), f"{m['role']}: {m['name']}: {m['detail']}",
            scenario, workload, subject=m["role"],
            evidence={"workload": workload, "line": line.strip()}, source="guest",
        ))
    failed = any(f.status is Status.FAIL for f in out)
    tail = {"tail": text[-2000:]}
    if status is None:
        out.append(Finding("workload", Status.ERROR, f"{workload} did not finish", scenario,
                           workload, evidence=tail, source="guest"))
    elif status != 0 and not failed:
        out.append(Finding(
            "workload", Status.ERROR,
            f"{workload} exited with status {status} without naming a check",
            scenario, workload, evidence=tail, source="guest",
        ))
    elif not out:
        out.append(Finding("workload", Status.ERROR, f"{workload} printed no verdict lines",
                           scenario, workload, evidence=tail, source="guest"))
    return out
