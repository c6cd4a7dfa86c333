"""Guest-physical memory sources on synthetic data (no VM)."""

from __future__ import annotations

import random
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from testbed.errors import TestbedError
from testbed.snapshot import physmem
from testbed.snapshot.physmem import (
    ElfDumpMemory,
    PhysMem,
    PhysMemError,
    PmemsaveMemory,
    SharedFileMemory,
)

GiB = 1 << 30


def pattern(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def test_pc_layout() -> None:
    assert physmem.pc_lowmem(512 << 20) == 512 << 20
    assert physmem.pc_lowmem(4 * GiB) == 3 * GiB
    assert physmem.pc_lowmem(0xDFFF_F000) == 0xDFFF_F000
    assert physmem.pc_lowmem(4 * GiB, "pc-q35-7.2") == 2 * GiB
    assert physmem.pc_ram_ranges(4 * GiB) == [(0, 3 * GiB, 0), (4 * GiB, 5 * GiB, 3 * GiB)]
    assert physmem.pc_ram_ranges(1 * GiB) == [(0, GiB, 0)]


def test_shared_file(tmp_path: Path) -> None:
    data = pattern(0x10000)
    f = tmp_path / "ram"
    f.write_bytes(data)
    with SharedFileMemory(f) as m:
        assert isinstance(m, PhysMem)
        assert m.size == 0x10000 and m.ranges == [(0, 0x10000)]
        assert m.read(0x1234, 100) == data[0x1234 : 0x1234 + 100]
        assert m.read(0xF000, 0x1000) == data[0xF000:]
        for bad in ((0xF001, 0x1000), (0x10000, 1), (-1, 4), (1 << 40, 8)):
            with pytest.raises(PhysMemError) as ei:
                m.read(*bad)
            assert "outside RAM" in str(ei.value) or "bad" in str(ei.value)
            assert "\n" not in str(ei.value)
    # RAM above the 4 GiB hole
    with SharedFileMemory(f, lowmem=0x4000) as m:
        assert m.ranges == [(0, 0x4000), (4 * GiB, 4 * GiB + 0xC000)]
        assert m.size == 4 * GiB + 0xC000
        assert m.read(4 * GiB + 0x10, 16) == data[0x4010:0x4020]
        assert m.read(0x3FF0, 16) == data[0x3FF0:0x4000]
        with pytest.raises(PhysMemError, match="0x3ff0"):
            m.read(0x3FF0, 32)  # runs into the hole
        with pytest.raises(PhysMemError, match="0x5000"):
            m.read(0x5000, 8)  # in the hole
    with pytest.raises(PhysMemError, match="cannot open"):
        SharedFileMemory(tmp_path / "missing")


def build_elf(segments: list[tuple[int, int, bytes]]) -> bytes:
    """A minimal ELF64 core: PT_LOAD segments (paddr, memsz, file bytes)."""
    ehsize, phentsize = 64, 56
    phoff = ehsize
    data_off = phoff + phentsize * len(segments)
    phdrs = b""
    blob = b""
    for paddr, memsz, filebytes in segments:
        off = data_off + len(blob)
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, 6, off, 0xFFFF_8880_0000_0000 + paddr, paddr, len(filebytes),
            memsz, 0,
        )  # fmt: skip
        blob += filebytes
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    hdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, ehsize, phentsize, len(segments), 64, 0, 0
    )
    return hdr + phdrs + blob


def test_elf_dump(tmp_path: Path) -> None:
    low = pattern(0x2000, 1)
    mid = pattern(0x1000, 2)
    high = pattern(0x1000, 3)
    f = tmp_path / "dump.elf"
    # [0, 0x3000) with only 0x2000 in the file, [0x3000, 0x4000) adjacent, [1 MiB, +4K)
    f.write_bytes(build_elf([(0x3000, 0x1000, mid), (0, 0x3000, low), (0x100000, 0x1000, high)]))
    with ElfDumpMemory(f) as m:
        assert m.ranges == [(0, 0x3000), (0x3000, 0x4000), (0x100000, 0x101000)]
        assert m.size == 0x101000
        assert m.read(0x10, 32) == low[0x10:0x30]
        assert m.read(0x2000, 0x1000) == bytes(0x1000)  # memsz beyond filesz
        assert m.read(0x1FF0, 0x20) == low[0x1FF0:] + bytes(0x10)
        assert m.read(0x2FF0, 0x20) == bytes(0x10) + mid[:0x10]  # across adjacent segments
        assert m.read(0x100800, 16) == high[0x800:0x810]
        with pytest.raises(PhysMemError, match="0x4000"):
            m.read(0x4000, 1)
        with pytest.raises(PhysMemError):
            m.read(0x100FF8, 16)
    # truncated file: a clear error at open
    t = tmp_path / "trunc.elf"
    t.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PhysMemError, match="truncated"):
        ElfDumpMemory(t)
    n = tmp_path / "not.elf"
    n.write_bytes(b"hello world" * 10)
    with pytest.raises(PhysMemError, match="not a readable ELF"):
        ElfDumpMemory(n)


class FakeQmpRun:
    def __init__(self, ram: bytes) -> None:
        self.ram = ram
        self.calls: list[str] = []

    def __call__(self, cmd: str, args: Mapping[str, Any]) -> Any:
        self.calls.append(cmd)
        if cmd == "query-memory-size-summary":
            return {"base-memory": len(self.ram)}
        if cmd == "pmemsave":
            a, n = args["val"], args["size"]
            Path(args["filename"]).write_bytes(self.ram[a : a + n])
            return {}
        raise AssertionError(cmd)


def test_pmemsave(tmp_path: Path) -> None:
    ram = pattern(0x8000, 5)
    run = FakeQmpRun(ram)
    m = PmemsaveMemory(run, tmpdir=tmp_path)
    assert isinstance(m, PhysMem)
    assert m.size == 0x8000
    assert m.read(0x7000, 0x1000) == ram[0x7000:]
    assert run.calls == ["query-memory-size-summary", "pmemsave"]
    with pytest.raises(TestbedError, match="outside RAM"):
        m.read(0x7800, 0x1000)
    assert run.calls.count("pmemsave") == 1  # refused before asking QEMU
    assert list(tmp_path.iterdir()) == []  # temp files removed
