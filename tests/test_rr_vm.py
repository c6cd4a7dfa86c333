"""Record and replay on the reference kernel (issue 13's "must show"): `testbed run phases
--bug keep_copy_on_release --record`, then `testbed replay` of its folder reaches the same
failing checkpoint with the same snapshot bytes at every checkpoint; `--gdb` stops there
with the vmlinux loaded, and gdb's tb-walk prints the walk of the stale copy's address."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_testbed

ENV = {"TESTBED_PROGRESS": "0"}


@pytest.fixture(scope="module")
def recorded(rpal_kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recorded failing scenario's folder (one recording for both tests)."""
    parent = tmp_path_factory.mktemp("rr") / "run"
    res = run_testbed("run", "phases", "--bug", "keep_copy_on_release", "--record", "--modes",
                      "l5", "--kernel", str(rpal_kernel), "--run-dir", str(parent), env=ENV)
    assert res.returncode == 1, res.stdout + res.stderr
    (sc,) = json.loads((parent / "report.json").read_text())["scenarios"]
    assert "slot_copies" in sc["failed_checks"]
    return Path(sc["run_dir"])


def replay_folders(folder: Path) -> set[Path]:
    return {d for d in folder.iterdir() if d.is_dir() and "replay" in d.name}


@pytest.mark.vm
def test_replay_gives_the_same_snapshot_bytes_to_the_failing_checkpoint(recorded: Path) -> None:
    rec = json.loads((recorded / "rr.json").read_text())
    findings = json.loads((recorded / "findings.json").read_text())
    first_fail = next(f["checkpoint"] for f in findings
                      if f["status"] == "fail" and f["source"] == "host")
    assert rec["failing"] == f"snapshots/{first_fail}.json"
    before = replay_folders(recorded)
    res = run_testbed("replay", str(recorded), env=ENV)
    assert res.returncode == 0, res.stdout + res.stderr
    (replay_dir,) = replay_folders(recorded) - before
    doc = json.loads((replay_dir / "replay.json").read_text())
    names = [c["name"] for c in doc["checkpoints"]]
    recorded_names = [c["file"] for c in rec["checkpoints"]]
    # every checkpoint up to the failing one, and none after it
    assert names == recorded_names[:recorded_names.index(rec["failing"]) + 1]
    assert len(names) >= 2 and names[-1] == rec["failing"]
    for name in names:  # the bytes themselves, not only the hashes replay.json states
        a, b = (recorded / name).read_bytes(), (replay_dir / name).read_bytes()
        assert a == b, name
        assert json.loads(b)["trigger"]["name"] == Path(name).stem
    assert doc["identical"] and all(c["identical"] for c in doc["checkpoints"])
    assert "identical:" in res.stdout


@pytest.mark.vm
@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_replay_gdb_stops_at_the_failure_and_walks_the_stale_copy(recorded: Path) -> None:
    rec = json.loads((recorded / "rr.json").read_text())
    findings = json.loads((recorded / "findings.json").read_text())
    stale = next(f for f in findings if f["check"] == "slot_copies" and f["status"] == "fail"
                 and f"snapshots/{f['checkpoint']}.json" == rec["failing"])
    pid, slot = stale["evidence"]["pid"], stale["evidence"]["slot"]
    snap = json.loads((recorded / rec["failing"]).read_text())
    task = next(t for t in snap["tasks"] if t["pid"] == pid)
    # an address of the peer's slot that the stale copy still maps in this task
    addr = next(m["start"] for m in task["mappings"]
                if int(m["start"], 16) >> 39 == slot and m["kind"] == "leaf")
    facts = snap["trigger"]["facts"]
    peer = next(r for r in ("A", "B") if facts.get(f"{r}.pid") != str(pid))
    peer_pkey = facts[f"{peer}.pkey"]

    proc = subprocess.Popen([sys.executable, "-m", "testbed", "replay", "--gdb", str(recorded)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV})
    try:
        assert proc.stdout is not None
        line, seen = "", []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if line.startswith("stopped at") or not line:
                break
        assert line.startswith(f"stopped at {rec['failing']}; gdb: "), "".join(seen)
        cmd = line.split("gdb: ", 1)[1].strip()
        out = subprocess.run(
            ["sh", "-c", cmd + f" -batch -ex 'p linux_banner' -ex 'tb-walk {addr} {pid}'"],
            capture_output=True, text=True, timeout=120)
        text = out.stdout + out.stderr
        assert "Linux version" in out.stdout, text  # the vmlinux is loaded
        assert f"walk of VA {addr} from pid {pid}" in out.stdout, text
        copy = next(ln for ln in out.stdout.splitlines() if f"[slot {slot}," in ln)
        assert "copy mark (sw9)" in copy, text
        assert f"pkey {peer_pkey}," in out.stdout, text  # the peer's page, its pkey
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
