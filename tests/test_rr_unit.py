"""Record/replay without a VM: QEMU's command lines, the serial command port's protocol,
rr.json, the comparison, which scenarios can be recorded, the walk's text."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import synth
from hypothesis import given
from hypothesis import strategies as st

from testbed import runner
from testbed.boot.cmdport import MAX_INPUT, ReplyParser, encode_command, short_reply
from testbed.boot.hostcaps import Accel
from testbed.boot.machine import MachineConfig, dry_run_args, kernel_cmdline, rr_problem
from testbed.boot.rr import (
    RR_LOG,
    CheckpointMark,
    Recording,
    compare,
    qemu_opt,
    rr_qemu_args,
)
from testbed.build.initramfs import SERIAL_PORTS_PARAM
from testbed.designs import get_design
from testbed.errors import GuestError, TestbedError, UsageError
from testbed.replay import Outcome, replay_config, replay_status
from testbed.rundir import TIMINGS_FILE, save_snapshot
from testbed.snapshot.model import Absent, Registers, Snapshot, json_schema
from testbed.snapshot.pagetable import EntryKind, Translation, decode_entry
from testbed.snapshot.walk import describe_walk

DESIGN = get_design("rpal")
TCG = Accel("tcg", "max", "test")
SHA = "ab" * 32


def cfg(**kw: Any) -> MachineConfig:
    base: dict[str, Any] = dict(kernel=Path("/k/bzImage"), initrd=Path("/i.cpio"), accel=TCG,
                                smp=1, ssh=False, rr="record", rr_log=RR_LOG)
    return MachineConfig(**{**base, **kw})


# ----- QEMU's command line ------------------------------------------------------------------

def test_rr_options_of_record_and_replay() -> None:
    rec = rr_qemu_args("record", "rr.bin")
    assert rec[:2] == ["-icount", "shift=auto,rr=record,rrfile=rr.bin"]
    assert "-seed" in rec and "-rtc" in rec and "-S" not in rec
    rep = rr_qemu_args("replay", "../a,b/rr.bin")
    assert rep[1] == "shift=auto,rr=replay,rrfile=../a,,b/rr.bin" and rep[-1] == "-S"
    assert qemu_opt("a,b,,c") == "a,,b,,,,c"
    with pytest.raises(TestbedError):
        rr_qemu_args("play", "rr.bin")


def test_a_recorded_guest_has_serial_lines_only(tmp_path: Path) -> None:
    args = dry_run_args(cfg(), tmp_path)
    text = " ".join(args)
    for absent in ("virtio-rng", "virtio-serial", "virtserialport", "netdev", "hostfwd"):
        assert absent not in text
    serials = [args[i + 1] for i, a in enumerate(args) if a == "-serial"]
    assert serials == ["chardev:con", "chardev:ckpt"]  # console ttyS0, checkpoints ttyS1
    assert "-icount" in args and "-S" not in args
    plain = " ".join(dry_run_args(cfg(rr="", rr_log="", ssh=True, smp=2), tmp_path))
    assert "virtserialport" in plain and "-icount" not in plain
    assert SERIAL_PORTS_PARAM in kernel_cmdline(cfg())
    assert SERIAL_PORTS_PARAM not in kernel_cmdline(cfg(rr=""))


def test_the_replay_runs_the_same_machine(tmp_path: Path) -> None:
    """A replay's QEMU differs from its recording's only in rr=, -S and its own files."""
    folder, replay_dir = tmp_path / "sc", tmp_path / "sc" / "replay-1"
    record_cfg = cfg(initrd=folder / "initrd.cpio", append="rpal.bug=x")
    rec = recording(machine={
        "kernel": "/k/bzImage", "accel": {"accel": "tcg", "cpu": "max", "reason": "r"},
        "mem_mib": record_cfg.mem_mib, "paging": 5, "pti": "auto", "append": "rpal.bug=x",
        "cmdline": kernel_cmdline(record_cfg), "boot_timeout": 180.0})
    replay_cfg = replay_config(rec, folder, replay_dir, Path("/k/bzImage"), [])
    assert replay_cfg.rr == "replay" and replay_cfg.rr_log == "../rr.bin"
    a = dry_run_args(record_cfg, folder)
    b = dry_run_args(replay_cfg, replay_dir)

    def norm(args: list[str], d: Path) -> list[str]:
        return [re.sub(r"mem-path=[^,]*", "mem-path=RAM", x).replace(str(d), "DIR")
                .replace("rr=replay", "rr=record").replace("../rr.bin", "rr.bin")
                .replace(d.name, "NAME") for x in args if x != "-S"]
    assert norm(a, folder) == norm(b, replay_dir)
    bad = replace(rec, machine={**rec.machine, "cmdline": "console=ttyS0 other"})
    with pytest.raises(TestbedError, match="command line differs"):
        replay_config(bad, folder, replay_dir, Path("/k/bzImage"), [])


@pytest.mark.parametrize(("change", "why"), [
    ({"smp": 2}, "one vCPU"),
    ({"accel": Accel("kvm", "host", "t")}, "TCG"),
    ({"ssh": True}, "no SSH"),
    ({"serial_ports": ("org.x",)}, "no SSH"),
    ({"rr_log": ""}, "log"),
    ({"rr": "rewind"}, "record or replay"),
])
def test_what_cannot_be_recorded(change: dict[str, Any], why: str) -> None:
    assert why in rr_problem(cfg(**change))
    assert rr_problem(cfg()) == "" and rr_problem(cfg(rr="", smp=2, ssh=True)) == ""


# ----- the serial command port --------------------------------------------------------------

def test_commands_go_by_number_and_answers_are_short() -> None:
    cmds = ("cat /sys/x", "echo hi")
    assert encode_command(cmds, "echo hi") == b"run 1\n"
    with pytest.raises(GuestError, match="only the commands put in its image"):
        encode_command(cmds, "reboot")
    for reply in ("ok enabled\n", "ok " + "x" * 64 + "\n", "err " + "y" * 400 + "\n"):
        short = short_reply(reply)
        assert len(short.encode()) <= MAX_INPUT and short.endswith("\n")
        assert short.startswith("ok ") == reply.startswith("ok ")


def b64_lines(data: bytes) -> list[bytes]:
    """As busybox base64 writes them: 76 characters a line."""
    text = base64.b64encode(data)
    return [text[i:i + 76] + b"\n" for i in range(0, len(text), 76)]


def feed(lines: list[bytes], limit: int = 1 << 20) -> ReplyParser:
    p = ReplyParser(limit)
    done = [p.feed(ln) for ln in lines]
    assert done[-1] and not any(done[:-1])
    return p


@given(st.binary(max_size=3000), st.binary(max_size=300), st.integers(0, 255))
def test_the_answer_decodes_to_what_the_guest_wrote(out: bytes, err: bytes, status: int
                                                    ) -> None:
    p = feed([b"out\n", *b64_lines(out), b"err\n", *b64_lines(err), f"end {status}\n".encode()])
    assert (p.stdout, p.stderr, p.status, p.truncated) == (out, err, status, False)


def test_output_beyond_the_limit_is_cut_and_said() -> None:
    p = feed([b"out\n", *b64_lines(b"z" * 1000), b"err\n", b"end 0\n"], limit=100)
    assert p.stdout == b"z" * 100 and p.truncated


@pytest.mark.parametrize("lines", [
    [b"err\n", b"out\n"],  # out of order
    [b"out\n", b"out\n"],
    [b"AAAA\n"],  # data before its section
    [b"out\n", b"not base64!\n"],
    [b"out\n", b"QUJD\xff\n"],
    [b"out\n", b"QUJDRA\n", b"err\n", b"end 0\n"],  # a rest that is no base64
    [b"out\n", b"x" * 5000 + b"\n"],
    [b"out\n", b"err\n", b"end 0\n", b"end 0\n"],  # more than asked
    [b"out\n", b"end 0\n"],  # ended without stderr
])
def test_a_malformed_answer_is_refused(lines: list[bytes]) -> None:
    p = ReplyParser()
    with pytest.raises(GuestError):
        for ln in lines:
            p.feed(ln)


# ----- rr.json ------------------------------------------------------------------------------

def mark(name: str, icount: int, file: str | None = None) -> CheckpointMark:
    return CheckpointMark(name, file or f"snapshots/{name}.json", icount, SHA, 100,
                          f"checkpoint {name} 5 5")


def recording(**kw: Any) -> Recording:
    base: dict[str, Any] = dict(
        scenario="phases@l5",
        machine={"kernel": "/k/bzImage", "accel": {"accel": "tcg", "cpu": "max", "reason": "r"},
                 "mem_mib": 512, "paging": 5, "pti": "off", "append": ""},
        initrd_sha256=SHA, checkpoints=[mark("a", 10), mark("b", 20), mark("c", 30)],
        end_icount=40, failing="snapshots/b.json", failed=["slot_copies: x"], seconds=7.5)
    return Recording(**{**base, **kw})


def test_recording_round_trip_and_targets(tmp_path: Path) -> None:
    rec = recording()
    rec.write(tmp_path)
    back = Recording.load(tmp_path)
    assert back.to_json() == rec.to_json()
    assert [c.name for c in back.targets()] == ["a", "b"]  # up to the failing one
    assert [c.name for c in replace(back, failing="").targets()] == ["a", "b", "c"]


@pytest.mark.parametrize(("change", "why"), [
    (lambda d: d.update(schema="x"), "not a testbed.recording"),
    (lambda d: d.update(schema_version=9), "schema_version"),
    (lambda d: d["checkpoints"][0].update(file="../../etc/passwd"), "inside the folder"),
    (lambda d: d["checkpoints"][0].update(file="/etc/passwd"), "inside the folder"),
    (lambda d: d["checkpoints"][0].update(sha256="nope"), "sha256"),
    (lambda d: d["checkpoints"][1].update(icount=5), "backwards"),
    (lambda d: d["checkpoints"][1].update(icount=-1), "not a count"),
    (lambda d: d["checkpoints"][1].update(icount=True), "not a count"),
    (lambda d: d.update(failing="snapshots/zzz.json"), "not recorded"),
    (lambda d: d["machine"].pop("accel"), "lacks 'accel'"),
    (lambda d: d.pop("machine"), "malformed"),
])
def test_a_bad_recording_is_refused(change: Any, why: str) -> None:
    doc = json.loads(json.dumps(recording().to_json()))
    change(doc)
    with pytest.raises(ValueError, match=why):
        Recording.from_json(doc)


def test_no_recording_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(TestbedError, match="--record"):
        Recording.load(tmp_path)


def test_compare_says_identical_different_and_missing() -> None:
    targets = [mark("a", 1), mark("b", 2), mark("c", 3)]
    got = compare(targets, {"snapshots/a.json": (SHA, 100), "snapshots/b.json": ("cd" * 32, 100)},
                  {"snapshots/c.json": "the replay stopped at instruction 9"})
    assert [m.identical for m in got] == [True, False, False]
    assert got[2].why.startswith("the replay stopped") and not got[2].replayed_sha256
    assert got[1].to_json()["replayed"]["sha256"] == "cd" * 32


def test_replay_exit_status() -> None:
    rec = recording()
    good = Outcome(Path("."), Path("."), rec, compare([mark("a", 1)], {"snapshots/a.json":
                                                                      (SHA, 100)}))
    assert replay_status(good) == 0
    differs = Outcome(Path("."), Path("."), rec,
                      compare([mark("a", 1)], {"snapshots/a.json": ("00" * 32, 100)}))
    assert replay_status(differs) == 1
    stopped = Outcome(Path("."), Path("."), rec, compare(
        [mark("a", 1)], {}, {"snapshots/a.json": "the replay stopped at instruction 3, not"}),
        error="x")
    assert replay_status(stopped) == 1
    broken = Outcome(Path("."), Path("."), rec, compare([mark("a", 1)], {}), error="QEMU died")
    assert replay_status(broken) == 125


# ----- which scenarios, and how the runner records ------------------------------------------

def test_scenarios_that_need_two_cpus_cannot_be_recorded() -> None:
    refused = {name: runner.record_refusal(sc) for name, sc in DESIGN.scenarios.items()}
    assert "2 CPUs" in refused["stale_tlb"] and "second CPU" in refused["stale_tlb"]
    assert "2 CPUs" in refused["explore"] and "spinner" in refused["explore"]
    assert refused["protection_keys"]  # a selftest: no checkpoint to replay to
    assert all(not refused[n] for n in ("phases", "pair", "same_pkey", "stray", "limits"))


def test_testbed_list_says_what_can_be_recorded() -> None:
    from testbed.run_commands import listing, recordable

    rows = {sc["name"]: sc for sc in listing(DESIGN)["scenarios"]}
    assert rows["stale_tlb"]["record"].startswith("no: needs 2 CPUs")
    assert rows["phases"]["record"].startswith("yes")
    assert rows["security"]["record"].startswith("no: the design runs it its own way")
    scs = list(DESIGN.scenarios.values())
    assert [s.name for s in recordable(scs, named=False, design=DESIGN)] == [
        "phases", "pair", "same_pkey", "stray", "limits"]
    with pytest.raises(UsageError, match="stale_tlb cannot be recorded"):
        recordable([DESIGN.scenarios["stale_tlb"]], named=True)


def test_a_recorded_scenario_boots_one_vcpu_without_ssh() -> None:
    sc = DESIGN.scenarios["phases"]
    spec = runner.GuestSpec(kernel=Path("/k/bzImage"), initrd=Path("/i"), accel=TCG,
                            record=True)
    c = runner.machine_config(sc, spec, ("keep_copy_on_release",))
    assert (c.smp, c.ssh, c.rr, c.rr_log) == (1, False, "record", RR_LOG)
    assert c.rr_commands == (runner.bug_command(DESIGN), runner.guest_script(sc.workloads))
    assert rr_problem(c) == ""
    run, _ = runner.reproduce_commands(sc, spec, ())
    assert "--record" in run
    assert runner.machine_config(sc, replace(spec, record=False), ()).rr == ""


def test_first_failing_checkpoint_and_trigger_line() -> None:
    from testbed.boot.machine import Checkpoint
    from testbed.check.model import Finding, ScenarioResult, Status

    r = ScenarioResult("phases@l5", [
        Finding("slot_copies", Status.PASS, "ok", checkpoint="paired"),
        Finding("exit", Status.FAIL, "guest said", checkpoint="released", source="guest"),
        Finding("slot_copies", Status.FAIL, "stale copy", checkpoint="released"),
        Finding("keys", Status.FAIL, "later", checkpoint="peer_exited"),
    ], "")
    files = ["snapshots/paired.json", "snapshots/released.json", "snapshots/peer_exited.json"]
    assert runner.first_failing(r, files) == ("snapshots/released.json",
                                              ["slot_copies: stale copy"])
    assert runner.first_failing(r, files[:1]) == ("", [])
    ck = Checkpoint("paired", 5, 6, {"A.pid": "5", "pairs": "A-B"})
    assert runner.trigger_line(ck) == "checkpoint paired 5 6 A.pid=5 pairs=A-B"


def test_recorded_snapshots_keep_their_timings_apart(tmp_path: Path) -> None:
    snap = synth.rpal_snapshot("paired")
    snap.timing = {"total_ms": 12.5}
    rel = save_snapshot(snap, tmp_path, [], timing=False)
    stored = json.loads((tmp_path / rel).read_text())
    assert stored["timing"] == {} and snap.timing == {"total_ms": 12.5}
    assert json.loads((tmp_path / TIMINGS_FILE).read_text()) == {
        "file": rel, "timing": {"total_ms": 12.5}}
    rel2 = save_snapshot(snap, tmp_path, [rel])
    assert json.loads((tmp_path / rel2).read_text())["timing"] == {"total_ms": 12.5}


def test_a_cpu_without_pkru_round_trips_and_fits_the_schema() -> None:
    snap = synth.rpal_snapshot("paired")
    c = snap.cpus[0]
    assert isinstance(c.regs, Registers)
    regs = replace(c.regs, pkru=Absent("PKRU not read: record/replay"))
    snap = replace(snap, cpus=(replace(c, regs=regs),))
    doc = json.loads(snap.dumps())
    jsonschema.validate(doc, json_schema())
    assert doc["cpus"][0]["pkru"] == {"absent": "PKRU not read: record/replay"}
    assert Snapshot.from_json(doc) == snap


def test_hmp_registers_give_a_cpu_without_pkru() -> None:
    from testbed.snapshot.cpustate import parse_info_registers
    from testbed.snapshot.snapshot import cpu_registers, vcpu_index, vcpu_pkru

    text = ("RAX=0 RBX=0\nRIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 "
            "HLT=1\nCR0=80050033 CR2=0 CR3=000000000075c000 CR4=00371ef0\nEFER=0000000000000d01\n")
    hmp = parse_info_registers(text, 0)
    regs = cpu_registers(hmp)
    assert vcpu_index(hmp) == 0 and isinstance(vcpu_pkru(hmp), Absent)
    assert isinstance(regs.pkru, Absent) and regs.cr3 == 0x75C000 and regs.cpl == 0


# ----- the walk's text ----------------------------------------------------------------------

def entry(raw: int, level: int, index: int, table: int, va: int) -> Any:
    return decode_entry(raw, level, index=index, table=table, va=va)


def test_the_walk_names_the_slot_its_copy_mark_and_the_pkey() -> None:
    va = 0x10100000000  # slot 2
    path = (entry(0x966067, 5, 0, 0x75C000, 0),
            entry(0x969267, 4, 2, 0x966000, 2 << 39),
            entry(0x973067, 3, 4, 0x969000, va),
            entry(0x972067, 2, 0, 0x973000, va),
            entry(0x8800000002631025, 1, 0, 0x972000, va))
    lines = describe_walk(Translation(va, 0x75C000, 5, path), "pid 48 (A)")
    assert lines[0].startswith("walk of VA 0x10100000000 from pid 48 (A)")
    p4d = next(ln for ln in lines if ln.strip().startswith("P4D"))
    assert "[slot 2, copy mark (sw9)" in p4d and "-> table 0x969000" in p4d
    assert "pkey=1" in lines[5] and "-> page 0x2631000 (4 KiB)" in lines[5]
    assert lines[-1] == "  => phys 0x2631000, pkey 1, RO U NX"
    own = describe_walk(Translation(va, 0x75C000, 5, path[:1] + (
        entry(0x969067, 4, 2, 0x966000, 2 << 39), entry(0, 3, 4, 0x969000, va))), "B")
    assert any("[slot 2]" in ln for ln in own) and not any("copy mark" in ln for ln in own)
    assert own[-1].startswith("  => not mapped") and "empty PUD" in own[-1]
    assert entry(0, 3, 4, 0x969000, va).kind is EntryKind.EMPTY
