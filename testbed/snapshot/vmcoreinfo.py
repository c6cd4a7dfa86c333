"""VMCOREINFO: the kernel's note about itself, found in guest RAM and parsed.

A kernel with CONFIG_CRASH_CORE (Debian's, and ours when enabled) writes an
ELF note named ``VMCOREINFO`` into a page of its RAM at boot, whether or not
QEMU has ``-device vmcoreinfo``. Its text holds ``KEY=VALUE`` lines:
OSRELEASE, BUILD-ID, PAGESIZE, KERNELOFFSET (the KASLR virtual offset, hex),
``SYMBOL(name)=hex`` (runtime addresses), ``NUMBER(name)=decimal``
(phys_base, pgtable_l5_enabled...), ``OFFSET(t.m)``, ``SIZE(t)``,
``LENGTH(x)`` (decimal).

:func:`parse_vmcoreinfo` is pure; :func:`find_vmcoreinfo` scans guest
physical memory for the note (one pass over RAM, ~0.2 s for 512 MiB).
:func:`find_banner` finds ``linux_banner`` strings, the fallback when a
kernel has no VMCOREINFO.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from testbed.errors import TestbedError

NOTE_NAME = b"VMCOREINFO\x00"
VMCOREINFO_MAX = 4096  # the kernel's VMCOREINFO_BYTES (one page)
CHUNK = 16 << 20


class VmcoreinfoError(TestbedError):
    """No usable VMCOREINFO (or banner) in guest memory, or malformed text."""


class _Memory(Protocol):
    @property
    def ranges(self) -> Sequence[tuple[int, int]]: ...

    def read(self, phys: int, length: int) -> bytes: ...


@dataclass(frozen=True)
class VmcoreInfo:
    """Parsed VMCOREINFO text; ``phys`` is where it was found (None when given as text)."""

    entries: Mapping[str, str] = field(repr=False)
    text: str = field(repr=False, default="")
    phys: int | None = None

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    @property
    def osrelease(self) -> str:
        return self.entries.get("OSRELEASE", "")

    @property
    def build_id(self) -> str | None:
        return self.entries.get("BUILD-ID")

    @property
    def page_size(self) -> int:
        return int(self.entries.get("PAGESIZE", "4096"))

    @property
    def kernel_offset(self) -> int:
        """KERNELOFFSET: the KASLR virtual offset (0 without KASLR)."""
        return int(self.entries.get("KERNELOFFSET", "0"), 16)

    @property
    def phys_base(self) -> int | None:
        """NUMBER(phys_base), signed: negative when KASLR put the kernel below its link address."""
        v = self.number("phys_base")
        if v is not None and v >= 1 << 63:
            v -= 1 << 64
        return v

    @property
    def pgtable_l5_enabled(self) -> bool | None:
        v = self.number("pgtable_l5_enabled")
        return None if v is None else bool(v)

    def symbol(self, name: str) -> int | None:
        v = self.entries.get(f"SYMBOL({name})")
        return int(v, 16) if v is not None else None

    def number(self, name: str) -> int | None:
        v = self.entries.get(f"NUMBER({name})")
        return int(v, 0 if v.lower().startswith("0x") else 10) if v is not None else None

    def offset(self, name: str) -> int | None:
        v = self.entries.get(f"OFFSET({name})")
        return int(v) if v is not None else None

    def size(self, name: str) -> int | None:
        v = self.entries.get(f"SIZE({name})")
        return int(v) if v is not None else None

    @property
    def symbols(self) -> dict[str, int]:
        """All SYMBOL(name) entries: name -> runtime address."""
        return {k[7:-1]: int(v, 16) for k, v in self.entries.items()
                if k.startswith("SYMBOL(") and k.endswith(")")}

    def drgn_text(self) -> str:
        """The text in the form drgn's ``set_linux_kernel_custom`` takes."""
        return self.text if self.text.endswith("\n") else self.text + "\n"


def parse_vmcoreinfo(text: str | bytes, phys: int | None = None) -> VmcoreInfo:
    """Parse VMCOREINFO ``KEY=VALUE`` lines (stops at the first NUL)."""
    if isinstance(text, bytes):
        nul = text.find(b"\0")
        text = text[: nul if nul >= 0 else None].decode("ascii", "replace")
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise VmcoreinfoError(f"malformed VMCOREINFO line {line[:80]!r}")
        entries[key] = value
    if "OSRELEASE" not in entries:
        raise VmcoreinfoError("VMCOREINFO text has no OSRELEASE line")
    try:
        for k, v in entries.items():
            if k.startswith("SYMBOL(") or k == "KERNELOFFSET":
                int(v, 16)
    except ValueError:
        raise VmcoreinfoError(f"VMCOREINFO {k}={v!r} is not a hex number") from None
    return VmcoreInfo(entries, text, phys)


def parse_note(data: bytes, offset: int = 0) -> tuple[str, int]:
    """(desc text, desc length) of the ELF note starting at ``offset`` (namesz 11, type 0)."""
    if offset + 24 > len(data):
        raise VmcoreinfoError("VMCOREINFO note header truncated")
    namesz, descsz, ntype = struct.unpack_from("<III", data, offset)
    if namesz != len(NOTE_NAME) or ntype != 0 or data[offset + 12 : offset + 23] != NOTE_NAME:
        raise VmcoreinfoError("not a VMCOREINFO ELF note")
    if descsz > VMCOREINFO_MAX:
        raise VmcoreinfoError(f"VMCOREINFO note of {descsz} bytes (> {VMCOREINFO_MAX})")
    start = offset + 24
    desc = data[start : start + descsz]
    nul = desc.find(b"\0")
    return desc[: nul if nul >= 0 else None].decode("ascii", "replace"), descsz


def _chunks(mem: _Memory, overlap: int) -> Iterator[tuple[int, bytes]]:
    for start, end in mem.ranges:
        pos = start
        while pos < end:
            n = min(CHUNK + overlap, end - pos)
            yield pos, mem.read(pos, n)
            pos += CHUNK


def scan_vmcoreinfo(data: bytes, base: int = 0) -> Iterator[VmcoreInfo]:
    """Every well-formed VMCOREINFO note in ``data`` (``base`` = its physical address)."""
    # search for the name itself: a pattern starting with zero bytes is slow over
    # mostly-zero RAM (bytes.find: 4.7 s instead of 0.2 s for 512 MiB)
    pos = data.find(NOTE_NAME)
    while pos >= 0:
        hdr = pos - 12  # namesz, descsz, n_type precede the name
        if hdr >= 0:
            try:
                text, _ = parse_note(data, hdr)
                yield parse_vmcoreinfo(text, base + hdr + 24)
            except VmcoreinfoError:
                pass
        pos = data.find(NOTE_NAME, pos + 1)


def find_vmcoreinfo(mem: _Memory, *, osrelease: str | None = None) -> VmcoreInfo:
    """The first VMCOREINFO note in guest RAM (matching ``osrelease`` when given).

    Raises :class:`VmcoreinfoError` when the RAM holds none (a kernel built
    without CONFIG_CRASH_CORE, or one that has not booted far enough).
    """
    overlap = 24 + VMCOREINFO_MAX
    for base, data in _chunks(mem, overlap):
        for info in scan_vmcoreinfo(data, base):
            if osrelease is None or info.osrelease == osrelease:
                return info
    raise VmcoreinfoError(
        "no VMCOREINFO note in guest RAM (kernel without CONFIG_CRASH_CORE?); "
        "give the KASLR offset explicitly or a symbol table and a CR3 for the banner fallback"
    )


def find_banner(mem: _Memory, banner: bytes = b"Linux version ", *,
                limit: int = 16) -> list[int]:
    """Physical addresses where ``banner`` (e.g. the full linux_banner text) occurs."""
    out: list[int] = []
    overlap = len(banner)
    for base, data in _chunks(mem, overlap):
        pos = data.find(banner)
        while pos >= 0 and len(out) < limit:
            if pos < CHUNK:
                out.append(base + pos)
            pos = data.find(banner, pos + 1)
        if len(out) >= limit:
            break
    return out


def elf_build_id(path: str | Path) -> str | None:
    """The GNU build ID of an ELF file (hex, as VMCOREINFO's BUILD-ID); None without one
    or when the file is no ELF (a bzImage)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            elf = ELFFile(f)
            for sec in elf.iter_sections():
                if sec.header["sh_type"] != "SHT_NOTE":
                    continue
                for note in sec.iter_notes():  # type: ignore[attr-defined]
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return str(note["n_desc"]).lower()
    except (ELFError, OSError, ValueError, KeyError):
        return None
    return None


def check_build_id(info: VmcoreInfo, vmlinux_build_id: str | None, what: str, kernel: str
                   ) -> None:
    """A dump and the kernel given to read it must come from the same build (pure):
    VmcoreinfoError naming both IDs otherwise. Nothing to compare is no error."""
    dumped = (info.build_id or "").strip().lower()
    if not dumped or not vmlinux_build_id:
        return
    if dumped != vmlinux_build_id.lower():
        raise VmcoreinfoError(f"{what} is from another kernel build than {kernel}: BUILD-ID "
                              f"{dumped} in the dump, {vmlinux_build_id} in the vmlinux; "
                              "pass the vmlinux of the dumped kernel")
