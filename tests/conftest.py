"""Shared fixtures; tests marked `slow` run only with TESTBED_SLOW=1 (CI sets it when they fit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("TESTBED_SLOW") == "1":
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("slow") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private parent for run folders, so a test sees only its own runs."""
    d = tmp_path / "runs"
    d.mkdir()
    monkeypatch.setenv("TESTBED_RUNS", str(d))
    return d


def run_testbed(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "testbed", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def qemu_processes_for(marker: str) -> list[str]:
    """Command lines of live QEMU processes whose arguments mention `marker`."""
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if marker in ln]
