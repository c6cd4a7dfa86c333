"""`testbed run` as a user calls it: exit status, reports, and the reproducer of a failure."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.boot.hostcaps import Accel
from testbed.designs import get_design
from testbed.runner import GuestSpec, reproduce_commands, write_reproducer

from conftest import run_testbed

SCENARIOS = get_design("rpal").scenarios

SPEC = GuestSpec(kernel=Path("/k/bzImage"), initrd=Path("/i.cpio"),
                 accel=Accel("tcg", "max", "test"), paging=4, pti="on", append="quiet")


def validate_run(folder: Path, report: dict) -> None:
    """report.json and every snapshot of the run against the shipped JSON Schemas."""
    import jsonschema

    from testbed.report.jsonreport import json_schema as report_schema
    from testbed.snapshot.model import json_schema as snapshot_schema

    jsonschema.validate(report, report_schema())
    assert "skipped" in report["totals"]
    assert all(f["source"] in ("host", "guest") for s in report["scenarios"]
               for f in s["findings"])
    snaps = list(folder.glob("*/snapshots/*.json"))
    for snap in snaps:
        jsonschema.validate(json.loads(snap.read_text()), snapshot_schema())


def test_reproduce_commands_carry_every_guest_option() -> None:
    run, boot = reproduce_commands(SCENARIOS["pair"], SPEC, ("same_pkey", "pkru_open"))
    assert run[1:3] == ["run", "pair"]
    text = shlex.join(run)
    for part in ("--kernel /k/bzImage", "--accel tcg", "--paging 4", "--pti on",
                 "--bug same_pkey --bug pkru_open", "--append quiet"):
        assert part in text, part
    assert boot[1] == "boot"
    assert boot[boot.index("--append") + 1] == "rpal.bug=same_pkey,pkru_open quiet"
    assert "--smp" in boot and "--mem" in boot


def test_reproducer_script(tmp_path: Path) -> None:
    path = write_reproducer(tmp_path, SCENARIOS["limits"], SPEC, ())
    text = path.read_text()
    assert path.stat().st_mode & 0o111
    assert text.startswith("#!/bin/sh\n")
    assert "then, in the guest: tb-rpal_limits" in text
    assert re.search(r"^exec \S+ run limits .*\"\$@\"$", text, re.M)
    assert "rpal.bug" not in text  # no bug: nothing to append
    subprocess.run(["sh", "-n", str(path)], check=True)  # valid shell


@pytest.mark.vm
def test_failed_run_names_a_reproducer_that_fails_the_same_way(
    rpal_kernel: Path, runs_dir: Path, tmp_path: Path
) -> None:
    first = tmp_path / "first"
    res = run_testbed("run", "same_pkey", "--kernel", str(rpal_kernel), "--bug", "same_pkey",
                      "--run-dir", str(first), env={"TESTBED_PROGRESS": "0"})
    assert res.returncode == 1, res.stdout + res.stderr
    m = re.search(r"^\s+reproduce: sh (\S+/reproduce\.sh)$", res.stdout, re.M)
    assert m, res.stdout
    report = json.loads((first / "report.json").read_text())
    validate_run(first, report)
    assert report["scenarios"][0]["reproduce"] == m.group(1)
    assert "keys" in report["scenarios"][0]["failed_checks"]
    for name in ("report.xml", "report.html"):
        assert (first / name).exists(), name

    again = tmp_path / "again"
    rep = subprocess.run(["sh", m.group(1), "--run-dir", str(again)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "TESTBED_PROGRESS": "0",
                                                      "TESTBED": f"{sys.executable} -m testbed"})
    assert rep.returncode == 1, rep.stdout + rep.stderr
    report2 = json.loads((again / "report.json").read_text())
    assert report2["scenarios"][0]["bugs"] == ["same_pkey"]
    assert report2["scenarios"][0]["failed_checks"] == report["scenarios"][0]["failed_checks"]


@pytest.mark.vm
def test_passing_run_exits_zero_without_reproducer_line(rpal_kernel: Path, runs_dir: Path,
                                                        tmp_path: Path) -> None:
    res = run_testbed("run", "same_pkey", "--kernel", str(rpal_kernel), "--run-dir",
                      str(tmp_path / "ok"), env={"TESTBED_PROGRESS": "0"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reproduce:" not in res.stdout
    assert re.search(r"^PASS \d+ scenarios? \(0 failed\)", res.stdout, re.M), res.stdout
    validate_run(tmp_path / "ok", json.loads((tmp_path / "ok" / "report.json").read_text()))
