#!/usr/bin/env python3
"""Record real QEMU 7.2 migration streams (and HMP register dumps) for the tests.

Boots the newest Debian kernel in /boot (found as the product finds it) under TCG with a tiny
initramfs whose /init is ``pkru_init.c`` (built here with ``gcc -static``):
it pins itself to CPU 1, tags a page at 0x7e0000000000 with a fresh pkey,
writes the marker "TESTBED-MARKER-PAGE" there, sets PKRU to 0x5A5A5A54 with
WRPKRU and spins. Once the serial console shows its line, this script uses
``testbed.snapshot.cpustate`` over a QMP unix socket (qemu.qmp) to:

1. take a migration stream while the VM runs (x-ignore-shared, stop, getfd
   of a memfd, migrate to fd:NAME, poll query-migrate, cont), again until
   vCPU 1 was caught in user mode;
2. stop the VM, read ``info registers`` of each vCPU, take a second stream
   while paused (the VM stays stopped, in 'postmigrate');
3. copy the page-table pages reachable from vCPU 1's CR3 plus the marker's
   page out of the shared-memory RAM file (tests walk them offline);
4. cont, kill QEMU and delete the /dev/shm file.

Outputs per variant V, in this directory (or --out):
  migstream-V.bin.gz   the stream taken while running (gzip)
  record-V.json        serial line, HMP texts, timings, run states, QEMU args
  ptpages-V.json.gz    {hex phys addr of page: hex bytes} for the walker test

Usage: python3 tests/data/record_migstream.py [--variant la57-amd|l4-intel ...]
Run from the repository root (it imports ``testbed``). Takes ~10 s a variant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from qemu.qmp import QMPClient  # noqa: E402

from testbed.boot.kernelimage import debian_kernel  # noqa: E402
from testbed.snapshot import cpustate, migstream, pagetable  # noqa: E402

KERNEL = debian_kernel()
VARIANTS = {
    # -cpu max under TCG: AuthenticAMD (no PTI), LA57 (5-level paging)
    "la57-amd": "max",
    # 4-level paging and PTI on (user CR3 = kernel CR3 | 0x1000)
    "l4-intel": "max,-la57,vendor=GenuineIntel",
    # no PKU: PKRU stays 0, so no vCPU section carries the cpu/pkru subsection
    "nopku": "max,-pku",
}
SERIAL_RE = re.compile(r"TESTBED pkey=(-?\d+) pkru=0x([0-9a-f]+) cpu=(\d+) marker=(0x[0-9a-f]+)")
MARKER_VA = 0x7E00_0000_0000


def newc_cpio(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A newc cpio archive of {name: (mode, data)} (what the kernel unpacks)."""
    out = bytearray()

    def entry(ino: int, name: str, mode: int, data: bytes) -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        out.extend(hdr.encode() + nb)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, (mode, data)) in enumerate(files.items(), start=1):
        entry(ino, name, mode, data)
    entry(0, "TRAILER!!!", 0, b"")
    return bytes(out)


def build_initramfs(work: Path) -> Path:
    exe = work / "init"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(exe), str(HERE / "pkru_init.c")], check=True)
    img = work / "initramfs.cpio"
    img.write_bytes(newc_cpio({"init": (0o100755, exe.read_bytes())}))
    return img


def capture_pagetables(ram: mmap.mmap, cr3: int, levels: int, pti: bool) -> dict[str, str]:
    """Every page-table page of the user half reachable from cr3, the root page of
    the other PTI root too (when ``pti``), plus the page holding the marker."""

    def read(addr: int, n: int) -> bytes:
        return ram[addr : addr + n]

    walker = pagetable.PageTableWalker(read, levels=levels, ram_size=len(ram))
    pages: dict[str, str] = {}
    for t in walker.tables(cr3 & pagetable.CR3_ADDR_MASK, user_only=True):
        pages[f"{t.phys:x}"] = read(t.phys, 4096).hex()
    if pti:
        k = pagetable.kernel_root(cr3)
        pages[f"{k:x}"] = read(k, 4096).hex()
    tr = walker.translate(cr3 & pagetable.CR3_ADDR_MASK, MARKER_VA)
    page = tr.phys & ~0xFFF
    pages[f"{page:x}"] = read(page, 4096).hex()
    return pages


async def record(variant: str, out: Path, work: Path, initrd: Path) -> None:
    shm = Path(f"/dev/shm/testbed-rec-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    qmp_path = work / f"qmp-{variant}.sock"
    serial = work / f"serial-{variant}.log"
    args = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", VARIANTS[variant], "-smp", "2",
        "-m", "128", "-nodefaults", "-display", "none",
        "-object", f"memory-backend-file,id=mem,size=128M,mem-path={shm},share=on",
        "-machine", "pc,memory-backend=mem",
        "-kernel", str(KERNEL), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet",
        "-serial", f"file:{serial}",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-no-reboot",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    qmp = QMPClient(f"rec-{variant}")
    try:
        deadline = time.monotonic() + 10
        while not qmp_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start (rc {proc.returncode})")
            await asyncio.sleep(0.05)
        await qmp.connect(str(qmp_path))
        deadline = time.monotonic() + 120
        m = None
        while m is None:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            m = SERIAL_RE.search(text)
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"guest never printed its line; serial:\n{text[-2000:]}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)  # let it reach the spin loop
        # 1. while running; retried until vCPU 1 was caught in user mode (CPL 3)
        #    rather than in an interrupt, so the tests can rely on it
        for _ in range(20):
            cap1 = await cpustate.take_migration_stream(qmp)
            if migstream.parse_migration_stream(cap1.stream).vcpu(1).cpl == 3:
                break
            await asyncio.sleep(0.05)
        # 2. paused
        await qmp.execute("stop")
        hmp = {
            i: await qmp.execute(
                "human-monitor-command", {"command-line": "info registers", "cpu-index": i}
            )
            for i in await cpustate.cpu_indexes(qmp)
        }
        cap2 = await cpustate.take_migration_stream(qmp)
        # 3. page tables of the spinning process (vCPU 1, CPL 3)
        regs1 = cpustate.parse_info_registers(str(hmp[1]), 1)
        pti = "GenuineIntel" in VARIANTS[variant]
        fd = os.open(shm, os.O_RDONLY)
        try:
            ram = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            pages = capture_pagetables(ram, regs1.cr3, regs1.paging_levels, pti)
        finally:
            ram.close()
        # a third snapshot straight from 'postmigrate' shows whether that works
        third: dict[str, object]
        try:
            cap3 = await cpustate.take_migration_stream(qmp, timeout=5)
            third = {"ok": True, "status_after": cap3.status_after}
        except Exception as e:  # noqa: BLE001 - recorded as a fact
            third = {"ok": False, "error": str(e)}
        await qmp.execute("cont")
        status_end = (await qmp.execute("query-status"))["status"]  # type: ignore[index]
        # timings of a few more snapshots of the running VM
        times = []
        for _ in range(5):
            c = await cpustate.take_migration_stream(qmp)
            times.append((round(c.seconds * 1000, 2), round(c.total_seconds * 1000, 2)))
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        proc.kill()
        proc.wait()
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()

    (out / f"migstream-{variant}.bin.gz").write_bytes(gzip.compress(cap1.stream, mtime=0))
    (out / f"ptpages-{variant}.json.gz").write_bytes(
        gzip.compress(json.dumps(pages, sort_keys=True).encode(), mtime=0)
    )
    rec = {
        "variant": variant,
        "qemu_args": args,
        "qemu_version": subprocess.run(
            [args[0], "--version"], capture_output=True, text=True
        ).stdout.splitlines()[0],
        "serial_line": m.group(0),
        "pti": pti,
        "vcpu1_cr3": regs1.cr3,
        "pkey": int(m.group(1)),
        "pkru": int(m.group(2), 16),
        "cpu": int(m.group(3)),
        "marker_va": int(m.group(4), 16),
        "marker_text": "TESTBED-MARKER-PAGE",
        "hmp_info_registers": {str(k): v for k, v in hmp.items()},
        "stream_bytes": len(cap1.stream),
        "running_snapshot": {
            "status_before": cap1.status_before, "status_after": cap1.status_after,
            "stopped_ms": round(cap1.seconds * 1000, 2),
            "total_ms": round(cap1.total_seconds * 1000, 2),
        },
        "paused_snapshot": {
            "status_before": cap2.status_before, "status_after": cap2.status_after,
            "stopped_ms": round(cap2.seconds * 1000, 2), "same_bytes": cap2.stream == cap1.stream,
        },
        "postmigrate_snapshot": third,
        "status_after_cont": status_end,
        "more_snapshots_ms_stopped_total": times,
    }  # fmt: skip
    (out / f"record-{variant}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"{variant}: {len(cap1.stream)} bytes, {rec['running_snapshot']}, {times}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    ap.add_argument("--out", type=Path, default=HERE)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="testbed-rec-"))
    try:
        initrd = build_initramfs(work)
        for v in a.variant or list(VARIANTS):
            asyncio.run(record(v, a.out, work, initrd))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
