"""The guest kernel's own alarms (BUG, WARNING, Oops, Bad page, KASAN, lockdep, panic) as findings.

A kernel whose page-table code is broken often says so itself long before a
workload notices: `BUG: Bad page map`, `Bad page state`, a `WARNING:` with a
call trace. Any such line in the serial console of a scenario's guest fails
the scenario through the `kernel_log` check, with the lines (and the start of
the report that follows each) as evidence. Design-independent: it knows the
kernel's report formats, not RPAL. Pure over text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from testbed.check.model import CheckInfo, Finding, Status

CHECK = CheckInfo(
    "kernel_log", "Kernel log",
    "the guest kernel reports no BUG, WARNING, Oops, bad page, general protection fault, "
    "KASAN/UBSAN/KFENCE report, lockdep splat, RCU stall, soft lockup or panic",
    (),  # a design names its own bugs for it (testbed/designs/*/checks.py)
)

# printk's optional "[    1.234567] " time stamp and "<4>" level prefix are stripped first
_PREFIX_RE = re.compile(r"^(?:<\d>)?(?:\[\s*\d+\.\d+\]\s*)?(?:\[\s*[CT]\d+\]\s*)?")

# (kind, pattern): the first matching kind names the line
ALARMS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pat)) for kind, pat in (
        ("panic", r"^Kernel panic - not syncing"),
        ("kasan", r"^BUG: KASAN: "),
        ("kfence", r"^BUG: KFENCE: "),
        ("ubsan", r"^UBSAN: "),
        ("bad_page", r"^BUG: Bad (?:page|rss)|Bad page (?:state|map)|bad pmd|bad pud|bad p4d|"
                     r"bad pgd"),
        ("soft_lockup", r"^watchdog: BUG: soft lockup|^BUG: soft lockup"),
        ("bug", r"^BUG: |^kernel BUG at "),
        ("oops", r"^Oops: "),
        ("gpf", r"^general protection fault"),
        ("lockdep", r"^WARNING: (?:possible (?:circular|recursive|irq lock inversion)|"
                    r"inconsistent lock state|suspicious RCU usage|bad unlock balance|"
                    r"held lock freed|lock held when returning)|"
                    r"^INFO: (?:possible recursive locking|trying to register non-static key)"),
        ("warning", r"^WARNING: CPU: \d+ PID: \d+|^WARNING: .* at "),
        ("rcu_stall", r"rcu: INFO: rcu_\w+ (?:self-)?detected (?:stalls|stall)"),
        ("hung_task", r"^INFO: task .* blocked for more than"),
    )
)

MAX_ALARMS = 20  # evidence kept per scenario; the count is exact
CONTEXT_LINES = 12  # lines after an alarm kept with it (the call trace's start)
MAX_LINE = 300  # characters kept of one line (the guest controls its console)


@dataclass(frozen=True)
class Alarm:
    kind: str
    line: str  # the alarm line, time stamp stripped, bounded
    lineno: int  # 1-based in the console log
    context: tuple[str, ...]  # the lines after it


def _clean(line: str) -> str:
    line = "".join(c if c.isprintable() else "?" for c in line.rstrip("\r\n"))
    return _PREFIX_RE.sub("", line)[:MAX_LINE]


def scan_alarms(text: str) -> tuple[list[Alarm], int]:
    """The alarms in a console log (at most MAX_ALARMS kept) and how many there were."""
    lines = text.splitlines()
    out: list[Alarm] = []
    count = 0
    for i, raw in enumerate(lines):
        line = _clean(raw)
        kind = next((k for k, pat in ALARMS if pat.search(line)), None)
        if kind is None:
            continue
        count += 1
        if len(out) < MAX_ALARMS:
            ctx = tuple(_clean(x) for x in lines[i + 1:i + 1 + CONTEXT_LINES])
            out.append(Alarm(kind, line, i + 1, ctx))
    return out, count


def check_kernel_log(text: str | None, *, scenario: str, checkpoint: str = "console",
                     why_missing: str = "") -> Iterator[Finding]:
    """One finding: pass when the console is clean, fail with the lines, error when unread."""
    if text is None:
        yield Finding(CHECK.name, Status.ERROR,
                      f"console log not readable: {why_missing or 'missing'}",
                      scenario, checkpoint)
        return
    alarms, count = scan_alarms(text)
    if not alarms:
        yield Finding(CHECK.name, Status.PASS,
                      f"no kernel alarm in {len(text.splitlines())} console lines",
                      scenario, checkpoint, "kernel")
        return
    kinds = sorted({a.kind for a in alarms})
    yield Finding(
        CHECK.name, Status.FAIL,
        f"{count} kernel alarm line(s) ({', '.join(kinds)}); first: {alarms[0].line}",
        scenario, checkpoint, "kernel",
        evidence={"count": count, "lines": [a.line for a in alarms],
                  "alarms": [{"kind": a.kind, "line": a.line, "lineno": a.lineno,
                              "context": list(a.context)} for a in alarms]},
    )
