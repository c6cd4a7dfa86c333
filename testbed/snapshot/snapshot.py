"""Whole-guest snapshots: vCPUs with PKRU, tasks with mappings, mms and per-CPU TLB state.

`capture_live` pauses a running guest, reads the vCPUs from a migration
stream, walks the kernel's objects and every user task's page tables through
the shared RAM file, and resumes the guest. `assemble` does the reading part
on any memory source (live RAM file or an ELF dump). The result is a plain
dict in the documented, versioned format of SNAPSHOT-SCHEMA.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from testbed.errors import TestbedError
from testbed.snapshot.kernel import KernelView, Mm, Task
from testbed.snapshot.migstream import VcpuState
from testbed.snapshot.pagetable import Entry, EntryKind, MappingRange, PageTableWalker

SCHEMA = "testbed.snapshot"
SCHEMA_VERSION = 1


def hx(value: int) -> str:
    return f"0x{value:x}"


@dataclass(frozen=True)
class Trigger:
    """The guest thread that asked for the snapshot (a checkpoint), if any."""

    name: str
    pid: int
    tid: int
    facts: dict[str, str] = field(default_factory=dict)


def cpu_record(v: VcpuState) -> dict[str, Any]:
    return {
        "index": v.index,
        "cr0": hx(v.cr0),
        "cr3": hx(v.cr3),
        "cr4": hx(v.cr4),
        "efer": hx(v.efer),
        "cpl": v.cpl,
        "la57": v.la57,
        "pke": v.pke,
        "pkru": hx(v.pkru),
        "rip": hx(v.rip),
    }


def mapping_record(r: MappingRange) -> dict[str, Any]:
    flags = r.perms()
    if r.kind is EntryKind.LEAF:
        flags += "u" if r.user else "s"
        flags += "g" if r.global_ else ""
    return {
        "start": hx(r.start),
        "end": hx(r.end),
        "flags": flags,
        "pkey": r.pkey,
        "kind": r.kind.name.lower(),
        "pages": r.pages,
        "page_sizes": sorted(r.page_sizes),
        "phys_start": hx(r.phys_start),
        "phys_contiguous": r.phys_contiguous,
    }


MM_REGIONS = (("start_stack", "stack"), ("start_brk", "heap"), ("start_code", "code"))


def mm_regions(view: KernelView, mm: Mm) -> dict[str, int]:
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


def label_regions(mappings: list[dict[str, Any]], regions: dict[str, int]) -> None:
    """Mark the mapping holding each named address (the heap: from start_brk to brk)."""
    for m in mappings:
        start, end = int(m["start"], 16), int(m["end"], 16)
        for region in ("stack", "code"):
            addr = regions.get(region)
            if addr is not None and start <= addr < end:
                m["region"] = region
        heap, brk = regions.get("heap"), regions.get("brk")
        if heap is not None and brk is not None and heap < brk and start < brk and heap < end:
            m.setdefault("region", "heap")


def slot_record(e: Entry) -> dict[str, Any]:
    """A 512 GiB entry (P4D with 5-level paging, PGD with 4-level): what RPAL copies."""
    return {
        "slot": e.va >> 39,
        "raw": hx(e.raw),
        "table": hx(e.addr),
        "present": e.present,
        "marker": e.sw9,  # software bit 1 (bit 9): RPAL's mark on a copied entry
        "user": e.user,
        "write": e.write,
        "nx": e.nx,
    }


def slot_records(walker: PageTableWalker, root: int) -> list[dict[str, Any]]:
    try:
        return [slot_record(e) for e in walker.slot_entries(root)]
    except TestbedError as exc:
        return [{"error": exc.one_line()}]


def mm_record(mm: Mm, tasks: Iterable[Task], walker: PageTableWalker) -> dict[str, Any]:
    rec = {
        "address": hx(mm.address),
        "pgd": hx(mm.pgd_phys),
        "tlb_gen": mm.tlb_gen,
        "ctx_id": mm.ctx_id,
        "cpumask": sorted(mm.cpumask),
        "users": mm.users,
        "tasks": sorted(t.pid for t in tasks),
        "slots": slot_records(walker, mm.pgd_phys),
    }
    if mm.pti:
        rec["user_pgd"] = hx(mm.user_pgd_phys)
        rec["user_slots"] = slot_records(walker, mm.user_pgd_phys)
    return rec


def assemble(
    view: KernelView,
    vcpus: Sequence[VcpuState] = (),
    *,
    name: str = "",
    trigger: Trigger | None = None,
    user_only: bool = True,
    pids: set[int] | None = None,
) -> dict[str, Any]:
    """Read the paused guest into a snapshot dict (see SNAPSHOT-SCHEMA.md)."""
    t0 = time.perf_counter()
    walker = view.walker
    by_cpu = {v.index: v for v in vcpus}
    tasks = view.tasks()
    mms: dict[int, Mm] = {}
    mm_tasks: dict[int, list[Task]] = {}
    for t in tasks:
        if t.mm:
            if t.mm not in mms:
                found = view.mm(t.mm)
                if found is None:
                    continue
                mms[t.mm] = found
            mm_tasks.setdefault(t.mm, []).append(t)
    pti = view.pti
    mappings_of: dict[int, list[dict[str, Any]]] = {}
    task_records = []
    for t in tasks:
        if user_only and not t.mm:
            continue
        if pids is not None and t.pid not in pids and t.tgid not in pids:
            continue
        rec: dict[str, Any] = {
            "pid": t.pid,
            "tgid": t.tgid,
            "comm": t.comm,
            "cpu": t.cpu,
            "state": t.state_char,
            "running_on": t.running_on,
            "kthread": t.is_kthread,
            "task": hx(t.address),
        }
        if t.running_on is not None and t.running_on in by_cpu:
            rec["pkru"] = hx(by_cpu[t.running_on].pkru)
            rec["pkru_source"] = f"cpu{t.running_on}"
        else:
            rec["pkru"] = hx(t.pkru)
            rec["pkru_source"] = "thread.pkru"
        mm = mms.get(t.mm)
        if mm is not None:
            rec["mm"] = hx(mm.address)
            rec["pgd"] = hx(mm.pgd_phys)
            root = mm.user_pgd_phys
            if mm.pti:
                rec["user_pgd"] = hx(root)
            if mm.address not in mappings_of:
                try:
                    maps = [mapping_record(r) for r in walker.mappings(root)]
                except TestbedError as exc:
                    maps = []
                    rec["mappings_error"] = exc.one_line()
                label_regions(maps, mm_regions(view, mm))
                mappings_of[mm.address] = maps
            rec["mappings"] = mappings_of[mm.address]
        task_records.append(rec)
    cpus = []
    for index in sorted(set(by_cpu) | set(view.online_cpus())):
        rec = cpu_record(by_cpu[index]) if index in by_cpu else {"index": index}
        try:
            tlb = view.cpu_tlbstate(index)
        except TestbedError as exc:
            rec["tlb_error"] = exc.one_line()
        else:
            rec["tlb"] = {
                "loaded_mm": hx(tlb.loaded_mm),
                "loaded_mm_asid": tlb.loaded_mm_asid,
                "is_lazy": tlb.is_lazy,
                "ctxs": [{"ctx_id": c.ctx_id, "tlb_gen": c.tlb_gen} for c in tlb.ctxs],
                "current_task": hx(tlb.current_task) if tlb.current_task else None,
            }
        cpus.append(rec)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "trigger": asdict(trigger) if trigger else None,
        "kernel": {
            "osrelease": view.layout.osrelease,
            "paging_levels": walker.levels,
            "pti": pti,
            "kaslr_offset": hx(view.layout.kaslr_offset),
            "layout_source": view.layout.source,
        },
        "cpus": cpus,
        "tasks": task_records,
        "mms": [mm_record(mm, mm_tasks.get(a, []), walker) for a, mm in sorted(mms.items())],
        "timing": {"assemble_ms": round((time.perf_counter() - t0) * 1000, 2)},
    }
