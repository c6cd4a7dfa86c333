"""Explore oracles on hand-made snapshot pieces: PKRU per thread, TLB flushes, kernel log."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import synth

from testbed.check.model import Status
from testbed.designs.rpal.explore import oracles
from testbed.designs.rpal.explore.model import UNKNOWN, Model, Prediction, service_pkru
from testbed.designs.rpal.explore.steps import Answer, Step
from testbed.snapshot.model import Snapshot


def model_ab(pkeys: tuple[int, int] = (0, 1), pids: tuple[int, int] = (100, 101)) -> Model:
    m = Model()
    for i, n in enumerate("ab"):
        m.apply(Step("spawn", n), Answer("ok", {"pid": str(pids[i]), "id": str(i),
                                               "key": str(i + 1)}), 0.0)
        m.apply(Step("enable", n, {"pkey": pkeys[i]}), Answer("ok", {"pkey": str(pkeys[i])}),
                0.0)
    m.apply(Step("request", "a", {"key_of": "b"}), Answer("ok", {"ret": "0"}), 0.0)
    m.apply(Step("request", "b", {"key_of": "a"}), Answer("ok", {"ret": "1"}), 0.0)
    return m


def snap(gens: dict[int, int], pkru: dict[int, int]) -> Snapshot:
    base = synth.rpal_snapshot()
    return replace(
        base,
        tasks=tuple(synth.task(p, "svc", 0x1000 * p, pkru=v) for p, v in pkru.items()),
        mms=tuple(synth.mm(0x1000 * p, (p,), (), tlb_gen=g) for p, g in gens.items()),
        cpus=())


def test_snapshot_checks_with_facts_from_the_model() -> None:
    m = model_ab(pkeys=(1, 2), pids=(101, 102))  # what synth.rpal_snapshot shows
    good = oracles.snapshot_findings(synth.rpal_snapshot(), m, 5)
    assert good and all(f.passed or f.status is Status.SKIP for f in good), \
        [f.message for f in good if f.bad]
    assert {"slot_copies", "keys", "pkru", "slot_confinement", "claims"} <= \
        {f.check for f in good}
    wrong = oracles.snapshot_findings(synth.rpal_snapshot(a_copy=synth.A_TABLE), m, 5)
    assert "slot_copies" in {f.check for f in wrong if f.bad}
    # the model says they were released: the copies in the snapshot are wrong now
    m.apply(Step("release", "a", {"key_of": "b"}), Answer("ok"), 0.0)
    left = oracles.snapshot_findings(synth.rpal_snapshot(), m, 6)
    assert "slot_copies" in {f.check for f in left if f.bad}


def test_pkru_of_every_known_thread() -> None:
    m = model_ab()
    good = snap({100: 1, 101: 1}, {100: service_pkru(0), 101: service_pkru(1)})
    assert all(f.passed for f in oracles.check_pkru_model(good, m, 3))
    bad = snap({100: 1, 101: 1}, {100: 0, 101: service_pkru(1)})
    fails = [f for f in oracles.check_pkru_model(bad, m, 3) if not f.passed]
    assert len(fails) == 1 and fails[0].check == "pkru" and "fully open" in fails[0].message
    gone = snap({100: 1}, {100: service_pkru(0)})
    assert any(f.error for f in oracles.check_pkru_model(gone, m, 3))


def test_peer_generation_must_follow_the_owner() -> None:
    m = model_ab()
    facts = oracles.model_facts(m)
    pids = {"a": 100, "b": 101}
    before = snap({100: 5, 101: 7}, {})
    moved = snap({100: 6, 101: 8}, {})
    stuck = snap({100: 6, 101: 7}, {})
    pred = Prediction(UNKNOWN)
    assert all(f.passed for f in oracles.tlb_step_findings(before, moved, facts, m, pred,
                                                           pids, 1, "a"))
    bad = [f for f in oracles.tlb_step_findings(before, stuck, facts, m, pred, pids, 1, "a")
           if not f.passed]
    assert bad and bad[0].check == "tlb_state"


def test_a_peer_flush_need_not_go_on_to_the_peers_peers() -> None:
    m = model_ab()  # a <-> b
    m.apply(Step("spawn", "c"), Answer("ok", {"pid": "102", "id": "2", "key": "3"}), 0.0)
    m.apply(Step("enable", "c", {"pkey": 2}), Answer("ok", {"pkey": "2"}), 0.0)
    m.apply(Step("request", "a", {"key_of": "c"}), Answer("ok", {"ret": "0"}), 0.0)
    m.apply(Step("request", "c", {"key_of": "a"}), Answer("ok", {"ret": "1"}), 0.0)
    facts = oracles.model_facts(m)
    pids = {"a": 100, "b": 101, "c": 102}
    before = snap({100: 5, 101: 7, 102: 3}, {})
    after = snap({100: 6, 101: 8, 102: 3}, {})  # b unmapped: b and its peer a flushed
    pred = Prediction(UNKNOWN)
    assert all(f.passed for f in oracles.tlb_step_findings(before, after, facts, m, pred,
                                                           pids, 1, "b"))
    # had a acted, c (a's peer) must have seen the flush
    assert not all(f.passed for f in oracles.tlb_step_findings(before, after, facts, m, pred,
                                                               pids, 1, "a"))
    # c acted (an access to its page, say) while b's flush reached a: c has nothing to
    # do with a's move (seen as a false alarm: a spinner thread's stack in b)
    assert all(f.passed for f in oracles.tlb_step_findings(before, after, facts, m, pred,
                                                           pids, 1, "c"))
    # b read a's page (actor a) and b's own mm flushed too (its spinner's stack): a's move
    # may be b's flush reaching it, so a's other peer c need not follow
    assert all(f.passed for f in oracles.tlb_step_findings(before, after, facts, m, pred,
                                                           pids, 1, "a", "b"))
    # but had b's own generation stayed, a's move is a's own: c must follow
    b_still = snap({100: 6, 101: 7, 102: 3}, {})
    assert not all(f.passed for f in oracles.tlb_step_findings(before, b_still, facts, m,
                                                               pred, pids, 1, "a", "b"))


def test_release_must_flush_both_sides() -> None:
    m = model_ab()
    facts = oracles.model_facts(m)
    pred = m.predict(Step("release", "a", {"key_of": "b"}), 0.0)
    assert pred.flush == {"a", "b"}
    m.apply(Step("release", "a", {"key_of": "b"}), Answer("ok"), 0.0)
    before = snap({100: 5, 101: 7}, {})
    only_a = snap({100: 6, 101: 7}, {})
    bad = [f for f in oracles.tlb_step_findings(before, only_a, facts, m, pred,
                                                {"a": 100, "b": 101}, 2, "a") if not f.passed]
    assert [f.subject for f in bad] == ["b"]


def test_console_watch_reports_only_new_bad_lines(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("old WARNING: before we looked\n")
    w = oracles.ConsoleWatch(log)
    assert w.findings(0) == []
    with open(log, "a") as f:
        f.write("ok line\n[  1.0] BUG: unable to handle page fault\npartial WARN")
    got = w.findings(1)
    assert len(got) == 1 and got[0].check == "kernel_log" and "BUG" in got[0].message
    with open(log, "a") as f:
        f.write("ING: at mm/rmap.c\n")
    assert w.findings(2)[0].check == "kernel_log"
