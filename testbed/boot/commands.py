"""`testbed exec` and `testbed boot`: start a guest, run a command or keep it up."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from testbed import paths
from testbed.boot.kernelimage import default_kernel, inspect_kernel
from testbed.boot.machine import Machine, MachineConfig, resolve_accel
from testbed.build.initramfs import ImageSpec, build_image
from testbed.errors import Interrupted, TestbedError
from testbed.progress import Progress
from testbed.reproduce import resolve_kernel_spec


def add_machine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest")
    g.add_argument("--kernel", type=Path, help="bzImage, or the key of a cached kernel build "
                   "(default: Debian's kernel in /boot)")
    g.add_argument("--kernel-series", metavar="NAME",
                   help="with --kernel KEY: build this series when the cache lacks KEY")
    g.add_argument("--initrd", type=Path, help="initramfs to boot instead of the built one")
    g.add_argument("--smp", type=int, default=2, help="number of vCPUs (default 2)")
    g.add_argument("--mem", type=int, default=512, metavar="MiB", help="guest RAM (default 512)")
    g.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="kvm (-cpu host,+pku), tcg (-cpu max) or auto (default)")
    g.add_argument("--paging", type=int, choices=(4, 5), default=5,
                   help="guest paging depth (default 5; 4 removes LA57)")
    g.add_argument("--pti", choices=("auto", "on", "off"), default="auto",
                   help="kernel page-table isolation (default: the kernel's choice)")
    g.add_argument("--append", default="", help="extra kernel command line")
    g.add_argument("--boot-timeout", type=positive_seconds, default=180.0, metavar="S",
                   help="give up on a guest not ready after S seconds (default 180)")
    g.add_argument("--file", action="append", metavar="HOST[:GUEST]",
                   help="put a host file in the guest (default /usr/bin/NAME); repeatable")
    g.add_argument("--run-dir", type=Path, help="artifact folder (default: a new one under "
                   "$TESTBED_RUNS or ./testbed-runs)")
    g.add_argument("--gdb", action="store_true",
                   help="QEMU's gdbstub on RUN_DIR/gdb.sock; prints a gdb command line that "
                        "loads the kernel's vmlinux")


GDB_SOCKET = "gdb.sock"
GDB_SCRIPT = Path(__file__).with_name("tb_gdb.py")  # the testbed's gdb commands (tb-walk)
GDB_CONFIG = "tb-gdb.json"  # beside gdb.sock: how tb-walk calls the testbed


def gdb_setup(run_dir: Path) -> Path:
    """Write the run folder's tb-gdb.json: the testbed's Python and source tree, for the
    gdb commands of tb_gdb.py (gdb's own Python has no testbed)."""
    path = run_dir / GDB_CONFIG
    path.write_text(json.dumps({"python": sys.executable, "source_root": str(paths.SOURCE_ROOT),
                                "run_dir": str(run_dir.resolve())}, indent=1) + "\n")
    return path


def gdb_qemu_args() -> list[str]:
    """QEMU's gdbstub on a unix socket in the run folder (QEMU's working directory: a
    relative path, as the QMP socket's, against the 108-byte limit of socket paths)."""
    return ["-chardev", f"socket,id=gdb0,path={GDB_SOCKET},server=on,wait=off",
            "-gdb", "chardev:gdb0"]


def gdb_command(run_dir: Path, kernel: Path) -> str:
    """The gdb command line for a guest started with --gdb: its vmlinux (beside a cached
    bzImage), the kernel tree's lx-* scripts when a vmlinux-gdb.py lies beside it (a
    build with CONFIG_GDB_SCRIPTS) and the testbed's own commands (tb-walk ADDR [PID]: the
    page-table walk by the testbed's walker), attached to the stub."""
    from testbed.snapshot.memdump import kernel_files

    vmlinux = kernel_files(kernel).get("vmlinux")
    cmd = ["gdb", "-q"]
    if vmlinux is not None:
        cmd.append(vmlinux)
        script = Path(vmlinux).with_name("vmlinux-gdb.py")
        if script.is_file():
            cmd += ["-iex", f"add-auto-load-safe-path {script.parent}", "-ex",
                    f"source {script}"]
    cmd += ["-ex", f"source {GDB_SCRIPT}", "-ex", f"target remote {GDB_SOCKET}"]
    return f"cd {shlex.quote(str(run_dir))} && {shlex.join(cmd)}"


def machine_from_args(args: argparse.Namespace, kind: str) -> Machine:
    """Resolve kernel, image and accelerator from the options; say which accelerator and why.

    The run folder exists from the start, so even a bad option leaves one behind.
    """
    run_dir = args.run_dir
    if run_dir is not None:
        paths.make_private(paths.prepare_run_dir(run_dir))
    else:
        run_dir = paths.new_run_dir(kind)
    try:
        return _machine(args, run_dir)
    except TestbedError as exc:
        exc.run_dir = exc.run_dir or run_dir
        raise


def _machine(args: argparse.Namespace, run_dir: Path) -> Machine:
    kernel = (resolve_kernel_spec(args.kernel, args.kernel_series) if args.kernel
              else default_kernel())
    info = inspect_kernel(kernel)
    if args.smp < 1 or args.mem < 64:
        raise TestbedError("--smp must be at least 1 and --mem at least 64 MiB")
    if args.initrd is not None:
        check_initrd(args.initrd)
        initrd, ours = args.initrd, False
    else:
        initrd, ours = build_image(ImageSpec(kernel=info)).path, True
    accel = resolve_accel(args.accel, args.paging, kernel, initrd)
    print(f"testbed: {accel.describe()}", file=sys.stderr)
    cfg = MachineConfig(
        kernel=kernel, initrd=initrd, accel=accel, smp=args.smp, mem_mib=args.mem,
        paging=args.paging, pti=args.pti, append=args.append,
        boot_timeout=args.boot_timeout, ready_marker=ours, files=parse_files(args.file or []),
        extra_args=gdb_qemu_args() if getattr(args, "gdb", False) else [],
    )
    return Machine(cfg, run_dir)


# What an initramfs starts with: a cpio archive ("newc" or "crc"), or one compressed by
# a method the kernel can unpack (gzip, bzip2, lzma, xz, lzo, lz4, zstd).
INITRD_MAGICS = (b"070701", b"070702", b"\x1f\x8b", b"BZh", b"\x5d\x00\x00",
                 b"\xfd7zXZ\x00", b"\x89LZO", b"\x02\x21\x4c\x18", b"\x28\xb5\x2f\xfd")


def check_initrd(path: Path) -> None:
    """A user's --initrd: a readable file that looks like an initramfs; TestbedError if not."""
    if not path.exists():
        raise TestbedError(f"initrd {path} does not exist: pass an initramfs file")
    if not path.is_file():
        raise TestbedError(f"initrd {path} is not a file: pass an initramfs file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise TestbedError(f"initrd {path} cannot be read ({exc.strerror})") from None
    if not head.startswith(INITRD_MAGICS):
        raise TestbedError(f"initrd {path} is not an initramfs (neither a cpio archive nor a "
                           f"compressed one; it starts {head[:6]!r}): pass an initramfs file")


def positive_seconds(text: str) -> float:
    """argparse type of a timeout: seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 seconds")
    return value


def prepare_snapshots_dir(folder: Path) -> Path:
    """--snapshots DIR: made now and checked writable, before any guest boots."""
    return paths.prepare_run_dir(folder, "--snapshots")


def parse_files(specs: list[str]) -> dict[str, Path]:
    """--file HOST[:GUEST] options: guest path (default /usr/bin/<name>) -> host path."""
    files: dict[str, Path] = {}
    for spec in specs:
        host, _, guest = spec.partition(":")
        path = Path(host)
        if not path.is_file():
            raise TestbedError(f"--file {spec}: {host} is not a file")
        guest = (guest or f"/usr/bin/{path.name}").lstrip("/")
        if not guest or guest.endswith("/") or ".." in guest.split("/"):
            raise TestbedError(f"--file {spec}: give the guest path as HOST:/path/in/guest")
        files[guest] = path
    return files


def boot_with_progress(m: Machine) -> None:
    prog = Progress("boot")
    prog.update(f"starting QEMU ({m.run_dir})", force=True)
    try:
        m.start()
        prog.update("waiting for the guest", force=True)
        m.wait_ready()
    except BaseException:
        prog.done("failed")
        m.stop()
        raise
    prog.done(f"ready in {m.timings.get('boot', 0) + m.timings.get('ssh', 0):.1f}s")


def terminate_on_signals() -> None:
    """SIGINT/SIGTERM/SIGHUP unwind like Ctrl-C, so every guest is stopped and cleaned up.

    SIGINT too: a process started in the background by a non-interactive shell
    (as CI runners do) inherits SIGINT ignored, and Python then leaves it so.
    """

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def guest_command(argv: list[str]) -> str:
    """Shell text for argv that keeps the shell around to report signal deaths as 128+N."""
    return shlex.join(argv) + "\nexit $?"


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        argv = ["tb-pkey_fault"]  # the built-in default: prove MPK works in the guest
    terminate_on_signals()
    if args.snapshots is not None:
        prepare_snapshots_dir(args.snapshots)
    m = machine_from_args(args, "exec")
    boot_with_progress(m)
    if args.gdb:
        gdb_setup(m.run_dir)
        print(f"testbed: gdb: {gdb_command(m.run_dir, m.cfg.kernel)}", file=sys.stderr,
              flush=True)
    snapper = None
    try:
        if args.snapshots is not None:
            snapper = snapshot_on_checkpoints(m, args.snapshots)
        res = m.run(
            guest_command(argv), timeout=args.timeout,
            stdout=sys.stdout.buffer, stderr=sys.stderr.buffer, label=shlex.join(argv),
        )
    finally:
        m.stop()
        if snapper is not None:
            snapper.close()
    return res.status if res.status >= 0 else 255


def snapshot_on_checkpoints(m: Machine, folder: Path) -> Any:
    """Write folder/NAME.json at every guest checkpoint (tb-checkpoint NAME)."""
    from testbed.boot.machine import Checkpoint
    from testbed.snapshot.live import LiveSnapshotter, write_snapshot
    from testbed.snapshot.snapshot import Trigger

    assert m.qmp is not None
    snapper = LiveSnapshotter(m.qmp, m.ram_path, m.cfg.kernel)
    folder.mkdir(parents=True, exist_ok=True)

    def on_checkpoint(ck: Checkpoint) -> None:
        snap = snapper.capture(ck.name, Trigger(ck.name, ck.pid, ck.tid, dict(ck.facts)))
        write_snapshot(snap, folder, ck.name)

    m.on_checkpoint = on_checkpoint
    return snapper


def cmd_boot(args: argparse.Namespace) -> int:
    terminate_on_signals()
    m = machine_from_args(args, "boot")
    boot_with_progress(m)
    try:
        print(f"run folder:  {m.run_dir}")
        print(f"QMP socket:  {m.qmp_socket}")
        print(f"console log: {m.console_log}")
        print(f"guest RAM:   {m.ram_path}")
        if args.gdb:
            gdb_setup(m.run_dir)
            print(f"gdb:         {gdb_command(m.run_dir, m.cfg.kernel)}")
        if m.keys and m.ssh_port:
            from testbed.boot.ssh import ssh_command_line

            print(f"ssh:         {ssh_command_line(m.keys, m.ssh_port)}")
        print("Ctrl-C stops the guest.", flush=True)
        while True:
            m.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        m.stop()


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("exec", help="boot a guest, run a command in it, exit with its status")
    add_machine_options(p)
    p.add_argument("--timeout", type=positive_seconds, default=None, metavar="S",
                   help="fail if the command runs longer than S seconds")
    p.add_argument("--snapshots", type=Path, metavar="DIR",
                   help="write DIR/NAME.json at each guest checkpoint (tb-checkpoint NAME)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS... (default: tb-pkey_fault)")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("boot", help="start a guest and keep it up until interrupted")
    add_machine_options(p)
    p.set_defaults(func=cmd_boot)
