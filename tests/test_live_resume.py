"""LiveSnapshotter resumes a guest that QEMU still holds in finish-migrate (no VM)."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.errors import GuestError
from testbed.snapshot.live import LiveSnapshotter


class FakeQmp:
    def __init__(self, refusals: int, reason: str = "Migration is not finalized yet") -> None:
        self.refusals, self.reason, self.calls = refusals, reason, 0

    def execute(self, cmd: str, args: Any = None) -> None:
        assert cmd == "cont"
        self.calls += 1
        if self.calls <= self.refusals:
            raise GuestError(f"QMP cont failed: {self.reason}")


def snapper(qmp: FakeQmp) -> LiveSnapshotter:
    s = object.__new__(LiveSnapshotter)
    s.qmp = qmp  # type: ignore[assignment]
    return s


def test_cont_is_sent_again_while_the_migration_is_not_finalized():
    qmp = FakeQmp(refusals=3)
    snapper(qmp)._resume()
    assert qmp.calls == 4


def test_other_cont_failures_and_a_lasting_refusal_are_raised():
    with pytest.raises(GuestError, match="Resetting"):
        snapper(FakeQmp(1, "Resetting the Virtual Machine is required"))._resume()
    with pytest.raises(GuestError, match="not finalized"):
        snapper(FakeQmp(10**9))._resume(patience=0.05)
