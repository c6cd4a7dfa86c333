"""Soak (issue 11): `testbed run` back to back, in one process, on the correct kernel and
with an injected bug: no flake, and nothing leaks (fds, threads, child processes, QEMU,
/dev/shm RAM files; counted before and after).

Slow: 2 x TESTBED_SOAK_RUNS (default 20) runs of TESTBED_SOAK_SCENARIOS (default all
scenarios; e.g. "phases pair" for a shorter soak), with bug TESTBED_SOAK_BUG (default
the first one a check those scenarios exercise names). Figures are printed (-s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from testbed.boot.machine import SHM_DIR, SHM_PREFIX

from conftest import qemu_processes_for

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def counts(runs: Path) -> dict[str, int]:
    """What this process holds: fds, threads, child processes (pgrep leaves itself out),
    QEMUs of its run folders (other runs on the machine are not ours), its RAM files."""
    children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True,
                              text=True).stdout.split()
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "children": len(children),
        "qemu": len(qemu_processes_for(str(runs))),
        "shm": len(list(SHM_DIR.glob(f"{SHM_PREFIX}{os.getpid()}-*"))),
    }


def test_soak(rpal_kernel: Path, tmp_path: Path) -> None:
    from testbed import cli
    from testbed.designs import get_design

    design = get_design("rpal")
    CHECKS, BUGS = design.checks, design.bugs  # noqa: N806

    runs = int(os.environ.get("TESTBED_SOAK_RUNS", "20"))
    scenarios = os.environ.get("TESTBED_SOAK_SCENARIOS", "").split()
    exercised = {c for sc in design.select(scenarios or None) for c in sc.checks}
    bug = os.environ.get("TESTBED_SOAK_BUG") or next(
        b for b in BUGS if any(b in CHECKS[c].bugs for c in exercised))
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    cli.main(["run", *(scenarios[:1] or ["phases"]), "--kernel", str(rpal_kernel),
              "--run-dir", str(tmp_path / "warm")])  # caches, imports, first-use threads
    before = counts(tmp_path)
    outcomes: dict[str, set[tuple[int, str, tuple[str, ...]]]] = {"": set(), bug: set()}
    seconds: dict[str, list[float]] = {"": [], bug: []}
    try:
        for i in range(runs):
            for b in ("", bug):
                parent = tmp_path / f"{i}-{b or 'nobug'}"
                t0 = time.monotonic()
                code = cli.main(["run", *scenarios, "--kernel", str(rpal_kernel),
                                 "--run-dir", str(parent), *(["--bug", b] if b else [])])
                seconds[b].append(time.monotonic() - t0)
                doc = json.loads((parent / "report.json").read_text())
                failed = tuple(sorted({c for s in doc["scenarios"] for c in s["failed_checks"]}))
                errors = [s["error"] for s in doc["scenarios"] if s["error"]]
                outcomes[b].add((code, doc["verdict"], failed))
                assert not errors, (i, b, errors)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    after = counts(tmp_path)
    for b, times in seconds.items():
        print(f"soak {b or 'no bug'}: {len(times)} runs, {min(times):.1f}-{max(times):.1f} s "
              f"(mean {sum(times) / len(times):.1f}); outcomes {outcomes[b]}")
    print(f"soak counts before {before} after {after}")
    assert outcomes[""] == {(0, "PASS", ())}, outcomes[""]
    assert len(outcomes[bug]) == 1, outcomes[bug]  # no flake
    ((code, verdict, failed),) = outcomes[bug]
    assert code == 1 and verdict == "FAIL"
    assert any(bug in CHECKS[c].bugs for c in failed if c in CHECKS), failed
    assert after == before
