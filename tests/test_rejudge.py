"""`testbed report RUN_DIR` on synthetic run folders: the run's verdicts again, and what the
folder lacks is an error, never a pass (no VM)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from synth import B_TABLE, rpal_snapshot

from testbed.check.model import Status
from testbed.cli import main
from testbed.designs import get_design
from testbed.errors import TestbedError
from testbed.report.cli import route
from testbed.report.rejudge import rejudge, rejudge_scenario
from testbed.rundir import ScenarioRecord, judge_scenario, save_snapshot
from testbed.runner import guest_script

DESIGN = get_design("rpal")
SC = DESIGN.scenarios["pair"]

OUTPUT_OK = """A: ok slot_layout: data at 0x1 is in slot 1 (id 0)
B: ok slot_layout: data at 0x2 is in slot 2 (id 1)
A: ok pkru: PKRU after enable 0xfffffff3, expected 0xfffffff3
B: ok peer_read: read the peer
A: ok peer_write: wrote the peer
B: ok pkey_deny: faulted
A: ok request: paired
B: ok keys_locked: locked
A: ok dead_key: reported
"""


def guest_output(body: str, status: int = 0) -> str:
    """What the guest script (runner.guest_script) prints for one workload."""
    assert "@@@ begin 0" in guest_script(SC.workloads)
    return f"@@@ begin 0\n{body}@@@ end 0 {status}\n"


def make_run(parent: Path, *, a_copy: int | None = None, console: str = "Linux version x\n",
             output: str = OUTPUT_OK, name: str = "pair@l5", refused: bool = False) -> Path:
    """A scenario's run folder as `testbed run` leaves it, with its findings judged by the
    same judge_scenario the runner calls; a_copy makes A's copy point at a wrong table."""
    run_dir = parent / f"20260101-000000-{name.replace('@', '-')}-nobug-1-abcdef"
    run_dir.mkdir(parents=True)
    snaps = [rpal_snapshot("enabled", paired=False), rpal_snapshot("paired", a_copy=a_copy),
             rpal_snapshot("paired", a_copy=a_copy),  # a checkpoint reached twice
             rpal_snapshot("released", paired=False)]
    rec = ScenarioRecord(name, "pair", "rpal", (), mode="l5", workloads=SC.workloads,
                         output_file="command-2.stdout")
    log = []
    for s in snaps:
        rec.snapshots.append(save_snapshot(s, run_dir, rec.snapshots))
        log.append({"name": s.name, "pid": 101, "tid": 101, "seconds": 0.01})
    if refused:
        log.append({"line": "checkpoint ../x", "error": "bad checkpoint name"})
    (run_dir / "checkpoints.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    text = guest_output(output)
    (run_dir / "command-2.stdout").write_text(text)
    (run_dir / "console.log").write_text(console)
    from testbed.runner import split_output

    outputs = [(w.split()[0], o, st) for w, (o, st)
               in zip(SC.workloads, split_output(text, 1), strict=True)]
    findings = judge_scenario(DESIGN, replace(SC, name=name), snaps, outputs, log,
                              run_dir / "console.log")
    (run_dir / "findings.json").write_text(json.dumps([f.to_dict() for f in findings]))
    rec.write(run_dir)
    return run_dir


def statuses(findings: list) -> list[tuple[str, str, str, str, str]]:
    return sorted((f.check, f.checkpoint, f.subject, f.status.value, f.message)
                  for f in findings)


def recorded(run_dir: Path) -> list[tuple[str, str, str, str, str]]:
    from testbed.check.model import Finding

    raw = json.loads((run_dir / "findings.json").read_text())
    return statuses([Finding.from_dict(d) for d in raw])


@pytest.mark.parametrize("a_copy", [None, 0xBAD000], ids=["correct", "wrong_copy"])
def test_same_verdicts_on_an_unchanged_tree(tmp_path: Path, a_copy: int | None) -> None:
    run_dir = make_run(tmp_path, a_copy=a_copy, refused=True)
    j = rejudge_scenario(run_dir)
    assert j.how == "judged again" and j.changes == []
    assert statuses(j.result.findings) == recorded(run_dir)
    bad = {f.check for f in j.result.findings if f.status is Status.FAIL}
    assert ("slot_copies" in bad) == (a_copy is not None)
    # the checkpoint reached twice was kept twice, and judged twice
    assert ScenarioRecord.load(run_dir).snapshots == [
        "snapshots/enabled.json", "snapshots/paired.json", "snapshots/paired@2.json",
        "snapshots/released.json"]
    claims = [f for f in j.result.findings if f.check == "claims"]
    assert sum(f.checkpoint == "paired" for f in claims) == 2 * sum(
        f.checkpoint == "released" for f in claims) > 0
    # the refused checkpoint is an error finding both times
    assert any(f.check == "snapshot" and f.status is Status.ERROR for f in j.result.findings)


def test_a_changed_check_changes_the_verdict(tmp_path: Path, monkeypatch) -> None:
    run_dir = make_run(tmp_path)
    from testbed.designs.rpal import checks

    real = checks.check_slot_copies

    def stricter(snap, facts, svcs, ctx, known):  # a "new" check: every copy is wrong
        for f in real(snap, facts, svcs, ctx, known):
            yield replace(f, status=Status.FAIL) if f.status is Status.PASS else f

    monkeypatch.setattr(checks, "SNAPSHOT_CHECKS", tuple(
        stricter if c is real else c for c in checks.SNAPSHOT_CHECKS))
    monkeypatch.setattr(checks, "check_slot_copies", stricter)
    j = rejudge_scenario(run_dir)
    assert any("slot_copies[paired]" in c and "pass -> fail" in c for c in j.changes)


def test_missing_snapshot_is_an_error_at_its_checkpoint(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    (run_dir / "snapshots" / "released.json").unlink()
    j = rejudge_scenario(run_dir)
    at = [f for f in j.result.findings if f.checkpoint == "released"]
    assert at and all(f.status is Status.ERROR for f in at)
    host = {c for c in SC.checks if DESIGN.checks[c].source == "host" and c != "kernel_log"}
    assert {f.check for f in at} == host
    assert "missing from the run folder" in at[0].message
    assert not j.result.passed


def test_unreadable_snapshot_is_an_error(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    (run_dir / "snapshots" / "enabled.json").write_text("{not json")
    j = rejudge_scenario(run_dir)
    at = [f for f in j.result.findings if f.checkpoint == "enabled"]
    assert at and all(f.status is Status.ERROR for f in at)
    assert "unusable" in at[0].message


def test_missing_output_and_console_are_errors(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    (run_dir / "command-2.stdout").unlink()
    (run_dir / "console.log").unlink()
    j = rejudge_scenario(run_dir)
    guest = {c for c in SC.checks if DESIGN.checks[c].source == "guest"}
    errs = {f.check for f in j.result.findings if f.status is Status.ERROR}
    assert guest <= errs and "kernel_log" in errs
    assert not any(f.source == "guest" and f.passed for f in j.result.findings)


def test_kernel_alarm_in_the_console_is_judged_again(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    (run_dir / "console.log").write_text("WARNING: CPU: 0 PID: 1 at mm/rpal.c:1 x\n")
    j = rejudge_scenario(run_dir)
    assert any(f.check == "kernel_log" and f.status is Status.FAIL for f in j.result.findings)
    assert any(c.startswith("kernel_log") and "pass -> fail" in c for c in j.changes)


def test_a_run_folder_and_the_cli(tmp_path: Path, capsys) -> None:
    parent = tmp_path / "run"
    good = make_run(parent, name="pair@l5")
    bad = make_run(parent, name="pair@l4pti", a_copy=B_TABLE + 0x1000)
    meta, judged = rejudge(parent)
    assert [j.result.run_dir for j in judged] == sorted([str(good), str(bad)])
    assert meta.extra["rejudged"]["changes"] == {}
    assert main(["report", str(parent)]) == 1  # a check fails, as in the run
    out = capsys.readouterr().out
    assert "every verdict as the run's" in out
    doc = json.loads((parent / "report.json").read_text())
    assert doc["verdict"] == "FAIL" and len(doc["scenarios"]) == 2
    assert main(["report", "judge", str(good), "--json", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text())["verdict"] == "PASS"


def test_copied_folder_judges_the_same(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "a", a_copy=0xBAD000)
    moved = tmp_path / "elsewhere" / run_dir.name
    shutil.copytree(run_dir, moved)
    assert statuses(rejudge_scenario(moved).result.findings) == recorded(run_dir)


def test_not_a_run_folder(tmp_path: Path, capsys) -> None:
    with pytest.raises(TestbedError, match="holds no scenario run folder"):
        rejudge(tmp_path)
    assert main(["report", str(tmp_path / "nope")]) == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "scenario.json").write_text("{}")
    with pytest.raises(TestbedError, match="not a testbed.scenario document"):
        rejudge(tmp_path)


def test_record_refuses_paths_outside_the_folder(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    doc = json.loads((run_dir / "scenario.json").read_text())
    doc["snapshots"] = ["../../etc/passwd"]
    (run_dir / "scenario.json").write_text(json.dumps(doc))
    with pytest.raises(TestbedError, match="not a path inside the run folder"):
        rejudge_scenario(run_dir)


def test_route() -> None:
    from testbed.cli import build_parser

    build_parser()  # registers the report actions route() knows
    assert route(["report", "RUN"]) == ["report", "judge", "RUN"]
    assert route(["report", "--json", "x", "RUN"]) == ["report", "judge", "--json", "x", "RUN"]
    assert route(["report", "judge", "RUN"]) == ["report", "judge", "RUN"]
    assert route(["report", "-h"]) == ["report", "-h"]
    assert route(["run", "report"]) == ["run", "report"]
    assert route(["report"]) == ["report"]


def test_scenarios_judged_live_keep_their_findings(tmp_path: Path) -> None:
    """explore (a design's own runner) and the selftest: findings carried over, kernel_log
    judged again from the console, and the report says so."""
    from testbed.check.model import Finding

    run_dir = tmp_path / "explore-l5"
    run_dir.mkdir()
    ScenarioRecord("explore@l5", "explore", "rpal", (), mode="l5", kind="special").write(run_dir)
    old = [Finding("slot_copies", Status.FAIL, "a's copy points at its own table", "explore@l5"),
           Finding("kernel_log", Status.PASS, "no alarm", "explore@l5")]
    (run_dir / "findings.json").write_text(json.dumps([f.to_dict() for f in old]))
    (run_dir / "console.log").write_text("BUG: Bad page map in process x\n")
    j = rejudge_scenario(run_dir)
    assert "carried over" in j.how
    assert {(f.check, f.status) for f in j.result.findings} >= {
        ("slot_copies", Status.FAIL), ("kernel_log", Status.FAIL)}
    assert any(c.startswith("kernel_log") and c.endswith("-> fail") for c in j.changes)
    assert not any(c.startswith("slot_copies") for c in j.changes)
    (run_dir / "findings.json").unlink()
    j = rejudge_scenario(run_dir)
    assert not j.result.passed and any(f.check == "scenario" and f.error
                                       for f in j.result.findings)
