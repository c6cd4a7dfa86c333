"""Human-readable text renderings (jinja2 templates in testbed/report/templates)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from testbed.snapshot.model import Absent, SlotEntry, Snapshot, hx

TEMPLATES = Path(__file__).parent / "templates"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def _h(v: int | Absent | None) -> str:
    if isinstance(v, Absent):
        return "?"
    return "-" if v is None else hx(v)


def snapshot_rows(s: Snapshot) -> dict[str, Any]:
    """Plain strings per column for the snapshot table (absent values shown as `?`)."""
    cpus = []
    for c in s.cpus:
        regs, tlb = c.regs, c.tlb
        cpus.append({
            "index": c.index,
            "cr3": "-" if isinstance(regs, Absent) else hx(regs.cr3),
            "cpl": "-" if isinstance(regs, Absent) else regs.cpl,
            "pkru": "-" if isinstance(regs, Absent) or isinstance(regs.pkru, Absent)
            else hx(regs.pkru),
            "loaded_mm": "?" if isinstance(tlb, Absent) else hx(tlb.loaded_mm),
            "asid": "?" if isinstance(tlb, Absent) else tlb.loaded_mm_asid,
            "gen": "?" if isinstance(tlb, Absent) else (
                "-" if tlb.loaded_gen is None else tlb.loaded_gen),
        })
    tasks = []
    for t in s.tasks:
        maps = t.mappings
        tasks.append({
            "pid": t.pid, "tgid": t.tgid, "comm": t.comm, "cpu": t.cpu, "state": t.state,
            "pkru": _h(t.pkru), "source": t.pkru_source, "pgd": _h(t.pgd),
            "count": "-" if t.mm is None else ("?" if isinstance(maps, Absent) else len(maps)),
            "absent": maps.reason if isinstance(maps, Absent) else "",
            "mappings": [] if isinstance(maps, Absent) else [
                {"start": hx(m.start), "end": hx(m.end), "flags": m.flags, "pkey": m.pkey,
                 "pages": m.pages, "sizes": ",".join(map(str, m.page_sizes)),
                 "phys": hx(m.phys_start)} for m in maps],
        })
    mms = [{"address": hx(m.address), "pgd": hx(m.pgd), "tlb_gen": m.tlb_gen,
            "cpumask": ",".join(map(str, m.cpumask)), "tasks": ",".join(map(str, m.tasks)),
            "slots": _slots_text(m.slots),
            "user_slots": None if m.user_slots is None else _slots_text(m.user_slots)}
           for m in s.mms]
    return {"cpus": cpus, "tasks": tasks, "mms": mms}


def _slots_text(entries: tuple[SlotEntry, ...] | Absent) -> str:
    """`slot->table` per 512 GiB entry; `*` marks a copied (marker bit) entry."""
    if isinstance(entries, Absent):
        return f"? ({entries.reason})"
    return " ".join(f"{e.slot}{'*' if e.marker else ''}->{hx(e.table)}" for e in entries) or "-"


def render_snapshot(snapshot: Snapshot, *, show_mappings: bool = False) -> str:
    return _env.get_template("snapshot.txt.j2").render(
        s=snapshot, rows=snapshot_rows(snapshot), show_mappings=show_mappings,
        kaslr=hx(snapshot.kernel.kaslr_offset),
    )
