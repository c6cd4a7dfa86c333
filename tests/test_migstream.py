"""Migration-stream parser on streams recorded from QEMU 7.2 (tests/data/record_migstream.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from testbed.errors import TestbedError
from testbed.snapshot.cpustate import parse_info_registers
from testbed.snapshot.migstream import parse_migration_stream

DATA = Path(__file__).parent / "data"
VARIANTS = ["la57-amd", "l4-intel", "nopku"]
RAM = 128 << 20
DEFAULT_PKRU = 0x55555554  # Linux init_pkru_value with pkeys enabled


def load(variant: str) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    stream = gzip.decompress((DATA / f"migstream-{variant}.bin.gz").read_bytes())
    rec = json.loads((DATA / f"record-{variant}.json").read_text())
    return stream, rec


@pytest.mark.parametrize("variant", VARIANTS)
def test_recorded_stream(variant: str) -> None:
    stream, rec = load(variant)
    m = parse_migration_stream(stream)
    assert m.machine.startswith("pc-i440fx-")
    assert "x-ignore-shared" in m.capabilities
    mem = next(b for b in m.ram_blocks if b.name == "mem")
    assert (mem.length, mem.mr_addr) == (RAM, 0)
    # the shared RAM is not in the stream: only the ROM/BIOS blocks' pages are
    assert m.ram_pages * m.page_size < 2 << 20
    assert [v.index for v in m.vcpus] == [0, 1]

    runner = m.vcpu(rec["cpu"])
    other = m.vcpu(1 - rec["cpu"])
    pku = "pku" not in variant
    if pku:
        # the vCPU running the program holds the value it printed (read back by RDPKRU)
        assert runner.pkru_present and runner.pkru == rec["pkru"] == 0x5A5A5A54
        # the idle vCPU keeps the kernel's default, not the program's value
        assert other.pkru == DEFAULT_PKRU
    else:
        assert rec["pkru"] == 0
        assert not runner.pkru_present and runner.pkru == 0
        assert not other.pkru_present and other.pkru == 0

    for v in m.vcpus:
        assert v.cr0 & 0x8000_0001 == 0x8000_0001  # PG and PE
        assert v.efer & 0x500 == 0x500  # LME and LMA
        assert v.cr3 & 0xFFF == 0 and 0 < v.cr3 < RAM
        assert v.pke == pku
        assert v.la57 == (variant != "l4-intel")  # -cpu max has LA57; -la57 removes it
        assert v.paging_levels == (5 if v.la57 else 4)
    assert runner.cpl == 3 and 0x400000 <= runner.rip < 0x500000
    assert other.cpl == 0 and other.rip >= 0xFFFF_8000_0000_0000
    # PTI: the user-mode vCPU runs on the user root (kernel root | 0x1000)
    if rec["pti"]:
        assert runner.cr3 & 0x1000

    # agrees with HMP 'info registers' taken a moment later (same process spinning)
    hmp = parse_info_registers(rec["hmp_info_registers"][str(rec["cpu"])], rec["cpu"])
    assert (hmp.cr0, hmp.cr3, hmp.cr4, hmp.efer, hmp.cpl) == (
        runner.cr0, runner.cr3, runner.cr4, runner.efer, runner.cpl,
    )  # fmt: skip


def test_recorded_stream_all_sections() -> None:
    stream, _ = load("la57-amd")
    full = parse_migration_stream(stream, decode=None)
    fast = parse_migration_stream(stream)
    assert full.vcpus == fast.vcpus
    names = {s.name for s in full.sections}
    assert {"cpu", "apic", "ram", "serial", "globalstate"} <= names
    assert all(s.fields is not None for s in full.sections if s.name != "ram")
    assert all(s.fields is None for s in fast.sections if s.name not in ("cpu",))
    glob = next(s for s in full.sections if s.name == "globalstate")
    # the run state saved is the one at migration time: stopped for the snapshot
    assert glob.fields is not None and glob.fields["runstate"].rstrip(b"\0") == b"paused"


@pytest.mark.parametrize("cut", [0, 100, 1000, 50_000, 200_000, -5000, -1])
def test_recorded_stream_truncated(cut: int) -> None:
    stream, _ = load("la57-amd")
    with pytest.raises(TestbedError) as ei:
        parse_migration_stream(stream[:cut])
    assert "\n" not in str(ei.value)


def test_recorded_stream_corrupt_cpu_section() -> None:
    stream, _ = load("la57-amd")
    at = stream.index(b"\x08cpu/pkru")
    bad = stream[:at] + b"\x08cpu/pkrX" + stream[at + 9 :]
    with pytest.raises(TestbedError, match="cpu/pkrX"):
        parse_migration_stream(bad)
