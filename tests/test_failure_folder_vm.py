"""A failing run's folder, end to end on the reference kernel (issue 13's "must show"):
the memory dump at the failing checkpoint, `inspect --dump` on it, `testbed report` on the
folder, and its reproduce.sh run from a copy of the folder elsewhere."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_testbed

ENV = {"TESTBED_PROGRESS": "0"}


def verdicts(report: dict) -> list[tuple[str, list]]:
    return [(s["scenario"], sorted((f["check"], f["checkpoint"], f["subject"], f["status"])
                                   for f in s["findings"])) for s in report["scenarios"]]


@pytest.mark.vm
def test_wrong_slot_copy_leaves_a_dump_a_report_and_a_portable_reproducer(
        rpal_kernel: Path, runs_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    res = run_testbed("run", "pair", "--bug", "wrong_slot_copy", "--modes", "l5", "--kernel",
                      str(rpal_kernel), "--run-dir", str(first), env=ENV)
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads((first / "report.json").read_text())
    (sc,) = report["scenarios"]
    assert "slot_copies" in sc["failed_checks"]
    run_dir = Path(sc["run_dir"])

    # 1. the dump, at the first checkpoint where a host check failed
    host_fails = [f for f in sc["findings"] if f["status"] == "fail" and f["source"] == "host"]
    info = json.loads((run_dir / "dump.json").read_text())
    assert info["checkpoint"] == host_fails[0]["checkpoint"]
    dump = run_dir / info["file"]
    assert dump.stat().st_size > 256 << 20  # the guest's 512 MiB of RAM
    assert info["kernel_key"] == rpal_kernel.parent.name or "kernel_key" not in info

    # 2. inspect --dump on the run folder: its vmlinux found, the wrong copy shown
    ins = run_testbed("inspect", "--dump", str(first), timeout=300)
    assert ins.returncode == 0, ins.stderr
    copy = next(f for f in host_fails if f["check"] == "slot_copies"
                and f["checkpoint"] == info["checkpoint"])
    ev = copy["evidence"]
    own, slot = ev["actual_table"], ev["slot"]
    # the service's own entry and its "copy" of the peer's slot point at the same table
    assert re.search(rf"->{own}\b.* {slot}\*->{own}\b|{slot}\*->{own}\b.*->{own}\b",
                     ins.stdout), ins.stdout
    assert re.search(r"^\s+FAIL\s+slot_copies .*points at table", ins.stdout, re.M), ins.stdout

    # 3. report on the folder: the same verdicts
    before = verdicts(report)
    rep = run_testbed("report", str(first), timeout=300)
    assert rep.returncode == 1, rep.stdout + rep.stderr
    assert "every verdict as the run's" in rep.stdout
    assert verdicts(json.loads((first / "report.json").read_text())) == before

    # 4. the folder copied elsewhere (without the dump): its reproduce.sh fails the same way
    moved = tmp_path / "elsewhere" / "x" / run_dir.name
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("*.elf"))
    script = (moved / "reproduce.sh").read_text()
    assert str(run_dir) not in script
    if (rpal_kernel.parent / "meta.json").is_file():  # a cached build: named by its key
        assert str(rpal_kernel) not in script
        assert f"--kernel {rpal_kernel.parent.name} --kernel-series rpal-ref" in script
    again = tmp_path / "again"
    out = subprocess.run(["sh", str(moved / "reproduce.sh"), "--run-dir", str(again),
                          "--no-dump"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={**os.environ, **ENV,
                                            "TESTBED": f"{sys.executable} -m testbed"})
    assert out.returncode == 1, out.stdout + out.stderr
    (sc2,) = json.loads((again / "report.json").read_text())["scenarios"]
    assert sc2["failed_checks"] == sc["failed_checks"] and sc2["bugs"] == ["wrong_slot_copy"]
