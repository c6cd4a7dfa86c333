"""`testbed inspect`: a snapshot of a running guest or of an offline memory dump."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.snapshot.model import Snapshot


def _live(run_dir: Path) -> Snapshot:
    from testbed.boot.machine import connect_unix
    from testbed.boot.qmp import QMP
    from testbed.snapshot.live import LiveSnapshotter

    try:
        meta = json.loads((run_dir / "machine.json").read_text())
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{run_dir} is not a run folder of a guest (no machine.json)") from exc
    if meta.get("stopped"):
        raise TestbedError(f"the guest of {run_dir} is not running any more: inspect --dump")
    try:
        sock = connect_unix(run_dir / "qmp.sock")
    except OSError as exc:
        raise TestbedError(f"cannot reach the QMP socket of {run_dir}: {exc.strerror}") from exc
    qmp = QMP("testbed-inspect")
    try:
        qmp.connect(sock)
        snapper = LiveSnapshotter(qmp, Path(meta["ram_file"]), Path(meta["kernel"]))
        try:
            return snapper.capture("inspect")
        finally:
            snapper.close()
    finally:
        qmp.close()


def _offline(dump: Path, vmlinux: Path) -> Snapshot:
    from testbed.snapshot.kernel import KernelView
    from testbed.snapshot.physmem import ElfDumpMemory
    from testbed.snapshot.snapshot import assemble
    from testbed.snapshot.vmcoreinfo import (
        VmcoreinfoError,
        check_build_id,
        elf_build_id,
        find_vmcoreinfo,
    )

    for path, what, want in ((dump, "dump", "the ELF file dump-guest-memory wrote"),
                             (vmlinux, "vmlinux", "the dumped kernel's vmlinux")):
        if path.is_dir():
            raise TestbedError(f"{what} {path} is a folder, not a file: pass {want}")
        if not path.is_file():
            raise TestbedError(f"{what} {path} does not exist: pass {want}")
    with ElfDumpMemory(dump) as memory:
        try:
            info = find_vmcoreinfo(memory)
        except VmcoreinfoError:
            info = None  # KernelView.attach places the kernel without it, or says why not
        if info is not None:
            check_build_id(info, elf_build_id(vmlinux), f"dump {dump}", str(vmlinux))
        view = KernelView.attach(memory, vmlinux, vmcoreinfo=info)
        snap = assemble(view, (), name=dump.stem)
    snap.source = {"dump": str(dump), "note": "no vCPU state: PKRU only as saved per thread"}
    return snap


def cmd_inspect(args: argparse.Namespace) -> int:
    if (args.run is None) == (args.dump is None):
        raise TestbedError("give either --run DIR (a running guest) or --dump FILE --vmlinux FILE")
    if args.dump is not None and args.vmlinux is None:
        raise TestbedError("--dump needs --vmlinux (the kernel the dump was taken from)")
    snap = _live(args.run) if args.run is not None else _offline(args.dump, args.vmlinux)
    if args.pid is not None:
        snap.tasks = tuple(t for t in snap.tasks if args.pid in (t.pid, t.tgid))
    if args.json:
        sys.stdout.write(snap.dumps())
        sys.stdout.write("\n")
    else:
        from testbed.report.text import render_snapshot

        sys.stdout.write(render_snapshot(snap, show_mappings=args.pid is not None))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="snapshot a running guest or a memory dump and print it")
    p.add_argument("--run", type=Path, metavar="DIR", help="run folder of a running guest")
    p.add_argument("--dump", type=Path, metavar="FILE", help="ELF dump from dump-guest-memory")
    p.add_argument("--vmlinux", type=Path, metavar="FILE", help="the dumped kernel (with --dump)")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    p.add_argument("--pid", type=int, help="only this process (its mappings are listed too)")
    p.set_defaults(func=cmd_inspect)
