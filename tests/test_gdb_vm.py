"""`testbed boot --gdb`: QEMU's gdbstub on a unix socket in the run folder, and a printed gdb
command line that loads the vmlinux (a batch gdb reads the guest kernel's banner)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.boot.commands import GDB_SCRIPT, GDB_SOCKET, gdb_command, gdb_qemu_args


def test_gdb_options_and_command_line(tmp_path: Path) -> None:
    args = gdb_qemu_args()
    assert args[args.index("-gdb") + 1] == "chardev:gdb0"
    assert f"path={GDB_SOCKET}," in args[1]
    kdir = tmp_path / "k"
    kdir.mkdir()
    (kdir / "bzImage").write_bytes(b"MZ")
    (kdir / "vmlinux").write_bytes(b"\x7fELF")
    cmd = gdb_command(tmp_path / "run dir", kdir / "bzImage")
    assert cmd.startswith(f"cd {shlex.quote(str(tmp_path / 'run dir'))} && gdb -q ")
    assert f"gdb -q {kdir / 'vmlinux'} -ex " in cmd
    assert cmd.endswith(f"-ex 'source {GDB_SCRIPT}' -ex 'target remote gdb.sock'")
    (kdir / "vmlinux-gdb.py").write_text("")  # a build with CONFIG_GDB_SCRIPTS
    assert f"source {kdir / 'vmlinux-gdb.py'}" in gdb_command(tmp_path, kdir / "bzImage")


@pytest.mark.vm
@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_boot_gdb_attaches_with_the_vmlinux(rpal_kernel: Path, runs_dir: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed", "boot", "--gdb", "--kernel", str(rpal_kernel)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TESTBED_PROGRESS": "0"})
    try:
        line = ""
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("gdb:") or not line:
                break
        assert line.startswith("gdb:"), proc.stderr.read() if proc.stderr else ""
        cmd = line.split(":", 1)[1].strip()
        out = subprocess.run(["sh", "-c", cmd + " -batch -ex 'p linux_banner' -ex 'bt 1'"],
                             capture_output=True, text=True, timeout=120)
        assert "Linux version" in out.stdout, out.stdout + out.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
