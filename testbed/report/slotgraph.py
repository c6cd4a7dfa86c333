"""The slot picture: which process's 512 GiB entries point at which PUD table page.

`slot_figure(snapshot, findings)` lays out one snapshot (checkpoint) as a graph, a pure function
from a Snapshot (testbed.snapshot.model) to coordinates; templates/report.html.j2 draws it as
inline SVG (so jinja2 escapes every label). On the left one box per process (its comm and pid)
listing its slot entries (`mms[].slots[]`); on the right the distinct PUD table pages (`table`);
an arrow from each entry to the table it points at. Own entries are solid blue, borrowed copies
(`marker`, bit 9) dashed orange; a table pointed at by two or more processes is drawn as shared
(green). With PTI a second view shows the user root (`mms[].user_slots[]`).

Which processes are drawn: those the checkpoint's facts name (`A.pid=54`: drawn as "A · comm"
with its id, pkey and key), those with a marked entry, a table shared with another process, or
named by a finding, and those with an entry in the service slot range (1..254) but none in slot
255 (where an ordinary process has its stack). Ordinary processes (init, the shell, sshd) are
listed under the picture, not drawn, unless `all_processes`.

Evidence keys a check sets so that its finding is drawn on the picture (failing and error
findings of the same checkpoint; the slot-copy checks in testbed/check/ use these names):

- `pid` (int): a task of the process whose page tables hold the entry (any thread, or the
  tgid); alternatively `mm` (str, hex address of its mm_struct);
- `slot` (int): the entry's slot number, VA >> 39;
- `expected_table` (str hex, or null/absent): the PUD table the entry should point at (the
  owner's own entry's `table`); null when the entry should not exist (after release or exit);
- `actual_table` (str hex, or null): the table it points at; null when the entry is missing;
- `root` (optional, "kernel" or "user"): which PTI root the finding is about; absent = both;
- `peer_pid` (optional int): the owner of the slot, for the message only.

A named entry is drawn red, with a dotted red arrow to `expected_table` ("expected"); a missing
entry is drawn as a red dashed placeholder; an entry that should not exist is labelled so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.check.model import Finding
from testbed.snapshot.model import Absent, Mm, SlotEntry, Snapshot, Task, hx

SERVICE_SLOTS = range(1, 255)  # slot = id + 1, ids 0..253
ORDINARY_STACK_SLOT = 255  # top of the 47-bit user space: where a non-RPAL process has its stack

# Geometry (px).
PAD = 16
PROC_X = PAD
PROC_W = 340
HEADER_H = 46
ROW_H = 30
ENTRY_H = 24
ENTRY_X = PROC_X + 12
ENTRY_W = PROC_W - 24
PROC_GAP = 20
TABLE_X = PROC_X + PROC_W + 230
TABLE_W = 320
TABLE_H = 48  # two lines; a third (what should point here) adds TABLE_LINE
TABLE_LINE = 16
TABLE_GAP = 16
WIDTH = TABLE_X + TABLE_W + PAD
LEGEND_H = 92


@dataclass
class EntryNode:
    slot: int
    x: float
    y: float
    table: str | None  # None: a placeholder for a missing entry
    marker: bool = False
    badge: str = ""
    cls: str = "own"  # own | copy | bad | missing | mismatch
    title: str = ""  # tooltip

    @property
    def va(self) -> str:
        return hex(self.slot << 39)

    @property
    def cy(self) -> float:
        return self.y + ENTRY_H / 2


@dataclass
class ProcNode:
    label: str
    sublabel: str
    x: float
    y: float
    h: float
    pids: list[int]
    entries: list[EntryNode] = field(default_factory=list)
    flagged: bool = False


@dataclass
class TableNode:
    table: str
    x: float
    y: float
    owner: str  # "B's slot 2", or "" when only copies point here
    users: list[str]  # labels of the processes pointing here
    shared: bool
    cls: str = "table"  # table | shared | orphan | expected
    note: str = ""  # replaces the owner line
    line2: str = ""  # what the box shows under the address (owner, users, or the note)
    should: str = ""  # third line, red: entries that should point here but do not
    h: float = TABLE_H

    @property
    def cy(self) -> float:
        return self.y + self.h / 2


@dataclass
class Edge:
    d: str  # SVG path
    cls: str  # own | copy | bad | expected | mismatch
    title: str = ""
    label: str = ""
    lx: float = 0.0
    ly: float = 0.0


@dataclass
class View:
    root: str  # "kernel" | "user"
    title: str
    procs: list[ProcNode]
    tables: list[TableNode]
    edges: list[Edge]
    height: float
    differences: int = 0  # user view: entries that differ from the kernel root


@dataclass
class SlotFigure:
    uid: str
    checkpoint: str
    views: list[View]
    width: float
    height: float
    hidden: list[str]  # processes not drawn
    notes: list[str]
    pti: bool
    legend_y: float
    flagged: int  # entries named by findings

    @property
    def arrows(self) -> int:
        return sum(len(v.edges) for v in self.views[:1])


@dataclass
class _Flag:
    finding: Finding
    expected: str | None
    actual: str | None


def _norm_hex(v: Any) -> str | None:
    if v is None or v == "":
        return None
    if isinstance(v, int):
        return hex(v)
    try:
        return hex(int(str(v), 16))
    except ValueError:
        return str(v)


def _flags(
    findings: Iterable[Finding], mms: Sequence[Mm], pid_tgid: Mapping[int, int]
) -> dict[tuple[int, str, int], list[_Flag]]:
    """(mm index, root, slot) -> the failing findings naming that entry."""
    out: dict[tuple[int, str, int], list[_Flag]] = {}
    for f in findings:
        if not f.bad:
            continue
        ev = f.evidence
        if "slot" not in ev:
            continue
        try:
            slot = int(ev["slot"])
        except (TypeError, ValueError):
            continue
        idx = None
        for i, mm in enumerate(mms):
            pids = set(mm.tasks)
            if "pid" in ev and ev["pid"] is not None:
                try:
                    pid = int(ev["pid"])
                except (TypeError, ValueError):
                    continue
                if pid in pids or pid in {pid_tgid.get(p) for p in pids}:
                    idx = i
                    break
            elif "mm" in ev and _norm_hex(ev["mm"]) == hx(mm.address):
                idx = i
                break
        if idx is None:
            continue
        roots = [ev["root"]] if ev.get("root") in ("kernel", "user") else ["kernel", "user"]
        flag = _Flag(f, _norm_hex(ev.get("expected_table")), _norm_hex(ev.get("actual_table")))
        for root in roots:
            out.setdefault((idx, root, slot), []).append(flag)
    return out


def _valid_slots(mm: Mm, key: str) -> tuple[list[SlotEntry], list[str]]:
    """The entries of a root (`slots` or `user_slots`), and why they could not be read."""
    entries = mm.slots if key == "slots" else mm.user_slots
    if isinstance(entries, Absent):
        return [], [entries.reason]
    return list(entries or ()), []


def _table(e: SlotEntry | None) -> str | None:
    return hx(e.table) if e is not None else None


def roles(snapshot: Snapshot) -> dict[int, dict[str, str]]:
    """pid -> {"role": "A", "id": ..., "pkey": ..., "key": ...} from the checkpoint's facts
    (`A.pid=54 A.id=2 ...`, as the RPAL workloads pass them)."""
    facts = snapshot.facts
    out: dict[int, dict[str, str]] = {}
    for k, v in facts.items():
        role, dot, attr = k.rpartition(".")
        if dot and attr == "pid" and role:
            try:
                pid = int(v)
            except ValueError:
                continue
            info = {"role": role}
            for a in ("id", "pkey", "key"):
                if f"{role}.{a}" in facts:
                    info[a] = facts[f"{role}.{a}"]
            out[pid] = info
    return out


def _proc_label(mm: Mm, tasks: Mapping[int, Task]) -> tuple[str, int]:
    pids = sorted(mm.tasks)
    leader = next((p for p in pids if p in tasks and tasks[p].tgid == p), None)
    if leader is None and pids:
        leader = tasks[pids[0]].tgid if pids[0] in tasks else pids[0]
    t = tasks.get(leader if leader is not None else -1) or (
        tasks.get(pids[0]) if pids else None)
    comm = t.comm if t is not None and t.comm else f"mm {hx(mm.address)}"
    return comm, int(leader) if leader is not None else -1


def fit(text: str, width: float, px_per_char: float = 6.9) -> str:
    """`text` cut with an ellipsis to about `width` pixels of 12 px sans-serif."""
    n = max(int(width / px_per_char), 4)
    return text if len(text) <= n else text[: n - 1] + "…"


def _curve(x1: float, y1: float, x2: float, y2: float) -> str:
    dx = (x2 - x1) / 2
    return f"M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} {x2 - dx:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"


def _point(x1: float, y1: float, x2: float, y2: float, t: float) -> tuple[float, float]:
    """A point of _curve at parameter t."""
    dx = (x2 - x1) / 2
    xs = (x1, x1 + dx, x2 - dx, x2)
    ys = (y1, y1, y2, y2)
    b = ((1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3)
    return sum(c * x for c, x in zip(b, xs, strict=True)), sum(
        c * y for c, y in zip(b, ys, strict=True)
    )


def _view(
    root: str,
    mms: Sequence[Mm],
    shown: list[int],
    labels: dict[int, tuple[str, int]],
    titles: Mapping[int, tuple[str, str]],
    flags: Mapping[tuple[int, str, int], list[_Flag]],
    kernel_tables: Mapping[tuple[int, int], str] | None,
) -> View:
    key = "slots" if root == "kernel" else "user_slots"
    procs: list[ProcNode] = []
    y: float = PAD
    entries_of: dict[str, list[tuple[EntryNode, int]]] = {}  # table -> entries pointing at it
    owner_of: dict[str, str] = {}
    expected_edges: list[tuple[EntryNode, str, str, str]] = []  # entry, table, check, comm
    differences = 0
    for i in shown:
        mm = mms[i]
        comm, pid = labels[i]
        slots, _errors = _valid_slots(mm, key)
        by_slot = {e.slot: e for e in slots}
        all_slots = set(by_slot) | {s for (j, r, s) in flags if j == i and r == root}
        if kernel_tables is not None:
            all_slots |= {s for (j, s) in kernel_tables if j == i}
        title, extra = titles[i]
        nthreads = len(mm.tasks)
        node = ProcNode(
            label=fit(title, PROC_W - 24, 8.5),
            sublabel=" · ".join(
                x for x in (f"pid {pid}", extra, f"{nthreads} threads" if nthreads > 1 else "")
                if x
            ),
            x=PROC_X, y=y, h=0, pids=sorted(mm.tasks),
        )
        ey = y + HEADER_H
        for slot in sorted(all_slots):
            e = by_slot.get(slot)
            fl = flags.get((i, root, slot), [])
            table = _table(e)
            marker = bool(e.marker) if e else False
            if kernel_tables is not None and (i, slot) in kernel_tables and e is None:
                differences += 1  # (an entry only in the user root counts below)
            if e is None and not fl:
                # only in the kernel root (user view of a PTI kernel): the mirror lacks it
                kt = (kernel_tables or {}).get((i, slot))
                ent = EntryNode(slot, ENTRY_X, ey, None, cls="mismatch",
                                badge="not in user root",
                                title=f"slot {slot}: kernel root points at {kt}, user root: none")
                node.entries.append(ent)
                ey += ROW_H
                continue
            ent = EntryNode(slot, ENTRY_X, ey, table, marker=marker)
            ent.cls = "copy" if marker else "own"
            ent.badge = "copy · bit 9" if marker else "own"
            if e is not None:
                flags_txt = ", ".join(
                    k for k in ("present", "user", "write", "nx") if getattr(e, k)
                )
                ent.title = (f"slot {slot} ({ent.va}): raw {hx(e.raw)}, table {table}"
                             f"{', marker (bit 9)' if marker else ''}; {flags_txt}")
            if kernel_tables is not None and e is not None:
                kt = kernel_tables.get((i, slot))
                if kt != table:
                    differences += 1
                    ent.cls = "mismatch"
                    ent.badge = "≠ kernel root" if kt else "not in kernel root"
                    ent.title += f"; kernel root: {kt or 'none'}"
            if fl:
                node.flagged = True
                f0 = fl[0]
                if e is None:
                    ent.cls, ent.badge = "missing", "✗ missing"
                elif f0.expected is None and f0.finding.evidence.get("expected_table", 1) is None:
                    ent.cls, ent.badge = "bad", "✗ should be gone"
                elif f0.expected is not None and f0.expected != table:
                    ent.cls, ent.badge = "bad", "✗ wrong table"
                else:
                    ent.cls, ent.badge = "bad", "✗ " + f0.finding.check
                ent.title += "".join(
                    f"\n{x.finding.check}: {x.finding.message}" for x in fl
                )
                for x in fl:
                    if x.expected and x.expected != table:
                        expected_edges.append((ent, x.expected, x.finding.check, comm))
                        break
            if table is not None:
                entries_of.setdefault(table, []).append((ent, i))
                if not marker:
                    owner_of.setdefault(table, f"{comm}'s slot {slot}")
            node.entries.append(ent)
            ey += ROW_H
        node.h = max(HEADER_H + len(node.entries) * ROW_H + 6, HEADER_H + 20)
        procs.append(node)
        y += node.h + PROC_GAP

    # Tables, ordered by where their arrows come from, then pushed apart.
    wanted: dict[str, list[float]] = {t: [ent.cy for ent, _ in es] for t, es in entries_of.items()}
    should: dict[str, list[str]] = {}
    for ent, t, _check, who in expected_edges:
        wanted.setdefault(t, []).append(ent.cy)
        should.setdefault(t, []).append(f"{who}'s slot {ent.slot}")
    owner_y = {
        t: ent.cy for t, es in entries_of.items() for ent, _ in es if not ent.marker
    }
    order = sorted(
        wanted, key=lambda t: (owner_y.get(t, sum(wanted[t]) / len(wanted[t])), t)
    )
    tables: list[TableNode] = []
    by_table: dict[str, TableNode] = {}
    ty: float = PAD
    for t in order:
        users_idx = sorted({i for _, i in entries_of.get(t, [])}, key=shown.index)
        users = [labels[i][0] for i in users_idx]
        node_t = TableNode(
            table=t, x=TABLE_X, y=0, owner=owner_of.get(t, ""), users=users,
            shared=len(users_idx) > 1,
        )
        if t in should:
            node_t.should = "✗ " + ", ".join(should[t]) + " should point here"
            node_t.h += TABLE_LINE
        # next to its owner's own entry (a near-level solid arrow), else amid its users
        anchor = owner_y.get(t, sum(wanted[t]) / len(wanted[t]))
        node_t.y = max(anchor - node_t.h / 2, ty)
        if t not in entries_of:
            node_t.cls, node_t.note = "expected", "no entry points here"
        elif not node_t.owner:
            node_t.cls, node_t.note = "orphan", "no owner entry: only copies point here"
        elif node_t.shared:
            node_t.cls = "shared"
        if node_t.note:
            node_t.line2 = node_t.note
        else:
            used = ", ".join(users) if len(users) <= 2 else f"{len(users)} processes"
            node_t.line2 = node_t.owner + (f" · used by {used}" if users else "")
        node_t.line2 = fit(node_t.line2, TABLE_W - 20)
        node_t.should = fit(node_t.should, TABLE_W - 20, 7.4)
        tables.append(node_t)
        by_table[t] = node_t
        ty = node_t.y + node_t.h + TABLE_GAP

    # Arrows end at distinct points of the table's left edge, in the order they come from.
    incoming: dict[str, list[tuple[float, int]]] = {}
    sources: list[tuple[EntryNode, str, str, str]] = []  # entry, table, class, title
    for t, es in entries_of.items():
        for ent, _ in es:
            cls = ent.cls if ent.cls in ("bad", "mismatch") else ("copy" if ent.marker else "own")
            sources.append((ent, t, cls, f"slot {ent.slot} → {t}"))
    for ent, t, check, _who in expected_edges:
        sources.append((ent, t, "expected", f"{check}: slot {ent.slot} should point at {t}"))
    for k, (ent, t, _c, _t) in enumerate(sources):
        incoming.setdefault(t, []).append((ent.cy, k))
    end_y: dict[int, float] = {}
    for t, lst in incoming.items():
        tn = by_table[t]
        lst.sort()
        step = min(9.0, (tn.h - 12) / max(len(lst) - 1, 1))
        for n, (_y, k) in enumerate(lst):
            end_y[k] = tn.cy + (n - (len(lst) - 1) / 2) * step

    edges: list[Edge] = []
    x1 = ENTRY_X + ENTRY_W
    for k, (ent, t, cls, title) in enumerate(sources):
        x2, y2 = by_table[t].x - 2, end_y[k]
        edge = Edge(_curve(x1, ent.cy, x2, y2), cls, title=title)
        if cls == "expected":
            edge.label = "expected"
            edge.lx, edge.ly = _point(x1, ent.cy, x2, y2, 0.7)
        edges.append(edge)
    height = max(y - PROC_GAP, ty - TABLE_GAP, PAD + 40) + PAD
    title = "kernel page tables" if root == "kernel" else "user page tables (PTI user root)"
    return View(root, title, procs, tables, edges, height, differences)


def slot_figure(
    snapshot: Snapshot,
    findings: Iterable[Finding] = (),
    *,
    uid: str = "f0",
    all_processes: bool = False,
) -> SlotFigure:
    """Lay out one snapshot's slot entries and PUD tables (see the module doc)."""
    tasks = {t.pid: t for t in snapshot.tasks}
    pid_tgid = {p: t.tgid for p, t in tasks.items()}
    mms = list(snapshot.mms)
    flags = _flags(findings, mms, pid_tgid)
    pti = any(m.user_slots is not None for m in mms)

    labels = {i: _proc_label(m, tasks) for i, m in enumerate(mms)}
    role_of = roles(snapshot)
    titles: dict[int, tuple[str, str]] = {}  # i -> (box title, extra sublabel)
    for i, m in enumerate(mms):
        comm, pid = labels[i]
        info = next((role_of[p] for p in [pid, *m.tasks] if p in role_of), None)
        if info:
            labels[i] = (info["role"], pid)
            extra = " · ".join(f"{a} {info[a]}" for a in ("id", "pkey", "key") if a in info)
            titles[i] = (f"{info['role']} · {comm}", extra)
        else:
            titles[i] = (comm, "")
    table_users: dict[str, set[int]] = {}
    notes: list[str] = []
    for i, m in enumerate(mms):
        for key in ("slots", "user_slots"):
            good, errs = _valid_slots(m, key)
            for e in good:
                table_users.setdefault(hx(e.table), set()).add(i)
            notes += [f"{labels[i][0]} (pid {labels[i][1]}) {key}: {x}" for x in errs]

    def interesting(i: int) -> bool:
        m = mms[i]
        if any(j == i for (j, _r, _s) in flags):
            return True
        if any(p in role_of for p in m.tasks):
            return True
        entries = _valid_slots(m, "slots")[0] + _valid_slots(m, "user_slots")[0]
        for e in entries:
            if e.marker:
                return True
            if len(table_users.get(hx(e.table), ())) > 1:
                return True
        # a service's entries lie in its slot (1..254); an ordinary process has its stack at
        # the top of the 47-bit space, slot 255, and its PIE image and libraries anywhere
        slots = {e.slot for e in entries}
        return bool(slots & set(SERVICE_SLOTS)) and ORDINARY_STACK_SLOT not in slots

    shown = [i for i in range(len(mms)) if all_processes or interesting(i)]

    def own_slot(i: int) -> tuple[int, int]:
        own = [e.slot for e in _valid_slots(mms[i], "slots")[0] if not e.marker]
        return (min((s for s in own if s in SERVICE_SLOTS), default=1 << 20), labels[i][1])

    shown.sort(key=own_slot)
    hidden = [f"{labels[i][0]} (pid {labels[i][1]})" for i in range(len(mms)) if i not in shown]

    views = [_view("kernel", mms, shown, labels, titles, flags, None)]
    if pti:
        kernel_tables = {
            (i, e.slot): hx(e.table)
            for i in shown
            for e in _valid_slots(mms[i], "slots")[0]
        }
        views.append(_view("user", mms, shown, labels, titles, flags, kernel_tables))
    body = max(v.height for v in views)
    flagged = sum(
        1 for p in views[0].procs for e in p.entries if e.cls in ("bad", "missing")
    )
    return SlotFigure(
        uid=uid,
        checkpoint=snapshot.name,
        views=views,
        width=WIDTH,
        height=body + LEGEND_H,
        hidden=hidden,
        notes=notes,
        pti=pti,
        legend_y=body,
        flagged=flagged,
    )
