"""The kernel's protection_keys selftest: build, output parsing, and runs in real guests.

Parser tests read output recorded from real guests (tests/data/selftests/, see
its README) and synthetic TAP/KTAP. The guest tests run `testbed selftest` on
Debian's kernel and on the rpal-ref reference kernel (skipped, with the reason,
when that kernel is not in the build cache: the fixture of test_rpal_ref.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from testbed.build import selftests as build
from testbed.check.model import ScenarioResult
from testbed.check.selftests import (
    counts,
    detect_format,
    exit_status,
    parse_selftest_output,
    summary_lines,
)
from testbed.errors import BuildError

from conftest import run_testbed

DATA = Path(__file__).parent / "data" / "selftests"
PASS_LOG = (DATA / "protection_keys-6.1-debian-pass.log").read_text()
NAMES = (
    "test_read_of_write_disabled_region", "test_read_of_access_disabled_region",
    "test_read_of_access_disabled_region_with_page_already_mapped",
    "test_write_of_write_disabled_region",
    "test_write_of_write_disabled_region_with_page_already_mapped",
    "test_write_of_access_disabled_region",
    "test_write_of_access_disabled_region_with_page_already_mapped",
    "test_kernel_write_of_access_disabled_region", "test_kernel_write_of_write_disabled_region",
    "test_kernel_gup_of_access_disabled_region", "test_kernel_gup_write_to_write_disabled_region",
    "test_executing_on_unreadable_memory", "test_implicit_mprotect_exec_only_memory",
    "test_mprotect_with_pkey_0", "test_ptrace_of_child", "test_pkey_init_state",
    "test_pkey_syscalls_on_non_allocated_pkey", "test_pkey_syscalls_bad_args",
    "test_pkey_alloc_exhaust", "test_pkey_alloc_free_attach_pkey0", "test_ptrace_modifies_pkru",
)


def pk(text: str, **kw):
    return parse_selftest_output(text, names=NAMES, iterations=22, **kw)


def by_subject(findings):
    return {f.subject: f for f in findings}


def bad(findings):
    return [f for f in findings if f.bad]


def cut_after(text: str, line: str) -> str:
    """The output up to and including `line` (as if the suite died right after it)."""
    i = text.index(line + "\n") + len(line) + 1
    return text[:i]


# --------------------------------------------------------------------------- protection_keys format


def test_recorded_pass_gives_one_passing_finding_per_case():
    fs = pk(PASS_LOG, status=0)
    assert detect_format(PASS_LOG) == "protection_keys"
    assert [f.subject for f in fs] == list(NAMES)
    assert all(f.passed and not f.error for f in fs)
    assert {f.check for f in fs} == {"selftest:protection_keys"}
    assert all(f.evidence["iterations_passed"] == 22 for f in fs)
    assert exit_status(ScenarioResult("s", fs)) == 0


def test_without_names_cases_are_numbered():
    fs = parse_selftest_output(PASS_LOG)
    assert [f.subject for f in fs] == [f"test {i}" for i in range(21)]
    assert not bad(fs)


def test_recorded_timeout_is_an_error_at_the_running_case():
    text = (DATA / "protection_keys-6.1-debian-timeout.log").read_text()
    fs = pk(text, status=None, interrupted="guest command did not finish within 6 s")
    errs = bad(fs)
    assert len(errs) == 1 and errs[0].error, summary_lines(fs)
    last = re.findall(r"^test\s+(\d+) PASSED \(iteration (\d+)\)", text, re.M)[-1]
    assert errs[0].evidence["test_nr"] == (int(last[0]) + 1) % 21
    assert "6 s" in errs[0].message
    assert exit_status(ScenarioResult("s", fs)) == 1


def test_recorded_exit_in_setup_is_an_error_quoting_the_output():
    text = (DATA / "protection_keys-6.1-rpalref-nohugetlbfs.log").read_text()
    fs = pk(text, status=71)
    first, *rest = bad(fs)
    assert first.subject == NAMES[0] and first.error
    assert "exit status 71" in first.message and "No such file or directory" in first.message
    assert len(rest) == 20 and all("never ran" in f.message for f in rest)


def test_crash_mid_run_is_an_error_not_a_pass():
    text = cut_after(PASS_LOG, "test  7 PASSED (iteration 3)")
    fs = pk(text, status=128 + 11)
    errs = by_subject(bad(fs))
    assert list(errs) == ["test_kernel_write_of_write_disabled_region"]
    f = errs["test_kernel_write_of_write_disabled_region"]
    assert f.error and f.evidence["iteration"] == 3 and "signal 11" in f.message
    assert by_subject(fs)["test_read_of_write_disabled_region"].evidence["iterations_passed"] == 3


def test_output_that_stops_in_the_first_iteration_leaves_cases_that_never_ran():
    text = cut_after(PASS_LOG, "test  3 PASSED (iteration 1)")
    fs = pk(text, status=0)  # status 0: the fork that carried on died unseen
    errs = bad(fs)
    assert errs[0].subject == "test_write_of_write_disabled_region_with_page_already_mapped"
    assert "done (all tests OK)" in errs[0].message
    assert all("never ran" in f.message for f in errs[1:]) and len(errs) == 21 - 4


def test_assert_failure_names_case_file_line_and_errno():
    text = cut_after(PASS_LOG, "test  4 PASSED (iteration 3)") + (
        "assert() at protection_keys.c::1043 test_nr: 5 iteration: 3\n"
        "errno at assert: 14running abort_hooks()...\n"
    )
    fs = pk(text, status=1043)
    [f] = bad(fs)[:1]
    assert f.subject == "test_write_of_access_disabled_region"
    assert not f.passed and not f.error
    assert (f.evidence["file"], f.evidence["line"], f.evidence["errno"]) == (
        "protection_keys.c", 1043, 14)
    assert "assert() at" in f.evidence["output_tail"]
    # the cases after it never ran in any iteration: nothing passes silently
    assert all(f.passed for f in fs[:5])


def test_done_with_a_bad_exit_status_is_an_error():
    fs = pk(PASS_LOG, status=1)
    assert [f.subject for f in bad(fs)] == ["(suite)"]


def test_done_but_fewer_iterations_than_the_source_says():
    text = PASS_LOG.replace("test  2 PASSED (iteration 9)\n", "")
    [f] = bad(pk(text, status=0))
    assert f.subject == NAMES[2] and "21 of 22" in f.message


def test_recorded_no_pkeys_is_a_skip():
    text = (DATA / "protection_keys-6.1-debian-nopku.log").read_text()
    fs = pk(text, status=0)
    assert len(fs) == 1 and fs[0].status == "skip" and not fs[0].bad
    assert summary_lines(fs)[0].startswith("SKIP")
    assert exit_status(ScenarioResult("s", fs)) == 4


@pytest.mark.parametrize("text", ["", "Segmentation fault\n"])
def test_output_without_results_is_an_error(text: str):
    [f] = parse_selftest_output(text, status=139)
    assert f.error and "no test results" in f.message and "signal 11" in f.message


# --------------------------------------------------------------------------- TAP / KTAP

TAP_MIXED = """\
TAP version 13
1..5
# a comment
ok 1 - first
not ok 2 - second
ok 3 - third # SKIP no hardware
not ok 4 - fourth # TODO known broken
ok 5
# Totals: pass:2 fail:1 xfail:1 xpass:0 skip:1 error:0
"""


def test_tap_pass_fail_skip_todo():
    fs = parse_selftest_output(TAP_MIXED, suite="demo", status=1)
    assert detect_format(TAP_MIXED) == "tap"
    s = by_subject(fs)
    assert list(s) == ["first", "second", "third", "fourth", "test 5"]
    assert s["first"].passed and not s["second"].passed and not s["second"].error
    assert s["third"].status == "skip" and not s["third"].passed
    assert s["third"].message == "SKIP no hardware"
    assert s["fourth"].passed and "TODO" in s["fourth"].message
    assert {f.check for f in fs} == {"selftest:demo"}
    assert counts(fs) == {"pass": 3, "fail": 1, "error": 0, "skip": 1}
    assert {f.source for f in fs} == {"guest"}


def test_tap_only_skips_exit_4():
    fs = parse_selftest_output("1..2\nok 1 a\nok 2 b # SKIP nope\n", status=4)
    # kselftest exits 4 (KSFT_SKIP) for a skip; still nothing failed
    assert [f.subject for f in bad(fs)] == ["(suite)"]
    fs = parse_selftest_output("1..2\nok 1 a\nok 2 b # SKIP nope\n", status=0)
    assert exit_status(ScenarioResult("s", fs)) == 4


def test_tap_fewer_results_than_planned_is_an_error():
    fs = parse_selftest_output("TAP version 13\n1..3\nok 1 a\nok 2 b\n", status=139)
    [f] = bad(fs)
    assert f.error and f.subject == "(suite)" and "planned 3" in f.message
    assert f.evidence["reported"] == 2


def test_tap_bail_out_is_an_error():
    fs = parse_selftest_output("1..2\nok 1 a\nBail out! no /dev/foo\n", status=1)
    assert [f.message for f in bad(fs)] == ["Bail out! no /dev/foo"]


def test_tap_all_ok_but_bad_status_is_an_error():
    fs = parse_selftest_output("1..1\nok 1 a\n", status=1)
    assert [f.subject for f in bad(fs)] == ["(suite)"]


def test_tap_whole_suite_skipped():
    fs = parse_selftest_output("TAP version 13\n1..0 # SKIP needs root\n", status=0)
    assert len(fs) == 1 and fs[0].status == "skip" and not fs[0].bad


KTAP_NESTED = """\
KTAP version 1
1..2
    KTAP version 1
    # Subtest: pkeys
    1..3
    ok 1 alloc
    not ok 2 free
    ok 3 mprotect # SKIP no pku
not ok 1 pkeys
    KTAP version 1
    # Subtest: other
    1..1
    ok 1 one
ok 2 other
"""


def test_ktap_nested_subtests_are_named_by_parent():
    fs = parse_selftest_output(KTAP_NESTED, status=1)
    s = by_subject(fs)
    assert list(s) == ["pkeys/alloc", "pkeys/free", "pkeys/mprotect", "other/one"]
    assert not s["pkeys/free"].passed and s["pkeys/free"].evidence["depth"] == 1
    assert s["pkeys/mprotect"].status == "skip"


def test_ktap_failing_parent_without_failing_child_is_reported():
    text = "KTAP version 1\n1..1\n    1..1\n    ok 1 a\nnot ok 1 group\n"
    s = by_subject(parse_selftest_output(text, status=1))
    assert s["group/a"].passed and not s["group"].passed


def test_ktap_subtests_without_parent_result_mean_a_crash():
    text = "KTAP version 1\n1..1\n    1..2\n    ok 1 a\n"
    fs = parse_selftest_output(text, status=None)
    assert [f.subject for f in bad(fs)] == ["(suite)"]


def test_kselftest_runner_prefixed_child_output_is_not_double_counted():
    text = ("TAP version 13\n1..1\n# selftests: vm: protection_keys\n# has pkeys: 1\n"
            "# ok 1 inner\nok 1 selftests: vm: protection_keys\n")
    assert [f.subject for f in parse_selftest_output(text, status=0)] == [
        "selftests: vm: protection_keys"]


def test_duplicate_names_stay_distinct_subjects():
    fs = parse_selftest_output("1..2\nok 1 x\nnot ok 2 x\n", status=1)
    assert [f.subject for f in fs] == ["x", "x #2"]


# --------------------------------------------------------------------------- building


def test_names_from_source_follow_x86_conditions():
    src = """
void (*pkey_tests[])(int *ptr, u16 pkey) = {
	test_a,
	test_b, /* comment */
#if defined(__i386__) || defined(__x86_64__)
	test_x86,
#else
	test_other,
#endif
#if defined(__powerpc64__)
	test_ppc,
#endif
};
int main(void) { int nr_iterations = 22; }
"""
    assert build.test_names(src) == ("test_a", "test_b", "test_x86")
    assert build.iteration_count(src) == 22


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("TESTBED_CACHE", str(d))
    return d


def fake_tree(root: Path, main: str) -> Path:
    d = root / "tools/testing/selftests/vm"
    d.mkdir(parents=True)
    (d / "protection_keys.c").write_text(main)
    (d / "pkey-helpers.h").write_text("/* helpers */\n")
    (root / "tools/testing/selftests/kselftest.h").write_text("/* kselftest */\n")
    return root


def test_tree_source_builds_static_and_caches(tmp_path: Path, cache: Path):
    main = ('#include <stdio.h>\n#include "pkey-helpers.h"\n#include "../kselftest.h"\n'
            "void (*pkey_tests[])(int *ptr, unsigned short pkey) = {\n\tt_one,\n};\n"
            'int main(void) { int nr_iterations = 3; printf("done (all tests OK)\\n"); }\n'
            "void t_one(int *p, unsigned short k) {}\n")
    main = main.replace("void (*pkey_tests", "void t_one(int *p, unsigned short k);\n"
                        "void (*pkey_tests")
    tree = fake_tree(tmp_path / "linux", main)
    st = build.build_selftest("protection_keys", tree)
    assert st.binary.is_file() and st.binary.parent.parent == cache / "selftests"
    assert st.tests == ("t_one",) and st.iterations == 3
    assert "statically linked" in subprocess.run(["file", st.binary], capture_output=True,
                                                 text=True).stdout
    assert subprocess.run([st.binary], capture_output=True, text=True).stdout == (
        "done (all tests OK)\n")
    again = build.build_selftest("protection_keys", tree)
    assert again.key == st.key
    (tree / "tools/testing/selftests/vm/pkey-helpers.h").write_text("/* changed */\n")
    assert build.build_selftest("protection_keys", tree).key != st.key


def test_compile_error_is_one_line(tmp_path: Path, cache: Path):
    tree = fake_tree(tmp_path / "linux", "int main(void) { return nope; }\n")
    with pytest.raises(BuildError) as ei:
        build.build_selftest("protection_keys", tree)
    msg = ei.value.one_line()
    assert "does not compile" in msg and "nope" in msg and "\n" not in msg


def test_tarball_without_the_selftest_is_one_line(tmp_path: Path, cache: Path):
    (tmp_path / "linux-x").mkdir()
    (tmp_path / "linux-x" / "Makefile").write_text("# not much\n")
    tb = tmp_path / "linux-x.tar.gz"
    with tarfile.open(tb, "w:gz") as tf:
        tf.add(tmp_path / "linux-x", arcname="linux-x")
    with pytest.raises(BuildError, match="has no protection_keys.c"):
        build.build_selftest("protection_keys", tb)


def test_unknown_suite_is_one_line(cache: Path):
    with pytest.raises(BuildError, match="unknown selftest suite 'nope'"):
        build.build_selftest("nope")


@pytest.mark.skipif(not Path("/usr/src/linux-source-6.1.tar.xz").is_file(),
                    reason="Debian's linux-source-6.1 is not installed")
def test_build_from_debian_tarball():
    st = build.build_selftest()  # the real cache: ~12 s cold (unpacking the .xz), then instant
    assert st.tests == NAMES and st.iterations == 22
    assert "linux-source-6.1" in st.source
    head = st.binary.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # 64-bit
    assert "statically linked" in subprocess.run(["file", st.binary], capture_output=True,
                                                 text=True).stdout


# --------------------------------------------------------------------------- guests


def assert_all_passed(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert [ln.split()[1].rstrip(":") for ln in lines[:-1]] == list(NAMES), res.stdout
    assert all(ln.startswith("PASS ") and "passed 22 iteration(s)" in ln for ln in lines[:-1])
    assert re.match(r"selftest protection_keys: 21 passed, 0 failed, 0 errors, 0 skipped",
                    lines[-1])


def test_findings_go_into_the_shared_reports():
    from testbed.report.jsonreport import from_report_dict, report_dict
    from testbed.report.junit import render_junit

    text = cut_after(PASS_LOG, "test  7 PASSED (iteration 3)")
    res = ScenarioResult("selftest:protection_keys", pk(text, status=139))
    xml = render_junit([res])
    assert xml.count("<testcase ") == 21 and xml.count("<error") == 1
    assert "test_kernel_write_of_write_disabled_region" in xml
    _, [back] = from_report_dict(json.loads(json.dumps(report_dict([res]), default=str)))
    assert [f.subject for f in back.findings] == [f.subject for f in res.findings]


@pytest.mark.vm
def test_protection_keys_passes_on_debian_kernel(runs_dir: Path, tmp_path: Path):
    junit = tmp_path / "selftest.xml"
    assert_all_passed(run_testbed("selftest", "--suite", "protection_keys",
                                  "--junit", str(junit)))
    xml = junit.read_text()
    assert xml.count("<testcase ") == 21 and "<failure" not in xml and "<error" not in xml
    [run] = [d for d in runs_dir.iterdir() if d.is_dir()]
    assert "done (all tests OK)" in (run / "selftest-protection_keys.log").read_text()
    facts = json.loads((run / "selftest-protection_keys.json").read_text())
    assert facts["nr_hugepages"] == "10" and not facts["proc_rpal"]


@pytest.mark.vm
@pytest.mark.parametrize("paging", [
    pytest.param(["--paging", "5"], id="5-level"),
    pytest.param(["--paging", "4", "--pti", "on"], id="4-level-pti"),  # PGD copies, user PGD
])
def test_protection_keys_passes_on_rpal_reference_kernel(runs_dir: Path, paging: list[str],
                                                         rpal_kernel: Path):
    assert_all_passed(run_testbed("selftest", "--kernel", str(rpal_kernel), *paging))
    [run] = [d for d in runs_dir.iterdir() if d.is_dir()]
    facts = json.loads((run / "selftest-protection_keys.json").read_text())
    assert facts["proc_rpal"], "the guest kernel has no /proc/rpal: not the reference kernel"


def test_recorded_data_is_described():
    readme = (DATA / "README.md").read_text()
    for f in DATA.glob("*.log"):
        assert f.name in readme, f"{f.name} not described in {DATA / 'README.md'}"
    assert os.path.exists(DATA / "protection_keys-6.1-debian-pass.log")


@pytest.mark.vm
def test_protection_keys_through_testbed_exec_on_reference_kernel(
        runs_dir: Path, rpal_kernel: Path):
    """Issue 4's wording: the selftest run with plain `testbed exec --file` passes too."""
    st = build.build_selftest("protection_keys")
    res = run_testbed("exec", "--kernel", str(rpal_kernel), "--file",
                      f"{st.binary}:/usr/bin/protection_keys", "--timeout", "600", "--",
                      "sh", "-c", "echo 10 > /proc/sys/vm/nr_hugepages; "
                      "cd /tmp && protection_keys 2>&1 | cat")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "done (all tests OK)" in res.stdout
    findings = parse_selftest_output(res.stdout, suite="protection_keys", names=st.tests,
                                     iterations=st.iterations, status=res.returncode)
    assert findings and all(f.passed and not f.error for f in findings)


# --------------------------------------------------------------------------- run_selftest, no VM


class _FakeGuest:
    """Plays the guest of run_selftest: the set-up command, then the suite's output."""

    def __init__(self, run_dir: Path, output: str, *, status: int = 0, hugepages: str = "10",
                 raise_exc: Exception | None = None) -> None:
        from types import SimpleNamespace

        self.run_dir = run_dir
        self.output, self.status, self.hugepages, self.exc = output, status, hugepages, raise_exc
        self.cfg = SimpleNamespace(kernel=Path("/k/bzImage"), files={},
                                   accel=SimpleNamespace(accel="tcg"))

    def run(self, cmd: str, timeout: float | None = None, stdout=None, stderr=None,
            label: str = ""):
        from testbed.boot.ssh import CommandResult

        if stdout is None:  # the set-up
            return CommandResult(0, f"{self.hugepages} 6.1.0-rpal yes\n".encode(), b"", 0.0)
        stdout.write(self.output.encode())
        stdout.flush()
        if self.exc is not None:
            raise self.exc
        return CommandResult(self.status, b"", b"", 0.1)


def _selftest(tmp_path: Path):
    return build.Selftest("protection_keys", tmp_path / "bin", "k", "test", NAMES, 22)


def test_run_selftest_with_a_fake_guest(tmp_path: Path) -> None:
    import io
    import json

    from testbed.check.selftests import put_in_image, run_selftest

    g = _FakeGuest(tmp_path, PASS_LOG)
    put_in_image(g, _selftest(tmp_path))
    assert g.cfg.files == {"tb-selftest-protection_keys": tmp_path / "bin"}
    echo = io.BytesIO()
    r = run_selftest(g, _selftest(tmp_path), echo=echo)
    assert r.passed and echo.getvalue().decode() == PASS_LOG
    meta = json.loads((tmp_path / "selftest-protection_keys.json").read_text())
    assert meta["proc_rpal"] and meta["guest_release"] == "6.1.0-rpal"
    assert {f["source"] for f in meta["findings"]} == {"guest"}


def test_run_selftest_timeout_and_no_hugetlbfs(tmp_path: Path) -> None:
    from testbed.check.selftests import run_selftest
    from testbed.errors import GuestTimeout

    g = _FakeGuest(tmp_path, "has pkeys: 1\n", hugepages="none",
                   raise_exc=GuestTimeout("selftest did not finish within 5 s"))
    r = run_selftest(g, _selftest(tmp_path), timeout=5)
    assert not r.passed and "did not finish" in r.error
    assert r.findings[0].subject == "(setup)" and r.findings[0].status == "error"


def test_selftest_reports_from_a_fake_run(tmp_path: Path) -> None:
    import argparse
    import json

    from testbed.check.selftests import run_selftest, write_reports

    g = _FakeGuest(tmp_path, PASS_LOG)
    r = run_selftest(g, _selftest(tmp_path))
    args = argparse.Namespace(junit=tmp_path / "r.xml", json=tmp_path / "r.json",
                              html=tmp_path / "r.html")
    write_reports(args, g, _selftest(tmp_path), r, "2026-12-01T20:00:00", 3.0)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["totals"]["passed"] == 21 and doc["run"]["osrelease"] == "6.1.0-rpal"
    assert (tmp_path / "r.xml").read_text().count("<testcase") == 21
    assert "protection_keys" in (tmp_path / "r.html").read_text()
