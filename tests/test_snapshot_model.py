"""The typed snapshot (testbed/snapshot/model.py): JSON form, shipped schema, assembly; no VM.

Assembly runs the real `assemble` over a real KernelView on recorded guest pages
(tests/data/kernel-objects): the pages the recording lacks are what the host
"could not read", and come out as typed absences.
"""

from __future__ import annotations

import copy
import json
import lzma
from dataclasses import replace
from typing import Any

import jsonschema
import pytest
import synth
from test_kernel_objects import CASES, DATA, attach

from testbed.report.text import render_snapshot
from testbed.snapshot.migstream import VcpuState
from testbed.snapshot.model import (
    SCHEMA_VERSION,
    Absent,
    Snapshot,
    SnapshotFormatError,
    json_schema,
)
from testbed.snapshot.snapshot import assemble

SCHEMA = json_schema()


def validate(doc: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["properties"]["schema_version"]["const"] == SCHEMA_VERSION == 2


def _absent_everywhere() -> Snapshot:
    s = synth.rpal_snapshot(pti=True)
    s = synth.with_task(s, 101, mappings=Absent("page 0x5000 not in RAM"),
                        pkru=Absent("running on CPU 1, whose registers were not read"))
    s = synth.with_mm(s, 102, slots=Absent("root table unreadable"),
                      user_slots=Absent("user root unreadable"))
    cpus = (replace(s.cpus[0], regs=Absent("no vCPU state for this CPU")),
            replace(s.cpus[1], tlb=Absent("per-CPU area unreadable")))
    return replace(s, cpus=cpus, source={"dump": "/tmp/x.elf"})


@pytest.mark.parametrize("make", [synth.rpal_snapshot, _absent_everywhere,
                                  lambda: replace(synth.rpal_snapshot(), trigger=None)],
                         ids=["correct", "absent", "no-trigger"])
def test_json_round_trip_and_schema(make: Any) -> None:
    snap = make()
    doc = snap.to_json()
    validate(doc)
    back = Snapshot.from_json(json.loads(json.dumps(doc)))
    assert back == snap
    assert back.to_json() == doc


def test_absent_is_an_object_with_the_reason_and_never_true() -> None:
    doc = _absent_everywhere().to_json()
    t = next(t for t in doc["tasks"] if t["pid"] == 101)
    assert t["mappings"] == {"absent": "page 0x5000 not in RAM"}
    assert doc["cpus"][1]["tlb"] == {"absent": "per-CPU area unreadable"}
    assert doc["cpus"][0]["regs"] == {"absent": "no vCPU state for this CPU"}
    assert not Absent("x")


def test_addresses_are_hex_strings() -> None:
    doc = synth.rpal_snapshot().to_json()
    assert doc["mms"][1]["address"] == "0xffff888003100000"
    assert doc["mms"][1]["slots"][0]["table"] == hex(synth.A_TABLE)
    assert doc["tasks"][1]["pkru"] == hex(synth.pkru_for(1))


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(synth.rpal_snapshot().to_json())
    d = doc
    for k in path[:-1]:
        d = d[k]
    if value is KeyError:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return doc


BAD = {
    "schema_version 1": (["schema_version"], 1, "schema_version"),
    "other schema": (["schema"], "x", "schema"),
    "decimal address": (["mms", 1, "address"], 12345, "mms[1].address"),
    "not hex": (["mms", 1, "slots", 0, "table"], "0xzz", "mms[1].slots[0].table"),
    "missing pid": (["tasks", 0, "pid"], KeyError, "tasks[0].pid"),
    "bool as int": (["mms", 0, "tlb_gen"], True, "mms[0].tlb_gen"),
    "facts as list": (["trigger", "facts"], ["A.pid=1"], "trigger.facts"),
    "slots not a list": (["mms", 0, "slots"], "none", "mms[0].slots"),
    "bad absent": (["tasks", 1, "mappings"], {"absent": 3}, "tasks[1].mappings"),
    "lazy as string": (["cpus", 0, "tlb", "is_lazy"], "no", "cpus[0].tlb.is_lazy"),
    "regs not absent": (["cpus", 0, "regs"], {"cr3": "0x1"}, "cpus[0].regs"),
    "running_on text": (["tasks", 0, "running_on"], "cpu0", "tasks[0].running_on"),
    "timing list": (["timing"], [], "timing"),
}


@pytest.mark.parametrize("row", sorted(BAD))
def test_from_json_names_the_bad_field(row: str) -> None:
    path, value, where = BAD[row]
    doc = _broken(path, value)
    with pytest.raises(SnapshotFormatError) as exc:
        Snapshot.from_json(doc)
    assert str(exc.value).startswith(where), str(exc.value)
    if row not in ("bool as int", "regs not absent", "timing list"):
        with pytest.raises(jsonschema.ValidationError):
            validate(doc)


def test_load_reports_non_json(tmp_path: Any) -> None:
    p = tmp_path / "s.json"
    p.write_text("{")
    with pytest.raises(SnapshotFormatError, match="not JSON"):
        Snapshot.load(p)
    p.write_text(synth.rpal_snapshot().dumps())
    assert Snapshot.load(p) == synth.rpal_snapshot()
    with pytest.raises(SnapshotFormatError):
        Snapshot.from_json([])


def test_lookups() -> None:
    s = synth.rpal_snapshot()
    assert s.mm_of(101) is not None and s.mm_of(101).address == synth.MM_A  # type: ignore[union-attr]
    assert s.mm_of(999) is None and s.mm_at(synth.MM_B) is s.mms[2]
    assert [t.pid for t in s.threads(102)] == [102]
    assert s.facts["A.pid"] == "101" and replace(s, trigger=None).facts == {}
    m = s.mms[1]
    assert m.slot(2) is not None and m.slot(9) is None
    assert synth.with_mm(s, 101, slots=Absent("x")).mms[1].slot(1) is None
    assert list(synth.leaf(1, 0, 1, 1).slots) == [1]


def test_text_rendering_shows_absences() -> None:
    text = render_snapshot(_absent_everywhere(), show_mappings=True)
    assert "mappings could not be read: page 0x5000 not in RAM" in text
    assert "svc_a" in text and "0xffff888003100000" in text
    lines = text.splitlines()
    assert any(ln.startswith("1 ") and " ? " in ln for ln in lines)  # CPU 1: TLB not read


# ----------------------------------------------------------------------------- assembly


@pytest.fixture(scope="module")
def btf_blob() -> bytes:
    return lzma.decompress((DATA / "debian-6.1-btf-subset.btf.xz").read_bytes())


def _vcpu(index: int, cr3: int, cr4: int, pkru: int) -> VcpuState:
    return VcpuState(index=index, pkru=pkru, pkru_present=True, cr0=0x80050033, cr2=0, cr3=cr3,
                     cr4=cr4, efer=0xD01, rip=0xFFFFFFFF81000000, rsp=0, hflags=3, fields={})


@pytest.mark.parametrize("case", CASES)
def test_assemble_recorded_guest(case: str, btf_blob: bytes) -> None:
    meta, view = attach(case, btf_blob)
    snap = assemble(view, (), name="rec", trigger=synth.Trigger("rec", 1, 1, {"k": "v"}))
    doc = snap.to_json()
    validate(doc)
    assert Snapshot.from_json(doc) == snap
    assert snap.kernel.paging_levels == meta["layout"]["levels"] if "levels" in meta.get(
        "layout", {}) else True
    assert snap.kernel.pti is bool(meta["pti"])
    sleep = next(t for t in snap.tasks if t.pid == meta["pid"])
    assert sleep.comm == "sleep" and isinstance(sleep.mappings, tuple) and sleep.mappings
    assert any(m.region == "stack" for m in sleep.mappings)
    sleep_mm = snap.mm_of(sleep.pid)
    assert sleep_mm is not None and isinstance(sleep_mm.slots, tuple)
    if snap.kernel.pti:
        assert sleep_mm.user_pgd is not None and sleep_mm.user_slots is not None
    # pages the recording lacks are what the host could not read: typed absences, not []
    others = [t for t in snap.tasks if t.pid != meta["pid"]]
    assert others and all(isinstance(t.mappings, Absent) and t.mappings.reason
                          for t in others)
    # no vCPU state given: a running thread's PKRU is absent, not its stale saved value
    for t in snap.tasks:
        assert isinstance(t.pkru, Absent) == (t.running_on is not None)
    assert all(isinstance(c.regs, Absent) for c in snap.cpus)
    assert {c.index for c in snap.cpus} == set(range(meta["nr_cpus"]))


@pytest.mark.parametrize("case", CASES)
def test_assemble_with_vcpus_takes_pkru_from_the_register(case: str, btf_blob: bytes) -> None:
    _, view = attach(case, btf_blob)
    first = assemble(view, ())
    running = [t for t in first.tasks if t.running_on is not None]
    vcpus = [_vcpu(i, 0x1000, 1 << 22, 0x55555550 + i) for i in range(len(first.cpus))]
    snap = assemble(view, vcpus, pids={t.pid for t in running} | {1})
    assert {t.pid for t in snap.tasks} <= {t.pid for t in running} | {1}
    for t in snap.tasks:
        if t.running_on is not None:
            assert t.pkru == 0x55555550 + t.running_on and t.pkru_source == f"cpu{t.running_on}"
    assert all(not isinstance(c.regs, Absent) and c.regs.pke for c in snap.cpus)
    validate(snap.to_json())
