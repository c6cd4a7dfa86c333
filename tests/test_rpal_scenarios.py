"""Every RPAL scenario x every check, as pytest items, on the kernel under test.

Select with -k, e.g. `pytest tests/test_rpal_scenarios.py -k "phases and slot_copies"`.
The kernel is $TESTBED_KERNEL or the rpal-ref reference kernel (built when not cached).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from testbed.check.model import Status
from testbed.designs import get_design

DESIGN = get_design("rpal")
CHECKS, SCENARIOS = DESIGN.checks, DESIGN.scenarios

# the checks each scenario exercises (Scenario.checks)
COVERS = {s.name: s.checks for s in SCENARIOS.values()}


def test_every_check_is_covered_by_a_scenario():
    # kernel_log: the runner judges every scenario's console, no scenario declares it
    assert set(CHECKS) - {"kernel_log"} <= set().union(*map(set, COVERS.values()))
    known = set(CHECKS) | {f"selftest:{s.selftest}" for s in SCENARIOS.values() if s.selftest}
    assert set().union(*map(set, COVERS.values())) <= known


def test_matrix_of_some_scenarios_does_not_fail_on_bugs_they_do_not_exercise():
    from testbed.check.model import Finding, ScenarioResult
    from testbed.run_commands import matrix_rows

    ok = ScenarioResult("limits", [Finding("ids", Status.PASS, "ok", "limits")])
    bad = ScenarioResult("limits", [Finding("ids", Status.FAIL, "dup", "limits")])
    per_bug = {"": [[ok]], "exhaustion_frees_id": [[bad]], "same_pkey": [[ok]]}
    rows, problems = matrix_rows(per_bug, list(CHECKS), every_bug_must_show=False)
    verdicts = {r["bug"]: r["verdict"] for r in rows}
    assert verdicts == {"": "ok", "exhaustion_frees_id": "caught",
                        "same_pkey": "not shown by these scenarios"}
    assert problems == []
    _, problems = matrix_rows(per_bug, list(CHECKS))
    assert problems == ["same_pkey not caught by a check named for it in every repetition"]
    _, problems = matrix_rows({"": [[bad]]}, list(CHECKS), every_bug_must_show=False)
    assert problems == ["the correct kernel failed ids"]  # false alarms always count
    # an error (not exercised: the workload crashed) catches nothing; on the correct
    # kernel it is still a problem
    err = ScenarioResult("limits", [Finding("ids", Status.ERROR, "not exercised", "limits")])
    rows, problems = matrix_rows({"": [[ok]], "exhaustion_frees_id": [[err]]}, list(CHECKS))
    assert rows[1]["cells"]["ids"] == "ERR*" and rows[1]["verdict"] == "NOT CAUGHT"
    _, problems = matrix_rows({"": [[err]]}, list(CHECKS), every_bug_must_show=False)
    assert problems == ["the correct kernel failed ids"]


@pytest.mark.vm
@pytest.mark.parametrize(
    "scenario, check", [(s, c) for s, cs in COVERS.items() for c in cs],
)
def test_scenario_check(scenario_result: Callable[..., Any], scenario: str, check: str):
    result = scenario_result(scenario)
    assert not result.error, result.error
    mine = [f for f in result.findings if f.check == check]
    assert mine, f"{scenario} produced no finding for {check}"
    bad = [f for f in result.findings if f.check in (check, "workload", "snapshot") and f.bad]
    assert not bad, "\n".join(f"{f.checkpoint} {f.subject}: {f.message} {f.evidence}"
                              for f in bad)


@pytest.mark.vm
@pytest.mark.rpal_bug("wrong_slot_copy")
def test_guest_and_snapshot_fixtures_show_a_wrong_copy(guest: Any, snapshot: Any):
    """The fixtures themselves: pair two services under wrong_slot_copy, look from the host."""
    from testbed.designs.rpal.checks import check_snapshots
    from testbed.snapshot.live import LiveSnapshotter
    from testbed.snapshot.model import Snapshot, Trigger

    taken: list[Snapshot] = []

    snapper = LiveSnapshotter(guest.qmp, guest.ram_path, guest.cfg.kernel)
    guest.on_checkpoint = lambda ck: taken.append(
        snapper.capture(ck.name, Trigger(ck.name, ck.pid, ck.tid, dict(ck.facts))))
    guest.run("tb-rpal_phases", timeout=300)
    snapper.close()
    findings = check_snapshots(taken, "fixture")
    wrong = [f for f in findings if f.check == "slot_copies" and f.status is Status.FAIL]
    assert wrong and wrong[0].evidence["actual_table"] != wrong[0].evidence["expected_table"]
    now = snapshot()
    assert isinstance(now, Snapshot) and now.to_json()["schema"] == "testbed.snapshot"
