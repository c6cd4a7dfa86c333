"""Moved to testbed.designs.rpal.scenarios (and testbed.designs.Scenario).

This alias stays until every branch that imports it has merged; new code calls
testbed.designs.get_design("rpal").
"""

from __future__ import annotations

from collections.abc import Sequence

from testbed.designs import Scenario
from testbed.designs.rpal import BUGS
from testbed.designs.rpal.scenarios import SCENARIOS

__all__ = ["BUGS", "SCENARIOS", "Scenario", "select"]


def select(names: Sequence[str] | None) -> list[Scenario]:
    from testbed.designs.rpal import DESIGN

    return DESIGN.select(names)
