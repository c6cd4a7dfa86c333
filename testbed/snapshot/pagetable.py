"""x86-64 page-table walker over guest physical memory.

Everything here is pure: the walker takes ``read(phys_addr, length) -> bytes``
(any :mod:`testbed.snapshot.physmem` source, or a dict of pages in tests).

Levels are numbered as the hardware does: 1 = PT (Linux PTE), 2 = PD (PMD),
3 = PDPT (PUD), 4 = PML4 (Linux P4D, or the PGD with 4-level paging where
the P4D is folded), 5 = PML5 (PGD with 5-level paging). A level-4 entry
always covers 512 GiB, so ``slot_entries`` (the RPAL slot entries) lists
level-4 entries under both paging depths; ``top_entries`` lists the entries
of the root table itself (level 4 or 5).

Entries are decoded into the frozen :class:`Entry` with every bit named.
Non-present entries that still hold data are kinds of their own:
``PROTNONE`` (Linux x86 PROT_NONE: present clear, _PAGE_PROTNONE = bit 8,
the global bit's position, set; the PFN is stored inverted, L1TF mitigation)
and ``SWAP`` (any other non-zero non-present entry: swap, migration or
hwpoison entries; type in bits 59-63, inverted offset in bits 9-58).

Malformed tables raise :class:`PageTableError` (a TestbedError) with a
one-line message naming the entry and address: a table reached again from
itself or one of its ancestors (:class:`PageTableLoop`), a table address
beyond RAM or a short read (:class:`AddressBeyondRam`), more tables than
``max_tables`` in one walk (:class:`TooManyTables`), PS set where the
architecture reserves it (:class:`MalformedEntry`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

from testbed.errors import TestbedError

ReadFn = Callable[[int, int], bytes]

PAGE_SIZE = 4096
ENTRIES = 512
PTI_USER_OFFSET = 0x1000
"""With PTI the user PGD is the page right after the kernel PGD (8 KiB-aligned pair)."""
CR3_ADDR_MASK = 0x000F_FFFF_FFFF_F000
"""CR3 bits that hold the root table's address (MAXPHYADDR 52; PCID/PWT/PCD bits cleared)."""
DEFAULT_MAX_TABLES = 1 << 18

# Entry bits
P_PRESENT = 1 << 0
P_RW = 1 << 1
P_USER = 1 << 2
P_PWT = 1 << 3
P_PCD = 1 << 4
P_ACCESSED = 1 << 5
P_DIRTY = 1 << 6
P_PSE = 1 << 7  # PS at levels 2-3, PAT at level 1
P_GLOBAL = 1 << 8
P_PROTNONE = P_GLOBAL  # Linux: meaningful only when present is clear
P_PAT_LARGE = 1 << 12
P_NX = 1 << 63
PKEY_SHIFT = 59
PKEY_MASK = 0xF << PKEY_SHIFT
SOFT_HIGH_SHIFT = 52
SOFT_HIGH_MASK = 0x7F << SOFT_HIGH_SHIFT
SWP_TYPE_BITS = 5
SWP_OFFSET_SHIFT = 9 + SWP_TYPE_BITS

LEVEL_SHIFT = {1: 12, 2: 21, 3: 30, 4: 39, 5: 48}
LEVEL_SPAN = {lvl: 1 << s for lvl, s in LEVEL_SHIFT.items()}

_TABLE_FMT = struct.Struct("<512Q")


class PageTableError(TestbedError):
    """Malformed page tables or unreadable memory during a walk."""


class PageTableLoop(PageTableError):
    pass


class AddressBeyondRam(PageTableError):
    pass


class TooManyTables(PageTableError):
    pass


class MalformedEntry(PageTableError):
    pass


class NonCanonicalAddress(PageTableError):
    pass


class EntryKind(Enum):
    EMPTY = "empty"  # all bits zero
    TABLE = "table"  # present, points at a lower-level table
    LEAF = "leaf"  # present, maps a page (4 KiB, 2 MiB or 1 GiB)
    PROTNONE = "protnone"  # not present, _PAGE_PROTNONE set (Linux PROT_NONE page)
    SWAP = "swap"  # not present, other data (swap/migration/hwpoison entry)


def level_name(level: int, levels: int) -> str:
    """Linux's name for a level: PGD/P4D/PUD/PMD/PTE (P4D is folded into PGD with 4 levels)."""
    if level == levels:
        return "PGD"
    return {4: "P4D", 3: "PUD", 2: "PMD", 1: "PTE"}[level]


def user_root(kernel_root: int) -> int:
    """The PTI user root of a kernel root (user CR3 = kernel CR3 | 0x1000)."""
    return (kernel_root & ~0xFFF) | PTI_USER_OFFSET


def kernel_root(root: int) -> int:
    """The kernel root of either root of a PTI pair (clears bit 12 and the low bits)."""
    return root & ~(PTI_USER_OFFSET | 0xFFF)


def va_bits(levels: int) -> int:
    if levels not in (4, 5):
        raise ValueError(f"paging levels must be 4 or 5, not {levels}")
    return 48 if levels == 4 else 57


def canonical(va: int, levels: int) -> int:
    """Sign-extend a VA from bit 47 (4-level) or bit 56 (5-level) to 64 bits."""
    bits = va_bits(levels)
    va &= (1 << bits) - 1
    if va & (1 << (bits - 1)):
        va |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
    return va


def is_canonical(va: int, levels: int) -> bool:
    return 0 <= va < 1 << 64 and canonical(va, levels) == va


def user_va_end(levels: int) -> int:
    """First VA past the user half (0x0000_8000_0000_0000 or 0x0100_0000_0000_0000)."""
    return 1 << (va_bits(levels) - 1)


def _addr_mask(level: int, leaf: bool, maxphyaddr: int) -> int:
    low = LEVEL_SHIFT[level] if (leaf and level > 1) else 12
    return ((1 << maxphyaddr) - 1) & ~((1 << low) - 1)


@dataclass(frozen=True)
class Entry:
    """One page-table entry, every bit decoded."""

    raw: int
    level: int
    index: int
    table: int
    """Physical address of the table holding this entry."""
    va: int
    """Canonical start of the VA range this entry covers."""
    kind: EntryKind
    present: bool
    write: bool
    user: bool
    pwt: bool
    pcd: bool
    accessed: bool
    dirty: bool
    ps: bool
    """Bit 7 at levels 2-3 (page size); False elsewhere (at level 1 bit 7 is PAT)."""
    pat: bool
    """PAT bit of a leaf: bit 7 of a 4 KiB PTE, bit 12 of a 2 MiB / 1 GiB leaf."""
    global_: bool
    sw9: bool
    sw10: bool
    sw11: bool
    soft_high: int
    """Software bits 52-58 as a 7-bit number (bit 52 = 1)."""
    pkey: int
    """Protection key, bits 59-62 (meaningful on present leaves with CR4.PKE)."""
    nx: bool
    addr: int
    """Physical address field, masked for the level (2 MiB/1 GiB aligned for huge leaves)
    and MAXPHYADDR; for PROTNONE entries the un-inverted PFN; 0 for SWAP/EMPTY."""

    @property
    def page_size(self) -> int:
        """Bytes mapped by a leaf (or covered by any entry) at this level."""
        return LEVEL_SPAN[self.level]

    @property
    def is_leaf(self) -> bool:
        return self.kind is EntryKind.LEAF

    @property
    def soft_high_bits(self) -> tuple[int, ...]:
        """Bit numbers (52-58) of the high software bits that are set."""
        return tuple(52 + i for i in range(7) if self.soft_high >> i & 1)

    @property
    def swap_type(self) -> int | None:
        """Linux swap type (bits 59-63) of a SWAP entry."""
        return self.raw >> (64 - SWP_TYPE_BITS) if self.kind is EntryKind.SWAP else None

    @property
    def swap_offset(self) -> int | None:
        """Linux swap offset (stored inverted in bits 9-58) of a SWAP entry."""
        if self.kind is not EntryKind.SWAP:
            return None
        inv = (~self.raw) & ((1 << 64) - 1)
        return ((inv << SWP_TYPE_BITS) & ((1 << 64) - 1)) >> SWP_OFFSET_SHIFT

    def flags_str(self) -> str:
        """Short flags such as ``P W U A D G NX pkey=1 sw9`` (for messages and reports)."""
        parts = [self.kind.value]
        for name, on in (
            ("W", self.write), ("U", self.user), ("PWT", self.pwt), ("PCD", self.pcd),
            ("A", self.accessed), ("D", self.dirty), ("PS", self.ps), ("PAT", self.pat),
            ("G", self.global_), ("sw9", self.sw9), ("sw10", self.sw10), ("sw11", self.sw11),
            ("NX", self.nx),
        ):  # fmt: skip
            if on:
                parts.append(name)
        parts.extend(f"sw{b}" for b in self.soft_high_bits)
        if self.pkey:
            parts.append(f"pkey={self.pkey}")
        return " ".join(parts)

    def describe(self, levels: int) -> str:
        return (
            f"{level_name(self.level, levels)} entry {self.index} "
            f"(0x{self.raw:016x}) of table 0x{self.table:x} for VA 0x{self.va:x}"
        )


def _kind(raw: int, level: int) -> EntryKind:
    if raw == 0:
        return EntryKind.EMPTY
    if raw & P_PRESENT:
        if level == 1 or (level in (2, 3) and raw & P_PSE):
            return EntryKind.LEAF
        return EntryKind.TABLE
    if raw & P_PROTNONE:
        return EntryKind.PROTNONE
    return EntryKind.SWAP


def decode_entry(
    raw: int, level: int, *, index: int = 0, table: int = 0, va: int = 0, maxphyaddr: int = 52
) -> Entry:
    """Decode one 64-bit entry found at ``level`` (1..5)."""
    if level not in LEVEL_SHIFT:
        raise ValueError(f"level must be 1..5, not {level}")
    kind = _kind(raw, level)
    huge_leaf = (
        kind in (EntryKind.LEAF, EntryKind.PROTNONE) and level in (2, 3) and bool(raw & P_PSE)
    )
    leafish = kind is EntryKind.LEAF or huge_leaf
    if kind is EntryKind.PROTNONE:
        addr = (~raw) & _addr_mask(level, huge_leaf, maxphyaddr)
    elif kind in (EntryKind.LEAF, EntryKind.TABLE):
        addr = raw & _addr_mask(level, leafish, maxphyaddr)
    else:
        addr = 0
    if level == 1:
        pat = bool(raw & P_PSE)
    elif huge_leaf:
        pat = bool(raw & P_PAT_LARGE)
    else:
        pat = False
    return Entry(
        raw=raw,
        level=level,
        index=index,
        table=table,
        va=va,
        kind=kind,
        present=bool(raw & P_PRESENT),
        write=bool(raw & P_RW),
        user=bool(raw & P_USER),
        pwt=bool(raw & P_PWT),
        pcd=bool(raw & P_PCD),
        accessed=bool(raw & P_ACCESSED),
        dirty=bool(raw & P_DIRTY),
        ps=level in (2, 3) and bool(raw & P_PSE),
        pat=pat,
        global_=bool(raw & P_GLOBAL),
        sw9=bool(raw >> 9 & 1),
        sw10=bool(raw >> 10 & 1),
        sw11=bool(raw >> 11 & 1),
        soft_high=(raw & SOFT_HIGH_MASK) >> SOFT_HIGH_SHIFT,
        pkey=(raw & PKEY_MASK) >> PKEY_SHIFT,
        nx=bool(raw & P_NX),
        addr=addr,
    )


@dataclass(frozen=True)
class Translation:
    """The result of translating one VA."""

    va: int
    root: int
    levels: int
    path: tuple[Entry, ...]
    """One entry per level walked, root level first; the last one ended the walk."""

    @property
    def last(self) -> Entry:
        return self.path[-1]

    @property
    def leaf(self) -> Entry | None:
        """The present leaf, or None when the walk ended at a non-present entry."""
        return self.path[-1] if self.path[-1].kind is EntryKind.LEAF else None

    @property
    def mapped(self) -> bool:
        return self.leaf is not None

    @property
    def page_size(self) -> int | None:
        leaf = self.leaf
        return leaf.page_size if leaf else None

    @property
    def phys(self) -> int | None:
        """Physical address of ``va``, or None when unmapped."""
        leaf = self.leaf
        if leaf is None:
            return None
        return leaf.addr | (self.va & (leaf.page_size - 1))

    @property
    def write(self) -> bool:
        """Effective writability: R/W set at every level."""
        return all(e.write for e in self.path)

    @property
    def user(self) -> bool:
        """Effective user access: U/S set at every level."""
        return all(e.user for e in self.path)

    @property
    def nx(self) -> bool:
        """Effective no-execute: NX set at any level."""
        return any(e.nx for e in self.path)

    @property
    def pkey(self) -> int | None:
        leaf = self.leaf
        return leaf.pkey if leaf else None


@dataclass(frozen=True)
class TableInfo:
    """One page-table page found in a walk."""

    phys: int
    level: int
    name: str
    va_start: int
    """Canonical first VA the table covers."""
    va_end: int
    """Canonical-agnostic exclusive end: ``va_start + 512 * span`` (may be 2**64)."""
    parent: Entry | None
    """The entry that points here (None for the root)."""


@dataclass(frozen=True)
class MappingRange:
    """Contiguous user VAs whose leaves have the same merge key.

    Ranges are merged on VA contiguity and flags only: the physical pages of a
    range need not be contiguous (``phys_contiguous`` says whether they are).
    The merge key is (kind, effective write, effective user, effective NX,
    pkey, PWT, PCD, PAT, global); accessed and dirty are not part of it.
    """

    start: int
    end: int
    kind: EntryKind
    write: bool
    user: bool
    nx: bool
    pkey: int
    pwt: bool
    pcd: bool
    pat: bool
    global_: bool
    pages: int
    """Number of leaf entries merged."""
    page_sizes: frozenset[int]
    phys_start: int
    """Physical address of ``start`` (leaves) or the decoded PFN address (PROTNONE); 0 for SWAP."""
    phys_contiguous: bool
    first: Entry
    """The first leaf entry of the range (raw bits, for the details not in the key)."""

    @property
    def size(self) -> int:
        return self.end - self.start

    def perms(self) -> str:
        if self.kind is EntryKind.PROTNONE:
            return "---"
        if self.kind is EntryKind.SWAP:
            return "swp"
        return "r" + ("w" if self.write else "-") + ("-" if self.nx else "x")


class PageTableWalker:
    """Walk x86-64 page tables through ``read(phys, length) -> bytes``.

    ``levels`` is 4 or 5 (CR4.LA57), ``maxphyaddr`` the CPU's physical
    address width (default 52), ``ram_size`` (optional) makes any table
    address at or past it an error before it is read, ``max_tables`` bounds
    one walk. Table contents are cached per call only, so a walk of a
    running guest sees each table once, at the time it was read.
    """

    def __init__(
        self,
        read: ReadFn,
        *,
        levels: int = 4,
        maxphyaddr: int = 52,
        ram_size: int | None = None,
        max_tables: int = DEFAULT_MAX_TABLES,
    ) -> None:
        va_bits(levels)
        if not 32 <= maxphyaddr <= 52:
            raise ValueError(f"MAXPHYADDR must be 32..52, not {maxphyaddr}")
        self.read = read
        self.levels = levels
        self.maxphyaddr = maxphyaddr
        self.ram_size = ram_size
        self.max_tables = max_tables
        self._table_mask = _addr_mask(1, False, maxphyaddr)

    # -- low level -----------------------------------------------------------

    def _root(self, root: int) -> int:
        return root & self._table_mask

    def read_table(
        self, phys: int, *, via: str | Entry | None = None, root: int | None = None
    ) -> tuple[int, ...]:
        """The 512 raw entries of the table at ``phys``.

        ``via`` (the entry that pointed here, or text) and ``root`` only name
        the table in error messages.
        """
        if phys & 0xFFF or (self.ram_size is not None and phys + PAGE_SIZE > self.ram_size):
            pass
        else:
            try:
                data = self.read(phys, PAGE_SIZE)
            except (TestbedError, OSError, ValueError, IndexError):
                data = b""
            if len(data) == PAGE_SIZE:
                return _TABLE_FMT.unpack(data)
        # slow path: work out the error with a message naming the entry
        if isinstance(via, Entry):
            via = via.describe(self.levels)
        elif via is None:
            via = f"root 0x{phys if root is None else root:x}"
        if phys & 0xFFF:
            raise MalformedEntry(f"table address 0x{phys:x} is not page aligned ({via})")
        if self.ram_size is not None and phys + PAGE_SIZE > self.ram_size:
            raise AddressBeyondRam(
                f"page table at 0x{phys:x} is beyond RAM (size 0x{self.ram_size:x}); "
                f"referenced by {via}"
            )
        try:
            data = self.read(phys, PAGE_SIZE)
        except PageTableError:
            raise
        except (TestbedError, OSError, ValueError, IndexError) as e:
            raise AddressBeyondRam(
                f"cannot read page table at 0x{phys:x} (referenced by {via}): {e}"
            ) from e
        if len(data) != PAGE_SIZE:
            raise AddressBeyondRam(
                f"short read of page table at 0x{phys:x} ({len(data)} bytes; beyond RAM?); "
                f"referenced by {via}"
            )
        return _TABLE_FMT.unpack(data)

    def _decode(self, raw: int, level: int, index: int, table: int, va: int) -> Entry:
        e = decode_entry(raw, level, index=index, table=table, va=va, maxphyaddr=self.maxphyaddr)
        if e.present and level >= 4 and raw & P_PSE:
            raise MalformedEntry(f"PS bit set in {e.describe(self.levels)}: reserved at this level")
        return e

    def _entry_va(self, base: int, level: int, index: int) -> int:
        return canonical(base + index * LEVEL_SPAN[level], self.levels)

    # -- translate -------------------------------------------------------------

    def translate(self, root: int, va: int) -> Translation:
        """Walk ``va`` from ``root`` (a CR3 value or a pgd's physical address).

        Unmapped addresses are not errors: the path then ends at the EMPTY,
        PROTNONE or SWAP entry that stopped the walk.
        """
        if not is_canonical(va, self.levels):
            raise NonCanonicalAddress(
                f"VA 0x{va:x} is not canonical for {self.levels}-level paging"
            )
        table = self._root(root)
        seen = {table}
        path: list[Entry] = []
        base = 0
        for level in range(self.levels, 0, -1):
            raws = self.read_table(table, via=path[-1] if path else None, root=table)
            idx = (va >> LEVEL_SHIFT[level]) & 0x1FF
            base += idx * LEVEL_SPAN[level]
            e = self._decode(raws[idx], level, idx, table, canonical(base, self.levels))
            path.append(e)
            if e.kind is not EntryKind.TABLE:
                break
            if e.addr in seen:
                raise PageTableLoop(
                    f"page-table loop: {e.describe(self.levels)} points back to table "
                    f"0x{e.addr:x} already on the walk of VA 0x{va:x}"
                )
            seen.add(e.addr)
            table = e.addr
        return Translation(va=va, root=self._root(root), levels=self.levels, path=tuple(path))

    # -- whole-tree walks -----------------------------------------------------

    def _walk(
        self, root: int, *, user_only: bool
    ) -> Iterator[tuple[Entry | None, int, int, int, tuple[int, ...]]]:
        """Depth-first over tables: yields (parent entry, table phys, level, va base, raws).

        Detects loops (a table that is its own ancestor) and bounds the count.
        """
        root = self._root(root)
        count = 0
        # stack of (parent, phys, level, base, ancestors)
        stack: list[tuple[Entry | None, int, int, int, frozenset[int]]] = [
            (None, root, self.levels, 0, frozenset())
        ]
        while stack:
            parent, phys, level, base, anc = stack.pop()
            count += 1
            if count > self.max_tables:
                raise TooManyTables(
                    f"more than {self.max_tables} page tables under root 0x{root:x} "
                    f"(at table 0x{phys:x}); malformed tables or raise max_tables"
                )
            raws = self.read_table(phys, via=parent, root=root)
            yield parent, phys, level, base, raws
            if level == 1:
                continue
            anc2 = anc | {phys}
            limit = ENTRIES // 2 if (user_only and level == self.levels) else ENTRIES
            children = []
            for idx in range(limit):
                raw = raws[idx]
                if not raw & P_PRESENT or (level in (2, 3) and raw & P_PSE):
                    continue
                ebase = base + idx * LEVEL_SPAN[level]
                e = self._decode(raw, level, idx, phys, canonical(ebase, self.levels))
                if e.addr in anc2:
                    raise PageTableLoop(
                        f"page-table loop: {e.describe(self.levels)} points back to table "
                        f"0x{e.addr:x}, its own ancestor (root 0x{root:x})"
                    )
                children.append((e, e.addr, level - 1, ebase, anc2))
            stack.extend(reversed(children))

    def tables(self, root: int, *, user_only: bool = False) -> list[TableInfo]:
        """Every page-table page reachable from ``root``, root first, depth-first in VA order.

        ``user_only`` descends only the user half of the root table (the root
        itself is listed whole).
        """
        out = []
        for parent, phys, level, base, _ in self._walk(root, user_only=user_only):
            start = canonical(base, self.levels)
            out.append(
                TableInfo(
                    phys=phys,
                    level=level,
                    name=level_name(level, self.levels),
                    va_start=start,
                    va_end=start + ENTRIES * LEVEL_SPAN[level],
                    parent=parent,
                )
            )
        return out

    def top_entries(self, root: int, *, user_only: bool = False) -> list[Entry]:
        """Non-empty entries of the root table (PGD; level 5 with LA57, else level 4).

        ``user_only``: only the user half (entries 0-255), without decoding the rest.
        """
        table = self._root(root)
        raws = self.read_table(table, via=f"root 0x{table:x}")
        if user_only:
            raws = raws[: ENTRIES // 2]
        lvl = self.levels
        return [
            self._decode(r, lvl, i, table, self._entry_va(0, lvl, i))
            for i, r in enumerate(raws)
            if r
        ]

    def slot_entries(self, root: int, *, user_only: bool = True) -> list[Entry]:
        """Non-empty entries covering 512 GiB each (level 4: the P4D entries with 5-level
        paging, the PGD entries with 4-level paging), with their VA.

        These are the RPAL slot entries: slot n covers [n << 39, (n + 1) << 39).
        """
        if self.levels == 4:
            return self.top_entries(root, user_only=user_only)
        out: list[Entry] = []
        root_p = self._root(root)
        for top in self.top_entries(root, user_only=user_only):
            if top.kind is not EntryKind.TABLE:
                continue
            if top.addr == root_p:
                raise PageTableLoop(
                    f"page-table loop: {top.describe(5)} points back to the root table"
                )
            raws = self.read_table(top.addr, via=top.describe(5))
            base = top.index * LEVEL_SPAN[5]
            out.extend(
                self._decode(r, 4, i, top.addr, self._entry_va(base, 4, i))
                for i, r in enumerate(raws)
                if r
            )
        return out

    def mappings(self, root: int, *, include_nonpresent: bool = True) -> list[MappingRange]:
        """All user-half mappings of ``root`` as merged ranges (see :class:`MappingRange`).

        Leaves are present pages of any size; with ``include_nonpresent``,
        PROTNONE and SWAP entries at leaf levels are listed too (as ranges of
        their own kind). Effective W/U/NX combine every level of the path.
        """
        # effective (write, user, nx) of the path down to each table of this walk
        eff: dict[int, tuple[bool, bool, bool]] = {}
        user_end = user_va_end(self.levels)
        pmask = (1 << self.maxphyaddr) - 1
        # leaf records on raw bits only (decoding every leaf into an Entry is slow):
        # (va, size, merge key, phys, level, index, table, raw)
        leaves: list[tuple[int, int, tuple[int, ...], int, int, int, int, int]] = []
        for parent, phys, level, base, raws in self._walk(root, user_only=True):
            if parent is None:
                w, u, x = True, True, False
            else:
                pw, pu, px = eff[parent.table]
                w, u, x = pw and parent.write, pu and parent.user, px or parent.nx
            eff[phys] = (w, u, x)
            if level == self.levels:
                continue  # root entries (level 4/5) are never leaves
            span = LEVEL_SPAN[level]
            huge_mask = pmask & ~(span - 1)
            for idx, raw in enumerate(raws):
                if not raw:
                    continue
                if raw & P_PRESENT:
                    if level > 1 and not raw & P_PSE:
                        continue  # a lower table, walked on its own
                    kind = 0
                    addr = raw & (huge_mask if level > 1 else self._table_mask)
                elif not include_nonpresent:
                    continue
                elif raw & P_PROTNONE:
                    kind = 1
                    if level > 1 and raw & P_PSE:
                        addr = ~raw & huge_mask
                    else:
                        addr = ~raw & self._table_mask
                else:
                    kind, addr = 2, 0
                vstart = base + idx * span
                if vstart >= user_end:
                    continue
                pat = raw & P_PSE if level == 1 else raw & P_PAT_LARGE if raw & P_PSE else 0
                key: tuple[int, ...] = (
                    kind,
                    w and bool(raw & P_RW),
                    u and bool(raw & P_USER),
                    x or bool(raw & P_NX),
                    raw & (PKEY_MASK | P_PWT | P_PCD | P_GLOBAL) | bool(pat),
                )
                leaves.append((vstart, span, key, addr, level, idx, phys, raw))
        leaves.sort(key=lambda t: t[0])

        kinds = (EntryKind.LEAF, EntryKind.PROTNONE, EntryKind.SWAP)
        out: list[MappingRange] = []
        i = 0
        n = len(leaves)
        while i < n:
            vstart, size, key, addr, level, idx, table, raw = leaves[i]
            end = vstart + size
            sizes = {size}
            contiguous = key[0] != 2
            j = i + 1
            while j < n and leaves[j][0] == end and leaves[j][2] == key:
                nsize, naddr = leaves[j][1], leaves[j][3]
                if key[0] == 2 or naddr != addr + (end - vstart):
                    contiguous = False
                sizes.add(nsize)
                end += nsize
                j += 1
            first = self._decode(raw, level, idx, table, vstart)
            out.append(
                MappingRange(
                    start=vstart,
                    end=end,
                    kind=kinds[key[0]],
                    write=bool(key[1]),
                    user=bool(key[2]),
                    nx=bool(key[3]),
                    pkey=first.pkey,
                    pwt=first.pwt,
                    pcd=first.pcd,
                    pat=first.pat,
                    global_=first.global_,
                    pages=j - i,
                    page_sizes=frozenset(sizes),
                    phys_start=addr,
                    phys_contiguous=contiguous,
                    first=first,
                )
            )
            i = j
        return out
