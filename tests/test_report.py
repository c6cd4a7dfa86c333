"""Reports (summary, JUnit, JSON, HTML with the slot picture) from synthetic results; no VM."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import synth

from testbed.check.model import Finding, ScenarioResult, Status
from testbed.designs.rpal import DESIGN
from testbed.report import html, jsonreport, junit, slotgraph, summary
from testbed.report.common import RunMeta, totals
from testbed.snapshot.model import Absent, Kernel, SlotEntry, Snapshot, Task, Trigger, json_schema

A_TABLE = "0x3a41000"
B_TABLE = "0x3b52000"
INIT_T0, INIT_T255 = "0x2000000", "0x2001000"


def _slot(slot: int, table: str, marker: bool = False) -> SlotEntry:
    return synth.slot(slot, int(table, 16), marker)


def _task(pid: int, comm: str, mm: int) -> Task:
    return synth.task(pid, comm, mm, pkru=0x55555550)


def snapshot(
    name: str,
    *,
    a_copy: str | None = B_TABLE,
    b_copy: str | None = A_TABLE,
    comm_a: str = "svc_a",
    pti: bool = False,
) -> Snapshot:
    """Services A (pid 101, slot 1) and B (pid 102, slot 2), each with a marked copy of the
    other's entry (`a_copy`: the table A's slot-2 copy points at; None: no copy), and init."""
    a_slots = [_slot(1, A_TABLE)] + ([_slot(2, a_copy, True)] if a_copy else [])
    b_slots = ([_slot(1, b_copy, True)] if b_copy else []) + [_slot(2, B_TABLE)]
    init_slots = [_slot(0, INIT_T0), _slot(255, INIT_T255)]
    mms = tuple(
        synth.mm(addr, pids, tuple(slots), pti=pti)
        for addr, pids, slots in (
            (0xFFFF888003000000, (1,), init_slots),
            (0xFFFF888003100000, (101,), a_slots),
            (0xFFFF888003200000, (102,), b_slots),
        )
    )
    return Snapshot(
        name=name,
        trigger=Trigger(name, 101, 101, {}),
        kernel=Kernel("6.1.0-rpal", 5, pti, 0, "vmcoreinfo"),
        cpus=(),
        tasks=(_task(1, "init", mms[0].address), _task(101, comm_a, mms[1].address),
               _task(102, "svc_b", mms[2].address)),
        mms=mms,
    )


def _set_slots(snap: Snapshot, index: int, key: str, slots: Any) -> Snapshot:
    mms = list(snap.mms)
    mms[index] = replace(mms[index], **{key: slots})
    return replace(snap, mms=tuple(mms))


def _f(check: str, ok: bool | Status, message: str, *args: Any, **kw: Any) -> Finding:
    st = ok if isinstance(ok, Status) else Status.of(ok)
    return Finding(check, st, message, *args, **kw)


def good_result() -> ScenarioResult:
    fs = [
        _f("slot_copies", True, "A's entry for slot 2 points at B's table", "pair",
                "paired", "svc_a (pid 101) slot 2",
                {"pid": 101, "slot": 2, "expected_table": B_TABLE, "actual_table": B_TABLE}),
        _f("slot_copies", True, "B's entry for slot 1 points at A's table", "pair",
                "paired", "svc_b (pid 102) slot 1",
                {"pid": 102, "slot": 1, "expected_table": A_TABLE, "actual_table": A_TABLE}),
        _f("pkru", True, "PKRU denies all but own key", "pair", "paired", "svc_a (pid 101)",
                {"pid": 101, "pkru": "0x55555550", "expected": "0x55555550"}),
    ]
    return ScenarioResult("pair", fs, run_dir="/tmp/run1", seconds=3.25,
                          snapshots={"paired": snapshot("paired")},
                          output="pair: ok\nrelease: ok\n")


def bad_result(comm_a: str = "svc_a", pti: bool = False) -> ScenarioResult:
    """wrong_slot_copy: A's copy for B's slot points at A's own table."""
    fs = [
        _f("slot_copies", False,
                "svc_a's entry for slot 2 points at table 0x3a41000, not svc_b's 0x3b52000",
                "pair_bug", "paired", f"{comm_a} (pid 101) slot 2",
                {"pid": 101, "peer_pid": 102, "slot": 2, "expected_table": B_TABLE,
                 "actual_table": A_TABLE, "raw": "0x3a41267"}),
        _f("slot_copies", True, "B's entry for slot 1 points at A's table", "pair_bug",
                "paired", "svc_b (pid 102) slot 1",
                {"pid": 102, "slot": 1, "expected_table": A_TABLE, "actual_table": A_TABLE}),
        _f("slot_copies", False, "copy left after release", "pair_bug", "released",
                f"{comm_a} (pid 101) slot 2",
                {"pid": 101, "slot": 2, "expected_table": None, "actual_table": A_TABLE}),
        _f("peer_read", Status.ERROR, "could not parse the workload output", "pair_bug",
           "", "svc_a", {"line": "garbage\x1b[31m"}, source="guest"),
    ]
    snaps = {
        "paired": snapshot("paired", a_copy=A_TABLE, comm_a=comm_a, pti=pti),
        "released": snapshot("released", a_copy=A_TABLE, b_copy=None, comm_a=comm_a, pti=pti),
    }
    return ScenarioResult("pair_bug", fs, bugs=("wrong_slot_copy",), seconds=4.5,
                          snapshots=snaps, output="A: FAIL peer_read \x1b[31mred\x1b[0m\x00\n")


def crashed_result() -> ScenarioResult:
    return ScenarioResult("stale_probe", [], seconds=60.0, error="guest panic: <Oops> & more")


META = RunMeta(kernel="build/rpal-ref/bzImage", osrelease="6.1.0-rpal", bugs=("wrong_slot_copy",),
               accel="tcg", started="2025-06-01T10:00:00Z", seconds=70.0,
               timings={"boot": 4.0, "scenarios": 66.0}, design="rpal",
               title="RPAL testbed report", checks=dict(DESIGN.checks))


def all_results() -> list[ScenarioResult]:
    return [good_result(), bad_result(), crashed_result()]


# --- totals -------------------------------------------------------------------------------


def test_totals_count_cases() -> None:
    t = totals(all_results())
    # pair: 3 pass; pair_bug: 2 fail + 1 pass + 1 error; stale_probe: 1 error (could not run)
    assert (t.tests, t.passed, t.failures, t.errors) == (8, 4, 2, 2)
    assert (t.scenarios, t.scenarios_failed, t.verdict) == (3, 2, "FAIL")
    assert totals([good_result()]).ok


# --- summary ------------------------------------------------------------------------------


def test_summary_lists_failures_and_totals() -> None:
    text = summary.render_summary(all_results(), META)
    lines = text.splitlines()
    assert "\x1b[" not in text  # no colour unless asked
    assert any(ln.startswith("PASS  pair ") and "3 passed" in ln for ln in lines)
    assert any(ln.startswith("FAIL  pair_bug") and "2 failed" in ln for ln in lines)
    assert any(ln.startswith("ERROR stale_probe") for ln in lines)
    assert "FAIL slot_copies[paired] svc_a (pid 101) slot 2 [host]: svc_a's entry" in text
    assert "pid=101 peer_pid=102 slot=2 expected_table=0x3b52000 actual_table=0x3a41000" in text
    assert "ERROR peer_read svc_a [guest]: could not parse" in text
    assert "guest panic: <Oops> & more" in text
    assert lines[-1].startswith("FAIL 3 scenarios (2 failed): 8 tests, 4 passed, 2 failed, 2 err")
    # a passing finding is not listed
    assert "B's entry for slot 1" not in text


def test_summary_colour_only_on_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert "\x1b[31m" in summary.render_summary(all_results(), META, color=True)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain, tty = io.StringIO(), Tty()
    summary.print_summary(all_results(), META, plain)
    summary.print_summary(all_results(), META, tty)
    assert "\x1b[" not in plain.getvalue()
    assert "\x1b[" in tty.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    assert not summary.use_color(tty)


# --- JUnit --------------------------------------------------------------------------------

_ALLOWED = {
    "testsuites": {"name", "tests", "failures", "errors", "time", "disabled", "timestamp"},
    "testsuite": {"name", "tests", "failures", "errors", "skipped", "time", "timestamp",
                  "hostname", "id", "package", "disabled"},
    "properties": set(),
    "property": {"name", "value"},
    "testcase": {"name", "classname", "time", "assertions", "status"},
    "failure": {"message", "type"},
    "error": {"message", "type"},
    "skipped": {"message"},
    "system-out": set(),
    "system-err": set(),
}
_CHILDREN = {
    "testsuites": {"testsuite"},
    "testsuite": {"properties", "testcase", "system-out", "system-err"},
    "properties": {"property"},
    "testcase": {"failure", "error", "skipped", "system-out", "system-err"},
}


def _validate_junit(root: ET.Element) -> None:
    """The common JUnit shape (the Jenkins/Ant XSD): elements, attributes, consistent counts."""
    for el in root.iter():
        assert el.tag in _ALLOWED, el.tag
        assert set(el.attrib) <= _ALLOWED[el.tag], (el.tag, el.attrib)
        for child in el:
            assert child.tag in _CHILDREN.get(el.tag, set()), (el.tag, child.tag)
    assert root.tag == "testsuites"
    sums = {"tests": 0, "failures": 0, "errors": 0}
    for suite in root.findall("testsuite"):
        tcs = suite.findall("testcase")
        assert int(suite.get("tests", -1)) == len(tcs)
        assert int(suite.get("failures", -1)) == sum(tc.find("failure") is not None for tc in tcs)
        assert int(suite.get("errors", -1)) == sum(tc.find("error") is not None for tc in tcs)
        float(suite.get("time", "x"))
        for tc in tcs:
            assert tc.get("name") and tc.get("classname")
            float(tc.get("time", "x"))
        for k in sums:
            sums[k] += int(suite.get(k, 0))
    for k, v in sums.items():
        assert int(root.get(k, -1)) == v, k


def test_junit_parses_with_right_counts(tmp_path: Path) -> None:
    path = junit.write_junit(all_results(), tmp_path / "junit.xml", META)
    root = ET.parse(path).getroot()
    _validate_junit(root)
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("8", "2", "2")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["pair", "pair_bug", "stale_probe"]
    bad = suites["pair_bug"]
    names = [tc.get("name") for tc in bad.findall("testcase")]
    assert "slot_copies[paired] svc_a (pid 101) slot 2" in names
    tc = next(t for t in bad.findall("testcase") if t.get("name", "").startswith("slot_copies[p"))
    fail = tc.find("failure")
    assert fail is not None and fail.get("type") == "slot_copies"
    assert "points at table 0x3a41000" in (fail.get("message") or "")
    assert '"expected_table": "0x3b52000"' in (fail.text or "")
    err = next(t for t in bad.findall("testcase") if t.get("name") == "peer_read svc_a")
    assert err.find("error") is not None
    out = bad.find("system-out")
    assert out is not None and "\\x1b[31mred" in (out.text or "") and "\\x00" in (out.text or "")
    crashed = suites["stale_probe"].findall("testcase")
    assert [t.get("name") for t in crashed] == ["scenario"]
    e = crashed[0].find("error")
    assert e is not None and e.get("message") == "guest panic: <Oops> & more"
    props = {p.get("name"): p.get("value") for p in bad.iter("property")}
    assert props["bugs"] == "wrong_slot_copy" and props["accel"] == "tcg"


def test_junit_all_pass() -> None:
    root = ET.fromstring(junit.render_junit([good_result()]))
    _validate_junit(root)
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("3", "0", "0")


# --- JSON ---------------------------------------------------------------------------------


def test_json_round_trip(tmp_path: Path) -> None:
    results = all_results()
    path = jsonreport.write_json(results, tmp_path / "r.json", META)
    doc = json.loads(path.read_text())
    assert doc["schema"] == "testbed.report" and doc["schema_version"] == 2
    jsonschema.validate(doc, jsonreport.json_schema())
    assert "skipped" in doc["totals"]
    assert all(f["source"] in ("host", "guest") for s in doc["scenarios"] for f in s["findings"])
    assert {c["name"]: c["source"] for c in doc["run"]["checks"]}["faults"] == "guest"
    assert doc["verdict"] == "FAIL"
    assert doc["totals"]["tests"] == 8
    s = doc["scenarios"][1]
    assert s["snapshot_names"] == ["paired", "released"] and "snapshots" not in s
    assert s["findings"][0]["status"] == "fail"
    assert s["failed_checks"] == ["peer_read", "slot_copies"]
    meta, back = jsonreport.read_json(path)
    assert meta == META
    assert [r.findings for r in back] == [r.findings for r in results]
    assert [(r.scenario, r.error, r.bugs, r.output) for r in back] == [
        (r.scenario, r.error, r.bugs, r.output) for r in results
    ]
    assert all(not r.snapshots for r in back)

    embedded = jsonreport.render_json(results, META, embed_snapshots=True)
    jsonschema.validate(json.loads(embedded), jsonreport.json_schema())
    for snap in json.loads(embedded)["scenarios"][1]["snapshots"].values():
        jsonschema.validate(snap, json_schema())
    _, back2 = jsonreport.from_report_dict(json.loads(embedded))
    assert back2[1].snapshots == results[1].snapshots
    assert jsonreport.render_json(back2, META, embed_snapshots=True) == embedded


def test_json_rejects_other_documents() -> None:
    with pytest.raises(ValueError):
        jsonreport.from_report_dict({"schema": "testbed.snapshot", "schema_version": 1})
    with pytest.raises(ValueError):
        jsonreport.from_report_dict({"schema": "testbed.report", "schema_version": 99})


def test_json_odd_evidence_values() -> None:
    r = ScenarioResult("x", [_f("c", False, "m", evidence={"cpus": {2, 1}, "b": b"\x01"})])
    doc = json.loads(jsonreport.render_json([r]))
    assert doc["scenarios"][0]["findings"][0]["evidence"] == {"cpus": [1, 2], "b": "01"}


# --- the slot picture ---------------------------------------------------------------------


def test_slot_figure_pair() -> None:
    fig = slotgraph.slot_figure(snapshot("paired"))
    (view,) = fig.views
    assert [p.label for p in view.procs] == ["svc_a", "svc_b"]
    assert fig.hidden == ["init (pid 1)"]
    assert [[(e.slot, e.cls) for e in p.entries] for p in view.procs] == [
        [(1, "own"), (2, "copy")], [(1, "copy"), (2, "own")]]
    assert {t.table: (t.shared, t.owner) for t in view.tables} == {
        A_TABLE: (True, "svc_a's slot 1"), B_TABLE: (True, "svc_b's slot 2")}
    assert sorted(e.cls for e in view.edges) == ["copy", "copy", "own", "own"]
    assert fig.flagged == 0


def test_slot_figure_wrong_copy_and_leftover() -> None:
    r = bad_result()
    fig = slotgraph.slot_figure(r.snapshots["paired"], r.findings)
    (view,) = fig.views
    a = view.procs[0]
    assert [(e.slot, e.cls, e.badge) for e in a.entries] == [
        (1, "own", "own"), (2, "bad", "✗ wrong table")]
    tables = {t.table: t for t in view.tables}
    assert tables[A_TABLE].shared and not tables[B_TABLE].shared
    assert sorted(e.cls for e in view.edges) == ["bad", "copy", "expected", "own", "own"]
    expected = next(e for e in view.edges if e.cls == "expected")
    assert expected.label == "expected"
    # the findings of another checkpoint name the released entry
    rel = slotgraph.slot_figure(r.snapshots["released"],
                                [f for f in r.findings if f.checkpoint == "released"])
    assert [(e.slot, e.badge) for e in rel.views[0].procs[0].entries] == [
        (1, "own"), (2, "✗ should be gone")]


def test_slot_figure_missing_entry_and_orphan_table() -> None:
    snap = snapshot("x", a_copy=None, b_copy=None)
    snap = _set_slots(snap, 2, "slots", (_slot(1, A_TABLE, True),))  # B lost its own entry
    f = _f("slot_copies", False, "A has no copy of B's slot", "s", "x", "A",
                {"pid": 101, "slot": 2, "expected_table": B_TABLE, "actual_table": None})
    fig = slotgraph.slot_figure(snap, [f])
    view = fig.views[0]
    a = next(p for p in view.procs if p.label == "svc_a")
    assert [(e.slot, e.cls) for e in a.entries] == [(1, "own"), (2, "missing")]
    tables = {t.table: t.cls for t in view.tables}
    assert tables[B_TABLE] == "expected"  # nobody points at it: drawn as the expected target
    assert tables[A_TABLE] == "shared"


def test_slot_figure_pti_user_root_difference() -> None:
    snap = snapshot("p", pti=True)
    snap = _set_slots(snap, 1, "user_slots", (_slot(1, A_TABLE),))  # the mirror lacks A's copy
    fig = slotgraph.slot_figure(snap)
    assert [v.root for v in fig.views] == ["kernel", "user"]
    assert fig.views[0].differences == 0 and fig.views[1].differences == 1
    a_user = fig.views[1].procs[0]
    assert [(e.slot, e.cls) for e in a_user.entries] == [(1, "own"), (2, "mismatch")]


def test_slot_figure_error_records_and_all_processes() -> None:
    snap = _set_slots(snapshot("e"), 0, "slots", Absent("page table read failed"))
    fig = slotgraph.slot_figure(snap, all_processes=True)
    assert len(fig.views[0].procs) == 3
    assert fig.notes == ["init (pid 1) slots: page table read failed"]


# --- HTML ---------------------------------------------------------------------------------


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, re.S)


def test_html_one_svg_per_snapshot_with_arrows_and_shared_tables(tmp_path: Path) -> None:
    path = html.write_html(all_results(), tmp_path / "r.html", META)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert "tests 8, failures 2, errors 2, skipped 0, time 70.0 s" in page
    svgs = _svgs(page)
    assert len(svgs) == 3  # pair: paired; pair_bug: paired, released; stale_probe: none
    good, bad_paired, bad_released = svgs
    assert len(re.findall(r'<path class="arrow a-', good)) == 4
    assert len(re.findall(r'class="entry e-', good)) == 4
    assert len(re.findall(r'class="tbl t-shared"', good)) == 2
    assert len(re.findall(r'<g class="proc', good)) == 2  # init not drawn
    assert len(re.findall(r'<path class="arrow a-', bad_paired)) == 5
    assert len(re.findall(r'class="tbl t-shared"', bad_paired)) == 1
    assert 'data-table="0x3a41000"' in bad_paired
    assert 'class="arrow a-bad"' in bad_paired and 'class="arrow a-expected"' in bad_paired
    assert "✗ should be gone" in bad_released
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    # findings with evidence in <details>
    assert "<details class=\"ev\">" in page
    assert "&#34;expected_table&#34;: &#34;0x3b52000&#34;" in page
    assert "guest panic: &lt;Oops&gt; &amp; more" in page


def test_html_escapes_hostile_strings() -> None:
    hostile = "<script>alert(1)</script>"
    r = bad_result(comm_a=hostile)
    r.findings.append(_f("x", False, '"><img src=x onerror=alert(1)>', "pair_bug",
                              "paired", hostile, {"k": hostile}))
    page = html.render_html([r], RunMeta(kernel=hostile))
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # the comm is a label of the picture, escaped there too
    assert re.search(r'<text class="comm"[^>]*>&lt;script&gt;', page)


def test_html_pti_toggle() -> None:
    page = html.render_html([bad_result(pti=True)], META)
    svgs = _svgs(page)
    assert len(svgs) == 2
    assert all('class="view view-user"' in s for s in svgs)
    assert page.count('type="radio"') == 4


def test_html_all_pass_verdict() -> None:
    page = html.render_html([good_result()], META)
    assert '<header class="top pass">' in page and ": PASS</h1>" in page


def test_slot_figure_roles_from_facts_and_ordinary_processes_hidden() -> None:
    snap = snapshot("paired")
    snap = replace(snap, trigger=Trigger("paired", 101, 101, {
        "A.pid": "101", "A.id": "0", "A.pkey": "1", "B.pid": "102"}))
    # an ordinary PIE process (sshd): image in slot 172, libraries 254, stack 255
    sshd = synth.mm(0xFFFF888003300000, (49,), (_slot(172, "0x5000000"),
                                                _slot(254, "0x5001000"),
                                                _slot(255, "0x5002000")))
    snap = replace(snap, mms=(*snap.mms, sshd),
                   tasks=(*snap.tasks, _task(49, "dropbear", sshd.address)))
    fig = slotgraph.slot_figure(snap)
    procs = fig.views[0].procs
    assert [p.label for p in procs] == ["A · svc_a", "B · svc_b"]
    assert procs[0].sublabel == "pid 101 · id 0 · pkey 1"
    assert fig.hidden == ["init (pid 1)", "dropbear (pid 49)"]
    assert {t.owner for t in fig.views[0].tables} == {"A's slot 1", "B's slot 2"}


# --- four statuses and the source, in every report ------------------------------------------


def skip_result() -> ScenarioResult:
    fs = [
        _f("selftest:protection_keys", Status.SKIP, "SKIP no pkeys", "pk", "", "(suite)",
           source="guest"),
        _f("keys", True, "all 3 mapping(s) carry pkey 1", "pk", "paired", "A"),
    ]
    return ScenarioResult("pk", fs, seconds=1.0)


def test_skip_is_counted_and_not_a_failure(tmp_path: Path) -> None:
    t = totals([skip_result()])
    assert (t.tests, t.passed, t.skipped, t.failures, t.errors, t.ok) == (2, 1, 1, 0, 0, True)
    assert skip_result().passed
    text = summary.render_summary([skip_result()], META)
    assert "1 skipped" in text.splitlines()[-1]
    root = ET.fromstring(junit.render_junit([skip_result()], META))
    _validate_junit(root)
    (suite,) = root.findall("testsuite")
    assert suite.get("skipped") == "1"
    skipped = [tc for tc in suite.findall("testcase") if tc.find("skipped") is not None]
    assert [tc.get("classname") for tc in skipped] == ["pk.guest.selftest:protection_keys"]
    doc = json.loads(jsonreport.render_json([skip_result()], META))
    jsonschema.validate(doc, jsonreport.json_schema())
    assert doc["totals"]["skipped"] == 1 and doc["scenarios"][0]["counts"]["skip"] == 1
    assert [f["status"] for f in doc["scenarios"][0]["findings"]] == ["skip", "pass"]
    page = html.render_html([skip_result()], META)
    assert "skipped 1," in page and '<span class="badge skip">SKIP</span>' in page


def test_every_report_shows_the_source() -> None:
    text = summary.render_summary(all_results(), META)
    assert "checks: host (judged from snapshots): slot_confinement, slot_copies" in text
    assert "guest (the workloads' own verdict lines): tlb_shootdown, faults" in text
    page = html.render_html(all_results(), META)
    assert '<td class="src guest">guest</td><td class="mono">peer_read</td>' in page
    assert "6 from the workloads' own verdict lines only" in page
    root = ET.fromstring(junit.render_junit(all_results(), META))
    classes = {tc.get("classname") for tc in root.iter("testcase")}
    assert "pair_bug.guest.peer_read" in classes and "pair_bug.host.slot_copies" in classes


def test_finding_rejects_an_unknown_source_and_status() -> None:
    with pytest.raises(ValueError):
        Finding("c", Status.PASS, "m", source="kernel")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Finding("c", "maybe", "m")  # type: ignore[arg-type]
    assert Finding("c", "skip", "m").status is Status.SKIP  # type: ignore[arg-type]
