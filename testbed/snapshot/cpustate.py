"""Per-vCPU state of a live QEMU: control registers from HMP, PKRU from a migration stream.

Two sources, because QEMU 7.2 shows PKRU in neither ``info registers`` nor the
gdbstub (QEMU-FACTS.md):

* ``parse_info_registers`` is a pure parser for the HMP ``info registers``
  text (CR0, CR2, CR3, CR4, EFER, CPL, RIP and every other ``NAME=hex``
  pair); ``read_registers``/``read_all_registers`` fetch it per vCPU with
  QMP ``human-monitor-command`` and ``cpu-index``.
* ``take_migration_stream`` migrates the VM into a memfd (capability
  ``x-ignore-shared``, so RAM on a shared backend is not copied) and
  ``snapshot_cpus`` parses it with :mod:`testbed.snapshot.migstream`.

The snapshot leaves the VM in the run state it found: a running VM is
stopped for the migration and continued afterwards; a paused VM stays
stopped (QEMU then reports ``postmigrate`` instead of ``paused``; both mean
the vCPUs do not run, and ``cont`` resumes either).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qemu.qmp import EventListener, ExecuteError

from testbed.errors import TestbedError
from testbed.snapshot.migstream import VCPU_FIELDS, VcpuState, parse_migration_stream

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

CR4_PKE = 1 << 22
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17
CR0_PG = 1 << 31
EFER_LMA = 1 << 10


# ---------------------------------------------------------------------------
# HMP ``info registers``
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HmpRegisters:
    """The registers of one vCPU as HMP ``info registers`` prints them."""

    cpu_index: int | None
    rip: int
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    cpl: int
    halted: bool | None
    regs: Mapping[str, int] = field(repr=False)
    """Every ``NAME=hex`` pair of the text (segment registers: the selector)."""

    @property
    def la57(self) -> bool:
        return bool(self.cr4 & CR4_LA57)

    @property
    def pke(self) -> bool:
        return bool(self.cr4 & CR4_PKE)

    @property
    def paging_levels(self) -> int:
        return 5 if self.la57 else 4

    @property
    def pgd_phys(self) -> int:
        """CR3 without the PCID/flag bits (the physical address of the root table)."""
        return self.cr3 & 0x000F_FFFF_FFFF_F000


_PAIR_RE = re.compile(r"\b([A-Z][A-Z0-9]*)\s*=\s*([0-9a-fA-F]+)\b")
_CS_DPL_RE = re.compile(r"^CS\s*=.*?\bDPL=(\d)", re.MULTILINE)


def parse_info_registers(text: str, cpu_index: int | None = None) -> HmpRegisters:
    """Parse the text of HMP ``info registers`` for one x86 vCPU.

    CPL comes from the ``CPL=`` field of the RIP line, or else from the DPL of
    CS. Raises TestbedError when a needed register is missing.
    """
    regs: dict[str, int] = {}
    for m in _PAIR_RE.finditer(text):
        name = m.group(1)
        if name not in regs:  # first occurrence wins (the general registers come first)
            regs[name] = int(m.group(2), 16)
    if "RIP" not in regs and "EIP" in regs:
        regs["RIP"] = regs["EIP"]
    cpl: int | None = regs.get("CPL")
    if cpl is None:
        m2 = _CS_DPL_RE.search(text)
        if m2:
            cpl = int(m2.group(1))
    missing = [n for n in ("RIP", "CR0", "CR2", "CR3", "CR4", "EFER") if n not in regs]
    if missing or cpl is None:
        what = ", ".join(missing + ([] if cpl is not None else ["CPL"]))
        first = text.strip().splitlines()[0][:60] if text.strip() else "<empty>"
        raise TestbedError(
            f"HMP 'info registers' output lacks {what} (cpu-index {cpu_index}); "
            f"first line: {first!r}"
        )
    halted = bool(regs["HLT"]) if "HLT" in regs else None
    return HmpRegisters(
        cpu_index=cpu_index,
        rip=regs["RIP"],
        cr0=regs["CR0"],
        cr2=regs["CR2"],
        cr3=regs["CR3"],
        cr4=regs["CR4"],
        efer=regs["EFER"],
        cpl=cpl,
        halted=halted,
        regs=regs,
    )


async def cpu_indexes(qmp: QMPClient) -> list[int]:
    """The cpu-index of every vCPU (QMP ``query-cpus-fast``)."""
    cpus = await _qmp(qmp, "query-cpus-fast")
    assert isinstance(cpus, list)
    return sorted(int(c["cpu-index"]) for c in cpus)


async def read_registers(qmp: QMPClient, cpu_index: int) -> HmpRegisters:
    """HMP ``info registers`` of one vCPU, parsed."""
    text = await _qmp(
        qmp, "human-monitor-command", {"command-line": "info registers", "cpu-index": cpu_index}
    )
    if not isinstance(text, str):
        raise TestbedError(f"human-monitor-command returned {type(text).__name__}, not text")
    return parse_info_registers(text, cpu_index)


async def read_all_registers(qmp: QMPClient) -> list[HmpRegisters]:
    """HMP ``info registers`` of every vCPU, in cpu-index order."""
    return [await read_registers(qmp, i) for i in await cpu_indexes(qmp)]


# ---------------------------------------------------------------------------
# Migration-stream snapshot
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationCapture:
    """The raw stream and how it was taken."""

    stream: bytes
    seconds: float
    """Wall time from stopping the VM to the completed migration (VM not running)."""
    total_seconds: float
    """Wall time of the whole call, QMP round trips and restoring the run state included."""
    status_before: str
    status_after: str
    stopped_at: float
    """``time.perf_counter()`` at the stop (if already paused: when the migration began)."""


@dataclass(frozen=True)
class CpuSnapshot:
    vcpus: tuple[VcpuState, ...]
    capture: MigrationCapture

    def vcpu(self, index: int) -> VcpuState:
        for v in self.vcpus:
            if v.index == index:
                return v
        have = [v.index for v in self.vcpus]
        raise TestbedError(f"no vCPU {index} in the snapshot (have {have})")


_fd_names = itertools.count()


async def _status(qmp: QMPClient) -> str:
    st = await _qmp(qmp, "query-status")
    assert isinstance(st, dict)
    return str(st["status"])


async def _qmp(qmp: QMPClient, cmd: str, args: dict[str, object] | None = None) -> object:
    """Run a QMP command; QMP errors become one-line TestbedErrors."""
    try:
        return await qmp.execute(cmd, args)
    except ExecuteError as e:
        raise TestbedError(f"QMP {cmd} failed: {e}") from e


POSTMIGRATE_REFUSED = (
    "VM is in 'postmigrate' after an earlier snapshot while paused; QEMU 7.2 "
    "refuses another migration until 'cont' (or pass resume_postmigrate=True)"
)

_prepared: weakref.WeakSet[Any] = weakref.WeakSet()
"""QMP clients whose migration capabilities are already set (they stay set in QEMU)."""


async def _prepare(qmp: QMPClient) -> None:
    """Once per QMP client: capabilities ``x-ignore-shared`` and ``events``.

    ``x-ignore-shared`` keeps RAM on a shared backend out of the stream;
    ``events`` makes QEMU announce the migration's progress (MIGRATION
    events), so completion is seen without polling.
    """
    if qmp in _prepared:
        return
    await _qmp(
        qmp,
        "migrate-set-capabilities",
        {
            "capabilities": [
                {"capability": "x-ignore-shared", "state": True},
                {"capability": "events", "state": True},
            ]
        },
    )
    _prepared.add(qmp)


async def _wait_migration(
    qmp: QMPClient, listener: EventListener, before: str, timeout: float, poll_interval: float
) -> None:
    """Until the migration completed: MIGRATION events, and ``query-migrate`` as a
    safety net whenever no event came for ``poll_interval`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            event = await asyncio.wait_for(listener.get(), poll_interval)
            data = event.get("data")
            state = data.get("status") if isinstance(data, dict) else None
            if state not in ("completed", "failed", "cancelled"):
                continue
        except TimeoutError:
            state = None
        info: dict[str, Any] = {}
        if state != "completed":
            reply = await _qmp(qmp, "query-migrate")
            assert isinstance(reply, dict)
            info, state = reply, reply.get("status")
        if state == "completed":
            return
        if state in ("failed", "cancelled"):
            raise TestbedError(
                f"snapshot migration {state} (status before: {before}): "
                f"{info.get('error-desc', 'no error-desc')}"
            )
        if time.monotonic() > deadline:
            await _qmp(qmp, "migrate_cancel")
            raise TestbedError(f"snapshot migration still {state!r} after {timeout:g} s; cancelled")


async def resume_after_migration(qmp: QMPClient, *, timeout: float = 10.0,
                                 interval: float = 0.005) -> int:
    """``cont`` a VM stopped for a snapshot migration, once QEMU lets us.

    The MIGRATION ``completed`` event comes before QEMU leaves run state
    ``finish-migrate``; a ``cont`` in between fails with "Migration is not
    finalized yet" (seen after a few hundred snapshots in a loop). That
    refusal is retried, every `interval` s, until `timeout`; any other
    failure, or a guest still paused then, raises GuestStuck. Returns how many
    times ``cont`` was refused.
    """
    from testbed.errors import GuestStuck

    deadline = time.monotonic() + timeout
    refused = 0
    while True:
        try:
            await qmp.execute("cont")
            return refused
        except ExecuteError as e:
            if "not finalized" not in str(e):
                raise GuestStuck(f"cannot resume the guest after a snapshot: QMP cont "
                                 f"failed: {e}") from e
            last = str(e)
            refused += 1
        if time.monotonic() > deadline:
            raise GuestStuck(f"the guest stays paused: cannot resume it after a snapshot "
                             f"within {timeout:g} s (QMP cont: {last})")
        await asyncio.sleep(interval)


async def take_migration_stream(
    qmp: QMPClient,
    *,
    timeout: float = 30.0,
    poll_interval: float = 0.05,
    resume_postmigrate: bool = False,
    resume: bool = True,
    status: str | None = None,
) -> MigrationCapture:
    """Migrate the VM into a memfd and return the stream; restore the run state.

    Sets capabilities ``x-ignore-shared`` (RAM on a shared memory backend is
    not written into the stream) and ``events`` first, once per client. A
    running VM is stopped and, with ``resume`` (the default), continued; a
    paused VM stays stopped (it ends in ``postmigrate``). Without ``resume``
    the VM is left stopped: the caller reads guest memory of the same moment
    and sends ``cont`` itself.

    ``query-status``, ``stop``, ``getfd`` and ``migrate`` go out as one batch:
    QMP runs them in order, so the status is the one from before the stop
    (stopping a stopped VM changes nothing). ``status``, if the caller knows
    it, replaces the query. Completion comes as a MIGRATION event, with
    ``query-migrate`` polled every ``poll_interval`` s in case none arrives.

    QEMU 7.2 refuses to migrate a VM in ``postmigrate`` ("Can't migrate the
    vm that was paused due to previous migration"), i.e. a second snapshot
    of a VM that stayed paused after the first. That raises TestbedError,
    unless ``resume_postmigrate``: then the VM is continued and stopped
    again first (the guest runs for the few QMP round trips in between).
    """
    t_start = time.perf_counter()
    before = status
    if before is None and resume_postmigrate:
        before = await _status(qmp)
    if before == "postmigrate":
        if not resume_postmigrate:
            raise TestbedError(POSTMIGRATE_REFUSED)
        await _qmp(qmp, "cont")
        await _qmp(qmp, "stop")
    state = "paused" if before == "postmigrate" else before  # the state the migration starts in
    await _prepare(qmp)
    fd = os.memfd_create("testbed-migstream", os.MFD_CLOEXEC)
    name = f"testbed-snap-{os.getpid()}-{next(_fd_names)}"
    stopped = False
    listener = EventListener(("MIGRATION",))
    try:
        with qmp.listen(listener):
            t_stop = time.perf_counter()
            qmp.send_fd_scm(fd)  # before getfd is even queued
            # One batch; QMP runs them in order, so query-status tells the state
            # from before the stop (a stop of a stopped VM changes nothing).
            steps: list[tuple[str, dict[str, str] | None]] = []
            if state is None:
                steps.append(("query-status", None))
            if state in (None, "running"):
                steps.append(("stop", None))
            steps.append(("getfd", {"fdname": name}))
            # migrate goes out only once getfd has answered: QEMU 7.2's socket chardev
            # takes the passed fd in the main thread (getfd) while its monitor thread may
            # be receiving the next command, and both touch the same fd array unlocked
            # (tcp_get_msgfds vs tcp_chr_recv): QEMU died of a NULL read there
            # (qemu-system-x86_64+0x8d1787) about once an hour of explore.
            results = dict(
                zip(
                    (cmd for cmd, _ in steps),
                    await asyncio.gather(
                        *(qmp.execute(cmd, args) for cmd, args in steps), return_exceptions=True
                    ),
                    strict=True,
                )
            )
            results["migrate"] = None  # not sent when getfd failed (its error is raised)
            if not isinstance(results["getfd"], BaseException):
                try:
                    results["migrate"] = await qmp.execute("migrate", {"uri": f"fd:{name}"})
                except Exception as exc:  # judged below with the others
                    results["migrate"] = exc
            queried = results.get("query-status")
            if isinstance(queried, dict):
                before = state = str(queried.get("status"))
            stopped = state == "running" and not isinstance(results["stop"], BaseException)
            if not isinstance(results["getfd"], BaseException) and isinstance(
                results["migrate"], BaseException
            ):  # the migration never took the fd: don't leave it in QEMU
                await asyncio.gather(
                    qmp.execute("closefd", {"fdname": name}), return_exceptions=True
                )
            if state == "postmigrate":
                raise TestbedError(POSTMIGRATE_REFUSED)
            for cmd, res in results.items():
                if isinstance(res, BaseException):
                    if isinstance(res, ExecuteError):
                        raise TestbedError(f"QMP {cmd} failed: {res}") from res
                    raise res
            assert before is not None
            await _wait_migration(qmp, listener, before, timeout, poll_interval)
        t_done = time.perf_counter()
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        stream = b"".join(chunks)
    except BaseException:
        if stopped:
            await resume_after_migration(qmp)
        raise
    finally:
        os.close(fd)
    if stopped and resume:
        await resume_after_migration(qmp)
        after = await _status(qmp)
    else:
        after = "postmigrate"  # what QEMU 7.2 reports after a completed migration
    return MigrationCapture(
        stream=stream,
        seconds=t_done - t_stop,
        total_seconds=time.perf_counter() - t_start,
        status_before=before or "unknown",
        status_after=after,
        stopped_at=t_stop,
    )


async def snapshot_cpus(
    qmp: QMPClient,
    *,
    timeout: float = 30.0,
    resume_postmigrate: bool = False,
    resume: bool = True,
    status: str | None = None,
) -> CpuSnapshot:
    """Per-vCPU state (PKRU, CR0/CR3/CR4/EFER, CPL, ...) from a migration-stream snapshot.

    ``resume``/``status``: see :func:`take_migration_stream`.
    """
    cap = await take_migration_stream(
        qmp, timeout=timeout, resume_postmigrate=resume_postmigrate, resume=resume, status=status
    )
    vcpus = parse_migration_stream(cap.stream, only=VCPU_FIELDS).vcpus
    return CpuSnapshot(vcpus=tuple(vcpus), capture=cap)
