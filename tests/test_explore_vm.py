"""testbed explore on a guest with the reference kernel: passes clean, catches, replays.

The kernel is $TESTBED_KERNEL or the cached rpal-ref build (built when not cached).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_testbed

pytestmark = pytest.mark.vm


def _kernel_args() -> list[str]:
    import os

    k = os.environ.get("TESTBED_KERNEL")
    return ["--kernel", k] if k else []


def test_correct_kernel_passes_a_short_exploration(tmp_path: Path) -> None:
    r = run_testbed("explore", *_kernel_args(), "--time", "20", "--seed", "3",
                    "--run-dir", str(tmp_path / "run"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((tmp_path / "run" / "explore.json").read_text())
    assert doc["passed"] and doc["steps"] > 20
    assert doc["judged"].get("slot_copies", 0) > 0 and doc["judged"].get("pkru", 0) > 0


@pytest.mark.slow
def test_same_pkey_is_caught_shrunk_and_replayed(tmp_path: Path) -> None:
    run = tmp_path / "bug"
    r = run_testbed("explore", *_kernel_args(), "--bug", "same_pkey", "--time", "120",
                    "--run-dir", str(run), timeout=1200)
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads((run / "explore.json").read_text())
    assert doc["failure"]["check"] == "keys", doc["failure"]
    assert doc["failure"]["steps"] <= 12
    failure = run / "failure-1.json"
    again = run_testbed("explore", *_kernel_args(), "--bug", "same_pkey", "--replay",
                        str(failure), "--run-dir", str(tmp_path / "again"), timeout=600)
    assert again.returncode == 1, again.stdout + again.stderr
    d2 = json.loads((tmp_path / "again" / "explore.json").read_text())
    assert d2["failure"]["check"] == "keys"
    clean = run_testbed("explore", *_kernel_args(), "--replay", str(failure),
                        "--run-dir", str(tmp_path / "clean"), timeout=600)
    assert clean.returncode == 0, clean.stdout + clean.stderr
