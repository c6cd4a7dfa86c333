"""The kernel's own description of itself, from files on the host: BTF, symbols, release.

:class:`KernelImage` gathers what :mod:`testbed.snapshot.kernel` needs about a
kernel build: its BTF (types) and, when there is one, a link-time symbol
table. Sources, best first:

* a vmlinux ELF (kernels we build: ``.BTF`` section and ``.symtab``);
* a bzImage: the compressed payload is the (stripped) vmlinux ELF, which
  still carries ``.BTF``; its symbols then come from System.map when it is
  real, otherwise from kallsyms in guest memory (Debian's case, see
  :mod:`testbed.snapshot.symbols`).

Extracting Debian's xz payload takes about 1.5 s, so the BTF blob found in a
bzImage is cached under ``<cache>/btf/<sha256 of the bzImage>.btf``.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from testbed.errors import TestbedError
from testbed.snapshot.btf import Btf, BtfError, btf_from_elf
from testbed.snapshot.symbols import SymbolError, SymbolTable, load_elf_symbols, load_system_map

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x7fELF", "none"),
)


class KernelImageError(TestbedError):
    """A kernel file we cannot get types or symbols from."""


def bzimage_payload(data: bytes) -> tuple[str, bytes]:
    """(compression, compressed payload) of a bzImage (boot protocol >= 2.08)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise KernelImageError("not a bzImage (no 'HdrS' boot header)")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < 0x208:
        raise KernelImageError(f"bzImage boot protocol {version >> 8}.{version & 0xFF} < 2.08 "
                               "has no payload fields")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    if len(payload) != payload_length:
        raise KernelImageError("bzImage payload runs past the end of the file")
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name, payload
    raise KernelImageError(f"unknown bzImage payload compression (magic {payload[:6].hex()})")


def decompress_payload(kind: str, payload: bytes) -> bytes:
    """The vmlinux ELF inside a bzImage payload."""
    if kind == "none":
        return payload
    if kind == "gzip":
        return zlib.decompressobj(wbits=31).decompress(payload)  # ignores the size trailer
    if kind in ("xz", "lzma"):
        fmt = lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
        return lzma.LZMADecompressor(format=fmt).decompress(payload)
    if kind == "bzip2":
        import bz2

        return bz2.BZ2Decompressor().decompress(payload)
    if kind == "zstd":
        try:
            import zstandard

            return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(payload))
        except ImportError:
            pass
    tool = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"], "lzo": ["lzop", "-dcq"]}[kind]
    if shutil.which(tool[0]) is None:
        hint = " or the Python package zstandard" if kind == "zstd" else ""
        raise KernelImageError(f"bzImage payload is {kind}-compressed: install {tool[0]}{hint}")
    res = subprocess.run(tool, input=payload, capture_output=True)
    if not res.stdout.startswith(b"\x7fELF"):
        raise KernelImageError(f"{tool[0]} could not decompress the bzImage payload: "
                               f"{res.stderr.decode(errors='replace').strip()[:200]}")
    return res.stdout


def vmlinux_from_bzimage(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KernelImageError(f"cannot read kernel {path}: {e.strerror}") from e
    kind, payload = bzimage_payload(data)
    try:
        elf = decompress_payload(kind, payload)
    except (OSError, lzma.LZMAError, zlib.error, EOFError, ValueError) as e:
        raise KernelImageError(f"cannot decompress the {kind} payload of {path}: {e}") from e
    if not elf.startswith(b"\x7fELF"):
        raise KernelImageError(f"{path}: the bzImage payload is not an ELF file")
    return elf


def _default_cache() -> Path:
    from testbed import paths

    return paths.cache_dir() / "btf"


def btf_blob_of(kernel: Path, cache: Path | None = None) -> bytes:
    """The BTF blob of a vmlinux ELF or a bzImage (cached for bzImages)."""
    with open(kernel, "rb") as f:
        head = f.read(4)
    if head == b"\x7fELF":
        return btf_from_elf(str(kernel))
    digest = hashlib.sha256(kernel.read_bytes()).hexdigest()
    cdir = cache if cache is not None else _default_cache()
    cached = cdir / f"{digest}.btf"
    if cached.is_file():
        return cached.read_bytes()
    blob = btf_from_elf(vmlinux_from_bzimage(kernel))
    cdir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{id(blob)}")
    tmp.write_bytes(blob)
    tmp.replace(cached)
    return blob


@dataclass
class KernelImage:
    """Types and link-time symbols of one kernel build.

    ``kernel``: a vmlinux ELF or bzImage (for BTF); ``vmlinux``: the ELF with
    symbols when it is separate; ``system_map``: System.map. Anything not
    given is looked for next to ``kernel`` (``vmlinux``, ``System.map`` in
    the same folder: the layout of the testbed's kernel cache).
    """

    kernel: Path | None = None
    vmlinux: Path | None = None
    system_map: Path | None = None
    btf_blob: bytes | None = field(default=None, repr=False)
    cache: Path | None = None

    @classmethod
    def from_paths(cls, kernel: str | Path | None = None, *, vmlinux: str | Path | None = None,
                   system_map: str | Path | None = None) -> KernelImage:
        k = Path(kernel) if kernel is not None else None
        v = Path(vmlinux) if vmlinux is not None else None
        s = Path(system_map) if system_map is not None else None
        if k is not None and v is None:
            if k.read_bytes()[:4] == b"\x7fELF" if k.is_file() else False:
                v = k
            elif (k.parent / "vmlinux").is_file():
                v = k.parent / "vmlinux"
        if s is None and k is not None:
            for cand in (k.parent / "System.map",
                         k.parent / k.name.replace("vmlinuz", "System.map")):
                if cand.is_file() and cand != k:
                    s = cand
                    break
        if k is None and v is None:
            raise KernelImageError("no kernel file given (a vmlinux or bzImage is needed)")
        return cls(kernel=k, vmlinux=v, system_map=s)

    @cached_property
    def btf(self) -> Btf:
        if self.btf_blob is not None:
            return Btf.parse(self.btf_blob)
        errors = []
        for src in (self.vmlinux, self.kernel):
            if src is None:
                continue
            try:
                return Btf.parse(btf_blob_of(src, self.cache))
            except (BtfError, KernelImageError, OSError) as e:
                errors.append(str(e))
        raise KernelImageError("no BTF for the kernel: " + "; ".join(errors))

    @cached_property
    def symbols(self) -> SymbolTable | None:
        """Link-time symbols from System.map (fast: ~0.1 s) or the vmlinux ELF's .symtab
        (pyelftools: ~2.5 s for 70k symbols); None when neither has any."""
        if self.system_map is not None:
            try:
                return load_system_map(self.system_map)
            except SymbolError:
                pass
        if self.vmlinux is not None:
            try:
                return load_elf_symbols(self.vmlinux)
            except SymbolError:
                return None
        return None
