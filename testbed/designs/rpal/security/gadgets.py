"""WRPKRU and XRSTOR gadgets: a pure byte scan, and the host's scan of services' code.

MPK is only as strong as the absence of instructions that write PKRU: WRPKRU
(0F 01 EF) and XRSTOR (0F AE /5 with a memory operand, i.e. ModRM.mod != 3; with
an optional REX prefix, XRSTOR64 when REX.W) are unprivileged. `scan_bytes` finds
every occurrence at any byte offset (aligned to an instruction boundary or not:
a jump can land anywhere). `scan_services` reads every executable user page of
the given processes' mms from guest RAM through the page-table walker (while the
guest is paused) and scans it; pages of a slot whose entry in that mm is a marked
copy (a peer's) are left to the peer's own scan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from testbed.errors import TestbedError
from testbed.snapshot.model import SLOT_SHIFT, Snapshot

WRPKRU = b"\x0f\x01\xef"
XRSTOR_OPCODE = b"\x0f\xae"
PAGE = 4096
MAX_PAGES = 1 << 16  # per scan: a guest cannot make the host read more than 256 MiB


@dataclass(frozen=True)
class Gadget:
    kind: str  # wrpkru | xrstor | xrstor_rex | xrstor64
    offset: int  # in the scanned bytes (with base: the virtual address)
    raw: bytes  # the encoding found (prefix, opcode, ModRM)

    def to_dict(self, base: int = 0) -> dict[str, object]:
        return {"kind": self.kind, "va": f"0x{base + self.offset:x}", "bytes": self.raw.hex()}


def _xrstor_modrm(b: int) -> bool:
    """ModRM of XRSTOR: reg field 5, a memory operand (mod != 3; mod 3 is LFENCE)."""
    return (b >> 3) & 7 == 5 and b >> 6 != 3


def scan_bytes(data: bytes, base: int = 0) -> list[Gadget]:
    """Every WRPKRU and XRSTOR encoding in `data`, at any offset, in offset order.

    An XRSTOR right after a REX byte (40..4F) is listed once, at the REX byte
    (`xrstor64` with REX.W, else `xrstor_rex`). Offsets are relative to `data`
    (add `base` for addresses; `base` only names the result's addresses).
    """
    out: list[Gadget] = []
    i = data.find(WRPKRU)
    while i >= 0:
        out.append(Gadget("wrpkru", base + i, WRPKRU))
        i = data.find(WRPKRU, i + 1)
    i = data.find(XRSTOR_OPCODE)
    while i >= 0:
        if i + 2 < len(data) and _xrstor_modrm(data[i + 2]):
            if i > 0 and 0x40 <= data[i - 1] <= 0x4F:
                kind = "xrstor64" if data[i - 1] & 8 else "xrstor_rex"
                out.append(Gadget(kind, base + i - 1, data[i - 1:i + 3]))
            else:
                out.append(Gadget("xrstor", base + i, data[i:i + 3]))
        i = data.find(XRSTOR_OPCODE, i + 1)
    out.sort(key=lambda g: g.offset)
    return out


@dataclass
class ServiceScan:
    pid: int
    role: str
    pages: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)
    gadgets: list[Gadget] = field(default_factory=list)  # offsets are virtual addresses
    error: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"pid": self.pid, "role": self.role, "pages": self.pages,
                "ranges": [[f"0x{a:x}", f"0x{b:x}"] for a, b in self.ranges],
                "gadgets": [g.to_dict() for g in self.gadgets], "error": self.error}


@dataclass
class Scan:
    services: list[ServiceScan]
    seconds: float = 0.0

    @property
    def pages(self) -> int:
        return sum(s.pages for s in self.services)

    @property
    def gadgets(self) -> int:
        return sum(len(s.gadgets) for s in self.services)

    def find(self, va: int, kind: str | None = None) -> list[tuple[ServiceScan, Gadget]]:
        return [(s, g) for s in self.services for g in s.gadgets
                if g.offset == va and (kind is None or g.kind == kind)]

    def to_dict(self) -> dict[str, object]:
        return {"pages": self.pages, "gadgets": self.gadgets, "seconds": round(self.seconds, 3),
                "services": [s.to_dict() for s in self.services]}


Translate = Callable[[int, int], int | None]  # (root, va) -> phys or None
Read = Callable[[int, int], bytes]


Range = tuple[int, int, int, bool]  # start, end, phys of start, physically contiguous


def executable_ranges(snap: Snapshot, pid: int) -> tuple[int | None, list[Range]]:
    """(root, [(start, end, phys_start, contiguous)]) of the executable user leaves of
    `pid`'s mm that lie outside slots where its entry is a marked copy (pure)."""
    task = next((t for t in snap.tasks if t.pid == pid), None)
    mm = snap.mm_of(pid)
    if task is None or mm is None or not isinstance(task.mappings, tuple):
        return None, []
    marked = set()
    if isinstance(mm.slots, tuple):
        marked = {e.slot for e in mm.slots if e.marker}
    root = mm.user_pgd if mm.user_pgd is not None else mm.pgd
    out = []
    for m in task.mappings:
        if m.kind != "leaf" or len(m.flags) < 4 or m.flags[2] != "x" or m.flags[3] != "u":
            continue
        if any(s in marked for s in range(m.start >> SLOT_SHIFT, ((m.end - 1) >> SLOT_SHIFT) + 1)):
            continue
        out.append((m.start, m.end, m.phys_start, m.phys_contiguous))
    return root, out


def scan_services(snap: Snapshot, roles: Iterable[tuple[str, int]], translate: Translate,
                  read: Read) -> Scan:
    """Scan every executable user page of each (role, pid) in the snapshot."""
    t0 = time.perf_counter()
    budget = MAX_PAGES
    services = []
    for role, pid in roles:
        svc = ServiceScan(pid, role)
        services.append(svc)
        root, ranges = executable_ranges(snap, pid)
        if root is None:
            svc.error = f"no mm or mappings for pid {pid} in the snapshot"
            continue
        for start, end, phys, contiguous in ranges:
            npages = (end - start) // PAGE
            if npages > budget:
                svc.error = f"more than {MAX_PAGES} executable pages: scan cut short"
                break
            budget -= npages
            chunks = []
            try:
                for k in range(npages):
                    va = start + k * PAGE
                    pa = phys + k * PAGE if contiguous else translate(root, va)
                    if pa is None:
                        raise TestbedError(f"0x{va:x} does not translate")
                    chunks.append(read(pa, PAGE))
            except TestbedError as exc:
                svc.error = f"range 0x{start:x}-0x{end:x}: {exc.one_line()}"
                continue
            svc.ranges.append((start, end))
            svc.pages += npages
            svc.gadgets += scan_bytes(b"".join(chunks), start)
    return Scan(services, time.perf_counter() - t0)
