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
from itertools import compress
from typing import NamedTuple

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


def _flag(mask: int) -> property:
    """A read-only bool property: whether ``mask`` is set in the entry's raw bits."""
    return property(lambda self: bool(self.raw & mask))


class Entry:
    """One page-table entry, every bit decoded.

    Immutable. The kind and address are worked out when the entry is made;
    the single bits are read from ``raw`` on access (a snapshot makes
    thousands of entries and reads few of their bits).
    """

    __slots__ = ("raw", "level", "index", "table", "va", "kind", "addr")

    raw: int
    level: int
    index: int
    table: int
    """Physical address of the table holding this entry."""
    va: int
    """Canonical start of the VA range this entry covers."""
    kind: EntryKind
    addr: int
    """Physical address field, masked for the level (2 MiB/1 GiB aligned for huge leaves)
    and MAXPHYADDR; for PROTNONE entries the un-inverted PFN; 0 for SWAP/EMPTY."""

    def __init__(
        self, raw: int, level: int, index: int, table: int, va: int, kind: EntryKind, addr: int
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "raw", raw)
        setattr_(self, "level", level)
        setattr_(self, "index", index)
        setattr_(self, "table", table)
        setattr_(self, "va", va)
        setattr_(self, "kind", kind)
        setattr_(self, "addr", addr)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Entry is immutable (tried to set {name})")

    def _key(self) -> tuple[int, int, int, int, int, EntryKind, int]:
        return (self.raw, self.level, self.index, self.table, self.va, self.kind, self.addr)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Entry) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Entry(raw=0x{self.raw:016x}, level={self.level}, index={self.index}, "
            f"table=0x{self.table:x}, va=0x{self.va:x}, kind={self.kind.name}, "
            f"addr=0x{self.addr:x})"
        )

    present = _flag(P_PRESENT)
    write = _flag(P_RW)
    user = _flag(P_USER)
    pwt = _flag(P_PWT)
    pcd = _flag(P_PCD)
    accessed = _flag(P_ACCESSED)
    dirty = _flag(P_DIRTY)
    global_ = _flag(P_GLOBAL)
    sw9 = _flag(1 << 9)
    sw10 = _flag(1 << 10)
    sw11 = _flag(1 << 11)
    nx = _flag(P_NX)

    @property
    def ps(self) -> bool:
        """Bit 7 at levels 2-3 (page size); False elsewhere (at level 1 bit 7 is PAT)."""
        return self.level in (2, 3) and bool(self.raw & P_PSE)

    @property
    def pat(self) -> bool:
        """PAT bit of a leaf: bit 7 of a 4 KiB PTE, bit 12 of a 2 MiB / 1 GiB leaf."""
        if self.level == 1:
            return bool(self.raw & P_PSE)
        if self.ps and self.kind in (EntryKind.LEAF, EntryKind.PROTNONE):
            return bool(self.raw & P_PAT_LARGE)
        return False

    @property
    def soft_high(self) -> int:
        """Software bits 52-58 as a 7-bit number (bit 52 = 1)."""
        return (self.raw & SOFT_HIGH_MASK) >> SOFT_HIGH_SHIFT

    @property
    def pkey(self) -> int:
        """Protection key, bits 59-62 (meaningful on present leaves with CR4.PKE)."""
        return (self.raw & PKEY_MASK) >> PKEY_SHIFT

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
    if kind is EntryKind.TABLE:
        addr = raw & _addr_mask(level, False, maxphyaddr)
    elif kind is EntryKind.LEAF:
        addr = raw & _addr_mask(level, True, maxphyaddr)
    elif kind is EntryKind.PROTNONE:
        huge = level in (2, 3) and bool(raw & P_PSE)
        addr = (~raw) & _addr_mask(level, huge, maxphyaddr)
    else:
        addr = 0
    return Entry(raw, level, index, table, va, kind, addr)


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
    one walk.

    Every table is read afresh on each use. What is derived from a table's
    bytes (its 512 entries, the leaf runs of :meth:`mappings`) is remembered
    per table address together with those 4 KiB and reused only while a new
    read returns the very same bytes, so repeated snapshots of a guest skip
    the work for unchanged tables and the results are those of a fresh walk.
    A whole :meth:`mappings` result is reused when every table its walk read
    reads the same again. At most ``cache_tables`` tables are remembered
    (0: none).
    """

    def __init__(
        self,
        read: ReadFn,
        *,
        levels: int = 4,
        maxphyaddr: int = 52,
        ram_size: int | None = None,
        max_tables: int = DEFAULT_MAX_TABLES,
        cache_tables: int = 4096,
    ) -> None:
        va_bits(levels)
        if not 32 <= maxphyaddr <= 52:
            raise ValueError(f"MAXPHYADDR must be 32..52, not {maxphyaddr}")
        self.read = read
        self.levels = levels
        self.maxphyaddr = maxphyaddr
        self.ram_size = ram_size
        self.max_tables = max_tables
        self.cache_tables = cache_tables
        self._table_mask = _addr_mask(1, False, maxphyaddr)
        # table address -> (its bytes, its entries); and the leaf runs made from those entries
        self._tables: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        self._runs: dict[tuple[int, ...], tuple[tuple[int, ...], list[_Run]]] = {}
        # (root, include_nonpresent) -> (the tables the walk read, with their entries; result)
        self._mappings: dict[
            tuple[int, bool],
            tuple[tuple[tuple[int, tuple[int, ...]], ...], tuple[MappingRange, ...]],
        ] = {}

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
                return self._entries(phys, data)
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

    def forget(self) -> None:
        """Drop everything remembered from earlier walks (the next walks start cold)."""
        self._tables.clear()
        self._runs.clear()
        self._mappings.clear()

    def _entries(self, phys: int, data: bytes) -> tuple[int, ...]:
        """The 512 entries in ``data`` (read from ``phys``); the same tuple while unchanged."""
        if not self.cache_tables:
            return _TABLE_FMT.unpack(data)
        known = self._tables.get(phys)
        if known is not None and known[0] == data:
            return known[1]
        raws = _TABLE_FMT.unpack(data)
        if len(self._tables) >= self.cache_tables:
            self.forget()
        self._tables[phys] = (bytes(data), raws)
        return raws

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
            pse_is_leaf = level in (2, 3)
            for idx in compress(range(limit), raws):  # non-zero entries only, at C speed
                raw = raws[idx]
                if not raw & P_PRESENT or (pse_is_leaf and raw & P_PSE):
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

    def _leaf_runs(
        self,
        raws: tuple[int, ...],
        level: int,
        base: int,
        table: int,
        and_mask: int,
        or_bits: int,
        limit: int,
        include_nonpresent: bool,
    ) -> list[_Run]:
        """Runs of consecutive leaf entries with one merge key in one table (see mappings).

        The hot loop of a snapshot (thousands of entries): kept on locals.
        """
        span = LEVEL_SPAN[level]
        huge_mask = ((1 << self.maxphyaddr) - 1) & ~(span - 1)
        pte_mask = self._table_mask
        pte_key_mask = and_mask | P_PSE  # a 4 KiB leaf's PAT is bit 7 already
        out: list[_Run] = []
        ckey = -1  # the current run: key, first index, last index, phys, raw, contiguous
        cidx = prev = -2
        cphys = craw = 0
        contig = False
        for idx in compress(range(limit), raws):  # non-zero entries only
            raw = raws[idx]
            if raw & P_PRESENT:
                if level == 1:
                    addr = raw & pte_mask
                    key = (raw & pte_key_mask) | or_bits
                elif raw & P_PSE:
                    addr = raw & huge_mask
                    key = (raw & and_mask) | or_bits | (P_PSE if raw & P_PAT_LARGE else 0)
                else:
                    continue  # a lower table, walked on its own
            elif not include_nonpresent:
                continue
            else:
                huge = level > 1 and raw & P_PSE
                if raw & P_PROTNONE:
                    addr = ~raw & (huge_mask if huge else pte_mask)
                else:
                    addr = 0
                pat = (raw & P_PAT_LARGE) if huge else (raw & P_PSE if level == 1 else 0)
                key = (raw & and_mask) | or_bits | (P_PSE if pat else 0)
            if idx == prev + 1 and key == ckey:
                if contig and addr != cphys + (idx - cidx) * span:
                    contig = False
                prev = idx
                continue
            if ckey >= 0:
                out.append(
                    _Run(base + cidx * span, base + (prev + 1) * span, ckey, cphys, contig,
                         prev - cidx + 1, span, level, cidx, table, craw)
                )  # fmt: skip
            ckey, cidx, prev, cphys, craw = key, idx, idx, addr, raw
            contig = bool(key & (P_PRESENT | P_PROTNONE))
        if ckey >= 0:
            out.append(
                _Run(base + cidx * span, base + (prev + 1) * span, ckey, cphys, contig,
                     prev - cidx + 1, span, level, cidx, table, craw)
            )  # fmt: skip
        return out

    def mappings(self, root: int, *, include_nonpresent: bool = True) -> list[MappingRange]:
        """All user-half mappings of ``root`` as merged ranges (see :class:`MappingRange`).

        Leaves are present pages of any size; with ``include_nonpresent``,
        PROTNONE and SWAP entries at leaf levels are listed too (as ranges of
        their own kind). Effective W/U/NX combine every level of the path.

        Works on raw bits: each table's leaves are first merged into runs of
        consecutive entries with the same merge key (one integer: the entry's
        key bits with the path's W/U/NX folded in and PAT moved to bit 7), then
        the runs of all tables are sorted and merged across table boundaries.
        Only the first leaf of each range is decoded into an :class:`Entry`.
        """
        walk_key = (self._root(root), include_nonpresent)
        last = self._mappings.get(walk_key)
        if last is not None and self._unchanged(last[0]):
            return list(last[1])  # every table of the walk reads the same as last time
        visited: list[tuple[int, tuple[int, ...]]] = []
        # effective (write, user, nx) of the path down to each table of this walk
        eff: dict[int, tuple[bool, bool, bool]] = {}
        user_end = user_va_end(self.levels)
        runs: list[_Run] = []
        for parent, phys, level, base, raws in self._walk(root, user_only=True):
            visited.append((phys, raws))
            if parent is None:
                w, u, x = True, True, False
            else:
                pw, pu, px = eff[parent.table]
                w, u, x = pw and parent.write, pu and parent.user, px or parent.nx
            eff[phys] = (w, u, x)
            if level == self.levels or base >= user_end:
                continue  # root entries (level 4/5) are never leaves
            # key bits of an entry: clear W/U the path lacks, set NX the path has
            and_mask = _KEY_BITS & ~((0 if w else P_RW) | (0 if u else P_USER))
            or_bits = P_NX if x else 0
            limit = min(ENTRIES, (user_end - base + LEVEL_SPAN[level] - 1) // LEVEL_SPAN[level])
            cache_key = (phys, level, base, and_mask, or_bits, limit, int(include_nonpresent))
            known = self._runs.get(cache_key)
            if known is not None and known[0] is raws:  # the same tuple: the same bytes
                runs.extend(known[1])
                continue
            table_runs = self._leaf_runs(
                raws, level, base, phys, and_mask, or_bits, limit, include_nonpresent
            )
            if self.cache_tables:
                self._runs[cache_key] = (raws, table_runs)
            runs.extend(table_runs)
        runs.sort(key=lambda r: r.start)

        out: list[MappingRange] = []
        i, n = 0, len(runs)
        while i < n:
            first = runs[i]
            end, pages, sizes, contiguous = first.end, first.pages, {first.span}, first.contiguous
            j = i + 1
            while j < n and runs[j].start == end and runs[j].key == first.key:
                nxt = runs[j]
                if not nxt.contiguous or nxt.phys != first.phys + (end - first.start):
                    contiguous = False
                sizes.add(nxt.span)
                pages += nxt.pages
                end = nxt.end
                j += 1
            e = self._decode(first.raw, first.level, first.first_index, first.table, first.start)
            key = first.key
            if key & P_PRESENT:
                kind = EntryKind.LEAF
            elif key & P_PROTNONE:
                kind = EntryKind.PROTNONE
            else:
                kind = EntryKind.SWAP
            out.append(
                MappingRange(
                    start=first.start,
                    end=end,
                    kind=kind,
                    write=bool(key & P_RW),
                    user=bool(key & P_USER),
                    nx=bool(key & P_NX),
                    pkey=e.pkey,
                    pwt=e.pwt,
                    pcd=e.pcd,
                    pat=e.pat,
                    global_=e.global_,
                    pages=pages,
                    page_sizes=frozenset(sizes),
                    phys_start=first.phys,
                    phys_contiguous=contiguous,
                    first=e,
                )
            )
            i = j
        if self.cache_tables:
            self._mappings[walk_key] = (tuple(visited), tuple(out))
        return out

    def _unchanged(self, visited: tuple[tuple[int, tuple[int, ...]], ...]) -> bool:
        """Whether each of these tables still reads as the entries remembered for it.

        A walk is a function of the bytes of the tables it visits: if every one
        of them is unchanged, walking again visits the same tables and gives
        the same result.
        """
        for phys, raws in visited:
            try:
                data = self.read(phys, PAGE_SIZE)
            except (TestbedError, OSError, ValueError, IndexError):
                return False
            if len(data) != PAGE_SIZE or self._entries(phys, data) is not raws:
                return False
        return True


_KEY_BITS = P_PRESENT | P_RW | P_USER | P_PWT | P_PCD | P_GLOBAL | PKEY_MASK | P_NX
"""Entry bits in a mapping's merge key (PAT is added at bit 7 for every leaf size)."""


class _Run(NamedTuple):
    """Consecutive leaf entries of one table with the same merge key."""

    start: int
    end: int
    key: int
    phys: int
    """Physical address of the first entry (decoded PFN for PROTNONE, 0 for SWAP)."""
    contiguous: bool
    pages: int
    span: int
    level: int
    first_index: int
    """Index of the first entry in its table."""
    table: int
    raw: int
    """Raw bits of the first entry."""
