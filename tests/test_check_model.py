"""Findings, statuses, missing checks and guest verdict lines (testbed/check/), no VM."""

from __future__ import annotations

import pytest

from testbed.check.model import (
    Finding,
    ScenarioResult,
    Status,
    missing_checks,
    summarize,
)
from testbed.check.output import parse_workload_output

CHECKS = {"peer_read": "faults", "pkru": "pkru"}


def test_status_helpers() -> None:
    assert Status.of(True) is Status.PASS and Status.of(False) is Status.FAIL
    f = Finding.verdict("c", False, "m", scenario="s")
    assert f.status is Status.FAIL and f.bad and not f.passed and not f.error
    assert Finding("c", Status.SKIP, "m").bad is False
    d = Finding("c", Status.ERROR, "m", "s", "cp", "subj", {"k": 1}, "guest").to_dict()
    assert d == {"check": "c", "status": "error", "source": "guest", "message": "m",
                 "scenario": "s", "checkpoint": "cp", "subject": "subj", "evidence": {"k": 1}}
    assert Finding.from_dict(d) == Finding("c", Status.ERROR, "m", "s", "cp", "subj", {"k": 1},
                                           "guest")


def test_summarize_counts_every_status_and_crashed_scenarios() -> None:
    r1 = ScenarioResult("a", [Finding("c", s, "m") for s in Status])
    r2 = ScenarioResult("b", [], error="guest panic")
    assert summarize([r1, r2]) == {"pass": 1, "fail": 1, "error": 2, "skip": 1}
    assert not r1.passed and r1.failed_checks() == {"c"}
    assert r2.failed_checks() == {"scenario"}
    assert ScenarioResult("c", [Finding("c", Status.SKIP, "m")]).passed


def test_missing_checks() -> None:
    fs = [Finding("keys", Status.SKIP, "m")]
    out = missing_checks(("keys", "pkru"), fs, scenario="s")
    assert [(f.check, f.status, f.scenario) for f in out] == [("pkru", Status.ERROR, "s")]
    assert "not exercised" in out[0].message


LINES = "A: ok peer_read: read 42\nnoise\nB: FAIL pkru: 0x0\nB: ok checkpoint: x\nC: ok new: y\n"


@pytest.mark.parametrize("status, expect", [
    (0, [("faults", "pass"), ("pkru", "fail"), ("workload", "pass")]),
    (1, [("faults", "pass"), ("pkru", "fail"), ("workload", "pass")]),
])
def test_verdict_lines(status: int, expect: list[tuple[str, str]]) -> None:
    fs = parse_workload_output(LINES, scenario="s", workload="w", status=status, checks=CHECKS)
    assert [(f.check, f.status.value) for f in fs] == expect
    assert {f.source for f in fs} == {"guest"} and fs[0].subject == "A"


@pytest.mark.parametrize("text, status, why", [
    ("A: ok peer_read: 1\n", None, "did not finish"),
    ("A: ok peer_read: 1\n", 3, "exited with status 3 without naming a check"),
    ("hello\n", 0, "printed no verdict lines"),
])
def test_verdict_lines_that_do_not_add_up_are_errors(text: str, status: int | None,
                                                     why: str) -> None:
    fs = parse_workload_output(text, scenario="s", workload="w", status=status, checks=CHECKS)
    (err,) = [f for f in fs if f.error]
    assert why in err.message and err.check == "workload" and err.source == "guest"
