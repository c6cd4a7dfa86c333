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


# ----------------------------------------------------------------------------- skips in CI
# With TESTBED_FAIL_ON_SKIP=1 (.ci/run sets it) a skipped test fails the session unless
# its reason matches a line of tests/allowed-skips.txt: a green CI must not hide a test
# that silently stopped running (say, because a pinned file name went stale).
ALLOWED_SKIPS = Path(__file__).with_name("allowed-skips.txt")
_skips: list[tuple[str, str]] = []


def _allowed_skip_patterns() -> list[str]:
    import re

    out = []
    for line in ALLOWED_SKIPS.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            re.compile(line)
            out.append(line)
    return out


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(
            report.longrepr)
        _skips.append((report.nodeid, str(reason)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import re

    if os.environ.get("TESTBED_FAIL_ON_SKIP") != "1" or not _skips:
        return
    patterns = _allowed_skip_patterns()
    bad = [(n, r) for n, r in _skips if not any(re.search(p, r) for p in patterns)]
    if bad:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.ensure_newline()
            tr.write_sep("=", f"{len(bad)} skip(s) not in tests/allowed-skips.txt", red=True)
        for n, r in bad:
            line = f"SKIP NOT ALLOWED: {n}: {r}"
            if tr is not None:
                tr.write_line(line, red=True)
            else:
                print(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
