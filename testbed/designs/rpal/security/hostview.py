"""The host's view of the entries a security row involves, from the row's snapshot (pure).

For the victim and the attacker (pids from the checkpoint facts): each one's entry
for the victim's slot (and the PTI user root's), the leaf that maps each address
the row names (secret, target, alias, planted...) with its flags, pkey and physical
address, and the PKRU of each thread. `own_entry_in_victim_slot` says whether the
attacker's page tables hold an entry of their own (unmarked) for the victim's slot.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping as MappingABC
from typing import Any

from testbed.errors import TestbedError
from testbed.snapshot.model import SLOT_SHIFT, Absent, Mapping, Mm, SlotEntry, Snapshot, hx

ROLES = ("victim", "attacker")
ADDRESS_FACTS = ("secret", "target", "planted", "alias", "victim_alias")


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def _entry(e: SlotEntry | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"slot": e.slot, "raw": hx(e.raw), "table": hx(e.table), "present": e.present,
            "marker": e.marker, "nx": e.nx}


def _slot_entry(mm: Mm, slot: int, user: bool = False) -> dict[str, Any] | str | None:
    entries = mm.user_slots if user else mm.slots
    if isinstance(entries, Absent):
        return f"absent: {entries.reason}"
    if entries is None:
        return None
    return _entry(next((e for e in entries if e.slot == slot), None))


def leaf_at(mappings: tuple[Mapping, ...] | Absent, va: int) -> dict[str, Any] | None:
    if isinstance(mappings, Absent):
        return {"absent": mappings.reason}
    m = next((m for m in mappings if m.start <= va < m.end), None)
    if m is None:
        return None
    page = va & ~0xFFF
    phys = m.phys_start + (page - m.start) if m.phys_contiguous and m.kind == "leaf" else None
    return {"range": [hx(m.start), hx(m.end)], "flags": m.flags, "pkey": m.pkey, "kind": m.kind,
            "phys": hx(phys) if phys is not None else None}


def _addresses(snap: Snapshot) -> dict[str, int]:
    return {k: a for k in ADDRESS_FACTS if (a := _int(snap.facts.get(k))) is not None}


def _roots(snap: Snapshot) -> dict[str, int]:
    out = {}
    for role in ROLES:
        pid = _int(snap.facts.get(f"{role}.pid"))
        mm = snap.mm_of(pid) if pid is not None else None
        if mm is not None:
            out[role] = mm.user_pgd if mm.user_pgd is not None else mm.pgd
    return out


def translations(snap: Snapshot, translate: Callable[[int, int], Any]) -> dict[str, Any]:
    """role -> address name -> the walk of that address in the role's page tables (with
    PTI the user root's): each level's raw entry and the leaf's phys, pkey, flags.
    `translate(root, va)` is the page-table walker's (read while the guest is paused)."""
    out: dict[str, Any] = {}
    addrs = _addresses(snap)
    for role, root in _roots(snap).items():
        per: dict[str, Any] = {}
        for name, va in addrs.items():
            try:
                t = translate(root, va)
            except TestbedError as exc:
                per[name] = {"error": exc.one_line()}
                continue
            per[name] = {
                "path": [f"L{e.level} {hx(e.raw)}" for e in t.path], "mapped": t.mapped,
                "phys": hx(t.phys) if t.phys is not None else None, "pkey": t.pkey,
                "write": t.write, "user": t.user, "nx": t.nx}
        out[role] = per
    return out


def host_view(snap: Snapshot, walks: MappingABC[str, Any] | None = None) -> dict[str, Any]:
    """What the host saw at the row's checkpoint (a JSON-ready dict); `walks`: the
    translations() taken while the guest was paused, if any."""
    facts = snap.facts
    vid = _int(facts.get("victim.id"))
    vslot = vid + 1 if vid is not None else None
    addrs = {k: a for k in ADDRESS_FACTS if (a := _int(facts.get(k))) is not None}
    out: dict[str, Any] = {"checkpoint": snap.name, "victim_slot": vslot,
                           "addresses": {k: hx(a) for k, a in addrs.items()}}
    for role in ROLES:
        pid = _int(facts.get(f"{role}.pid"))
        view: dict[str, Any] = {"pid": pid}
        out[role] = view
        mm = snap.mm_of(pid) if pid is not None else None
        if mm is None:
            view["mm"] = None
            continue
        threads = snap.threads(pid) if pid is not None else []
        view["mm"] = hx(mm.address)
        view["pkru"] = {str(t.pid): (hx(t.pkru) if isinstance(t.pkru, int) else
                                     f"absent: {t.pkru.reason}") for t in threads}
        if vslot is not None:
            view["victim_slot_entry"] = _slot_entry(mm, vslot)
            if mm.user_slots is not None:
                view["victim_slot_user_entry"] = _slot_entry(mm, vslot, user=True)
        maps = threads[0].mappings if threads else ()
        view["leaves"] = {k: leaf_at(maps, a) for k, a in addrs.items()}
        if walks is not None and role in walks:
            view["walks"] = walks[role]
    att = out["attacker"].get("victim_slot_entry")
    out["own_entry_in_victim_slot"] = (isinstance(att, dict) and att["present"]
                                       and not att["marker"])
    return out


def slot_of(va: int) -> int:
    return va >> SLOT_SHIFT
