"""Snapshots of a live guest: pause, read vCPUs and memory, resume as it was."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.boot.qmp import QMP
from testbed.snapshot.cpustate import read_all_registers, snapshot_cpus
from testbed.snapshot.kernel import KernelView
from testbed.snapshot.kernel_image import KernelImage
from testbed.snapshot.model import Snapshot, Trigger
from testbed.snapshot.physmem import SharedFileMemory
from testbed.snapshot.snapshot import Vcpu, assemble

CPU_STATE = ("migration", "hmp")


@dataclass(frozen=True)
class _Paused:
    """The guest stopped for a snapshot, and its vCPUs as read then."""

    vcpus: Sequence[Vcpu]
    status_before: str
    seconds: float  # reading the vCPUs (the migration, or HMP)
    stopped_at: float  # time.perf_counter() at the stop


class LiveSnapshotter:
    """Takes snapshots of one running guest; reuses the kernel's types and placement.

    `cpu_state`: "migration" (default: every register, PKRU included, from a migration
    stream) or "hmp" (HMP `info registers`, no PKRU: for a guest under QEMU's
    record/replay, where a migration is not part of the recording).
    """

    def __init__(self, qmp: QMP, ram_path: Path, kernel: Path, *,
                 cpu_state: str = "migration") -> None:
        if cpu_state not in CPU_STATE:
            raise ValueError(f"cpu_state {cpu_state!r}: one of {', '.join(CPU_STATE)}")
        self.cpu_state = cpu_state
        self.qmp = qmp
        self.memory = SharedFileMemory(ram_path)
        self.image = KernelImage.from_paths(kernel)
        self._view: KernelView | None = None  # attached once; reads live memory each time
        self._froze = False

    def capture(
        self, name: str = "", trigger: Trigger | None = None,
        while_paused: Callable[[Snapshot], None] | None = None, **assemble_args: Any
    ) -> Snapshot:
        """Snapshot the guest; with a trigger, wait until that thread has left its CPU.

        A checkpointing thread sends its request and then sleeps in read(); the
        host can be faster than the guest's context switch. Taking the snapshot
        only once the thread is off its CPU makes it the same every time: the
        thread asleep, its PKRU saved in thread.pkru.

        `while_paused(snap)` is called with the snapshot returned, before the guest
        resumes (e.g. to judge it and keep the guest's memory when a check fails).
        """
        attempts = 100
        for attempt in range(attempts):
            snap = self._capture_once(name, trigger, while_paused=while_paused,
                                      last=attempt == attempts - 1, **assemble_args)
            if self._settled(snap, trigger):
                snap.timing["attempts"] = attempt + 1
                return snap
            time.sleep(0.002)
        return snap

    @staticmethod
    def _settled(snap: Snapshot, trigger: Trigger | None) -> bool:
        """The checkpointing thread (if any) is off its CPU in this snapshot."""
        mine = [t for t in snap.tasks if trigger and t.pid == trigger.tid]
        return not mine or mine[0].running_on is None

    def _capture_once(
        self, name: str, trigger: Trigger | None,
        while_paused: Callable[[Snapshot], None] | None = None, last: bool = True,
        **assemble_args: Any
    ) -> Snapshot:
        t0 = time.perf_counter()
        paused = self.qmp.run(self._pause_and_read_cpus())
        was_running = paused.status_before == "running"
        refused = 0
        try:
            t_cpus = time.perf_counter()
            cpus = paused.vcpus
            if self._view is None:
                levels = 5 if any(v.la57 for v in cpus) else 4
                self._view = KernelView.attach(
                    self.memory, self.image, cr3=cpus[0].cr3 if cpus else None, levels=levels
                )
                # The kernel's types and symbols (tens of thousands of objects) live as
                # long as the view: keep them out of the cyclic GC's full collections,
                # which otherwise cost milliseconds while the guest is paused. close()
                # gives them back, so a long process (a test session, a matrix) does not
                # keep every old view out of the collector.
                gc.collect()
                gc.freeze()
                self._froze = True
            view = self._view
            t_attach = time.perf_counter()
            snap = assemble(view, cpus, name=name, trigger=trigger, **assemble_args)
            if while_paused is not None and (last or self._settled(snap, trigger)):
                t_hook = time.perf_counter()
                while_paused(snap)
                snap.timing["while_paused_ms"] = round((time.perf_counter() - t_hook) * 1000, 2)
        finally:
            if was_running:  # whatever happened: a guest left paused would hang its run
                refused = self._resume()
        t_end = time.perf_counter()
        snap.timing.update(
            cpus_ms=round((t_cpus - t0) * 1000, 2),
            migration_ms=round(paused.seconds * 1000, 2),
            attach_ms=round((t_attach - t_cpus) * 1000, 2),
            paused_ms=round((t_end - paused.stopped_at) * 1000, 2),
            cont_refused=refused,  # "Migration is not finalized yet" before the resume
            total_ms=round((t_end - t0) * 1000, 2),
        )
        return snap

    def _resume(self, patience: float = 10.0) -> int:
        """`cont`, again while QEMU is still in finish-migrate; how often it was refused.

        The MIGRATION "completed" event (or query-migrate) can come before
        QEMU 7.2 has moved the run state from finish-migrate to postmigrate;
        a `cont` in between fails with "Migration is not finalized yet" and
        would leave the guest stopped for good (the workload then "did not
        finish" after its whole timeout). Any other failure, or a refusal
        lasting `patience` s, raises GuestStuck: the run fails at once
        (Machine.check_alive) instead of timing out. The same for the async
        path: testbed.snapshot.cpustate.resume_after_migration.
        """
        from testbed.errors import GuestError, GuestStuck

        deadline = time.monotonic() + patience
        refused = 0
        while True:
            try:
                self.qmp.execute("cont")
                return refused
            except GuestError as exc:
                if "not finalized" not in str(exc):
                    raise GuestStuck(f"cannot resume the guest after a snapshot: {exc}") from exc
                if time.monotonic() > deadline:
                    raise GuestStuck(f"the guest stays paused: cannot resume it after a "
                                     f"snapshot within {patience:g} s ({exc})") from exc
                refused += 1
            time.sleep(0.005)

    async def _pause_and_read_cpus(self) -> _Paused:
        """Stop a running guest and read its vCPUs; leave it stopped for the memory reads."""
        if self.cpu_state == "migration":
            snap = await snapshot_cpus(self.qmp.client, resume=False)
            cap = snap.capture
            return _Paused(snap.vcpus, cap.status_before, cap.seconds, cap.stopped_at)
        client = self.qmp.client
        t_stop = time.perf_counter()
        status = await client.execute("query-status")
        before = str(status.get("status")) if isinstance(status, dict) else "unknown"
        if before == "running":
            await client.execute("stop")
        regs = await read_all_registers(client)
        return _Paused(tuple(regs), before, time.perf_counter() - t_stop, t_stop)

    def walker_and_memory(self) -> tuple[Any, Callable[[int, int], bytes]]:
        """The page-table walker and the RAM reader of the attached view (after a first
        capture; for a `while_paused` hook that reads more of the paused guest)."""
        if self._view is None:
            raise RuntimeError("no snapshot taken yet: the kernel view is not attached")
        return self._view.walker, self.memory.read

    def kaslr_offset(self) -> int | None:
        """The kernel's KASLR offset as the attached view found it (None before a capture)."""
        return self._view.layout.kaslr_offset if self._view is not None else None

    def forget(self) -> None:
        """Drop what the page-table walker remembers from earlier snapshots."""
        if self._view is not None:
            self._view.walker.forget()

    def close(self) -> None:
        self.memory.close()
        if self._froze:
            gc.unfreeze()
            self._froze = False


def write_snapshot(snap: Snapshot, folder: Path, name: str) -> Path:
    """folder/NAME.json; `name` (from the guest) must be a plain file name."""
    from testbed.boot.machine import check_checkpoint_name

    check_checkpoint_name(name)  # also checked where the request is parsed
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(snap.dumps() + "\n")
    tmp.replace(path)
    return path
