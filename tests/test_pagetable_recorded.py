"""Page-table walker on real guest page tables (tests/data/ptpages-*.json.gz).

The recording (tests/data/record_migstream.py) copied every user-half
page-table page reachable from the CR3 of the vCPU running pkru_init (and the
kernel root page under PTI) plus the page holding its marker, from the
guest's shared-memory RAM file.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import TestbedError
from testbed.snapshot import pagetable as pt
from testbed.snapshot.cpustate import parse_info_registers

DATA = Path(__file__).parent / "data"
RAM = 128 << 20


def load(variant: str) -> tuple[dict[str, Any], dict[int, bytes]]:
    rec = json.loads((DATA / f"record-{variant}.json").read_text())
    pages = json.loads(gzip.decompress((DATA / f"ptpages-{variant}.json.gz").read_bytes()))
    return rec, {int(k, 16): bytes.fromhex(v) for k, v in pages.items()}


def reader(pages: dict[int, bytes]) -> pt.ReadFn:
    def read(addr: int, n: int) -> bytes:
        base = addr & ~0xFFF
        if base not in pages or addr + n > base + 4096:
            raise TestbedError(f"page 0x{base:x} was not recorded")
        return pages[base][addr - base : addr - base + n]

    return read


@pytest.mark.parametrize("variant", ["la57-amd", "l4-intel", "nopku"])
def test_recorded_page_tables(variant: str) -> None:
    rec, pages = load(variant)
    regs = parse_info_registers(rec["hmp_info_registers"][str(rec["cpu"])], rec["cpu"])
    w = pt.PageTableWalker(reader(pages), levels=regs.paging_levels, ram_size=RAM)
    root = regs.cr3

    tr = w.translate(root, rec["marker_va"])
    assert tr.mapped and tr.leaf is not None and tr.leaf.level == 1
    assert len(tr.path) == regs.paging_levels
    assert tr.pkey == rec["pkey"] if rec["pkey"] >= 0 else tr.pkey == 0
    assert tr.user and tr.write and tr.nx
    assert tr.leaf.dirty and tr.leaf.accessed
    assert tr.phys is not None
    data = reader(pages)(tr.phys, len(rec["marker_text"]))
    assert data == rec["marker_text"].encode()

    code = w.translate(root, regs.rip)
    assert code.mapped and code.user and not code.nx and not code.write
    stack = w.translate(root, regs.regs["RSP"])
    assert stack.mapped and stack.write and stack.nx

    maps = w.mappings(root)  # its time: bench/offline_time.py
    by_va = {m.start: m for m in maps}
    marker = next(m for m in maps if m.start <= rec["marker_va"] < m.end)
    assert marker.pkey == max(rec["pkey"], 0) and marker.perms() == "rw-"
    assert any(m.start <= regs.regs["RSP"] < m.end and m.perms() == "rw-" for m in maps)
    assert any(m.start <= regs.rip < m.end and m.perms() == "r-x" for m in maps)
    assert all(m.user for m in maps)
    assert sorted(by_va) == [m.start for m in maps]
    for a, b in zip(maps, maps[1:], strict=False):
        assert a.end <= b.start

    tables = w.tables(root, user_only=True)
    assert tables[0].level == regs.paging_levels
    assert {t.level for t in tables} == set(range(1, regs.paging_levels + 1))
    assert all(t.phys < RAM for t in tables)
    slots = {e.index for e in w.slot_entries(root)}
    assert {0, rec["marker_va"] >> 39, regs.regs["RSP"] >> 39} <= slots
    assert all(e.level == 4 for e in w.slot_entries(root))


def test_pti_roots_on_recorded_tables() -> None:
    rec, pages = load("l4-intel")
    assert rec["pti"]
    regs = parse_info_registers(rec["hmp_info_registers"]["1"], 1)
    user = regs.cr3
    kern = pt.kernel_root(user)
    assert user == pt.user_root(kern) != kern
    w = pt.PageTableWalker(reader(pages), levels=4, ram_size=RAM)
    utop = {e.index: e for e in w.top_entries(user) if e.index < 256}
    ktop = {e.index: e for e in w.top_entries(kern) if e.index < 256}
    assert utop.keys() == ktop.keys() and utop
    for i, ue in utop.items():
        # same lower tables; the kernel's copy of a user entry has NX (PTI)
        assert ue.addr == ktop[i].addr
        assert ktop[i].nx and not ue.nx
    # translations agree, but only the user root lets the code execute
    assert w.translate(kern, rec["marker_va"]).phys == w.translate(user, rec["marker_va"]).phys
    assert w.translate(kern, regs.rip).nx and not w.translate(user, regs.rip).nx
