"""A reproducible writer for the "newc" cpio format the kernel unpacks as initramfs.

Pure functions over in-memory entries. Written by hand (about 60 lines)
rather than driving GNU cpio because the image must be byte-identical for
identical inputs and must hold device nodes and root-owned files without
running as root: every header field (inode, owner, time) is chosen here.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One file in the archive. `path` has no leading slash."""

    path: str
    mode: int  # full st_mode: type bits | permission bits
    data: bytes = b""  # file content, or symlink target
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes

    @staticmethod
    def dir(path: str, perm: int = 0o755) -> Entry:
        return Entry(path.strip("/"), stat.S_IFDIR | perm)

    @staticmethod
    def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
        return Entry(path.strip("/"), stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(path: str, target: str) -> Entry:
        return Entry(path.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return Entry(path.strip("/"), stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, e: Entry, namesize: int) -> bytes:
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], namesize, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """Add the missing parent directories (mode 0755) of every entry."""
    by_path = {e.path: e for e in entries}
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            by_path.setdefault(parent, Entry.dir(parent))
    return list(by_path.values())


def archive(entries: Iterable[Entry]) -> bytes:
    """The newc archive of `entries`: sorted by path, parents first, fixed metadata.

    Later entries with the same path replace earlier ones.
    """
    by_path: dict[str, Entry] = {}
    for e in with_parents(entries):
        if not e.path or e.path.startswith("/") or ".." in e.path.split("/"):
            raise ValueError(f"bad initramfs path {e.path!r}")
        by_path[e.path] = e
    out = bytearray()
    for ino, path in enumerate(sorted(by_path), start=1):
        e = by_path[path]
        name = path.encode() + b"\0"
        out += _header(ino, e, len(name)) + name
        out += _pad4(110 + len(name))
        out += e.data + _pad4(len(e.data))
    name = TRAILER.encode() + b"\0"
    out += _header(0, Entry("", 0), len(name)) + name + _pad4(110 + len(name))
    return bytes(out)
