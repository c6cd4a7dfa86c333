"""The explorer's plumbing with a fake agent: find, shrink, save, replay; determinism."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from explore_fake import Clock, FakeAgent

from testbed.designs.rpal.explore.choices import with_delay
from testbed.designs.rpal.explore.driver import (
    ExplorerBug,
    ReplayFileError,
    explore,
    load_failure,
    replay,
    write_failure,
)
from testbed.designs.rpal.explore.session import Session, StepFailure
from testbed.designs.rpal.explore.steps import Answer, Step

from conftest import run_testbed


def session(faults: set[str] | None = None) -> Session:
    clock = Clock()
    agent = FakeAgent(faults, clock)
    s = Session(agent, choices=with_delay(1000), clock=clock, judge_snapshots=False,
                sleep=clock.sleep)
    agent.current = lambda: s.current_step
    return s


def run(faults: set[str] | None = None, seed: int = 1, examples: int = 30, steps: int = 30):
    s = session(faults)
    return s, explore(s, seed=seed, steps=steps, seconds=120, services=4,
                      max_examples=examples)


def test_a_correct_fake_passes() -> None:
    s, res = run(examples=12)
    assert res.passed, res.failure and res.failure.message
    assert res.examples >= 12 and res.steps > 50


@pytest.mark.parametrize("fault,check", [
    ("same_pkey", "keys"),
    ("id_at_once", "ids"),
    ("lose_dead_key", "exit"),
    ("stale_spinner", "tlb_shootdown"),
    ("peer_limit", "peer_limit"),
    ("spinner_pkru", "pkru"),
])
def test_planted_fault_is_found_named_and_shrunk(fault: str, check: str) -> None:
    _, res = run({fault}, examples=200, steps=40)
    assert res.failure is not None, f"{fault} not found"
    assert res.failure.check == check, res.failure.message
    assert len(res.failure.steps) <= 12, [st.text() for st in res.failure.steps]
    assert res.failure.step_index == len(res.failure.steps) - 1


def _raise_at(s: Session, exc: Callable[[], Exception], *, once: bool, at: int = 5) -> None:
    """The session's 5th step (and, unless `once`, every later one) raises exc()."""
    real = s._run
    calls = 0

    def failing(*a, **k):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == at or (not once and calls > at):
            raise exc()
        return real(*a, **k)

    s._run = failing  # type: ignore[method-assign]


def test_an_error_of_the_explorer_is_no_verdict() -> None:
    """A bug of the explorer itself (any exception but a failed check) ends the run as
    ExplorerBug (exit 125 in the CLI), never as a failed check of the kernel."""
    s = session()
    _raise_at(s, lambda: TypeError("planted"), once=True)
    with pytest.raises(ExplorerBug, match="planted"):
        explore(s, seed=1, steps=20, seconds=60, services=4, max_examples=5)


def test_same_seed_same_sequences() -> None:
    a, _ = run(seed=7, examples=5)
    b, _ = run(seed=7, examples=5)
    c, _ = run(seed=8, examples=5)
    calls = [FakeAgent.__name__]
    assert isinstance(a.agent, FakeAgent) and isinstance(b.agent, FakeAgent)
    assert isinstance(c.agent, FakeAgent)
    calls = a.agent.calls
    assert calls == b.agent.calls
    assert calls != c.agent.calls


def test_failure_files_and_replay(tmp_path: Path) -> None:
    _, res = run({"same_pkey"}, examples=200, steps=40)
    assert res.failure is not None
    meta = {"seed": 1, "bugs": ["x"], "kernel": "k"}
    jpath, spath = write_failure(tmp_path, 1, res.failure, meta, ["testbed", "explore"])
    doc = json.loads(jpath.read_text())
    assert doc["check"] == "keys" and doc["schema"] == "testbed.explore.failure"
    script = spath.read_text()
    assert "request" in script and "--replay" in script
    # portable: the failure file beside the script, the testbed as $TESTBED
    assert f'--replay "$HERE"/{jpath.name} "$@"' in script and str(tmp_path) not in script
    import shutil
    import subprocess

    moved = tmp_path / "copy"
    moved.mkdir()
    shutil.copy(spath, moved / spath.name)
    out = subprocess.run(["sh", str(moved / spath.name), "--x"], capture_output=True,
                         text=True, env={"TESTBED": "echo", "PATH": "/usr/bin:/bin"},
                         check=True).stdout
    assert out == f"explore --replay {moved / jpath.name} --x\n"
    steps, m = load_failure(jpath)
    assert len(steps) == len(res.failure.steps)
    again = replay(session({"same_pkey"}), steps)
    assert again is not None and again.check == "keys"
    assert again.step_index == res.failure.step_index
    assert replay(session(), steps) is None, "the same sequence passes without the fault"


@pytest.mark.parametrize("text,msg", [
    ("{", "not JSON"),
    ('{"schema": "other"}', "neither"),
    ('{"schema": "testbed.explore.failure", "schema_version": 9, "steps": []}',
     "schema_version"),
    ('[{"op": "spawn"}]', "step 0"),
    ('[{"op": "spawn", "svc": "a", "x": [1]}]', "neither a string nor an integer"),
])
def test_bad_replay_files(tmp_path: Path, text: str, msg: str) -> None:
    p = tmp_path / "f.json"
    p.write_text(text)
    with pytest.raises(ReplayFileError, match=msg):
        load_failure(p)


def test_cli_replay_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    r = run_testbed("explore", "--replay", str(tmp_path / "nope.json"), timeout=60)
    assert r.returncode == 125
    assert "nope.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--services", "0"], "--services"),
    (["--services", "17"], "--services"),
    (["--steps", "0"], "--steps"),
    (["--time", "-1"], "--time"),
    (["--bug", "no_such_bug"], "invalid choice"),
])
def test_cli_rejects_bad_arguments(args: list[str], msg: str) -> None:
    r = run_testbed("explore", *args, timeout=60)
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr


def test_fill_waits_until_every_dead_id_is_free() -> None:
    """fill runs only after the delay of every dead id (and the slack) is over, so that
    no delayed free lands between its refusal and its retry."""
    s = session()
    s.world.held[7] = s.clock() + 5.0
    sent: list[float] = []
    real = s.agent.call

    def call(op: str, **args):  # type: ignore[no-untyped-def]
        if op == "fill":
            sent.append(s.clock())
            return Answer("ok", {"held": "254", "ids": ",".join(map(str, range(254))),
                                 "err": "ENOSPC", "again": "ENOSPC"})
        return real(op, **args)

    s.agent.call = call  # type: ignore[method-assign]
    s.execute(Step("fill", "-"))
    assert sent and sent[0] >= 5.0 + s.choices.id_delay_tolerance_ms / 1000
    assert not s.world.held  # waited out: the model takes them as free


def test_fill_waits_for_deaths_reported_late_and_then_expects_every_id() -> None:
    """A death is held from when its step was sent (the model's lower bound) but its id
    is surely free only a delay after the answer that reported it; after that wait fill
    must get every id and a retry refused: the retry getting a live holder's id (what
    exhaustion_frees_id does) fails ids, also when that id is one a dead service held
    (so far the model allowed a held id whose delay had ended: seen to hide the bug)."""
    s = session()
    s.execute(Step("spawn", "a"))
    s.execute(Step("exit", "a"))
    died_at = s.clock()
    (dead_id,) = s.world.held  # a's: fill gets it too (all ids are free by then)
    sent: list[float] = []
    real = s.agent.call
    every = ",".join(map(str, range(254)))

    def call(op: str, **args):  # type: ignore[no-untyped-def]
        if op == "fill":
            sent.append(s.clock())
            return Answer("ok", {"held": "254", "ids": every, "err": "ENOSPC",
                                 "again_id": str(dead_id)})
        return real(op, **args)

    s.agent.call = call  # type: ignore[method-assign]
    with pytest.raises(StepFailure) as exc:
        s.execute(Step("fill", "-"))
    assert exc.value.check == "ids"
    assert sent[0] >= died_at + s.choices.id_free_delay_ms / 1000  # type: ignore[operator]


def _fake_replays(monkeypatch: pytest.MonkeyPatch, needed: set[str], misses: int) -> list[int]:
    """driver.replay replaced: a candidate fails (check "keys") when it holds every step
    op in `needed`, except that the first `misses` replays do not fail (a sequence found
    from another start state)."""
    from testbed.designs.rpal.explore import driver

    calls: list[int] = []

    def fake(session: object, steps: list[Step]) -> driver.Failure | None:
        calls.append(len(steps))
        if len(calls) <= misses or not needed <= {s.op for s in steps}:
            return None
        last = max(i for i, s in enumerate(steps) if s.op in needed)
        kept = steps[:last + 1]
        return driver.Failure("keys", last, "planted", kept, [], [])

    monkeypatch.setattr(driver, "replay", fake)
    return calls


def _found(n: int) -> object:
    from testbed.designs.rpal.explore.driver import Failure
    steps = [Step(f"op{i}", "a") for i in range(n)]
    return Failure("keys", n - 1, "found", steps, [], [])


@pytest.mark.parametrize("misses", [0, 1, 2])
def test_shrink_goes_on_when_the_whole_sequence_does_not_fail_again(
        monkeypatch: pytest.MonkeyPatch, misses: int) -> None:
    """A 40-step failure whose full replays do not fail again (mremap_drops_pkey seed 2
    kept all 40 steps) is still shrunk by its candidates; it stays marked flaky."""
    from testbed.designs.rpal.explore.driver import shrink_steps

    _fake_replays(monkeypatch, {"op7", "op31"}, misses)
    best, runs = shrink_steps(None, _found(40))  # type: ignore[arg-type]
    assert [s.op for s in best.steps] == ["op7", "op31"]
    assert best.flaky == (misses > 0)
    assert runs < 200


def test_shrink_keeps_the_found_sequence_when_nothing_fails_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.designs.rpal.explore.driver import shrink_steps

    calls = _fake_replays(monkeypatch, {"never"}, 0)
    found = _found(12)
    best, runs = shrink_steps(None, found)  # type: ignore[arg-type]
    assert best is found and best.flaky and len(best.steps) == 12
    assert runs == len(calls) > 2


@pytest.mark.parametrize("once", [True, False])
def test_qemu_dying_under_hypothesis_is_a_qemu_crash_not_an_explorer_bug(once: bool) -> None:
    """QEMU 7.2 segfaulted in a 120 s run: hypothesis, replaying the example to report
    it, met no crash the second time (or another one) and said Flaky; the run was
    reported as an internal error of the explorer. It is the guest's QemuCrash."""
    from testbed.errors import QemuCrash

    s = session()
    _raise_at(s, lambda: QemuCrash("QEMU died (signal 11)"), once=once)
    with pytest.raises(QemuCrash, match="signal 11"):
        explore(s, seed=1, steps=20, seconds=60, services=4, max_examples=5)


@pytest.mark.parametrize("pkru,status", [("own", "pass"), ("0x0", "fail"),
                                          ("zz", "error")])
def test_spinner_start_pkru_is_judged_and_a_malformed_one_is_an_error(
        pkru: str, status: str | None) -> None:
    """The spinner's `* spinstart` claim: its creator's PKRU passes, another fails, and a
    line whose PKRU cannot be read is an error (no verdict), never a pass."""
    s = session()
    s.execute(Step("spawn", "a"))
    s.execute(Step("enable", "a", {"pkey": 2}))
    want = s.model.svcs["a"].main_pkru
    assert want is not None
    if pkru == "own":
        pkru = hex(want)
    ev = Answer("event", {"svc": "a", "tid": "9", "pkru": pkru}, event="spinstart")
    s.agent._events.append(ev)  # type: ignore[attr-defined]
    (f,) = s._judge_spin_start(Step("spin", "a"), 3)
    assert f.check == "pkru" and f.source == "guest"
    assert f.status.value == status, f.message
