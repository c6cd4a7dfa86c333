"""Across runners: -k and --shard select deterministically, `testbed report merge` of the
shards gives the totals, verdicts and order of the unsharded run; `testbed list --json`,
`--dry-run`, `kernel key`, `--version` (all without a VM)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

import pytest

from testbed.check.model import Finding, ScenarioResult, Status
from testbed.designs import get_design
from testbed.errors import UsageError
from testbed.report.common import RunMeta, totals
from testbed.report.jsonreport import read_json, report_dict, write_json
from testbed.report.merge import MergeError, merge_reports
from testbed.run_commands import (
    all_checks,
    job_names,
    listing,
    matrix_rows,
    render_matrix,
    run_status,
)
from testbed.runner import MODES, expand_modes
from testbed.selection import Shard, parse_keyword, parse_shard

from conftest import run_testbed

DESIGN = get_design("rpal")
MODES2 = (MODES["l5"], MODES["l4pti"])


def test_keyword_expressions() -> None:
    m = parse_keyword("pair and not l4pti")
    assert m(["pair", "pair@l5", "l5", "keys"])
    assert not m(["pair", "pair@l4pti", "l4pti"])
    assert not m(["phases", "phases@l5"])
    assert parse_keyword("slot_copies or ids")(["limits", "ids"])
    assert parse_keyword("(A or b) and c")(["xa", "c"])
    assert not parse_keyword("(A or b) and c")(["xa"])
    for bad in ("", "pair and", "(pair", "pair )", "or pair", "pair ; rm"):
        with pytest.raises(UsageError, match="^-k "):
            parse_keyword(bad)


def test_shards_split_every_item_once_and_alike_everywhere() -> None:
    items = list(range(23))
    for n in (1, 2, 3, 5, 23, 30):
        parts = [parse_shard(f"{i}/{n}").take(items) for i in range(1, n + 1)]
        assert sorted(x for p in parts for x in p) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [Shard(i, n).take(items) for i in range(1, n + 1)]
    for bad in ("0/2", "3/2", "1", "a/b", "1/0", ""):
        with pytest.raises(UsageError, match="^--shard "):
            parse_shard(bad)


def test_k_selects_by_check_name_and_mode() -> None:
    jobs = [(sc, (), m) for sc, m in expand_modes(list(DESIGN.scenarios.values()), MODES2)]
    ids = [j for j in jobs if parse_keyword("ids")(job_names(j))]
    assert {j[0].name for j in ids} == {sc.name for sc in DESIGN.scenarios.values()
                                        if "ids" in sc.checks}
    one = [j for j in jobs if parse_keyword("phases and l4pti")(job_names(j))]
    assert [(j[0].name, j[2].name) for j in one] == [("phases", "l4pti")]


# ------------------------------------------------------------------------- synthetic runs


def _fake_result(name: str, checks: tuple[str, ...], bugs: tuple[str, ...] = (),
                 repeat: int = 0) -> ScenarioResult:
    """A deterministic verdict per (name, check, bugs): some fail, some error."""
    findings = []
    for c in checks:
        h = sum(map(ord, name + c + ",".join(bugs))) % 11
        status = Status.FAIL if h == 0 else Status.ERROR if h == 1 else Status.PASS
        if bugs and c in DESIGN.checks and bugs[0] in DESIGN.checks[c].bugs:
            status = Status.FAIL
        findings.append(Finding(c, status, f"{c} {status}", name))
    return ScenarioResult(name, findings, f"/runs/{name}", bugs, seconds=1.0,
                          design="rpal", repeat=repeat)


def _run_results() -> list[ScenarioResult]:
    return [_fake_result(f"{sc.name}@{m.name}", sc.checks)
            for sc, m in expand_modes(list(DESIGN.scenarios.values()), MODES2)]


def _meta(**extra) -> RunMeta:
    return RunMeta(design="rpal", kernel="/k/bzImage", accel="tcg", seconds=10.0,
                   checks=all_checks(DESIGN), extra={"modes": ["l5", "l4pti"], **extra})


def _shard_reports(results, n: int, tmp_path: Path, **extra) -> list[Path]:
    out = []
    for i in range(1, n + 1):
        p = tmp_path / f"shard{i}.json"
        write_json(Shard(i, n).take(results), p, _meta(shard=f"{i}/{n}", **extra))
        out.append(p)
    return out


def _load(paths):
    return [(str(p), *read_json(p)) for p in paths]


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_merged_shards_equal_the_unsharded_run(tmp_path: Path, n: int) -> None:
    full = _run_results()
    meta, merged = merge_reports(_load(_shard_reports(full, n, tmp_path)))
    assert [r.scenario for r in merged] == [r.scenario for r in full]  # unsharded order
    assert asdict(totals(merged)) == asdict(totals(full))
    assert run_status(merged) == run_status(full)
    want = report_dict(full, _meta())
    got = report_dict(merged, meta)
    assert got["verdict"] == want["verdict"] and got["totals"] == want["totals"]
    assert got["scenarios"] == want["scenarios"]
    assert "shard" not in meta.extra and len(meta.extra["merged_from"]) == n


def test_merge_refuses_a_missing_or_repeated_shard(tmp_path: Path) -> None:
    paths = _shard_reports(_run_results(), 3, tmp_path)
    with pytest.raises(MergeError, match="shard 2/3 missing"):
        merge_reports(_load([paths[0], paths[2]]))
    _, part = merge_reports(_load([paths[0], paths[2]]), partial=True)
    assert len(part) < len(_run_results())
    with pytest.raises(MergeError, match="given twice"):
        merge_reports(_load([paths[0], paths[1], paths[2], paths[1]]))


def test_report_merge_command_writes_the_merged_reports(tmp_path: Path) -> None:
    full = _run_results()
    paths = _shard_reports(full, 2, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    res = run_testbed("report", "merge", *map(str, paths), "--json", str(out / "m.json"),
                      "--junit", str(out / "m.xml"), "--html", str(out / "m.html"), timeout=120)
    assert res.returncode == run_status(full), res.stdout + res.stderr
    t = totals(full)
    doc = json.loads((out / "m.json").read_text())
    assert doc["totals"] == asdict(t)
    root = ET.parse(out / "m.xml").getroot()
    assert (int(root.get("tests", -1)), int(root.get("failures", -1)),
            int(root.get("errors", -1))) == (t.tests, t.failures, t.errors)
    assert (out / "m.html").read_text().count("<section class=\"scenario") == len(full)
    assert f"{t.tests} tests, {t.passed} passed, {t.failures} failed" in res.stdout
    bad = run_testbed("report", "merge", str(tmp_path / "nope.json"), timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("testbed: error: report merge: ")


def test_merged_matrix_shards_judge_like_the_unsharded_matrix(tmp_path: Path) -> None:
    bugs = ["", "same_pkey", "wrong_slot_copy"]
    runs = expand_modes([DESIGN.scenarios["pair"], DESIGN.scenarios["same_pkey"]], MODES2)
    full = [_fake_result(f"{sc.name}@{m.name}", sc.checks, (b,) if b else (), rep)
            for rep in range(2) for b in bugs for sc, m in runs]
    info = {"bugs": bugs, "repeat": 2, "scenarios": ["pair", "same_pkey"],
            "modes": ["l5", "l4pti"], "must_show": True}
    infos = all_checks(DESIGN)
    want_text, want = render_matrix(full, info, infos, 1.0)
    # the same as matrix_rows over the positional grouping the matrix used before
    per_bug = {b: [full[(rep * len(bugs) + i) * len(runs):(rep * len(bugs) + i + 1) * len(runs)]
                   for rep in range(2)] for i, b in enumerate(bugs)}
    assert want["rows"] == matrix_rows(per_bug, list(infos), infos=infos)[0]
    shards = []
    for i in range(1, 4):
        p = tmp_path / f"m{i}.json"
        write_json(Shard(i, 3).take(full), p, _meta(shard=f"{i}/3", matrix={**info,
                                                                           "shard": f"{i}/3"}))
        shards.append(p)
    meta, merged = merge_reports(_load(shards))
    got_text, got = render_matrix(merged, {k: v for k, v in meta.extra["matrix"].items()
                                           if k != "shard"}, meta.checks, 1.0)
    assert got["rows"] == want["rows"] and got["problems"] == want["problems"]
    res = run_testbed("report", "merge", *map(str, shards), "--matrix-json",
                      str(tmp_path / "mm.json"), timeout=120)
    assert res.returncode == (1 if want["problems"] else 0), res.stdout + res.stderr
    assert json.loads((tmp_path / "mm.json").read_text())["rows"] == want["rows"]


# ------------------------------------------------------------------------- conventions


def test_list_json_names_every_check_with_its_source_and_bugs() -> None:
    res = run_testbed("list", "--json", timeout=60)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == json.loads(json.dumps(listing(DESIGN)))
    checks = {c["name"]: c for c in doc["checks"]}
    assert set(checks) == set(all_checks(DESIGN))
    for name, info in all_checks(DESIGN).items():
        assert checks[name]["source"] == info.source
        assert checks[name]["bugs"] == list(info.bugs)
    assert {b["name"] for b in doc["bugs"]} == set(DESIGN.bugs)
    for b in doc["bugs"]:
        assert b["checks"] and all(b["name"] in checks[c]["bugs"] for c in b["checks"])
    assert {s["name"] for s in doc["scenarios"]} == set(DESIGN.scenarios)
    assert [m["name"] for m in doc["modes"] if m["default"]] == ["l5", "l4pti"]


def test_dry_run_prints_qemu_lines_and_starts_nothing(runs_dir: Path, tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    data[0x1F1] = 1
    kernel.write_bytes(bytes(data))
    res = run_testbed("run", "--dry-run", "--kernel", str(kernel), "--accel", "tcg",
                      "-k", "pair", "--shard", "2/2", "--bug", "same_pkey", timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    qemu = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("qemu: ")]
    # -k pair: the scenario pair in 2 modes; shard 2/2 of those: pair@l4pti
    assert len(qemu) == 1, res.stdout
    assert all(f"-kernel {kernel}" in q and "rpal.bug=same_pkey" in q and "pti=on" in q
               for q in qemu)
    assert "shard 2/2: 1 of 2 scenario runs" in res.stdout
    assert "pair@l4pti +same_pkey" in res.stdout
    assert not any(runs_dir.iterdir())  # nothing was started, no run folder


def test_version_and_kernel_key_and_help_exit_codes() -> None:
    v = run_testbed("--version", timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("testbed ")
    h = run_testbed("run", "--help", timeout=60)
    assert "125 the testbed could not judge" in " ".join(h.stdout.split())
    assert "130/143" in h.stdout
