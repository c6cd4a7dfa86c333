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


class FakeQmp:
    """QMP of the fake guest: records commands; dump-guest-memory writes a small file, and
    only while the guest is paused (inside a capture)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.paused = False

    def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30
                ) -> Any:
        self.calls.append((cmd, dict(args or {})))
        if cmd == "dump-guest-memory":
            assert self.paused, "dump taken while the guest runs"
            Path(args["protocol"].removeprefix("file:")).write_bytes(b"\x7fELF dump")
        return {}


def _install(monkeypatch: pytest.MonkeyPatch, guest: FakeGuest) -> FakeQmp:
    qmp = FakeQmp()

    class FakeMachine:
        def __init__(self, cfg: Any, run_dir: Path) -> None:
            self.cfg, self.run_dir = cfg, run_dir
            self.qmp, self.ram_path = qmp, run_dir / "ram"
            self.last_stdout: Path | None = None
            self.commands = 0
            self.on_checkpoint: Callable[[Checkpoint], None] | None = None
            self.checkpoint_log = guest.log
            self.console_log = run_dir / "console.log"
            self.console_log.write_text(guest.console)

        def __enter__(self) -> FakeMachine:
            return self

        def replay_icount(self) -> int:  # a recorded guest's instruction count
            self.icount = getattr(self, "icount", 1000) + 1000
            return self.icount

        def __exit__(self, *exc: object) -> None:
            pass

        def run(self, script: str, timeout: float, label: str) -> CommandResult:
            self.commands += 1
            self.last_stdout = self.run_dir / f"command-{self.commands}.stdout"
            if script.startswith("cat /sys/"):  # the bugs in effect
                self.last_stdout.write_bytes(b"none\n")
                return CommandResult(0, b"none\n", b"", 0.0)
            self.last_stdout.write_text(guest.output)
            assert self.on_checkpoint is not None and "@@@ begin 0" in script
            entries = list(guest.log)
            for s in guest.snapshots:
                assert s.trigger is not None
                self.on_checkpoint(Checkpoint(s.name, 101, 101, dict(s.trigger.facts)))
                entries.append({"name": s.name, "pid": 101, "tid": 101})
            with open(self.run_dir / "checkpoints.jsonl", "a") as log:  # as Machine writes it
                log.writelines(json.dumps(e) + "\n" for e in entries)
            return CommandResult(0, guest.output.encode(), b"", 0.1)

    class FakeSnapshotter:
        def __init__(self, *a: Any, **kw: Any) -> None:
            self.by_name = {s.name: s for s in guest.snapshots}

        def capture(self, name: str, trigger: Any, while_paused: Any = None) -> Snapshot:
            snap = self.by_name[name]
            if while_paused is not None:
                qmp.paused = True
                try:
                    while_paused(snap)
                finally:
                    qmp.paused = False
            return snap

        def close(self) -> None:
            pass

    monkeypatch.setattr(runner, "Machine", FakeMachine)
    monkeypatch.setattr(runner, "LiveSnapshotter", FakeSnapshotter)
    return qmp


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


PAIR = get_design("rpal").scenarios["pair"]
WRONG = (synth.rpal_snapshot("enabled", paired=False),
         synth.rpal_snapshot("paired", a_copy=0xBAD000),
         synth.rpal_snapshot("brk", a_copy=0xBAD000))


def _dumps(qmp: FakeQmp) -> list[dict[str, Any]]:
    return [a for c, a in qmp.calls if c == "dump-guest-memory"]


def test_memory_is_kept_at_the_first_failing_checkpoint(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    qmp = _install(monkeypatch, FakeGuest(list(WRONG), _out("A: ok peer_read: 42")))
    r = runner.run_scenario(PAIR, SPEC, (), tmp_path)
    assert "slot_copies" in r.checks_with(Status.FAIL)
    (dump,) = _dumps(qmp)  # once, at "paired", not again at "brk"
    run_dir = Path(r.run_dir)
    assert dump["protocol"] == f"file:{run_dir / 'memory-paired.elf'}" and not dump["paging"]
    info = json.loads((run_dir / "dump.json").read_text())
    assert info["checkpoint"] == "paired" and info["file"] == "memory-paired.elf"
    assert any(w.startswith("slot_copies: A's copy") for w in info["failed"])
    assert json.loads((run_dir / "scenario.json").read_text())["dump"] == "memory-paired.elf"


def test_no_dump_when_all_pass_or_turned_off_or_too_big(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    from dataclasses import replace

    from testbed.snapshot.memdump import DumpPolicy

    ok = [synth.rpal_snapshot("enabled", paired=False), synth.rpal_snapshot("paired")]
    qmp = _install(monkeypatch, FakeGuest(ok, _out("A: ok peer_read: 42")))
    r = runner.run_scenario(PAIR, SPEC, (), tmp_path / "a")
    assert not _dumps(qmp) and not (Path(r.run_dir) / "dump.json").exists()
    qmp = _install(monkeypatch, FakeGuest(list(WRONG), _out("A: ok peer_read: 42")))
    r = runner.run_scenario(PAIR, replace(SPEC, dump=DumpPolicy(enabled=False)), (),
                            tmp_path / "b")
    assert not _dumps(qmp) and not (Path(r.run_dir) / "dump.json").exists()
    qmp = _install(monkeypatch, FakeGuest(list(WRONG), _out("A: ok peer_read: 42")))
    r = runner.run_scenario(PAIR, replace(SPEC, dump=DumpPolicy(max_mib=256)), (),
                            tmp_path / "c")
    assert not _dumps(qmp)
    info = json.loads((Path(r.run_dir) / "dump.json").read_text())
    assert "over the dump cap of 256 MiB" in info["skipped"] and "file" not in info


def test_a_failing_dump_changes_no_verdict(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                           ) -> None:
    qmp = _install(monkeypatch, FakeGuest(list(WRONG), _out("A: ok peer_read: 42")))

    def refuse(cmd: str, args: Any = None, timeout: float = 30) -> Any:
        raise RuntimeError("Dump not allowed")

    monkeypatch.setattr(qmp, "execute", refuse)
    r = runner.run_scenario(PAIR, SPEC, (), tmp_path)
    assert not any(f.check == "snapshot" for f in r.findings)  # every checkpoint kept
    assert len(r.snapshots) == 3
    info = json.loads((Path(r.run_dir) / "dump.json").read_text())
    assert "Dump not allowed" in info["error"]


@pytest.mark.parametrize("snaps", [WRONG, WRONG[:1]], ids=["wrong_copy", "one_checkpoint"])
def test_report_judges_the_runners_folder_the_same(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path, snaps: Any) -> None:
    from testbed.report.rejudge import rejudge_scenario

    _install(monkeypatch, FakeGuest(list(snaps), _out("A: ok peer_read: 42",
                                                      "B: FAIL peer_write: no")))
    r = runner.run_scenario(PAIR, SPEC, (), tmp_path, runner.MODES["l5"])
    j = rejudge_scenario(Path(r.run_dir))
    key = sorted((f.check, f.checkpoint, f.subject, f.status.value, f.message, f.source)
                 for f in r.findings)
    assert sorted((f.check, f.checkpoint, f.subject, f.status.value, f.message, f.source)
                  for f in j.result.findings) == key
    assert j.changes == [] and j.result.output == r.output and j.result.scenario == "pair@l5"


def test_a_recorded_run_keeps_what_its_replay_needs(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    """--record: rr.json names each checkpoint's instruction count and its snapshot file's
    sha256 (the file holds no timings), the first failing checkpoint, the machine."""
    import hashlib

    from testbed.boot.rr import Recording

    _install(monkeypatch, FakeGuest(list(WRONG), _out("A: ok peer_read: 42")))
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"MZ kernel")
    spec = runner.GuestSpec(kernel=kernel, initrd=Path("/k/initrd"),
                            accel=Accel("tcg", "max", "test"), record=True)
    r = runner.run_scenario(PAIR, spec, (), tmp_path / "runs")
    run_dir = Path(r.run_dir)
    rec = Recording.load(run_dir)
    assert [c.name for c in rec.checkpoints] == ["enabled", "paired", "brk"]
    counts = [c.icount for c in rec.checkpoints]
    assert counts == sorted(counts) and rec.end_icount is not None and rec.end_icount > counts[-1]
    assert rec.failing == "snapshots/paired.json"
    assert any(f.startswith("slot_copies:") for f in rec.failed)
    for c in rec.checkpoints:
        data = (run_dir / c.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == c.sha256 and len(data) == c.size
        assert json.loads(data)["timing"] == {}
        assert c.trigger.startswith(f"checkpoint {c.name} 101 101")
    assert rec.machine["kernel_sha256"] == hashlib.sha256(b"MZ kernel").hexdigest()
    assert "testbed.ports=serial" in rec.machine["cmdline"]
    assert (run_dir / "snapshot-timings.jsonl").is_file()


def test_a_scenario_that_needs_two_cpus_is_not_recorded(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    _install(monkeypatch, FakeGuest([], ""))
    spec = runner.GuestSpec(kernel=Path("/k/bzImage"), initrd=Path("/k/initrd"),
                            accel=Accel("tcg", "max", "test"), record=True)
    r = runner.run_scenario(get_design("rpal").scenarios["stale_tlb"], spec, (), tmp_path)
    assert "cannot be recorded: needs 2 CPUs" in r.error and not r.passed
    assert not (Path(r.run_dir) / "rr.json").exists()
