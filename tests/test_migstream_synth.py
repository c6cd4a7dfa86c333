"""Build small synthetic QEMU migration streams for the parser tests."""

from __future__ import annotations

import json
import struct
from typing import Any

CPU_FIELDS: list[dict[str, Any]] = [
    {"name": "env.regs", "array_len": 16, "type": "uint64", "size": 8},
    {"name": "env.eip", "type": "uint64", "size": 8},
    {"name": "env.hflags", "type": "uint32", "size": 4},
    {
        "name": "env.segs",
        "array_len": 2,
        "type": "struct",
        "struct": {
            "vmsd_name": "segment",
            "version": 1,
            "fields": [
                {"name": "selector", "type": "uint32", "size": 4},
                {"name": "base", "type": "uint64", "size": 8},
            ],
        },
        "size": 12,
    },
    {"name": "env.cr[0]", "type": "uint64", "size": 8},
    {"name": "env.cr[2]", "type": "uint64", "size": 8},
    {"name": "env.cr[3]", "type": "uint64", "size": 8},
    {"name": "env.cr[4]", "type": "uint64", "size": 8},
    {"name": "env.a20_mask", "type": "int32", "size": 4},
    {"name": "env.le", "type": "int32 le", "size": 4},
    {"name": "env.flag", "type": "bool", "size": 1},
    {"name": "env.blob", "type": "buffer", "size": 3},
    {"name": "env.efer", "type": "uint64", "size": 8},
]
PKRU_SUB = {
    "vmsd_name": "cpu/pkru",
    "version": 1,
    "fields": [{"name": "env.pkru", "type": "uint32", "size": 4}],
}


def s8(s: str) -> bytes:
    b = s.encode()
    return bytes([len(b)]) + b


def cpu_body(cpu: dict[str, int], pkru: int | None) -> bytes:
    out = b"".join(struct.pack(">Q", cpu.get(f"r{i}", i)) for i in range(16))
    out += struct.pack(">QI", cpu["rip"], cpu["hflags"])
    out += struct.pack(">IQ", 0x10, 0) + struct.pack(">IQ", 0x18, 0xFFFF_0000)
    out += struct.pack(">QQQQ", cpu["cr0"], cpu["cr2"], cpu["cr3"], cpu["cr4"])
    out += struct.pack(">i", -1) + struct.pack("<i", 0x1234) + b"\x01" + b"abc"
    out += struct.pack(">Q", cpu["efer"])
    if pkru is not None:
        out += b"\x05" + s8("cpu/pkru") + struct.pack(">I", 1) + struct.pack(">I", pkru)
    return out


def build_stream(cpus: list[tuple[dict[str, int], int | None]], *, footers: bool = True) -> bytes:
    """A stream with configuration, an iterative RAM section and one 'cpu' section per
    entry of ``cpus`` ((registers, pkru or None for no subsection))."""
    page = 4096
    out = bytearray(struct.pack(">II", 0x5145564D, 3))
    out += b"\x07" + struct.pack(">I", 13) + b"pc-i440fx-7.2"
    out += b"\x05" + s8("configuration/capabilities") + struct.pack(">I", 1)
    out += struct.pack(">I", 1) + s8("x-ignore-shared")

    def footer(sid: int) -> None:
        if footers:
            out.extend(b"\x7e" + struct.pack(">I", sid))

    # RAM: start (block list), part (one page + one zero page), end (nothing)
    out += b"\x01" + struct.pack(">I", 2) + s8("ram") + struct.pack(">II", 0, 4)
    out += struct.pack(">Q", (0x200000 + 0x1000) | 0x04)
    out += s8("mem") + struct.pack(">QQ", 0x200000, 0)
    out += s8("pc.rom") + struct.pack(">QQ", 0x1000, 0xC0000)
    out += struct.pack(">Q", 0x10)
    footer(2)
    out += b"\x02" + struct.pack(">I", 2)
    out += struct.pack(">Q", 0x0 | 0x08) + s8("pc.rom") + bytes(range(256)) * (page // 256)
    out += struct.pack(">Q", 0x0 | 0x02 | 0x20) + b"\x00"
    out += struct.pack(">Q", 0x10)
    footer(2)
    devices = []
    sid = 3
    for inst, (cpu, pkru) in enumerate(cpus):
        out += b"\x04" + struct.pack(">I", sid) + s8("cpu") + struct.pack(">II", inst, 12)
        out += cpu_body(cpu, pkru)
        footer(sid)
        dev: dict[str, Any] = {
            "name": "cpu",
            "instance_id": inst,
            "vmsd_name": "cpu",
            "version": 12,
            "fields": CPU_FIELDS,
        }
        if pkru is not None:
            dev["subsections"] = [PKRU_SUB]
        devices.append(dev)
        sid += 1
    out += b"\x03" + struct.pack(">I", 2) + struct.pack(">Q", 0x10)
    footer(2)
    out += b"\x00"
    desc = json.dumps({"page_size": page, "devices": devices}).encode()
    out += b"\x06" + struct.pack(">I", len(desc)) + desc
    return bytes(out)


CPU0 = {"rip": 0xFFFF_FFFF_8100_0000, "hflags": 0x0040_0000, "cr0": 0x8005_0033,
        "cr2": 0, "cr3": 0x2A0C000, "cr4": 0x751EF0, "efer": 0xD01}  # fmt: skip
CPU1 = {"rip": 0x40_1000, "hflags": 0x0040_0003, "cr0": 0x8005_0033,
        "cr2": 0x1234, "cr3": 0x4878000, "cr4": 0x750EE0, "efer": 0xD01}  # fmt: skip


# ---------------------------------------------------------------------------
# Tests of the parser on the synthetic streams (no VM)
# ---------------------------------------------------------------------------

import time  # noqa: E402

import pytest  # noqa: E402

from testbed.errors import TestbedError  # noqa: E402
from testbed.snapshot.migstream import (  # noqa: E402
    MigrationStreamError,
    find_description,
    parse_migration_stream,
)


@pytest.mark.parametrize("footers", [True, False])
def test_synthetic_stream_parses(footers: bool) -> None:
    data = build_stream([(CPU0, None), (CPU1, 0x5A5A5A54)], footers=footers)
    m = parse_migration_stream(data)
    assert m.machine == "pc-i440fx-7.2"
    assert m.capabilities == ("x-ignore-shared",)
    assert [(b.name, b.length, b.mr_addr) for b in m.ram_blocks] == [
        ("mem", 0x200000, 0),
        ("pc.rom", 0x1000, 0xC0000),
    ]
    assert m.ram_pages == 2
    assert [s.name for s in m.sections] == ["ram", "cpu", "cpu"]
    v0, v1 = m.vcpus
    assert (v0.index, v0.pkru, v0.pkru_present) == (0, 0, False)
    assert (v1.index, v1.pkru, v1.pkru_present) == (1, 0x5A5A5A54, True)
    for v, want in ((v0, CPU0), (v1, CPU1)):
        assert (v.rip, v.cr0, v.cr2, v.cr3, v.cr4, v.efer) == (
            want["rip"], want["cr0"], want["cr2"], want["cr3"], want["cr4"], want["efer"],
        )  # fmt: skip
    assert v0.cpl == 0 and v1.cpl == 3 and v1.rsp == 4
    assert v0.fields["env.a20_mask"] == -1
    assert v0.fields["env.le"] == 0x1234
    assert v0.fields["env.flag"] is True and v0.fields["env.blob"] == b"abc"
    assert v0.fields["env.segs"][1] == {"selector": 0x18, "base": 0xFFFF_0000}
    assert m.vcpu(1) is v1
    with pytest.raises(MigrationStreamError):
        m.vcpu(7)


def test_every_truncation_is_one_clear_error() -> None:
    data = build_stream([(CPU0, 0x55555554), (CPU1, None)])
    t0 = time.monotonic()
    for cut in range(len(data)):
        with pytest.raises(TestbedError) as ei:
            parse_migration_stream(data[:cut])
        assert "\n" not in str(ei.value)
    assert time.monotonic() - t0 < 30


def _corrupt(data: bytes, old: bytes, new: bytes, nth: int = 0) -> bytes:
    pos = -1
    for _ in range(nth + 1):
        pos = data.index(old, pos + 1)
    return data[:pos] + new + data[pos + len(old) :]


def test_corrupt_streams() -> None:
    good = build_stream([(CPU0, None), (CPU1, 0x1)])
    cases = {
        "magic": (good.replace(b"QEVM", b"QEVX", 1), "magic"),
        "version": (good[:4] + b"\0\0\0\x04" + good[8:], "version 4"),
        # the cpu/pkru subsection renamed: the description wants cpu/pkru
        "subsection": (_corrupt(good, b"\x08cpu/pkru", b"\x08cpu/xxxx"), "cpu/xxxx"),
        # a section whose name the description does not know
        "unknown device": (_corrupt(good, b"\x03cpu", b"\x03cpx"), "not in the VMDESCRIPTION"),
        # section type byte of the first cpu section
        "section type": (
            _corrupt(good, b"\x04\x00\x00\x00\x03", b"\x09\x00\x00\x00\x03"),
            "unknown section type 0x09",
        ),  # fmt: skip
        # RAM header with an unknown flag
        "ram flags": (
            _corrupt(good, b"\x00\x00\x00\x00\x00\x00\x00\x10", b"\0" * 7 + b"\x11"),
            "unknown RAM flags",
        ),  # fmt: skip
        # XBZRLE page
        "xbzrle": (
            _corrupt(good, b"\x00\x00\x00\x00\x00\x00\x00\x08", b"\0" * 7 + b"\x40"),
            "XBZRLE",
        ),  # fmt: skip
        # JSON damaged
        "json": (good[:-3] + b"}}}", "JSON"),
        # description removed entirely
        "no description": (good[: good.rindex(b"\x06")], "VMDESCRIPTION"),
    }
    for name, (data, needle) in cases.items():
        with pytest.raises(MigrationStreamError) as ei:
            parse_migration_stream(data)
        msg = str(ei.value)
        assert needle in msg, (name, msg)
        assert "\n" not in msg


def test_struct_size_mismatch_is_detected() -> None:
    data = build_stream([(CPU0, None)])
    bad = data.replace(b'"size": 12', b'"size": 13')  # same length: prefix still right
    with pytest.raises(MigrationStreamError, match="took 12 bytes, the description says 13"):
        parse_migration_stream(bad)


def test_random_garbage_never_hangs() -> None:
    import random

    rng = random.Random(1234)
    data = bytearray(build_stream([(CPU0, 0x5), (CPU1, None)]))
    for _ in range(300):
        d = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(8, len(d) - 300)] = rng.randrange(256)
        try:
            parse_migration_stream(bytes(d))
        except TestbedError as e:
            assert "\n" not in str(e)


def test_skipping_sections_by_size() -> None:
    good = build_stream([(CPU0, 0x7), (CPU1, None)])
    m = parse_migration_stream(good, decode=())
    assert m.vcpus == () and [s.fields for s in m.sections] == [None, None, None]
    full = parse_migration_stream(good, decode=None)
    assert full.vcpus == parse_migration_stream(good).vcpus
    bad = _corrupt(good, b"\x08cpu/pkru", b"\x08cpu/pkrX")
    with pytest.raises(MigrationStreamError, match="cpu/pkrX"):
        parse_migration_stream(bad, decode=())
    # the middle cut out, the EOF + description kept: the walk runs into the end
    eof_at, _ = find_description(good)
    with pytest.raises(MigrationStreamError, match="truncated|unknown|expected"):
        parse_migration_stream(good[:200] + good[eof_at:], decode=())
