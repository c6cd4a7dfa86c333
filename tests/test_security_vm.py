"""`testbed security` on the reference kernel: every row of SECURITY.md expected vs observed,
none contradicting the design, the known weaknesses shown, the host's gadget scan listing the
gadget the attacker planted at its address, the HTML review section; and an injected bug
flipping its row (two guests, about 45 s under TCG)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from testbed.designs.rpal.security import window
from testbed.designs.rpal.security.table import load_table

from conftest import run_testbed

ENV = {"TESTBED_PROGRESS": "0"}


def security_findings(report: dict) -> dict[str, dict]:
    (sc,) = report["scenarios"]
    return {f["subject"]: f for f in sc["findings"] if f["check"] == "security"}


@pytest.mark.vm
def test_every_row_on_the_reference_kernel(rpal_kernel: Path, runs_dir: Path,
                                           tmp_path: Path) -> None:
    html = tmp_path / "r.html"
    res = run_testbed("security", "--kernel", str(rpal_kernel), "--run-dir", str(tmp_path / "r"),
                      "--html", str(html), "--json", str(tmp_path / "r.json"), env=ENV)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    rows = load_table()
    got = security_findings(report)
    assert set(got) == {r.name for r in rows}
    for r in rows:
        f = got[r.name]
        assert f["evidence"]["expected"] == r.expected
        assert f["status"] in ("pass", "skip"), f["message"]
        if f["status"] == "pass" and r.expected == "weakness":
            assert f["evidence"]["observed"] == "open", f["message"]
        if f["status"] == "pass" and r.expected == "blocked":
            assert f["evidence"]["observed"] == "blocked", f["message"]
    # what this kernel lacks is a skip, never a pass
    skipped = {n for n, f in got.items() if f["status"] == "skip"}
    assert skipped <= {"process_vm_readv", "process_vm_writev", "o_direct_read",
                       "io_uring_read", "enable_window"}, skipped
    if not window.available():  # gdb and pygdbmi here: the moment of ENABLE is watched
        ew = got["enable_window"]
        assert ew["status"] == "pass" and ew["evidence"]["observed"] == "blocked", ew
        assert "never fully open" in ew["message"] and "write_pkru" in ew["message"]
    for weak in ("wrpkru_gadget", "xrstor_gadget", "gadget_scan", "gadget_planted",
                 "sigreturn_forged_pkru"):
        assert got[weak]["status"] == "pass" and "known weakness shown" in got[weak]["message"]
    # the table in the summary, row by row
    for r in rows:
        assert re.search(rf"^\s+{r.name}\s+{r.expected}\s+(blocked|open|skip)\s+(PASS|SKIP)",
                         res.stdout, re.M), r.name
    run_dir = Path(report["scenarios"][0]["run_dir"])
    # the planted gadget: listed by the host's scan at the address the guest named
    planted = json.loads((run_dir / "security" / "gadget_planted.json").read_text())
    addr = planted["guest"]["fields"]["planted"]
    listed = [g for s in planted["scan"]["services"] for g in s["gadgets"]
              if g["va"] == addr and g["kind"] == "wrpkru"]
    assert listed and listed[0]["bytes"] == "0f01ef"
    scan = json.loads((run_dir / "security" / "gadget_scan.json").read_text())["scan"]
    assert scan["pages"] > 50 and scan["gadgets"] > 0
    assert {s["role"] for s in scan["services"]} == {"victim", "attacker"}
    # the host's view of the entries: paired rows see the victim's slot as a marked copy
    direct = json.loads((run_dir / "security" / "direct_read.json").read_text())
    assert direct["host"]["attacker"]["victim_slot_entry"]["marker"] is True
    assert direct["host"]["attacker"]["walks"]["secret"]["pkey"] == 5
    assert (run_dir / direct["snapshot"]).is_file()
    page = html.read_text()
    assert f"Review: {len(rows)} rows" in page
    assert f'href="file://{run_dir}/security/slot_after_deputies.json"' in page


@pytest.mark.vm
def test_an_injected_bug_flips_its_row(rpal_kernel: Path, runs_dir: Path,
                                       tmp_path: Path) -> None:
    res = run_testbed("security", "signal_holding_peer_key", "direct_read", "--bug",
                      "signal_pkru_inherit", "--kernel", str(rpal_kernel), "--run-dir",
                      str(tmp_path / "r"), "--json", str(tmp_path / "r.json"), env=ENV)
    assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-2000:]
    got = security_findings(json.loads((tmp_path / "r.json").read_text()))
    assert set(got) == {"signal_holding_peer_key", "direct_read"}
    assert got["signal_holding_peer_key"]["status"] == "fail"
    assert got["signal_holding_peer_key"]["evidence"]["observed"] == "open"
    assert got["direct_read"]["status"] == "pass"
