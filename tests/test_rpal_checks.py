"""The RPAL host checks (testbed/designs/rpal/checks.py) on synthetic typed snapshots, no VM.

One row per injected bug class: the snapshot that shows it fails the check named for it,
the correct snapshot passes it. One row per "could not evaluate" case: an error finding,
never a pass. One row per contradicting workload claim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
from synth import (
    A_TABLE,
    B_TABLE,
    MM_A,
    MM_B,
    MM_INIT,
    cpu,
    facts,
    leaf,
    mm,
    pkru_for,
    rpal_snapshot,
    service_maps,
    slot,
    slots_of,
    with_mm,
    with_task,
    without,
)

from testbed.check.model import Finding, Status
from testbed.designs import get_design
from testbed.designs.rpal import BUGS, DESIGN
from testbed.designs.rpal.checks import (
    CHECKS,
    HOST_CHECKS,
    FactsError,
    check_snapshots,
    expected_pkru,
    own_pkey,
    parse_facts,
)
from testbed.snapshot.model import Absent, Snapshot, Task

Snaps = Callable[[], list[Snapshot]]


def statuses(findings: list[Finding], check: str) -> set[str]:
    return {f.status.value for f in findings if f.check == check}


def judge(snaps: list[Snapshot], declared: tuple[str, ...] = ()) -> list[Finding]:
    return check_snapshots(snaps, "synthetic", declared)


# ----------------------------------------------------------------------------- the correct kernel


@pytest.mark.parametrize("pti", [False, True], ids=["nopti", "pti"])
def test_correct_snapshot_passes_every_host_check(pti: bool) -> None:
    fs = judge([rpal_snapshot(pti=pti)])
    assert fs and all(f.status is Status.PASS for f in fs), [f.message for f in fs if f.bad]
    assert {f.check for f in fs} == set(HOST_CHECKS)
    assert {f.source for f in fs} == {"host"}
    assert all(f.scenario == "synthetic" and f.checkpoint == "paired" for f in fs)


def test_correct_release_and_exit_pass() -> None:
    released = rpal_snapshot("released", paired=False)
    assert not any(f.bad for f in judge([rpal_snapshot(), released]))
    dead = without(rpal_snapshot("exited", paired=False,
                                 fact_map=facts(pairs="A-B", b={"alive": "0"})), 102)
    fs = judge([rpal_snapshot(), dead])
    assert not any(f.bad for f in fs), [f.message for f in fs if f.bad]
    assert any("dead B's slot 2" in f.message for f in fs)


# ----------------------------------------------------------------------------- one row per bug


def _wrong_slot_copy() -> list[Snapshot]:
    return [rpal_snapshot(a_copy=A_TABLE)]  # A's copy of B's slot points at A's own table


def _keep_copy_on_release() -> list[Snapshot]:
    s = rpal_snapshot("released", fact_map=facts(pairs="none"))  # copies left in place
    return [s]


def _keep_copy_on_exit() -> list[Snapshot]:
    s = rpal_snapshot("exited", fact_map=facts(pairs="A-B", b={"alive": "0"}))
    return [rpal_snapshot(), without(s, 102)]  # B gone, A still holds the copy of slot 2


def _copy_without_marker() -> list[Snapshot]:
    s = rpal_snapshot()
    a = tuple(replace(e, marker=False) if e.slot == 2 else e for e in slots_of(s, 101))
    return [with_mm(s, 101, slots=a)]


def _pti_user_root_lacks_copy() -> list[Snapshot]:
    s = rpal_snapshot(pti=True)
    return [with_mm(s, 101, user_slots=(slot(1, A_TABLE),))]


def _same_pkey() -> list[Snapshot]:
    s = rpal_snapshot(fact_map=facts(b={"pkey": "1"}))
    return [with_task(s, 102, mappings=service_maps(2, 1), pkru=pkru_for(1))]


def _untagged_mmap() -> list[Snapshot]:
    s = rpal_snapshot()
    return [with_task(s, 101, mappings=(*service_maps(1, 1), leaf(1, 0x10000000, 1, 0)))]


def _pkru_open() -> list[Snapshot]:
    return [with_task(rpal_snapshot(), 101, pkru=0)]


def _skip_peer_flush() -> list[Snapshot]:
    before = rpal_snapshot("before")
    after = with_mm(rpal_snapshot("after"), 101, tlb_gen=5)  # A flushed, B's generation stayed
    return [before, replace(after, cpus=(cpu(0, MM_A, 5), cpu(1, MM_B, 3)))]


def _stale_cpu_generation() -> list[Snapshot]:
    s = with_mm(rpal_snapshot(), 101, tlb_gen=7)  # CPU 0 has A's mm loaded at generation 3
    return [s]


def _mapping_outside_slots() -> list[Snapshot]:
    s = rpal_snapshot()
    return [with_task(s, 101, mappings=(*service_maps(1, 1), leaf(7, 0x1000, 1, 1)))]


def _unpaired_foreign_entry() -> list[Snapshot]:
    s = rpal_snapshot(paired=False)
    return [with_mm(s, 101, slots=(slot(1, A_TABLE), slot(2, B_TABLE)))]


def _own_entry_marked() -> list[Snapshot]:
    s = rpal_snapshot()
    a = tuple(replace(e, marker=True) if e.slot == 1 else e for e in slots_of(s, 101))
    return [with_mm(s, 101, slots=a)]


def _missing_copy() -> list[Snapshot]:
    s = rpal_snapshot()  # paired, but A's page tables hold no entry for B's slot
    return [with_mm(s, 101, slots=(slot(1, A_TABLE),))]


def _pkey0_mprotect_allowed() -> list[Snapshot]:
    s = rpal_snapshot()  # pkey_mprotect(..., 0) went through: a page of A's slot has key 0
    return [with_task(s, 101, mappings=(*service_maps(1, 1), leaf(1, 0x20000000, 2, 0)))]


def _mremap_drops_pkey() -> list[Snapshot]:
    s = rpal_snapshot()  # the moved range lost its key (its new VMA has pkey 0)
    return [with_task(s, 101, mappings=(*service_maps(1, 1), leaf(1, 0x30000000, 4, 0)))]


def _thread_default_pkru() -> list[Snapshot]:
    # a thread of A at the ordinary default PKRU instead of the service's
    return [with_task(rpal_snapshot(), 101, pkru=0x55555554)]


def _pkey_mprotect_foreign_allowed() -> list[Snapshot]:
    s = rpal_snapshot()  # pkey_mprotect(..., B's key) went through: a page of A's slot has 2
    return [with_task(s, 101, mappings=(*service_maps(1, 1), leaf(1, 0x20000000, 1, 2)))]


def _enable_opens_threads() -> list[Snapshot]:
    # a thread of A created before ENABLE, whose PKRU the enable opened
    return [with_task(rpal_snapshot(), 101, pkru=0)]


def _signal_pkru_inherit() -> list[Snapshot]:
    # A in a signal handler that began with the interrupted PKRU: B's key 2 open as well
    return [with_task(rpal_snapshot(), 101, pkru=pkru_for(1) & ~(3 << 4))]


def _fork_keeps_copy() -> list[Snapshot]:
    # A's fork child (pid 103, its own mm) kept A's copy of B's slot
    s = rpal_snapshot()
    child = mm(0xFFFF888000300000, (103,), (slot(1, 0x7000000), slot(2, B_TABLE, True)))
    return [replace(s, mms=(*s.mms, child))]


def test_a_fork_child_with_its_parents_slot_only_passes() -> None:
    s = rpal_snapshot()
    child = mm(0xFFFF888000300000, (103,), (slot(1, 0x7000000),))  # unmarked: its own
    fs = judge([replace(s, mms=(*s.mms, child))])
    assert "fail" not in statuses(fs, "slot_copies")


def _peer_generation_stayed(owner_pid: int) -> Snaps:
    def make() -> list[Snapshot]:
        before = rpal_snapshot("before")
        after = with_mm(rpal_snapshot("after"), owner_pid, tlb_gen=5)
        return [before, replace(after, cpus=(cpu(0, MM_A, 5 if owner_pid == 101 else 3),
                                             cpu(1, MM_B, 5 if owner_pid == 102 else 3)))]
    return make


BUG_ROWS: dict[str, tuple[Snaps, str]] = {
    "pkey0_mprotect_allowed": (_pkey0_mprotect_allowed, "keys"),
    "mremap_drops_pkey": (_mremap_drops_pkey, "keys"),
    "thread_default_pkru": (_thread_default_pkru, "pkru"),
    "pkey_mprotect_foreign_allowed": (_pkey_mprotect_foreign_allowed, "keys"),
    "enable_opens_threads": (_enable_opens_threads, "pkru"),
    "signal_pkru_inherit": (_signal_pkru_inherit, "pkru"),
    "fork_keeps_copy": (_fork_keeps_copy, "slot_copies"),
    # the per-path flush bugs all show as an owner's flush that left the peer's generation
    "dontneed_skips_peers": (_peer_generation_stayed(101), "tlb_state"),
    "mremap_move_skips_peers": (_peer_generation_stayed(102), "tlb_state"),
    "fork_cow_skips_peers": (_peer_generation_stayed(101), "tlb_state"),
    "first_peer_only_flush": (_peer_generation_stayed(102), "tlb_state"),
    "release_flushes_caller_only": (_peer_generation_stayed(101), "tlb_state"),
    "release_clears_first_peer": (_keep_copy_on_release, "slot_copies"),
    "missing_copy": (_missing_copy, "slot_copies"),
    "wrong_slot_copy": (_wrong_slot_copy, "slot_copies"),
    "keep_copy_on_release": (_keep_copy_on_release, "slot_copies"),
    "keep_copy_on_exit": (_keep_copy_on_exit, "slot_copies"),
    "copy_without_marker": (_copy_without_marker, "slot_copies"),
    "pti_user_root_lacks_copy": (_pti_user_root_lacks_copy, "slot_copies"),
    "own_entry_marked": (_own_entry_marked, "slot_copies"),
    "unpaired_foreign_entry": (_unpaired_foreign_entry, "slot_copies"),
    "same_pkey": (_same_pkey, "keys"),
    "untagged_mmap": (_untagged_mmap, "keys"),
    "pkru_open": (_pkru_open, "pkru"),
    "skip_peer_flush": (_skip_peer_flush, "tlb_state"),
    "stale_cpu_generation": (_stale_cpu_generation, "tlb_state"),
    "mapping_outside_slots": (_mapping_outside_slots, "slot_confinement"),
}


@pytest.mark.parametrize("row", sorted(BUG_ROWS))
def test_injected_bug_fails_its_check(row: str) -> None:
    make, check = BUG_ROWS[row]
    fs = judge(make())
    assert "fail" in statuses(fs, check), [f.message for f in fs if f.check == check]
    bad = [f for f in fs if f.bad]
    assert all(f.evidence for f in bad)
    if row in CHECKS[check].bugs or row in BUGS:
        assert row in CHECKS[check].bugs  # the check is named for the reference kernel's bug


def test_every_host_named_bug_has_a_row() -> None:
    host_bugs = {b for n, c in CHECKS.items() if n in HOST_CHECKS for b in c.bugs}
    # pkey_free: a guest line only; peer_flush_own_gen: the peer's generation does move
    # (with the owner's number), so no snapshot shows it: the stale read and kernel_log do
    assert host_bugs - {"pkey_free_allowed", "peer_flush_own_gen"} <= set(BUG_ROWS)


def test_wrong_copy_evidence_names_both_tables() -> None:
    (f,) = [f for f in judge(_wrong_slot_copy()) if f.status is Status.FAIL]
    assert f.evidence["expected_table"] == hex(B_TABLE)
    assert f.evidence["actual_table"] == hex(A_TABLE)
    assert f.evidence["pid"] == 101 and f.evidence["slot"] == 2


# ----------------------------------------------------------------------------- workload claims


CLAIM_ROWS: dict[str, tuple[dict[str, str], str]] = {
    "id contradicts the unmarked entry": ({"id": "4"}, "page tables own slot 1"),
    "pkey contradicts the leaves": ({"pkey": "3"}, "leaves carry pkey 1"),
}


@pytest.mark.parametrize("row", sorted(CLAIM_ROWS))
def test_contradicting_claim_is_a_failing_finding(row: str) -> None:
    change, text = CLAIM_ROWS[row]
    fs = judge([rpal_snapshot(fact_map=facts(a=change))])
    claims = [f for f in fs if f.check == "claims" and f.status is Status.FAIL]
    assert len(claims) == 1 and text in claims[0].message
    # the host decides: the other checks still judge A by its page tables
    assert not any(f.bad for f in fs if f.check != "claims")


def test_pkru_expected_from_the_leaves_not_the_claim() -> None:
    # the workload was told pkey 3; its leaves carry 1 and so must its PKRU
    fs = judge([rpal_snapshot(fact_map=facts(a={"pkey": "3"}))])
    pk = [f for f in fs if f.check == "pkru" and f.evidence["pid"] == 101]
    assert [f.status for f in pk] == [Status.PASS]
    assert pk[0].evidence["expected"] == hex(expected_pkru(1))


# ----------------------------------------------------------------------------- could not evaluate


def _mappings_absent() -> list[Snapshot]:
    return [with_task(rpal_snapshot(), 101, mappings=Absent("page 0x5000 beyond RAM"))]


def _slots_absent() -> list[Snapshot]:
    return [with_mm(rpal_snapshot(), 101, slots=Absent("root table unreadable"))]


def _user_slots_absent() -> list[Snapshot]:
    return [with_mm(rpal_snapshot(pti=True), 101, user_slots=Absent("user root unreadable"))]


def _tlb_absent() -> list[Snapshot]:
    s = rpal_snapshot()
    return [replace(s, cpus=(replace(s.cpus[0], tlb=Absent("per-CPU area unreadable")),
                             s.cpus[1]))]


def _pkru_absent() -> list[Snapshot]:
    return [with_task(rpal_snapshot(), 101, pkru=Absent("running, no vCPU state"))]


def _service_missing() -> list[Snapshot]:
    return [without(rpal_snapshot(), 101)]


def _no_leaf_in_slot() -> list[Snapshot]:
    return [with_task(rpal_snapshot(), 101, mappings=())]


def _bad_facts() -> list[Snapshot]:
    return [rpal_snapshot(fact_map={"A.pid": "101", "pairs": "A-B"})]


def _pair_names_unknown_service() -> list[Snapshot]:
    return [rpal_snapshot(fact_map=facts(pairs="A-C"))]


def _pti_user_root_not_read() -> list[Snapshot]:
    return [with_mm(rpal_snapshot(pti=True), 101, user_slots=None)]


def _survivor_slots_absent() -> list[Snapshot]:
    dead = without(rpal_snapshot("exited", fact_map=facts(pairs="A-B", b={"alive": "0"})), 102)
    return [rpal_snapshot(), with_mm(dead, 101, slots=Absent("root table unreadable"))]


ERROR_ROWS: dict[str, tuple[Snaps, tuple[str, ...]]] = {
    "PTI user root not read": (_pti_user_root_not_read, ("slot_copies",)),
    "survivor's slot entries absent": (_survivor_slots_absent, ("slot_copies",)),
    "mappings absent": (_mappings_absent, ("slot_confinement", "keys", "pkru", "claims")),
    "slot entries absent": (_slots_absent,
                            ("slot_copies", "slot_confinement", "keys", "pkru", "claims")),
    "PTI user root absent": (_user_slots_absent, ("slot_copies",)),
    "TLB state absent": (_tlb_absent, ("tlb_state",)),
    "PKRU absent": (_pkru_absent, ("pkru",)),
    "service not in the snapshot": (_service_missing,
                                    ("slot_copies", "slot_confinement", "keys", "pkru",
                                     "claims")),
    "no leaf in its slot": (_no_leaf_in_slot, ("pkru", "claims")),
    "facts incomplete": (_bad_facts, ("slot_copies",)),
    "pair names an unknown service": (_pair_names_unknown_service, ("slot_copies",)),
}


@pytest.mark.parametrize("row", sorted(ERROR_ROWS))
def test_unreadable_data_is_an_error_never_a_pass(row: str) -> None:
    make, checks = ERROR_ROWS[row]
    fs = judge(make())
    for c in checks:
        assert "error" in statuses(fs, c), (c, [f.message for f in fs if f.check == c])
    # nothing about the affected service passes in those checks (with PTI: about its user
    # root; its kernel-root copy was read and is judged)
    for f in fs:
        if f.check in checks and f.evidence.get("pid") == 101 and (
                not row.startswith("PTI user root") or f.evidence.get("root") == "user") and (
                f.checkpoint != "paired" or not row.startswith("survivor")):
            assert f.status is not Status.PASS, f.message


def test_no_leaf_in_own_slot_fails_keys() -> None:
    assert "fail" in statuses(judge(_no_leaf_in_slot()), "keys")


def test_bad_facts_error_every_declared_host_check() -> None:
    fs = judge(_bad_facts(), declared=("keys", "pkru", "faults"))
    assert {(f.check, f.status.value) for f in fs} == {("keys", "error"), ("pkru", "error")}


def test_checkpoint_without_facts_skips_declared_host_checks() -> None:
    s = rpal_snapshot(fact_map={})
    fs = judge([s], declared=("slot_copies", "keys", "faults"))
    assert {(f.check, f.status.value) for f in fs} == {("slot_copies", "skip"), ("keys", "skip")}
    assert judge([s]) == []  # nothing declared: nothing to say


def test_no_cpu_running_a_service_is_a_tlb_skip() -> None:
    s = rpal_snapshot()
    s = replace(s, cpus=(cpu(0, MM_A, 3, lazy=True), cpu(1, MM_INIT, 1)))
    assert statuses(judge([s]), "tlb_state") == {"skip"}
    assert statuses(judge([s], declared=("keys",)), "tlb_state") == set()  # not declared
    assert statuses(judge([s], declared=("tlb_state",)), "tlb_state") == {"skip"}


def test_several_unmarked_service_slots_without_the_claimed_one() -> None:
    s = with_mm(rpal_snapshot(paired=False), 101,
                slots=(slot(5, A_TABLE), slot(6, 0x3C00000)))
    fs = judge([s])
    assert "fail" in statuses(fs, "slot_copies")
    assert "error" in statuses(fs, "claims")


def test_id_from_the_only_unmarked_entry_when_the_claim_differs() -> None:
    s = rpal_snapshot(paired=False, fact_map=facts(pairs="none", a={"id": "9"}))
    fs = judge([s])
    mine = [f for f in fs if f.evidence.get("pid") == 101]
    assert statuses(mine, "claims") == {"fail"}
    assert statuses(mine, "slot_confinement") == {"pass"}  # judged in slot 1, the host's


def test_dead_service_slot_from_an_earlier_checkpoint() -> None:
    # B's workload claims id 8 at its death; its page tables had slot 2: that is the one
    # nobody may still map
    dead = without(rpal_snapshot("exited", fact_map=facts(pairs="A-B",
                                                          b={"alive": "0", "id": "8"})), 102)
    fs = judge([rpal_snapshot(), dead])
    left = [f for f in fs if f.checkpoint == "exited" and "dead B" in f.message]
    assert left and all(f.evidence["slot"] == 2 and f.status is Status.FAIL for f in left)


def test_propagation_needs_both_snapshots() -> None:
    before = without(rpal_snapshot("before"), 102)
    before = replace(before, trigger=rpal_snapshot().trigger)
    fs = judge([before, with_mm(rpal_snapshot("after"), 101, tlb_gen=5)])
    assert any(f.check == "tlb_state" and f.error and "missing" in f.message for f in fs)


def test_propagation_pass_when_the_peer_moved_too() -> None:
    before, after = rpal_snapshot("before"), rpal_snapshot("after", tlb_gen=5)
    fs = [f for f in judge([before, after]) if "flushed" in f.message]
    assert len(fs) == 2 and all(f.passed for f in fs)


# ----------------------------------------------------------------------------- facts and helpers


def test_parse_facts() -> None:
    f = parse_facts(facts(pairs="A-B", b={"alive": "0"}))
    assert f.services["A"].slot == 1 and not f.services["B"].alive
    assert f.peers("A") == ["B"]
    assert parse_facts({}).services == {}
    with pytest.raises(FactsError):
        parse_facts({"A.pid": "x"})
    with pytest.raises(FactsError):
        parse_facts({**facts(), "pairs": "A-B-C"})


def test_own_pkey_majority_of_pages() -> None:
    assert own_pkey([leaf(1, 0, 10, 3), leaf(1, 0x100000, 1, 0)]) == 3
    assert own_pkey([leaf(1, 0, 1, 3), leaf(1, 0x100000, 1, 2)]) == 2  # tie: lower key
    assert own_pkey([]) is None


def test_service_label_and_thread_of_another_tgid() -> None:
    s = rpal_snapshot()
    extra = Task(103, 101, "svc_a", 1, "S", None, False, 0x1, pkru_for(1), "thread.pkru",
                 mm=MM_A, pgd=0x1, mappings=service_maps(1, 1))
    s = replace(s, tasks=(*s.tasks, extra))
    s = with_mm(s, 101, tasks=(101, 103))
    pk = [f for f in judge([s]) if f.check == "pkru" and f.evidence["pid"] == 101]
    assert sorted(f.evidence["tid"] for f in pk) == [101, 103]
    assert all(f.passed for f in pk) and "slot 1, pkey 1" in pk[0].subject


# ----------------------------------------------------------------------------- the design


def test_design_registry_and_sources() -> None:
    d = get_design("rpal")
    assert d is DESIGN and d.bug_append(("a", "b")) == "rpal.bug=a,b" and d.bug_append(()) == ""
    assert {c.source for c in d.checks.values()} == {"host", "guest"}
    assert sorted(n for n, c in d.checks.items() if c.source == "guest") == [
        "exit", "faults", "ids", "isolation", "peer_limit", "tlb_shootdown"]
    for sc in d.scenarios.values():
        assert sc.design == "rpal"
        assert all(c in d.checks or c.startswith("selftest:") for c in sc.checks), sc.name
    assert set(d.output_checks.values()) <= set(d.checks)
    with pytest.raises(Exception, match="unknown design"):
        get_design("nope")
    with pytest.raises(Exception, match="unknown scenario"):
        d.select(["nope"])
    with pytest.raises(Exception, match="unknown bug"):
        d.check_bugs(["nope"])
    assert [s.name for s in d.select(["pair"])] == ["pair"]


def test_design_judge_joins_guest_lines_and_snapshots() -> None:
    sc = DESIGN.scenarios["pair"]
    fs = DESIGN.judge([rpal_snapshot()], sc, [("tb-rpal_pair", "A: ok peer_read: 42\n", 0)])
    guest = [f for f in fs if f.source == "guest"]
    assert [(f.check, f.status.value) for f in guest] == [("faults", "pass")]
    assert {f.check for f in fs if f.source == "host"} == set(HOST_CHECKS)


def test_old_import_paths_still_work() -> None:
    from testbed.check import rpal
    from testbed.scenarios import SCENARIOS, select

    assert rpal.CHECKS is CHECKS and SCENARIOS is DESIGN.scenarios
    assert select(None) == [s for s in SCENARIOS.values() if not s.suite]
