"""Symbol sources: System.map text, ELF symbol tables, kallsyms tables built in the test."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from testbed.snapshot.symbols import (
    START_KERNEL_MAP,
    SymbolError,
    decode_kallsyms,
    decode_kallsyms_names,
    kallsyms_address,
    load_elf_symbols,
    parse_system_map,
)

MAP = """\
0000000000000000 A __per_cpu_start
000000000001f340 D cpu_tlbstate
ffffffff81000000 T _stext
ffffffff82a0c940 D init_task
ffffffff82a0c940 d init_task
ffffffff83010000 B page_offset_base
"""


def test_system_map_and_kaslr() -> None:
    t = parse_system_map(MAP)
    assert len(t) == 5 and not t.relocated
    assert t.address("init_task") == 0xFFFFFFFF82A0C940
    assert t.get("init_task").kind == "D"  # the global wins over the local
    assert t.runtime("init_task", 0x1BE00000) == 0xFFFFFFFF82A0C940 + 0x1BE00000
    # per-CPU symbols are offsets: KASLR does not move them
    assert t.runtime("cpu_tlbstate", 0x1BE00000) == 0x1F340
    with pytest.raises(SymbolError, match="not found"):
        t.address("nope")


def test_system_map_errors() -> None:
    with pytest.raises(SymbolError, match=":2: not an"):
        parse_system_map("ffffffff81000000 T _stext\ngarbage\n")
    with pytest.raises(SymbolError, match="bad address"):
        parse_system_map("zzzz T _stext\n")
    with pytest.raises(SymbolError, match="placeholder"):
        parse_system_map(
            "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n")


def build_kallsyms(entries: list[tuple[str, int]], base: int) -> dict[str, bytes]:
    """Tables as scripts/kallsyms emits them: tokens = single characters plus one pair."""
    tokens = [bytes([i]) if i >= 0x20 else b"" for i in range(256)]
    tokens[1] = b"ini"  # a multi-character token
    tokens[2] = b"t_"
    table = b""
    index = []
    for t in tokens:
        index.append(len(table))
        table += t + b"\0"
    names = bytearray()
    for name, _ in entries:
        enc = name.encode().replace(b"ini", b"\x01").replace(b"t_", b"\x02")
        if len(enc) > 127:  # "big symbol" length (Linux 6.1+)
            names += bytes([0x80 | (len(enc) & 0x7F), len(enc) >> 7])
        else:
            names.append(len(enc))
        names += enc
    offsets = []
    for _, addr in entries:
        if addr < START_KERNEL_MAP:
            offsets.append(addr)  # absolute per-CPU value
        else:
            offsets.append(base - 1 - addr)
    return {
        "names": bytes(names),
        "token_table": table,
        "token_index": struct.pack("<256H", *index),
        "num": struct.pack("<I", len(entries)),
        "offsets": struct.pack(f"<{len(entries)}i", *offsets),
        "base": struct.pack("<Q", base),
    }


def test_kallsyms_decode_from_memory() -> None:
    base = 0xFFFFFFFF9CE00000
    entries = [("Tinit_task", base + 0x1C0C940), ("Dcpu_tlbstate", 0x1F340),
               ("T_stext", base), ("t" + "x" * 200, base + 0x10)]
    tabs = build_kallsyms(entries, base)
    where = {"kallsyms_names": 0x1000_0000, "kallsyms_token_table": 0x1000_4000,
             "kallsyms_token_index": 0x2000_0000, "kallsyms_num_syms": 0x3000_0000,
             "kallsyms_offsets": 0x4000_0000, "kallsyms_relative_base": 0x5000_0000}
    blobs = {where["kallsyms_names"]: tabs["names"],
             where["kallsyms_token_table"]: tabs["token_table"],
             where["kallsyms_token_index"]: tabs["token_index"],
             where["kallsyms_num_syms"]: tabs["num"],
             where["kallsyms_offsets"]: tabs["offsets"],
             where["kallsyms_relative_base"]: tabs["base"]}

    def read(addr: int, n: int) -> bytes:
        for start, blob in blobs.items():
            if start <= addr < start + len(blob) + 0x4000 and (start, addr) != (
                    where["kallsyms_names"], where["kallsyms_token_table"]):
                data = blob + bytes(0x4000)
                return data[addr - start : addr - start + n]
        raise AssertionError(hex(addr))

    t = decode_kallsyms(read, where)
    assert t.relocated
    assert t.address("init_task") == base + 0x1C0C940
    assert t.get("init_task").kind == "T"
    assert t.address("cpu_tlbstate") == 0x1F340
    assert t.address("x" * 200) == base + 0x10
    assert t.runtime("init_task", 0x1234) == base + 0x1C0C940  # already runtime
    assert len(t) == 4 and "_stext" in t


def test_kallsyms_errors() -> None:
    with pytest.raises(SymbolError, match="6.0"):
        decode_kallsyms(lambda a, n: b"", {"kallsyms_names": 1})
    with pytest.raises(SymbolError, match="256"):
        decode_kallsyms_names(b"", 1, b"", [0] * 10)
    with pytest.raises(SymbolError, match="ends after 0"):
        decode_kallsyms_names(b"", 1, b"a\0", [0] * 256)
    assert kallsyms_address(5, 100) == 5
    assert kallsyms_address(-1, 100) == 100
    assert kallsyms_address(16, 100, absolute_percpu=False) == 116


def test_elf_symbols_of_a_vmlinux_when_available() -> None:
    from testbed import paths

    vmlinuxes = sorted((paths.cache_dir() / "kernels").glob("*/vmlinux"))
    if not vmlinuxes:
        pytest.skip("no built kernel in the cache (testbed kernel build)")
    t = load_elf_symbols(vmlinuxes[0])
    assert not t.relocated
    assert t.address("init_task") >= START_KERNEL_MAP
    assert t.get("init_task").kind in "Dd"
    assert t.address("linux_banner") >= START_KERNEL_MAP


def test_elf_without_symtab_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "x"
    bad.write_bytes(b"not an elf")
    with pytest.raises(SymbolError):
        load_elf_symbols(bad)
