"""One-line errors of commands that fail before any guest boots (no VM, not marked `vm`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_exec_vm import assert_one_line_error, only_run_dir

from testbed.boot.kernelimage import default_kernel

from conftest import run_testbed


@pytest.mark.parametrize(
    "kernel, words",
    [("/nonexistent/bzImage", "does not exist"), ("/etc/passwd", "not a bzImage")],
)
def test_bad_kernel_paths(runs_dir: Path, kernel: str, words: str):
    res = run_testbed("exec", "--kernel", kernel, "--", "true")
    assert_one_line_error(res, kernel, words)
    run_dir = only_run_dir(runs_dir)
    assert words in (run_dir / "error.txt").read_text()


def test_inspect_errors_are_one_line(tmp_path: Path):
    res = run_testbed("inspect", "--run", str(tmp_path))
    assert res.returncode == 125 and "not a run folder" in res.stderr
    assert "Traceback" not in res.stderr
    bad = tmp_path / "dump.elf"
    bad.write_bytes(b"not an ELF file at all" * 10)
    res = run_testbed("inspect", "--dump", str(bad), "--vmlinux", str(default_kernel()))
    assert res.returncode == 125 and "Traceback" not in res.stderr, res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("testbed: error:")]) == 1
