"""What a hostile guest, a stopped run or a bad input must never do (issue 11), offline.

Each test here is one row of the issue's table (the VM halves are in
test_hardening_vm.py); the guest's side of a channel is played by a socket.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from testbed import paths
from testbed.boot import hostcaps, machine
from testbed.boot.machine import (
    Machine,
    MachineConfig,
    parse_checkpoint_request,
    sweep_stale_ram_files,
)
from testbed.errors import QemuCrash, TestbedError

# Names added by the hardening are imported where used, so that on a tree without
# them each test fails on its own (each row of issue 11 must fail there).

# ----- helpers ---------------------------------------------------------------------------


def fake_bzimage(syssize: int = 0x100, version: str = "6.1.0-test (x@y) #1") -> bytes:
    """A bzImage head whose boot header tells its size: (4 + 1) * 512 + syssize * 16."""
    data = bytearray(0x1000)
    data[0x1F1] = 4  # setup_sects
    struct.pack_into("<I", data, 0x1F4, syssize)
    data[0x202:0x206] = b"HdrS"
    data[0x206:0x208] = bytes([0x0F, 0x02])
    struct.pack_into("<H", data, 0x20E, 0x400)
    data[0x600:0x600 + len(version)] = version.encode()
    size = 5 * 512 + syssize * 16
    return bytes(data) + b"\0" * max(0, size - len(data))


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "bzImage"
    k.write_bytes(fake_bzimage())
    return k


@pytest.fixture
def initrd(tmp_path: Path) -> Path:
    i = tmp_path / "initrd.img"
    i.write_bytes(b"070701" + b"0" * 200)
    return i


def unstarted_machine(tmp_path: Path, kernel: Path, initrd: Path, **cfg: Any) -> Machine:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    c = MachineConfig(kernel=kernel, initrd=initrd, accel=hostcaps.choose_accel("tcg", 5), **cfg)
    return Machine(c, run_dir)


def serve(m: Machine, payload: list[bytes]) -> list[bytes]:
    """Play the guest on the checkpoint channel: send `payload`, return the host's replies."""
    host, guest = socket.socketpair()
    t = threading.Thread(target=m._checkpoint_loop, args=(host,), daemon=True)
    t.start()

    def send() -> None:  # while the replies are read: neither side may block the other
        for chunk in payload:
            guest.sendall(chunk)
        guest.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    replies = guest.makefile("rb").read().splitlines(keepends=True)
    sender.join(30)
    t.join(30)
    guest.close()
    assert not t.is_alive()
    return replies


def snapshot_into(m: Machine, folder: Path) -> None:
    """The handler `exec --snapshots` installs, with a stand-in snapshot."""
    from testbed.snapshot.live import write_snapshot

    m.on_checkpoint = lambda ck: write_snapshot(StandIn(ck.name), folder, ck.name) and None


class StandIn:
    """What write_snapshot needs of a Snapshot."""

    def __init__(self, name: str) -> None:
        self.name = name

    def dumps(self) -> str:
        return json.dumps({"name": self.name})


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_line_error(res: subprocess.CompletedProcess[str], code: int = 125) -> str:
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("testbed: error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ----- 1. checkpoint names never leave the snapshot folder ---------------------------------


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "a/b", "..", ".", ".hidden",
                                  "a..b", "x" * 65, "-rf", "na\x00me", "näme"])
def test_checkpoint_names_that_are_no_plain_file_name_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="refused|ASCII|control"):
        parse_checkpoint_request(f"checkpoint {name} 10 11\n".encode())


def test_write_snapshot_refuses_a_name_with_a_path(tmp_path: Path) -> None:
    from testbed.snapshot.live import write_snapshot

    with pytest.raises(ValueError):
        write_snapshot(StandIn("x"), tmp_path / "D", "../escaped")  # type: ignore[arg-type]
    assert not (tmp_path / "escaped.json").exists()


def test_guest_asking_for_an_escaping_checkpoint_gets_err_and_a_log_entry(
        tmp_path: Path, kernel: Path, initrd: Path) -> None:
    m = unstarted_machine(tmp_path, kernel, initrd)
    folder = tmp_path / "D"
    snapshot_into(m, folder)
    target = tmp_path / "victim"
    target.mkdir()
    replies = serve(m, [b"checkpoint ../escaped 10 11\n",
                        f"checkpoint {target}/escaped 10 11\n".encode(),
                        b"checkpoint fine 10 11\n"])
    assert [r.split()[0] for r in replies] == [b"err", b"err", b"ok"]
    assert not (tmp_path / "escaped.json").exists()
    assert not list(target.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["fine.json"]
    logged = [json.loads(ln) for ln in (m.run_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert ["error" in e for e in logged] == [True, True, False]
    assert "refused" in logged[0]["error"]


@pytest.mark.parametrize("line", [b"checkpoint c 0 1\n", b"checkpoint c 1 -1\n",
                                  b"checkpoint c 99999999999999999999 1\n",
                                  b"checkpoint c 1 1 k\n", b"checkpoint c 1 1 =v\n",
                                  b"checkpoint c 1 1 " + b"k=v " * 300 + b"\n",
                                  b"checkpoint c 1 1 k=" + b"v" * 2000 + b"\n"])
def test_checkpoint_numbers_and_facts_out_of_range_are_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_checkpoint_request(line)


def test_real_checkpoint_requests_still_parse() -> None:
    facts = " ".join(f"P{i}.pid={100 + i} P{i}.id={i} P{i}.key=0x{i:x} P{i}.pkey={i}"
                     for i in range(1, 17))
    ck = parse_checkpoint_request(f"checkpoint peers15 123 124 {facts} pairs=C-P1,C-P2\n"
                                  .encode())
    assert (ck.name, ck.pid, ck.tid) == ("peers15", 123, 124)
    assert ck.facts["P16.pkey"] == "16" and ck.facts["pairs"] == "C-P1,C-P2"


# ----- 2. lines bounded; output bounded in memory, whole in files --------------------------


def test_a_huge_line_without_newline_is_refused_without_being_held(
        tmp_path: Path, kernel: Path, initrd: Path) -> None:
    from testbed.boot.machine import MAX_LINE

    m = unstarted_machine(tmp_path, kernel, initrd)
    snapshot_into(m, tmp_path / "D")
    chunk = b"A" * (1 << 20)
    host, guest = socket.socketpair()
    tracemalloc.start()
    try:
        t = threading.Thread(target=m._checkpoint_loop, args=(host,), daemon=True)
        t.start()
        for _ in range(32):  # 32 MiB without a newline (the host replies only at its end)
            guest.sendall(chunk)
        guest.sendall(b"\ncheckpoint after 10 11\n")
        guest.shutdown(socket.SHUT_WR)
        replies = guest.makefile("rb").read().splitlines()
        t.join(30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        guest.close()
    assert [r.split()[0] for r in replies] == [b"err", b"ok"]
    assert b"longer than" in replies[0]
    assert peak < 8 * MAX_LINE + (1 << 20), f"the host held {peak} bytes of one line"
    assert (m.run_dir / "checkpoints.jsonl").stat().st_size < 4096
    assert (tmp_path / "D" / "after.json").exists()


def test_a_flood_of_bad_lines_is_logged_a_bounded_number_of_times(
        tmp_path: Path, kernel: Path, initrd: Path) -> None:
    from testbed.boot.machine import MAX_LINE, MAX_LOGGED_ERRORS

    m = unstarted_machine(tmp_path, kernel, initrd)
    replies = serve(m, [b"x" * (MAX_LINE + 10) + b"\n" for _ in range(300)]
                    + [b"junk\n"] * 300)
    assert len(replies) == 600 and all(r.startswith(b"err ") for r in replies)
    assert len(m.checkpoint_log) == MAX_LOGGED_ERRORS + 1
    assert "not logged" in m.checkpoint_log[-1]["error"]
    assert (m.run_dir / "checkpoints.jsonl").stat().st_size < 100_000


class FakeChannel:
    """A paramiko channel whose command writes `total` bytes to stdout, then exits 0."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.block = b"o" * 65536

    def exec_command(self, command: str) -> None:
        pass

    def recv_ready(self) -> bool:
        return self.left > 0

    def recv(self, n: int) -> bytes:
        data = self.block[:min(n, self.left)]
        self.left -= len(data)
        return data

    def recv_stderr_ready(self) -> bool:
        return False

    def recv_stderr(self, n: int) -> bytes:
        return b""

    def exit_status_ready(self) -> bool:
        return self.left == 0

    def recv_exit_status(self) -> int:
        return 0

    def close(self) -> None:
        pass


class FakeClient:
    def __init__(self, chan: FakeChannel) -> None:
        self.chan = chan

    def get_transport(self) -> Any:
        client = self

        class Transport:
            def open_session(self) -> FakeChannel:
                return client.chan

            def is_active(self) -> bool:
                return True

        return Transport()


class CountingSink(io.RawIOBase):
    def __init__(self) -> None:
        self.count = 0

    def write(self, data: Any) -> int:
        self.count += len(data)
        return len(data)


def test_command_output_is_bounded_in_memory_and_whole_in_the_file() -> None:
    from testbed.boot.ssh import MAX_KEPT_OUTPUT, SshChannel

    total = MAX_KEPT_OUTPUT * 4
    ch = SshChannel(None, 0)  # type: ignore[arg-type]
    ch.client = FakeClient(FakeChannel(total))  # type: ignore[assignment]
    sink = CountingSink()
    res = ch.run("yes", stdout_file=sink)  # type: ignore[arg-type]
    assert res.status == 0
    assert len(res.stdout) == MAX_KEPT_OUTPUT and res.truncated
    assert sink.count == total


# ----- 3. the guest is always resumed after a snapshot -------------------------------------


class ContRefuser:
    """A QMP client whose `cont` is refused `refusals` times, as QEMU does while the
    migration is not finalized."""

    def __init__(self, refusals: int, message: str = "Migration is not finalized yet") -> None:
        self.refusals = refusals
        self.message = message
        self.log: list[str] = []

    async def execute(self, cmd: str, args: Any = None) -> Any:
        from qemu.qmp import ExecuteError
        from qemu.qmp.models import ErrorResponse

        self.log.append(cmd)
        if cmd == "cont" and self.refusals:
            self.refusals -= 1
            err = ErrorResponse({"error": {"class": "GenericError", "desc": self.message}})
            raise ExecuteError(err, None, None)  # type: ignore[arg-type]
        return {}


def test_resume_retries_cont_until_the_migration_is_finalized() -> None:
    from testbed.snapshot.cpustate import resume_after_migration

    q = ContRefuser(5)
    asyncio.run(resume_after_migration(q, interval=0.001))  # type: ignore[arg-type]
    assert q.log == ["cont"] * 6 and q.refusals == 0


def test_a_guest_that_cannot_be_resumed_is_named_stuck() -> None:
    from testbed.errors import GuestStuck
    from testbed.snapshot.cpustate import resume_after_migration

    with pytest.raises(GuestStuck, match="stays paused"):
        asyncio.run(resume_after_migration(ContRefuser(10**9), timeout=0.05,  # type: ignore
                                           interval=0.001))
    with pytest.raises(GuestStuck, match="cont failed"):
        asyncio.run(resume_after_migration(ContRefuser(1, "something else")))  # type: ignore


def test_a_stuck_guest_fails_its_run_at_once(tmp_path: Path, kernel: Path, initrd: Path
                                             ) -> None:
    from testbed.errors import GuestStuck

    m = unstarted_machine(tmp_path, kernel, initrd)

    def stuck(ck: Any) -> None:
        raise GuestStuck("the guest stays paused: cannot resume it after a snapshot")

    m.on_checkpoint = stuck
    assert serve(m, [b"checkpoint c 10 11\n"])[0].startswith(b"err ")
    with pytest.raises(GuestStuck, match="stays paused"):
        m.check_alive()


class SyncQmp:
    """testbed.boot.qmp.QMP over a fake client: run() and execute() as the real one."""

    def __init__(self, client: ContRefuser) -> None:
        self.client = client

    def run(self, coro: Any, timeout: float | None = 30.0) -> Any:
        return asyncio.run(coro)

    def execute(self, cmd: str, args: Any = None, timeout: float = 30.0) -> Any:
        from qemu.qmp import ExecuteError

        from testbed.errors import GuestError

        try:
            return asyncio.run(self.client.execute(cmd, args))
        except ExecuteError as exc:
            raise GuestError(f"QMP {cmd} failed: {exc}") from exc


def test_live_snapshot_resumes_the_guest_whatever_happened(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The snapshot failed while the guest was paused: it is resumed all the same, with
    'cont' retried while QEMU says the migration is not finalized."""
    from types import SimpleNamespace

    from testbed.snapshot import live

    client = ContRefuser(3)
    snapper = live.LiveSnapshotter.__new__(live.LiveSnapshotter)
    snapper.qmp = SyncQmp(client)  # type: ignore[assignment]
    snapper._view = object()  # type: ignore[assignment]
    snapper._froze = False
    cpus = SimpleNamespace(vcpus=(), status_before="running", seconds=0.0, stopped_at=0.0)

    async def paused() -> Any:
        return cpus

    def broken(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("a snapshot that went wrong")

    monkeypatch.setattr(snapper, "_pause_and_read_cpus", paused)
    monkeypatch.setattr(live, "assemble", broken)
    with pytest.raises(RuntimeError, match="went wrong"):
        snapper._capture_once("c", None)
    assert client.log == ["cont"] * 4 and client.refusals == 0


# ----- 4. signals stop run and matrix ------------------------------------------------------


@pytest.fixture
def signal_handlers() -> Any:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    getattr(machine, "allow_new_guests", lambda: None)()


def fake_scenarios(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[str]:
    """run_scenario replaced by a job of `seconds` that stops as a guest does when stopped."""
    from testbed import runner
    from testbed.check.model import ScenarioResult

    started: list[str] = []

    def run_scenario(sc: Any, spec: Any, bugs: Any, parent: Path, mode: Any = None
                     ) -> ScenarioResult:
        started.append(sc.name)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if getattr(machine, "_refuse_new", threading.Event()).is_set():
                return ScenarioResult(sc.name, [], "", bugs, error="guest stopped")
            time.sleep(0.01)
        return ScenarioResult(sc.name, [], str(parent), bugs)

    monkeypatch.setattr(runner, "run_scenario", run_scenario)
    return started


def test_interrupted_run_all_starts_no_queued_job_and_returns_what_finished(
        monkeypatch: pytest.MonkeyPatch, signal_handlers: Any, tmp_path: Path) -> None:
    from testbed.boot.commands import terminate_on_signals
    from testbed.runner import RunInterrupted, run_all
    from testbed.scenarios import SCENARIOS

    started = fake_scenarios(monkeypatch, 0.3)
    scs = list(SCENARIOS.values())
    jobs = [(scs[i % len(scs)], (), None) for i in range(20)]
    terminate_on_signals()
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(RunInterrupted) as ei:
        run_all(jobs, None, tmp_path, 1)  # type: ignore[arg-type]
    exc = ei.value
    assert exc.signal.exit_status == 130 and exc.total == 20
    assert 1 <= len(exc.finished) < 20
    assert len(started) <= len(exc.finished) + 1  # the one running then, no queued one
    assert not any(r.error for r in exc.finished), [r.error for r in exc.finished]


def test_sigterm_to_testbed_run_writes_reports_and_exits_143(
        monkeypatch: pytest.MonkeyPatch, signal_handlers: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from testbed import cli, run_commands
    from testbed.runner import GuestSpec

    fake_scenarios(monkeypatch, 0.4)
    spec = GuestSpec(kernel=tmp_path / "k", initrd=tmp_path / "i",
                     accel=hostcaps.choose_accel("tcg", 5))
    monkeypatch.setattr(run_commands, "guest_spec", lambda args: (spec, {}))
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    code = cli.main(["run", "--run-dir", str(tmp_path / "r"), "--parallel", "1"])
    assert code == 143
    out = capsys.readouterr()
    assert f"run folder: {tmp_path / 'r'}" in out.out
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "SIGTERM" in doc["run"]["extra"]["interrupted"]
    assert (tmp_path / "r" / "report.xml").exists()


def test_interrupted_exit_status() -> None:
    from testbed.errors import Interrupted

    assert Interrupted(signal.SIGINT).exit_status == 130
    assert Interrupted(signal.SIGTERM).exit_status == 143


# ----- 5. the guest's network reaches nothing but its SSH forward --------------------------


def test_slirp_is_restricted(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    m = unstarted_machine(tmp_path, kernel, initrd)
    m.ssh_port = 2222
    args = m.qemu_args(initrd, 3, 4)
    netdev = args[args.index("-netdev") + 1]
    assert "restrict=on" in netdev.split(",")
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in netdev


# ----- 6. private run folders, keys and images ---------------------------------------------


def test_run_folder_and_keys_private_under_umask_002(tmp_path: Path) -> None:
    from testbed.boot.ssh import make_keys

    old = os.umask(0o002)
    try:
        d = paths.new_run_dir("x", tmp_path)
        keys = make_keys(d / "ssh")
    finally:
        os.umask(old)
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / "ssh").stat().st_mode & 0o077 == 0
    for f in (d / "ssh").iterdir():
        assert f.stat().st_mode & 0o077 == 0 or f.name == "known_hosts", f
    assert keys.client_key.stat().st_mode & 0o777 == 0o600


def test_qemu_runs_under_a_private_umask(tmp_path: Path, kernel: Path, initrd: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def popen(args: Any, **kw: Any) -> Any:
        seen.update(kw)
        raise Stop

    m = unstarted_machine(tmp_path, kernel, initrd)
    monkeypatch.setattr(machine.subprocess, "Popen", popen)
    with pytest.raises(Stop):
        m._launch(initrd)
    assert seen["umask"] == 0o077


# ----- 7. the sweep leaks no fd ------------------------------------------------------------


def test_sweep_next_to_a_live_ram_file_leaks_no_fd(tmp_path: Path) -> None:
    import fcntl

    live = tmp_path / f"{machine.SHM_PREFIX}1-abc"
    fd = os.open(live, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    dead = tmp_path / f"{machine.SHM_PREFIX}2-def"
    dead.write_bytes(b"")
    try:
        assert sweep_stale_ram_files(tmp_path) == [dead]
        before = count_fds()
        for _ in range(100):
            assert sweep_stale_ram_files(tmp_path) == []
        assert count_fds() == before
        assert live.exists()
    finally:
        os.close(fd)


# ----- 8. guest RAM the host cannot hold ---------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Any:
    d = tmp_path / "shm"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_dev_shm_too_small_is_refused_before_boot(
        tmp_path: Path, kernel: Path, initrd: Path, small_tmpfs: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "SHM_DIR", small_tmpfs)
    m = unstarted_machine(tmp_path, kernel, initrd, mem_mib=64)
    with pytest.raises(TestbedError, match=r"has 1[56] MiB free, the guest needs 64 MiB"):
        try:
            m.start()
        finally:
            m.stop()
    assert not (m.run_dir / "qemu-cmdline.txt").exists()  # QEMU never started
    assert not list(small_tmpfs.iterdir())


def test_mem_beyond_the_host_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TestbedError, match="more than the host's memory"):
        machine.check_ram_room(1 << 30, tmp_path)


def test_sigbus_of_qemu_names_dev_shm(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    m = unstarted_machine(tmp_path, kernel, initrd)

    class Dead:
        pid = 1
        returncode = -signal.SIGBUS

        def poll(self) -> int:
            return self.returncode

    m.proc = Dead()  # type: ignore[assignment]
    m.qemu_log.write_text("")
    with pytest.raises(QemuCrash, match="status -7.*SIGBUS.*full"):
        m.check_alive()


# ----- 9. a dump read with another build's vmlinux -----------------------------------------


def elf_with_build_id(tmp_path: Path, build_id: str) -> Path:
    src = tmp_path / "v.c"
    src.write_text("int main(void) { return 0; }\n")
    out = tmp_path / f"vmlinux-{build_id[:8]}"
    subprocess.run(["gcc", "-o", str(out), str(src), f"-Wl,--build-id=0x{build_id}"],
                   check=True)
    return out


def dump_with_vmcoreinfo(tmp_path: Path, build_id: str) -> Path:
    from test_physmem import build_elf

    text = f"OSRELEASE=6.1.0-test\nBUILD-ID={build_id}\nPAGESIZE=4096\n".encode()
    note = struct.pack("<III", 11, len(text), 0) + b"VMCOREINFO\0\0" + text
    ram = bytearray(1 << 16)
    ram[0x3000:0x3000 + len(note)] = note
    path = tmp_path / "dump.elf"
    path.write_bytes(build_elf([(0, len(ram), bytes(ram))]))
    return path


def test_dump_and_vmlinux_of_different_builds_are_refused(tmp_path: Path) -> None:
    from testbed.snapshot.commands import _offline
    from testbed.snapshot.vmcoreinfo import elf_build_id

    theirs = "ab" * 20
    vmlinux = elf_with_build_id(tmp_path, "cd" * 20)
    assert elf_build_id(vmlinux) == "cd" * 20
    with pytest.raises(TestbedError, match=f"another kernel build.*{theirs}") as ei:
        _offline(dump_with_vmcoreinfo(tmp_path, theirs), vmlinux)
    assert "\n" not in ei.value.one_line()


def test_matching_build_ids_pass_the_check(tmp_path: Path) -> None:
    from testbed.snapshot.vmcoreinfo import check_build_id, parse_vmcoreinfo

    info = parse_vmcoreinfo("OSRELEASE=x\nBUILD-ID=ABab\n")
    check_build_id(info, "abab", "dump", "vmlinux")
    with pytest.raises(TestbedError):
        check_build_id(info, "abac", "dump", "vmlinux")


# ----- 10. unusable folders and files: one line, exit 125, before boot ---------------------


def test_run_dir_that_is_a_file(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("")
    err = one_line_error(run_cli("exec", "--run-dir", str(f), "--kernel", str(kernel),
                                 "--initrd", str(initrd), "--accel", "tcg", "--", "true"))
    assert "is not a folder" in err
    err = one_line_error(run_cli("run", "--run-dir", str(f), "--kernel", str(kernel)))
    assert "is not a folder" in err


def test_run_dir_read_only(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        err = one_line_error(run_cli("exec", "--run-dir", str(ro / "sub"), "--kernel",
                                     str(kernel), "--initrd", str(initrd), "--", "true"))
        assert "not a writable folder" in err
        err = one_line_error(run_cli("exec", "--run-dir", str(ro), "--kernel",
                                     str(kernel), "--initrd", str(initrd), "--", "true"))
        assert "not a writable folder" in err
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_snapshots_that_is_a_file(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("")
    err = one_line_error(run_cli("exec", "--snapshots", str(f), "--kernel", str(kernel),
                                 "--initrd", str(initrd), "--accel", "tcg", "--", "true",
                                 env={"TESTBED_RUNS": str(tmp_path / "runs")}))
    assert "--snapshots" in err and "is not a folder" in err


def test_ram_file_not_creatable(tmp_path: Path, kernel: Path, initrd: Path) -> None:
    env = {"TESTBED_SHM_DIR": str(tmp_path / "no-such-dir"), "TESTBED_RUNS": str(tmp_path)}
    err = one_line_error(run_cli("exec", "--kernel", str(kernel), "--initrd", str(initrd),
                                 "--accel", "tcg", "--", "true", env=env))
    assert "no-such-dir" in err and "TESTBED_SHM_DIR" in err
    assert not list(tmp_path.glob("*/qemu-cmdline.txt"))  # refused before QEMU


# ----- 11. truncated kernel image ----------------------------------------------------------


def test_truncated_bzimage_is_named(tmp_path: Path) -> None:
    from testbed.boot.kernelimage import inspect_kernel

    data = fake_bzimage(syssize=0x1000)
    k = tmp_path / "bzImage"
    k.write_bytes(data[:len(data) // 2])
    want = 5 * 512 + 0x1000 * 16
    with pytest.raises(TestbedError, match=f"truncated: header says {want} bytes, file has "
                                           f"{len(data) // 2}"):
        inspect_kernel(k)
    k.write_bytes(data + b"signature")  # longer is fine (signed kernels)
    inspect_kernel(k)


def test_debian_kernel_is_not_called_truncated() -> None:
    import glob

    from testbed.boot.kernelimage import inspect_kernel

    found = glob.glob("/boot/vmlinuz-*")
    if not found:
        pytest.skip("no kernel in /boot")
    for k in found:
        inspect_kernel(Path(k))


# ----- 12. usage errors, the right message, no traceback noise -----------------------------


def test_timeout_zero_is_a_usage_error(kernel: Path) -> None:
    res = run_cli("exec", "--timeout", "0", "--kernel", str(kernel), "--", "true")
    assert res.returncode == 2 and "--timeout" in res.stderr and "more than 0" in res.stderr
    res = run_cli("exec", "--boot-timeout", "-1", "--kernel", str(kernel), "--", "true")
    assert res.returncode == 2


def test_inspect_dump_of_a_folder(tmp_path: Path) -> None:
    # a folder is a run folder: one without a dump says so
    v = tmp_path / "vmlinux"
    v.write_bytes(b"")
    err = one_line_error(run_cli("inspect", "--dump", str(tmp_path), "--vmlinux", str(v)))
    assert "holds no memory dump" in err


def test_garbage_initrd_is_refused_before_boot(tmp_path: Path, kernel: Path) -> None:
    g = tmp_path / "garbage"
    g.write_bytes(os.urandom(4096).replace(b"07070", b"xxxxx"))
    err = one_line_error(run_cli("exec", "--kernel", str(kernel), "--initrd", str(g),
                                 "--accel", "tcg", "--", "true",
                                 env={"TESTBED_RUNS": str(tmp_path / "runs")}))
    assert "is not an initramfs" in err
    assert not list((tmp_path / "runs").glob("*/qemu-cmdline.txt"))


SSH_TO_A_BOOTING_GUEST = """
import socket, sys, threading
from pathlib import Path
from testbed.boot.ssh import SshChannel, make_keys
from testbed.errors import GuestTimeout

srv = socket.create_server(("127.0.0.1", 0))

def accept_and_close():  # what QEMU's forward does while the guest's sshd is not up
    while True:
        c, _ = srv.accept()
        c.close()

threading.Thread(target=accept_and_close, daemon=True).start()
ch = SshChannel(make_keys(Path(sys.argv[1])), srv.getsockname()[1])
try:
    ch.connect(1.5)
except GuestTimeout:
    print("timed out")
"""


def test_failed_ssh_attempts_print_no_paramiko_tracebacks(tmp_path: Path) -> None:
    """A guest still booting (or a garbage --initrd): paramiko stays quiet on stderr."""
    res = subprocess.run([sys.executable, "-c", SSH_TO_A_BOOTING_GUEST, str(tmp_path / "ssh")],
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "timed out", res.stderr
    assert "Traceback" not in res.stderr and "Exception (client)" not in res.stderr, res.stderr


# ----- 13. a kernel without RPAL ----------------------------------------------------------


def test_requires_refuses_a_kernel_without_rpal(tmp_path: Path) -> None:
    from testbed.designs.rpal.kernel import requires

    k = tmp_path / "bzImage"
    k.write_bytes(fake_bzimage())
    (tmp_path / "System.map").write_text("ffffffff81000000 T _stext\nffffffff81000100 T foo\n")
    with pytest.raises(TestbedError, match=r"no RPAL.*/proc/rpal.*CONFIG_RPAL"):
        requires(k)
    (tmp_path / "System.map").write_text("ffffffff81000000 T _stext\n"
                                         "ffffffff82000000 t rpal_init\n")
    requires(k)


def test_run_on_debians_kernel_says_so_up_front(tmp_path: Path) -> None:
    import glob

    found = [k for k in glob.glob("/boot/vmlinuz-*")
             if Path(k.replace("vmlinuz", "System.map")).is_file()]
    if not found:
        pytest.skip("no Debian kernel with its System.map in /boot")
    res = run_cli("run", "--kernel", found[0], env={"TESTBED_RUNS": str(tmp_path)})
    err = one_line_error(res)
    assert "has no RPAL" in err
    assert not list(tmp_path.rglob("console.log"))  # no guest booted


def test_command_output_files_are_capped_on_disk(tmp_path: Path) -> None:
    """A guest that prints without end can't fill the host's disk: the file stops at the cap."""
    from testbed.boot.ssh import CappedFile

    with open(tmp_path / "out", "wb") as f:
        capped = CappedFile(f, limit=1000)
        for _ in range(50):
            capped.write(b"x" * 333)
        capped.flush()
    data = (tmp_path / "out").read_bytes()
    assert data.startswith(b"x" * 1000) and data.count(b"x") == 1000
    assert data.count(b"truncated") == 1
    assert capped.dropped == 50 * 333 - 1000
