"""RPAL ("Run Process As Library"): its checks, scenarios, injected bugs and judge.

checks.py: the invariants (host checks from snapshots; guest checks named for the
workloads' verdict lines); scenarios.py: what the guests run; output.py: verdict-line
name -> check. The reference kernel is kernel-patches/rpal-ref; its injected bugs
(rpal.bug=NAME) are described in its README.
"""

from __future__ import annotations

from typing import Any

from testbed.designs import Design
from testbed.designs.rpal.checks import CHECKS, judge
from testbed.designs.rpal.kernel import requires
from testbed.designs.rpal.output import OUTPUT_CHECKS
from testbed.designs.rpal.scenarios import SCENARIOS


def _run_security(*args: Any) -> None:
    """The scenario security: the review's rows (imported when it runs)."""
    from testbed.designs.rpal.security.runner import run_security_scenario

    run_security_scenario(*args)


def _run_explore(*args: Any) -> None:
    """The scenario explore: a bounded `testbed explore` (imported when it runs)."""
    from testbed.designs.rpal.explore.scenario import run_explore_scenario

    run_explore_scenario(*args)


# The injected bugs of the reference kernel (rpal.bug=NAME): each is named by some check.
BUGS: tuple[str, ...] = tuple(sorted({b for c in CHECKS.values() for b in c.bugs}))

DESIGN = Design(
    name="rpal",
    title="RPAL testbed report",
    kernel_series="rpal-ref",
    checks=CHECKS,
    scenarios=SCENARIOS,
    bugs=BUGS,
    bug_param="rpal.bug",
    bug_sysfs="/sys/module/rpal/parameters/bug",
    output_checks=OUTPUT_CHECKS,
    judge_snapshots=judge,
    check_kernel=requires,
    extra={"scenario_runners": {"explore": _run_explore, "security": _run_security}},
)
