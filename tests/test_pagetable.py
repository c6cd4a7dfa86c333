"""Page-table walker on synthetic tables built in the test (no VM)."""

from __future__ import annotations

import time

import pytest

from testbed.errors import TestbedError
from testbed.snapshot import pagetable as pt
from testbed.snapshot.pagetable import EntryKind, PageTableWalker

P, W, U = pt.P_PRESENT, pt.P_RW, pt.P_USER
A, D, PS, G, NX = pt.P_ACCESSED, pt.P_DIRTY, pt.P_PSE, pt.P_GLOBAL, pt.P_NX
TBL = P | W | U | A


class FakeRam:
    """Guest RAM as a dict of 4 KiB pages; allocates tables bottom-up from 1 MiB."""

    def __init__(self, size: int = 64 << 20) -> None:
        self.size = size
        self.pages: dict[int, bytearray] = {}
        self.next = 0x100000
        self.reads = 0

    def alloc(self) -> int:
        addr = self.next
        self.next += 0x1000
        self.pages[addr] = bytearray(4096)
        return addr

    def set(self, table: int, index: int, raw: int) -> None:
        self.pages[table][index * 8 : index * 8 + 8] = raw.to_bytes(8, "little")

    def get(self, table: int, index: int) -> int:
        return int.from_bytes(self.pages[table][index * 8 : index * 8 + 8], "little")

    def read(self, addr: int, n: int) -> bytes:
        self.reads += 1
        if addr + n > self.size:
            raise TestbedError(f"read 0x{addr:x}+{n} beyond RAM")
        base = addr & ~0xFFF
        page = self.pages.get(base, bytes(4096))
        off = addr - base
        return bytes(page[off : off + n])

    def map(self, root: int, va: int, raw_leaf: int, leaf_level: int, levels: int) -> None:
        """Install ``raw_leaf`` for ``va`` at ``leaf_level``, creating tables as needed."""
        table = root
        for level in range(levels, leaf_level, -1):
            idx = (va >> pt.LEVEL_SHIFT[level]) & 0x1FF
            e = self.get(table, idx)
            if not e & P:
                new = self.alloc()
                self.set(table, idx, new | TBL)
                e = new | TBL
            table = e & 0x000F_FFFF_FFFF_F000
        self.set(table, (va >> pt.LEVEL_SHIFT[leaf_level]) & 0x1FF, raw_leaf)


def walker(ram: FakeRam, levels: int = 4, **kw: object) -> PageTableWalker:
    return PageTableWalker(ram.read, levels=levels, ram_size=ram.size, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("levels", [4, 5])
@pytest.mark.parametrize(
    ("leaf_level", "size", "extra"), [(1, 4096, 0), (2, 2 << 20, PS), (3, 1 << 30, PS)]
)
def test_translate_every_leaf_size(levels: int, leaf_level: int, size: int, extra: int) -> None:
    ram = FakeRam()
    root = ram.alloc()
    va = 0x7F12_4000_0000 if levels == 4 else 0x00AB_7F12_4000_0000
    frame = 0x4000_0000  # 1 GiB aligned: fine for every size
    ram.map(root, va, frame | P | W | U | A | D | extra, leaf_level, levels)
    w = walker(ram, levels)
    off = 0x234 + (size // 2 if size > 4096 else 0)
    tr = w.translate(root, va + off)
    assert tr.mapped
    assert len(tr.path) == levels - leaf_level + 1
    assert [e.level for e in tr.path] == list(range(levels, leaf_level - 1, -1))
    assert tr.leaf is not None and tr.leaf.level == leaf_level
    assert tr.page_size == size
    assert tr.phys == frame + off
    assert tr.write and tr.user and not tr.nx
    # every entry knows the VA range it covers
    for e in tr.path:
        span = pt.LEVEL_SPAN[e.level]
        assert e.va <= va + off < e.va + span
    # one past the mapping is unmapped and ends at an EMPTY entry
    tr2 = w.translate(root, va + size)
    assert not tr2.mapped and tr2.phys is None
    assert tr2.last.kind is EntryKind.EMPTY


BITS = [
    ("present", 0), ("write", 1), ("user", 2), ("pwt", 3), ("pcd", 4), ("accessed", 5),
    ("dirty", 6), ("global_", 8), ("sw9", 9), ("sw10", 10), ("sw11", 11), ("nx", 63),
]  # fmt: skip


@pytest.mark.parametrize(("field", "bit"), BITS)
def test_every_flag_bit(field: str, bit: int) -> None:
    base = P | 0x5000  # present leaf, frame 0x5000
    on = pt.decode_entry(base | (1 << bit), 1)
    off = pt.decode_entry(base & ~(1 << bit) if bit else base, 1)
    assert getattr(on, field) is True
    if bit != 0:
        assert getattr(off, field) is False
        assert on.addr == off.addr == 0x5000


def test_ps_and_pat_bits() -> None:
    pte = pt.decode_entry(P | PS | 0x5000, 1)  # bit 7 in a PTE is PAT
    assert pte.pat and not pte.ps and pte.kind is EntryKind.LEAF
    pmd = pt.decode_entry(P | PS | pt.P_PAT_LARGE | 0x20_0000, 2)
    assert pmd.ps and pmd.pat and pmd.kind is EntryKind.LEAF
    assert pmd.addr == 0x20_0000  # bit 12 (PAT) is not address
    pud = pt.decode_entry(P | PS | 0x4000_0000 | 0x20_0000, 3)
    assert pud.addr == 0x4000_0000  # 1 GiB mask
    table = pt.decode_entry(P | 0x20_3000, 2)
    assert table.kind is EntryKind.TABLE and not table.ps and table.addr == 0x20_3000


@pytest.mark.parametrize("bit", range(52, 59))
def test_soft_high_bits(bit: int) -> None:
    e = pt.decode_entry(P | 0x1000 | (1 << bit), 1)
    assert e.soft_high == 1 << (bit - 52)
    assert e.soft_high_bits == (bit,)
    assert e.addr == 0x1000 and e.pkey == 0


@pytest.mark.parametrize("pkey", range(16))
def test_pkey_bits(pkey: int) -> None:
    e = pt.decode_entry(P | U | 0x7000 | NX | (pkey << 59), 1)
    assert e.pkey == pkey
    assert e.nx and e.addr == 0x7000 and e.soft_high == 0


def test_maxphyaddr_mask() -> None:
    raw = P | (0xF_FFFF_FFFF_F000)
    assert pt.decode_entry(raw, 1).addr == 0xF_FFFF_FFFF_F000
    assert pt.decode_entry(raw, 1, maxphyaddr=46).addr == (1 << 46) - 0x1000
    assert pt.decode_entry(raw | PS, 2, maxphyaddr=46).addr == (1 << 46) - (2 << 20)


def test_protnone_and_swap_entries_are_reported() -> None:
    pfn_addr = 0x1234_5000
    mask = 0x000F_FFFF_FFFF_F000
    protnone = ((~pfn_addr) & mask) | pt.P_PROTNONE | A
    e = pt.decode_entry(protnone, 1)
    assert e.kind is EntryKind.PROTNONE and not e.present
    assert e.addr == pfn_addr  # PFN is stored inverted
    # Linux __swp_entry(type, offset): type in bits 59-63, inverted offset from bit 9
    swp_type, swp_off = 3, 0x1_2345
    raw = (((~swp_off) << pt.SWP_OFFSET_SHIFT) & ((1 << 64) - 1)) >> pt.SWP_TYPE_BITS
    raw |= swp_type << 59
    raw &= ~(pt.P_PROTNONE | P)
    s = pt.decode_entry(raw, 1)
    assert s.kind is EntryKind.SWAP
    assert s.swap_type == swp_type and s.swap_offset == swp_off
    assert pt.decode_entry(0, 1).kind is EntryKind.EMPTY


def test_translate_stops_at_protnone() -> None:
    ram = FakeRam()
    root = ram.alloc()
    va = 0x5000_0000
    ram.map(root, va, ((~0x9000) & 0x000F_FFFF_FFFF_F000) | pt.P_PROTNONE, 1, 4)
    tr = walker(ram).translate(root, va)
    assert not tr.mapped
    assert tr.last.kind is EntryKind.PROTNONE and tr.last.addr == 0x9000


def test_canonical_addresses() -> None:
    assert pt.canonical(0x0000_8000_0000_0000, 4) == 0xFFFF_8000_0000_0000
    assert pt.canonical(0x0000_8000_0000_0000, 5) == 0x0000_8000_0000_0000
    assert pt.canonical(0x0100_0000_0000_0000, 5) == 0xFF00_0000_0000_0000
    assert pt.is_canonical(0xFFFF_8000_0000_0000, 4)
    assert not pt.is_canonical(0x0000_8000_0000_0000, 4)
    assert pt.is_canonical(0x0000_8000_0000_0000, 5)
    assert pt.user_va_end(4) == 1 << 47 and pt.user_va_end(5) == 1 << 56
    ram = FakeRam()
    root = ram.alloc()
    with pytest.raises(pt.NonCanonicalAddress, match="0x800000000000"):
        walker(ram).translate(root, 0x0000_8000_0000_0000)
    # kernel-half entry VAs are canonical
    kva = 0xFFFF_8880_0000_0000
    ram.map(root, kva, 0x20_0000 | P | W | A | D | PS | G | NX, 2, 4)
    tr = walker(ram).translate(root, kva + 5)
    assert tr.phys == 0x20_0005 and not tr.user and tr.nx
    assert tr.path[0].va == 0xFFFF_8880_0000_0000 and tr.path[0].index == 273


def test_pti_roots() -> None:
    assert pt.user_root(0x2A0C000) == 0x2A0D000
    assert pt.kernel_root(0x2A0D000) == 0x2A0C000
    assert pt.kernel_root(0x2A0C000) == 0x2A0C000
    assert pt.user_root(0x2A0D000) == 0x2A0D000


def test_effective_flags_combine_levels() -> None:
    ram = FakeRam()
    root = ram.alloc()
    va = 0x4000_0000
    ram.map(root, va, 0x8000 | P | W | U, 1, 4)
    w = walker(ram)
    tr = w.translate(root, va)
    pmd = tr.path[2]
    ram.set(pmd.table, pmd.index, (pmd.raw & ~W) | NX)  # read-only, NX at the PMD level
    tr = w.translate(root, va)
    assert tr.leaf is not None and tr.leaf.write and not tr.leaf.nx
    assert not tr.write and tr.nx
    (m,) = w.mappings(root)
    assert not m.write and m.nx and m.perms() == "r--"


def test_mappings_merge_on_va_and_flags() -> None:
    ram = FakeRam()
    root = ram.alloc()
    base = 0x40_0000
    # three contiguous 4K pages, same flags, physically scattered -> one range
    for i, frame in enumerate([0x10000, 0x30000, 0x20000]):
        ram.map(root, base + i * 4096, frame | P | W | U | A | (D if i else 0), 1, 4)
    # next page: same flags but pkey 1 -> a new range
    ram.map(root, base + 3 * 4096, 0x40000 | P | W | U | (1 << 59), 1, 4)
    # a gap, then two physically contiguous read-only pages
    ram.map(root, base + 5 * 4096, 0x50000 | P | U | NX, 1, 4)
    ram.map(root, base + 6 * 4096, 0x51000 | P | U | NX, 1, 4)
    # PROT_NONE placeholder right after
    ram.map(root, base + 7 * 4096, ((~0x52000) & 0x000F_FFFF_FFFF_F000) | pt.P_PROTNONE, 1, 4)
    # a 2 MiB leaf at 0x600000 next to a 4K table range [0x400000, 0x600000) -> separate flags
    ram.map(root, 0x60_0000, 0x80_0000 | P | W | U | PS, 2, 4)
    # 4 KiB pages right after the huge page with the same flags: merge across sizes
    ram.map(root, 0x80_0000, 0xA0_0000 | P | W | U, 1, 4)
    # a kernel mapping must not show up
    ram.map(root, 0xFFFF_8880_0000_0000, 0x20_0000 | P | W | PS, 2, 4)
    ms = walker(ram).mappings(root)
    got = [(m.start, m.end, m.perms(), m.pkey, m.kind, m.pages, m.phys_contiguous) for m in ms]
    assert got == [
        (base, base + 3 * 4096, "rwx", 0, EntryKind.LEAF, 3, False),
        (base + 3 * 4096, base + 4 * 4096, "rwx", 1, EntryKind.LEAF, 1, True),
        (base + 5 * 4096, base + 7 * 4096, "r--", 0, EntryKind.LEAF, 2, True),
        (base + 7 * 4096, base + 8 * 4096, "---", 0, EntryKind.PROTNONE, 1, True),
        (0x60_0000, 0x80_1000, "rwx", 0, EntryKind.LEAF, 2, True),
    ]
    assert ms[0].phys_start == 0x10000 and ms[-1].page_sizes == {4096, 2 << 20}
    assert ms[3].phys_start == 0x52000
    present_only = walker(ram).mappings(root, include_nonpresent=False)
    assert all(m.kind is EntryKind.LEAF for m in present_only) and len(present_only) == 4


def _ranges(ms: list[pt.MappingRange]) -> list[tuple[object, ...]]:
    return [(m.start, m.end, m.perms(), m.pkey, m.pages, m.phys_start, m.first.raw) for m in ms]


@pytest.mark.parametrize("levels", [4, 5])
def test_walker_reuses_work_only_for_unchanged_tables(levels: int) -> None:
    """A walker kept across snapshots gives what a fresh walker gives, after every change."""
    ram = FakeRam()
    root = ram.alloc()
    for i in range(8):
        ram.map(root, 0x40_0000 + i * 4096, (0x10000 + i * 4096) | P | W | U, 1, levels)
    kept = walker(ram, levels)
    changes = [
        lambda: ram.map(root, 0x40_3000, 0x13000 | P | U | NX | (2 << 59), 1, levels),  # flags
        lambda: ram.map(root, 0x40_8000, 0x18000 | P | W | U, 1, levels),  # a new page
        lambda: ram.map(root, 0x40_0000, 0, 1, levels),  # unmapped
        lambda: ram.set(root, 0, ram.get(root, 0) & ~W),  # read-only at the top: every range
    ]
    assert _ranges(kept.mappings(root)) == _ranges(walker(ram, levels).mappings(root))
    for change in changes:
        change()
        got = _ranges(kept.mappings(root))
        assert got == _ranges(walker(ram, levels, cache_tables=0).mappings(root))
        assert got == _ranges(kept.mappings(root))  # and again, all from the cache
    assert [r[2] for r in got] == ["r-x", "r--", "r-x"]


def test_walker_cache_is_bounded() -> None:
    ram = FakeRam()
    roots = [ram.alloc() for _ in range(4)]
    for n, root in enumerate(roots):
        ram.map(root, 0x40_0000, (0x10000 * (n + 1)) | P | W | U, 1, 4)
    w = walker(ram, cache_tables=5)
    for root in roots:
        (m,) = w.mappings(root)
        assert m.start == 0x40_0000
    assert len(w._tables) <= 5


@pytest.mark.parametrize("levels", [4, 5])
def test_tables_and_sharing(levels: int) -> None:
    ram = FakeRam()
    a, b = ram.alloc(), ram.alloc()
    slot = 3 << 39
    ram.map(a, slot + 0x1000, 0x9000 | P | W | U, 1, levels)
    ram.map(a, 0x1000, 0xA000 | P | W | U, 1, levels)
    ram.map(b, 0x2000, 0xB000 | P | W | U, 1, levels)
    w = walker(ram, levels)
    # "PUD copy": B gets A's slot entry (level 4) with software bit 9 set
    a_slot = w.translate(a, slot).path[levels - 4]
    assert a_slot.level == 4 and a_slot.va == slot
    b_l4_table = w.translate(b, 0x2000).path[levels - 4].table
    ram.set(b_l4_table, 3, a_slot.raw | (1 << 9))
    tb = w.translate(b, slot + 0x1000)
    assert tb.phys == 0x9000 and tb.path[levels - 4].sw9
    ta = {t.phys: t for t in w.tables(a)}
    tbl = {t.phys: t for t in w.tables(b)}
    shared = set(ta) & set(tbl)
    assert {ta[p].level for p in shared} == {3, 2, 1}
    pud = next(ta[p] for p in shared if ta[p].level == 3)
    assert (pud.va_start, pud.va_end, pud.name) == (slot, slot + (1 << 39), "PUD")
    root_info = w.tables(a)[0]
    assert root_info.phys == a and root_info.level == levels and root_info.parent is None
    assert root_info.name == "PGD"
    # slot entries: level-4 entries, P4D under 5-level paging, PGD under 4-level
    sa = w.slot_entries(a)
    assert [(e.index, e.va, e.level) for e in sa] == [(0, 0, 4), (3, slot, 4)]
    sb = w.slot_entries(b)
    assert [(e.index, e.sw9) for e in sb] == [(0, False), (3, True)]
    assert sb[1].addr == sa[1].addr
    tops = w.top_entries(a)
    assert [e.level for e in tops] == [levels] * len(tops)
    assert len(tops) == (1 if levels == 5 else 2)
    if levels == 5:
        assert pt.level_name(4, 5) == "P4D"
    else:
        assert pt.level_name(4, 4) == "PGD"


def test_user_only_tables_skip_kernel_half() -> None:
    ram = FakeRam()
    root = ram.alloc()
    ram.map(root, 0x1000, 0xA000 | P | U, 1, 4)
    ram.map(root, 0xFFFF_FFFF_8000_0000, 0xB000 | P, 1, 4)
    w = walker(ram)
    assert len(w.tables(root)) == 7
    assert len(w.tables(root, user_only=True)) == 4


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    assert isinstance(exc, TestbedError)
    return msg


@pytest.mark.parametrize("levels", [4, 5])
def test_loop_to_ancestor_is_an_error(levels: int) -> None:
    ram = FakeRam()
    root = ram.alloc()
    ram.map(root, 0x1000, 0xA000 | P | U, 1, levels)
    w = walker(ram, levels)
    tr = w.translate(root, 0x1000)
    pmd = tr.path[-2]  # the PMD entry pointing at the PTE table
    pud_table = tr.path[-3].table
    ram.set(pmd.table, pmd.index, pud_table | TBL)  # PMD -> PUD table (an ancestor)
    for call in (
        lambda: w.translate(root, 0x1000),
        lambda: w.tables(root),
        lambda: w.mappings(root),
    ):
        with pytest.raises(pt.PageTableLoop) as ei:
            call()
        msg = one_line(ei.value)
        assert f"0x{pud_table:x}" in msg and f"0x{pmd.table:x}" in msg


def test_self_reference_is_an_error() -> None:
    ram = FakeRam()
    root = ram.alloc()
    ram.set(root, 5, root | TBL)  # PGD entry 5 points at the PGD itself
    w = walker(ram)
    with pytest.raises(pt.PageTableLoop, match="PGD entry 5"):
        w.translate(root, 5 << 39)
    with pytest.raises(pt.PageTableLoop):
        w.tables(root)
    with pytest.raises(pt.PageTableLoop):
        walker(ram, 5).slot_entries(root)


def test_table_beyond_ram() -> None:
    ram = FakeRam(size=4 << 20)
    root = ram.alloc()
    ram.set(root, 1, 0x7_0000_0000 | TBL)
    w = walker(ram)
    with pytest.raises(pt.AddressBeyondRam) as ei:
        w.translate(root, 1 << 39)
    msg = one_line(ei.value)
    assert "0x700000000" in msg and "PGD entry 1" in msg
    with pytest.raises(pt.AddressBeyondRam):
        w.mappings(root)
    # without ram_size: the read function's own error, re-raised with the entry named
    w2 = PageTableWalker(ram.read, levels=4)
    with pytest.raises(pt.AddressBeyondRam, match="PGD entry 1"):
        w2.translate(root, 1 << 39)
    # short reads are errors too
    w3 = PageTableWalker(lambda a, n: b"\0" * 100, levels=4)
    with pytest.raises(pt.AddressBeyondRam, match="short read"):
        w3.translate(0x1000, 0)


def test_table_count_is_bounded() -> None:
    """A DAG where every entry points at the same next table: 512**3 paths, no loop."""
    ram = FakeRam()
    root = ram.alloc()
    pud, pmd, pte = ram.alloc(), ram.alloc(), ram.alloc()
    ram.set(root, 0, pud | TBL)
    for i in range(512):
        ram.set(pud, i, pmd | TBL)
        ram.set(pmd, i, pte | TBL)
    ram.set(pte, 0, 0x5000 | P | U)
    w = walker(ram, max_tables=1000)
    t0 = time.monotonic()
    with pytest.raises(pt.TooManyTables, match="more than 1000"):
        w.mappings(root)
    assert time.monotonic() - t0 < 5
    assert w.translate(root, 0).phys == 0x5000  # a single translation is still fine


def test_reserved_ps_at_top_level() -> None:
    ram = FakeRam()
    root = ram.alloc()
    ram.set(root, 2, 0x4000_0000 | P | PS)
    with pytest.raises(pt.MalformedEntry, match="PS bit"):
        walker(ram).translate(root, 2 << 39)


def test_cr3_low_bits_ignored() -> None:
    ram = FakeRam()
    root = ram.alloc()
    ram.map(root, 0x1000, 0xA000 | P | U, 1, 4)
    assert walker(ram).translate(root | 0x18, 0x1000).phys == 0xA000
