"""Whole-guest snapshots: vCPUs with PKRU, tasks with mappings, mms and per-CPU TLB state.

`capture_live` pauses a running guest, reads the vCPUs from a migration
stream, walks the kernel's objects and every user task's page tables through
the shared RAM file, and resumes the guest. `assemble` does the reading part
on any memory source (live RAM file or an ELF dump). The result is a typed
`Snapshot` (model.py); its JSON form is documented in SNAPSHOT-SCHEMA.md.
Whatever could not be read is an `Absent` with the reader's one-line error.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

from testbed.errors import TestbedError
from testbed.snapshot.cpustate import HmpRegisters
from testbed.snapshot.kernel import KernelView
from testbed.snapshot.kernel import Mm as KMm
from testbed.snapshot.kernel import Task as KTask
from testbed.snapshot.migstream import VcpuState
from testbed.snapshot.model import (
    SCHEMA,
    SCHEMA_VERSION,
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
    hx,
)
from testbed.snapshot.pagetable import Entry, EntryKind, MappingRange, PageTableWalker

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Trigger", "assemble", "hx"]


# A vCPU as read at the pause: from the migration stream (with PKRU), or from HMP
# `info registers` under QEMU's record/replay (no migration there: no PKRU).
Vcpu = VcpuState | HmpRegisters
PKRU_UNREAD = ("PKRU not read: under record/replay the registers come from HMP "
               "'info registers', which has no PKRU")


def vcpu_index(v: Vcpu) -> int:
    return v.index if isinstance(v, VcpuState) else (v.cpu_index or 0)


def vcpu_pkru(v: Vcpu) -> int | Absent:
    return v.pkru if isinstance(v, VcpuState) else Absent(PKRU_UNREAD)


def cpu_registers(v: Vcpu) -> Registers:
    return Registers(cr0=v.cr0, cr3=v.cr3, cr4=v.cr4, efer=v.efer, cpl=v.cpl, la57=v.la57,
                     pke=v.pke, pkru=vcpu_pkru(v), rip=v.rip)


def mapping_record(r: MappingRange, region: str | None = None) -> Mapping:
    flags = r.perms()
    if r.kind is EntryKind.LEAF:
        flags += "u" if r.user else "s"
        flags += "g" if r.global_ else ""
    return Mapping(
        start=r.start, end=r.end, flags=flags, pkey=r.pkey, kind=r.kind.name.lower(),
        pages=r.pages, page_sizes=tuple(sorted(r.page_sizes)), phys_start=r.phys_start,
        phys_contiguous=r.phys_contiguous, region=region,
    )


MM_REGIONS = (("start_stack", "stack"), ("start_brk", "heap"), ("start_code", "code"))


def mm_regions(view: KernelView, mm: KMm) -> dict[str, int]:
    """Addresses that name regions of an mm: stack, heap (brk) and code start."""
    out = {}
    for member, region in MM_REGIONS:
        try:
            out[region] = view.read_member(mm.address, "mm_struct", member)
        except (TestbedError, KeyError):
            continue
    try:
        out["brk"] = view.read_member(mm.address, "mm_struct", "brk")
    except (TestbedError, KeyError):
        pass
    return out


def region_of(start: int, end: int, regions: dict[str, int]) -> str | None:
    """The named region a mapping holds (the heap: from start_brk to brk), if any."""
    found = None
    heap, brk = regions.get("heap"), regions.get("brk")
    if heap is not None and brk is not None and heap < brk and start < brk and heap < end:
        found = "heap"
    for region in ("stack", "code"):
        addr = regions.get(region)
        if addr is not None and start <= addr < end:
            found = region
    return found


def label_regions(mappings: Sequence[Mapping], regions: dict[str, int]) -> tuple[Mapping, ...]:
    return tuple(replace(m, region=region_of(m.start, m.end, regions)) for m in mappings)


def slot_record(e: Entry) -> SlotEntry:
    """A 512 GiB entry (P4D with 5-level paging, PGD with 4-level): what RPAL copies."""
    return SlotEntry(slot=e.va >> 39, raw=e.raw, table=e.addr, present=e.present,
                     marker=e.sw9, user=e.user, write=e.write, nx=e.nx)


def slot_records(walker: PageTableWalker, root: int) -> tuple[SlotEntry, ...] | Absent:
    try:
        return tuple(slot_record(e) for e in walker.slot_entries(root))
    except TestbedError as exc:
        return Absent(exc.one_line())


def mm_record(mm: KMm, tasks: Iterable[KTask], walker: PageTableWalker) -> Mm:
    return Mm(
        address=mm.address, pgd=mm.pgd_phys, tlb_gen=mm.tlb_gen, ctx_id=mm.ctx_id,
        cpumask=tuple(sorted(mm.cpumask)), users=mm.users,
        tasks=tuple(sorted(t.pid for t in tasks)),
        slots=slot_records(walker, mm.pgd_phys),
        user_pgd=mm.user_pgd_phys if mm.pti else None,
        user_slots=slot_records(walker, mm.user_pgd_phys) if mm.pti else None,
    )


def _tlb(view: KernelView, index: int) -> TlbState | Absent:
    try:
        tlb = view.cpu_tlbstate(index)
    except TestbedError as exc:
        return Absent(exc.one_line())
    return TlbState(
        loaded_mm=tlb.loaded_mm, loaded_mm_asid=tlb.loaded_mm_asid, is_lazy=tlb.is_lazy,
        ctxs=tuple(TlbCtx(c.ctx_id, c.tlb_gen) for c in tlb.ctxs),
        current_task=tlb.current_task or None,
    )


def assemble(
    view: KernelView,
    vcpus: Sequence[Vcpu] = (),
    *,
    name: str = "",
    trigger: Trigger | None = None,
    user_only: bool = True,
    pids: set[int] | None = None,
) -> Snapshot:
    """Read the paused guest into a Snapshot (see SNAPSHOT-SCHEMA.md)."""
    t0 = time.perf_counter()
    walker = view.walker
    by_cpu = {vcpu_index(v): v for v in vcpus}
    tasks = view.tasks()
    mms: dict[int, KMm] = {}
    mm_tasks: dict[int, list[KTask]] = {}
    for t in tasks:
        if t.mm:
            if t.mm not in mms:
                found = view.mm(t.mm)
                if found is None:
                    continue
                mms[t.mm] = found
            mm_tasks.setdefault(t.mm, []).append(t)
    mappings_of: dict[int, tuple[Mapping, ...] | Absent] = {}
    task_records = []
    for t in tasks:
        if user_only and not t.mm:
            continue
        if pids is not None and t.pid not in pids and t.tgid not in pids:
            continue
        pkru: int | Absent
        if t.running_on is not None and t.running_on in by_cpu:
            pkru, source = vcpu_pkru(by_cpu[t.running_on]), f"cpu{t.running_on}"
        elif t.running_on is not None:
            # running, and its CPU's registers were not read: thread.pkru is from its last
            # switch out, not what it runs with now
            pkru = Absent(f"running on CPU {t.running_on}, whose registers were not read")
            source = f"cpu{t.running_on}"
        else:
            pkru, source = t.pkru, "thread.pkru"
        mm = mms.get(t.mm)
        maps: tuple[Mapping, ...] | Absent = ()
        if mm is not None:
            if mm.address not in mappings_of:
                try:
                    got = tuple(mapping_record(r) for r in walker.mappings(mm.user_pgd_phys))
                except TestbedError as exc:
                    mappings_of[mm.address] = Absent(exc.one_line())
                else:
                    mappings_of[mm.address] = label_regions(got, mm_regions(view, mm))
            maps = mappings_of[mm.address]
        elif t.mm:
            maps = Absent(f"mm_struct at {hx(t.mm)} could not be read")
        task_records.append(Task(
            pid=t.pid, tgid=t.tgid, comm=t.comm, cpu=t.cpu, state=t.state_char,
            running_on=t.running_on, kthread=t.is_kthread, task=t.address, pkru=pkru,
            pkru_source=source,
            mm=mm.address if mm is not None else (t.mm or None),
            pgd=mm.pgd_phys if mm is not None else None,
            user_pgd=mm.user_pgd_phys if mm is not None and mm.pti else None,
            mappings=maps,
        ))
    cpus = []
    for index in sorted(set(by_cpu) | set(view.online_cpus())):
        regs: Registers | Absent = (cpu_registers(by_cpu[index]) if index in by_cpu
                                    else Absent("no vCPU state for this CPU"))
        cpus.append(Cpu(index, regs, _tlb(view, index)))
    return Snapshot(
        name=name,
        trigger=trigger,
        kernel=Kernel(
            osrelease=view.layout.osrelease, paging_levels=walker.levels, pti=view.pti,
            kaslr_offset=view.layout.kaslr_offset, layout_source=view.layout.source,
        ),
        cpus=tuple(cpus),
        tasks=tuple(task_records),
        mms=tuple(mm_record(mm, mm_tasks.get(a, []), walker) for a, mm in sorted(mms.items())),
        timing={"assemble_ms": round((time.perf_counter() - t0) * 1000, 2)},
    )
