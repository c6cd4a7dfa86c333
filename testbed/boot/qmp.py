"""A synchronous face on qemu.qmp's asyncio QMPClient.

The client runs on an event loop in a daemon thread, so callers in plain
threads can issue commands, and QMP events (GUEST_PANICKED, SHUTDOWN...)
are collected as they arrive, not only when a command is in flight.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import StateError

from testbed.errors import GuestError

T = TypeVar("T")


class QMP:
    """One QMP session; `execute` is synchronous and thread-safe."""

    def __init__(self, name: str = "testbed") -> None:
        self.client = QMPClient(name)
        self.events: list[dict[str, Any]] = []
        self._event_callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp", daemon=True)
        self._thread.start()
        self._listener: asyncio.Task[None] | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run a coroutine on the QMP loop (for code written against QMPClient)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError as exc:
            fut.cancel()
            raise GuestError(f"QMP did not answer within {timeout:.0f} s") from exc
        except (StateError, ConnectionError, EOFError) as exc:
            # the socket went away under a command: QEMU exited (or crashed); the
            # machine's check_alive() names how
            raise GuestError(f"QMP connection lost ({exc}): QEMU is gone") from exc

    def connect(self, sock: socket.socket | str, timeout: float = 30.0) -> None:
        self.run(self._connect(sock), timeout)

    async def _connect(self, sock: socket.socket | str) -> None:
        await self.client.connect(sock)
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        async for event in self.client.events:
            ev = dict(event)
            with self._lock:
                self.events.append(ev)
                callbacks = list(self._event_callbacks)
            for cb in callbacks:
                cb(ev)

    def on_event(self, callback: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            self._event_callbacks.append(callback)

    def execute(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        try:
            return self.run(self.client.execute(cmd, args), timeout)
        except QMPError as exc:
            raise GuestError(f"QMP {cmd} failed: {exc}") from exc

    def hmp(self, command: str, cpu_index: int | None = None) -> str:
        args: dict[str, Any] = {"command-line": command}
        if cpu_index is not None:
            args["cpu-index"] = cpu_index
        return str(self.execute("human-monitor-command", args))

    def close(self) -> None:
        if not self._loop.is_running():
            return
        try:
            self.run(self._shutdown(), timeout=5)
        except Exception:  # noqa: BLE001 - QEMU may already be gone; closing is best effort
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self.client.disconnect()
