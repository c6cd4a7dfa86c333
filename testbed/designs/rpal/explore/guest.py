"""The explorer's guest: boot with the agent port, start the agent, snapshot and console."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.boot.machine import Machine, MachineConfig
from testbed.designs.rpal import DESIGN
from testbed.designs.rpal.agent import AGENT_PORT, Agent, start_agent
from testbed.designs.rpal.explore import oracles
from testbed.designs.rpal.explore.choices import Choices
from testbed.errors import GuestError
from testbed.runner import GuestSpec, _check_bugs, kernel_append
from testbed.snapshot.live import LiveSnapshotter
from testbed.snapshot.model import Snapshot

DELAY_PARAM = "/sys/module/rpal/parameters/id_free_delay_ms"


class _Snap:
    """The snapshotter the session uses: a live snapshot of the whole guest per call."""

    def __init__(self, live: LiveSnapshotter, machine: Machine | None = None) -> None:
        self.live = live
        self.machine = machine

    def capture(self, name: str = "") -> Snapshot:
        for attempt in range(3):
            try:
                return self.live.capture(name)
            except GuestError as exc:
                if self.machine is not None:
                    self.machine.check_alive()  # QEMU gone: QemuCrash with its status
                # QEMU 7.2 may refuse `cont` for a moment after the migration that read the
                # vCPUs reported completion ("Migration is not finalized yet"): the guest is
                # still paused. Continue it and take the snapshot again.
                if "not finalized" not in str(exc) or attempt == 2:
                    raise
                self._cont()
        raise AssertionError("unreachable")

    def _cont(self) -> None:
        deadline = time.monotonic() + 5
        while True:
            try:
                self.live.qmp.execute("cont")
                return
            except GuestError as exc:
                if "not finalized" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)


@dataclass
class Rig:
    machine: Machine
    agent: Agent
    snapshotter: oracles.Snapshotter
    console: oracles.ConsoleWatch
    hello: str


@contextmanager
def explore_guest(spec: GuestSpec, bugs: tuple[str, ...], run_dir: Path, choices: Choices,
                  smp: int = 2) -> Iterator[Rig]:
    cfg = MachineConfig(
        kernel=spec.kernel, initrd=spec.initrd, accel=spec.accel, smp=smp,
        mem_mib=spec.mem_mib, paging=spec.paging, pti=spec.pti,
        append=kernel_append(spec, bugs, DESIGN), boot_timeout=spec.boot_timeout,
        serial_ports=(AGENT_PORT,),
    )
    live: LiveSnapshotter | None = None
    with Machine(cfg, run_dir) as m:
        _check_bugs(m, bugs, DESIGN)
        agent = start_agent(m)
        try:
            if choices.id_free_delay_ms is not None:
                res = m.run(f"echo {int(choices.id_free_delay_ms)} > {DELAY_PARAM}",
                            timeout=30, label="set id_free_delay_ms")
                if res.status != 0:
                    raise GuestError(f"cannot set {DELAY_PARAM} in the guest (is this an RPAL "
                                     "kernel with the reference's knob?); set "
                                     "id_free_delay_ms=None in the explore choices otherwise",
                                     run_dir=run_dir)
            assert m.qmp is not None
            live = LiveSnapshotter(m.qmp, m.ram_path, spec.kernel)
            hello = agent.hello.text() if agent.hello else ""
            yield Rig(m, agent, _Snap(live, m), oracles.ConsoleWatch(m.console_log), hello)
        finally:
            if live is not None:
                live.close()
            agent.close()


def dump_at_failure(rig: Rig, session: Any, steps: list[Any], run_dir: Path, spec: GuestSpec
                    ) -> str:
    """Keep the guest's memory at a failure of explore (testbed/snapshot/memdump.py): the
    shrunk sequence is replayed to its failing step, then the guest is stopped for the dump
    and continued. "" when no dump was written (turned off, over the cap, not failing again
    on replay: dump.json says why)."""
    from testbed.designs.rpal.explore import driver
    from testbed.snapshot.memdump import FailureDump

    if not spec.dump.enabled or rig.machine.qmp is None:
        return ""
    qmp = rig.machine.qmp
    dumper = FailureDump(qmp, run_dir, spec.dump, spec.mem_mib, spec.kernel)
    again = driver.replay(session, steps)
    label = f"step{again.step_index}" if again is not None else "replay"
    why = ([f"{again.check}: {again.message}"] if again is not None
           else ["the shrunk sequence did not fail again on replay: memory after it"])
    qmp.execute("stop")
    try:
        return dumper.take(label, why)
    finally:
        qmp.execute("cont")
