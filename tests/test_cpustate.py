"""CPU-state edge: HMP parser on recorded text, snapshot sequence against a fake QMP client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_migstream_synth import CPU0, CPU1, build_stream

from testbed.errors import TestbedError
from testbed.snapshot import cpustate

DATA = Path(__file__).parent / "data"


def recorded(variant: str) -> dict[str, Any]:
    return json.loads((DATA / f"record-{variant}.json").read_text())


@pytest.mark.parametrize("variant", ["la57-amd", "l4-intel", "nopku"])
def test_parse_recorded_info_registers(variant: str) -> None:
    rec = recorded(variant)
    user = cpustate.parse_info_registers(rec["hmp_info_registers"]["1"], 1)
    idle = cpustate.parse_info_registers(rec["hmp_info_registers"]["0"], 0)
    assert user.cpl == 3 and 0x400000 <= user.rip < 0x500000
    assert idle.cpl == 0 and idle.rip >= 0xFFFF_8000_0000_0000 and idle.halted
    assert user.cr3 == rec["vcpu1_cr3"]
    for r in (user, idle):
        assert r.cr0 == 0x80050033
        assert r.efer == 0xD01
        assert r.la57 == (variant != "l4-intel")
        assert r.pke == (variant != "nopku")
        assert r.pgd_phys == r.cr3 & ~0xFFF
        assert r.regs["CS"] in (0x10, 0x33)
    if rec["pti"]:
        assert user.cr3 & 0x1000 and not idle.cr3 & 0x1000


TEXT_32 = """EAX=00000000 EBX=00000000 ECX=00000000 EDX=00000663
EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
CS =f000 ffff0000 0000ffff 00009b00
CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000
EFER=0000000000000000
"""


def test_parse_32bit_and_dpl_fallback() -> None:
    r = cpustate.parse_info_registers(TEXT_32)
    assert (r.rip, r.cr0, r.cpl, r.efer) == (0xFFF0, 0x60000010, 0, 0)
    # no CPL= field: CPL from the DPL of CS
    text = TEXT_32.replace(" CPL=0", "").replace("00009b00", "00009b00 DPL=3 CS64")
    assert cpustate.parse_info_registers(text).cpl == 3


def test_parse_missing_register_is_an_error() -> None:
    with pytest.raises(TestbedError, match="CR3") as ei:
        cpustate.parse_info_registers(TEXT_32.replace("CR3=00000000 ", ""), 2)
    assert "\n" not in str(ei.value)
    with pytest.raises(TestbedError):
        cpustate.parse_info_registers("")


class FakeQmp:
    """Answers the QMP commands the snapshot uses, the way QEMU 7.2 does.

    ``events``: announce the migration's end with a MIGRATION event (QEMU
    does once capability ``events`` is set); without, only ``query-migrate``
    tells (the third poll says completed or failed).
    """

    def __init__(
        self, status: str, stream: bytes, *, fail: bool = False, events: bool = True
    ) -> None:
        self.status = status
        self.stream = stream
        self.fail = fail
        self.events = events
        self.log: list[str] = []
        self.fd = -1
        self.polls = 0
        self.fdname = ""
        self.capabilities: set[str] = set()
        self.listeners: list[Any] = []

    def send_fd_scm(self, fd: int) -> None:
        self.fd = fd

    @contextlib.contextmanager
    def listen(self, listener: Any) -> Iterator[None]:
        self.listeners.append(listener)
        try:
            yield
        finally:
            self.listeners.remove(listener)

    async def _announce_end(self) -> None:
        await asyncio.sleep(0.001)  # QEMU's migration thread finishes after 'migrate' returned
        end = "failed" if self.fail else "completed"
        if not self.fail:
            self.status = "postmigrate"
        for listener in list(self.listeners):
            await listener.put({"event": "MIGRATION", "data": {"status": end}})

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> object:
        self.log.append(cmd)
        if cmd == "query-status":
            return {"status": self.status, "running": self.status == "running"}
        if cmd == "stop":
            if self.status == "running":  # QEMU: stopping a stopped VM changes nothing
                self.status = "paused"
        elif cmd == "cont":
            self.status = "running"
        elif cmd == "getfd":
            assert args is not None
            await asyncio.sleep(0)  # QEMU's main thread takes the fd meanwhile
            self.fdname = args["fdname"]
        elif cmd == "migrate-set-capabilities":
            assert args is not None
            self.capabilities |= {c["capability"] for c in args["capabilities"] if c["state"]}
        elif cmd == "migrate":
            # sent while getfd ran, it raced QEMU 7.2's chardev into a segfault
            assert self.fdname, "migrate sent before getfd answered"
            assert args == {"uri": f"fd:{self.fdname}"}
            assert self.status != "running", "migrating a running VM"
            if self.status == "postmigrate":
                raise RuntimeError("Can't migrate the vm that was paused due to previous migration")
            os.write(self.fd, self.stream)  # QEMU writes through its copy of the fd
            self.polls = 0
            if self.events and "events" in self.capabilities:
                self.ending = asyncio.get_running_loop().create_task(self._announce_end())
        elif cmd == "query-migrate":
            self.polls += 1
            if self.polls < 3:
                return {"status": "active"}
            if self.fail:
                return {"status": "failed", "error-desc": "disk on fire"}
            self.status = "postmigrate"
            return {"status": "completed"}
        elif cmd == "query-cpus-fast":
            return [{"cpu-index": 1}, {"cpu-index": 0}]
        elif cmd == "human-monitor-command":
            assert args is not None
            return recorded("la57-amd")["hmp_info_registers"][str(args["cpu-index"])]
        return {}


STREAM = build_stream([(CPU0, None), (CPU1, 0x5A5A5A54)])


def test_snapshot_of_running_vm_continues_it() -> None:
    q = FakeQmp("running", STREAM)
    snap = asyncio.run(cpustate.snapshot_cpus(q))  # type: ignore[arg-type]
    assert q.status == "running"
    # capabilities, then one batch (the status is from before the stop), then cont
    assert q.log[:5] == ["migrate-set-capabilities", "query-status", "stop", "getfd", "migrate"]
    assert q.log[5:] == ["cont", "query-status"]
    assert snap.capture.status_before == "running" and snap.capture.status_after == "running"
    assert snap.capture.stream == STREAM
    assert snap.vcpu(1).pkru == 0x5A5A5A54 and snap.vcpu(0).pkru == 0


def test_snapshot_of_paused_vm_leaves_it_stopped() -> None:
    q = FakeQmp("paused", STREAM)
    snap = asyncio.run(cpustate.snapshot_cpus(q))  # type: ignore[arg-type]
    assert "cont" not in q.log and q.status == "postmigrate"  # its 'stop' changed nothing
    assert snap.capture.status_before == "paused"
    assert snap.capture.status_after == "postmigrate"
    # a second one from postmigrate is refused by QEMU 7.2: a clear error by default
    with pytest.raises(TestbedError, match="postmigrate"):
        asyncio.run(cpustate.snapshot_cpus(q))  # type: ignore[arg-type]
    assert q.log[-1] == "closefd"  # the refused migration did not take the fd
    q.log.clear()
    asyncio.run(cpustate.snapshot_cpus(q, resume_postmigrate=True))  # type: ignore[arg-type]
    assert q.log[1:3] == ["cont", "stop"] and q.status == "postmigrate"


def test_failed_migration_is_an_error_and_vm_continues() -> None:
    q = FakeQmp("running", STREAM, fail=True)
    with pytest.raises(TestbedError, match="disk on fire"):
        asyncio.run(cpustate.snapshot_cpus(q))  # type: ignore[arg-type]
    assert q.status == "running" and q.log[-1] == "cont"


def test_completion_comes_from_the_migration_event() -> None:
    q = FakeQmp("running", STREAM)
    snap = asyncio.run(cpustate.snapshot_cpus(q))  # type: ignore[arg-type]
    assert {"x-ignore-shared", "events"} <= q.capabilities
    assert "query-migrate" not in q.log  # the event said completed: no polling
    assert q.log[q.log.index("stop") :][:3] == ["stop", "getfd", "migrate"]
    assert snap.vcpu(1).pkru == 0x5A5A5A54


def test_completion_without_events_is_polled() -> None:
    q = FakeQmp("running", STREAM, events=False)
    snap = asyncio.run(cpustate.snapshot_cpus(q))  # type: ignore[arg-type]
    assert q.log.count("query-migrate") == 3 and q.status == "running"
    assert snap.vcpu(0).pkru == 0


def test_failure_event_is_an_error() -> None:
    q = FakeQmp("running", STREAM, fail=True)
    with pytest.raises(TestbedError, match="snapshot migration failed"):
        asyncio.run(cpustate.snapshot_cpus(q))  # type: ignore[arg-type]
    assert q.status == "running"


def test_without_resume_the_vm_stays_stopped_for_the_caller() -> None:
    q = FakeQmp("running", STREAM)

    async def twice() -> None:
        for _ in range(2):  # capabilities are set once per client
            snap = await cpustate.snapshot_cpus(q, status="running", resume=False)  # type: ignore[arg-type]
            assert snap.capture.status_after == "postmigrate" and q.status == "postmigrate"
            assert snap.capture.stopped_at <= time.perf_counter()
            await q.execute("cont")

    asyncio.run(twice())
    once = ["stop", "getfd", "migrate", "cont"]  # 'cont' is the caller's; no query-status
    assert q.log == ["migrate-set-capabilities"] + once + once


def test_read_all_registers_via_hmp() -> None:
    q = FakeQmp("running", STREAM)
    regs = asyncio.run(cpustate.read_all_registers(q))  # type: ignore[arg-type]
    assert [r.cpu_index for r in regs] == [0, 1]
    assert regs[1].cpl == 3 and regs[0].cpl == 0
