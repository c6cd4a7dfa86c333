"""The security review offline: its table (SECURITY.md), the guest's rows, the gadget scanner,
the observation lines, the row judge, the host view, the evidence files and the reports."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synth import rpal_snapshot, slot, with_mm, with_task

from testbed.check.model import Finding, ScenarioResult, Status
from testbed.designs import get_design
from testbed.designs.rpal.security import gadgets, hostview, judge, observe, table
from testbed.designs.rpal.security.runner import SCAN_ROWS, judge_all, selected_rows
from testbed.errors import TestbedError
from testbed.runner import GuestSpec
from testbed.snapshot.model import SLOT_SHIFT, Mapping

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "guest" / "rpal_security.c"
NEW_BUGS = ("signal_pkru_inherit", "pkey_mprotect_foreign_allowed", "fork_keeps_copy",
            "enable_opens_threads", "placeholder_may_access")


def guest_rows() -> list[str]:
    """The names in the guest's rows[] table: ROW(name, ...) and { "name", ... } entries."""
    text = GUEST.read_text()
    body = text[text.index("static const struct row rows[] = {"):]
    body = body[:body.index("\n};")]
    return [a or b for a, b in re.findall(r'^\s*(?:ROW\((\w+),|\{ "(\w+)",)', body, re.M)]


# --------------------------------------------------------------------------- the table


def test_every_doc_row_has_an_implementation_and_back():
    doc = [r.name for r in table.load_table()]
    guest = guest_rows()
    assert len(doc) >= 40
    assert sorted(doc) == sorted(guest), (set(doc) ^ set(guest))
    assert doc == guest  # the same order: the table reads as the run goes
    assert set(judge.HOST_RULES) <= set(doc) and set(SCAN_ROWS) <= set(doc)


def test_doc_rows_have_an_expectation_and_a_reason():
    rows = table.load_table()
    assert {r.expected for r in rows} <= set(table.EXPECTED)
    assert all(len(r.reason) > 10 for r in rows)
    by = {r.name: r.expected for r in rows}
    # the spec's known weakness is in the table as one, the rows of the new bugs are blocked
    assert by["wrpkru_gadget"] == by["xrstor_gadget"] == by["gadget_scan"] == "weakness"
    for name in ("signal_holding_peer_key", "pkey_mprotect_foreign", "fork_child_reads_peer",
                 "threads_before_enable", "slot_after_deputies"):
        assert by[name] == "blocked", name


def test_the_doc_is_package_data():
    text = (REPO / "pyproject.toml").read_text()
    assert "designs/rpal/*.md" in text


@pytest.mark.parametrize("line, why", [
    ("| `x` | g | maybe | because |", "expected 'maybe'"),
    ("| `x` | g | blocked |", "not a row"),
    ("| `X-Y` | g | blocked | r |", "not a row"),
])
def test_a_malformed_row_is_a_one_line_error(line: str, why: str):
    text = "| `ok` | g | blocked | a reason |\n" + line + "\n"
    with pytest.raises(table.TableError, match=re.escape(why)) as exc:
        table.parse_table(text, "T.md")
    assert "T.md:2" in str(exc.value) and "\n" not in str(exc.value)


def test_duplicate_and_empty_tables_are_refused():
    with pytest.raises(table.TableError, match="twice"):
        table.parse_table("| `a` | g | blocked | r |\n| `a` | g | weakness | r |\n")
    with pytest.raises(table.TableError, match="no rows"):
        table.parse_table("# nothing\n")


def test_rows_can_be_chosen_by_name():
    rows = table.load_table()
    spec = GuestSpec(Path("k"), Path("i"), accel=None,  # type: ignore[arg-type]
                     extra={"security_rows": ["direct_read", "wrpkru_gadget"]})
    assert [r.name for r in selected_rows(spec, rows)] == ["direct_read", "wrpkru_gadget"]
    with pytest.raises(TestbedError, match="no security row nope"):
        selected_rows(replace(spec, extra={"security_rows": ["nope"]}), rows)
    assert selected_rows(replace(spec, extra={}), rows) == rows


# --------------------------------------------------------------------------- gadgets


def naive_scan(data: bytes) -> list[tuple[str, int]]:
    out = []
    for i in range(len(data)):
        if data[i:i + 3] == b"\x0f\x01\xef":
            out.append(("wrpkru", i))
        if data[i:i + 2] == b"\x0f\xae" and i + 2 < len(data):
            m = data[i + 2]
            if (m >> 3) & 7 == 5 and m >> 6 != 3:
                if i and 0x40 <= data[i - 1] <= 0x4F:
                    out.append(("xrstor64" if data[i - 1] & 8 else "xrstor_rex", i - 1))
                else:
                    out.append(("xrstor", i))
    return sorted(out, key=lambda x: x[1])


# bytes rich in the interesting values, so that gadgets occur often
interesting = st.lists(st.sampled_from([0x0F, 0x01, 0xEF, 0xAE, 0x28, 0x2E, 0x68, 0xE8,
                                        0x48, 0x41, 0x00, 0xC3, 0x6C]), max_size=300
                       ).map(bytes)


@settings(max_examples=300, deadline=None)
@given(interesting, st.integers(min_value=0, max_value=1 << 47))
def test_scan_finds_what_a_byte_by_byte_search_finds(data: bytes, base: int):
    got = [(g.kind, g.offset - base) for g in gadgets.scan_bytes(data, base)]
    assert sorted(got, key=lambda x: (x[1], x[0])) == sorted(naive_scan(data),
                                                            key=lambda x: (x[1], x[0]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=200),
       st.sampled_from([b"\x0f\x01\xef", b"\x0f\xae\x2f", b"\x48\x0f\xae\x68\x10",
                        b"\x41\x0f\xae\x28"]))
def test_a_planted_gadget_is_listed_at_its_offset(pre: bytes, post: bytes, g: bytes):
    data = pre + g + post
    kind = {0x01: "wrpkru"}.get(g[1], "xrstor64" if g[0] == 0x48 else
                                "xrstor_rex" if g[0] == 0x41 else "xrstor")
    at = len(pre)
    if kind == "xrstor" and pre and 0x40 <= pre[-1] <= 0x4F:
        kind, at = ("xrstor64" if pre[-1] & 8 else "xrstor_rex"), at - 1
    assert any(x.kind == kind and x.offset == 0x1000 + at
               for x in gadgets.scan_bytes(data, 0x1000))


def test_lfence_and_other_0f_ae_forms_are_not_xrstor():
    # 0F AE E8 = LFENCE (mod 3), 0F AE 38 = CLFLUSH (/7), 0F AE 20 = XSAVE (/4)
    assert gadgets.scan_bytes(b"\x0f\xae\xe8\x0f\xae\x38\x0f\xae\x20") == []
    assert [g.kind for g in gadgets.scan_bytes(b"\x0f\xae\x28\x0f\xae\x6d\x00")] == [
        "xrstor", "xrstor"]


def test_scan_services_reads_executable_pages_and_spans_page_boundaries():
    base = (1 << SLOT_SHIFT) + 0x400000
    code = Mapping(base, base + 2 * 4096, "r-xu", 1, "leaf", 2, phys_start=0x9000,
                   phys_contiguous=False, region="code")
    data = Mapping(base + 0x10000, base + 0x11000, "rw-u", 1, "leaf", 1, phys_start=0x20000)
    peer = Mapping(2 << SLOT_SHIFT, (2 << SLOT_SHIFT) + 4096, "r-xu", 2, "leaf", 1,
                   phys_start=0x30000)
    snap = with_task(rpal_snapshot(), 101, mappings=(code, data, peer))
    pages = {0x9000: b"\x00" * 4094 + b"\x0f\x01", 0x5000: b"\xef" + b"\x00" * 4095,
             0x20000: b"\x0f\x01\xef" * 1365 + b"\x00", 0x30000: b"\x0f\x01\xef" + b"\0" * 4093}
    phys = {base: 0x9000, base + 4096: 0x5000}
    reads: list[int] = []

    def read(pa: int, n: int) -> bytes:
        reads.append(pa)
        return pages[pa][:n]

    scan = gadgets.scan_services(snap, [("attacker", 101)], lambda root, va: phys.get(va), read)
    svc = scan.services[0]
    assert not svc.error and svc.pages == 2 and scan.pages == 2
    # the data page is not executable; slot 2 holds a marked copy in A's mm: B's to scan
    assert sorted(reads) == [0x5000, 0x9000]
    assert [(g.kind, g.offset) for g in svc.gadgets] == [("wrpkru", base + 4094)]
    assert scan.find(base + 4094, "wrpkru") and not scan.find(base)
    missing = gadgets.scan_services(snap, [("victim", 999)], lambda r, v: None, read)
    assert missing.services[0].error and missing.pages == 0


def test_scan_services_reports_a_page_that_does_not_translate():
    base = (1 << SLOT_SHIFT) + 0x400000
    code = Mapping(base, base + 4096, "r-xu", 1, "leaf", 1, phys_contiguous=False)
    snap = with_task(rpal_snapshot(), 101, mappings=(code,))
    scan = gadgets.scan_services(snap, [("attacker", 101)], lambda r, v: None,
                                 lambda pa, n: b"")
    assert "does not translate" in scan.services[0].error and scan.pages == 0


# --------------------------------------------------------------------------- observations


def test_observation_lines_are_parsed():
    text = ("attacker: step x\nROW direct_read blocked pkru=0xfff3ffff fault=SIGSEGV | a read: "
            "no secret\nROW direct_read open | later lines of a row do not count\n"
            "ROW gadget_scan host  | the host scans\n")
    got = observe.parse_output(text)
    assert set(got) == {"direct_read", "gadget_scan"}
    d = got["direct_read"]
    assert (d.observed, d.message) == ("blocked", "a read: no secret")
    assert d.fields == {"pkru": "0xfff3ffff", "fault": "SIGSEGV"}
    assert got["gadget_scan"].observed == "host" and got["gadget_scan"].fields == {}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_guest_output_parses_without_error(text: str):
    for name, o in observe.parse_output(text).items():
        assert o.observed in observe.OBSERVED and name == o.row
        assert len(o.fields) <= observe.MAX_FIELDS


@pytest.mark.parametrize("line", [
    "ROW direct_read maybe | x", "ROW Direct blocked | x", "ROW a blocked" + "x" * 3000,
    "xROW a blocked | x", "ROW  blocked | x"])
def test_bad_observation_lines_are_ignored(line: str):
    assert observe.parse_line(line) is None


# --------------------------------------------------------------------------- the judge


@pytest.mark.parametrize("expected, observed, status", [
    ("blocked", "blocked", Status.PASS), ("blocked", "open", Status.FAIL),
    ("weakness", "open", Status.PASS), ("weakness", "blocked", Status.FAIL),
    ("either", "open", Status.PASS), ("either", "blocked", Status.PASS),
    ("blocked", "skip", Status.SKIP), ("weakness", "skip", Status.SKIP),
    ("blocked", "error", Status.ERROR), ("weakness", "host", Status.ERROR),
])
def test_verdicts(expected: str, observed: str, status: Status):
    assert judge.verdict(expected, observed)[0] is status


def obs(line: str) -> observe.Observation:
    o = observe.parse_line(line)
    assert o is not None
    return o


def test_a_row_without_an_observation_is_an_error_never_a_pass():
    row = table.Row("direct_read", "direct", "blocked", "r")
    f = judge.judge_row(row, None, None, None)
    assert f.status is Status.ERROR and "no observation" in f.message
    f = judge.judge_row(row, obs("ROW direct_read skip | ENOSYS"), None, None)
    assert f.status is Status.SKIP
    f = judge.judge_row(row, obs("ROW direct_read open | read the secret"), None, None,
                        scenario="security@l5", evidence_file="security/direct_read.json")
    assert f.status is Status.FAIL and f.check == "security" and f.subject == "direct_read"
    assert f.evidence["file"] == "security/direct_read.json" and f.source == "guest"
    assert f.evidence["expected"] == "blocked" and f.evidence["observed"] == "open"


def scan_with(gs: list[gadgets.Gadget], pages: int = 3) -> gadgets.Scan:
    return gadgets.Scan([gadgets.ServiceScan(101, "attacker", pages, [], gs)])


def test_the_gadget_scan_row_is_judged_by_the_host():
    row = table.Row("gadget_scan", "gadgets", "weakness", "r")
    host = obs("ROW gadget_scan host  | the host scans")
    assert judge.judge_row(row, host, None, None).status is Status.ERROR
    found = judge.judge_row(row, host, None, scan_with([gadgets.Gadget("wrpkru", 0x10, b"")]))
    assert found.status is Status.PASS and found.source == "host" and "1 gadgets" in found.message
    none = judge.judge_row(row, host, None, scan_with([]))
    assert none.status is Status.FAIL
    assert judge.judge_row(row, host, None, scan_with([], pages=0)).status is Status.ERROR


def test_the_planted_gadget_must_be_listed_where_the_guest_put_it():
    row = table.Row("gadget_planted", "gadgets", "weakness", "r")
    line = obs("ROW gadget_planted open planted=0x5ffbeffe123 | read the secret")
    at = gadgets.Gadget("wrpkru", 0x5FFBEFFE123, b"\x0f\x01\xef")
    ok = judge.judge_row(row, line, None, scan_with([at]))
    assert ok.status is Status.PASS and "0x5ffbeffe123" in ok.message
    elsewhere = judge.judge_row(row, line, None, scan_with([replace(at, offset=0x5FFBEFFE124)]))
    assert elsewhere.status is Status.ERROR and "does not list" in elsewhere.message
    blocked = obs("ROW gadget_planted blocked planted=0x5ffbeffe123 | fault")
    assert judge.judge_row(row, blocked, None, scan_with([at])).status is Status.FAIL


def security_snapshot(**kw: object) -> object:
    """A paired victim B (pid 102, slot 2) and attacker A (pid 101), with row facts."""
    facts = {"victim.pid": "102", "victim.id": "1", "victim.key": "12", "victim.pkey": "2",
             "attacker.pid": "101", "attacker.id": "0", "attacker.key": "11",
             "attacker.pkey": "1", "pairs": "victim-attacker", "row": "slot_after_deputies",
             "secret": hex((2 << SLOT_SHIFT) + 0x800000),
             "target": hex((2 << SLOT_SHIFT) + 0x900000)}
    return rpal_snapshot("slot_after_deputies", fact_map=facts, **kw)


def test_host_view_names_the_entries_of_the_victims_slot():
    snap = security_snapshot()
    view = hostview.host_view(snap)  # type: ignore[arg-type]
    assert view["victim_slot"] == 2
    assert view["attacker"]["victim_slot_entry"]["marker"] is True
    assert view["victim"]["victim_slot_entry"]["marker"] is False
    assert view["victim"]["leaves"]["secret"]["pkey"] == 2
    assert view["attacker"]["pkru"] == {"101": hex(0xFFFFFFFF & ~(3 << 2))}
    assert view["own_entry_in_victim_slot"] is False
    walks = {"attacker": {"secret": {"phys": "0x1000"}}}
    assert hostview.host_view(snap, walks)["attacker"]["walks"] == walks["attacker"]  # type: ignore[arg-type]


def test_translations_walk_each_address_in_each_role():
    from testbed.snapshot.pagetable import PageTableWalker

    pages: dict[int, bytes] = {}
    walker = PageTableWalker(lambda pa, n: pages.get(pa, b"\0" * 4096)[:n], levels=4)
    snap = security_snapshot()
    walks = hostview.translations(snap, walker.translate)  # type: ignore[arg-type]
    assert set(walks) == {"victim", "attacker"}
    assert walks["attacker"]["secret"]["mapped"] is False
    assert len(walks["attacker"]["secret"]["path"]) == 1  # an empty root entry ends the walk


def test_slot_after_deputies_fails_on_the_attackers_own_entry_in_the_victims_slot():
    row = table.Row("slot_after_deputies", "deputies", "blocked", "r")
    snap = security_snapshot(paired=False)
    own = with_mm(snap, 101, slots=(slot(1, 0x3A41000), slot(2, 0x7777000)))  # type: ignore[arg-type]
    guest = obs("ROW slot_after_deputies blocked rerequest=1,0 | paired again")
    clean = judge.judge_row(row, guest, hostview.host_view(snap), None)  # type: ignore[arg-type]
    assert clean.status is Status.PASS and clean.source == "host"
    bad = judge.judge_row(row, guest, hostview.host_view(own), None)
    assert bad.status is Status.FAIL and "0x7777000" in bad.message
    ebusy = obs("ROW slot_after_deputies open rerequest=0,EBUSY | pairing again fails")
    assert judge.judge_row(row, ebusy, hostview.host_view(snap), None  # type: ignore[arg-type]
                           ).status is Status.FAIL
    assert judge.judge_row(row, guest, None, None).status is Status.ERROR


def test_judge_all_writes_every_rows_evidence_and_the_table(tmp_path: Path):
    rows = (table.Row("direct_read", "direct", "blocked", "r1"),
            table.Row("gadget_scan", "gadgets", "weakness", "r2"),
            table.Row("io_uring_read", "deputies", "blocked", "r3"))
    out = "ROW direct_read blocked fault=SIGSEGV | x\nROW io_uring_read skip | ENOSYS\n"
    fs = judge_all(rows, observe.parse_output(out), {"direct_read": {"victim_slot": 2}},
                   {"gadget_scan": scan_with([gadgets.Gadget("xrstor", 1, b"")])},
                   {"direct_read": "snapshots/direct_read.json"}, tmp_path, "security@l5")
    assert [f.status for f in fs] == [Status.PASS, Status.PASS, Status.SKIP]
    doc = json.loads((tmp_path / "security" / "direct_read.json").read_text())
    assert doc["host"] == {"victim_slot": 2} and doc["snapshot"] == "snapshots/direct_read.json"
    scan = json.loads((tmp_path / "security" / "gadget_scan.json").read_text())["scan"]
    assert scan["gadgets"] == 1 and scan["services"][0]["gadgets"][0]["va"] == "0x1"
    t = json.loads((tmp_path / "security.json").read_text())["rows"]
    assert [(r["row"], r["status"]) for r in t] == [("direct_read", "pass"),
                                                    ("gadget_scan", "pass"),
                                                    ("io_uring_read", "skip")]
    unrun = judge_all(rows[:1], {}, {}, {}, {}, tmp_path, "s", ran=False)
    assert unrun[0].status is Status.ERROR and "could not run" in unrun[0].message


# --------------------------------------------------------------------------- reports


def review_result(tmp_path: Path) -> ScenarioResult:
    rows = (table.Row("direct_read", "direct", "blocked", "because <spec>"),
            table.Row("wrpkru_gadget", "gadgets", "weakness", "unprivileged"),
            table.Row("pkey_mprotect_foreign", "keys", "blocked", "locked"))
    out = ("ROW direct_read blocked | fault\nROW wrpkru_gadget open | read the secret\n"
           "ROW pkey_mprotect_foreign open | pkey_mprotect -> 0\n")
    fs = judge_all(rows, observe.parse_output(out), {}, {}, {}, tmp_path, "security@l5")
    other = Finding("kernel_log", Status.PASS, "no alarms", "security@l5")
    return ScenarioResult("security@l5", [*fs, other], run_dir=str(tmp_path))


def test_the_summary_prints_the_review_table(tmp_path: Path):
    from testbed.report.summary import render_summary

    text = render_summary([review_result(tmp_path)])
    table_lines = [ln for ln in text.splitlines() if ln.startswith("  ")]
    assert any(re.search(r"direct_read\s+blocked\s+blocked\s+PASS", ln) for ln in table_lines)
    assert any(re.search(r"wrpkru_gadget\s+weakness\s+open\s+PASS\s+known weakness", ln)
               for ln in table_lines)
    assert any(re.search(r"pkey_mprotect_foreign\s+blocked\s+open\s+FAIL", ln)
               for ln in table_lines)
    assert "2 as designed (1 known weaknesses shown), 1 contradict the design" in text


def test_the_html_report_has_the_review_section_linking_each_rows_evidence(tmp_path: Path):
    from testbed.report.html import render_html

    page = render_html([review_result(tmp_path)])
    assert "Review: 3 rows" in page
    for name in ("direct_read", "wrpkru_gadget", "pkey_mprotect_foreign"):
        link = f'href="file://{tmp_path}/security/{name}.json"'
        assert link in page, name
        assert (tmp_path / "security" / f"{name}.json").is_file()
    assert "because &lt;spec&gt;" in page  # escaped
    assert page.count('class="fail" id=') == 1


def test_a_result_without_review_findings_has_no_review_section(tmp_path: Path):
    from testbed.report.html import render_html
    from testbed.report.review import render_review_text

    r = ScenarioResult("pair@l5", [Finding("keys", Status.PASS, "ok", "pair@l5")])
    assert "Review:" not in render_html([r]) and render_review_text([r]) == ""


# --------------------------------------------------------------------------- the design


def test_the_suite_is_left_out_of_the_default_job_and_its_bugs_out_of_the_matrix():
    from testbed.run_commands import bugs_for

    design = get_design("rpal")
    assert "security" not in [s.name for s in design.select(None)]
    assert [s.name for s in design.select(None, "security")] == ["security"]
    assert [s.name for s in design.select(["security"])] == ["security"]
    with pytest.raises(TestbedError, match="unknown suite"):
        design.select(None, "nope")
    for b in NEW_BUGS:
        assert b in design.bugs and b in design.checks["security"].bugs
    default = bugs_for(design, design.select(None))
    assert not set(NEW_BUGS) & set(default)
    assert set(default) == set(design.bugs) - set(NEW_BUGS)
    assert set(NEW_BUGS) <= set(bugs_for(design, design.select(None, "security")))


def test_the_new_bugs_are_in_the_kernel_and_its_readme():
    series = REPO / "kernel-patches" / "rpal-ref"
    patch = (series / "0005-rpal-sealed-placeholders-and-security-review-bugs.patch").read_text()
    readme = (series / "README.md").read_text()
    assert "0005-rpal-sealed-placeholders-and-security-review-bugs.patch" in (
        series / "series").read_text()
    for b in NEW_BUGS:
        assert f'"{b}"' in patch and f"`{b}`" in readme, b
        assert f"RPAL_BUG_{b.upper()}" in patch


def test_security_refuses_an_unknown_row_with_one_line():
    from conftest import run_testbed

    p = run_testbed("security", "nosuchrow", "--dry-run")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "no security row nosuchrow" in p.stderr
    assert "Traceback" not in p.stderr


def test_security_dry_run_names_the_one_guest():
    from conftest import run_testbed

    p = run_testbed("security", "--dry-run", "--modes", "l5")
    assert p.returncode == 0, p.stderr
    assert "1 scenario run(s) would run" in p.stdout and "security@l5" in p.stdout


# --------------------------------------------------------------------------- the ENABLE watch


def test_wrpkru_sites_are_found_in_an_object_and_named_by_function(tmp_path: Path):
    import shutil
    import subprocess

    from testbed.designs.rpal.security.window import wrpkru_sites

    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    src = tmp_path / "w.c"
    src.write_text("void a(void) { __asm__ volatile(\"nop; nop\"); }\n"
                   "void b(unsigned v) { __asm__ volatile(\"nop; wrpkru\" :: \"a\"(v), \"c\"(0),"
                   " \"d\"(0)); }\n")
    obj = tmp_path / "w.o"
    subprocess.run(["gcc", "-O2", "-c", "-o", str(obj), str(src)], check=True)
    sites = wrpkru_sites(obj)
    assert len(sites) == 1 and sites[0][1].startswith("b+0x")


def test_the_enable_watch_judgement():
    from testbed.designs.rpal.security.window import judge_window

    def hit(value: str, pid: int, site: str = "write_pkru+0x12", for_pid: int | None = None):
        return {"site": site, "value": value, "pid": pid, "comm": "exe",
                "for_pid": pid if for_pid is None else for_pid}

    sites = ["0x1 write_pkru+0x12", "0x2 __switch_to+0x286"]
    ok = {"sites": sites, "hits": [hit("0xfff3ffff", 52), hit("0x55555554", 9, "__switch_to+0x286",
                                                             -1)]}
    assert judge_window(ok, 52)[0] == "blocked" and "0xfff3ffff" in judge_window(ok, 52)[1]
    opened = {"sites": sites, "hits": [hit("0x0", 52)]}
    value, msg = judge_window(opened, 52)
    assert value == "open" and "PKRU 0" in msg
    assert judge_window({"sites": sites, "hits": [hit("0x0", 7)]}, 52)[0] == "error"
    assert judge_window(None, 52)[0] == "error"
    assert judge_window({"skip": "no gdb on this host"}, 52) == ("skip",
                                                                "not watched: no gdb on this host")
    assert judge_window({"error": "gdb: boom", "hits": []}, 52)[0] == "error"
    row = table.Row("enable_window", "windows", "either", "r")
    host = {"attacker": {"pid": 52}, "window": opened}
    f = judge.judge_row(row, obs("ROW enable_window host pkru_before=0x55555554 | before"),
                        host, None)
    assert f.status is Status.PASS and f.evidence["observed"] == "open" and f.source == "host"


def test_run_leaves_the_suite_out_unless_asked():
    from conftest import run_testbed

    default = run_testbed("run", "--dry-run", "--modes", "l5")
    assert default.returncode == 0, default.stderr
    assert "security@l5" not in default.stdout
    suite = run_testbed("run", "--suite", "security", "--dry-run", "--modes", "l5")
    assert suite.returncode == 0, suite.stderr
    assert "1 scenario run(s) would run" in suite.stdout and "security@l5" in suite.stdout
    bad = run_testbed("run", "--suite", "nope", "--dry-run")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_shared_memfd_names_the_one_physical_page_with_its_two_pkeys():
    row = table.Row("shared_memfd", "aliasing", "weakness", "r")
    line = obs("ROW shared_memfd open alias=0x27ffbeffe000 | read the secret")
    host = {"attacker": {"walks": {"alias": {"phys": "0x1dcf000", "pkey": 9}}},
            "victim": {"walks": {"victim_alias": {"phys": "0x1dcf000", "pkey": 5}}}}
    f = judge.judge_row(row, line, host, None)
    assert f.status is Status.PASS and "one physical page 0x1dcf000, pkey 5" in f.message
    assert judge.judge_row(row, line, {}, None).status is Status.PASS  # no walk: the guest's
