"""Kernel objects from recorded guest pages (Debian 6.1, 5-level and 4-level+PTI), no VM.

The data in tests/data/kernel-objects/ was recorded from paused guests with
record.py there: the guest pages the view read, the BTF subset it needs, the
VMCOREINFO text, and what /proc and QEMU said about a `sleep` process.
"""

from __future__ import annotations

import json
import lzma
import re
import struct
from pathlib import Path

import pytest

from testbed.snapshot.btf import Btf
from testbed.snapshot.kernel import (
    DEFAULT_PKRU,
    KernelView,
    KernelViewError,
    _state_char,
)
from testbed.snapshot.kernel_image import KernelImage, bzimage_payload, decompress_payload
from testbed.snapshot.pagetable import PageTableWalker
from testbed.snapshot.physmem import PhysMemError
from testbed.snapshot.symbols import START_KERNEL_MAP, Symbol, SymbolTable
from testbed.snapshot.vmcoreinfo import (
    VmcoreinfoError,
    find_banner,
    find_vmcoreinfo,
    parse_note,
    parse_vmcoreinfo,
    scan_vmcoreinfo,
)

DATA = Path(__file__).parent / "data" / "kernel-objects"
CASES = ["debian-6.1-l5", "debian-6.1-l4-pti"]


class RecordedMemory:
    """Guest pages from a recording; reading any other page is an error."""

    def __init__(self, pages: dict[int, bytes], size: int) -> None:
        self.pages = pages
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(0, self._size)]

    def read(self, phys: int, length: int) -> bytes:
        out = bytearray()
        pos = phys
        while len(out) < length:
            page = self.pages.get(pos & ~0xFFF)
            if page is None:
                raise PhysMemError(f"page {pos & ~0xFFF:#x} was not recorded")
            n = min(4096 - (pos & 0xFFF), length - len(out))
            out += page[pos & 0xFFF : (pos & 0xFFF) + n]
            pos += n
        return bytes(out)


def load_case(name: str) -> tuple[dict, RecordedMemory]:
    meta = json.loads((DATA / f"{name}.json").read_text())
    raw = lzma.decompress((DATA / f"{name}.pages.xz").read_bytes())
    pages = {}
    for off in range(0, len(raw), 8 + 4096):
        (phys,) = struct.unpack_from("<Q", raw, off)
        pages[phys] = raw[off + 8 : off + 8 + 4096]
    return meta, RecordedMemory(pages, meta["ram_size"])


@pytest.fixture(scope="module")
def btf_blob() -> bytes:
    return lzma.decompress((DATA / "debian-6.1-btf-subset.btf.xz").read_bytes())


def attach(name: str, btf_blob: bytes) -> tuple[dict, KernelView]:
    meta, mem = load_case(name)
    syms = SymbolTable({n: Symbol(n, int(a, 16), "D") for n, a in meta["symbols"].items()},
                       True, "recorded")
    kv = KernelView.attach(mem, KernelImage(btf_blob=btf_blob),
                           vmcoreinfo=parse_vmcoreinfo(meta["vmcoreinfo"]), symbols=syms)
    return meta, kv


@pytest.mark.parametrize("case", CASES)
def test_layout_comes_from_vmcoreinfo(case: str, btf_blob: bytes) -> None:
    meta, kv = attach(case, btf_blob)
    info = parse_vmcoreinfo(meta["vmcoreinfo"])
    assert kv.layout.source == "vmcoreinfo"
    assert kv.layout.kaslr_offset == info.kernel_offset != 0
    assert kv.layout.phys_base == info.phys_base
    assert kv.layout.levels == meta["layout"]["levels"] == (5 if "l5" in case else 4)
    assert kv.layout.page_offset_base == meta["layout"]["page_offset_base"]
    assert kv.nr_cpus == 2 and kv.online_cpus() == {0, 1}


@pytest.mark.parametrize("case", CASES)
def test_sleep_process_found_with_default_pkru_and_its_pages(case: str, btf_blob: bytes) -> None:
    meta, kv = attach(case, btf_blob)
    tasks = kv.tasks()
    [t] = [t for t in tasks if t.pid == meta["pid"]]
    assert (t.comm, t.tgid, t.state_char) == ("sleep", meta["pid"], "S")
    assert t.pkru == DEFAULT_PKRU and not t.pkru_stale and not t.is_kthread
    mm = kv.mm(t)
    assert mm is not None and mm.pgd_phys % 4096 == 0 and mm.tlb_gen >= 1
    assert kv.pti == mm.pti == ("pti" in case)
    assert mm.user_pgd_phys == mm.pgd_phys + (0x1000 if kv.pti else 0)
    walker = PageTableWalker(kv.memory.read, levels=kv.layout.levels, ram_size=kv.memory.size)
    for line in meta["maps"].splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        if line.endswith(("[stack]", "[heap]")) or "r-xp" in line:
            tr = walker.translate(mm.user_pgd_phys, end - 8 if "[stack]" in line else start)
            assert tr.mapped and tr.user, line
            assert tr.nx == ("x" not in line.split()[1]), line
            assert tr.pkey == 0


@pytest.mark.parametrize("case", CASES)
def test_task_list_matches_recording(case: str, btf_blob: bytes) -> None:
    meta, kv = attach(case, btf_blob)
    tasks = kv.tasks()
    got = [(t.pid, t.tgid, t.comm, t.cpu, t.state_char, t.pkru, t.running_on) for t in tasks]
    want = [(r["pid"], r["tgid"], r["comm"], r["cpu"], r["state"], r["pkru"], r["running_on"])
            for r in meta["tasks"]]
    assert got == want
    assert tasks[0].comm == "swapper/0" and tasks[0].pid == 0
    assert tasks[1].pid == 1 and tasks[1].mm
    assert {t.comm for t in tasks if t.is_idle} == {"swapper/0", "swapper/1"}
    assert sorted(t.running_on for t in tasks if t.running_on is not None) == [0, 1]
    kthreads = [t for t in tasks if t.is_kthread]
    assert kthreads and all(kv.mm(t) is None for t in kthreads)


@pytest.mark.parametrize("case", CASES)
def test_cpu_tlbstate_points_at_real_mms_and_matches_cr3(case: str, btf_blob: bytes) -> None:
    meta, kv = attach(case, btf_blob)
    mms = {t.mm for t in kv.tasks() if t.mm}
    for cpu in range(kv.nr_cpus):
        st = kv.cpu_tlbstate(cpu)
        assert st.loaded_mm == kv.init_mm or st.loaded_mm in mms
        assert 0 <= st.loaded_mm_asid < len(st.ctxs) == 6
        assert st.current_task is not None
        mm = kv.mm(st.loaded_mm)
        assert mm is not None
        cr3 = int(re.search(r"CR3=([0-9a-f]+)", meta["regs"][cpu]).group(1), 16)
        # the CPU's CR3 is its loaded mm's pgd (PTI: maybe the user half at +0x1000)
        assert cr3 & ~0x1FFF == mm.pgd_phys
        if st.loaded_mm != kv.init_mm:
            assert st.loaded_ctx is not None and st.loaded_ctx.ctx_id == mm.ctx_id


def test_wrong_kaslr_offset_is_a_clear_error(btf_blob: bytes) -> None:
    meta, mem = load_case("debian-6.1-l5")
    syms = SymbolTable({n: Symbol(n, int(a, 16), "D") for n, a in meta["symbols"].items()},
                       True, "recorded")
    info = parse_vmcoreinfo(meta["vmcoreinfo"])
    with pytest.raises((KernelViewError, PhysMemError)):
        KernelView.attach(mem, KernelImage(btf_blob=btf_blob), symbols=syms, vmcoreinfo=info,
                          kaslr_offset=0, phys_base=info.phys_base + (2 << 20))


def test_explicit_kaslr_values_are_used(btf_blob: bytes) -> None:
    meta, mem = load_case("debian-6.1-l4-pti")
    syms = SymbolTable({n: Symbol(n, int(a, 16), "D") for n, a in meta["symbols"].items()},
                       True, "recorded")
    lay = meta["layout"]
    kv = KernelView.attach(mem, KernelImage(btf_blob=btf_blob), symbols=syms,
                           kaslr_offset=lay["kaslr_offset"], phys_base=lay["phys_base"])
    assert kv.layout.source == "explicit" and kv.layout.levels == 4
    assert any(t.pid == meta["pid"] for t in kv.tasks())


@pytest.mark.parametrize("case", CASES)
def test_kaslr_found_by_banner_probe_without_vmcoreinfo(case: str, btf_blob: bytes) -> None:
    meta, mem = load_case(case)
    koff = meta["layout"]["kaslr_offset"]
    # link-time symbols, as System.map would give them: KASLR moves image addresses only
    link = SymbolTable({n: Symbol(n, int(a, 16) - (koff if int(a, 16) >= START_KERNEL_MAP
                                                    else 0), "D")
                        for n, a in meta["symbols"].items()}, False, "System.map")
    cr3 = int(re.search(r"CR3=([0-9a-f]+)", meta["regs"][0]).group(1), 16)
    kv = KernelView.attach(mem, KernelImage(btf_blob=btf_blob), symbols=link, cr3=cr3)
    assert kv.layout.source == "banner-probe"
    assert (kv.layout.kaslr_offset, kv.layout.phys_base, kv.layout.levels) == (
        koff, meta["layout"]["phys_base"], meta["layout"]["levels"])
    assert any(t.pid == meta["pid"] and t.comm == "sleep" for t in kv.tasks())


def test_state_letters() -> None:
    assert _state_char(0, 0) == "R"
    assert _state_char(1, 0) == "S"
    assert _state_char(2, 0) == "D"
    assert _state_char(0x402, 0) == "I"  # TASK_IDLE
    assert _state_char(0, 32) == "Z"
    assert _state_char(0, 16) == "X"
    assert _state_char(4, 0) == "T"
    assert _state_char(0x2001, 0) == "S"  # TASK_INTERRUPTIBLE | TASK_FREEZABLE-ish high bit


# --- VMCOREINFO on synthetic bytes ------------------------------------------------------

VMCI = (
    "OSRELEASE=6.1.0-test\nBUILD-ID=0123abcd\nPAGESIZE=4096\n"
    "SYMBOL(swapper_pg_dir)=ffffffffa880a000\nSYMBOL(init_top_pgt)=ffffffffa880a000\n"
    "OFFSET(list_head.next)=0\nSIZE(list_head)=16\nNUMBER(phys_base)=-287309824\n"
    "NUMBER(pgtable_l5_enabled)=1\nKERNELOFFSET=1be00000\nLENGTH(node_data)=1024\n"
)


def note(text: str) -> bytes:
    desc = text.encode() + b"\0"
    desc += b"\0" * (-len(desc) % 4)
    return struct.pack("<III", 11, len(desc), 0) + b"VMCOREINFO\0\0" + desc


def test_parse_vmcoreinfo_fields() -> None:
    v = parse_vmcoreinfo(VMCI)
    assert v.osrelease == "6.1.0-test" and v.build_id == "0123abcd" and v.page_size == 4096
    assert v.kernel_offset == 0x1BE00000
    assert v.phys_base == -0x11200000
    assert v.pgtable_l5_enabled is True
    assert v.symbol("swapper_pg_dir") == 0xFFFFFFFFA880A000
    assert v.offset("list_head.next") == 0 and v.size("list_head") == 16
    assert v.symbols == {"swapper_pg_dir": 0xFFFFFFFFA880A000, "init_top_pgt": 0xFFFFFFFFA880A000}
    assert v.symbol("nope") is None and v.number("nope") is None
    assert v.drgn_text().endswith("\n")


def test_parse_vmcoreinfo_rejects_garbage() -> None:
    with pytest.raises(VmcoreinfoError, match="OSRELEASE"):
        parse_vmcoreinfo("PAGESIZE=4096\n")
    with pytest.raises(VmcoreinfoError, match="malformed"):
        parse_vmcoreinfo("OSRELEASE=x\nno equals sign\n")
    with pytest.raises(VmcoreinfoError, match="hex"):
        parse_vmcoreinfo("OSRELEASE=x\nKERNELOFFSET=zz\n")
    with pytest.raises(VmcoreinfoError):
        parse_note(b"\0" * 40)


class BytesMemory:
    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(0, len(self.data))]

    def read(self, phys: int, length: int) -> bytes:
        if phys + length > len(self.data):
            raise PhysMemError("beyond")
        return self.data[phys : phys + length]


def test_find_vmcoreinfo_in_ram_across_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    import testbed.snapshot.vmcoreinfo as vm

    monkeypatch.setattr(vm, "CHUNK", 1 << 16)
    ram = bytearray(1 << 18)
    fake = b"VMCOREINFO\0 but not a note"  # the name alone, without a note header
    ram[100 : 100 + len(fake)] = fake
    n = note(VMCI)
    at = (1 << 16) - 20  # straddles the first chunk boundary
    ram[at : at + len(n)] = n
    info = find_vmcoreinfo(BytesMemory(bytes(ram)))
    assert info.phys == at + 24 and info.kernel_offset == 0x1BE00000
    assert [i.phys for i in scan_vmcoreinfo(bytes(ram))] == [at + 24]
    with pytest.raises(VmcoreinfoError, match="no VMCOREINFO"):
        find_vmcoreinfo(BytesMemory(bytes(1 << 17)))
    with pytest.raises(VmcoreinfoError):
        find_vmcoreinfo(BytesMemory(bytes(ram)), osrelease="other")


def test_find_banner() -> None:
    ram = bytearray(1 << 16)
    ram[0x3000:0x3010] = b"Linux version 6."
    ram[0x9000:0x900E] = b"Linux version "
    assert find_banner(BytesMemory(bytes(ram))) == [0x3000, 0x9000]


# --- bzImage payloads ----------------------------------------------------------------------


def fake_bzimage(payload: bytes) -> bytes:
    img = bytearray(0x400 + len(payload))
    img[0x1F1] = 1  # setup_sects: payload offsets count from 2 * 512
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20F)
    struct.pack_into("<II", img, 0x248, 0, len(payload))
    img[0x400:] = payload
    return bytes(img)


@pytest.mark.parametrize("kind", ["gzip", "xz", "bzip2", "zstd"])
def test_bzimage_payload_decompression(kind: str) -> None:
    import bz2
    import gzip
    import shutil
    import subprocess

    elf = b"\x7fELF" + bytes(range(256)) * 8
    if kind == "gzip":
        payload = gzip.compress(elf) + struct.pack("<I", len(elf))  # the kernel's size trailer
    elif kind == "xz":
        payload = lzma.compress(elf, check=lzma.CHECK_CRC32) + struct.pack("<I", len(elf))
    elif kind == "bzip2":
        payload = bz2.compress(elf)
    else:
        if shutil.which("zstd") is None:
            pytest.skip("no zstd tool")
        payload = subprocess.run(["zstd", "-c"], input=elf, capture_output=True).stdout
    got_kind, got = bzimage_payload(fake_bzimage(payload))
    assert got_kind == kind
    assert decompress_payload(got_kind, got) == elf


def test_btf_subset_recording_is_consistent(btf_blob: bytes) -> None:
    b = Btf.parse(btf_blob)
    assert b.offsetof("task_struct", "thread.pkru") == 5524
    assert b.sizeof("struct task_struct") == 9792
    assert b.datasec_vars(".data..percpu")["cpu_tlbstate"] == (202048, 128)
