"""The pair plumbing of guest/lib (rpal_run_pair, links, steps): a role that dies or hangs
never blocks its partner, and its death is a failed finding of the step it was in.

The offline tests build tests/data/rpal_pair_plumbing.c (no RPAL) with guest/lib on the
host and run it; the `vm` test kills a role of tb-rpal_pair on the reference kernel.
Timings go into the messages, never into the assertions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testbed import paths
from testbed.build import guestprogs
from testbed.check.output import parse_workload_output
from testbed.designs.rpal.output import OUTPUT_CHECKS

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def plumbing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not shutil.which(guestprogs.CC):
        pytest.skip(f"no C compiler {guestprogs.CC}")
    out = tmp_path_factory.mktemp("plumbing") / "pair"
    lib = sorted((paths.GUEST_DIR / "lib").glob("*.c"))
    subprocess.run([guestprogs.CC, *guestprogs.CFLAGS, f"-I{paths.GUEST_DIR / 'lib'}", "-o",
                    str(out), str(DATA / "rpal_pair_plumbing.c"), *map(str, lib)], check=True)
    return out


def run(prog: Path, *args: str, **env: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    # the timeout only keeps a broken build from hanging the test run
    p = subprocess.run([str(prog), *args], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    return p.returncode, p.stdout, time.monotonic() - t0


def findings(text: str, status: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for f in parse_workload_output(text, scenario="t", workload="pair", status=status,
                                   checks=OUTPUT_CHECKS):
        out.setdefault(f.check, []).append(f)
    return out


def test_pair_that_lives_passes(plumbing: Path):
    status, text, secs = run(plumbing)
    assert status == 0, f"{secs:.2f} s:\n{text}"
    assert text.count(": ok ") == 6, text
    assert "A: step peer_read" in text and "B: step release" in text, text


def test_a_role_that_dies_is_a_failure_of_its_step_and_its_partner_is_not_blocked(
        plumbing: Path):
    status, text, secs = run(plumbing, "--die-in", "B:peer_read")
    msg = f"took {secs:.2f} s:\n{text}"
    assert status == 1, msg
    assert "B: FAIL peer_read: killed by signal 11 (SIGSEGV) in step peer_read" in text, msg
    # A learns at once that B is gone (EOF or EPIPE), it does not wait for a timeout
    a_fail = [line for line in text.splitlines() if line.startswith("A: FAIL link:")]
    assert a_fail and "the peer is gone" in a_fail[0] and "in step peer_read" in a_fail[0], msg
    found = findings(text, status)
    # peer_read is the workload check of the faults invariant (testbed.check.output)
    assert [f.passed for f in found["faults"]] == [False], msg
    assert "killed by signal 11" in found["faults"][0].message, msg
    assert not any(f.error for fs in found.values() for f in fs), msg


def test_a_role_that_hangs_is_timed_out_then_killed(plumbing: Path):
    status, text, secs = run(plumbing, "--die-in", "B:release:hang", RPAL_TIMEOUT_MS="300")
    msg = f"took {secs:.2f} s:\n{text}"
    assert status == 1, msg
    assert "A: FAIL link: no word from the peer for 0.3 s at sync '2', in step release" in text, \
        msg
    assert "B: FAIL release: still running long after its partner ended, killed in step " \
        "release" in text, msg
    assert "A: ok peer_read: passed" in text and "B: ok peer_read: passed" in text, msg


def test_die_in_wants_role_and_step(plumbing: Path):
    status, text, _ = run(plumbing, "--die-in", "nocolon")
    assert status == 2


@pytest.mark.vm
def test_partner_dying_mid_pair_in_a_guest_fails_named_and_fast(guest: Any):
    """tb-rpal_pair with B killed at peer_read: named failures, A not blocked, output kept."""
    res = guest.run("tb-rpal_pair --die-in B:peer_read", timeout=280)
    text = res.stdout.decode(errors="replace")
    msg = f"guest run took {res.seconds:.1f} s:\n{text}"
    assert res.status == 1, msg
    assert "B: FAIL peer_read: killed by signal 11 (SIGSEGV) in step peer_read" in text, msg
    assert "A: ok request" in text and "B: ok pkru" in text, msg  # the output so far
    a_fail = [line for line in text.splitlines() if line.startswith("A: FAIL link:")]
    assert a_fail and "the peer is gone" in a_fail[0], msg
    found = findings(text, res.status)
    assert any(not f.passed and "killed by signal 11" in f.message for f in found["faults"]), msg
    assert "workload" not in found or not any(f.error for f in found["workload"]), msg
