"""Kernel symbols: System.map text, a vmlinux ELF symbol table, or kallsyms in guest memory.

All three give a :class:`SymbolTable` (name -> address and nm type letter).
Tables from System.map and the ELF hold *link-time* addresses
(``relocated=False``): add the KASLR offset to every kernel-image symbol
(:meth:`SymbolTable.runtime`); per-CPU symbols (offsets into
``.data..percpu``, below ``__START_KERNEL_map``) and other absolute values
stay as they are. Tables decoded from kallsyms in guest memory already hold
runtime addresses (``relocated=True``).

kallsyms is how a kernel without System.map (Debian ships it only in the
-dbg package) still has symbols: VMCOREINFO names the tables
(``SYMBOL(kallsyms_names)`` ... since Linux 6.0) and :func:`decode_kallsyms`
decodes them, purely, from their bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from testbed.errors import TestbedError

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
"""x86-64 ``__START_KERNEL_map``: kernel-image virtual addresses start here."""


class SymbolError(TestbedError):
    """A symbol that is not there, or a symbol source that cannot be read."""


class Symbol(NamedTuple):
    name: str
    address: int
    kind: str = "?"
    """nm type letter (T text, D data, B bss, R rodata, A absolute...; lowercase = local)."""


@dataclass(frozen=True)
class SymbolTable:
    """Symbols by name (the first one wins on duplicate local names)."""

    symbols: Mapping[str, Symbol] = field(repr=False)
    relocated: bool
    """True when addresses are runtime ones (KASLR applied), False for link-time."""
    source: str = ""

    def __contains__(self, name: object) -> bool:
        return name in self.symbols

    def __len__(self) -> int:
        return len(self.symbols)

    def get(self, name: str) -> Symbol | None:
        return self.symbols.get(name)

    def address(self, name: str) -> int:
        """The table's address of ``name`` (link-time or runtime as the table is)."""
        s = self.symbols.get(name)
        if s is None:
            raise SymbolError(f"symbol {name!r} not found in {self.source or 'the symbol table'}")
        return s.address

    def runtime(self, name: str, kaslr_offset: int) -> int:
        """Runtime address of ``name`` given the KASLR (virtual) offset."""
        addr = self.address(name)
        if self.relocated or not is_image_address(addr):
            return addr
        return addr + kaslr_offset


def is_image_address(addr: int) -> bool:
    """True for an address in the kernel image mapping (what KASLR moves)."""
    return addr >= START_KERNEL_MAP


def _table(entries: Iterable[tuple[str, int, str]], relocated: bool, source: str) -> SymbolTable:
    out: dict[str, Symbol] = {}
    for e in entries:
        name = e[0]
        old = out.get(name)
        if old is None or (old.kind.islower() and e[2].isupper()):
            out[name] = Symbol._make(e)
    return SymbolTable(out, relocated, source)


def parse_system_map(text: str, source: str = "System.map") -> SymbolTable:
    """Parse ``nm``-style lines ``ADDRESS TYPE NAME`` (System.map, ``nm vmlinux``)."""
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3 or len(parts[1]) != 1:
            raise SymbolError(f"{source}:{n}: not an 'ADDRESS TYPE NAME' line: {line[:80]!r}")
        try:
            addr = int(parts[0], 16)
        except ValueError:
            raise SymbolError(f"{source}:{n}: bad address {parts[0]!r}") from None
        entries.append((parts[2], addr, parts[1]))
    table = _table(entries, False, source)
    if len(table) < 2 and "B The real System.map" in text:
        raise SymbolError(
            f"{source} is a placeholder (Debian ships the real one in linux-image-*-dbg); "
            "use the kernel's kallsyms through VMCOREINFO instead"
        )
    return table


def load_system_map(path: str | Path) -> SymbolTable:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        raise SymbolError(f"cannot read System.map {path}: {e.strerror}") from e
    return parse_system_map(text, str(path))


def _elf_letter(sym: object, sections: list[str]) -> str:
    from elftools.elf.sections import Symbol as ElfSym

    assert isinstance(sym, ElfSym)
    bind = sym["st_info"]["bind"]
    shndx = sym["st_shndx"]
    if shndx == "SHN_ABS":
        letter = "a"
    elif shndx == "SHN_UNDEF":
        return "U"
    else:
        sec = sections[shndx] if isinstance(shndx, int) and shndx < len(sections) else ""
        if sec.startswith((".text", ".init.text", ".exit.text", ".noinstr", ".entry")):
            letter = "t"
        elif sec.startswith((".bss", ".brk")):
            letter = "b"
        elif sec.startswith((".rodata", "__ksymtab", ".BTF", ".notes")):
            letter = "r"
        else:
            letter = "d"
    return letter.upper() if bind in ("STB_GLOBAL", "STB_WEAK") else letter


def load_elf_symbols(path: str | Path) -> SymbolTable:
    """The ``.symtab`` of a vmlinux ELF (pyelftools); link-time addresses."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            sections = [s.name for s in elf.iter_sections()]
            symtab = elf.get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                raise SymbolError(f"{path} has no .symtab (stripped); pass its System.map")
            entries = [
                (s.name, s["st_value"], _elf_letter(s, sections))
                for s in symtab.iter_symbols()
                if s.name and s["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE")
                and s["st_shndx"] != "SHN_UNDEF"
            ]
    except (ELFError, OSError) as e:
        raise SymbolError(f"cannot read symbols of {path}: {e}") from e
    return _table(entries, False, str(path))


# ---------------------------------------------------------------------------
# kallsyms
# ---------------------------------------------------------------------------

KALLSYMS_TABLES = (
    "kallsyms_names", "kallsyms_num_syms", "kallsyms_token_table", "kallsyms_token_index",
)

ReadVirt = Callable[[int, int], bytes]
_NAMES_MEMO: dict[bytes, list[str]] = {}
"""Decoded kallsyms names by digest of their tables: a second attach to the same build is fast."""


def decode_kallsyms_names(names: bytes, count: int, token_table: bytes,
                          token_index: Iterable[int]) -> list[str]:
    """Expand ``count`` compressed names (type letter first) from ``kallsyms_names``.

    Each entry is a length (one byte, or two when the first has bit 7 set,
    Linux 6.1+ "big symbols") followed by that many token indices.
    """
    idx = list(token_index)
    if len(idx) != 256:
        raise SymbolError(f"kallsyms_token_index has {len(idx)} entries, not 256")
    tokens: list[bytes] = []
    for off in idx:
        end = token_table.find(b"\0", off)
        if off >= len(token_table) or end < 0:
            raise SymbolError(f"kallsyms token at {off} is outside the token table")
        tokens.append(token_table[off:end])
    out: list[bytes] = []
    pos = 0
    n = len(names)
    tok = tokens.__getitem__
    join = b"".join
    for i in range(count):
        if pos >= n:
            raise SymbolError(f"kallsyms_names ends after {i} of {count} symbols")
        length = names[pos]
        pos += 1
        if length & 0x80:
            length = (length & 0x7F) | (names[pos] << 7)
            pos += 1
        if pos + length > n:
            raise SymbolError(f"kallsyms_names: symbol {i} runs past the table")
        out.append(join(map(tok, names[pos : pos + length])))
        pos += length
    return b"\n".join(out).decode("latin-1").split("\n") if out else []


def kallsyms_address(offset: int, relative_base: int, absolute_percpu: bool = True) -> int:
    """Address of one symbol from ``kallsyms_offsets`` (CONFIG_KALLSYMS_BASE_RELATIVE).

    With CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP) a non-negative offset
    is an absolute value (per-CPU symbols) and a negative one is
    ``relative_base - 1 - offset``.
    """
    if not absolute_percpu:
        return (relative_base + (offset & 0xFFFF_FFFF)) & 0xFFFF_FFFF_FFFF_FFFF
    if offset >= 0:
        return offset
    return (relative_base - 1 - offset) & 0xFFFF_FFFF_FFFF_FFFF


def decode_kallsyms(read: ReadVirt, syms: Mapping[str, int], *,
                    absolute_percpu: bool = True, max_names_bytes: int = 8 << 20) -> SymbolTable:
    """Decode the kernel's kallsyms through ``read(vaddr, n)`` (kernel virtual reads).

    ``syms`` holds the runtime addresses of the tables, as VMCOREINFO gives
    them: kallsyms_names, kallsyms_num_syms, kallsyms_token_table,
    kallsyms_token_index, and kallsyms_offsets + kallsyms_relative_base (or
    kallsyms_addresses).
    """
    missing = [t for t in KALLSYMS_TABLES if t not in syms]
    if missing or not ("kallsyms_addresses" in syms or
                       {"kallsyms_offsets", "kallsyms_relative_base"} <= set(syms)):
        raise SymbolError(
            "VMCOREINFO does not locate kallsyms (needs Linux >= 6.0 with CONFIG_KALLSYMS; "
            f"missing {', '.join(missing) or 'kallsyms_offsets'})"
        )
    (count,) = struct.unpack("<I", read(syms["kallsyms_num_syms"], 4))
    if not 0 < count < 2_000_000:
        raise SymbolError(f"kallsyms_num_syms reads {count}: not a kallsyms table")
    token_index = struct.unpack("<256H", read(syms["kallsyms_token_index"], 512))
    tt_len = max(token_index) + 256
    token_table = read(syms["kallsyms_token_table"], tt_len)
    # names: read in growing chunks until count names fit
    names_addr = syms["kallsyms_names"]
    size = min(max_names_bytes, count * 12)
    gap = syms["kallsyms_token_table"] - names_addr  # names, markers, then tokens (<= 6.1)
    if 0 < gap <= max_names_bytes:
        size = gap
    while True:
        names = _read_upto(read, names_addr, size)
        key = hashlib.sha1(names + token_table + bytes(str(count), "ascii")).digest()
        cached = _NAMES_MEMO.get(key)
        if cached is not None:
            decoded = cached
            break
        try:
            decoded = decode_kallsyms_names(names, count, token_table, token_index)
            _NAMES_MEMO[key] = decoded
            break
        except SymbolError:
            if size >= max_names_bytes or len(names) < size:
                raise
            size = min(max_names_bytes, size * 2)
    if "kallsyms_addresses" in syms:
        raw = struct.unpack(f"<{count}Q", read(syms["kallsyms_addresses"], 8 * count))
        base, absolute = None, False
    else:
        (base,) = struct.unpack("<Q", read(syms["kallsyms_relative_base"], 8))
        raw = struct.unpack(f"<{count}i", read(syms["kallsyms_offsets"], 4 * count))
        absolute = absolute_percpu
    return SymbolTable(_KallsymsMap(decoded, raw, base, absolute), True,
                       "kallsyms in guest memory")


class _KallsymsMap(Mapping[str, Symbol]):
    """Decoded kallsyms, turned into :class:`Symbol` only when looked up."""

    def __init__(self, names: list[str], raw: Sequence[int], base: int | None,
                 absolute_percpu: bool) -> None:
        """``names`` with their type letter first, as kallsyms stores them."""
        self._names = names
        self._raw = raw
        self._base = base
        self._absolute = absolute_percpu
        n = len(names)
        # the first of equal names wins (dict keeps the last value: feed them reversed)
        self._index = dict(zip([s[1:] for s in reversed(names)], range(n - 1, -1, -1),
                               strict=True))

    def __getitem__(self, name: str) -> Symbol:
        i = self._index[name]
        full = self._names[i]
        v = self._raw[i]
        addr = v if self._base is None else kallsyms_address(v, self._base, self._absolute)
        return Symbol(full[1:], addr, full[:1] or "?")

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def _read_upto(read: ReadVirt, addr: int, size: int) -> bytes:
    """Read ``size`` bytes, or as many whole pages as can be read."""
    try:
        return read(addr, size)
    except TestbedError:
        out = bytearray()
        page = 4096
        pos = addr
        while len(out) < size:
            n = min(page - (pos % page), size - len(out))
            try:
                out += read(pos, n)
            except TestbedError:
                break
            pos += n
        return bytes(out)
