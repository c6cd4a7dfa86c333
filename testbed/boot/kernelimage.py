"""Facts about a kernel image file, read from its x86 boot protocol header. Pure over bytes."""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import TestbedError

SETUP_HEADER_MAGIC = b"HdrS"  # at offset 0x202 of every bzImage since boot protocol 2.00


@dataclass(frozen=True)
class KernelInfo:
    path: Path
    protocol: tuple[int, int]
    version: str  # the full version string, e.g. "6.1.0-56-amd64 (debian-kernel@...) #1 SMP ..."

    @property
    def release(self) -> str:
        """`uname -r` of the kernel, which names its /lib/modules folder."""
        return self.version.split()[0] if self.version else ""


def bzimage_size(data: bytes) -> int:
    """The size a bzImage's boot header says it has: the setup sectors (setup_sects at
    0x1F1, 0 meaning 4) plus the boot sector, then syssize (0x1F4) 16-byte units of
    protected-mode code. A signed image is longer (the signature is appended)."""
    setup_sects = data[0x1F1] or 4
    (syssize,) = struct.unpack_from("<I", data, 0x1F4)
    return (setup_sects + 1) * 512 + syssize * 16


def parse_bzimage(data: bytes, path: Path = Path("<bytes>"), size: int | None = None
                  ) -> KernelInfo:
    """Facts from the head of a bzImage; `size`, the file's length, is checked against
    the header's when given."""
    if len(data) < 0x210 or data[0x202:0x206] != SETUP_HEADER_MAGIC:
        if data[:4] == b"\x7fELF":
            raise TestbedError(
                f"kernel {path} is an ELF file (vmlinux?), not a bzImage: "
                "pass arch/x86/boot/bzImage"
            )
        raise TestbedError(f"kernel {path} is not a bzImage (no 'HdrS' boot header): pass a kernel")
    minor, major = data[0x206], data[0x207]
    if size is not None:
        want = bzimage_size(data)
        if size < want:
            raise TestbedError(f"kernel image {path} truncated: header says {want} bytes, "
                               f"file has {size}: copy or build it again")
    version = ""
    if (major, minor) >= (2, 0):
        (ptr,) = struct.unpack_from("<H", data, 0x20E)
        off = ptr + 0x200
        if 0 < ptr and off < len(data):
            end = data.find(b"\0", off, off + 512)
            version = data[off:end if end >= 0 else off + 512].decode("ascii", "replace")
    return KernelInfo(path, (major, minor), version)


def inspect_kernel(path: Path) -> KernelInfo:
    """Check that `path` is a readable bzImage and read its version."""
    if not path.exists():
        raise TestbedError(f"kernel {path} does not exist: pass --kernel with a bzImage path")
    if not path.is_file():
        raise TestbedError(f"kernel {path} is not a file: pass --kernel with a bzImage path")
    try:
        with open(path, "rb") as f:
            head = f.read(0x10000)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise TestbedError(f"kernel {path} cannot be read: {exc.strerror}") from exc
    return parse_bzimage(head, path, size)


def resolve_kernel(spec: Path | str) -> Path:
    """A --kernel value: a bzImage path, or the key (prefix) of a cached `testbed kernel build`."""
    path = Path(spec)
    if path.exists() or "/" in str(spec):
        return path
    import re

    if re.fullmatch(r"[0-9a-f]{4,}", str(spec)):
        from testbed.build.kernel import load_build

        return load_build(str(spec)).bzimage
    return path


def debian_kernel() -> Path | None:
    """The newest kernel image in /boot (Debian's, installed by `testbed setup`), if any."""
    found = sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key)
    return Path(found[-1]) if found else None


def default_kernel() -> Path:
    """$TESTBED_KERNEL, else the newest Debian kernel image in /boot."""
    env = os.environ.get("TESTBED_KERNEL")
    if env:
        return Path(env)
    found = debian_kernel()
    if found is None:
        raise TestbedError(
            "no kernel in /boot: run `testbed setup` (installs linux-image-amd64) or pass --kernel"
        )
    return found


def _version_key(p: str) -> list[int | str]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]


def modules_dir(info: KernelInfo) -> Path | None:
    """The host's /lib/modules/<release> for this kernel, if it has one."""
    d = Path("/lib/modules") / info.release
    return d if info.release and (d / "modules.dep").exists() else None
