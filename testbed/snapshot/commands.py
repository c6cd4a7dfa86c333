"""`testbed inspect`: a snapshot of a running guest or of an offline memory dump."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.snapshot.model import Snapshot


def _machine_meta(run_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((run_dir / "machine.json").read_text())
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{run_dir} is not a run folder of a guest (no machine.json)") from exc
    if not isinstance(meta, dict):
        raise TestbedError(f"{run_dir}/machine.json is not an object")
    if meta.get("stopped"):
        raise TestbedError(f"the guest of {run_dir} is not running any more: inspect --dump")
    return meta


def _walk(args: argparse.Namespace) -> int:
    """--walk ADDR: the page-table walk of ADDR in a task (--pid) or from a CR3 (--cr3),
    read from guest memory alone (no QMP: the guest stays as it is, e.g. stopped by gdb)."""
    from testbed.snapshot.kernel import KernelView
    from testbed.snapshot.physmem import ElfDumpMemory, SharedFileMemory
    from testbed.snapshot.walk import walk_lines

    memory: Any
    if args.run is not None:
        meta = _machine_meta(args.run)
        memory, kernel = SharedFileMemory(Path(meta["ram_file"])), Path(meta["kernel"])
    else:
        dump, folder, info = find_run_dump(args.dump)
        kernel = args.vmlinux or dump_vmlinux(info, folder)
        memory = ElfDumpMemory(dump)
    try:
        view = KernelView.attach(memory, kernel, cr3=args.cr3)
        lines = walk_lines(view, args.walk, args.pid, args.cr3)
    finally:
        memory.close()
    print("\n".join(lines))
    return 0


def _live(run_dir: Path) -> Snapshot:
    from testbed.boot.machine import connect_unix
    from testbed.boot.qmp import QMP
    from testbed.snapshot.live import LiveSnapshotter

    meta = _machine_meta(run_dir)
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


def find_run_dump(path: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(dump file, its scenario's run folder, dump.json) for --dump given a run folder (a
    scenario's, or a run's with one dump in it) or a dump file inside one."""
    from testbed.snapshot.memdump import DUMP_INFO, load_dump_info

    if path.is_dir():
        folders = [path] if (path / DUMP_INFO).is_file() else sorted(
            d for d in path.iterdir() if (d / DUMP_INFO).is_file())
        dumps = [d for d in folders if (load_dump_info(d) or {}).get("file")]
        if not dumps:
            raise TestbedError(f"{path} holds no memory dump (no {DUMP_INFO} naming a file: no "
                               "host check failed, or the run had --no-dump)")
        if len(dumps) > 1:
            raise TestbedError(f"{path} holds {len(dumps)} dumps: pass one scenario's folder ("
                               + ", ".join(d.name for d in dumps) + ")")
        folder = dumps[0]
        info = load_dump_info(folder) or {}
        return folder / str(info["file"]), folder, info
    info = load_dump_info(path.parent) or {}
    return path, path.parent, info if info.get("file") == path.name else {}


def dump_vmlinux(info: dict[str, Any], folder: Path) -> Path:
    """The vmlinux of a run folder's dump: the one dump.json names, else the cached build
    of its kernel key; a one-line error when neither is here."""
    named = Path(str(info.get("vmlinux", "")))
    if info.get("vmlinux") and named.is_file():
        return named
    key = str(info.get("kernel_key", ""))
    if key:
        from testbed.build.kernel import load_build
        from testbed.errors import BuildError

        try:
            return load_build(key).vmlinux
        except BuildError:
            pass
    series = info.get("kernel_series") or "?"
    raise TestbedError(f"the vmlinux of the dump in {folder} is not on this machine (kernel key "
                       f"{key or '?'}, series {series}): build it with `testbed kernel build "
                       f"--series {series}` or pass --vmlinux")


def _judge_dump(snap: Snapshot, folder: Path, info: dict[str, Any]) -> list[Any]:
    """The design's host checks on a dump's snapshot, with the checkpoint's facts (from the
    snapshot taken live at that checkpoint); [] when the run folder can't say."""
    from dataclasses import replace

    from testbed.designs import get_design
    from testbed.rundir import ScenarioRecord
    from testbed.snapshot.model import SnapshotFormatError

    checkpoint = str(info.get("checkpoint", ""))
    try:
        rec = ScenarioRecord.load(folder)
        live = Snapshot.load(folder / "snapshots" / f"{checkpoint}.json")
    except (TestbedError, OSError, SnapshotFormatError):
        return []
    design = get_design(rec.design)
    sc = design.scenarios.get(rec.scenario)
    if sc is None or live.trigger is None:
        return []
    snap.trigger = live.trigger
    snap.name = checkpoint
    return design.judge_snapshots([snap], replace(sc, name=rec.name))


def cmd_inspect(args: argparse.Namespace) -> int:
    if (args.run is None) == (args.dump is None):
        raise TestbedError("give either --run DIR (a running guest) or --dump FILE|RUN_DIR")
    if args.walk is not None:
        return _walk(args)
    findings: list[Any] = []
    if args.run is not None:
        snap = _live(args.run)
    else:
        dump, folder, info = find_run_dump(args.dump)
        vmlinux = args.vmlinux
        if vmlinux is None:
            if not info:
                raise TestbedError(f"--dump {args.dump}: no dump.json of a run folder beside it "
                                   "to name its kernel: pass --vmlinux")
            vmlinux = dump_vmlinux(info, folder)
            print(f"testbed: dump {dump} (checkpoint {info.get('checkpoint')}), vmlinux "
                  f"{vmlinux}", file=sys.stderr)
        _check_recorded_build_id(info, vmlinux, dump)
        snap = _offline(dump, vmlinux)
        if info:
            findings = _judge_dump(snap, folder, info)
    if args.pid is not None:
        snap.tasks = tuple(t for t in snap.tasks if args.pid in (t.pid, t.tgid))
    if args.json:
        sys.stdout.write(snap.dumps())
        sys.stdout.write("\n")
    else:
        from testbed.report.text import render_snapshot

        sys.stdout.write(render_snapshot(snap, show_mappings=args.pid is not None))
        if findings:
            _print_findings(findings, snap.name)
    return 0


def _check_recorded_build_id(info: dict[str, Any], vmlinux: Path, dump: Path) -> None:
    """The vmlinux must be the build dump.json recorded (checked again against the dump's
    own VMCOREINFO when it has one, in _offline)."""
    from testbed.snapshot.vmcoreinfo import elf_build_id

    want = str(info.get("vmlinux_build_id", "")).lower()
    if not want or not vmlinux.is_file():
        return
    got = (elf_build_id(vmlinux) or "").lower()
    if got and got != want:
        raise TestbedError(f"dump {dump} is from another kernel build than {vmlinux}: BUILD-ID "
                           f"{want} in dump.json, {got} in the vmlinux; pass the vmlinux of "
                           "the dumped kernel")


def _print_findings(findings: list[Any], checkpoint: str) -> None:
    bad = [f for f in findings if f.bad]
    print(f"\nhost checks on the dump at {checkpoint} (no vCPU registers: PKRU as saved per "
          f"thread): {len(findings) - len(bad)} fine, {len(bad)} failed or not judged")
    for f in bad:
        ev = " ".join(f"{k}={v}" for k, v in f.evidence.items()
                      if k in ("pid", "slot", "expected_table", "actual_table", "raw"))
        print(f"  {f.status.value.upper():5s} {f.check} {f.subject}: {f.message}"
              + (f"\n        {ev}" if ev else ""))


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="snapshot a running guest or a memory dump and print it")
    p.add_argument("--run", type=Path, metavar="DIR", help="run folder of a running guest")
    p.add_argument("--dump", type=Path, metavar="FILE|RUN_DIR",
                   help="ELF dump from dump-guest-memory, or a run folder holding the one "
                        "`testbed run` kept at a failing checkpoint (its vmlinux is found "
                        "from dump.json or the kernel cache, its BUILD-ID checked, and the "
                        "design's host checks run on it with that checkpoint's facts)")
    p.add_argument("--vmlinux", type=Path, metavar="FILE",
                   help="the dumped kernel (with --dump FILE outside a run folder)")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    p.add_argument("--pid", type=int, help="only this process (its mappings are listed too)")
    p.add_argument("--walk", type=address, metavar="ADDR",
                   help="print the page-table walk of the virtual address ADDR instead, in "
                        "the address space of --pid (both roots under PTI) or from --cr3: "
                        "each level's entry with its flags, the slot and its copy mark at "
                        "the 512 GiB level, the leaf's page and pkey (read from guest memory "
                        "alone: a guest stopped by gdb stays stopped; gdb's tb-walk calls it)")
    p.add_argument("--cr3", type=address, metavar="CR3",
                   help="with --walk and no --pid: walk from this root")
    p.set_defaults(func=cmd_inspect)


def address(text: str) -> int:
    """argparse type of an address: 0x hex or decimal, 0 .. 2**64-1."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (0x... or decimal)"
                                         ) from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text} is not a 64-bit address")
    return value
