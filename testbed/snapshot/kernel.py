"""Kernel objects of a guest, read from the host: tasks, mms, saved PKRU, per-CPU TLB state.

Types come from BTF (:mod:`testbed.snapshot.btf`), symbols from the vmlinux
ELF or System.map, or from the guest's own kallsyms located through
VMCOREINFO (:mod:`testbed.snapshot.symbols`, :mod:`testbed.snapshot.vmcoreinfo`),
so Debian's stock kernel (BTF, no DWARF, no System.map) works as well as the
kernels we build. drgn is not needed (see KERNEL-OBJECTS.md).

Use::

    mem = SharedFileMemory(machine.ram_path)           # guest paused
    kv = KernelView.attach(mem, KernelImage.from_paths("/boot/vmlinuz-..."))
    for t in kv.tasks():
        mm = kv.mm(t)                                  # None for kernel threads
        print(t.pid, t.comm, hex(t.pkru), mm and hex(mm.pgd_phys))
    kv.cpu_tlbstate(0).loaded_mm

KASLR: ``kaslr_offset`` (and ``phys_base``) given explicitly win; otherwise
the VMCOREINFO note in RAM gives KERNELOFFSET, phys_base and the paging
depth; otherwise, with link-time symbols and a ``cr3``, the offset is found
by probing where ``linux_banner`` is mapped (2 MiB steps through the 1 GiB
kernel image window).

Kernel virtual to physical: kernel-image addresses by
``va - __START_KERNEL_map + phys_base``, the direct map by
``va - page_offset_base`` (read from the guest), anything else (vmalloc,
per-CPU chunks outside the direct map) by walking ``init_top_pgt``.

Reads see guest memory as it is at the moment of the read: pause the guest
(QMP ``stop``) for a consistent picture.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from testbed.errors import TestbedError
from testbed.snapshot.btf import Btf, BtfError, Kind
from testbed.snapshot.kernel_image import KernelImage
from testbed.snapshot.pagetable import PageTableError, PageTableWalker, kernel_root
from testbed.snapshot.symbols import (
    START_KERNEL_MAP,
    SymbolError,
    SymbolTable,
    decode_kallsyms,
    is_image_address,
)
from testbed.snapshot.vmcoreinfo import VmcoreInfo, VmcoreinfoError, find_vmcoreinfo

KERNEL_IMAGE_SIZE = 1 << 30
KASLR_ALIGN = 2 << 20  # CONFIG_PHYSICAL_ALIGN on x86-64 (Debian: 0x200000)
DEFAULT_PAGE_OFFSET = {4: 0xFFFF_8880_0000_0000, 5: 0xFF11_0000_0000_0000}
DEFAULT_PKRU = 0x5555_5554

# task state bits (Linux 6.1, include/linux/sched.h)
TASK_REPORT = 0x7F
TASK_NOLOAD = 0x400
TASK_IDLE = 0x2 | TASK_NOLOAD
TASK_RTLOCK_WAIT = 0x1000
TASK_STATE_CHARS = "RSDTtXZPI"
PF_KTHREAD = 0x0020_0000
PF_IDLE = 0x2
_U64 = (1 << 64) - 1


class KernelViewError(TestbedError):
    """The guest kernel cannot be read: no KASLR information, wrong image, bad pointer."""


class _Memory(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def ranges(self) -> Sequence[tuple[int, int]]: ...

    def read(self, phys: int, length: int) -> bytes: ...


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelLayout:
    """Where the running kernel sits; ``source`` says how it was found."""

    kaslr_offset: int
    phys_base: int
    page_offset_base: int
    levels: int
    source: str
    """"explicit", "vmcoreinfo" or "banner-probe"."""
    osrelease: str = ""


@dataclass(frozen=True)
class Task:
    """One thread (``struct task_struct``)."""

    address: int
    pid: int
    tgid: int
    comm: str
    cpu: int
    """The CPU the task last ran on or is queued on (``thread_info.cpu``)."""
    state: int
    """Raw ``__state`` (``state`` before 5.14)."""
    exit_state: int
    state_char: str
    """One letter as in /proc/PID/stat (R S D T t X Z P I)."""
    flags: int
    on_cpu: bool
    """``task->on_cpu``: set while the task runs on a CPU (and during switches)."""
    running_on: int | None
    """The CPU whose ``current_task`` is this task, or None."""
    pkru: int
    """Saved ``thread.pkru``: exact for a switched-out task; stale when ``pkru_stale``."""
    mm: int
    active_mm: int
    group_leader: int

    @property
    def pkru_stale(self) -> bool:
        """The task is current on a CPU: its live PKRU is in that CPU (migration stream)."""
        return self.running_on is not None

    @property
    def is_kthread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)

    @property
    def is_idle(self) -> bool:
        return bool(self.flags & PF_IDLE)


@dataclass(frozen=True)
class Mm:
    """One address space (``struct mm_struct``)."""

    address: int
    pgd: int
    """Kernel virtual address of the top page table."""
    pgd_phys: int
    """Its physical address (what CR3 holds, without PCID/PTI bits)."""
    ctx_id: int
    tlb_gen: int
    """``mm->context.tlb_gen``: bumped by every flush request on this mm."""
    cpumask: frozenset[int]
    """``mm_cpumask(mm)``: CPUs that may hold TLB entries of this mm."""
    users: int
    count: int
    pti: bool = False

    @property
    def user_pgd_phys(self) -> int:
        """The top table user mode runs on: ``pgd_phys + 0x1000`` with PTI, else ``pgd_phys``.

        With PTI the kernel copy (``pgd_phys``) marks user entries NX."""
        return self.pgd_phys | 0x1000 if self.pti else self.pgd_phys


@dataclass(frozen=True)
class TlbContext:
    ctx_id: int
    tlb_gen: int


@dataclass(frozen=True)
class CpuTlbState:
    """Per-CPU ``cpu_tlbstate`` (+ ``cpu_tlbstate_shared.is_lazy``) and the current task."""

    cpu: int
    loaded_mm: int
    loaded_mm_asid: int
    next_asid: int
    is_lazy: bool | None
    ctxs: tuple[TlbContext, ...]
    current_task: int | None

    @property
    def loaded_ctx(self) -> TlbContext | None:
        """The context of the loaded ASID (its ``tlb_gen`` is what this CPU has flushed to)."""
        if 0 <= self.loaded_mm_asid < len(self.ctxs):
            return self.ctxs[self.loaded_mm_asid]
        return None


# ---------------------------------------------------------------------------
# Struct layouts from BTF
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    offset: int
    size: int
    signed: bool
    bit_offset: int = 0
    bit_size: int = 0


class _Layout:
    """Offsets and sizes of the members of one struct the view reads, from BTF."""

    def __init__(self, btf: Btf, struct_name: str, paths: Sequence[str],
                 optional: Sequence[str] = ()) -> None:
        self.name = struct_name
        self.type = btf.find("struct " + struct_name)
        self.size = self.type.size
        self.fields: dict[str, _Field] = {}
        for p in [*paths, *optional]:
            try:
                m = btf.member(self.type.id, p)
            except BtfError:
                if p in optional:
                    continue
                raise
            t = btf.strip(m.type_id)
            # atomic_t / atomic64_t / cpumask and similar one-member wrappers
            while t.kind == Kind.STRUCT and len(t.members) == 1:
                t = btf.strip(t.members[0].type_id)
            size = btf.sizeof(t.id) if t.kind != Kind.ARRAY else btf.sizeof(t.id)
            signed = t.kind == Kind.INT and t.signed
            if m.bit_size:
                self.fields[p] = _Field(m.bit_offset // 8, size, signed, m.bit_offset % 8,
                                        m.bit_size)
            else:
                self.fields[p] = _Field(m.offset, size, signed)

    def has(self, path: str) -> bool:
        return path in self.fields

    def off(self, path: str) -> int:
        return self.fields[path].offset

    def get(self, buf: bytes, path: str, base: int = 0) -> int:
        f = self.fields[path]
        o = base + f.offset
        if f.bit_size:
            raw = int.from_bytes(buf[o : o + f.size], "little")
            return (raw >> f.bit_offset) & ((1 << f.bit_size) - 1)
        return int.from_bytes(buf[o : o + f.size], "little", signed=f.signed)

    def bytes_of(self, buf: bytes, path: str, base: int = 0) -> bytes:
        f = self.fields[path]
        return buf[base + f.offset : base + f.offset + f.size]


def _state_char(state: int, exit_state: int) -> str:
    s = (state | exit_state) & TASK_REPORT
    if state & TASK_IDLE == TASK_IDLE:
        s = TASK_REPORT + 1
    if state & TASK_RTLOCK_WAIT:
        s = 0x2
    return TASK_STATE_CHARS[s.bit_length()] if s.bit_length() < len(TASK_STATE_CHARS) else "?"


def _bits(data: bytes, nbits: int) -> frozenset[int]:
    val = int.from_bytes(data, "little")
    return frozenset(i for i in range(min(nbits, len(data) * 8)) if val >> i & 1)


# ---------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------


class KernelView:
    """Kernel objects of one guest over a guest-physical memory source."""

    def __init__(self, memory: _Memory, btf: Btf, symbols: SymbolTable, layout: KernelLayout,
                 vmcoreinfo: VmcoreInfo | None = None) -> None:
        self.memory = memory
        self.btf = btf
        self.symbols = symbols
        self.layout = layout
        self.vmcoreinfo = vmcoreinfo
        self._walker: PageTableWalker | None = None
        self._task = _Layout(
            btf, "task_struct",
            ["pid", "tgid", "comm", "mm", "active_mm", "tasks", "flags", "exit_state",
             "thread.pkru", "group_leader"],
            optional=["__state", "state", "on_cpu", "thread_info.cpu", "cpu", "thread_group",
                      "thread_node", "signal"],
        )
        self._mm = _Layout(btf, "mm_struct", ["pgd", "context.ctx_id", "context.tlb_gen"],
                           optional=["mm_users", "mm_count", "cpu_bitmap"])
        self._tlb = _Layout(btf, "tlb_state", ["loaded_mm", "loaded_mm_asid", "ctxs"],
                            optional=["next_asid", "is_lazy"])
        ctx = btf.find("struct tlb_context")
        self._ctx_size = ctx.size
        self._ctx_gen = btf.offsetof(ctx.id, "tlb_gen")
        self._ctx_id = btf.offsetof(ctx.id, "ctx_id")
        self._nr_ctxs = btf.strip(btf.member(self._tlb.type.id, "ctxs").type_id).nelems
        self._state_path = "__state" if self._task.has("__state") else "state"
        self._cpu_path = "thread_info.cpu" if self._task.has("thread_info.cpu") else "cpu"
        self._nr_cpu_ids: int | None = None
        self._per_cpu_offsets: tuple[int, ...] | None = None
        self._current: dict[int, int | None] | None = None
        self._pti: bool | None = None
        self._member_layouts: dict[tuple[str, str], _Layout] = {}

    # -- attach ----------------------------------------------------------------------

    @classmethod
    def attach(
        cls,
        memory: _Memory,
        kernel: KernelImage | str | Path,
        *,
        cr3: int | None = None,
        kaslr_offset: int | None = None,
        phys_base: int | None = None,
        levels: int | None = None,
        vmcoreinfo: VmcoreInfo | None = None,
        symbols: SymbolTable | None = None,
    ) -> KernelView:
        """Attach to the kernel in ``memory`` (guest paused).

        ``kernel``: a :class:`KernelImage` or the path of its bzImage/vmlinux.
        ``kaslr_offset``/``phys_base``: known KASLR values (skip the search);
        ``cr3``: any vCPU's CR3, for the banner probe when the kernel has no
        VMCOREINFO; ``levels``: paging depth (from CR4.LA57) when known;
        ``vmcoreinfo``: the note when already found (skips the RAM scan);
        ``symbols``: a symbol table to use instead of the image's or kallsyms.
        """
        image = kernel if isinstance(kernel, KernelImage) else KernelImage.from_paths(kernel)
        btf = image.btf
        link = image.symbols if symbols is None or not symbols.relocated else None
        if symbols is not None and not symbols.relocated:
            link = symbols
        info = vmcoreinfo
        probed: tuple[int, int, int | None] | None = None
        if info is None and kaslr_offset is None and link is not None and cr3 is not None:
            # symbols and a CR3: the banner probe costs milliseconds, a RAM scan ~0.2-0.7 s
            try:
                probed = _probe_banner(memory, link, cr3, None, levels)
            except KernelViewError:
                probed = None
        if probed is not None:
            kaslr_offset, phys_base, levels = probed
        if info is None and not (kaslr_offset is not None and phys_base is not None):
            try:
                info = find_vmcoreinfo(memory)
            except VmcoreinfoError:
                info = None
        koff: int | None
        pbase: int | None
        if probed is not None:
            source, koff, pbase = "banner-probe", probed[0], probed[1]
        elif kaslr_offset is not None:
            source = "explicit"
            koff = kaslr_offset
            pbase = phys_base if phys_base is not None else (
                info.phys_base if info is not None else None)
        elif info is not None and info.phys_base is not None:
            source, koff, pbase = "vmcoreinfo", info.kernel_offset, info.phys_base
        else:
            source, koff, pbase = "banner-probe", None, None
        if info is not None and levels is None and info.pgtable_l5_enabled is not None:
            levels = 5 if info.pgtable_l5_enabled else 4

        if koff is None or pbase is None:
            if link is None:
                raise KernelViewError(
                    "cannot place the kernel: no VMCOREINFO in guest RAM and no link-time "
                    "symbols (give the vmlinux or System.map, or kaslr_offset and phys_base)"
                )
            koff, pbase, levels = _probe_banner(memory, link, cr3, koff, levels)

        if link is not None and info is not None and source != "explicit":
            want = info.symbol("swapper_pg_dir") or info.symbol("init_top_pgt")
            name = "swapper_pg_dir" if info.symbol("swapper_pg_dir") else "init_top_pgt"
            if want is not None and name in link and link.runtime(name, koff) != want:
                raise KernelViewError(
                    f"the symbols of {image.vmlinux or image.system_map} do not match the guest "
                    f"kernel: {name} at {link.runtime(name, koff):#x}, VMCOREINFO says "
                    f"{want:#x} (another build?)"
                )
        base_layout = KernelLayout(koff, pbase, DEFAULT_PAGE_OFFSET[levels or 4], levels or 4,
                                   source, info.osrelease if info else "")
        if symbols is not None:
            pass
        elif link is not None:
            symbols = link
        elif info is not None:
            image_reader = _ImageReader(memory, base_layout)
            try:
                symbols = decode_kallsyms(image_reader.read, info.symbols)
            except SymbolError as e:
                raise KernelViewError(f"no symbols for the guest kernel: {e}") from e
        else:  # pragma: no cover - excluded above
            raise KernelViewError("no symbols for the guest kernel")
        view = cls(memory, btf, symbols, base_layout, info)
        view._finish_layout(levels)
        return view

    def _finish_layout(self, levels: int | None) -> None:
        lay = self.layout
        if levels is None:
            if "__pgtable_l5_enabled" in self.symbols:
                levels = 5 if self._u32(self.symbol("__pgtable_l5_enabled")) else 4
            else:
                levels = 4
        pob = DEFAULT_PAGE_OFFSET[levels]
        if "page_offset_base" in self.symbols:
            pob = self._u64(self.symbol("page_offset_base"))
        self.layout = KernelLayout(lay.kaslr_offset, lay.phys_base, pob, levels, lay.source,
                                   lay.osrelease)
        comm = self.read_string(self.symbol("init_task") + self._task.off("comm"), 16)
        if not comm.startswith("swapper"):
            raise KernelViewError(
                f"init_task.comm reads {comm!r}, not 'swapper...': the kernel image or the "
                f"KASLR offset ({lay.kaslr_offset:#x}, from {lay.source}) does not match the guest"
            )
        if not self.layout.osrelease and "linux_banner" in self.symbols:
            # no VMCOREINFO (placed by the vmlinux's symbols): the release from the banner
            try:
                banner = self.read_string(self.symbol("linux_banner"), 200)
            except Exception:
                banner = ""
            words = banner.split()
            if len(words) >= 3 and words[:2] == ["Linux", "version"]:
                self.layout = replace(self.layout, osrelease=words[2])

    # -- addresses ------------------------------------------------------------------------

    def symbol(self, name: str) -> int:
        """Runtime address of a kernel symbol (per-CPU symbols: their per-CPU offset)."""
        try:
            return self.symbols.runtime(name, self.layout.kaslr_offset)
        except SymbolError:
            if name in self._percpu_btf:
                return self._percpu_btf[name]
            raise

    @property
    def _percpu_btf(self) -> dict[str, int]:
        cached = getattr(self, "_percpu_cache", None)
        if cached is None:
            cached = {k: v[0] for k, v in self.btf.datasec_vars(".data..percpu").items()}
            self._percpu_cache = cached
        return cached

    @property
    def walker(self) -> PageTableWalker:
        if self._walker is None:
            self._walker = PageTableWalker(self.memory.read, levels=self.layout.levels,
                                           ram_size=self.memory.size)
        return self._walker

    @property
    def kernel_pgd_phys(self) -> int:
        """Physical address of the kernel's own top page table (init_top_pgt)."""
        for name in ("init_top_pgt", "swapper_pg_dir"):
            if name in self.symbols:
                return self._image_phys(self.symbol(name))
        raise KernelViewError("no init_top_pgt/swapper_pg_dir symbol")

    def _image_phys(self, va: int) -> int:
        return (va - START_KERNEL_MAP + self.layout.phys_base) & _U64

    def virt_to_phys(self, va: int) -> int:
        """Physical address of a kernel virtual address."""
        lay = self.layout
        if va >= START_KERNEL_MAP:
            return self._image_phys(va)
        d = va - lay.page_offset_base
        if 0 <= d < self.memory.size:
            return d
        try:
            tr = self.walker.translate(self.kernel_pgd_phys, va)
        except PageTableError as e:
            raise KernelViewError(f"cannot translate kernel address {va:#x}: {e}") from e
        if tr.phys is None:
            raise KernelViewError(f"kernel address {va:#x} is not mapped")
        return tr.phys

    def read(self, va: int, length: int) -> bytes:
        """Bytes at a kernel virtual address (split at page boundaries outside linear maps)."""
        lay = self.layout
        if va >= START_KERNEL_MAP or 0 <= va - lay.page_offset_base < self.memory.size:
            try:
                return self.memory.read(self.virt_to_phys(va), length)
            except TestbedError as e:
                raise KernelViewError(f"cannot read {length} bytes at {va:#x}: {e}") from e
        out = bytearray()
        pos = va
        while len(out) < length:
            n = min(4096 - (pos & 0xFFF), length - len(out))
            out += self.memory.read(self.virt_to_phys(pos), n)
            pos += n
        return bytes(out)

    def _u64(self, va: int) -> int:
        return int.from_bytes(self.read(va, 8), "little")

    def _u32(self, va: int) -> int:
        return int.from_bytes(self.read(va, 4), "little")

    def read_string(self, va: int, maxlen: int) -> str:
        data = self.read(va, maxlen)
        nul = data.find(b"\0")
        return data[: nul if nul >= 0 else None].decode("utf-8", "replace")

    def read_member(self, address: int, struct_name: str, path: str) -> int:
        """An integer/pointer member of a struct at ``address`` (``"mm_struct", "pgd"``)."""
        lay = self._member_layouts.get((struct_name, path))
        if lay is None:
            lay = self._member_layouts[struct_name, path] = _Layout(self.btf, struct_name, [path])
        f = lay.fields[path]
        return lay.get(self.read(address + f.offset, f.size), path, -f.offset)

    # -- CPUs ---------------------------------------------------------------------------

    @property
    def nr_cpus(self) -> int:
        """``nr_cpu_ids``: CPU numbers are 0..nr_cpus-1."""
        if self._nr_cpu_ids is None:
            self._nr_cpu_ids = self._u32(self.symbol("nr_cpu_ids"))
            if not 0 < self._nr_cpu_ids <= 8192:
                raise KernelViewError(f"nr_cpu_ids reads {self._nr_cpu_ids}")
        return self._nr_cpu_ids

    def online_cpus(self) -> frozenset[int]:
        nbytes = (self.nr_cpus + 63) // 64 * 8
        return _bits(self.read(self.symbol("__cpu_online_mask"), nbytes), self.nr_cpus)

    def per_cpu_offset(self, cpu: int) -> int:
        if self._per_cpu_offsets is None:
            n = self.nr_cpus
            self._per_cpu_offsets = struct.unpack(
                f"<{n}Q", self.read(self.symbol("__per_cpu_offset"), 8 * n))
        if not 0 <= cpu < len(self._per_cpu_offsets):
            raise KernelViewError(f"CPU {cpu} out of range (nr_cpu_ids {self.nr_cpus})")
        return self._per_cpu_offsets[cpu]

    def per_cpu(self, name: str, cpu: int) -> int:
        """Address of CPU ``cpu``'s instance of the per-CPU variable ``name``."""
        return (self.symbol(name) + self.per_cpu_offset(cpu)) & 0xFFFF_FFFF_FFFF_FFFF

    def current_task(self, cpu: int) -> int | None:
        """The task_struct address current on ``cpu`` (None if the kernel has no such var)."""
        for name, off in (("current_task", 0), ("pcpu_hot", None)):
            if name not in self.symbols and name not in self._percpu_btf:
                continue
            if off is None:
                off = self.btf.offsetof("struct pcpu_hot", "current_task")
            return self._u64(self.per_cpu(name, cpu) + off) or None
        return None

    def _currents(self) -> dict[int, int | None]:
        if self._current is None:
            self._current = {c: self.current_task(c) for c in range(self.nr_cpus)}
        return self._current

    def cpu_tlbstate(self, cpu: int) -> CpuTlbState:
        lay = self._tlb
        buf = self.read(self.per_cpu("cpu_tlbstate", cpu), lay.size)
        ctxs_off = lay.off("ctxs")
        ctxs = tuple(
            TlbContext(
                int.from_bytes(buf[o + self._ctx_id : o + self._ctx_id + 8], "little"),
                int.from_bytes(buf[o + self._ctx_gen : o + self._ctx_gen + 8], "little"),
            )
            for o in (ctxs_off + i * self._ctx_size for i in range(self._nr_ctxs))
        )
        if lay.has("is_lazy"):
            lazy: bool | None = bool(lay.get(buf, "is_lazy"))
        elif "cpu_tlbstate_shared" in self.symbols or "cpu_tlbstate_shared" in self._percpu_btf:
            off = self.btf.offsetof("struct tlb_state_shared", "is_lazy")
            lazy = bool(self.read(self.per_cpu("cpu_tlbstate_shared", cpu) + off, 1)[0])
        else:
            lazy = None
        return CpuTlbState(
            cpu=cpu,
            loaded_mm=lay.get(buf, "loaded_mm"),
            loaded_mm_asid=lay.get(buf, "loaded_mm_asid"),
            next_asid=lay.get(buf, "next_asid") if lay.has("next_asid") else -1,
            is_lazy=lazy,
            ctxs=ctxs,
            current_task=self.current_task(cpu),
        )

    # -- tasks ------------------------------------------------------------------------------

    def _list(self, head: int, member_off: int, limit: int = 1 << 20) -> Iterator[int]:
        """Addresses of the containers on a circular ``list_head`` at ``head``."""
        pos = self._u64(head)
        n = 0
        while pos != head:
            if n >= limit:
                raise KernelViewError(f"list at {head:#x} has more than {limit} entries (loop?)")
            if pos == 0:
                raise KernelViewError(f"NULL next pointer in list at {head:#x}")
            yield pos - member_off
            pos = self._u64(pos)
            n += 1

    def task(self, address: int) -> Task:
        """Decode the task_struct at ``address``."""
        lay = self._task
        buf = self.read(address, lay.size)
        state = lay.get(buf, self._state_path)
        exit_state = lay.get(buf, "exit_state")
        running = [c for c, cur in self._currents().items() if cur == address]
        comm = lay.bytes_of(buf, "comm")
        return Task(
            address=address,
            pid=lay.get(buf, "pid"),
            tgid=lay.get(buf, "tgid"),
            comm=comm[: comm.find(b"\0") if b"\0" in comm else None].decode("utf-8", "replace"),
            cpu=lay.get(buf, self._cpu_path) if lay.has(self._cpu_path) else 0,
            state=state,
            exit_state=exit_state,
            state_char=_state_char(state, exit_state),
            flags=lay.get(buf, "flags"),
            on_cpu=bool(lay.get(buf, "on_cpu")) if lay.has("on_cpu") else bool(running),
            running_on=running[0] if running else None,
            pkru=lay.get(buf, "thread.pkru"),
            mm=lay.get(buf, "mm"),
            active_mm=lay.get(buf, "active_mm"),
            group_leader=lay.get(buf, "group_leader"),
        )

    def task_addresses(self) -> list[int]:
        """Every thread: init_task's ``tasks`` list (group leaders), each one's thread group,
        then any CPU's current task not seen (idle tasks of other CPUs)."""
        lay = self._task
        init = self.symbol("init_task")
        leaders = [init, *self._list(init + lay.off("tasks"), lay.off("tasks"))]
        out: list[int] = []
        seen: set[int] = set()
        for leader in leaders:
            for t in [leader, *self._threads_of(leader)]:
                if t not in seen:
                    seen.add(t)
                    out.append(t)
        for cur in [*self._currents().values(), *self._idle_tasks()]:
            if cur is not None and cur not in seen:
                seen.add(cur)
                out.append(cur)
        return out

    def _idle_tasks(self) -> list[int]:
        """Each CPU's idle task (``runqueues.idle``); empty if the kernel lacks either."""
        if "runqueues" not in self.symbols and "runqueues" not in self._percpu_btf:
            return []
        try:
            off = self.btf.offsetof("struct rq", "idle")
        except BtfError:
            return []
        return [self._u64(self.per_cpu("runqueues", c) + off) for c in range(self.nr_cpus)]

    @property
    def pti(self) -> bool:
        """Page-table isolation on (X86_FEATURE_PTI in boot_cpu_data): each mm's user-mode
        top table is the page after ``mm->pgd`` (:attr:`Mm.user_pgd_phys`)."""
        if self._pti is None:
            try:
                off = self.btf.offsetof("struct cpuinfo_x86", "x86_capability[7]")
                word = self._u32(self.symbol("boot_cpu_data") + off)
                self._pti = bool(word >> 11 & 1)  # X86_FEATURE_PTI = 7*32 + 11
            except (BtfError, SymbolError):
                self._pti = False
        return self._pti

    def _threads_of(self, leader: int) -> Iterator[int]:
        lay = self._task
        if lay.has("thread_group"):
            off = lay.off("thread_group")
            yield from self._list(leader + off, off)
        elif lay.has("thread_node") and lay.has("signal"):
            sig = self._u64(leader + lay.off("signal"))
            if sig:
                head = sig + self.btf.offsetof("struct signal_struct", "thread_head")
                for t in self._list(head, lay.off("thread_node")):
                    if t != leader:
                        yield t

    def tasks(self) -> list[Task]:
        """All threads (pid 0 idle tasks included), decoded."""
        self._current = None  # re-read per call: the guest may have run since
        return [self.task(a) for a in self.task_addresses()]

    def find_tasks(self, pid: int | None = None, comm: str | None = None) -> list[Task]:
        return [t for t in self.tasks()
                if (pid is None or t.pid == pid) and (comm is None or t.comm == comm)]

    # -- mm ---------------------------------------------------------------------------------

    @property
    def init_mm(self) -> int:
        return self.symbol("init_mm")

    def mm(self, task_or_mm: Task | int, *, active: bool = False) -> Mm | None:
        """The mm of a task (``active``: its active_mm, for kernel threads), or of an address."""
        if isinstance(task_or_mm, Task):
            addr = task_or_mm.active_mm if active else task_or_mm.mm
        else:
            addr = task_or_mm
        if not addr:
            return None
        lay = self._mm
        buf = self.read(addr, lay.size)
        pgd = lay.get(buf, "pgd")
        if lay.has("cpu_bitmap"):
            nbytes = (self.nr_cpus + 63) // 64 * 8
            cpus = _bits(self.read(addr + lay.off("cpu_bitmap"), nbytes), self.nr_cpus)
        else:
            cpus = frozenset()
        return Mm(
            address=addr,
            pgd=pgd,
            pgd_phys=self.virt_to_phys(pgd),
            ctx_id=lay.get(buf, "context.ctx_id"),
            tlb_gen=lay.get(buf, "context.tlb_gen"),
            cpumask=cpus,
            users=lay.get(buf, "mm_users") if lay.has("mm_users") else -1,
            count=lay.get(buf, "mm_count") if lay.has("mm_count") else -1,
            pti=self.pti,
        )


class _ImageReader:
    """Reads of kernel-image addresses before the view exists (kallsyms decoding)."""

    def __init__(self, memory: _Memory, layout: KernelLayout) -> None:
        self.memory = memory
        self.layout = layout

    def read(self, va: int, length: int) -> bytes:
        if not is_image_address(va):
            raise KernelViewError(f"{va:#x} is not a kernel-image address")
        return self.memory.read((va - START_KERNEL_MAP + self.layout.phys_base) & _U64, length)


def _probe_banner(memory: _Memory, link: SymbolTable, cr3: int | None, koff: int | None,
                  levels: int | None) -> tuple[int, int, int | None]:
    """(kaslr offset, phys_base, levels) from where linux_banner is mapped."""
    if "linux_banner" not in link:
        raise KernelViewError("no VMCOREINFO in guest RAM and no linux_banner symbol")
    banner = link.address("linux_banner")
    if cr3 is None:
        if koff is None:
            koff = 0
        from testbed.snapshot.vmcoreinfo import find_banner

        hits = find_banner(memory)
        for p in hits:
            pbase = p - (banner + koff - START_KERNEL_MAP)
            if pbase >= -(1 << 40):
                return koff, pbase, levels
        raise KernelViewError("no VMCOREINFO and no linux_banner in guest RAM")
    root = kernel_root(cr3)
    for lv in ([levels] if levels else [5, 4]):
        walker = PageTableWalker(memory.read, levels=lv, ram_size=memory.size)
        cands = [koff] if koff is not None else range(0, KERNEL_IMAGE_SIZE, KASLR_ALIGN)
        for k in cands:
            va = banner + k
            if va >= 1 << 64:
                break
            try:
                phys = walker.translate(root, va).phys
            except PageTableError:
                break  # wrong depth or a bad root: try the other depth
            if phys is not None and memory.read(phys, 14) == b"Linux version ":
                return k, phys - (va - START_KERNEL_MAP), lv
    raise KernelViewError(
        f"linux_banner not found through CR3 {cr3:#x} in the 1 GiB kernel window "
        "(wrong symbols for this guest kernel?)"
    )
