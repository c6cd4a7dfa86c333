"""testbed.boot.qmp without QEMU: a lost connection is a GuestError, never a bare
qemu.qmp exception (which the explorer would take for its own bug)."""

from __future__ import annotations

import pytest
from qemu.qmp.protocol import Runstate, StateError

from testbed.boot.qmp import QMP
from testbed.errors import GuestError


@pytest.mark.parametrize("exc", [
    StateError("QMPClient is disconnecting.", Runstate.DISCONNECTING, Runstate.RUNNING),
    ConnectionResetError("reset by peer"),
    EOFError(),
])
def test_a_lost_connection_is_a_guest_error(exc: BaseException) -> None:
    q = QMP("unit")

    async def boom() -> None:
        raise exc

    try:
        with pytest.raises(GuestError, match="QMP connection lost"):
            q.run(boom())
    finally:
        q.close()


def test_a_timeout_is_a_guest_error() -> None:
    q = QMP("unit")

    async def slow() -> None:
        import asyncio
        await asyncio.sleep(5)

    try:
        with pytest.raises(GuestError, match="did not answer"):
            q.run(slow(), timeout=0.05)
    finally:
        q.close()
