"""Guest physical memory: one small interface, three sources.

* :class:`SharedFileMemory`: the live RAM file of a guest started with
  ``-object memory-backend-file,...,mem-path=/dev/shm/NAME,share=on``, read
  through a host mmap (the fast path; ~0.2 us for 4 KiB).
* :class:`PmemsaveMemory`: QMP ``pmemsave`` into a temporary file, through
  any callable that runs a QMP command (works on every QEMU; ~0.7 ms a page);
  :func:`pmemsave_read` is the asyncio version for a ``qemu.qmp.QMPClient``.
* :class:`ElfDumpMemory`: an offline ELF core from ``dump-guest-memory``,
  read with pyelftools through its PT_LOAD segments (``p_paddr``).

All three have ``read(phys, length) -> bytes``, ``size`` (the first guest
physical address past the end of RAM) and ``ranges`` (the RAM ranges as
``(start, end)`` pairs). Reads outside RAM, including the PCI hole below
4 GiB when RAM continues above it, raise :class:`PhysMemError` (a
TestbedError).

Layout of the RAM file on QEMU's ``pc`` machine: the first ``lowmem`` bytes
are guest physical [0, lowmem), the rest sits at [4 GiB, 4 GiB + rest).
``lowmem`` is the whole RAM below 3.5 GiB (pc, i440fx) and 3 GiB otherwise;
q35 splits at 2 GiB above 2.75 GiB of RAM. Pass ``lowmem`` explicitly for
anything else (``max-ram-below-4g``). The legacy VGA/BIOS window
0xA0000-0xFFFFF reads the RAM underneath (what the guest sees there is
device memory).
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

from testbed.errors import TestbedError

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

GiB = 1 << 30
FOUR_GIB = 4 * GiB


class PhysMemError(TestbedError):
    """A guest-physical read outside RAM, or a source that cannot be read."""


@runtime_checkable
class PhysMem(Protocol):
    """Guest physical memory, read-only."""

    @property
    def size(self) -> int:
        """First guest physical address past the end of RAM."""
        ...

    @property
    def ranges(self) -> Sequence[tuple[int, int]]:
        """RAM as sorted, non-overlapping (start, end) guest-physical ranges."""
        ...

    def read(self, phys: int, length: int) -> bytes: ...


def pc_lowmem(ram_size: int, machine: str = "pc") -> int:
    """RAM below 4 GiB on QEMU's x86 machines (default ``max-ram-below-4g``)."""
    if machine.startswith(("q35", "pc-q35")):
        return 2 * GiB if ram_size >= 0xB000_0000 else ram_size
    return 3 * GiB if ram_size >= 0xE000_0000 else ram_size


def pc_ram_ranges(ram_size: int, lowmem: int | None = None) -> list[tuple[int, int, int]]:
    """(guest start, guest end, offset in the RAM file) for a pc-style RAM layout."""
    low = pc_lowmem(ram_size) if lowmem is None else min(lowmem, ram_size)
    out = [(0, low, 0)]
    if ram_size > low:
        out.append((FOUR_GIB, FOUR_GIB + ram_size - low, low))
    return out


class _Mapped:
    """Shared bounds checking over (guest start, guest end, offset) ranges."""

    def __init__(self, layout: Sequence[tuple[int, int, int]], what: str) -> None:
        self._layout = sorted(layout)
        self._starts = [s for s, _, _ in self._layout]
        self._what = what

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(s, e) for s, e, _ in self._layout]

    @property
    def size(self) -> int:
        return self._layout[-1][1] if self._layout else 0

    def _error(self, phys: int, length: int, bad: int) -> PhysMemError:
        ram = ", ".join(f"{s:#x}-{e:#x}" for s, e, _ in self._layout)
        return PhysMemError(
            f"guest-physical read of {length} bytes at {phys:#x} is outside RAM of "
            f"{self._what} (first bad address {bad:#x}; RAM: {ram})"
        )

    def _locate(self, phys: int, length: int) -> int:
        """Offset in the backing of [phys, phys + length), which must lie in one range."""
        if phys < 0 or length < 0:
            raise PhysMemError(f"bad guest-physical read: {length} bytes at {phys:#x}")
        i = bisect.bisect_right(self._starts, phys) - 1
        if i >= 0:
            start, end, off = self._layout[i]
            if phys + length <= end and (phys < end or length == 0 and phys == end):
                return off + (phys - start)
            if phys < end:
                raise self._error(phys, length, end)
        raise self._error(phys, length, phys)

    def _split(self, phys: int, length: int) -> list[tuple[int, int]]:
        """(phys, length) pieces of a read, one per range it touches (all must be RAM)."""
        if phys < 0 or length < 0:
            raise PhysMemError(f"bad guest-physical read: {length} bytes at {phys:#x}")
        pieces = []
        p, left = phys, length
        while left > 0:
            i = bisect.bisect_right(self._starts, p) - 1
            if i < 0 or p >= self._layout[i][1]:
                raise self._error(phys, length, p)
            n = min(left, self._layout[i][1] - p)
            pieces.append((p, n))
            p += n
            left -= n
        return pieces


class SharedFileMemory(_Mapped):
    """The live RAM file of a guest (``memory-backend-file,share=on``) through mmap.

    Reads see the guest's memory at the moment of the read: pause the guest
    for a consistent view. ``close()`` (or use as a context manager) unmaps.
    """

    def __init__(self, path: str | os.PathLike[str], *, lowmem: int | None = None) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise PhysMemError(f"cannot open guest RAM file {self.path}: {e.strerror}") from e
        try:
            file_size = os.fstat(fd).st_size
            if file_size == 0:
                raise PhysMemError(f"guest RAM file {self.path} is empty")
            self._mm = mmap.mmap(fd, file_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.file_size = file_size
        super().__init__(pc_ram_ranges(file_size, lowmem), str(self.path))

    def read(self, phys: int, length: int) -> bytes:
        out = []
        for p, n in self._split(phys, length) if length else [(phys, 0)]:
            off = self._locate(p, n)
            out.append(self._mm[off : off + n])
        return b"".join(out)

    def close(self) -> None:
        self._mm.close()


QmpRun = Callable[[str, Mapping[str, Any]], Any]
"""Runs one QMP command and returns its ``return`` value (raising on error)."""


def _check_ranges(ranges: Sequence[tuple[int, int]], phys: int, length: int, what: str) -> None:
    layout = [(s, e, s) for s, e in ranges]
    _Mapped(layout, what)._split(phys, length)


class PmemsaveMemory:
    """Guest memory read with QMP ``pmemsave`` into a temporary file.

    ``run(command, arguments)`` runs one QMP command synchronously and returns
    its result (for example ``lambda c, a: qmp_legacy.cmd_obj(...)`` or the
    machine layer's own helper). ``ram_size`` defaults to QMP
    ``query-memory-size-summary``. QEMU writes the file, so ``tmpdir`` must
    be reachable by the QEMU process (same host; /dev/shm is fastest).
    """

    def __init__(
        self,
        run: QmpRun,
        *,
        ram_size: int | None = None,
        lowmem: int | None = None,
        tmpdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._run = run
        if ram_size is None:
            summary = run("query-memory-size-summary", {})
            ram_size = int(summary["base-memory"])
        self._ranges = [(s, e) for s, e, _ in pc_ram_ranges(ram_size, lowmem)]
        self._tmpdir = tmpdir

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    @property
    def size(self) -> int:
        return self._ranges[-1][1]

    def read(self, phys: int, length: int) -> bytes:
        _check_ranges(self._ranges, phys, length, "the QEMU guest")
        if length == 0:
            return b""
        with _pmemsave_file(phys, length, self._tmpdir) as (name, result):
            try:
                self._run("pmemsave", {"val": phys, "size": length, "filename": name})
            except TestbedError:
                raise
            except Exception as e:
                raise PhysMemError(
                    f"QMP pmemsave of {length} bytes at {phys:#x} failed: {e}"
                ) from e
        return result[0]


@contextlib.contextmanager
def _pmemsave_file(
    phys: int, length: int, tmpdir: str | os.PathLike[str] | None
) -> Iterator[tuple[str, list[bytes]]]:
    """A temporary file for QEMU to pmemsave into; on exit its bytes (checked) land in the list."""
    fd, name = tempfile.mkstemp(prefix="testbed-pmem-", dir=tmpdir)
    os.close(fd)
    result: list[bytes] = []
    try:
        yield name, result
        data = Path(name).read_bytes()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    if len(data) != length:
        raise PhysMemError(f"pmemsave at {phys:#x} wrote {len(data)} bytes, not {length}")
    result.append(data)


async def pmemsave_read(
    qmp: QMPClient,
    phys: int,
    length: int,
    *,
    ram_size: int | None = None,
    tmpdir: str | os.PathLike[str] | None = None,
) -> bytes:
    """Read guest memory with QMP ``pmemsave`` through an asyncio ``QMPClient``."""
    if ram_size is None:
        summary = await qmp.execute("query-memory-size-summary")
        assert isinstance(summary, dict)
        ram_size = int(summary["base-memory"])
    _check_ranges([(s, e) for s, e, _ in pc_ram_ranges(ram_size)], phys, length, "the QEMU guest")
    with _pmemsave_file(phys, length, tmpdir) as (name, result):
        await qmp.execute("pmemsave", {"val": phys, "size": length, "filename": name})
    return result[0]


class ElfDumpMemory(_Mapped):
    """Guest memory from an ELF ``dump-guest-memory`` file (PT_LOAD segments by p_paddr).

    Bytes of a segment beyond its ``p_filesz`` (up to ``p_memsz``) read as zeros.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile

        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 - kept open for reads
        except OSError as e:
            raise PhysMemError(f"cannot open guest dump {self.path}: {e.strerror}") from e
        try:
            elf = ELFFile(self._f)
            segs = [
                (s["p_paddr"], s["p_paddr"] + s["p_memsz"], s["p_offset"], s["p_filesz"])
                for s in elf.iter_segments()
                if s["p_type"] == "PT_LOAD" and s["p_memsz"] > 0
            ]
        except (ELFError, ValueError, OSError) as e:
            self._f.close()
            raise PhysMemError(f"{self.path} is not a readable ELF dump: {e}") from e
        if not segs:
            self._f.close()
            raise PhysMemError(f"ELF dump {self.path} has no PT_LOAD segments")
        segs.sort()
        for (_, e1, _, _), (s2, _, _, _) in zip(segs, segs[1:], strict=False):
            if s2 < e1:
                self._f.close()
                raise PhysMemError(f"ELF dump {self.path}: PT_LOAD segments overlap at {s2:#x}")
        self._filesz = {s: fs for s, _, _, fs in segs}
        self.file_size = os.fstat(self._f.fileno()).st_size
        for s, _, off, fs in segs:
            if off + fs > self.file_size:
                self._f.close()
                raise PhysMemError(
                    f"ELF dump {self.path} is truncated: segment at paddr {s:#x} needs "
                    f"file bytes up to {off + fs:#x}, file has {self.file_size:#x}"
                )
        super().__init__([(s, e, off) for s, e, off, _ in segs], str(self.path))

    def read(self, phys: int, length: int) -> bytes:
        out = []
        for p, n in self._split(phys, length) if length else [(phys, 0)]:
            off = self._locate(p, n)
            i = bisect.bisect_right(self._starts, p) - 1
            start, _, seg_off = self._layout[i]
            in_file = max(0, min(n, seg_off + self._filesz[start] - off))
            chunk = os.pread(self._f.fileno(), in_file, off) if in_file else b""
            out.append(chunk + bytes(n - in_file))
        return b"".join(out)

    def close(self) -> None:
        self._f.close()
