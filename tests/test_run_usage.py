"""`testbed run`/`matrix` options checked before anything boots; bugs in effect; modes."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from testbed.boot.hostcaps import Accel
from testbed.designs import get_design
from testbed.errors import UsageError
from testbed.runner import (
    DEFAULT_MODES,
    GuestSpec,
    check_append,
    expand_modes,
    kernel_append,
    parse_bug_param,
    parse_modes,
    write_reproducer,
)

from conftest import run_testbed

SCENARIOS = get_design("rpal").scenarios

SPEC = GuestSpec(kernel=Path("/k/bzImage"), initrd=Path("/i.cpio"),
                 accel=Accel("tcg", "max", "test"), paging=4, pti="on", append="quiet")


@pytest.mark.parametrize("args", [
    ["matrix", "--repeat", "0"],
    ["matrix", "--repeat", "-3"],
    ["run", "--append", 'x="'],
    ["run", "--append", "a\nb"],
    ["run", "--modes", "l7"],
    ["run", "--modes", ""],
    ["run", "--modes", "l5", "--paging", "4"],
    ["run", "--parallel", "0"],
    ["run", "stale_tlb", "--record"],  # needs two CPUs: QEMU records one
    ["run", "explore", "--record"],
    ["run", "phases", "--record", "--accel", "kvm"],
])
def test_usage_errors_exit_2_before_anything_boots(args: list[str], runs_dir: Path) -> None:
    res = run_testbed(*args, "--kernel", "/nonexistent/bzImage", timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.startswith("testbed: error: --"), res.stderr
    assert "Traceback" not in res.stderr
    assert not any(runs_dir.iterdir())  # nothing was started


def test_balanced_quotes_and_plain_text_are_accepted() -> None:
    assert check_append('dyndbg="file mm/* +p" quiet') == 'dyndbg="file mm/* +p" quiet'
    assert check_append("") == ""
    with pytest.raises(UsageError, match="unbalanced"):
        check_append('a="b" c="')


def test_the_bug_switch_comes_before_what_the_user_appends() -> None:
    rpal = get_design("rpal")
    append = kernel_append(replace(SPEC, append='x="y"'), ("skip_peer_flush",), rpal)
    assert append.startswith("rpal.bug=skip_peer_flush ")
    assert kernel_append(replace(SPEC, append=""), (), rpal) == ""


@pytest.mark.parametrize(("text", "bugs"), [
    ("none\n", ()), ("skip_peer_flush\n", ("skip_peer_flush",)),
    ("same_pkey,pkru_open\n", ("pkru_open", "same_pkey")), ("", ()),
])
def test_bug_parameter_parse(text: str, bugs: tuple[str, ...]) -> None:
    assert parse_bug_param(text) == bugs


def test_default_modes_are_five_level_and_four_level_with_pti() -> None:
    modes = parse_modes(",".join(DEFAULT_MODES))
    assert [(m.paging, m.pti) for m in modes] == [(5, "off"), (4, "on")]
    runs = expand_modes([SCENARIOS["pair"], SCENARIOS["protection_keys"]], modes)
    # every snapshot scenario in both modes, the selftest once
    assert [(sc.name, m.name) for sc, m in runs] == [
        ("pair", "l5"), ("pair", "l4pti"), ("protection_keys", "l5")]


def test_a_newline_in_an_argument_cannot_end_a_reproducer_comment(tmp_path: Path) -> None:
    evil = "quiet\ntouch " + str(tmp_path / "pwned") + "\n"
    path = write_reproducer(tmp_path, SCENARIOS["pair"], replace(SPEC, append=evil), ())
    lines = path.read_text().splitlines()
    first_exec = next(i for i, ln in enumerate(lines) if ln.startswith("exec "))
    from testbed.reproduce import PRELUDE

    # comments, then the fixed prelude (nothing of the run in it)
    assert lines[first_exec - len(PRELUDE):first_exec] == list(PRELUDE)
    assert all(ln.startswith("#") for ln in lines[1:first_exec - len(PRELUDE)]), lines
    subprocess.run(["sh", "-n", str(path)], check=True)
    # what comes before the exec is only comments: running it as shell does nothing
    subprocess.run(["sh", "-c", "\n".join(lines[:first_exec])], check=True)
    assert not (tmp_path / "pwned").exists()


def test_exit_status_tells_a_failed_check_from_a_run_that_could_not_judge() -> None:
    from testbed.check.model import Finding, ScenarioResult, Status
    from testbed.run_commands import run_status

    ok = ScenarioResult("a", [Finding("keys", Status.PASS, "ok", "a"),
                              Finding("pkru", Status.SKIP, "not exercised", "a")])
    bad = ScenarioResult("b", [Finding("keys", Status.FAIL, "untagged", "b")])
    err = ScenarioResult("c", [Finding("keys", Status.ERROR, "no mappings", "c")])
    broken = ScenarioResult("d", [], error="guest kernel panic")
    assert run_status([ok]) == 0
    assert run_status([ok, bad, err]) == 1  # a failed check wins
    assert run_status([ok, err]) == 125
    assert run_status([broken]) == 125


def test_reproducer_is_portable(tmp_path: Path) -> None:
    """reproduce.sh names a cached kernel by key and series, no path of this machine; copied
    elsewhere it runs the same command (a fake $TESTBED prints it)."""
    import shutil
    import subprocess

    key = "0123456789abcdef01234567"
    kdir = tmp_path / "cache" / "kernels" / key
    kdir.mkdir(parents=True)
    (kdir / "bzImage").write_bytes(b"x")
    (kdir / "meta.json").write_text(json.dumps({"key": key, "series": {"name": "rpal-ref"}}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = replace(SPEC, kernel=kdir / "bzImage")
    path = write_reproducer(run_dir, SCENARIOS["pair"], spec, ("wrong_slot_copy",))
    text = path.read_text()
    assert str(tmp_path) not in text and "/k/" not in text
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    shutil.copy(path, moved / "reproduce.sh")
    env = {"TESTBED": "echo", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["sh", str(moved / "reproduce.sh"), "--run-dir", "x"], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == ["run", "pair", "--kernel"]
    assert out[3:6] == [key, "--kernel-series", "rpal-ref"]
    assert "--bug wrong_slot_copy" in " ".join(out) and out[-2:] == ["--run-dir", "x"]
    # without $TESTBED: testbed on PATH, else python3 -m testbed
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text('#!/bin/sh\necho python3 "$@"\n')
    (fake / "python3").chmod(0o755)
    out = subprocess.run(["sh", str(moved / "reproduce.sh")], env={"PATH": f"{fake}:/bin"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:4] == ["python3", "-m", "testbed", "run"]


def test_a_kernel_from_elsewhere_stays_its_path() -> None:
    from testbed.reproduce import kernel_args

    assert kernel_args(Path("/k/bzImage")) == ["--kernel", "/k/bzImage"]


def test_a_key_the_cache_lacks_is_built_from_its_series(monkeypatch, tmp_path: Path) -> None:
    from testbed.build import kernel as kmod
    from testbed.reproduce import resolve_kernel_spec

    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    built = []

    class KB:
        key = "ffff0000ffff0000ffff0000"
        bzimage = tmp_path / "bzImage"

    monkeypatch.setattr(kmod, "build_kernel", lambda series: built.append(series) or KB())
    got = resolve_kernel_spec(Path("0123456789abcdef01234567"), "rpal-ref")
    assert got == KB.bzimage and built == ["rpal-ref"]
    # without a series: the cache's answer as before (no build)
    from testbed.errors import BuildError

    with pytest.raises(BuildError, match="no cached kernel build"):
        resolve_kernel_spec(Path("0123456789abcdef01234567"), None)
    assert built == ["rpal-ref"]
