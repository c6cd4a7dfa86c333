"""Moved to testbed.designs.rpal.checks; this alias stays until every branch has merged."""

from __future__ import annotations

from testbed.designs.rpal.checks import *  # noqa: F403
from testbed.designs.rpal.checks import CHECKS, check_snapshots, expected_pkru, parse_facts

__all__ = ["CHECKS", "check_snapshots", "expected_pkru", "parse_facts"]
