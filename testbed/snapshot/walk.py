"""The page-table walk of one address, as `testbed inspect --walk` and gdb's `tb-walk` print it.

The walk is the project's own (PageTableWalker.translate); this module picks the
root (a task's mm, both roots under PTI, or a CR3) and writes each level as a line:
level, index, raw entry, flags, where it points; the 512 GiB level is named with
its slot number (the entry RPAL copies between address spaces) and its copy mark
(software bit 9), the leaf with its physical address, page size and pkey.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.errors import TestbedError
from testbed.snapshot.kernel import KernelView
from testbed.snapshot.pagetable import EntryKind, Translation, level_name

SLOT_LEVEL = 4  # 512 GiB entries: P4D with 5-level paging, PGD with 4-level
SLOT_SHIFT = 39


@dataclass(frozen=True)
class WalkRoot:
    """A root to walk from, and what it is."""

    label: str  # e.g. "pid 123 (tb-rpal_phases) kernel root"
    root: int  # physical address of the top table (or a CR3 value)


def describe_walk(tr: Translation, label: str) -> list[str]:
    """The lines of one walk (pure)."""
    lines = [f"walk of VA {tr.va:#x} from {label} (root {tr.root:#x}, {tr.levels}-level)"]
    for e in tr.path:
        name = level_name(e.level, tr.levels)
        where = ""
        if e.kind is EntryKind.TABLE:
            where = f" -> table {e.addr:#x}"
        elif e.kind is EntryKind.LEAF:
            where = f" -> page {e.addr:#x} ({e.page_size >> 10} KiB)"
        marks = ""
        if e.level == SLOT_LEVEL and e.kind is not EntryKind.EMPTY:
            marks = f"  [slot {e.va >> SLOT_SHIFT & 0x1FF}" + (
                ", copy mark (sw9): a slot entry copied from another mm]" if e.sw9 else "]")
        lines.append(f"  {name:<3} [{e.index:3d}] {e.raw:#018x} {e.flags_str()}{where}{marks}")
    if tr.mapped:
        assert tr.phys is not None
        lines.append(f"  => phys {tr.phys:#x}, pkey {tr.pkey}, "
                     f"{'W' if tr.write else 'RO'}{' U' if tr.user else ' S'}"
                     f"{' NX' if tr.nx else ''}")
    else:
        lines.append(f"  => not mapped (the walk ended at a {tr.last.kind.value} "
                     f"{level_name(tr.last.level, tr.levels)} entry)")
    return lines


def roots_of(view: KernelView, pid: int | None, cr3: int | None) -> list[WalkRoot]:
    """The roots to walk: a task's mm (kernel root, and the user root under PTI), else the
    CR3 given."""
    if pid is None:
        if cr3 is None:
            raise TestbedError("give a pid (the task whose address space to walk) or a CR3")
        return [WalkRoot(f"CR3 {cr3:#x}", cr3)]
    task = next((t for t in view.tasks() if t.pid == pid), None)
    if task is None:
        raise TestbedError(f"no task with pid {pid} in the guest")
    if not task.mm:
        raise TestbedError(f"pid {pid} ({task.comm}) is a kernel thread: no user address "
                           "space to walk")
    mm = view.mm(task.mm)
    if mm is None:
        raise TestbedError(f"the mm_struct of pid {pid} at {task.mm:#x} cannot be read")
    who = f"pid {pid} ({task.comm})"
    out = [WalkRoot(f"{who} kernel root" if mm.pti else who, mm.pgd_phys)]
    if mm.pti:
        out.append(WalkRoot(f"{who} user root (PTI)", mm.user_pgd_phys))
    return out


def walk_lines(view: KernelView, va: int, pid: int | None = None, cr3: int | None = None
               ) -> list[str]:
    """Every root's walk of `va`, as lines."""
    lines: list[str] = []
    for r in roots_of(view, pid, cr3):
        lines += describe_walk(view.walker.translate(r.root, va), r.label)
    return lines
