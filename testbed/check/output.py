"""Functional checks: the guest workloads' own verdict lines, mapped to the host's checks.

Workloads print one line per check, "ROLE: ok NAME: detail" or
"ROLE: FAIL NAME: detail" (guest/lib/rpal.c, rpal_check()). Each becomes a
Finding of the host check that covers the same invariant.
"""

from __future__ import annotations

import re

from testbed.check.model import Finding

# workload check name -> host check name (testbed.check.rpal.CHECKS)
OUTPUT_CHECKS = {
    "slot_layout": "slot_confinement",
    "request": "slot_copies",
    "release_call": "slot_copies",
    "release": "slot_copies",
    "repair": "slot_copies",
    "pkru": "pkru",
    "keys_locked": "keys",
    "mmap_tagged": "keys",
    "brk_tagged": "keys",
    "same_pkey": "keys",
    "peer_read": "faults",
    "peer_write": "faults",
    "fault_redirect": "faults",
    "unpaired": "faults",
    "pkey_deny": "isolation",
    "gadget": "isolation",
    "remap": "tlb_shootdown",
    "protect": "tlb_shootdown",
    "unmap": "tlb_shootdown",
    "dead_key": "exit",
    "exit_copy": "exit",
    "read_count": "exit",
    "ids": "ids",
    "id_delay": "ids",
    "peer_limit": "peer_limit",
}

MAX_VERDICTS = 2000  # verdict lines read from one workload's output
LINE_RE = re.compile(r"^(?P<role>[\w-]+): (?P<verdict>ok|FAIL) (?P<name>[\w-]+): (?P<detail>.*)$")


def parse_workload_output(text: str, *, scenario: str, workload: str, status: int | None
                          ) -> list[Finding]:
    """Findings from a workload's output; an exit status that disagrees is an error finding."""
    out: list[Finding] = []
    for line in text.splitlines():
        m = LINE_RE.match(line.strip())
        if not m or m["name"] == "checkpoint":
            continue
        if len(out) == MAX_VERDICTS:  # the guest's output is hostile: bounded findings
            out.append(Finding("workload", False, f"{workload} printed more than "
                               f"{MAX_VERDICTS} verdict lines: the rest were not read",
                               scenario, workload, error=True))
            break
        check = OUTPUT_CHECKS.get(m["name"], "workload")
        ok = m["verdict"] == "ok"
        out.append(Finding(
            check, ok, f"{m['role']}: {m['name']}: {m['detail']}", scenario, workload,
            subject=m["role"], evidence={"workload": workload, "line": line.strip()},
        ))
    failed = any(not f.passed for f in out)
    if status is None:
        out.append(Finding("workload", False, f"{workload} did not finish", scenario, workload,
                           error=True, evidence={"tail": text[-2000:]}))
    elif status != 0 and not failed:
        out.append(Finding(
            "workload", False, f"{workload} exited with status {status} without naming a check",
            scenario, workload, error=True, evidence={"tail": text[-2000:]},
        ))
    elif not out:
        out.append(Finding("workload", False, f"{workload} printed no verdict lines", scenario,
                           workload, error=True, evidence={"tail": text[-2000:]}))
    return out
