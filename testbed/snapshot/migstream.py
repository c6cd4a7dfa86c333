"""Parser for the QEMU 7.2 migration stream ("savevm" format, version 3).

Parsed by structure, in the way QEMU's ``scripts/analyze-migration.py`` does
(this is an independent implementation):

1. The stream ends with ``QEMU_VM_EOF`` (0x00), ``QEMU_VM_VMDESCRIPTION``
   (0x06), a big-endian u32 length and that many bytes of JSON: the layout of
   every device section actually written (field names, types, per-element
   sizes, array lengths, nested structs, the subsections present). It is
   located from the end: the 0x06 byte whose length reaches exactly to the
   end of the data, preceded by the EOF byte.
2. The stream is then read from the start: magic ``QEVM``, version 3, the
   ``QEMU_VM_CONFIGURATION`` section (machine type, capabilities
   subsection), then sections. ``SECTION_START``/``FULL`` carry id, idstr,
   instance id and version; ``PART``/``END`` only the id. Each is followed by
   a section footer (0x7e + id) on machine types that send them.
3. Device sections are decoded field by field from the JSON description:
   integers (big-endian, except ``int32 le``), bools, nested structs and their
   subsections recursively, anything else as raw bytes of the described size.
   A struct's bytes read must equal its described size (a cheap corruption
   check).
4. The RAM section (``ram``, version 4) is walked by its flags: the block
   list (``MEM_SIZE``: per block name, length and, with ``x-ignore-shared``,
   the memory-region address), then pages (``PAGE``: 4 KiB of data,
   ``ZERO``: one fill byte, ``CONTINUE``: same block as before, ``EOS``: end
   of this part). Page data is skipped; XBZRLE, compressed pages and RDMA
   hooks are refused with a clear error.

Every problem (bad magic, truncation, unknown section type, a field that
runs past the end, a section the description does not know) raises one
:class:`MigrationStreamError` naming the byte offset; the parser only moves
forward, so it cannot hang.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from testbed.errors import TestbedError

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3
QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

MAX_DESCRIPTION = 64 << 20
"""The JSON description is searched for in at most this many bytes at the end."""


class MigrationStreamError(TestbedError):
    """The migration stream is truncated, corrupt or in a format not handled."""


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VcpuState:
    """One vCPU's state from its ``cpu`` section (instance id = cpu index)."""

    index: int
    pkru: int
    """PKRU; 0 when the ``cpu/pkru`` subsection is absent (QEMU sends it only when PKRU != 0)."""
    pkru_present: bool
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    rip: int
    rsp: int
    hflags: int
    fields: Mapping[str, Any] = field(repr=False)
    """The decoded fields of the section (all, or those asked for with ``only``),
    subsections as nested mappings by name."""

    @property
    def cpl(self) -> int:
        """Current privilege level (QEMU's hflags bits 0-1, HF_CPL_MASK)."""
        return self.hflags & 3

    @property
    def la57(self) -> bool:
        return bool(self.cr4 >> 12 & 1)

    @property
    def pke(self) -> bool:
        return bool(self.cr4 >> 22 & 1)

    @property
    def paging_levels(self) -> int:
        return 5 if self.la57 else 4


@dataclass(frozen=True)
class Section:
    section_id: int
    name: str
    instance_id: int
    version_id: int
    offset: int
    """Byte offset of the section's first header byte."""
    fields: Mapping[str, Any] | None
    """Decoded fields of device sections; None for ``ram`` and sections not decoded."""


@dataclass(frozen=True)
class RamBlock:
    name: str
    length: int
    mr_addr: int | None
    """The memory region's guest address (sent only with ``x-ignore-shared``)."""


@dataclass(frozen=True)
class MigrationStream:
    machine: str
    capabilities: tuple[str, ...]
    page_size: int
    sections: tuple[Section, ...]
    ram_blocks: tuple[RamBlock, ...]
    ram_pages: int
    """Pages with data or zero-fill in the stream (0 with x-ignore-shared on shared RAM)."""
    description: Mapping[str, Any] = field(repr=False)
    vcpus: tuple[VcpuState, ...] = ()

    def vcpu(self, index: int) -> VcpuState:
        for v in self.vcpus:
            if v.index == index:
                return v
        raise MigrationStreamError(f"no cpu section with instance id {index} in the stream")


# ---------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, end: int) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.end = end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise MigrationStreamError(
                f"migration stream truncated at offset 0x{self.pos:x}: {what} needs {n} "
                f"bytes, {self.end - self.pos} left"
            )
        b = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            self.take(n, what)  # raises
        self.pos += n

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def be32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def be64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "big")

    def string8(self, what: str) -> str:
        n = self.u8(f"length of {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MigrationStreamError(
                f"{what} at offset 0x{self.pos - n:x} is not text: {raw[:32]!r}"
            ) from e


# ---------------------------------------------------------------------------
# The trailing JSON description
# ---------------------------------------------------------------------------


def find_description(data: bytes) -> tuple[int, dict[str, Any]]:
    """Locate and load the trailing VMDESCRIPTION JSON.

    Returns (offset of the QEMU_VM_EOF byte that precedes it, the JSON).
    """
    n = len(data)
    if n < 13:
        raise MigrationStreamError(f"migration stream too short ({n} bytes)")
    lo = max(0, n - MAX_DESCRIPTION)
    p = n
    while True:
        p = data.rfind(b"\x06", lo, p)
        if p < 1:
            raise MigrationStreamError(
                "no VMDESCRIPTION at the end of the migration stream (truncated, or not "
                "a QEMU savevm stream)"
            )
        if p + 5 <= n and int.from_bytes(data[p + 1 : p + 5], "big") == n - p - 5:
            if data[p + 5 : p + 6] == b"{" and data[p - 1] == QEMU_VM_EOF:
                break
    return p - 1, _load_description(bytes(data[p + 5 :]), p + 5)


_DESCRIPTIONS: dict[bytes, dict[str, Any]] = {}
"""Parsed descriptions by their JSON text: one machine writes the same one every time."""
_DESCRIPTIONS_MAX = 16


def _load_description(text: bytes, offset: int) -> dict[str, Any]:
    """The VMDESCRIPTION JSON, parsed (cached: callers must not modify the result)."""
    desc = _DESCRIPTIONS.get(text)
    if desc is not None:
        return desc
    try:
        loaded = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MigrationStreamError(
            f"VMDESCRIPTION JSON at offset 0x{offset:x} is corrupt: {e}"
        ) from e
    if not isinstance(loaded, dict) or not isinstance(loaded.get("devices"), list):
        raise MigrationStreamError(f"VMDESCRIPTION at offset 0x{offset:x} has no device list")
    if len(_DESCRIPTIONS) >= _DESCRIPTIONS_MAX:
        _DESCRIPTIONS.pop(next(iter(_DESCRIPTIONS)))
    _DESCRIPTIONS[text] = loaded
    return loaded


# ---------------------------------------------------------------------------
# Field decoding
# ---------------------------------------------------------------------------


def _store(out: dict[str, Any], name: str, value: Any) -> None:
    if name not in out:
        out[name] = value
    elif isinstance(out[name], _Repeated):
        out[name].append(value)
    else:
        out[name] = _Repeated([out[name], value])


class _Repeated(list):
    """Several stream fields with the same name (QEMU splits some arrays)."""


def _read_value(r: _Reader, f: Mapping[str, Any], where: str) -> Any:
    ftype = str(f.get("type", "unknown"))
    name = f"{where}.{f.get('name', '?')}"
    if ftype == "struct":
        st = f.get("struct")
        if not isinstance(st, Mapping):
            raise MigrationStreamError(f"description of struct {name} has no 'struct'")
        start = r.pos
        value = _read_vmsd(r, st, name)
        size = f.get("size")
        if isinstance(size, int) and r.pos - start != size:
            raise MigrationStreamError(
                f"struct {name} at offset 0x{start:x} took {r.pos - start} bytes, "
                f"the description says {size}"
            )
        return value
    size = f.get("size")
    if not isinstance(size, int) or size < 0:
        raise MigrationStreamError(f"description of field {name} has no size")
    if ftype == "bool":
        return r.take(size, name)[0] != 0 if size else False
    if ftype.startswith(("int", "uint")) and size in (1, 2, 4, 8):
        raw = r.take(size, name)
        signed = ftype.startswith("int")
        if ftype.endswith(" le"):
            return int.from_bytes(raw, "little", signed=signed)
        return int.from_bytes(raw, "big", signed=signed)
    return r.take(size, name)


def _read_vmsd(
    r: _Reader, desc: Mapping[str, Any], where: str, only: Collection[str] | None = None
) -> dict[str, Any]:
    """Fields then subsections of one vmstate description.

    ``only`` (names of fields and subsections): decode just those and move
    past the others by their described sizes; None decodes everything.
    """
    out: dict[str, Any] = {}
    fields = desc.get("fields")
    if not isinstance(fields, list):
        raise MigrationStreamError(f"description of {where} has no fields (old-style section?)")
    for f in fields:
        if only is not None and f["name"] not in only:
            _skip_field(r, f, where)
            continue
        count = f.get("array_len")
        if count is None:
            _store(out, f["name"], _read_value(r, f, where))
        else:
            _store(out, f["name"], [_read_value(r, f, where) for _ in range(int(count))])
    for sub in desc.get("subsections", ()):
        got = _subsection_header(r, sub, where)
        if only is None or got in only:
            out[got] = _read_vmsd(r, sub, got)
        else:
            _skip_vmsd(r, sub, got)
    return out


def _subsection_header(r: _Reader, sub: Mapping[str, Any], where: str) -> str:
    """Read and check the marker, name and version of the subsection ``sub`` describes."""
    want = sub.get("vmsd_name", "?")
    at = r.pos
    tag = r.u8(f"subsection marker of {want}")
    got = r.string8(f"subsection name in {where}") if tag == QEMU_VM_SUBSECTION else None
    if got != want:
        raise MigrationStreamError(
            f"expected subsection {want} of {where} at offset 0x{at:x}, found "
            + (f"{got!r}" if got is not None else f"byte 0x{tag:02x}")
        )
    r.be32(f"version of subsection {got}")
    return want


def _skip_field(r: _Reader, f: Mapping[str, Any], where: str) -> None:
    """Move past one field (all its array elements) by its described size."""
    size = f.get("size")
    count = f.get("array_len", 1)
    if isinstance(size, int) and isinstance(count, int) and size >= 0 and count >= 0:
        r.skip(size * count, f"{where}.{f.get('name', '?')}")
    elif "array_len" in f:
        for _ in range(int(count)):
            _read_value(r, f, where)
    else:
        _read_value(r, f, where)


def _skip_vmsd(r: _Reader, desc: Mapping[str, Any], where: str) -> None:
    """Like _read_vmsd but only moves past the fields, by their described sizes (fast).

    A field's described size is the bytes written for one element, nested
    structs and their subsections included; the section's own subsections
    are still walked and their names checked.
    """
    fields = desc.get("fields")
    if not isinstance(fields, list):
        raise MigrationStreamError(f"description of {where} has no fields (old-style section?)")
    for f in fields:
        _skip_field(r, f, where)
    for sub in desc.get("subsections", ()):
        _skip_vmsd(r, sub, _subsection_header(r, sub, where))


# ---------------------------------------------------------------------------
# Configuration and RAM
# ---------------------------------------------------------------------------


def _read_configuration(r: _Reader) -> tuple[str, list[str]]:
    n = r.be32("configuration name length")
    if n > 256:
        raise MigrationStreamError(f"configuration name length {n} at 0x{r.pos - 4:x} is absurd")
    machine = r.take(n, "machine type").decode("utf-8", "replace")
    caps: list[str] = []
    while r.pos < r.end and r.data[r.pos] == QEMU_VM_SUBSECTION:
        r.u8("subsection marker")
        name = r.string8("configuration subsection name")
        r.be32(f"version of {name}")
        if name == "configuration/capabilities":
            count = r.be32("capability count")
            caps.extend(r.string8("capability name") for _ in range(count))
        elif name == "configuration/uuid":
            r.skip(16, "VM uuid")
        else:
            raise MigrationStreamError(
                f"unknown configuration subsection {name!r} at offset 0x{r.pos:x}"
            )
    return machine, caps


@dataclass
class _RamState:
    page_size: int
    ignore_shared: bool
    blocks: list[RamBlock]
    pages: int = 0


def _read_ram(r: _Reader, st: _RamState) -> None:
    """One part of the RAM section, up to and including its EOS flag."""
    mask = st.page_size - 1
    while True:
        at = r.pos
        word = r.be64("RAM page header")
        flags, addr = word & mask, word & ~mask
        if flags & RAM_SAVE_FLAG_MEM_SIZE:
            total = addr
            while total > 0:
                name = r.string8("RAM block name")
                length = r.be64(f"length of RAM block {name}")
                mr_addr = r.be64(f"address of RAM block {name}") if st.ignore_shared else None
                st.blocks.append(RamBlock(name, length, mr_addr))
                if length == 0 or length > total:
                    raise MigrationStreamError(
                        f"RAM block {name!r} at offset 0x{at:x} has length 0x{length:x}, "
                        f"0x{total:x} left of the total"
                    )
                total -= length
            flags &= ~RAM_SAVE_FLAG_MEM_SIZE
        if flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE):
            if flags & RAM_SAVE_FLAG_CONTINUE:
                flags &= ~RAM_SAVE_FLAG_CONTINUE
            else:
                r.string8("RAM block name of a page")
            if flags & RAM_SAVE_FLAG_ZERO:
                r.skip(1, "zero-page fill byte")
                flags &= ~RAM_SAVE_FLAG_ZERO
            else:
                r.skip(st.page_size, "RAM page data")
                flags &= ~RAM_SAVE_FLAG_PAGE
            st.pages += 1
        unsupported = flags & (
            RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_HOOK | RAM_SAVE_FLAG_COMPRESS_PAGE
        )
        if unsupported:
            raise MigrationStreamError(
                f"RAM page at offset 0x{at:x} uses flags 0x{unsupported:x} (XBZRLE, RDMA hook "
                "or compression), which this parser does not handle"
            )
        flags &= ~RAM_SAVE_FLAG_MULTIFD_FLUSH
        if flags & RAM_SAVE_FLAG_EOS:
            flags &= ~RAM_SAVE_FLAG_EOS
            if flags:
                raise MigrationStreamError(f"unknown RAM flags 0x{flags:x} at offset 0x{at:x}")
            return
        if flags:
            raise MigrationStreamError(f"unknown RAM flags 0x{flags:x} at offset 0x{at:x}")


# ---------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------


def _vcpu(sec: Section) -> VcpuState:
    f = sec.fields or {}

    def num(name: str) -> int:
        v = f.get(name)
        if not isinstance(v, int):
            raise MigrationStreamError(
                f"cpu section {sec.instance_id} (offset 0x{sec.offset:x}) has no integer {name}"
            )
        return v

    regs = f.get("env.regs")
    pk = f.get("cpu/pkru")
    pkru = int(pk["env.pkru"]) if isinstance(pk, Mapping) and "env.pkru" in pk else 0
    return VcpuState(
        index=sec.instance_id,
        pkru=pkru,
        pkru_present=pk is not None,
        cr0=num("env.cr[0]"),
        cr2=num("env.cr[2]"),
        cr3=num("env.cr[3]"),
        cr4=num("env.cr[4]"),
        efer=num("env.efer"),
        rip=num("env.eip"),
        rsp=int(regs[4]) if isinstance(regs, list) and len(regs) > 4 else 0,
        hflags=num("env.hflags"),
        fields=f,
    )


VCPU_FIELDS = frozenset(
    {"env.regs", "env.eip", "env.hflags", "env.efer", "env.cr[0]", "env.cr[2]", "env.cr[3]",
     "env.cr[4]", "cpu/pkru"}
)  # fmt: skip
"""The fields and subsections of a ``cpu`` section that :class:`VcpuState` is made of."""


def parse_migration_stream(
    data: bytes,
    *,
    decode: Collection[str] | None = ("cpu",),
    only: Collection[str] | None = None,
) -> MigrationStream:
    """Parse a whole QEMU 7.2 migration stream (see the module docstring).

    Sections whose name is in ``decode`` (None: all) are decoded field by
    field; the others are walked by their described sizes only (their
    ``Section.fields`` is None), which is several times faster. ``only``
    narrows the decoded sections to those fields and subsections (e.g.
    :data:`VCPU_FIELDS`); the rest is walked by size, subsection names
    still checked. Raises MigrationStreamError (a TestbedError, one line)
    on any problem.
    """
    try:
        return _parse(data, decode, only)
    except MigrationStreamError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise MigrationStreamError(
            f"malformed VMDESCRIPTION or migration stream: {type(e).__name__}: {e}"
        ) from e


def _parse(
    data: bytes, decode: Collection[str] | None, only: Collection[str] | None
) -> MigrationStream:
    if len(data) < 8:
        raise MigrationStreamError(f"migration stream too short ({len(data)} bytes)")
    magic, version = struct.unpack(">II", data[:8])
    if magic != QEMU_VM_FILE_MAGIC:
        raise MigrationStreamError(
            f"not a QEMU migration stream: magic 0x{magic:08x}, expected 0x{QEMU_VM_FILE_MAGIC:08x}"
        )
    if version != QEMU_VM_FILE_VERSION:
        raise MigrationStreamError(f"migration stream version {version}, only 3 is handled")
    eof_at, desc = find_description(data)
    page_size = int(desc.get("page_size", 4096))
    if page_size <= 0 or page_size & (page_size - 1):
        raise MigrationStreamError(f"VMDESCRIPTION page_size {page_size} is not a power of two")
    devices: dict[tuple[str, int], Mapping[str, Any]] = {}
    for d in desc["devices"]:
        devices[(str(d.get("name")), int(d.get("instance_id", 0)))] = d

    r = _Reader(data, eof_at + 1)
    r.pos = 8
    machine = ""
    caps: list[str] = []
    ram: _RamState | None = None
    sections: list[Section] = []
    by_id: dict[int, tuple[str, int]] = {}
    while True:
        at = r.pos
        kind = r.u8("section type")
        if kind == QEMU_VM_EOF:
            break
        if kind == QEMU_VM_CONFIGURATION:
            machine, caps = _read_configuration(r)
        elif kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            sid = r.be32("section id")
            name = r.string8("section name")
            inst = r.be32("instance id")
            ver = r.be32("version id")
            by_id[sid] = (name, inst)
            if name == "ram":
                if ver != 4:
                    raise MigrationStreamError(f"RAM section version {ver} at 0x{at:x}; need 4")
                if ram is None:
                    ram = _RamState(page_size, "x-ignore-shared" in caps, [])
                _read_ram(r, ram)
                sections.append(Section(sid, name, inst, ver, at, None))
            else:
                d = devices.get((name, inst))
                if d is None:
                    raise MigrationStreamError(
                        f"section {name!r} instance {inst} at offset 0x{at:x} is not in the "
                        "VMDESCRIPTION"
                    )
                fields: dict[str, Any] | None = None
                if decode is None or name in decode:
                    fields = _read_vmsd(r, d, f"{name}[{inst}]", only)
                else:
                    _skip_vmsd(r, d, f"{name}[{inst}]")
                sections.append(Section(sid, name, inst, ver, at, fields))
        elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            sid = r.be32("section id")
            owner = by_id.get(sid)
            if owner is None or owner[0] != "ram" or ram is None:
                raise MigrationStreamError(
                    f"section part/end at offset 0x{at:x} for section id {sid} "
                    f"({owner[0] if owner else 'never started'}); only RAM is iterative here"
                )
            _read_ram(r, ram)
        elif kind == QEMU_VM_SECTION_FOOTER:
            sid = r.be32("section footer id")
            if sid not in by_id:
                raise MigrationStreamError(
                    f"section footer at offset 0x{at:x} names unknown section id {sid}"
                )
        elif kind == QEMU_VM_COMMAND:
            cmd = r.be16("command type")
            n = r.be16("command length")
            r.skip(n, f"data of command {cmd}")
        else:
            raise MigrationStreamError(
                f"unknown section type 0x{kind:02x} at offset 0x{at:x} (corrupt stream?)"
            )
    if r.pos != eof_at + 1:
        raise MigrationStreamError(
            f"QEMU_VM_EOF at offset 0x{r.pos - 1:x}, but the VMDESCRIPTION follows an EOF at "
            f"0x{eof_at:x} (corrupt stream?)"
        )
    cpus = (_vcpu(s) for s in sections if s.name == "cpu" and s.fields is not None)
    vcpus = tuple(sorted(cpus, key=lambda v: v.index))
    return MigrationStream(
        machine=machine,
        capabilities=tuple(caps),
        page_size=page_size,
        sections=tuple(sections),
        ram_blocks=tuple(ram.blocks if ram else ()),
        ram_pages=ram.pages if ram else 0,
        description=desc,
        vcpus=vcpus,
    )
