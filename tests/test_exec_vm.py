"""`testbed exec` end to end: real guests under QEMU, good paths and every failure path."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from testbed.boot.machine import SHM_DIR, SHM_PREFIX, connect_unix, sweep_stale_ram_files

from conftest import qemu_processes_for, run_testbed

pytestmark = pytest.mark.vm


@pytest.fixture
def spawn():
    """Start `python -m testbed ARGS`; whatever happens in the test, it does not outlive it."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-m", "testbed", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)


def only_run_dir(runs: Path) -> Path:
    dirs = [d for d in runs.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def assert_one_line_error(res: subprocess.CompletedProcess[str], *words: str) -> str:
    assert res.returncode == 125, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("testbed: error:")]
    assert len(errors) == 1, res.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def assert_cleaned_up(run_dir: Path) -> None:
    assert qemu_processes_for(run_dir.name) == []
    assert not list(SHM_DIR.glob(f"{SHM_PREFIX}*{run_dir.name[-6:]}"))


def test_exit_status_of_guest_command_comes_back(runs_dir: Path):
    res = run_testbed("exec", "--", "sh", "-c", "grep -qw pku /proc/cpuinfo && exit 7")
    assert res.returncode == 7, res.stderr
    assert re.search(r"testbed: -accel (kvm|tcg) -cpu \S+: .+", res.stderr)
    assert_cleaned_up(only_run_dir(runs_dir))


def test_stdout_and_stderr_come_back_separately(runs_dir: Path):
    res = run_testbed(
        "exec", "--", "sh", "-c", "echo guest-said-out; echo guest-said-err >&2; exit 0"
    )
    assert res.returncode == 0
    assert res.stdout == "guest-said-out\n"
    # the testbed's own progress lines share stderr (and may name a run folder
    # whose path holds any word), so look for the guest's marker words only
    assert "guest-said-err\n" in res.stderr and "guest-said-out" not in res.stderr


def test_pkey_access_dies_with_segv_pkuerr(runs_dir: Path):
    res = run_testbed("exec", "--", "tb-pkey_fault")
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"SIGSEGV si_code=4 \(SEGV_PKUERR=4\) si_pkey=(\d+)", res.stdout)
    raw = run_testbed("exec", "--", "tb-pkey_fault", "--raw")
    assert raw.returncode == 128 + signal.SIGSEGV, raw.stdout + raw.stderr


def test_kernel_panic_is_reported(runs_dir: Path):
    # with no init in the initramfs the kernel tries a root disk, finds none and panics
    res = run_testbed("exec", "--append", "rdinit=/nonexistent", "--", "true")
    line = assert_one_line_error(res, "kernel panic", "Unable to mount root")
    run_dir = only_run_dir(runs_dir)
    assert str(run_dir) in line
    assert "Kernel panic" in (run_dir / "console.log").read_text()
    assert_cleaned_up(run_dir)


def test_guest_that_hangs_at_boot_times_out(runs_dir: Path):
    # a shell as init waits forever on the console and never says it is ready
    res = run_testbed("exec", "--append", "rdinit=/bin/sh", "--boot-timeout", "15", "--", "true")
    assert_one_line_error(res, "not ready after 15 s")
    run_dir = only_run_dir(runs_dir)
    assert (run_dir / "console.log").stat().st_size > 0
    assert_cleaned_up(run_dir)


def test_command_that_hangs_times_out(runs_dir: Path):
    res = run_testbed("exec", "--timeout", "3", "--", "sleep", "600")
    assert_one_line_error(res, "did not finish within 3 s", "sleep 600")
    assert_cleaned_up(only_run_dir(runs_dir))



def test_qemu_crash_is_reported(runs_dir: Path, spawn):
    proc = spawn("exec", "--", "sleep", "120")
    run_dir = wait_for_machine(runs_dir, proc)
    qemu = int(read_meta(run_dir)["qemu_pid"])
    time.sleep(2)  # let the command start
    os.kill(qemu, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 125
    assert "QEMU exited unexpectedly" in err and "Traceback" not in err
    assert_cleaned_up(run_dir)


def test_two_runs_at_once_do_not_collide(runs_dir: Path):
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            lambda n: run_testbed("exec", "--", "sh", "-c", f"echo run{n}; exit {n}"), (3, 4)
        ))
    assert [r.returncode for r in results] == [3, 4], [r.stderr for r in results]
    assert [r.stdout for r in results] == ["run3\n", "run4\n"]
    dirs = [d for d in runs_dir.iterdir() if d.is_dir()]
    assert len(dirs) == 2
    ports = {read_meta(d)["ssh_port"] for d in dirs}
    assert len(ports) == 2


def read_meta(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "machine.json").read_text())


def wait_for_machine(runs: Path, proc: subprocess.Popen[str], ready: bool = True) -> Path:
    """Wait until the run started QEMU (and, with `ready`, the guest answered)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for d in runs.iterdir():
            meta = d / "machine.json"
            if meta.exists():
                try:
                    m = read_meta(d)
                except ValueError:
                    continue
                if m.get("qemu_pid") and (not ready or "ssh" in m.get("timings", {})):
                    return d
        time.sleep(0.2)
    raise AssertionError("guest did not come up")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_testbed_leaves_no_qemu(runs_dir: Path, sig: signal.Signals, spawn):
    proc = spawn("exec", "--", "sleep", "120")
    run_dir = wait_for_machine(runs_dir, proc, ready=False)
    ram = Path(read_meta(run_dir)["ram_file"])
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while qemu_processes_for(run_dir.name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_processes_for(run_dir.name) == []
    if sig == signal.SIGTERM:
        assert not ram.exists()  # cleaned up on the way out
    else:
        # SIGKILL leaves no chance to clean: the next start sweeps the orphaned RAM file
        assert ram.exists()
        assert ram in sweep_stale_ram_files()
        assert not ram.exists()


def test_boot_keeps_guest_up_for_ssh_and_qmp(runs_dir: Path, spawn):
    proc = spawn("boot")
    info: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
        if line.startswith("Ctrl-C"):
            break
    run_dir = Path(info["run folder"])
    assert Path(info["QMP socket"]).is_socket()
    connect_unix(Path(info["QMP socket"])).close()
    ssh = subprocess.run(
        [*info["ssh"].split(), "-o", "BatchMode=yes", "cat /proc/sys/kernel/hostname"],
        capture_output=True, text=True, timeout=60,
    )
    assert (ssh.returncode, ssh.stdout) == (0, "testbed\n"), ssh.stderr
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    assert_cleaned_up(run_dir)


def test_files_from_the_host_go_into_the_guest(runs_dir: Path, tmp_path: Path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho hello $1\n")
    script.chmod(0o755)
    res = run_testbed("exec", "--file", str(script), "--file", f"{script}:/etc/other.sh",
                      "--", "sh", "-c", "hello.sh one && /etc/other.sh two")
    assert (res.returncode, res.stdout) == (0, "hello one\nhello two\n"), res.stderr
    bad = run_testbed("exec", "--file", str(tmp_path / "missing"), "--", "true")
    assert_one_line_error(bad, "is not a file")
