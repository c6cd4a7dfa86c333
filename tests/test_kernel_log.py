"""The kernel_log check on console text: real report formats fail, a clean boot passes."""

from __future__ import annotations

import pytest

from testbed.check.kernel_log import MAX_ALARMS, check_kernel_log, scan_alarms

CLEAN = """\
[    0.000000] Linux version 6.1.192 (testbed@testbed) #1 SMP
[    0.512000] rpal: injected bug: skip_peer_flush
[    0.812345] Run /init as init process
TESTBED-READY uptime=0.90
[    2.000000] tb-rpal_pair[77]: segfault at 7f0000001000 ip 000055 sp 00007ff error 4
"""

SAMPLES = [
    ("bad_page", "[   12.345678] BUG: Bad page map in process tb-rpal_pair  pte:8000000004a3b025"),
    ("bad_page", "[    3.100000] BUG: Bad page state in process swapper/0  pfn:04a3b"),
    ("bad_page", "[    3.1] BUG: Bad rss-counter state mm:000000001234 type:MM_ANONPAGES val:1"),
    ("bad_page", "[    1.0] mm/pgtable-generic.c:53: bad pud 00000000ab(0000000004a3b067)"),
    ("warning", "[    5.0] WARNING: CPU: 1 PID: 88 at arch/x86/mm/rpal.c:321 rpal_release+0x5/0x9"),
    ("oops", "[    5.0] Oops: 0000 [#1] PREEMPT SMP NOPTI"),
    ("bug", "[    5.0] BUG: kernel NULL pointer dereference, address: 0000000000000008"),
    ("bug", "[    5.0] kernel BUG at mm/memory.c:1234!"),
    ("gpf", "[    5.0] general protection fault, probably for non-canonical address 0xdead: 0000"),
    ("kasan", "[    5.0] BUG: KASAN: use-after-free in rpal_request+0x10/0x20"),
    ("lockdep", "[    5.0] WARNING: possible circular locking dependency detected"),
    ("lockdep", "[    5.0] WARNING: suspicious RCU usage"),
    ("panic", "[    9.0] Kernel panic - not syncing: Fatal exception"),
    ("soft_lockup", "[   30.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [tb:80]"),
    ("rcu_stall", "[   30.0] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:"),
    ("hung_task", "[  150.0] INFO: task tb-rpal_pair:80 blocked for more than 120 seconds."),
    ("ubsan", "[    5.0] UBSAN: shift-out-of-bounds in arch/x86/mm/rpal.c:10:5"),
]


def test_clean_console_passes() -> None:
    (f,) = check_kernel_log(CLEAN, scenario="pair")
    assert f.passed and not f.error and f.check == "kernel_log"


@pytest.mark.parametrize(("kind", "line"), SAMPLES)
def test_each_report_format_fails(kind: str, line: str) -> None:
    text = CLEAN + line + "\n[    5.1] Call Trace:\n[    5.1]  <TASK>\n"
    (f,) = check_kernel_log(text, scenario="pair")
    assert f.status == "fail" and f.source == "host"
    assert f.evidence["alarms"][0]["kind"] == kind
    assert f.evidence["lines"][0] == line.split("] ", 1)[1]
    assert "Call Trace:" in f.evidence["alarms"][0]["context"]


def test_missing_console_is_an_error_not_a_pass() -> None:
    (f,) = check_kernel_log(None, scenario="pair", why_missing="no such file")
    assert f.error and not f.passed and "no such file" in f.message


def test_evidence_is_bounded_but_the_count_is_exact() -> None:
    text = "\n".join(f"[ 1.0] WARNING: CPU: 0 PID: {i} at x.c:1 f+0x0/0x1" + "A" * 5000
                     for i in range(500))
    alarms, count = scan_alarms(text)
    assert count == 500 and len(alarms) == MAX_ALARMS
    assert all(len(a.line) <= 300 for a in alarms)


def test_control_characters_do_not_reach_the_evidence() -> None:
    alarms, _ = scan_alarms("[ 1.0] BUG: Bad page map\x1b[2J\x00 in process x\n")
    assert alarms and all(c.isprintable() for c in alarms[0].line)
