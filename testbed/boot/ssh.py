"""The SSH command channel: per-run keys, and commands run with paramiko.

Both key pairs are made fresh for every run: the guest's host key (by
dropbearkey, in dropbear's format, put in the per-run initramfs overlay) and
the client key (by paramiko, authorised in the guest). The client pins the
host key, so nothing is trusted on first use.
"""

from __future__ import annotations

import io
import logging
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paramiko

from testbed.build.cpio import Entry
from testbed.errors import GuestError, GuestTimeout, TestbedError

GUEST_HOST_KEY = "etc/dropbear/dropbear_ecdsa_host_key"

# paramiko logs every failed connect attempt (a guest still booting) with a traceback;
# without a handler of its own Python prints those on stderr. The errors that matter
# come back as exceptions.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


@dataclass(frozen=True)
class SshKeys:
    folder: Path
    client_key: Path  # OpenSSH/PEM private key, usable with `ssh -i`
    known_hosts: Path
    host_public: str  # "ecdsa-sha2-nistp256 AAAA..."
    overlay: tuple[Entry, ...]  # files for the guest: host key, authorized_keys


def make_keys(folder: Path) -> SshKeys:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    host_key = folder / "guest_host_key.dropbear"
    try:
        subprocess.run(
            ["dropbearkey", "-t", "ecdsa", "-s", "256", "-f", str(host_key)],
            capture_output=True, check=True,
        )
        pub = subprocess.run(
            ["dropbearkey", "-y", "-f", str(host_key)], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise TestbedError(f"dropbearkey failed ({exc}): run `testbed setup`") from exc
    host_key.chmod(0o600)
    host_public = next(ln for ln in pub.splitlines() if ln.startswith("ecdsa-"))
    host_public = " ".join(host_public.split()[:2])
    client = paramiko.ECDSAKey.generate(bits=256)
    client_key = folder / "id_ecdsa"
    client.write_private_key_file(str(client_key))
    client_key.chmod(0o600)
    authorized = f"{client.get_name()} {client.get_base64()} testbed\n"
    (folder / "id_ecdsa.pub").write_text(authorized)
    (folder / "id_ecdsa.pub").chmod(0o600)
    known_hosts = folder / "known_hosts"
    overlay = (
        Entry.file(GUEST_HOST_KEY, host_key.read_bytes(), 0o600),
        Entry.file("root/.ssh/authorized_keys", authorized.encode(), 0o600),
    )
    return SshKeys(folder, client_key, known_hosts, host_public, overlay)


def write_known_hosts(keys: SshKeys, port: int) -> None:
    keys.known_hosts.write_text(f"[127.0.0.1]:{port} {keys.host_public}\n")


# Output of a guest command kept in memory, per stream; the rest goes only to the
# streams and files given to run() (Machine.run keeps all of it in the run folder).
MAX_KEPT_OUTPUT = 16 << 20
# What one stream of one guest command may put in a file of the run folder: the guest
# must not fill the host's disk. Past it, one line says so and the rest is dropped.
MAX_FILE_OUTPUT = 256 << 20


class CappedFile:
    """A file that takes at most `limit` bytes, then one truncation notice."""

    def __init__(self, stream: BinaryIO, limit: int = MAX_FILE_OUTPUT) -> None:
        self.stream = stream
        self.limit = limit
        self.written = 0
        self.dropped = 0

    def write(self, data: bytes) -> None:
        room = self.limit - self.written
        if room > 0:
            self.stream.write(data[:room])
            self.written += min(room, len(data))
        if len(data) > room:
            if not self.dropped:
                self.stream.write(f"\n[testbed: output truncated after {self.limit} bytes]\n"
                                  .encode())
            self.dropped += len(data) - max(room, 0)

    def flush(self) -> None:
        self.stream.flush()


@dataclass
class CommandResult:
    status: int
    stdout: bytes  # at most MAX_KEPT_OUTPUT bytes: the start of the output
    stderr: bytes
    seconds: float
    truncated: bool = False  # stdout or stderr was longer than what is kept here


class BoundedBuffer:
    """The first `limit` bytes written, and how many there were in all."""

    def __init__(self, limit: int = MAX_KEPT_OUTPUT) -> None:
        self.limit = limit
        self.total = 0
        self._buf = io.BytesIO()

    def write(self, data: bytes) -> None:
        room = self.limit - self._buf.tell()
        if room > 0:
            self._buf.write(data[:room])
        self.total += len(data)

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def getvalue(self) -> bytes:
        return self._buf.getvalue()


class SshChannel:
    """An SSH session to the guest, with the host key pinned."""

    def __init__(self, keys: SshKeys, port: int) -> None:
        self.keys = keys
        self.port = port
        self.client: paramiko.SSHClient | None = None

    def connect(self, timeout: float, alive: Callable[[], None] = lambda: None) -> None:
        """Connect, retrying until `timeout`; `alive` raises if the guest died meanwhile."""
        write_known_hosts(self.keys, self.port)
        pkey = paramiko.ECDSAKey.from_private_key_file(str(self.keys.client_key))
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            alive()
            client = paramiko.SSHClient()
            client.load_host_keys(str(self.keys.known_hosts))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(
                    "127.0.0.1", port=self.port, username="root", pkey=pkey,
                    timeout=5, banner_timeout=10, auth_timeout=10,
                    allow_agent=False, look_for_keys=False,
                )
                self.client = client
                return
            except paramiko.BadHostKeyException as exc:
                client.close()
                msg = f"guest SSH host key does not match this run's key: {exc}"
                raise GuestError(msg) from exc
            except (OSError, paramiko.SSHException, EOFError) as exc:
                client.close()
                last = exc
                time.sleep(0.2)
        raise GuestTimeout(f"guest SSH server on 127.0.0.1:{self.port} not reachable: {last}")

    def run(
        self,
        command: str,
        *,
        timeout: float | None = None,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
        alive: Callable[[], None] = lambda: None,
        label: str | None = None,
        keep: int = MAX_KEPT_OUTPUT,
        stdout_file: BinaryIO | None = None,
        stderr_file: BinaryIO | None = None,
    ) -> CommandResult:
        """Run `command` (a shell string) in the guest; stream output if streams are given.

        `label` names the command in errors (default: the command itself). The output
        is the guest's, of any size: the result keeps the first `keep` bytes of each
        stream; the streams and the files get all of it.
        """
        if self.client is None:
            raise GuestError("SSH channel used before connect()")
        transport = self.client.get_transport()
        if transport is None:
            raise GuestError("SSH connection to the guest is closed")
        start = time.monotonic()
        chan = transport.open_session()
        chan.exec_command(command)
        out, err = BoundedBuffer(keep), BoundedBuffer(keep)
        files = [CappedFile(f) if f is not None else None for f in (stdout_file, stderr_file)]
        while True:
            busy = _drain(chan.recv_ready, chan.recv, out, stdout, files[0])
            busy = _drain(chan.recv_stderr_ready, chan.recv_stderr, err, stderr,
                          files[1]) or busy
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if timeout is not None and time.monotonic() - start > timeout:
                chan.close()
                what = label or command
                raise GuestTimeout(f"guest command did not finish within {timeout:g} s: {what}")
            alive()
            if transport.is_active() is False:
                raise GuestError(f"SSH connection dropped while running: {label or command}")
            if not busy:
                time.sleep(0.01)
        status = chan.recv_exit_status()
        chan.close()
        return CommandResult(status, out.getvalue(), err.getvalue(), time.monotonic() - start,
                             truncated=out.truncated or err.truncated)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _drain(
    ready: Callable[[], bool], recv: Callable[[int], bytes], buf: BoundedBuffer,
    *streams: BinaryIO | CappedFile | None,
) -> bool:
    """Move what a channel has ready into `buf` (and `streams`); True if there was any."""
    moved = False
    while ready():
        data = recv(65536)
        buf.write(data)
        for stream in streams:
            if stream:
                stream.write(data)
                stream.flush()
        moved = True
    return moved


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (QEMU binds it next; callers retry on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssh_command_line(keys: SshKeys, port: int) -> str:
    return (
        f"ssh -p {port} -i {keys.client_key} -o UserKnownHostsFile={keys.known_hosts} "
        f"-o IdentitiesOnly=yes root@127.0.0.1"
    )

