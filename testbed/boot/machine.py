"""A QEMU guest: launch, watch, talk to, and always clean up.

Guest RAM lives in a per-run file in /dev/shm (the host reads guest memory
through it); QMP goes over a socketpair to qemu.qmp, and a second QMP
socket in the run folder is left for people and other tools; the serial
console is written to the run folder. QEMU gets a parent-death signal and
its own process group, so it never outlives the testbed; the RAM file is
deleted on stop, and files left by a killed testbed are swept at the next
start (each is flock()ed by its owner while in use).
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from testbed import paths
from testbed.boot import console
from testbed.boot.cmdport import (
    MAX_REPLY_LINE,
    ReplyParser,
    command_file,
    encode_command,
    short_reply,
)
from testbed.boot.hostcaps import GUEST_KERNEL_PARAMS, QEMU, Accel, choose_accel
from testbed.boot.kernelimage import KernelInfo, inspect_kernel
from testbed.boot.qmp import QMP
from testbed.boot.rr import MODES as RR_MODES
from testbed.boot.rr import rr_qemu_args
from testbed.boot.ssh import (
    MAX_KEPT_OUTPUT,
    CommandResult,
    SshChannel,
    SshKeys,
    free_port,
    make_keys,
)
from testbed.build.cpio import Entry
from testbed.build.initramfs import READY_MARKER, SERIAL_PORTS_PARAM, with_overlay
from testbed.errors import (
    GuestError,
    GuestPanic,
    GuestStuck,
    GuestTimeout,
    QemuCrash,
    TestbedError,
)

CHECKPOINT_PORT = "org.testbed.checkpoint"  # virtio-serial port name, see guest/lib/tb_checkpoint.c
SHM_DIR = Path(os.environ.get("TESTBED_SHM_DIR", "/dev/shm"))
SHM_PREFIX = "testbed-ram-"
_PR_SET_PDEATHSIG = 1
_PORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class MachineConfig:
    kernel: Path
    initrd: Path  # the base image; per-run files are appended as an overlay
    accel: Accel
    smp: int = 2
    mem_mib: int = 512
    paging: int = 5
    pti: str = "auto"  # auto | on | off
    append: str = ""  # extra kernel command line
    boot_timeout: float = 180.0
    ssh: bool = True
    ready_marker: bool = True  # our images print one; a user's image is ready when SSH answers
    files: dict[str, Path] = field(default_factory=dict)  # guest path -> host file, per run
    # extra named virtio-serial ports, each a unix socket in the run folder (port_socket())
    serial_ports: tuple[str, ...] = ()
    extra_args: list[str] = field(default_factory=list)
    # QEMU record/replay (testbed/boot/rr.py): "record" or "replay" the log `rr_log` (a
    # path relative to the run folder). One vCPU under TCG, no SSH and no network:
    # checkpoints and commands share the serial line ttyS1 (QEMU records serial lines
    # only; testbed/boot/cmdport.py). A replay boots `initrd` as it is (the recording's
    # image, no overlay) and starts stopped.
    rr: str = ""
    rr_log: str = ""
    # the commands a recorded guest may run (Machine.run), put in its image: the host
    # sends their number only (testbed/boot/cmdport.py)
    rr_commands: tuple[str, ...] = ()


def kernel_cmdline(cfg: MachineConfig) -> str:
    parts = ["console=ttyS0,115200", "panic=-1", "rdinit=/init", *GUEST_KERNEL_PARAMS]
    if cfg.paging == 4:
        parts.append("no5lvl")
    if cfg.pti in ("on", "off"):
        parts.append(f"pti={cfg.pti}")
    if cfg.rr:
        parts.append(SERIAL_PORTS_PARAM)
    if cfg.append:
        parts.append(cfg.append)
    return " ".join(parts)


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def sweep_stale_ram_files(shm_dir: Path | None = None) -> list[Path]:
    """Delete RAM files whose owner died without cleaning up (its flock is gone)."""
    shm_dir = shm_dir or SHM_DIR
    removed = []
    for f in shm_dir.glob(SHM_PREFIX + "*"):
        try:
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # alive: its owner holds the lock
            continue
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def check_ram_room(mem_mib: int, shm_dir: Path | None = None) -> None:
    """Refuse, before boot, guest RAM the host cannot hold: a guest that touches RAM
    beyond the free space of /dev/shm dies of SIGBUS mid-command."""
    shm_dir = shm_dir or SHM_DIR
    need = mem_mib << 20
    total = _host_memory()
    if total is not None and need > total:
        raise TestbedError(f"--mem {mem_mib} MiB is more than the host's memory "
                           f"({total >> 20} MiB): ask for less")
    try:
        st = os.statvfs(shm_dir)
    except OSError as exc:
        raise TestbedError(f"guest RAM folder {shm_dir} is not usable ({exc.strerror}): "
                           "set TESTBED_SHM_DIR to a tmpfs folder") from exc
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise TestbedError(f"{shm_dir} has {free >> 20} MiB free, the guest needs {mem_mib} MiB "
                           f"(--mem): free space there or ask for less")


def _free_mib(folder: Path) -> int | str:
    try:
        st = os.statvfs(folder)
    except OSError:
        return "?"
    return (st.f_bavail * st.f_frsize) >> 20


def _host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


LOGGED_LINE = 200  # bytes of a request line kept in the checkpoint log
MAX_LOGGED_ERRORS = 100


def bounded_lines(reader: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """Lines of at most `limit` bytes from `reader`; None for each longer one, whose
    bytes are read and dropped without ever holding more than `limit` of them."""
    while True:
        line = reader.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit:
            yield line
            continue
        while line and not line.endswith(b"\n"):  # drop the rest of the long line
            line = reader.readline(limit)
        yield None


@dataclass(frozen=True)
class Checkpoint:
    """A guest thread asked the host to look: it waits until the handler returns."""

    name: str
    pid: int
    tid: int
    facts: dict[str, str] = field(default_factory=dict)  # KEY=VALUE the guest added


MAX_LINE = 64 << 10  # longest line taken from the guest on the checkpoint channel
MAX_NAME = 64
MAX_FACTS = 256  # rpal_limits sends 69
MAX_ID = 1 << 22  # PID_MAX_LIMIT: pids and tids are below it
# A checkpoint name becomes a file name on the host (snapshots/NAME.json): one path
# component of plain characters, never "." or "..", never hidden.
NAME_RE = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}")
FACT_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
FACT_VALUE_RE = re.compile(r"[\x21-\x7e]{0,1024}")  # printable ASCII, no space


def check_checkpoint_name(name: str) -> str:
    """`name` if it is safe as a host file name; ValueError otherwise (pure)."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"checkpoint name {name[:80]!r} refused: one path component of "
                         f"letters, digits, '_', '-', '.' (no '..'), at most {MAX_NAME} "
                         f"characters")
    return name


def _guest_id(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < MAX_ID:
        raise ValueError(f"checkpoint {what} {text[:40]!r} is not a number in 1..{MAX_ID - 1}")
    return int(text)


def parse_checkpoint_request(line: bytes) -> Checkpoint:
    """Parse "checkpoint NAME PID TID [KEY=VALUE...]" (pure); ValueError when malformed.

    The line comes from the guest: hostile input. Only printable ASCII is taken; the
    name must be safe as a file name, pid and tid in range, facts bounded.
    """
    if len(line) > MAX_LINE:
        raise ValueError(f"checkpoint request of {len(line)} bytes refused (at most {MAX_LINE})")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"checkpoint request {line[:80]!r} is not ASCII") from None
    text = text.rstrip("\r\n")
    if not all(" " <= c <= "~" for c in text):
        raise ValueError(f"checkpoint request {text[:80]!r} has control characters")
    parts = text.split()
    if len(parts) < 4 or parts[0] != "checkpoint":
        raise ValueError(f"malformed checkpoint request {text[:80]!r}")
    name = check_checkpoint_name(parts[1])
    pid, tid = _guest_id(parts[2], "pid"), _guest_id(parts[3], "tid")
    if len(parts) - 4 > MAX_FACTS:
        raise ValueError(f"checkpoint {name}: {len(parts) - 4} facts refused "
                         f"(at most {MAX_FACTS})")
    facts = {}
    for token in parts[4:]:
        key, eq, value = token.partition("=")
        if not eq or not FACT_KEY_RE.fullmatch(key) or not FACT_VALUE_RE.fullmatch(value):
            raise ValueError(f"malformed checkpoint fact {token[:80]!r} (want KEY=VALUE)")
        facts[key] = value
    return Checkpoint(name, pid, tid, facts)


_live: set[Machine] = set()
_live_lock = threading.Lock()
_refuse_new = threading.Event()


def _stop_all() -> None:
    with _live_lock:
        machines = list(_live)
    for m in machines:
        m.stop()


def stop_all_guests(*, refuse_new: bool = True) -> None:
    """Stop every guest of this process (an interrupted run); with `refuse_new`, later
    Machine.start() calls fail at once instead of booting."""
    if refuse_new:
        _refuse_new.set()
    _stop_all()


def allow_new_guests() -> None:
    _refuse_new.clear()


atexit.register(_stop_all)


class Machine:
    """One guest. Use as a context manager: `with Machine(cfg) as m: m.run("uname -a")`."""

    def __init__(self, cfg: MachineConfig, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir or paths.new_run_dir("guest")
        self.console_log = self.run_dir / "console.log"
        self.qemu_log = self.run_dir / "qemu.log"
        self.qmp_socket = self.run_dir / "qmp.sock"  # for people and other tools
        self.ram_path = SHM_DIR / f"{SHM_PREFIX}{os.getpid()}-{self.run_dir.name[-6:]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QMP | None = None
        self.keys: SshKeys | None = None
        self.ssh_port: int | None = None
        self._ssh: SshChannel | None = None
        self._ram_fd: int | None = None
        self._panicked: str | None = None
        self._stopped = False
        self._stop_lock = threading.RLock()
        self.kernel_info: KernelInfo | None = None
        self.timings: dict[str, float] = {}
        self.ready_line: str | None = None
        # Called for each checkpoint, in a channel thread, while the guest thread waits;
        # an exception is reported to the guest ("err ...") and kept in checkpoint_errors.
        self.on_checkpoint: Callable[[Checkpoint], None] | None = None
        self.checkpoint_log: list[dict[str, Any]] = []
        self._ckpt_errors = 0
        self._commands = 0  # guest commands run; each one's output: command-N.stdout/.stderr
        self.last_stdout: Path | None = None  # command-N.stdout of the latest command
        self._stuck: str | None = None  # the guest could not be resumed after a snapshot
        self._ckpt_thread: threading.Thread | None = None
        # record/replay: the command port's lines, taken from the checkpoint line (ttyS1
        # carries both; None: the line closed), and who may write on that line
        self._cmd_lines: queue.Queue[bytes | None] | None = (
            queue.Queue() if cfg.rr else None)
        self._cmd_lock = threading.Lock()
        self._ckpt_sock: socket.socket | None = None
        self._ckpt_write = threading.Lock()

    # ----- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Machine:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _fail(self, exc_type: type[TestbedError], msg: str) -> TestbedError:
        return exc_type(msg, run_dir=self.run_dir)

    def start(self) -> None:
        t0 = time.monotonic()
        if _refuse_new.is_set():
            raise self._fail(TestbedError, "interrupted: no new guests are started")
        for name in self.cfg.serial_ports:
            if not _PORT_NAME.fullmatch(name) or len(name) > 64:
                raise self._fail(TestbedError, f"serial port name {name!r} is not usable "
                                 "(letters, digits, '.', '_', '-'; at most 64)")
        problem = rr_problem(self.cfg)
        if problem:
            raise self._fail(TestbedError, problem)
        self.kernel_info = inspect_kernel(self.cfg.kernel)
        if not self.cfg.initrd.is_file():
            raise self._fail(TestbedError, f"initrd {self.cfg.initrd} does not exist")
        paths.make_private(self.run_dir)
        sweep_stale_ram_files()
        try:
            check_ram_room(self.cfg.mem_mib)
        except TestbedError as exc:
            raise self._fail(TestbedError, str(exc)) from None
        # The RAM file: created and locked by us before QEMU opens it.
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self._ram_fd = os.open(self.ram_path, flags, 0o600)
        except OSError as exc:
            raise self._fail(TestbedError, f"cannot create the guest RAM file {self.ram_path} "
                             f"({exc.strerror}): set TESTBED_SHM_DIR to a writable tmpfs "
                             "folder") from None
        fcntl.flock(self._ram_fd, fcntl.LOCK_EX)
        with _live_lock:
            _live.add(self)
        overlay = []
        if self.cfg.ssh:
            self.keys = make_keys(self.run_dir / "ssh")
            overlay += list(self.keys.overlay)
        if self.cfg.rr == "record":
            overlay += [Entry.file(command_file(i), c.encode(), 0o644)
                        for i, c in enumerate(self.cfg.rr_commands)]
        for guest_path, host_path in sorted(self.cfg.files.items()):
            try:
                data = Path(host_path).read_bytes()
            except OSError as exc:
                raise self._fail(TestbedError, f"file {host_path} for the guest cannot be read "
                                 f"({exc.strerror})") from exc
            mode = 0o755 if os.access(host_path, os.X_OK) else 0o644
            overlay.append(Entry.file(guest_path, data, mode))
        if self.cfg.rr == "replay":  # the recording's image, byte for byte
            initrd = self.cfg.initrd
        else:
            initrd = with_overlay(self.cfg.initrd, overlay, self.run_dir / "initrd.cpio")
            initrd.chmod(0o600)  # it holds the guest's SSH host key
        for attempt in range(3):
            self.ssh_port = free_port() if self.cfg.ssh else None
            if self._launch(initrd):
                break
            if attempt == 2:
                raise self._fail(QemuCrash, "QEMU could not bind a free SSH port after 3 tries")
        self.timings["launch"] = time.monotonic() - t0
        self._write_meta()

    def qemu_args(self, initrd: Path, qmp_fd: int, ckpt_fd: int) -> list[str]:
        c = self.cfg
        args = [
            QEMU, "-name", f"testbed-{self.run_dir.name}",
            "-accel", c.accel.accel, "-cpu", c.accel.cpu,
            "-machine", "pc,memory-backend=mem",
            "-object",
            f"memory-backend-file,id=mem,size={c.mem_mib}M,mem-path={self.ram_path},share=on",
            "-m", f"{c.mem_mib}M",
            "-smp", f"{c.smp},sockets={c.smp},cores=1,threads=1",
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
            "-kernel", str(c.kernel), "-initrd", str(initrd), "-append", kernel_cmdline(c),
            "-chardev", f"file,id=con,path={self.console_log}", "-serial", "chardev:con",
            "-chardev", f"socket,id=qmp0,fd={qmp_fd}", "-mon", "chardev=qmp0,mode=control",
            # relative to QEMU's working directory (the run folder): a unix socket path
            # is limited to 108 bytes, which deep run folders exceed
            "-qmp", f"unix:{self.qmp_socket.name},server=on,wait=off",
            "-device", "pvpanic",
            "-action", "panic=pause,reboot=shutdown",
        ]
        if c.rr:
            # a serial line, which QEMU records (virtio-serial ports it does not), for
            # checkpoints and commands: COM2 has IRQ 3 to itself (COM3 would share IRQ 4
            # with the console, and ISA lines in QEMU do not share); no virtio-rng (host
            # entropy is not recorded), no network
            return args + [
                "-chardev", f"socket,id=ckpt,fd={ckpt_fd}", "-serial", "chardev:ckpt",
                *rr_qemu_args(c.rr, c.rr_log),
            ] + c.extra_args
        args += [
            # entropy at once: without it the SSH server waits for the kernel's CRNG
            # (1.17 s -> 0.18 s to the first command on our own kernel)
            "-device", "virtio-rng-pci",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=ckpt,fd={ckpt_fd}",
            "-device", f"virtserialport,bus=vser0.0,chardev=ckpt,name={CHECKPOINT_PORT}",
        ]
        for i, name in enumerate(c.serial_ports):
            args += [
                "-chardev",
                f"socket,id=port{i},path={self.port_path(name).name},server=on,wait=off",
                "-device", f"virtserialport,bus=vser0.0,chardev=port{i},name={name}",
            ]
        if self.ssh_port is not None:
            args += [
                # restrict=on: the guest reaches nothing, neither the host's services nor
                # the outside; only the SSH forward comes in
                "-netdev",
                f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", "virtio-net-pci,netdev=n0,romfile=",
            ]
        return args + c.extra_args

    def _launch(self, initrd: Path) -> bool:
        """Start QEMU and connect QMP; False when the SSH port was taken meanwhile."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ck_ours, ck_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = self.qemu_args(initrd, theirs.fileno(), ck_theirs.fileno())
        (self.run_dir / "qemu-cmdline.txt").write_text(" ".join(args) + "\n")
        fd = os.open(self.qemu_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with open(fd, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=[theirs.fileno(), ck_theirs.fileno()], start_new_session=True,
                cwd=self.run_dir, umask=0o077,  # its sockets and logs: ours alone
                preexec_fn=_set_pdeathsig,
            )
        theirs.close()
        ck_theirs.close()
        self._ckpt_sock = ck_ours
        with self._stop_lock:
            if self._stopped:  # stop() came while we were starting: it must not be missed
                ours.close()
                ck_ours.close()
                os.killpg(self.proc.pid, signal.SIGKILL)
                self._teardown()
                raise self._fail(TestbedError, "interrupted: the guest was stopped at start")
        self.qmp = QMP(f"testbed-{self.run_dir.name}")
        self.qmp.on_event(self._on_event)
        try:
            self.qmp.connect(ours, timeout=30)
        except Exception as exc:
            self.qmp.close()
            self.qmp = None
            code = self.proc.wait(timeout=10) if self.proc.poll() is None else self.proc.returncode
            log_text = self.qemu_log.read_text(errors="replace")
            if "Could not set up host forwarding rule" in log_text and self.ssh_port:
                self.qemu_log.write_text("")
                return False
            last = console.tail(log_text, 1) or f"exit status {code}"
            raise self._fail(QemuCrash, f"QEMU failed to start: {last}") from exc
        self._ckpt_thread = threading.Thread(
            target=self._checkpoint_loop, args=(ck_ours,), name="checkpoints", daemon=True
        )
        self._ckpt_thread.start()
        return True

    def _checkpoint_loop(self, sock: socket.socket) -> None:
        """Serve checkpoint requests until QEMU closes the channel."""
        try:
            self._serve_checkpoints(sock)
        except OSError:
            # QEMU went away (it resets the socket when it exits with a reply of ours
            # unread): the channel is closed, as at EOF. check_alive() reports a crash.
            pass

    def _serve_checkpoints(self, sock: socket.socket) -> None:
        try:
            with sock, sock.makefile("rb") as reader:
                for line in bounded_lines(reader, MAX_LINE):
                    if self._cmd_lines is not None and not (
                            line is not None and line.startswith(b"checkpoint ")):
                        self._command_line(line)
                        continue
                    reply = self._serve_one(line)
                    if self.cfg.rr:
                        reply = short_reply(reply)
                    try:
                        with self._ckpt_write:
                            sock.sendall(reply.encode())
                    except OSError:
                        return
        finally:
            if self._cmd_lines is not None:
                self._cmd_lines.put(None)

    def _command_line(self, line: bytes | None) -> None:
        """A line of the command port (record/replay: it shares ttyS1 with checkpoints)."""
        assert self._cmd_lines is not None
        if self.cfg.rr == "replay":  # the answers come again from the log: kept, unread
            with open(self.run_dir / "command-port.log", "ab") as log:
                log.write(line if line is not None else b"(a line too long)\n")
            return
        self._cmd_lines.put(line if line is not None else b"x" * (MAX_REPLY_LINE + 1))

    def _serve_one(self, line: bytes | None) -> str:
        """Handle one request line (None: a line over MAX_LINE, dropped); the reply."""
        t0 = time.monotonic()
        entry: dict[str, Any] = {}
        try:
            if line is None:
                raise ValueError(f"checkpoint request longer than {MAX_LINE} bytes refused")
            entry["line"] = line[:LOGGED_LINE].decode("ascii", "replace").strip()
            ck = parse_checkpoint_request(line)
            entry.update(name=ck.name, pid=ck.pid, tid=ck.tid)
            if self.on_checkpoint is not None:
                self.on_checkpoint(ck)
            reply = f"ok {ck.name}\n"
        except Exception as exc:  # noqa: BLE001 - reported to the guest and the log
            msg = exc.one_line() if isinstance(exc, TestbedError) else str(exc) or repr(exc)
            if isinstance(exc, GuestStuck):
                self._stuck = msg
            entry["error"] = msg
            reply = "err " + " ".join(msg.split())[:400] + "\n"
        entry["seconds"] = round(time.monotonic() - t0, 4)
        self._log_checkpoint(entry)
        return reply

    def _log_checkpoint(self, entry: dict[str, Any]) -> None:
        """checkpoints.jsonl and checkpoint_log, bounded: a guest that floods the channel
        with bad requests gets MAX_LOGGED_ERRORS entries, then one saying how many more."""
        if "error" in entry:
            self._ckpt_errors += 1
            if self._ckpt_errors > MAX_LOGGED_ERRORS:
                if self._ckpt_errors == MAX_LOGGED_ERRORS + 1:
                    entry = {"error": f"more than {MAX_LOGGED_ERRORS} refused checkpoint "
                             "requests: the rest are not logged"}
                else:
                    return
        self.checkpoint_log.append(entry)
        with open(self.run_dir / "checkpoints.jsonl", "a") as log:
            log.write(json.dumps(entry) + "\n")

    def _on_event(self, ev: dict[str, Any]) -> None:
        if ev.get("event") == "GUEST_PANICKED":
            self._panicked = "pvpanic reported a guest panic"

    # ----- health ----------------------------------------------------------------------------

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raise GuestPanic / QemuCrash if the guest panicked or QEMU is gone."""
        state = console.scan(self.console_text(), READY_MARKER)
        if state.panic or self._panicked:
            why = state.panic or self._panicked
            raise self._fail(GuestPanic, f"guest kernel panic: {why}")
        if self._stuck:
            raise self._fail(GuestStuck, self._stuck)
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            last = console.tail(self.qemu_log.read_text(errors="replace"), 1)
            detail = f": {last}" if last else ""
            if code == -signal.SIGBUS:
                detail += (f" (SIGBUS: the guest RAM file {self.ram_path} could not grow; "
                           f"is {SHM_DIR} full? {_free_mib(SHM_DIR)} MiB free)")
            raise self._fail(QemuCrash, f"QEMU exited unexpectedly with status {code}{detail}")

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the guest's ready line (and SSH), failing on panic, crash or timeout."""
        timeout = self.cfg.boot_timeout if timeout is None else timeout
        t0 = time.monotonic()
        deadline = t0 + timeout
        while self.cfg.ready_marker:
            self.check_alive()
            state = console.scan(self.console_text(), READY_MARKER)
            if state.ready:
                self.ready_line = state.ready
                break
            if time.monotonic() > deadline:
                last = console.tail(self.console_text(), 1) or "(no console output)"
                raise self._fail(
                    GuestTimeout,
                    f"guest not ready after {timeout:g} s (hang?); last console line: {last}",
                )
            time.sleep(0.05)
        self.timings["boot"] = time.monotonic() - t0
        if self.cfg.ssh:
            assert self.keys is not None and self.ssh_port is not None
            self._ssh = SshChannel(self.keys, self.ssh_port)
            self._ssh.connect(max(5.0, deadline - time.monotonic()), alive=self.check_alive)
            self.timings["ssh"] = time.monotonic() - t0 - self.timings["boot"]
        self._write_meta()

    # ----- use -------------------------------------------------------------------------------

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        label: str | None = None,
    ) -> CommandResult:
        """Run a shell command in the guest over SSH (or the serial command port of a
        recorded guest)."""
        if self.cfg.rr == "replay":
            raise GuestError("a replayed guest takes no commands: they come from its log")
        if self._ssh is None and self._cmd_lines is None:
            raise GuestError("the guest has no SSH channel (started with ssh=False?)")
        self._commands += 1
        base = self.run_dir / f"command-{self._commands}"
        self.last_stdout = Path(f"{base}.stdout")
        try:
            with open(f"{base}.stdout", "wb") as out, open(f"{base}.stderr", "wb") as err:
                if self._ssh is None:
                    res = self._run_serial(command, timeout, label or command)
                    for stream, data in ((out, res.stdout), (err, res.stderr),
                                         (stdout, res.stdout), (stderr, res.stderr)):
                        if stream is not None:
                            stream.write(data)
                            stream.flush()
                    return res
                res = self._ssh.run(
                    command, timeout=timeout, stdout=stdout, stderr=stderr,
                    alive=self.check_alive, label=label, stdout_file=out, stderr_file=err,
                )
            if res.status < 0:  # the session ended without an exit status
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    self.check_alive()  # QEMU or the kernel died: say that
                    time.sleep(0.1)
                raise GuestError(
                    f"guest command ended without an exit status: {label or command}"
                )
            return res
        except GuestError as exc:
            if exc.run_dir is None:
                exc.run_dir = self.run_dir
            # a command that dies with the guest: report the guest's death, not the symptom
            self.check_alive()
            raise

    def _run_serial(self, command: str, timeout: float | None, what: str) -> CommandResult:
        """One command over the serial command port (a recorded guest: no SSH)."""
        assert self._ckpt_sock is not None
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        parser = ReplyParser(MAX_KEPT_OUTPUT)
        with self._cmd_lock:
            try:
                with self._ckpt_write:
                    self._ckpt_sock.sendall(encode_command(self.cfg.rr_commands, command))
            except OSError as exc:
                self.check_alive()
                raise GuestError(f"cannot send a command to the guest ({exc}): {what}"
                                 ) from None
            while not parser.feed(self._cmd_line(deadline, what)):
                pass
        assert parser.status is not None
        return CommandResult(parser.status, parser.stdout, parser.stderr,
                             time.monotonic() - t0, parser.truncated)

    def _cmd_line(self, deadline: float | None, what: str) -> bytes:
        """The next line from the command port; fails when QEMU or the kernel died, the
        line closed, or at the deadline."""
        assert self._cmd_lines is not None
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise GuestTimeout(f"guest command did not finish in time: {what}")
            try:
                line = self._cmd_lines.get(timeout=0.25)
            except queue.Empty:
                self.check_alive()
                continue
            if line is None:
                self._cmd_lines.put(None)  # closed for good
                self.check_alive()
                raise GuestError(f"the guest's command port closed during: {what}")
            return line

    def replay_icount(self) -> int:
        """The guest's instruction count (QMP query-replay) of a recorded or replayed guest."""
        got = self.execute("query-replay")
        count = got.get("icount") if isinstance(got, dict) else None
        if not isinstance(count, int):
            raise GuestError(f"QMP query-replay gave no instruction count: {got!r}")
        return count

    def port_path(self, name: str) -> Path:
        """The unix socket of the extra virtio-serial port `name` (MachineConfig.serial_ports)."""
        if name not in self.cfg.serial_ports:
            raise GuestError(f"the machine has no serial port {name!r} "
                             "(MachineConfig.serial_ports)")
        return self.run_dir / f"port-{name}.sock"

    def port_socket(self, name: str) -> socket.socket:
        """A connected socket to the extra virtio-serial port `name` (one client at a time)."""
        return connect_unix(self.port_path(name))

    def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        if self.qmp is None:
            raise GuestError("QMP is not connected")
        return self.qmp.execute(cmd, args)

    # ----- teardown --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop QEMU and clean up; safe to call again, and from another thread (an
        interrupted run stops the guests its workers are using)."""
        with self._stop_lock:
            self._stopped = True
            self._teardown()

    def _teardown(self) -> None:
        """Undo whatever start() got to; idempotent."""
        if self._ssh is not None:
            self._ssh.close()
        if self.proc is not None and self.proc.poll() is None and self.qmp is not None:
            try:
                self.qmp.execute("quit", timeout=3)
            except Exception:  # noqa: BLE001 - QEMU may be wedged; we kill it next
                pass
        if self.qmp is not None:
            self.qmp.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
            self.timings["qemu_exit_status"] = float(self.proc.returncode)
        if self._ram_fd is not None:  # ours: created by start()
            try:
                self.ram_path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._ram_fd)
            self._ram_fd = None
        if self.cfg.rr != "record":  # a recording keeps its image: the replay boots it
            try:
                (self.run_dir / "initrd.cpio").unlink()  # rebuilt from cache + overlay
            except FileNotFoundError:
                pass
        with _live_lock:
            _live.discard(self)
        self._write_meta()

    def _write_meta(self) -> None:
        meta = {
            "kernel": str(self.cfg.kernel),
            "kernel_version": self.kernel_info.version if self.kernel_info else None,
            "initrd": str(self.cfg.initrd),
            "accel": asdict(self.cfg.accel),
            "cmdline": kernel_cmdline(self.cfg),
            "smp": self.cfg.smp,
            "mem_mib": self.cfg.mem_mib,
            "paging": self.cfg.paging,
            "rr": self.cfg.rr,
            "qemu_pid": self.proc.pid if self.proc else None,
            "ram_file": str(self.ram_path),
            "qmp_socket": str(self.qmp_socket),
            "ssh_port": self.ssh_port,
            "ssh_key": str(self.keys.client_key) if self.keys else None,
            "ready_line": self.ready_line,
            "timings": self.timings,
            "stopped": self._stopped,
        }
        (self.run_dir / "machine.json").write_text(json.dumps(meta, indent=2) + "\n")


def rr_problem(cfg: MachineConfig) -> str:
    """Why `cfg` cannot run under record/replay ("" when it can, or is not asked to)."""
    if not cfg.rr:
        return ""
    if cfg.rr not in RR_MODES:
        return f"record/replay mode {cfg.rr!r}: choose {' or '.join(RR_MODES)}"
    if not cfg.rr_log:
        return "record/replay needs the log's path (rr_log)"
    if cfg.smp != 1:
        return (f"QEMU records and replays one vCPU only: --smp {cfg.smp} cannot be "
                "recorded")
    if cfg.accel.accel != "tcg":
        return "QEMU's record/replay needs TCG (-icount): not with -accel " + cfg.accel.accel
    if cfg.ssh or cfg.serial_ports:
        return ("a recorded guest has no SSH and no extra serial ports (they are not "
                "replayed): it takes commands on its serial command port")
    return ""


def connect_unix(path: Path) -> socket.socket:
    """Connect to a unix socket however long its path (through /proc/self/fd of its folder)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{dir_fd}/{path.name}")
    except OSError:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock


def resolve_accel(want: str, paging: int, kernel: Path, initrd: Path) -> Accel:
    return choose_accel(want, paging, boot_check=(kernel, initrd))


def dry_run_args(cfg: MachineConfig, run_dir: Path) -> list[str]:
    """The QEMU command line a guest of `cfg` would get in `run_dir`, starting nothing:
    the SSH port, picked free at start, shows as PORT and the socketpairs' fds as QMP and
    CHECKPOINT."""
    m = Machine(cfg, run_dir)
    if cfg.ssh:
        m.ssh_port = 0
    args = m.qemu_args(run_dir / "initrd.cpio", -1, -2)
    return [a.replace("fd=-1", "fd=QMP").replace("fd=-2", "fd=CHECKPOINT")
            .replace("127.0.0.1:0-", "127.0.0.1:PORT-") for a in args]
