"""All three guest-memory sources return the same bytes from a live QEMU (boots a VM).

QEMU is launched directly (two QMP sockets: one for the sync legacy client the
pmemsave source and dump use, one for the asyncio QMPClient); it is killed and
its /dev/shm RAM file removed whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.boot.kernelimage import debian_kernel
from testbed.errors import TestbedError
from testbed.snapshot import pagetable
from testbed.snapshot.physmem import (
    ElfDumpMemory,
    PmemsaveMemory,
    SharedFileMemory,
    pmemsave_read,
)

KERNEL = debian_kernel()
RAM = 128 << 20
MARKER_AT = 0x600_0000
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None or KERNEL is None,
        reason="needs qemu-system-x86_64 and the Debian kernel",
    ),
]


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A booting guest (kernel without initrd: it panics and waits), paused after 3 s."""
    shm = Path(f"/dev/shm/testbed-pmtest-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    q1, q2 = tmp_path / "qmp1.sock", tmp_path / "qmp2.sock"
    args = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "128",
        "-nodefaults", "-display", "none",
        "-object", f"memory-backend-file,id=mem,size=128M,mem-path={shm},share=on",
        "-machine", "pc,memory-backend=mem",
        "-kernel", str(KERNEL), "-append", "console=ttyS0 panic=0",
        "-serial", f"file:{tmp_path / 'serial.log'}",
        "-qmp", f"unix:{q1},server=on,wait=off", "-qmp", f"unix:{q2},server=on,wait=off",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (q1.exists() and q2.exists()):
            assert proc.poll() is None, f"QEMU exited with {proc.returncode}"
            assert time.monotonic() < deadline, "QEMU did not create its QMP sockets"
            time.sleep(0.05)
        time.sleep(3)  # let the kernel decompress itself into RAM
        yield shm, q1, q2
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()


def test_three_sources_agree(guest: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from qemu.qmp import QMPClient
    from qemu.qmp.legacy import QEMUMonitorProtocol

    shm, q1, q2 = guest
    mon = QEMUMonitorProtocol(str(q1))
    mon.connect()
    dump = tmp_path / "dump.elf"
    try:
        mon.cmd("stop")
        # a marker written by the host into the RAM file must show at that guest address
        marker = b"TESTBED-PHYSMEM-" + uuid.uuid4().hex.encode()
        fd = os.open(shm, os.O_RDWR)
        try:
            os.pwrite(fd, marker, MARKER_AT)
        finally:
            os.close(fd)
        mon.cmd("dump-guest-memory", paging=False, protocol=f"file:{dump}", format="elf")
        with contextlib.ExitStack() as stack:
            live = stack.enter_context(SharedFileMemory(shm))
            elf = stack.enter_context(ElfDumpMemory(dump))
            pm = PmemsaveMemory(lambda c, a: mon.cmd(c, **a), tmpdir="/dev/shm")
            assert live.size == pm.size == RAM

            for src in (live, elf, pm):
                assert src.read(MARKER_AT, len(marker)) == marker

            # whole RAM except the legacy VGA/ROM window, where the dump and pmemsave
            # see device memory (ROM) and the file the RAM underneath
            for start, end in ((0, 0xA0000), (0x100000, RAM)):
                a = live.read(start, end - start)
                assert a == elf.read(start, end - start)
                assert a == pm.read(start, end - start)
            assert any(live.read(0x100000, RAM - 0x100000))  # the guest really wrote RAM

            # the asyncio pmemsave on the other QMP socket, page by page
            async def async_pages() -> list[bytes]:
                qmp = QMPClient("physmem-test")
                await qmp.connect(str(q2))
                try:
                    out = []
                    for page in (0x0, 0x1000000, MARKER_AT, RAM - 4096):
                        out.append(await pmemsave_read(qmp, page, 4096, tmpdir="/dev/shm"))
                    with pytest.raises(TestbedError):
                        await pmemsave_read(qmp, RAM, 16)
                    return out
                finally:
                    await qmp.disconnect()

            pages = asyncio.run(async_pages())
            for page, got in zip((0x0, 0x1000000, MARKER_AT, RAM - 4096), pages, strict=True):
                assert got == live.read(page, 4096) == elf.read(page, 4096)

            for src in (live, elf, pm):
                with pytest.raises(TestbedError, match="outside RAM"):
                    src.read(RAM - 8, 16)

            # timing of one 4 KiB read on each path, and a walk over the live file
            for name, src in (("mmap", live), ("pmemsave", pm), ("elf", elf)):
                t0 = time.perf_counter()
                for _ in range(20):
                    src.read(0x1000000, 4096)
                print(f"{name}: {(time.perf_counter() - t0) / 20 * 1e6:.1f} us per 4 KiB read")
            regs = mon.cmd("human-monitor-command", **{"command-line": "info registers"})
            cr3 = int(str(regs).split("CR3=")[1].split()[0], 16)
            cr4 = int(str(regs).split("CR4=")[1].split()[0], 16)
            w = pagetable.PageTableWalker(
                live.read, levels=5 if cr4 & (1 << 12) else 4, ram_size=live.size
            )
            t0 = time.perf_counter()
            tables = w.tables(cr3)
            ms = (time.perf_counter() - t0) * 1e3
            print(f"walk of all {len(tables)} tables of CPU 0's CR3: {ms:.1f} ms")
    finally:
        mon.close()
        with contextlib.suppress(FileNotFoundError):
            dump.unlink()
