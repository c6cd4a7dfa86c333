"""Build the static C programs of guest/ that run inside the guest.

Every guest/*.c becomes a static-pie binary `tb-<name>`, linked with all of
guest/lib/*.c. A source that contains the string TESTBED_RPAL_SERVICE gets
the RPAL opt-in marker written into its ELF header (e_ident bytes 12..15).
Output is cached by a hash of the sources, the compiler and the flags.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from testbed import paths
from testbed.errors import BuildError

CFLAGS = ["-static-pie", "-O2", "-g", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"]
RPAL_SOURCE_MARK = b"TESTBED_RPAL_SERVICE"
RPAL_ELF_MARK = b"RPAL"
CC = os.environ.get("TESTBED_CC", "gcc")


@dataclass(frozen=True)
class GuestPrograms:
    directory: Path
    programs: dict[str, Path]  # name in the guest (tb-...) -> host path


def stamp_rpal(elf: bytes) -> bytes:
    """Return `elf` with e_ident[12..15] = "RPAL" (the RPAL opt-in marker). Pure."""
    if elf[:4] != b"\x7fELF" or len(elf) < 16:
        raise BuildError("cannot stamp RPAL marker: not an ELF file")
    if elf[12:16] not in (b"\0\0\0\0", RPAL_ELF_MARK):
        raise BuildError("cannot stamp RPAL marker: e_ident padding bytes are already in use")
    return elf[:12] + RPAL_ELF_MARK + elf[16:]


def _compiler_id() -> str:
    try:
        return subprocess.run([CC, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"C compiler {CC!r} not usable ({exc}); run `testbed setup`") from exc


def _sources(guest_dir: Path) -> tuple[list[Path], list[Path], list[Path]]:
    mains = sorted(guest_dir.glob("*.c"))
    lib = sorted((guest_dir / "lib").glob("*.c"))
    headers = sorted(guest_dir.rglob("*.h"))
    return mains, lib, headers


def cache_key(guest_dir: Path) -> str:
    mains, lib, headers = _sources(guest_dir)
    h = hashlib.sha256()
    h.update(_compiler_id().encode())
    h.update(" ".join(CFLAGS).encode())
    for f in [*mains, *lib, *headers]:
        h.update(str(f.relative_to(guest_dir)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:20]


def build(guest_dir: Path | None = None) -> GuestPrograms:
    """Compile (or take from the cache) every guest program."""
    guest_dir = guest_dir or paths.GUEST_DIR
    mains, lib, _ = _sources(guest_dir)
    key = cache_key(guest_dir)
    out = paths.cache_dir() / "guest" / key
    programs = {f"tb-{m.stem}": out / f"tb-{m.stem}" for m in mains}
    if out.is_dir() and all(p.exists() for p in programs.values()):
        return GuestPrograms(out, programs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=out.parent))
    for m in mains:
        target = tmp / f"tb-{m.stem}"
        cmd = [CC, *CFLAGS, f"-I{guest_dir / 'lib'}", "-o", str(target), str(m), *map(str, lib)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            first = next(
                (ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr.strip()[:200]
            )
            raise BuildError(f"guest program {m.name} does not compile: {first}")
        if RPAL_SOURCE_MARK in m.read_bytes():
            target.write_bytes(stamp_rpal(target.read_bytes()))
    try:
        tmp.rename(out)
    except OSError:  # built concurrently by another run: theirs is as good as ours
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return GuestPrograms(out, programs)
