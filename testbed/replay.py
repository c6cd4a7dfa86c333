"""`testbed replay RUN_DIR [--gdb]`: a recorded scenario again, instruction for instruction.

`testbed run SCENARIO --record` keeps, in the scenario's run folder, QEMU's
record/replay log (rr.bin), the image it booted (initrd.cpio) and rr.json: the
machine, and for every checkpoint the instruction count at which the guest was
stopped for its snapshot (testbed/boot/rr.py). The replay boots the same machine
with `rr=replay`, stops it at each of those counts (QMP replay-break), takes the
snapshot again and compares its bytes with the recorded one, up to the first
checkpoint where a host check failed (or every checkpoint, and the end of the
recording, when none failed). With --gdb the guest stays stopped there, with
QEMU's gdbstub on the replay folder's gdb.sock and a printed gdb command line that
loads the vmlinux and the testbed's gdb commands (tb-walk ADDR [PID]).

Each replay gets its own folder inside the recording's (replay-...): console.log,
qemu.log, snapshots/, replay.json (each checkpoint: identical or not, both sha256
and sizes). Exit status 0: every snapshot identical and every checkpoint reached;
1: the replay diverged; 125: it could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import paths
from testbed.boot.hostcaps import Accel
from testbed.boot.machine import Checkpoint, Machine, MachineConfig, kernel_cmdline
from testbed.boot.rr import (
    RR_INFO,
    RR_INITRD,
    RR_LOG,
    CheckpointMark,
    Match,
    Recording,
    compare,
    sha256_file,
)
from testbed.errors import EXIT_TESTBED_ERROR, GuestError, TestbedError


def recording_folders(path: Path) -> list[Path]:
    """The recordings under `path`: a scenario's folder, or a run's folder's scenarios."""
    if (path / RR_INFO).is_file():
        return [path]
    if not path.is_dir():
        raise TestbedError(f"{path} is not a run folder")
    found = sorted(d for d in path.iterdir() if (d / RR_INFO).is_file())
    if not found:
        raise TestbedError(f"{path} holds no recording (no {RR_INFO}): record a scenario with "
                           "`testbed run SCENARIO --record`")
    return found


def recorded_kernel(machine: dict[str, Any]) -> Path:
    """The recorded bzImage, byte for byte: its path, else the cached build of its key."""
    want = str(machine.get("kernel_sha256", ""))
    candidates = [Path(str(machine["kernel"]))]
    key = str(machine.get("key", ""))
    if key:
        from testbed.build.kernel import load_build
        from testbed.errors import BuildError

        try:
            candidates.append(load_build(key).bzimage)
        except BuildError:
            pass
    for path in candidates:
        if path.is_file() and (not want or sha256_file(path) == want):
            return path
    raise TestbedError(f"the recorded kernel is not on this machine (bzImage sha256 {want[:16]}"
                       f"..., cache key {key or '?'}): a replay needs the very same build")


def replay_config(rec: Recording, folder: Path, replay_dir: Path, kernel: Path,
                  extra_args: list[str]) -> MachineConfig:
    """The recorded machine in replay mode (pure): the same devices, kernel command line
    and image, the log found from the replay folder."""
    m = rec.machine
    accel = m["accel"]
    cfg = MachineConfig(
        kernel=kernel, initrd=folder / RR_INITRD,
        accel=Accel(str(accel["accel"]), str(accel["cpu"]), "the recording's"),
        smp=1, mem_mib=int(m["mem_mib"]), paging=int(m["paging"]), pti=str(m["pti"]),
        append=str(m["append"]), boot_timeout=float(m.get("boot_timeout", 180.0)),
        ssh=False, ready_marker=True, rr="replay",
        rr_log=os.path.relpath(folder / RR_LOG, replay_dir), extra_args=extra_args,
    )
    want = m.get("cmdline")
    if want is not None and kernel_cmdline(cfg) != want:
        raise TestbedError(f"the replay's kernel command line differs from the recording's "
                           f"({kernel_cmdline(cfg)!r}, recorded {want!r})")
    return cfg


@dataclass
class Outcome:
    folder: Path
    replay_dir: Path
    rec: Recording
    matches: list[Match] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""
    end_reached: bool | None = None  # None: not asked (a failing checkpoint ends it)
    seconds: float = 0.0

    @property
    def identical(self) -> bool:
        return (not self.error and bool(self.matches) and all(m.identical for m in self.matches)
                and self.end_reached is not False)

    def to_json(self) -> dict[str, Any]:
        return {"schema": "testbed.replay", "schema_version": 1, "recording": str(self.folder),
                "scenario": self.rec.scenario, "failing": self.rec.failing,
                "failed": self.rec.failed, "identical": self.identical,
                "checkpoints": [m.to_json() for m in self.matches],
                "end_reached": self.end_reached, "notes": self.notes, "error": self.error,
                "seconds": round(self.seconds, 2)}


def _stop_at(m: Machine, icount: int, deadline: float) -> None:
    """Run the replay on to instruction count `icount` and wait until it stops there."""
    m.execute("replay-break", {"icount": icount})
    m.execute("cont")
    _wait_stopped(m, icount, deadline)


def _wait_stopped(m: Machine, icount: int, deadline: float) -> None:
    while True:
        m.check_alive()
        status = m.execute("query-status")
        if isinstance(status, dict) and status.get("status") != "running":
            got = m.replay_icount()
            if got != icount:
                raise GuestError(f"the replay stopped at instruction {got}, not at {icount} "
                                 f"(status {status.get('status')})")
            return
        if time.monotonic() > deadline:
            raise GuestError(f"the replay did not reach instruction {icount} in time "
                             f"(now at {m.replay_icount()})")
        time.sleep(0.02)


def _reach(m: Machine, requests: queue.Queue[tuple[Checkpoint, int]], mark: CheckpointMark,
           deadline: float, notes: list[str]) -> Checkpoint:
    """Run the replay to `mark`: until the guest asks for its checkpoint (the replay is
    stopped at once, by the checkpoint thread), then on to the recorded instruction count
    of the snapshot (the guest may run a little after its request: the recording stopped
    it once the asking thread was off its CPU)."""
    from testbed.runner import trigger_line

    m.execute("cont")
    while True:
        try:
            ck, icount = requests.get(timeout=0.25)
        except queue.Empty:
            m.check_alive()
            if time.monotonic() > deadline:
                raise GuestError(f"the replay did not reach {mark.name}'s checkpoint in time "
                                 f"(now at instruction {m.replay_icount()})") from None
            continue
        line = trigger_line(ck)
        if mark.trigger and line != mark.trigger:
            notes.append(f"request {line!r} before {mark.file} (recorded {mark.trigger!r})")
            if ck.name != mark.name:
                m.execute("cont")
                continue
        break
    if icount > mark.icount:
        raise GuestError(f"the replay was stopped at instruction {icount}, past {mark.name}'s "
                         f"recorded {mark.icount} (it ran on before the stop)")
    if icount < mark.icount:
        _stop_at(m, mark.icount, deadline)
    return ck


def replay_one(folder: Path, *, gdb: bool = False, timeout: float | None = None,
               on_stop: Any = None) -> Outcome:
    """Replay the recording in `folder` to its failing checkpoint (or to its end)."""
    from testbed.boot.commands import gdb_command, gdb_qemu_args, gdb_setup
    from testbed.rundir import save_snapshot
    from testbed.snapshot.live import LiveSnapshotter
    from testbed.snapshot.model import Trigger

    t0 = time.monotonic()
    rec = Recording.load(folder)
    for name in (RR_LOG, RR_INITRD):
        if not (folder / name).is_file():
            raise TestbedError(f"{folder} lacks {name}: the recording is incomplete")
    if rec.initrd_sha256 and sha256_file(folder / RR_INITRD) != rec.initrd_sha256:
        raise TestbedError(f"{folder / RR_INITRD} is not the image the recording booted "
                           "(sha256 differs)")
    kernel = recorded_kernel(rec.machine)
    replay_dir = paths.new_run_dir("replay", folder)
    out = Outcome(folder, replay_dir, rec)
    cfg = replay_config(rec, folder, replay_dir, kernel, gdb_qemu_args() if gdb else [])
    budget = timeout if timeout is not None else max(300.0, 12 * rec.seconds)
    deadline = t0 + budget
    requests: queue.Queue[tuple[Checkpoint, int]] = queue.Queue()
    replayed: dict[str, tuple[str, int]] = {}
    why: dict[str, str] = {}
    m = Machine(cfg, replay_dir)

    def on_checkpoint(ck: Checkpoint) -> None:
        # stopped at once: the guest waits for this request's answer, which the log
        # gives it at the recorded count; by QMP stop, as the recording was (a
        # replay-break to a count the guest is halted at, then cont, can stall QEMU 7.2)
        m.execute("stop")
        requests.put((ck, m.replay_icount()))

    m.on_checkpoint = on_checkpoint
    snapper = None
    targets = rec.targets()
    waiting = False  # stopped for gdb: an interrupt ends the replay as asked
    try:
        m.start()
        assert m.qmp is not None
        snapper = LiveSnapshotter(m.qmp, m.ram_path, kernel, cpu_state="hmp")
        taken: list[str] = []
        for mark in targets:
            try:
                ck = _reach(m, requests, mark, deadline, out.notes)
            except GuestError as exc:
                why[mark.file] = exc.one_line()
                raise
            snap = snapper.capture(ck.name, Trigger(ck.name, ck.pid, ck.tid, dict(ck.facts)))
            rel = save_snapshot(snap, replay_dir, taken, timing=False)
            taken.append(rel)
            if rel != mark.file:
                out.notes.append(f"checkpoint {ck.name} saved as {rel}, recorded as {mark.file}")
            path = replay_dir / rel
            replayed[mark.file] = (sha256_file(path), path.stat().st_size)
        if not rec.failing and rec.end_icount is not None:
            _stop_at(m, rec.end_icount, deadline)
            out.end_reached = True
        out.matches = compare(targets, replayed, why)
        out.seconds = time.monotonic() - t0
        if gdb:
            gdb_setup(replay_dir)
            if on_stop is not None:
                on_stop(out, gdb_command(replay_dir, kernel))
            waiting = True
            try:
                while True:  # stopped at the checkpoint until interrupted
                    m.check_alive()
                    time.sleep(0.5)
            except TestbedError as exc:  # gdb let it run on, past the recording's end
                out.notes.append(f"after the stop the guest ran on and QEMU ended: "
                                 f"{exc.one_line()}")
    except TestbedError as exc:
        out.error = exc.one_line()
        if not rec.failing and out.end_reached is None and len(replayed) == len(targets):
            out.end_reached = False
    except KeyboardInterrupt:
        if not waiting:
            raise
    finally:
        m.stop()
        if snapper is not None:
            snapper.close()
        out.matches = compare(targets, replayed, why)
        out.seconds = time.monotonic() - t0
        (replay_dir / "replay.json").write_text(json.dumps(out.to_json(), indent=1) + "\n")
    return out


def print_outcome(out: Outcome) -> None:
    rec = out.rec
    to = (f"to the failing checkpoint {rec.failing} ({'; '.join(rec.failed)[:200]})"
          if rec.failing else "to its end (no host check failed)")
    print(f"replay of {rec.scenario} ({out.folder}) {to}")
    for m in out.matches:
        if m.identical:
            print(f"  identical  {m.name}  {m.replayed_size} bytes  sha256 {m.replayed_sha256}")
        elif m.replayed_sha256:
            print(f"  DIFFERENT  {m.name}  recorded {m.recorded_size} bytes sha256 "
                  f"{m.recorded_sha256}, replayed {m.replayed_size} bytes sha256 "
                  f"{m.replayed_sha256}")
        else:
            print(f"  MISSING    {m.name}: {m.why}")
    if out.end_reached:
        print("  the end of the recording reached")
    for note in out.notes:
        print(f"  note: {note}")
    if out.error:
        print(f"  error: {out.error}")
    verdict = "identical" if out.identical else "DIVERGED" if not out.error else "ERROR"
    print(f"{verdict}: {sum(m.identical for m in out.matches)}/{len(out.matches)} snapshots "
          f"identical, {out.seconds:.1f} s; replay folder: {out.replay_dir}", flush=True)


def cmd_replay(args: argparse.Namespace) -> int:
    from testbed.boot.commands import terminate_on_signals

    terminate_on_signals()
    folders = recording_folders(args.run_dir)
    if args.gdb and len(folders) > 1:
        raise TestbedError(f"{args.run_dir} holds {len(folders)} recordings: with --gdb pass "
                           "one scenario's folder (" + ", ".join(f.name for f in folders) + ")")

    def stopped(out: Outcome, gdb_line: str) -> None:
        print_outcome(out)
        where = out.rec.failing or (out.matches[-1].name if out.matches else "the start")
        print(f"stopped at {where}; gdb: {gdb_line}\n"
              "(tb-walk ADDR [PID] in gdb prints a page-table walk; Ctrl-C ends the replay)",
              flush=True)

    statuses = []
    for folder in folders:
        out = replay_one(folder, gdb=args.gdb, timeout=args.timeout, on_stop=stopped)
        if not args.gdb or out.error:
            print_outcome(out)
        else:
            for note in out.notes:
                print(f"note: {note}")
        statuses.append(replay_status(out))
    return 1 if 1 in statuses else max(statuses)


def replay_status(out: Outcome) -> int:
    """0 identical; 1 diverged (a snapshot differs, or the replay did not stop where the
    recording did); 125 the replay could not run."""
    if out.identical:
        return 0
    differs = any(m.replayed_sha256 and not m.identical for m in out.matches)
    stopped_elsewhere = any(m.why.startswith("the replay stopped at") for m in out.matches)
    if differs or stopped_elsewhere or out.end_reached is False:
        return 1
    return EXIT_TESTBED_ERROR


def add_parser(sub: Any) -> None:
    from testbed.boot.commands import positive_seconds

    p = sub.add_parser(
        "replay", help="replay a recorded scenario (run --record) to its failing checkpoint",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 every snapshot identical and every checkpoint reached; 1 the "
               "replay diverged; 125 it could not run (no recording, the kernel missing, "
               "QEMU failed); 130/143 interrupted (--gdb ends so)",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                   help="a recorded scenario's run folder (or a run folder: each recording "
                        "in it, one after the other)")
    p.add_argument("--gdb", action="store_true",
                   help="stay stopped at the failing checkpoint with QEMU's gdbstub on the "
                        "replay folder's gdb.sock; prints the gdb command line (vmlinux, "
                        "lx-* scripts when built, tb-walk ADDR [PID]); Ctrl-C ends it")
    p.add_argument("--timeout", type=positive_seconds, default=None, metavar="S",
                   help="give up after S seconds (default: 12 times the recorded run, at "
                        "least 300)")
    p.set_defaults(func=cmd_replay)
