"""Synthetic snapshots built with the typed model (testbed.snapshot.model), for tests of judges.

`rpal_snapshot()` is a correct RPAL picture: init (pid 1) and services A (pid 101, id 0,
slot 1, pkey 1) and B (pid 102, id 1, slot 2, pkey 2), paired (each holds a marked copy
of the other's slot entry), their leaves tagged with their pkeys, their threads' PKRU
denying all keys but their own, CPU 0 running A's mm at its generation. Tests take it
and inject one bug with `dataclasses.replace` or the helpers here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from testbed.snapshot.model import (
    SLOT_SHIFT,
    Absent,
    Cpu,
    Kernel,
    Mapping,
    Mm,
    Registers,
    SlotEntry,
    Snapshot,
    Task,
    TlbCtx,
    TlbState,
    Trigger,
)

A_TABLE, B_TABLE = 0x3A41000, 0x3B52000
INIT_T0, INIT_T255 = 0x2000000, 0x2001000
MM_INIT, MM_A, MM_B = 0xFFFF888003000000, 0xFFFF888003100000, 0xFFFF888003200000
PKRU_DEFAULT = 0x55555554


def pkru_for(pkey: int) -> int:
    return 0xFFFFFFFF & ~(3 << (2 * pkey))


def slot(n: int, table: int, marker: bool = False, **kw: Any) -> SlotEntry:
    raw = table | 0x67 | (1 << 9 if marker else 0)
    return SlotEntry(n, raw, table, marker=marker, **kw)


def leaf(slot_n: int, offset: int, pages: int, pkey: int, region: str | None = None) -> Mapping:
    start = (slot_n << SLOT_SHIFT) + offset
    return Mapping(start, start + pages * 4096, "rw-u", pkey, "leaf", pages,
                   phys_start=0x4000000 + offset, region=region)


def service_maps(slot_n: int, pkey: int) -> tuple[Mapping, ...]:
    """Code, heap and stack of a service, all in its slot."""
    return (leaf(slot_n, 0x400000, 4, pkey, "code"), leaf(slot_n, 0x800000, 8, pkey, "heap"),
            leaf(slot_n, (1 << SLOT_SHIFT) - 0x21000, 2, pkey, "stack"))


def task(pid: int, comm: str, mm: int, *, tgid: int | None = None, pkru: int | Absent =
         PKRU_DEFAULT, mappings: tuple[Mapping, ...] | Absent = (), running_on: int | None = None,
         ) -> Task:
    return Task(pid, pid if tgid is None else tgid, comm, 0, "S", running_on, False,
                0xFFFF888000100000 + pid, pkru,
                "thread.pkru" if running_on is None else f"cpu{running_on}",
                mm=mm, pgd=0x1000000 + pid * 0x1000, mappings=mappings)


def mm(address: int, pids: tuple[int, ...], slots: tuple[SlotEntry, ...] | Absent, *,
       tlb_gen: int = 3, pti: bool = False) -> Mm:
    user = (slots if isinstance(slots, Absent) else tuple(slots)) if pti else None
    return Mm(address, 0x1000000 + pids[0] * 0x1000, tlb_gen, pids[0], (0,), 1, pids, slots,
              user_pgd=0x1001000 + pids[0] * 0x1000 if pti else None, user_slots=user)


def cpu(index: int, loaded_mm: int, gen: int, *, lazy: bool = False) -> Cpu:
    regs = Registers(0x80050033, 0x1000000, 0x3606E0, 0xD01, 3, True, True, PKRU_DEFAULT,
                     0x401000)
    return Cpu(index, regs, TlbState(loaded_mm, 0, lazy, (TlbCtx(1, gen),)))


def facts(*, pairs: str = "A-B", a: dict[str, str] | None = None,
          b: dict[str, str] | None = None) -> dict[str, str]:
    out = {"A.pid": "101", "A.id": "0", "A.key": "11", "A.pkey": "1",
           "B.pid": "102", "B.id": "1", "B.key": "12", "B.pkey": "2", "pairs": pairs}
    out.update({f"A.{k}": v for k, v in (a or {}).items()})
    out.update({f"B.{k}": v for k, v in (b or {}).items()})
    return out


def rpal_snapshot(name: str = "paired", *, paired: bool = True, pti: bool = False,
                  a_copy: int | None = None, b_copy: int | None = None,
                  fact_map: dict[str, str] | None = None, comm_a: str = "svc_a",
                  tlb_gen: int = 3) -> Snapshot:
    """The correct picture (see the module doc); `a_copy`/`b_copy` override the table the
    copies point at; with `paired=False` nobody holds a copy and the facts say pairs=none."""
    a_slots = [slot(1, A_TABLE)]
    b_slots = [slot(2, B_TABLE)]
    if paired:
        a_slots.append(slot(2, B_TABLE if a_copy is None else a_copy, True))
        b_slots.insert(0, slot(1, A_TABLE if b_copy is None else b_copy, True))
    mms = (
        mm(MM_INIT, (1,), (slot(0, INIT_T0), slot(255, INIT_T255)), pti=pti),
        mm(MM_A, (101,), tuple(a_slots), tlb_gen=tlb_gen, pti=pti),
        mm(MM_B, (102,), tuple(b_slots), tlb_gen=tlb_gen, pti=pti),
    )
    tasks = (
        task(1, "init", MM_INIT, mappings=(leaf(0, 0x400000, 1, 0),)),
        task(101, comm_a, MM_A, pkru=pkru_for(1), mappings=service_maps(1, 1)),
        task(102, "svc_b", MM_B, pkru=pkru_for(2), mappings=service_maps(2, 2)),
    )
    f = fact_map if fact_map is not None else facts(pairs="A-B" if paired else "none")
    return Snapshot(
        name=name,
        trigger=Trigger(name, 101, 101, f),
        kernel=Kernel("6.1.0-rpal", 5, pti, 0, "vmcoreinfo"),
        cpus=(cpu(0, MM_A, tlb_gen), cpu(1, MM_INIT, 1, lazy=True)),
        tasks=tasks,
        mms=mms,
        timing={"assemble_ms": 1.0},
    )


def with_task(snap: Snapshot, pid: int, **changes: Any) -> Snapshot:
    return replace(snap, tasks=tuple(replace(t, **changes) if t.pid == pid else t
                                     for t in snap.tasks))


def with_mm(snap: Snapshot, pid: int, **changes: Any) -> Snapshot:
    return replace(snap, mms=tuple(replace(m, **changes) if pid in m.tasks else m
                                   for m in snap.mms))


def without(snap: Snapshot, pid: int) -> Snapshot:
    """The snapshot with the process gone (its threads and its mm)."""
    return replace(snap, tasks=tuple(t for t in snap.tasks if t.tgid != pid),
                   mms=tuple(m for m in snap.mms if pid not in m.tasks))


def slots_of(snap: Snapshot, pid: int) -> tuple[SlotEntry, ...]:
    m = snap.mm_of(pid)
    assert m is not None and isinstance(m.slots, tuple)
    return m.slots
