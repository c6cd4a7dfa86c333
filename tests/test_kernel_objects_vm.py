"""Kernel objects of a live guest (Debian's default kernel: BTF only, KASLR on), read from the host.

One guest per paging depth: start `sleep`, pause the VM, attach through the
shared RAM file (VMCOREINFO for KASLR, kallsyms for symbols, BTF from the
bzImage) and compare with what the guest said over SSH and QEMU's CR3s.
"""

from __future__ import annotations

import re
import time

import pytest

from testbed.boot.hostcaps import choose_accel
from testbed.boot.kernelimage import default_kernel, inspect_kernel
from testbed.boot.machine import Machine, MachineConfig
from testbed.build.initramfs import ImageSpec, build_image
from testbed.snapshot.kernel import DEFAULT_PKRU, KernelView
from testbed.snapshot.kernel_image import KernelImage
from testbed.snapshot.pagetable import PageTableWalker
from testbed.snapshot.physmem import SharedFileMemory

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("paging,pti", [(5, "auto"), (4, "on")])
def test_host_finds_sleep_process_its_pages_pkru_and_tlb_state(
    paging: int, pti: str, runs_dir: object
) -> None:
    kernel = default_kernel()
    image = build_image(ImageSpec(kernel=inspect_kernel(kernel)))
    accel = choose_accel("tcg", paging)
    cfg = MachineConfig(kernel=kernel, initrd=image.path, accel=accel, smp=2, paging=paging,
                        pti=pti)
    kimg = KernelImage.from_paths(kernel)
    with Machine(cfg) as m:
        r = m.run("sleep 100 >/dev/null 2>&1 & echo $!; sleep 0.3")
        pid = int(r.stdout.split()[0])
        maps = m.run(f"cat /proc/{pid}/maps").stdout.decode()
        m.execute("stop")
        try:
            regs = [m.qmp.hmp("info registers", cpu_index=i) for i in range(2)]
            mem = SharedFileMemory(m.ram_path)
            try:
                t0 = time.perf_counter()
                kv = KernelView.attach(mem, kimg)
                attach_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                tasks = kv.tasks()
                mms = {t.address: kv.mm(t) for t in tasks}
                walk_s = time.perf_counter() - t0
                print(f"attach {attach_s:.3f} s, walk of {len(tasks)} tasks {walk_s * 1e3:.1f} ms")
                assert kv.layout.source == "vmcoreinfo" and kv.layout.levels == paging
                assert kv.pti == (pti == "on")

                [t] = [t for t in tasks if t.pid == pid]
                assert (t.comm, t.tgid, t.state_char) == ("sleep", pid, "S")
                assert t.pkru == DEFAULT_PKRU and not t.pkru_stale
                mm = mms[t.address]
                assert mm is not None
                walker = PageTableWalker(mem.read, levels=paging, ram_size=mem.size)
                checked = 0
                for line in maps.splitlines():
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    if line.endswith("[stack]") or "r-xp" in line:
                        va = end - 8 if line.endswith("[stack]") else start
                        tr = walker.translate(mm.user_pgd_phys, va)
                        assert tr.mapped and tr.user, line
                        assert tr.nx == ("x" not in line.split()[1]), line
                        checked += 1
                assert checked >= 2

                real_mms = {x.mm for x in tasks if x.mm}
                for cpu in range(kv.nr_cpus):
                    st = kv.cpu_tlbstate(cpu)
                    assert st.loaded_mm == kv.init_mm or st.loaded_mm in real_mms
                    loaded = kv.mm(st.loaded_mm)
                    assert loaded is not None
                    cr3 = int(re.search(r"CR3=([0-9a-f]+)", regs[cpu]).group(1), 16)
                    assert cr3 & ~0x1FFF == loaded.pgd_phys
                    assert st.current_task is not None
            finally:
                mem.close()
        finally:
            m.execute("cont")
