"""The pytest plugin without a VM: bug names checked at collection, fixture docstrings,
TESTBED_RUNS and one folder per pytest-xdist worker, guest_options, --testbed-kernel, and the
failure report naming the guest's folder and console tail (with a stand-in guest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.boot.hostcaps import Accel
from testbed.pytest_plugin import guest_config
from testbed.runner import GuestSpec


def _pytest(folder: Path, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=folder, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})})


def test_a_misspelt_bug_name_is_a_collection_error(tmp_path: Path) -> None:
    (tmp_path / "test_bug.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.rpal_bug('wrong_slot_copyy')\n"
        "def test_x():\n    pass\n\n"
        "def test_y():\n    pass\n")
    res = _pytest(tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out  # interrupted: errors during collection
    assert "error during collection" in out or "errors during collection" in out, out
    assert "unknown bug 'wrong_slot_copyy' (did you mean 'wrong_slot_copy'?)" in out, out
    assert " passed" not in out
    (tmp_path / "test_bug.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.rpal_bug('wrong_slot_copy')\n"
        "def test_x():\n    pass\n")
    ok = _pytest(tmp_path)
    assert ok.returncode == 0 and "1 passed" in ok.stdout, ok.stdout + ok.stderr


def test_unknown_guest_option_is_a_collection_error(tmp_path: Path) -> None:
    (tmp_path / "test_opt.py").write_text(
        "import pytest\n\n@pytest.mark.guest_options(smpp=4)\ndef test_x():\n    pass\n")
    res = _pytest(tmp_path)
    assert res.returncode == 2 and "guest_options: unknown option smpp" in res.stdout


def test_fixtures_have_docstrings(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text("def test_a():\n    pass\n")
    res = _pytest(tmp_path, "--fixtures")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for name in ("rpal_kernel", "guest_spec", "testbed_runs", "guest", "snapshot",
                 "checkpoint_snapshots", "scenario_result"):
        head = next((ln for ln in text.splitlines() if ln.startswith(name + " ")), None)
        assert head is not None, f"{name} not listed"
        after = text.split(head, 1)[1].splitlines()[1]
        assert after.strip() and "no docstring" not in after, (name, after)


def test_guest_options_and_bugs_shape_the_machine() -> None:
    spec = GuestSpec(kernel=Path("/k"), initrd=Path("/i"), accel=Accel("tcg", "max", "t"))

    def node(bugs: tuple[str, ...] = (), **opts: object) -> SimpleNamespace:
        marks = {"rpal_bug": SimpleNamespace(args=bugs) if bugs else None,
                 "guest_options": SimpleNamespace(kwargs=opts) if opts else None}
        return SimpleNamespace(get_closest_marker=marks.get)

    cfg = guest_config(node(("same_pkey",), smp=4, mem=768, paging=4, pti="on",
                            append="quiet"), spec)
    assert (cfg.smp, cfg.mem_mib, cfg.paging, cfg.pti) == (4, 768, 4, "on")
    assert cfg.append == "rpal.bug=same_pkey quiet"  # the bug switch first
    plain = guest_config(node(), spec)
    assert (plain.smp, plain.paging, plain.append) == (2, 5, "")
    with pytest.raises(pytest.UsageError, match="unknown bug"):
        guest_config(node(("nope",)), spec)


def test_runs_honour_testbed_runs_one_folder_per_xdist_worker(tmp_path: Path) -> None:
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_w.py").write_text(
        "import os, pytest\n\n"
        "@pytest.mark.parametrize('i', range(6))\n"
        "def test_w(testbed_runs, i):\n"
        "    (testbed_runs / f'{i}.txt').write_text(os.environ.get('PYTEST_XDIST_WORKER', ''))\n")
    runs = tmp_path / "runs"
    res = _pytest(tests, "-n", "2", env={"TESTBED_RUNS": str(runs)})
    assert res.returncode == 0, res.stdout + res.stderr
    marks = sorted(runs.glob("pytest-*/*/*.txt"))
    assert len(marks) == 6
    workers = {p.parent.parent.name: p.read_text() for p in marks}
    assert set(workers) == {"pytest-gw0", "pytest-gw1"}, workers  # apart, per worker
    assert all(k == f"pytest-{v}" for k, v in workers.items())


def test_testbed_kernel_option_wins(tmp_path: Path) -> None:
    (tmp_path / "test_k.py").write_text(
        "def test_k(rpal_kernel):\n    assert str(rpal_kernel) == '/opt/k/bzImage'\n")
    res = _pytest(tmp_path, "--testbed-kernel", "/opt/k/bzImage",
                  env={"TESTBED_KERNEL": "/other/bzImage"})
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_failure_names_the_guest_folder_and_console_tail(tmp_path: Path) -> None:
    (tmp_path / "test_f.py").write_text(
        "import pytest\nfrom types import SimpleNamespace\n\n"
        "@pytest.fixture\n"
        "def guest(tmp_path):\n"
        "    (tmp_path / 'console.log').write_text('boot\\n' + 'x\\n' * 50 + 'LAST LINE\\n')\n"
        "    return SimpleNamespace(run_dir=tmp_path, console_log=tmp_path / 'console.log')\n\n"
        "def test_f(guest):\n    assert False\n")
    res = _pytest(tmp_path)
    assert res.returncode == 1
    assert "testbed guest" in res.stdout and "guest folder: " in res.stdout, res.stdout
    assert "console tail:" in res.stdout and "LAST LINE" in res.stdout
    assert "boot" not in res.stdout.split("console tail:")[1]  # only the tail
