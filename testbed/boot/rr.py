"""QEMU record/replay of a guest: the command line, and what a recording keeps.

`-icount shift=auto,rr=record,rrfile=F` logs every nondeterministic input of a
single-vCPU TCG guest (clock reads, serial input, interrupts by instruction
count); `rr=replay` runs the guest again from that log, instruction for
instruction. What the testbed adds (MachineConfig.rr, runner, `testbed replay`):

* Inputs the log does not cover are left out or fixed: no network (SSH is not
  replayed: commands go over a serial command port, testbed/boot/cmdport.py),
  no virtio-rng, `-seed` for QEMU's RDRAND, the RTC from the virtual clock at a
  fixed date. Checkpoints go over a serial line (ttyS1) too: QEMU records
  `-serial` lines, not virtio-serial ports.
* A snapshot is taken while the guest is stopped; the recording keeps the
  instruction count of that stop (QMP `query-replay`) for each checkpoint, and
  the replay stops at the same count (QMP `replay-break`): the same guest state,
  so the same snapshot bytes.

A recording's folder holds `rr.bin` (QEMU's log), `initrd.cpio` (the exact image
it booted) and `rr.json` (`Recording`: the machine, the checkpoints with their
instruction counts and snapshot hashes, the first failing checkpoint).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError

RR_LOG = "rr.bin"
RR_INFO = "rr.json"
RR_INITRD = "initrd.cpio"
SCHEMA = "testbed.recording"
SCHEMA_VERSION = 1
RTC = "base=2024-01-01T00:00:00,clock=vm"  # guest time from the virtual clock only
SEED = "1"  # QEMU's RDRAND/RDSEED for the guest: the same numbers every run
MODES = ("record", "replay")


def qemu_opt(value: str) -> str:
    """A value inside a QEMU -opt list: commas doubled (pure)."""
    return value.replace(",", ",,")


def rr_qemu_args(mode: str, log: str) -> list[str]:
    """QEMU's record/replay options for `mode` with the log at `log` (relative to QEMU's
    working directory), pure."""
    if mode not in MODES:
        raise TestbedError(f"record/replay mode {mode!r}: choose {' or '.join(MODES)}")
    args = ["-icount", f"shift=auto,rr={mode},rrfile={qemu_opt(log)}",
            "-rtc", RTC, "-seed", SEED]
    if mode == "replay":
        args.append("-S")  # stopped until the first replay-break is set
    return args


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class CheckpointMark:
    """One checkpoint of a recording: where the guest was stopped, what was seen there."""

    name: str
    file: str  # the snapshot file, relative to the recording's folder
    icount: int  # the guest's instruction count at the stop
    sha256: str  # of the snapshot file
    size: int
    trigger: str = ""  # the guest's request line ("checkpoint NAME PID TID ...")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "icount": self.icount,
                "sha256": self.sha256, "size": self.size, "trigger": self.trigger}


@dataclass
class Recording:
    """rr.json: everything `testbed replay` needs besides the log and the image."""

    scenario: str  # the result's name, e.g. phases@l5
    machine: dict[str, Any]  # kernel, kernel_sha256, key, series, accel, mem_mib, ...
    initrd_sha256: str
    checkpoints: list[CheckpointMark] = field(default_factory=list)
    end_icount: int | None = None  # where the recording stopped (None: it did not end well)
    failing: str = ""  # the snapshot file of the first checkpoint where a host check failed
    failed: list[str] = field(default_factory=list)  # those checks, "check: message"
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "scenario": self.scenario,
                "log": RR_LOG, "initrd": RR_INITRD, "initrd_sha256": self.initrd_sha256,
                "machine": dict(self.machine),
                "checkpoints": [c.to_json() for c in self.checkpoints],
                "end_icount": self.end_icount, "failing": self.failing,
                "failed": list(self.failed), "seconds": self.seconds}

    def write(self, folder: Path) -> Path:
        path = folder / RR_INFO
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)
        return path

    def targets(self) -> list[CheckpointMark]:
        """The checkpoints a replay stops at: up to the failing one, else all (pure)."""
        if not self.failing:
            return list(self.checkpoints)
        files = [c.file for c in self.checkpoints]
        end = files.index(self.failing) if self.failing in files else len(files) - 1
        return self.checkpoints[:end + 1]

    @classmethod
    def from_json(cls, d: Any, where: str = RR_INFO) -> Recording:
        """Parse rr.json (pure); ValueError names what is wrong. The file is a run folder's:
        checked like any input (paths inside the folder, counts increasing)."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ValueError(f"{where}: not a {SCHEMA} document")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{where}: schema_version {d.get('schema_version')!r}, this "
                             f"testbed reads {SCHEMA_VERSION}")
        try:
            marks = [_mark(c, f"{where}: checkpoint {i}")
                     for i, c in enumerate(d.get("checkpoints", ()))]
            end = d.get("end_icount")
            rec = cls(
                scenario=str(d["scenario"]), machine=dict(d["machine"]),
                initrd_sha256=str(d["initrd_sha256"]), checkpoints=marks,
                end_icount=None if end is None else _count(end, f"{where}: end_icount"),
                failing=str(d.get("failing", "")),
                failed=[str(x) for x in d.get("failed", ())],
                seconds=float(d.get("seconds", 0.0)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{where}: malformed ({exc!r})") from None
        counts = [c.icount for c in rec.checkpoints]
        if any(b < a for a, b in zip(counts, counts[1:], strict=False)):
            raise ValueError(f"{where}: checkpoint instruction counts go backwards")
        if rec.failing and rec.failing not in {c.file for c in rec.checkpoints}:
            raise ValueError(f"{where}: failing checkpoint {rec.failing!r} is not recorded")
        for key in ("kernel", "mem_mib", "paging", "pti", "append", "accel"):
            if key not in rec.machine:
                raise ValueError(f"{where}: machine lacks {key!r}")
        return rec

    @classmethod
    def load(cls, folder: Path) -> Recording:
        path = folder / RR_INFO
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise TestbedError(f"{folder} holds no recording (no {RR_INFO}): record it with "
                               "`testbed run SCENARIO --record`") from None
        except (OSError, ValueError) as exc:
            raise TestbedError(f"{path} cannot be read ({exc})") from None
        try:
            return cls.from_json(doc, str(path))
        except ValueError as exc:
            raise TestbedError(str(exc)) from None


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: instruction count {value!r} is not a count")
    return value


def _mark(c: Any, where: str) -> CheckpointMark:
    if not isinstance(c, dict):
        raise ValueError(f"{where}: not an object")
    file = str(c["file"])
    if Path(file).is_absolute() or ".." in Path(file).parts:
        raise ValueError(f"{where}: {file!r} is not a path inside the folder")
    sha = str(c["sha256"])
    if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise ValueError(f"{where}: sha256 {sha[:80]!r} is not one")
    size = c["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{where}: size {size!r}")
    return CheckpointMark(str(c["name"]), file, _count(c["icount"], where), sha, size,
                          str(c.get("trigger", "")))


@dataclass(frozen=True)
class Match:
    """A checkpoint's snapshot in the recording against the replay's."""

    name: str  # the snapshot file (snapshots/NAME.json)
    recorded_sha256: str
    recorded_size: int
    replayed_sha256: str  # "" when the replay took none
    replayed_size: int
    why: str = ""  # why there is no replayed snapshot

    @property
    def identical(self) -> bool:
        return (self.replayed_sha256 == self.recorded_sha256
                and self.replayed_size == self.recorded_size)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "identical": self.identical,
                "recorded": {"sha256": self.recorded_sha256, "size": self.recorded_size},
                "replayed": {"sha256": self.replayed_sha256, "size": self.replayed_size},
                **({"why": self.why} if self.why else {})}


def compare(targets: list[CheckpointMark], replayed: dict[str, tuple[str, int]],
            why: dict[str, str] | None = None) -> list[Match]:
    """Each target checkpoint's recorded snapshot against the replayed one (snapshot file
    -> (sha256, size)), in order (pure)."""
    why = why or {}
    out = []
    for c in targets:
        sha, size = replayed.get(c.file, ("", 0))
        out.append(Match(c.file, c.sha256, c.size, sha, size,
                         "" if sha else why.get(c.file, "the replay did not reach it")))
    return out
