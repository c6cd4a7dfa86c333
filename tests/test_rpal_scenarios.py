"""Every RPAL scenario x every check, as pytest items, on the kernel under test.

Select with -k, e.g. `pytest tests/test_rpal_scenarios.py -k "phases and slot_copies"`.
The kernel is $TESTBED_KERNEL or the rpal-ref reference kernel (built when not cached).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from testbed.check.rpal import CHECKS
from testbed.scenarios import SCENARIOS

pytestmark = pytest.mark.vm

# the checks each scenario exercises (the others have nothing to say there)
COVERS = {
    "phases": ("slot_confinement", "slot_copies", "keys", "pkru", "tlb_state", "exit"),
    "pair": ("slot_confinement", "slot_copies", "keys", "pkru", "faults", "isolation", "exit"),
    "same_pkey": ("keys",),
    "stale_tlb": ("tlb_shootdown",),
    "stray": ("faults", "isolation"),
    "limits": ("slot_confinement", "slot_copies", "keys", "pkru", "exit", "ids", "peer_limit"),
    "protection_keys": ("selftest:protection_keys",),
}


def test_every_check_is_covered_by_a_scenario():
    assert set(COVERS) == set(SCENARIOS)
    assert set(CHECKS) <= set().union(*map(set, COVERS.values()))


@pytest.mark.parametrize(
    "scenario, check", [(s, c) for s, cs in COVERS.items() for c in cs],
)
def test_scenario_check(scenario_result: Callable[..., Any], scenario: str, check: str):
    result = scenario_result(scenario)
    assert not result.error, result.error
    mine = [f for f in result.findings if f.check == check]
    assert mine, f"{scenario} produced no finding for {check}"
    bad = [f for f in result.findings if f.check in (check, "workload", "snapshot")
           and (not f.passed or f.error)]
    assert not bad, "\n".join(f"{f.checkpoint} {f.subject}: {f.message} {f.evidence}"
                              for f in bad)


@pytest.mark.rpal_bug("wrong_slot_copy")
def test_guest_and_snapshot_fixtures_show_a_wrong_copy(guest: Any, snapshot: Any):
    """The fixtures themselves: pair two services under wrong_slot_copy, look from the host."""
    from testbed.check.rpal import check_snapshots

    taken: list[dict[str, Any]] = []
    from testbed.snapshot.live import LiveSnapshotter
    from testbed.snapshot.snapshot import Trigger

    snapper = LiveSnapshotter(guest.qmp, guest.ram_path, guest.cfg.kernel)
    guest.on_checkpoint = lambda ck: taken.append(
        snapper.capture(ck.name, Trigger(ck.name, ck.pid, ck.tid, dict(ck.facts))))
    guest.run("tb-rpal_phases", timeout=300)
    snapper.close()
    findings = check_snapshots(taken, "fixture")
    wrong = [f for f in findings if f.check == "slot_copies" and not f.passed]
    assert wrong and wrong[0].evidence["actual_table"] != wrong[0].evidence["expected_table"]
    now = snapshot()
    assert now["schema"] == "testbed.snapshot"
