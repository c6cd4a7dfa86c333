"""The host client of tb-rpal_agent: pure parsing, the client against a fake agent, and
the real agent and service binaries run on the host (no VM, no RPAL: TB_SVC_NO_RPAL=1)."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.designs.rpal.agent import (
    MAX_LINE,
    Agent,
    AgentError,
    AnswerError,
    format_command,
    parse_answer,
)

# ---- parse_answer -------------------------------------------------------------------------


def test_parses_ok_with_fields():
    a = parse_answer(b"12 ok addr=0x7f0000001000 pkey=3 keys=1,2,0x10\n")
    assert (a.seq, a.status, a.ok) == (12, "ok", True)
    assert a.need_int("addr") == 0x7F0000001000
    assert a.get_int("pkey") == 3
    assert a.int_list("keys") == [1, 2, 16]
    assert a.errname is None


def test_parses_err_fault_died_timeout_bad():
    e = parse_answer(b"3 err errno=129 name=EKEYREJECTED")
    assert e.status == "err" and e.errno == 129 and e.errname == "EKEYREJECTED"
    e2 = parse_answer(b"4 err errno=2")
    assert e2.errname == "ENOENT"
    f = parse_answer(b"5 fault sig=11 code=4 addr=0x10000000000 pkey=5 pkru=0xfffffff3")
    assert f.status == "fault" and f.need_int("code") == 4 and f.need_int("pkey") == 5
    assert parse_answer(b"6 fault sig=11 code=1 addr=0x0 pkey=-1 pkru=0x0").need_int("pkey") == -1
    assert parse_answer(b"7 died svc=a pid=9 sig=11 status=0").status == "died"
    assert parse_answer(b"8 timeout svc=a ms=10000").status == "timeout"
    assert parse_answer(b"0 bad reason=too_long").seq == 0


def test_parses_events():
    ev = parse_answer(b"* exited svc=b pid=77 status=0 sig=9\n")
    assert (ev.status, ev.event, ev.seq) == ("event", "exited", 0)
    assert ev.need_int("sig") == 9
    assert parse_answer(b"* hello version=1 pid=1 cpus=2 swap=1 swap_kib=65532").event == "hello"


def test_keys_none_is_empty_list():
    assert parse_answer(b"1 ok keys=none").int_list("keys") == []


@pytest.mark.parametrize("raw", [
    b"", b"\n", b"ok", b"x ok", b"-1 ok", b"1 yes", b"1 ok a", b"1 ok =3", b"1 ok A=3",
    b"1 ok a=", b"1 ok a=1 a=2", b"1  ok", b"1 ok a=1 ", b"1 ok a=\x01", b"\xff\xfe ok",
    b"1 ok a=1\nb", b"1 ok a=1\r", b"99999999999999999999 ok", b"9223372036854775808 ok",
    b"* Hello", b"* ", b"1 ok a=b c", b"1 ok a=%s", b"1 ok k=" + b"1" * 4001,
    b"1 ok " + b"a=1 " * 2000,
])
def test_rejects_garbage(raw: bytes):
    with pytest.raises(AnswerError):
        parse_answer(raw)


def test_random_bytes_never_crash_the_parser():
    rng = random.Random(10)
    alphabet = b"0123456789 abcxyz=*,-_\n\r\t\x00\xff.okerrfault"
    for _ in range(5000):
        raw = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        try:
            a = parse_answer(raw)
        except AnswerError:
            continue
        assert a.status in {"ok", "err", "fault", "died", "timeout", "bad", "event"}
        for k in a.fields:
            a.get_int(k)  # never raises


def test_malformed_number_is_none_and_need_int_names_the_field():
    a = parse_answer(b"1 ok addr=0xzz pid=12a")
    assert a.get_int("addr") is None and a.get_int("pid") is None and a.get_int("nope") is None
    with pytest.raises(AgentError, match="addr"):
        a.need_int("addr")
    with pytest.raises(AgentError, match="keys"):
        parse_answer(b"1 ok keys=1,x").int_list("keys")


# ---- format_command -----------------------------------------------------------------------


def test_format_command():
    assert format_command(3, "read", {"svc": "a", "addr": 0x1000, "pkru": "0x0"}) == \
        b"3 read svc=a addr=4096 pkru=0x0\n"
    assert format_command(1, "brk", {"svc": "a", "delta": -4096}) == b"1 brk svc=a delta=-4096\n"


@pytest.mark.parametrize("seq,op,args", [
    (0, "read", {}), (1, "Read", {}), (1, "read x", {}), (1, "read", {"a b": 1}),
    (1, "read", {"svc": "a b"}), (1, "read", {"svc": "a\nb"}), (1, "read", {"x": True}),
    (1, "read", {"x": 1.5}), (1, "read", {"x": ""}), (1, "read", {f"k{i}": "v" * 500
                                                                  for i in range(10)}),
])
def test_format_command_refuses_what_the_protocol_cannot_carry(seq, op, args):
    with pytest.raises(ValueError):
        format_command(seq, op, args)


# ---- the client against a fake agent ------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[Callable[[Callable[[socket.socket], None]], Agent]]:
    socks: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(script: Callable[[socket.socket], None]) -> Agent:
        ours, theirs = socket.socketpair()
        socks.extend([ours, theirs])
        def run(sock: socket.socket) -> None:
            try:
                script(sock)
            except OSError:  # the client hung up first: fine for a fake
                pass

        t = threading.Thread(target=run, args=(theirs,), daemon=True)
        t.start()
        threads.append(t)
        return Agent(ours, host_margin=0.5)

    yield start
    for s in socks:
        s.close()
    for t in threads:
        t.join(timeout=5)


def lines_of(sock: socket.socket) -> Iterator[str]:
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        yield line.decode()


def test_client_round_trip_and_events(fake):
    def script(s: socket.socket) -> None:
        s.sendall(b"* hello version=1 pid=5 cpus=2 swap=1 swap_kib=100\n")
        for line in lines_of(s):
            seq, op = line.split()[:2]
            if op == "spawn":
                s.sendall(b"* log text=hi\n" + f"{seq} ok svc=a pid=9 id=0 key=1 pkey=0\n".encode())
            elif op == "read":
                s.sendall(f"{seq} fault sig=11 code=4 addr=0x1 pkey=2 pkru=0x0\n".encode())
                s.sendall(b"* exited svc=b pid=10 status=0 sig=9\n")
            else:
                s.sendall(f"{seq} err errno=22 name=EINVAL\n".encode())

    agent = fake(script)
    assert agent.wait_hello(5).need_int("swap") == 1
    a = agent.call("spawn", svc="a")
    assert a.ok and a.need_int("key") == 1
    f = agent.call("read", svc="a", addr=1)
    assert f.status == "fault" and f.need_int("pkey") == 2
    e = agent.call("enable", svc="a", pkey=99)
    assert e.errname == "EINVAL"
    evs = agent.events()
    assert [ev.event for ev in evs] == ["log", "exited"]
    assert agent.events() == []
    assert [d for _, d, _ in agent.log].count(">") == 3


def test_client_raises_on_silence_garbage_wrong_seq_long_line_and_eof(fake):
    def silent(s: socket.socket) -> None:
        for _ in lines_of(s):
            pass

    with pytest.raises(AgentError, match="did not answer"):
        fake(silent).call("state", svc="a", host_timeout=0.3)

    def garbage(s: socket.socket) -> None:
        for _ in lines_of(s):
            s.sendall(b"\xff\x00 what\n")

    with pytest.raises(AgentError, match="garbage"):
        fake(garbage).call("state", svc="a")

    def wrong_seq(s: socket.socket) -> None:
        for _ in lines_of(s):
            s.sendall(b"77 ok\n")

    with pytest.raises(AgentError, match="to command 1"):
        fake(wrong_seq).call("state", svc="a")

    def long_line(s: socket.socket) -> None:
        for _ in lines_of(s):
            s.sendall(b"1 ok a=" + b"1" * (MAX_LINE * 3))

    with pytest.raises(AgentError, match="longer than"):
        fake(long_line).call("state", svc="a")

    def hang_up(s: socket.socket) -> None:
        next(lines_of(s))
        s.close()

    with pytest.raises(AgentError, match="closed"):
        fake(hang_up).call("state", svc="a")


def test_hello_with_another_version_is_refused(fake):
    def script(s: socket.socket) -> None:
        s.sendall(b"* hello version=2 pid=1\n")
        time.sleep(0.5)

    with pytest.raises(AgentError, match="version"):
        fake(script).wait_hello(3)


# ---- the real binaries, on the host (no RPAL, no PKU needed) -----------------------------


@pytest.fixture(scope="module")
def host_agent_bins() -> dict[str, Path]:
    if shutil.which(os.environ.get("TESTBED_CC", "gcc")) is None:
        pytest.skip("no C compiler")
    from testbed.build import guestprogs

    return guestprogs.build().programs


@pytest.fixture
def host_agent(host_agent_bins: dict[str, Path]) -> Iterator[Agent]:
    ours, theirs = socket.socketpair()
    env = dict(os.environ, TB_SVC_NO_RPAL="1")
    proc = subprocess.Popen(
        [str(host_agent_bins["tb-rpal_agent"]), "--stdio", "--no-swap",
         "--svc", str(host_agent_bins["tb-rpal_svc"])],
        stdin=theirs, stdout=theirs, env=env)
    theirs.close()
    agent = Agent(ours, host_margin=5)
    try:
        agent.wait_hello(10)
        yield agent
    finally:
        agent.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_service_binary_is_stamped_and_agent_is_not(host_agent_bins: dict[str, Path]):
    assert host_agent_bins["tb-rpal_svc"].read_bytes()[12:16] == b"RPAL"
    assert host_agent_bins["tb-rpal_agent"].read_bytes()[12:16] != b"RPAL"


def test_real_agent_memory_ops_faults_and_children(host_agent: Agent):
    ag = host_agent
    sp = ag.call("spawn", svc="a")
    assert sp.ok, sp.text()
    m = ag.call("mmap", svc="a", len=3 * 4096)
    addr = m.need_int("addr")
    assert ag.call("touch", svc="a", addr=addr, len=3 * 4096, value=0x1234).ok
    assert ag.call("read", svc="a", addr=addr + 8).need_int("value") == 0x1234
    assert ag.call("pagemap", svc="a", addr=addr).need_int("present") == 1
    assert ag.call("write", svc="a", addr=addr, value=7).ok
    f = ag.call("read", svc="a", addr=8)
    assert f.status == "fault" and f.need_int("sig") == 11 and f.need_int("code") == 1
    assert ag.call("mprotect", svc="a", addr=addr, len=4096, prot="r").ok
    wf = ag.call("write", svc="a", addr=addr, value=1)
    assert wf.status == "fault" and wf.need_int("code") == 2  # SEGV_ACCERR
    r = ag.call("mremap", svc="a", addr=addr + 4096, old=4096, new=8 * 4096, maymove=1)
    assert r.ok and ag.call("read", svc="a", addr=r.need_int("addr")).need_int("value") == 0x1234
    assert ag.call("madvise", svc="a", addr=r.need_int("addr"), len=4096,
                   advice="dontneed").ok
    assert ag.call("read", svc="a", addr=r.need_int("addr")).need_int("value") == 0
    assert ag.call("munmap", svc="a", addr=addr, len=4096).errname is None
    assert ag.call("munmap", svc="a", addr=addr + 1, len=4096).errname == "EINVAL"
    assert ag.call("madvise", svc="a", addr=addr, len=1, advice="nonsense").status == "bad"
    b = ag.call("brk", svc="a", delta=4096)
    assert b.need_int("new") == b.need_int("old") + 4096
    ch = ag.call("fork", svc="a").need_int("child")
    addr2 = addr + 2 * 4096
    assert ag.call("childread", svc="a", child=ch, addr=addr2).need_int("value") == 0x1234
    assert ag.call("write", svc="a", addr=addr2, value=5).ok  # COW: the child keeps its copy
    assert ag.call("childread", svc="a", child=ch, addr=addr2).need_int("value") == 0x1234
    assert ag.call("childread", svc="a", child=ch, addr=16).status == "fault"
    assert ag.call("childexit", svc="a", child=ch).need_int("status") == 0
    t = ag.call("thread", svc="a").need_int("tid")
    st = ag.call("state", svc="a")
    assert str(t) in st.fields["tids"].split(",")
    assert ag.call("threadpkru", svc="a", tid=t).ok
    assert ag.call("signal", svc="a", tid=t).need_int("tid") == t
    assert ag.call("exit", svc="a", status=3).need_int("status") == 3
    assert ag.call("list").fields["svcs"] == "none"


def test_real_agent_spinner_reports_a_fault_after_the_unmap(host_agent: Agent):
    ag = host_agent
    assert ag.call("spawn", svc="a").ok
    addr = ag.call("mmap", svc="a", len=4096, populate=1).need_int("addr")
    assert ag.call("touch", svc="a", addr=addr, len=4096, value=0x55).ok
    s = ag.call("spin", svc="a", addr=addr, cpu=0)
    assert s.ok and s.need_int("first") == 0x55
    assert ag.call("munmap", svc="a", addr=addr, len=4096).ok
    assert ag.call("arm", svc="a").ok
    time.sleep(0.2)
    stop = ag.call("spinstop", svc="a")
    assert stop.need_int("faulted") == 1 and stop.need_int("sig") == 11
    assert stop.need_int("hung") == 0
    # (on one host a read after the munmap returned is impossible: after == 0)
    assert stop.need_int("after") == 0
    assert any(e.event == "spinfault" for e in ag.events())
    assert ag.call("state", svc="a").ok  # the service lives on


def test_real_agent_reports_deaths_timeouts_exec_and_bad_input(host_agent: Agent):
    ag = host_agent
    assert ag.call("spawn", svc="a").ok
    assert ag.call("spawn", svc="a").fields["reason"] == "exists"
    assert ag.call("state", svc="zz").fields["reason"] == "no_svc"
    assert ag.call("nonsense", svc="a").fields["reason"] == "op"
    pid = ag.call("state", svc="a").need_int("pid")
    ex = ag.call("exec", svc="a")
    assert ex.ok and ex.need_int("pid") == pid
    assert ag.call("spawn", svc="b").ok
    assert ag.call("kill", svc="b").ok
    deadline = time.monotonic() + 5
    evs: list = []
    while time.monotonic() < deadline and not evs:
        evs = [e for e in ag.events() if e.event == "exited"]
        time.sleep(0.05)
    assert evs and evs[0].fields["svc"] == "b" and evs[0].need_int("sig") == 9
    # a guarded access that hangs would be cut at 2 s; a service that sleeps past the
    # deadline is killed: simulate with a tiny deadline on a slow op (touch 64 MiB)
    big = ag.call("mmap", svc="a", len=64 << 20).need_int("addr")
    to = ag.call("touch", svc="a", addr=big, len=64 << 20, value=1, timeout_ms=1)
    assert to.status in ("timeout", "ok")
    if to.status == "timeout":
        assert ag.call("list").fields["svcs"] == "none"
    ag.sock.sendall(b"x" * (MAX_LINE + 10) + b"\n")
    assert ag.call("hello").ok
    assert [e.fields.get("reason") for e in ag.events() if e.seq == 0] == ["too_long"]
    assert re.fullmatch(r"\d+", ag.call("hello").fields["pid"])
