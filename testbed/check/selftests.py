"""The kernel's own selftests in the guest (today `protection_keys`), as Findings.

`parse_selftest_output()` is pure: it turns the text a selftest printed into
one Finding per test case (check `selftest:<suite>`, subject = the case name).
It reads two formats and picks by what the text contains:

- TAP / KTAP (`ok N - name`, `not ok N - name`, `# SKIP`, `1..N` plans,
  `Bail out!`, nested KTAP subtests by indentation), as most selftests print;
- the native format of protection_keys in 6.1, which has no TAP: `has pkeys: 1`,
  `test  N PASSED (iteration M)` for each of the cases in each iteration,
  `assert() at FILE::LINE test_nr: N iteration: M` when one fails, and
  `done (all tests OK)` at the end.

A run that ends early (crash, signal, timeout, guest death) is an *error*
Finding, never a pass. A skipped case is a Finding with status `skip` and a
message starting "SKIP". Every Finding has source `guest`: the selftest's own
verdict.

`testbed selftest` boots a guest with the binary in its image, runs the suite
and prints one line per case; exit status 0 when every case passed, 1 when one
failed or the suite did not finish, 4 (kselftest's KSFT_SKIP) when nothing
failed but something was skipped, 125 when the testbed itself failed (boot...).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from testbed.check.model import Finding, ScenarioResult, Status
from testbed.errors import GuestError, GuestTimeout

EXIT_SKIP = 4  # kselftest's KSFT_SKIP
TAIL_LINES = 25  # output lines kept as evidence of a failure


# protection_keys carries on in a forked child each iteration (become_child(): the parent
# exits 0 and the child goes on with the tests), so the suite is over only when the last
# descendant closes the output: `| cat` waits for that. pipefail keeps the status of the
# first process (a crash before the first fork); a descendant's status is not visible, so
# the verdict rests on the output ("done (all tests OK)").
RUN_SCRIPT = "cd /tmp && set -o pipefail && {binary} 2>&1 | cat"


def guest_path(suite: str) -> str:
    """Where the binary goes in the guest: the root folder, so that an archive appended to
    a user's initrd adds no folder entries (which would replace a symlinked /usr/bin)."""
    return f"/tb-selftest-{suite}"


def check_name(suite: str) -> str:
    return f"selftest:{suite}"


# --------------------------------------------------------------------------- parsing

_TAP_RESULT = re.compile(
    r"^(?P<not>not )?ok\b(?:\s+(?P<num>\d+))?\s*(?:-\s*)?(?P<desc>[^#]*?)\s*(?:#\s*(?P<dir>.*))?$"
)
_TAP_PLAN = re.compile(r"^1\.\.(?P<n>\d+)\s*(?:#\s*(?P<dir>.*))?$")
_TAP_VERSION = re.compile(r"^[KT]AP version \d+")
_TAP_ANY = re.compile(r"^\s*(?:(?:not )?ok\b|[KT]AP version \d+|1\.\.\d+\s*(?:#.*)?$)", re.M)

_PK_PASSED = re.compile(r"^test\s+(\d+) PASSED \(iteration (\d+)\)\s*$", re.M)
_PK_ASSERT = re.compile(r"assert\(\) at (\S+)::(\d+) test_nr: (\d+) iteration: (\d+)")
_PK_ERRNO = re.compile(r"errno at assert: (-?\d+)")
_PK_HAS = re.compile(r"^has pkeys: (\d+)", re.M)
_PK_DONE = "done (all tests OK)"
_PK_ANY = re.compile(r"^(?:has pkeys: \d|test\s+\d+ PASSED \(iteration)", re.M)


def detect_format(text: str) -> str:
    """"tap" (TAP/KTAP), "protection_keys" (its native lines) or "" (neither). Pure."""
    if _TAP_ANY.search(text):
        return "tap"
    if _PK_ANY.search(text) or _PK_ASSERT.search(text):
        return "protection_keys"
    return ""


def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-n:])


def _status_text(status: int | None) -> str:
    if status is None:
        return "unknown"
    if status > 128:
        return f"{status} (signal {status - 128})"
    return str(status)


def parse_selftest_output(
    text: str,
    *,
    suite: str = "protection_keys",
    names: Sequence[str] = (),
    iterations: int = 0,
    status: int | None = None,
    interrupted: str = "",
    scenario: str = "",
) -> list[Finding]:
    """Findings for the output `text` of one selftest run. Pure.

    `names`: the case names in run order (protection_keys numbers its cases;
    the names come from the source, see testbed.build.selftests). `iterations`:
    how often each case should pass (0: unknown). `status`: the exit status
    (None: not known, e.g. a recorded log). `interrupted`: why the run ended
    early if it did (timeout, guest death); the run is then never a pass.
    """
    scenario = scenario or check_name(suite)
    fmt = detect_format(text)
    if fmt == "tap":
        return _parse_tap(text, suite, status, interrupted, scenario)
    if fmt == "protection_keys":
        return _parse_pkeys(text, suite, list(names), iterations, status, interrupted, scenario)
    why = interrupted or f"exit status {_status_text(status)}"
    return [Finding(
        check_name(suite), Status.ERROR, f"no test results in the output ({why})",
        scenario=scenario, subject="(suite)", source="guest",
        evidence={"status": status, "interrupted": interrupted, "output_tail": _tail(text)},
    )]


def _parse_pkeys(text: str, suite: str, names: list[str], iterations: int,
                 status: int | None, interrupted: str, scenario: str) -> list[Finding]:
    check = check_name(suite)

    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else f"test {i}"

    passes: dict[int, list[int]] = {}
    last: tuple[int, int] | None = None  # (test, iteration) of the last PASSED line
    for m in _PK_PASSED.finditer(text):
        t, it = int(m.group(1)), int(m.group(2))
        passes.setdefault(t, []).append(it)
        last = (t, it)
    failed = _PK_ASSERT.search(text)
    done = _PK_DONE in text
    has = _PK_HAS.search(text)
    findings: list[Finding] = []

    def finding(subject: str, passed: bool, message: str, error: bool = False,
                skipped: bool = False, **evidence: Any) -> Finding:
        status = (Status.ERROR if error else Status.SKIP if skipped else Status.of(passed))
        return Finding(check, status, message, scenario=scenario, subject=subject,
                       evidence=evidence, source="guest")

    if has is not None and has.group(1) == "0":
        # the test's path for a CPU or kernel without protection keys: nothing of it ran
        ok = status in (None, 0) and not interrupted
        return [finding(
            "(suite)", ok, "SKIP: the guest has no protection keys (has pkeys: 0)" if ok
            else f"has pkeys: 0 and the suite failed (exit status {_status_text(status)})",
            error=not ok, skipped=ok, status=status, output_tail=_tail(text),
        )]

    failed_test = int(failed.group(3)) if failed else None
    # The case that was running when the output stopped: the one after the last PASSED.
    if last is None:
        current, cur_iter = 0, 0
    elif names and last[0] + 1 >= len(names):
        current, cur_iter = 0, last[1] + 1
    else:
        current, cur_iter = last[0] + 1, last[1]
    ended_early = not done and failed is None
    if done and status not in (None, 0):
        ended_early = True
    if interrupted:
        ended_early = True

    known = set(range(len(names))) | set(passes)
    if failed_test is not None:
        known.add(failed_test)
    if ended_early and not done:
        known.add(current)
    for i in sorted(known):
        its = passes.get(i, [])
        ev: dict[str, Any] = {"test_nr": i, "iterations_passed": len(its)}
        if iterations:
            ev["iterations_expected"] = iterations
        if failed is not None and i == failed_test:
            errno = _PK_ERRNO.search(text)
            findings.append(finding(
                name(i), False,
                f"assert at {failed.group(1)}:{failed.group(2)} in iteration {failed.group(4)}",
                file=failed.group(1), line=int(failed.group(2)), iteration=int(failed.group(4)),
                errno=int(errno.group(1)) if errno else None, status=status,
                output_tail=_tail(text), **ev,
            ))
        elif ended_early and not done and i == current:
            why = interrupted or (f"the output ends without '{_PK_DONE}' (exit status "
                                  f"{_status_text(status)})")
            lines = text.rstrip().splitlines()
            if lines and not interrupted:
                why += f"; last output: {lines[-1].strip()[:120]!r}"
            findings.append(finding(
                name(i), False, f"the suite stopped while this case ran (iteration {cur_iter}):"
                f" {why}", error=True, iteration=cur_iter, status=status,
                interrupted=interrupted, output_tail=_tail(text), **ev,
            ))
        elif not its:
            findings.append(finding(name(i), False, "never ran: the suite stopped before it",
                                    error=True, **ev))
        elif done and iterations and len(its) != iterations:
            findings.append(finding(
                name(i), False, f"passed {len(its)} of {iterations} iterations", error=True, **ev))
        else:
            findings.append(finding(name(i), True, f"passed {len(its)} iteration(s)", **ev))
    if done and (status not in (None, 0) or interrupted):
        why = interrupted or f"exit status {_status_text(status)}"
        findings.append(finding("(suite)", False, f"'{_PK_DONE}' printed but {why}", error=True,
                                status=status, output_tail=_tail(text)))
    if not findings:
        findings.append(finding("(suite)", False, "no test case ran", error=True,
                                status=status, output_tail=_tail(text)))
    return findings


@dataclass
class _Result:
    indent: int
    ok: bool
    num: int | None
    desc: str
    directive: str
    line: str
    children: list[_Result] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.desc or (f"test {self.num}" if self.num is not None else "test")

    @property
    def skipped(self) -> bool:
        return self.directive.upper().startswith("SKIP")

    @property
    def todo(self) -> bool:
        return self.directive.upper().startswith("TODO")

    @property
    def passed(self) -> bool:
        return self.ok or self.skipped or self.todo


def _parse_tap(text: str, suite: str, status: int | None, interrupted: str,
               scenario: str) -> list[Finding]:
    check = check_name(suite)
    pending: dict[int, list[_Result]] = {}
    plans: dict[int, tuple[int, str]] = {}
    bail: str | None = None
    for raw in text.splitlines():
        body = raw.lstrip(" \t")
        indent = len(raw) - len(body)
        body = body.rstrip()
        if m := _TAP_RESULT.match(body):
            r = _Result(indent, m.group("not") is None,
                        int(m.group("num")) if m.group("num") else None,
                        (m.group("desc") or "").strip(), (m.group("dir") or "").strip(), body)
            for d in sorted(k for k in pending if k > indent):
                r.children += pending.pop(d)
                plans.pop(d, None)
            pending.setdefault(indent, []).append(r)
        elif m := _TAP_PLAN.match(body):
            plans[indent] = (int(m.group("n")), (m.group("dir") or "").strip())
        elif body.startswith("Bail out!"):
            bail = body[len("Bail out!"):].strip() or "(no reason given)"

    findings: list[Finding] = []
    seen: dict[str, int] = {}

    def emit(r: _Result, prefix: str, depth: int) -> None:
        path = f"{prefix}/{r.name}" if prefix else r.name
        child_failed = False
        for c in r.children:
            emit(c, path, depth + 1)
            child_failed = child_failed or not c.passed
        if r.children and not (not r.passed and not child_failed):
            return  # the children say it
        n = seen.get(path, 0)
        seen[path] = n + 1
        subject = path if n == 0 else f"{path} #{n + 1}"
        if r.skipped:
            msg = f"SKIP {r.directive[4:].strip()}".rstrip()
        elif r.todo:
            msg = f"TODO ({'ok' if r.ok else 'not ok'}) {r.directive[4:].strip()}".rstrip()
        elif r.ok:
            msg = "ok"
        elif r.children:
            msg = "not ok (no failing subtest printed)"
        else:
            msg = "not ok"
        ev: dict[str, Any] = {"line": r.line, "number": r.num, "depth": depth}
        if r.directive:
            ev["directive"] = r.directive
        if not r.passed:
            ev["output_tail"] = _tail(text)
        status = Status.SKIP if r.skipped else Status.of(r.passed)
        findings.append(Finding(check, status, msg, scenario=scenario, subject=subject,
                                evidence=ev, source="guest"))

    top_indent = min(pending) if pending else 0
    for d in sorted(pending):
        for r in pending[d]:
            emit(r, "", 0 if d == top_indent else 1)
    orphans = [d for d in pending if d != top_indent]

    def suite_error(message: str, **ev: Any) -> None:
        findings.append(Finding(check, Status.ERROR, message, scenario=scenario,
                                subject="(suite)", source="guest", evidence={"status": status,
                                                      "output_tail": _tail(text), **ev}))

    top = pending.get(top_indent, [])
    plan = plans.get(top_indent)
    if bail is not None:
        suite_error(f"Bail out! {bail}")
    elif interrupted:
        suite_error(f"the suite did not finish: {interrupted}", interrupted=interrupted)
    elif orphans:
        suite_error("a subtest group has no result line: the suite stopped inside it")
    elif plan is not None and plan[0] == 0 and not top:
        ok = status in (None, 0)
        findings.append(Finding(check, Status.SKIP if ok else Status.ERROR,
                                f"SKIP {plan[1][4:].strip()}".rstrip() if ok else
                                f"1..0 and exit status {_status_text(status)}",
                                scenario=scenario, subject="(suite)", source="guest",
                                evidence={"plan": 0, "status": status}))
    elif plan is not None and len(top) < plan[0]:
        suite_error(f"planned {plan[0]} tests, {len(top)} reported: the suite stopped early "
                    f"(exit status {_status_text(status)})", planned=plan[0], reported=len(top))
    elif not top:
        suite_error(f"no test results (exit status {_status_text(status)})")
    elif status not in (None, 0) and not any(f.bad for f in findings):
        suite_error(f"every test passed but the exit status is {_status_text(status)}")
    return findings


# --------------------------------------------------------------------------- running in a guest


def summary_lines(findings: Sequence[Finding]) -> list[str]:
    """One line per finding: PASS/SKIP/FAIL/ERROR, subject, message."""
    out = []
    for f in findings:
        tag = f.status.value.upper()
        out.append(f"{tag:5} {f.subject}: {f.message}")
    return out


def counts(findings: Sequence[Finding]) -> dict[str, int]:
    c = {"pass": 0, "fail": 0, "error": 0, "skip": 0}
    for f in findings:
        c[f.status.value] += 1
    return c


def result_passed(findings: Sequence[Finding]) -> bool:
    return not any(f.bad for f in findings)


def exit_status(result: ScenarioResult) -> int:
    """0 all passed, 1 a failure or error, 4 (KSFT_SKIP) when only skips kept it from 0."""
    if not result.passed:
        return 1
    return EXIT_SKIP if counts(result.findings)["skip"] else 0


class _Tee(io.RawIOBase):
    """Collect the guest's output, and echo it when asked."""

    def __init__(self, echo: BinaryIO | None) -> None:
        self.buf = io.BytesIO()
        self.echo = echo

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.buf.write(data)
        if self.echo is not None:
            self.echo.write(data)
        return len(data)

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()


def run_selftest(m: Any, st: Any, *, timeout: float | None = 1800.0,
                 echo: BinaryIO | None = None) -> ScenarioResult:
    """Run the selftest `st` (testbed.build.selftests.Selftest) in the booted guest `m`.

    The binary must be in the guest image at guest_path(st.suite). Before it runs,
    the guest gets the hugetlb pages protection_keys asks for (it writes 10 to
    /proc/sys/vm/nr_hugepages itself; we do it first and record what the kernel
    gave). The output (stdout and stderr merged, in order) is parsed into
    findings; a timeout or a guest that dies is an error finding.
    """
    from testbed.boot.commands import guest_command

    scenario = check_name(st.suite)
    prep = m.run("echo 10 > /proc/sys/vm/nr_hugepages 2>/dev/null; "
                 "echo $(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo none) $(uname -r) "
                 "$(test -e /proc/rpal && echo yes || echo no)", timeout=60)
    prep_out = (prep.stdout.decode(errors="replace").split() + ["", "", ""])[:3]
    tee = _Tee(echo)
    interrupted = ""
    status: int | None = None
    t0 = time.monotonic()
    try:
        res = m.run(guest_command(["sh", "-c", RUN_SCRIPT.format(binary=guest_path(st.suite))]),
                    timeout=timeout, stdout=tee, stderr=tee, label=f"selftest {st.suite}")
        status = res.status
    except GuestTimeout as exc:
        interrupted = str(exc)
    except GuestError as exc:  # the guest died under the test: a finding about the kernel
        interrupted = exc.one_line()
    seconds = time.monotonic() - t0
    text = tee.buf.getvalue().decode(errors="replace")
    findings = parse_selftest_output(
        text, suite=st.suite, names=st.tests, iterations=st.iterations, status=status,
        interrupted=interrupted, scenario=scenario,
    )
    if prep_out[0] == "none" and not result_passed(findings):
        # protection_keys writes /proc/sys/vm/nr_hugepages in its set-up and exits if it can't
        findings.insert(0, Finding(
            scenario, Status.ERROR, "the kernel has no /proc/sys/vm/nr_hugepages "
            "(CONFIG_HUGETLBFS is off): protection_keys exits in its hugetlb set-up",
            scenario=scenario, subject="(setup)", source="guest",
            evidence={"guest_release": prep_out[1]},
        ))
    result = ScenarioResult(scenario, findings, run_dir=str(m.run_dir), seconds=seconds,
                            output=text, error=interrupted)
    (m.run_dir / f"selftest-{st.suite}.log").write_text(text)
    (m.run_dir / f"selftest-{st.suite}.json").write_text(json.dumps({
        "suite": st.suite, "source": st.source, "binary": str(st.binary), "status": status,
        "seconds": round(seconds, 2), "interrupted": interrupted,
        "nr_hugepages": prep_out[0], "guest_release": prep_out[1],
        "proc_rpal": prep_out[2] == "yes",
        "findings": [f.to_dict() for f in findings],
    }, indent=1) + "\n")
    return result


def put_in_image(m: Any, st: Any) -> None:
    """Make the (not yet started) machine `m` carry the selftest binary.

    It goes into the per-run overlay archive that every image gets (ours or a
    user's --initrd), like `testbed exec --file`.
    """
    m.cfg.files[guest_path(st.suite).lstrip("/")] = st.binary


def cmd_selftest(args: argparse.Namespace) -> int:
    from testbed.boot.commands import boot_with_progress, machine_from_args, terminate_on_signals
    from testbed.build.selftests import build_selftest

    terminate_on_signals()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.monotonic()
    st = build_selftest(args.suite, args.source)
    m = machine_from_args(args, "selftest")
    try:
        put_in_image(m, st)
        boot_with_progress(m)
        print(f"testbed: selftest {st.suite} ({st.source}) in {m.run_dir}", file=sys.stderr,
              flush=True)
        result = run_selftest(m, st, timeout=args.timeout,
                              echo=sys.stderr.buffer if args.verbose else None)
    finally:
        m.stop()
        try:
            (m.run_dir / "selftest-initrd.cpio").unlink()
        except FileNotFoundError:
            pass
    for line in summary_lines(result.findings):
        print(line)
    c = counts(result.findings)
    print(f"selftest {st.suite}: {c['pass']} passed, {c['fail']} failed, {c['error']} errors, "
          f"{c['skip']} skipped in {result.seconds:.1f}s (output: {m.run_dir}/selftest-"
          f"{st.suite}.log)")
    if args.junit or args.json or args.html:
        write_reports(args, m, st, result, started, time.monotonic() - t0)
    return exit_status(result)


def write_reports(args: argparse.Namespace, m: Any, st: Any, result: ScenarioResult,
                  started: str, seconds: float) -> None:
    """--junit/--json/--html: the same report formats as the RPAL scenarios."""
    from testbed.report.common import RunMeta

    try:
        facts = json.loads((m.run_dir / f"selftest-{st.suite}.json").read_text())
    except (OSError, ValueError):
        facts = {}
    meta = RunMeta(
        kernel=str(m.cfg.kernel), osrelease=str(facts.get("guest_release", "")),
        accel=str(getattr(m.cfg.accel, "accel", "")), started=started, seconds=seconds,
        timings={"selftest": result.seconds},
        extra={"suite": st.suite, "selftest source": st.source, "run folder": str(m.run_dir)},
    )
    if args.junit:
        from testbed.report.junit import write_junit

        write_junit([result], args.junit, meta)
    if args.json:
        from testbed.report.jsonreport import write_json

        write_json([result], args.json, meta)
    if args.html:
        from testbed.report.html import write_html

        write_html([result], args.html, meta)


def add_parser(sub: Any) -> None:
    from testbed.boot.commands import add_machine_options
    from testbed.build.selftests import SUITES

    p = sub.add_parser(
        "selftest", help="boot a guest, run a kernel selftest in it, one line per test case",
        description="Build the kernel's own selftest from the base tree, run it in a guest and "
        "report each test case. Exit 0 all passed, 1 a failure or an unfinished run, "
        "4 only skips, 125 the testbed failed.",
    )
    add_machine_options(p)
    p.add_argument("--suite", choices=sorted(SUITES), default="protection_keys",
                   help="which selftest (default protection_keys)")
    p.add_argument("--source", metavar="TREE|TARBALL",
                   help="kernel tree or tarball with the selftest sources "
                   "(default: Debian's linux-source tarball)")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S",
                   help="an error finding if the suite runs longer than S seconds (default 1800)")
    p.add_argument("--junit", type=Path, metavar="FILE", help="write a JUnit XML report")
    p.add_argument("--json", type=Path, metavar="FILE", help="write a JSON report")
    p.add_argument("--html", type=Path, metavar="FILE", help="write an HTML report")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="stream the selftest's output to stderr while it runs")
    p.set_defaults(func=cmd_selftest)
