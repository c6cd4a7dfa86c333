"""Record the test data of tests/test_kernel_objects.py from a paused guest's RAM copy.

    python tests/data/kernel-objects/record.py CAPTURE_DIR OUT_NAME

CAPTURE_DIR holds ``ram.bin`` (a copy of the guest RAM file taken while the
guest was stopped) and ``info.json`` (``kernel``: the bzImage it booted,
``pid``: a ``sleep`` process, ``maps``: its /proc/PID/maps, ``regs``: HMP
``info registers`` per vCPU). Writes, next to this script:

* ``OUT_NAME.pages.xz``: every 4 KiB guest page the kernel view and the
  page-table walks read (u64 little-endian physical address + 4096 bytes each);
* ``OUT_NAME.json``: VMCOREINFO text, the runtime symbols the view used,
  the RAM size, the process facts and what the view found (the expectations);
* ``debian-6.1-btf-subset.btf.xz`` (once): the types the view needs, trimmed
  from the kernel's BTF with :func:`testbed.snapshot.btf.subset`.
"""

from __future__ import annotations

import json
import lzma
import struct
import sys
from pathlib import Path

from testbed.snapshot.btf import subset
from testbed.snapshot.kernel import KernelView, _probe_banner
from testbed.snapshot.kernel_image import KernelImage
from testbed.snapshot.pagetable import PageTableWalker
from testbed.snapshot.physmem import SharedFileMemory
from testbed.snapshot.symbols import Symbol, SymbolTable

HERE = Path(__file__).resolve().parent
SYMBOLS = [
    "init_task", "init_mm", "nr_cpu_ids", "__cpu_online_mask", "__per_cpu_offset",
    "current_task", "cpu_tlbstate", "cpu_tlbstate_shared", "page_offset_base",
    "__pgtable_l5_enabled", "init_top_pgt", "swapper_pg_dir", "linux_banner", "runqueues",
    "boot_cpu_data",
]
BTF_ROOTS = ["task_struct", "mm_struct", "tlb_state", "tlb_state_shared", "tlb_context",
             "signal_struct", "list_head", "rq", "cpuinfo_x86"]
PERCPU = ["cpu_tlbstate", "current_task", "cpu_tlbstate_shared", "runqueues"]


class Recording:
    def __init__(self, mem: SharedFileMemory) -> None:
        self.mem = mem
        self.pages: set[int] = set()

    @property
    def size(self) -> int:
        return self.mem.size

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return self.mem.ranges

    def read(self, phys: int, length: int) -> bytes:
        for p in range(phys & ~0xFFF, phys + max(length, 1), 4096):
            self.pages.add(p)
        return self.mem.read(phys, length)


def main() -> None:
    cap, name = Path(sys.argv[1]), sys.argv[2]
    info = json.loads((cap / "info.json").read_text())
    mem = SharedFileMemory(cap / "ram.bin")
    image = KernelImage.from_paths(info["kernel"])
    full = KernelView.attach(mem, image)
    syms = {n: full.symbol(n) for n in SYMBOLS if n in full.symbols}
    table = SymbolTable({n: Symbol(n, a, "D") for n, a in syms.items()}, True, "recorded")
    rec = Recording(mem)
    kv = KernelView.attach(rec, image, vmcoreinfo=full.vmcoreinfo, symbols=table)
    tasks = kv.tasks()
    kv.online_cpus()
    # what the banner probe reads (KASLR without VMCOREINFO, from link-time symbols + CR3)
    cr3 = int(info["regs"][0].split("CR3=")[1].split()[0], 16)
    koff = kv.layout.kaslr_offset
    link = SymbolTable({"linux_banner": Symbol("linux_banner", syms["linux_banner"] - koff)},
                       False, "link")
    assert _probe_banner(rec, link, cr3, None, None)[:2] == (koff, kv.layout.phys_base)
    walker = PageTableWalker(rec.read, levels=kv.layout.levels, ram_size=mem.size)
    expect_tasks = []
    for t in tasks:
        mm = kv.mm(t)
        row = {"pid": t.pid, "tgid": t.tgid, "comm": t.comm, "cpu": t.cpu, "state": t.state_char,
               "pkru": t.pkru, "running_on": t.running_on, "mm": t.mm,
               "pgd_phys": mm.pgd_phys if mm else None, "tlb_gen": mm.tlb_gen if mm else None,
               "cpumask": sorted(mm.cpumask) if mm else None}
        expect_tasks.append(row)
        if t.pid == info["pid"]:
            assert mm is not None
            for line in info["maps"].splitlines():
                s, e = (int(x, 16) for x in line.split()[0].split("-"))
                for va in (s, e - 8):
                    walker.translate(mm.pgd_phys, va)
                    walker.translate(mm.user_pgd_phys, va)
    tlb = []
    for c in range(kv.nr_cpus):
        st = kv.cpu_tlbstate(c)
        loaded = kv.mm(st.loaded_mm)
        tlb.append({"cpu": c, "loaded_mm": st.loaded_mm, "asid": st.loaded_mm_asid,
                    "is_lazy": st.is_lazy, "ctxs": [[x.ctx_id, x.tlb_gen] for x in st.ctxs],
                    "current_task": st.current_task,
                    "loaded_pgd_phys": loaded.pgd_phys if loaded else None})
    blob = bytearray()
    for p in sorted(rec.pages):
        blob += struct.pack("<Q", p) + mem.read(p, 4096)
    (HERE / f"{name}.pages.xz").write_bytes(lzma.compress(bytes(blob), preset=9))
    out = {
        "kernel": info["kernel"], "ram_size": mem.size, "vmcoreinfo": full.vmcoreinfo.text,
        "symbols": {n: hex(a) for n, a in syms.items()}, "pid": info["pid"],
        "maps": info["maps"], "layout": {
            "kaslr_offset": kv.layout.kaslr_offset, "phys_base": kv.layout.phys_base,
            "page_offset_base": kv.layout.page_offset_base, "levels": kv.layout.levels},
        "nr_cpus": kv.nr_cpus, "pti": kv.pti, "init_mm": kv.init_mm, "tasks": expect_tasks,
        "tlb": tlb,
        "regs": info["regs"],
    }
    (HERE / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    btf_out = HERE / "debian-6.1-btf-subset.btf.xz"
    if not btf_out.exists() or "--btf" in sys.argv:
        btf_out.write_bytes(lzma.compress(subset(image.btf, BTF_ROOTS, keep_vars={
            ".data..percpu": PERCPU}), preset=9))
    print(f"{len(rec.pages)} pages, {len(tasks)} tasks")


if __name__ == "__main__":
    main()
