"""The runner's judging part without a VM: a fake machine plays the guest, the judge is real.

`run_scenario` with `Machine` and `LiveSnapshotter` replaced: the fake guest
"runs" the workload by calling the checkpoint handler with each snapshot and
printing verdict lines. What is checked: findings of both sources, the
declared-check-without-finding error of `testbed run` itself, snapshot
failures as errors, findings.json and the snapshots on disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import synth

from testbed import runner
from testbed.boot.hostcaps import Accel
from testbed.boot.machine import Checkpoint
from testbed.boot.ssh import CommandResult
from testbed.check.model import Status
from testbed.designs import Scenario, get_design
from testbed.snapshot.model import Snapshot, json_schema


@dataclass
class FakeGuest:
    snapshots: list[Snapshot]
    output: str
    log: list[dict[str, Any]] = field(default_factory=list)
    console: str = "Linux version 6.1\n"


def _install(monkeypatch: pytest.MonkeyPatch, guest: FakeGuest) -> None:
    class FakeMachine:
        def __init__(self, cfg: Any, run_dir: Path) -> None:
            self.cfg, self.run_dir = cfg, run_dir
            self.qmp, self.ram_path = object(), run_dir / "ram"
            self.on_checkpoint: Callable[[Checkpoint], None] | None = None
            self.checkpoint_log = guest.log
            self.console_log = run_dir / "console.log"
            self.console_log.write_text(guest.console)

        def __enter__(self) -> FakeMachine:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def run(self, script: str, timeout: float, label: str) -> CommandResult:
            if script.startswith("cat /sys/"):  # the bugs in effect
                return CommandResult(0, b"none\n", b"", 0.0)
            assert self.on_checkpoint is not None and "@@@ begin 0" in script
            for s in guest.snapshots:
                assert s.trigger is not None
                self.on_checkpoint(Checkpoint(s.name, 101, 101, dict(s.trigger.facts)))
            return CommandResult(0, guest.output.encode(), b"", 0.1)

    class FakeSnapshotter:
        def __init__(self, *a: Any) -> None:
            self.by_name = {s.name: s for s in guest.snapshots}

        def capture(self, name: str, trigger: Any) -> Snapshot:
            return self.by_name[name]

        def close(self) -> None:
            pass

    monkeypatch.setattr(runner, "Machine", FakeMachine)
    monkeypatch.setattr(runner, "LiveSnapshotter", FakeSnapshotter)


SPEC = runner.GuestSpec(kernel=Path("/k/bzImage"), initrd=Path("/k/initrd"),
                        accel=Accel("tcg", "max", "test"))


def _out(*lines: str) -> str:
    return "@@@ begin 0\n" + "".join(ln + "\n" for ln in lines) + "@@@ end 0 0\n"


def test_host_and_guest_findings_and_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                           ) -> None:
    guest = FakeGuest([synth.rpal_snapshot("paired")], _out("A: ok peer_read: 42"))
    _install(monkeypatch, guest)
    sc = Scenario("t", "test", ("tb-rpal_pair",), ("slot_copies", "faults"), design="rpal")
    r = runner.run_scenario(sc, SPEC, (), tmp_path)
    assert r.passed and not r.error and r.design == "rpal"
    assert {(f.check, f.source) for f in r.findings} >= {
        ("faults", "guest"), ("slot_copies", "host"), ("kernel_log", "host")}
    assert isinstance(r.snapshots["paired"], Snapshot)
    run_dir = Path(r.run_dir)
    written = json.loads((run_dir / "snapshots" / "paired.json").read_text())
    jsonschema.validate(written, json_schema())
    assert Snapshot.from_json(written) == guest.snapshots[0]
    fj = json.loads((run_dir / "findings.json").read_text())
    assert all(f["status"] in ("pass", "fail", "error", "skip") and f["source"] for f in fj)


def test_declared_check_without_finding_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    _install(monkeypatch, FakeGuest([], _out("A: ok peer_read: 42")))
    sc = Scenario("t", "test", ("tb-rpal_pair",), ("faults", "slot_copies", "ids"),
                  design="rpal")
    r = runner.run_scenario(sc, SPEC, (), tmp_path)
    assert not r.passed
    missing = {f.check for f in r.findings if f.status is Status.ERROR}
    assert missing == {"slot_copies", "ids"}
    assert r.failed_checks() == {"slot_copies", "ids"}


def test_failed_snapshot_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log = [{"name": "paired", "error": "migration refused"}]
    _install(monkeypatch, FakeGuest([], _out("A: ok peer_read: 42"), log))
    sc = Scenario("t", "test", ("tb-rpal_pair",), ("faults",), design="rpal")
    r = runner.run_scenario(sc, SPEC, (), tmp_path)
    (err,) = [f for f in r.findings if f.check == "snapshot"]
    assert err.status is Status.ERROR and "migration refused" in err.message


def test_bug_goes_on_the_kernel_command_line_and_the_reproducer(tmp_path: Path) -> None:
    sc = Scenario("t", "test", ("tb-rpal_pair",), ("faults",), design="rpal")
    assert runner.kernel_append(SPEC, ("a", "b"), get_design("rpal")) == "rpal.bug=a,b"
    run, boot = runner.reproduce_commands(sc, SPEC, ("same_pkey",))
    assert run[-2:] == ["--bug", "same_pkey"] and "rpal.bug=same_pkey" in boot


def test_kernel_alarm_fails_the_scenario(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    guest = FakeGuest([], _out("A: ok peer_read: 42"),
                      console="[    1.0] BUG: Bad page map in process x\n")
    _install(monkeypatch, guest)
    sc = Scenario("t", "test", ("tb-rpal_pair",), ("faults",), design="rpal")
    r = runner.run_scenario(sc, SPEC, (), tmp_path)
    assert r.failed_checks() == {"kernel_log"}
