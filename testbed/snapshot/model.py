"""The snapshot as typed objects: what the host read from a paused guest (schema version 2).

`assemble` (snapshot.py) builds a `Snapshot`; checks and reports read its
attributes, never string keys. `Snapshot.to_json()` gives the documented JSON
form (SNAPSHOT-SCHEMA.md, validated by snapshot.schema.json beside this file)
and `Snapshot.from_json()` reads it back, with a one-line `SnapshotFormatError`
naming the field when the input is not a version-2 snapshot.

Data the host could not read is an `Absent` with its reason, in place of the
value (a list of mappings, the slot entries, a CPU's TLB state, a running
thread's PKRU without vCPU state). In JSON it is `{"absent": "reason"}`. A
check that needs such a value must say it could not judge (an error finding);
it never reads an absence as "nothing there".

Addresses, registers and PKRU values are ints here and lower-case hex strings
with `0x` in JSON (64-bit values do not fit JavaScript numbers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

SCHEMA = "testbed.snapshot"
SCHEMA_VERSION = 2
SCHEMA_FILE = Path(__file__).with_name("snapshot.schema.json")

SLOT_SHIFT = 39  # one slot entry covers 512 GiB: VA >> 39 is its number

T = TypeVar("T")


class SnapshotFormatError(ValueError):
    """Input that is not a version-2 snapshot; the message names the field."""


@dataclass(frozen=True)
class Absent:
    """A value the host could not read, and why (the walker's or reader's one-line error)."""

    reason: str

    def to_json(self) -> dict[str, str]:
        return {"absent": self.reason}

    def __bool__(self) -> bool:  # an absence is never "there"
        return False


def hx(value: int) -> str:
    return f"0x{value:x}"


def present(v: T | Absent) -> bool:
    return not isinstance(v, Absent)


# ----------------------------------------------------------------------------- JSON reading


def _get(d: MappingABC[str, Any], key: str, where: str) -> Any:
    if not isinstance(d, MappingABC):
        raise SnapshotFormatError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise SnapshotFormatError(f"{where}.{key}: missing")
    return d[key]


def _int(d: MappingABC[str, Any], key: str, where: str) -> int:
    v = _get(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise SnapshotFormatError(f"{where}.{key}: expected an integer, got {v!r}")
    return v


def _hex(d: MappingABC[str, Any], key: str, where: str) -> int:
    v = _get(d, key, where)
    if not isinstance(v, str) or not v.startswith("0x"):
        raise SnapshotFormatError(f"{where}.{key}: expected a 0x hex string, got {v!r}")
    try:
        return int(v, 16)
    except ValueError:
        raise SnapshotFormatError(f"{where}.{key}: not hex: {v!r}") from None


def _opt_hex(d: MappingABC[str, Any], key: str, where: str) -> int | None:
    return None if d.get(key) is None else _hex(d, key, where)


def _str(d: MappingABC[str, Any], key: str, where: str) -> str:
    v = _get(d, key, where)
    if not isinstance(v, str):
        raise SnapshotFormatError(f"{where}.{key}: expected a string, got {v!r}")
    return v


def _bool(d: MappingABC[str, Any], key: str, where: str) -> bool:
    v = _get(d, key, where)
    if not isinstance(v, bool):
        raise SnapshotFormatError(f"{where}.{key}: expected true or false, got {v!r}")
    return v


def _list(d: MappingABC[str, Any], key: str, where: str) -> list[Any]:
    v = _get(d, key, where)
    if not isinstance(v, list):
        raise SnapshotFormatError(f"{where}.{key}: expected a list, got {type(v).__name__}")
    return v


def _absent_or(v: Any, where: str, read: Callable[[Any, str], T]) -> T | Absent:
    if isinstance(v, MappingABC) and set(v) == {"absent"}:
        if not isinstance(v["absent"], str):
            raise SnapshotFormatError(f"{where}.absent: expected a string")
        return Absent(v["absent"])
    return read(v, where)


def _enc(v: Any) -> Any:
    return v.to_json() if isinstance(v, Absent) else v


# ----------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Kernel:
    osrelease: str
    paging_levels: int
    pti: bool
    kaslr_offset: int
    layout_source: str  # vmcoreinfo | banner-probe | explicit

    def to_json(self) -> dict[str, Any]:
        return {"osrelease": self.osrelease, "paging_levels": self.paging_levels,
                "pti": self.pti, "kaslr_offset": hx(self.kaslr_offset),
                "layout_source": self.layout_source}

    @classmethod
    def from_json(cls, d: Any, where: str = "kernel") -> Kernel:
        return cls(_str(d, "osrelease", where), _int(d, "paging_levels", where),
                   _bool(d, "pti", where), _hex(d, "kaslr_offset", where),
                   _str(d, "layout_source", where))


@dataclass(frozen=True)
class TlbCtx:
    ctx_id: int
    tlb_gen: int


@dataclass(frozen=True)
class TlbState:
    """The kernel's per-CPU `cpu_tlbstate`."""

    loaded_mm: int
    loaded_mm_asid: int
    is_lazy: bool | None  # None: the kernel has no such field (before 6.1: not lazy-aware)
    ctxs: tuple[TlbCtx, ...]
    current_task: int | None = None

    @property
    def loaded_gen(self) -> int | None:
        """The TLB generation of the loaded ASID slot, None when the ASID is out of range."""
        if 0 <= self.loaded_mm_asid < len(self.ctxs):
            return self.ctxs[self.loaded_mm_asid].tlb_gen
        return None

    def to_json(self) -> dict[str, Any]:
        return {"loaded_mm": hx(self.loaded_mm), "loaded_mm_asid": self.loaded_mm_asid,
                "is_lazy": self.is_lazy,
                "ctxs": [{"ctx_id": c.ctx_id, "tlb_gen": c.tlb_gen} for c in self.ctxs],
                "current_task": hx(self.current_task) if self.current_task else None}

    @classmethod
    def from_json(cls, d: Any, where: str) -> TlbState:
        ctxs = tuple(TlbCtx(_int(c, "ctx_id", f"{where}.ctxs[{i}]"),
                            _int(c, "tlb_gen", f"{where}.ctxs[{i}]"))
                     for i, c in enumerate(_list(d, "ctxs", where)))
        lazy = d.get("is_lazy")
        if lazy is not None and not isinstance(lazy, bool):
            raise SnapshotFormatError(f"{where}.is_lazy: expected true, false or null")
        return cls(_hex(d, "loaded_mm", where), _int(d, "loaded_mm_asid", where),
                   lazy, ctxs, _opt_hex(d, "current_task", where))


@dataclass(frozen=True)
class Registers:
    """A vCPU's registers at the pause, from the migration stream (or, under QEMU's
    record/replay, from HMP `info registers`: then PKRU is absent)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    cpl: int
    la57: bool
    pke: bool
    pkru: int | Absent
    rip: int


_REG_HEX = ("cr0", "cr3", "cr4", "efer", "rip")


@dataclass(frozen=True)
class Cpu:
    index: int
    regs: Registers | Absent  # Absent: no vCPU state (an offline dump, a kernel-only CPU)
    tlb: TlbState | Absent

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index}
        if isinstance(self.regs, Registers):
            r = self.regs
            d.update({k: hx(getattr(r, k)) for k in _REG_HEX})
            d["pkru"] = _enc(r.pkru) if isinstance(r.pkru, Absent) else hx(r.pkru)
            d.update(cpl=r.cpl, la57=r.la57, pke=r.pke)
        else:
            d["regs"] = self.regs.to_json()
        d["tlb"] = self.tlb.to_json()
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> Cpu:
        regs: Registers | Absent
        if "regs" in d:
            regs = _absent_or(d["regs"], f"{where}.regs", _no_value)
        else:
            regs = Registers(
                cr0=_hex(d, "cr0", where), cr3=_hex(d, "cr3", where), cr4=_hex(d, "cr4", where),
                efer=_hex(d, "efer", where), cpl=_int(d, "cpl", where),
                la57=_bool(d, "la57", where), pke=_bool(d, "pke", where),
                pkru=_absent_or(_get(d, "pkru", where), f"{where}.pkru",
                                lambda v, w: _hex(d, "pkru", where)),
                rip=_hex(d, "rip", where))
        tlb = _absent_or(_get(d, "tlb", where), f"{where}.tlb", TlbState.from_json)
        return cls(_int(d, "index", where), regs, tlb)


def _no_value(v: Any, where: str) -> Any:
    raise SnapshotFormatError(f"{where}: expected {{\"absent\": reason}}, got {v!r}")


@dataclass(frozen=True)
class Mapping:
    """A merged range of user-half page-table mappings."""

    start: int
    end: int  # exclusive
    flags: str  # r w/- x/- then u/s and g for leaves; "---" PROT_NONE; "swp" swapped out
    pkey: int
    kind: str  # leaf | protnone | swap
    pages: int
    page_sizes: tuple[int, ...] = (4096,)
    phys_start: int = 0
    phys_contiguous: bool = True
    region: str | None = None  # stack | heap | code

    @property
    def slots(self) -> range:
        """The slot numbers this range touches."""
        return range(self.start >> SLOT_SHIFT, ((self.end - 1) >> SLOT_SHIFT) + 1)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "start": hx(self.start), "end": hx(self.end), "flags": self.flags,
            "pkey": self.pkey, "kind": self.kind, "pages": self.pages,
            "page_sizes": list(self.page_sizes), "phys_start": hx(self.phys_start),
            "phys_contiguous": self.phys_contiguous,
        }
        if self.region:
            d["region"] = self.region
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> Mapping:
        return cls(_hex(d, "start", where), _hex(d, "end", where), _str(d, "flags", where),
                   _int(d, "pkey", where), _str(d, "kind", where), _int(d, "pages", where),
                   tuple(_list(d, "page_sizes", where)), _hex(d, "phys_start", where),
                   _bool(d, "phys_contiguous", where), d.get("region"))


def _mappings(v: Any, where: str) -> tuple[Mapping, ...]:
    if not isinstance(v, list):
        raise SnapshotFormatError(f"{where}: expected a list or {{\"absent\": reason}}")
    return tuple(Mapping.from_json(m, f"{where}[{i}]") for i, m in enumerate(v))


@dataclass(frozen=True)
class Task:
    pid: int
    tgid: int
    comm: str
    cpu: int
    state: str  # as in /proc: R S D T t X Z P I
    running_on: int | None  # CPU whose current task it is at the pause
    kthread: bool
    task: int  # address of its task_struct
    pkru: int | Absent  # Absent: running on a CPU whose registers were not read
    pkru_source: str  # "thread.pkru" or "cpuN"
    mm: int | None = None
    pgd: int | None = None
    user_pgd: int | None = None  # with PTI: the root the mappings were read from
    mappings: tuple[Mapping, ...] | Absent = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "pid": self.pid, "tgid": self.tgid, "comm": self.comm, "cpu": self.cpu,
            "state": self.state, "running_on": self.running_on, "kthread": self.kthread,
            "task": hx(self.task),
            "pkru": _enc(self.pkru) if isinstance(self.pkru, Absent) else hx(self.pkru),
            "pkru_source": self.pkru_source,
        }
        if self.mm is not None:
            d["mm"] = hx(self.mm)
            d["pgd"] = hx(self.pgd or 0)
            if self.user_pgd is not None:
                d["user_pgd"] = hx(self.user_pgd)
            d["mappings"] = (self.mappings.to_json() if isinstance(self.mappings, Absent)
                             else [m.to_json() for m in self.mappings])
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> Task:
        pkru = _absent_or(_get(d, "pkru", where), where, lambda v, w: _hex(d, "pkru", w))
        mm = _opt_hex(d, "mm", where)
        maps: tuple[Mapping, ...] | Absent = ()
        if mm is not None:
            maps = _absent_or(_get(d, "mappings", where), f"{where}.mappings", _mappings)
        running = d.get("running_on")
        if running is not None and (isinstance(running, bool) or not isinstance(running, int)):
            raise SnapshotFormatError(f"{where}.running_on: expected an integer or null")
        return cls(
            _int(d, "pid", where), _int(d, "tgid", where), _str(d, "comm", where),
            _int(d, "cpu", where), _str(d, "state", where), running,
            _bool(d, "kthread", where), _hex(d, "task", where), pkru,
            _str(d, "pkru_source", where), mm, _opt_hex(d, "pgd", where),
            _opt_hex(d, "user_pgd", where), maps,
        )


@dataclass(frozen=True)
class SlotEntry:
    """A 512 GiB entry (P4D with 5-level paging, PGD with 4-level): what RPAL copies."""

    slot: int  # VA >> 39
    raw: int
    table: int  # physical address of the PUD table it points at
    present: bool = True
    marker: bool = False  # software bit 9: RPAL's mark on a copied entry
    user: bool = True
    write: bool = True
    nx: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.slot, "raw": hx(self.raw), "table": hx(self.table),
                "present": self.present, "marker": self.marker, "user": self.user,
                "write": self.write, "nx": self.nx}

    @classmethod
    def from_json(cls, d: Any, where: str) -> SlotEntry:
        return cls(_int(d, "slot", where), _hex(d, "raw", where), _hex(d, "table", where),
                   _bool(d, "present", where), _bool(d, "marker", where),
                   _bool(d, "user", where), _bool(d, "write", where), _bool(d, "nx", where))


def _slots(v: Any, where: str) -> tuple[SlotEntry, ...]:
    if not isinstance(v, list):
        raise SnapshotFormatError(f"{where}: expected a list or {{\"absent\": reason}}")
    return tuple(SlotEntry.from_json(e, f"{where}[{i}]") for i, e in enumerate(v))


def _enc_slots(v: tuple[SlotEntry, ...] | Absent) -> Any:
    return v.to_json() if isinstance(v, Absent) else [e.to_json() for e in v]


@dataclass(frozen=True)
class Mm:
    """An address space (`mm_struct`) with its slot entries."""

    address: int
    pgd: int
    tlb_gen: int  # mm->context.tlb_gen
    ctx_id: int
    cpumask: tuple[int, ...]
    users: int
    tasks: tuple[int, ...]  # pids of its threads
    slots: tuple[SlotEntry, ...] | Absent
    user_pgd: int | None = None  # with PTI
    user_slots: tuple[SlotEntry, ...] | Absent | None = None  # with PTI: the user root's

    def slot(self, n: int, *, user: bool = False) -> SlotEntry | None:
        """The entry for slot n (None: no entry); the caller has checked the slots are there."""
        entries = self.user_slots if user else self.slots
        if not isinstance(entries, tuple):
            return None
        return next((e for e in entries if e.slot == n), None)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "address": hx(self.address), "pgd": hx(self.pgd), "tlb_gen": self.tlb_gen,
            "ctx_id": self.ctx_id, "cpumask": list(self.cpumask), "users": self.users,
            "tasks": list(self.tasks), "slots": _enc_slots(self.slots),
        }
        if self.user_pgd is not None:
            d["user_pgd"] = hx(self.user_pgd)
        if self.user_slots is not None:
            d["user_slots"] = _enc_slots(self.user_slots)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str) -> Mm:
        user_slots = None
        if "user_slots" in d:
            user_slots = _absent_or(d["user_slots"], f"{where}.user_slots", _slots)
        return cls(
            _hex(d, "address", where), _hex(d, "pgd", where), _int(d, "tlb_gen", where),
            _int(d, "ctx_id", where), tuple(_list(d, "cpumask", where)),
            _int(d, "users", where), tuple(_list(d, "tasks", where)),
            _absent_or(_get(d, "slots", where), f"{where}.slots", _slots),
            _opt_hex(d, "user_pgd", where), user_slots,
        )


@dataclass(frozen=True)
class Trigger:
    """The guest thread that asked for the snapshot (a checkpoint), and the facts it passed."""

    name: str
    pid: int
    tid: int
    facts: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "tid": self.tid, "facts": dict(self.facts)}

    @classmethod
    def from_json(cls, d: Any, where: str = "trigger") -> Trigger:
        facts = _get(d, "facts", where)
        if not isinstance(facts, MappingABC) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in facts.items()
        ):
            raise SnapshotFormatError(f"{where}.facts: expected an object of strings")
        return cls(_str(d, "name", where), _int(d, "pid", where), _int(d, "tid", where),
                   dict(facts))


@dataclass
class Snapshot:
    """One whole-guest snapshot (SNAPSHOT-SCHEMA.md). Mutable only in `timing`."""

    name: str
    kernel: Kernel
    cpus: tuple[Cpu, ...]
    tasks: tuple[Task, ...]
    mms: tuple[Mm, ...]
    trigger: Trigger | None = None
    timing: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # e.g. an offline dump's path

    @property
    def facts(self) -> dict[str, str]:
        return self.trigger.facts if self.trigger else {}

    def threads(self, tgid: int) -> list[Task]:
        return [t for t in self.tasks if t.tgid == tgid]

    @cached_property
    def _mm_by_pid(self) -> dict[int, Mm]:
        return {p: mm for mm in self.mms for p in mm.tasks}

    def mm_of(self, pid: int) -> Mm | None:
        """The mm of a thread or process (by pid or tgid)."""
        mm = self._mm_by_pid.get(pid)
        if mm is None:
            for t in self.threads(pid):
                mm = self._mm_by_pid.get(t.pid)
                if mm is not None:
                    break
        return mm

    def mm_at(self, address: int) -> Mm | None:
        return next((mm for mm in self.mms if mm.address == address), None)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "trigger": self.trigger.to_json() if self.trigger else None,
            "kernel": self.kernel.to_json(),
            "cpus": [c.to_json() for c in self.cpus],
            "tasks": [t.to_json() for t in self.tasks],
            "mms": [m.to_json() for m in self.mms],
            "timing": dict(self.timing),
        }
        if self.source:
            d["source"] = dict(self.source)
        return d

    def dumps(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_json(), indent=indent)

    @classmethod
    def from_json(cls, d: Any) -> Snapshot:
        if not isinstance(d, MappingABC):
            raise SnapshotFormatError("snapshot: expected a JSON object")
        if d.get("schema") != SCHEMA:
            raise SnapshotFormatError(f"schema: not a {SCHEMA} document: {d.get('schema')!r}")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise SnapshotFormatError(
                f"schema_version: {d.get('schema_version')!r}, this testbed reads "
                f"{SCHEMA_VERSION}: take the snapshot again with this testbed")
        trig = d.get("trigger")
        timing = d.get("timing", {})
        if not isinstance(timing, MappingABC):
            raise SnapshotFormatError("timing: expected an object")
        return cls(
            name=_str(d, "name", "snapshot"),
            kernel=Kernel.from_json(_get(d, "kernel", "snapshot")),
            cpus=tuple(Cpu.from_json(c, f"cpus[{i}]")
                       for i, c in enumerate(_list(d, "cpus", "snapshot"))),
            tasks=tuple(Task.from_json(t, f"tasks[{i}]")
                        for i, t in enumerate(_list(d, "tasks", "snapshot"))),
            mms=tuple(Mm.from_json(m, f"mms[{i}]")
                      for i, m in enumerate(_list(d, "mms", "snapshot"))),
            trigger=Trigger.from_json(trig) if trig is not None else None,
            timing=dict(timing),
            source=dict(d.get("source") or {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise SnapshotFormatError(f"{path}: not JSON: {exc}") from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a snapshot (snapshot.schema.json)."""
    return dict(json.loads(SCHEMA_FILE.read_text()))
