"""Output CI can read: `testbed run | cat` names its run folder before any long work and
prints a timestamped line at least every TESTBED_HEARTBEAT seconds while it lasts; one line
per scenario as it finishes; -x; a guest panic alone exits 125.

The slow kernel build is a fake `make` run through the real build logging (run_logged
with the real Progress) that stays silent until the test has seen what it wants: the test
can only pass when the lines come while the work is still going on, and it fails on its
deadline (not a duration measurement) when they never come.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from testbed import runner
from testbed.check.model import Finding, ScenarioResult, Status
from testbed.designs import get_design
from testbed.progress import Progress
from testbed.run_commands import result_line, run_status

DEADLINE = 120.0  # seconds the test waits for a line before failing

WRAPPER = r'''
import sys
from pathlib import Path
import testbed.build.kernel as kernel

FAKE_MAKE = sys.argv[1]

def fake_build(series, config_fragments, source, jobs, force, run_dir, start, progress):
    log = Path(FAKE_MAKE).with_name("build.log")
    kernel.run_logged(["sh", FAKE_MAKE], cwd=Path(FAKE_MAKE).parent, log=log,
                      progress=progress, what="make bzImage")
    raise AssertionError("the fake make always fails")

kernel._build_kernel = fake_build
from testbed.cli import main
sys.exit(main(sys.argv[2:]))
'''

# prints nothing until `go` exists (the test has read the run folder line), then three
# objects, then stays silent until `release` exists, then fails like a broken build
FAKE_MAKE = r'''
while [ ! -e go ]; do sleep 0.05; done
echo "  CC      kernel/fork.o"
echo "  CC      mm/mmap.o"
echo "  AS      arch/x86/entry/entry_64.o"
while [ ! -e release ]; do sleep 0.05; done
echo "make: *** [Makefile:1: vmlinux] Error 2"
exit 2
'''


def _reader(stream, lines: list[str], cond: threading.Condition) -> None:
    for line in stream:
        with cond:
            lines.append(line.rstrip("\n"))
            cond.notify_all()
    with cond:
        lines.append("<EOF>")
        cond.notify_all()


def _wait_for(lines: list[str], cond: threading.Condition, pred, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    with cond:
        while not pred(lines):
            left = deadline - time.monotonic()
            if left <= 0 or (lines and lines[-1] == "<EOF>"):
                pytest.fail(f"never saw {what}; got: {lines}")
            cond.wait(left)


def test_run_piped_names_its_folder_first_and_heartbeats_through_a_silent_build(
        tmp_path: Path) -> None:
    work = tmp_path / "make"
    work.mkdir()
    (work / "fake-make.sh").write_text(FAKE_MAKE)
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    runs = tmp_path / "runs"
    env = {**os.environ, "CI": "true", "TESTBED_HEARTBEAT": "0.3", "TESTBED_RUNS": str(runs)}
    env.pop("TESTBED_PROGRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "wrapper.py"), str(work / "fake-make.sh"), "run",
         "phases"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out: list[str] = []
    err: list[str] = []
    cond = threading.Condition()
    threads = [threading.Thread(target=_reader, args=(proc.stdout, out, cond), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, err, cond), daemon=True)]
    for t in threads:
        t.start()
    try:
        # 1. the run folder, on stdout through a pipe, before the build printed anything
        _wait_for(out, cond, lambda ls: any(x.startswith("run folder: ") for x in ls),
                  "the run folder line")
        folder = Path(next(x for x in out if x.startswith("run folder: "))[12:])
        assert folder.is_dir() and folder.parent == runs
        assert not (work / "go").exists()
        (work / "go").touch()
        # 2. while make is silent: timestamped heartbeat lines with the objects compiled
        beat = re.compile(r"^\[\d\d:\d\d:\d\d\] kernel build: make bzImage: 3 objects "
                          r"compiled, .*\(still working\) \(\d+ s\)$")
        _wait_for(err, cond, lambda ls: sum(bool(beat.match(x)) for x in ls) >= 3,
                  "three heartbeat lines during the silent build")
        assert proc.poll() is None  # the heartbeats came while the build was running
        (work / "release").touch()
        rc = proc.wait(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
        for t in threads:
            t.join(timeout=10)
    assert rc == 125, (out, err)
    assert any("testbed: error: make bzImage failed: make: ***" in x for x in err), err
    assert [x for x in err if "Traceback" in x] == []


def test_heartbeat_repeats_the_latest_detail_only_without_a_tty(tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")

    class Stream:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def write(self, s: str) -> None:
            self.lines += [x for x in s.splitlines() if x]

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    s = Stream()
    p = Progress("work", s, interval=0.05)  # type: ignore[arg-type]
    p.update("step one", force=True)
    p.update("step two")  # not forced: shown by the next heartbeat, not at once
    assert s.lines[-1].endswith("work: step one (0 s)")
    deadline = time.monotonic() + DEADLINE
    while not any("step two (still working)" in x for x in s.lines):
        assert time.monotonic() < deadline, s.lines
        time.sleep(0.01)
    p.done("finished")
    n = len(s.lines)
    assert "work: finished" in s.lines[-1]
    time.sleep(0.2)
    assert len(s.lines) == n  # done() stops the heartbeat
    assert all(re.match(r"^\[\d\d:\d\d:\d\d\] work: ", x) for x in s.lines)


def _result(name: str, status: Status, error: str = "") -> ScenarioResult:
    return ScenarioResult(name, [Finding("keys", status, "m", name)], f"/runs/{name}",
                          error=error)


def test_a_line_per_scenario_as_it_finishes(monkeypatch, tmp_path: Path, capsys) -> None:
    design = get_design("rpal")
    scs = [design.scenarios[n] for n in ("phases", "pair", "stray")]
    order: list[str] = []

    def fake(sc, spec, bugs, parent, mode=None):
        order.append(sc.name)
        return _result(sc.name, Status.FAIL if sc.name == "pair" else Status.PASS)

    monkeypatch.setattr(runner, "run_scenario", fake)
    jobs = [(sc, (), None) for sc in scs]
    seen: list[tuple[str, int, int]] = []

    def on_result(r, done, total):
        seen.append((r.scenario, done, total))
        result_line(r, done, total)

    results = runner.run_all(jobs, None, tmp_path, 1, on_result=on_result)  # type: ignore
    assert [r.scenario for r in results] == ["phases", "pair", "stray"]
    assert seen == [("phases", 1, 3), ("pair", 2, 3), ("stray", 3, 3)]
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"^\[\d\d:\d\d:\d\d\] PASS  phases \(1/3\): 1 passed, 0 failed", lines[0])
    assert re.match(r"^\[\d\d:\d\d:\d\d\] FAIL  pair \(2/3\): 0 passed, 1 failed.*"
                    r"  /runs/pair$", lines[1])

    # -x: nothing starts after the first scenario that did not pass
    order.clear()
    results = runner.run_all(jobs, None, tmp_path, 1, stop_on_failure=True)  # type: ignore
    assert [r.scenario for r in results] == ["phases", "pair"]
    assert order == ["phases", "pair"]


def test_a_guest_panic_alone_is_125_not_a_check_failure() -> None:
    panic = ScenarioResult("pair", [Finding("kernel_log", Status.FAIL, "Kernel panic", "pair")],
                           error="guest panic: Kernel panic - not syncing")
    assert run_status([panic]) == 125
    judged = ScenarioResult("pair", [Finding("kernel_log", Status.FAIL, "Oops", "pair")])
    assert run_status([judged]) == 1  # an alarm in a scenario that ran is a finding
    both = ScenarioResult("pair", [*panic.findings, Finding("keys", Status.FAIL, "m", "pair")],
                          error=panic.error)
    assert run_status([both]) == 1
    assert run_status([_result("a", Status.PASS)]) == 0
    assert run_status([_result("a", Status.ERROR)]) == 125
