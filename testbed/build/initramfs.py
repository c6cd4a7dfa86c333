"""Build guest initramfs images: busybox, the SSH server, guest programs, init.

The image is a newc cpio archive built in memory from a list of entries,
so the same inputs give the same bytes; it is cached under its content hash.
Per-run secrets (SSH keys) go in a small overlay archive that is appended at
boot, so the cached base image never changes between runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from testbed import paths
from testbed.boot.kernelimage import KernelInfo, modules_dir
from testbed.build import cpio, guestprogs
from testbed.build.cpio import Entry
from testbed.errors import BuildError

READY_MARKER = "testbed-ready"
# On the kernel command line of a recorded run: the guest's init then serves checkpoints
# (/dev/tb-checkpoint) and commands (images/initramfs/cmdport.sh) on ttyS1.
SERIAL_PORTS_PARAM = "testbed.ports=serial"
BUSYBOX = Path(os.environ.get("TESTBED_BUSYBOX", "/bin/busybox"))
DROPBEAR = Path("/usr/sbin/dropbear")
# Modules the guest needs when the kernel has them as modules (Debian's does);
# a kernel of our own has them built in and then none of this is loaded.
DEFAULT_MODULES = (
    "virtio_pci", "virtio_net", "virtio_console", "virtio_rng", "pvpanic_mmio", "pvpanic_pci",
)


@dataclass(frozen=True)
class ImageSpec:
    """What goes into an image, beyond the fixed base."""

    kernel: KernelInfo | None = None
    modules: tuple[str, ...] = DEFAULT_MODULES
    extra_files: Mapping[str, Path] = field(default_factory=dict)  # guest path -> host file
    extra_rc: tuple[str, ...] = ()  # shell lines run at the end of start-up
    guest_programs: bool = True
    hostname: str = "testbed"


@dataclass(frozen=True)
class Image:
    path: Path
    key: str
    modules: tuple[str, ...]  # module files loaded at start-up, in load order


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        msg = f"{what} {path} cannot be read ({exc.strerror}); run `testbed setup`"
        raise BuildError(msg) from exc


def busybox_entries(busybox: Path = BUSYBOX) -> list[Entry]:
    data = _read(busybox, "busybox")
    try:
        listing = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"busybox {busybox} does not run ({exc}); install busybox-static") from exc
    entries = [Entry.file("bin/busybox", data, 0o755)]
    for applet in listing.split():
        if applet != "bin/busybox":
            entries.append(Entry.symlink(applet, "/bin/busybox"))
    return entries


_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries `binary` loads, as ldd resolves them on this host."""
    res = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return []  # static
    return sorted({Path(m.group(1)) for m in map(_LDD_LINE.search, res.stdout.splitlines()) if m})


def binary_with_libs(binary: Path, guest_path: str) -> list[Entry]:
    entries = [Entry.file(guest_path, _read(binary, "program"), 0o755)]
    for lib in shared_libraries(binary):
        real = lib.resolve()
        entries.append(Entry.file(str(lib), _read(real, "library"), 0o755))
    return entries


def ssh_server_entries() -> list[Entry]:
    if not DROPBEAR.exists():
        raise BuildError(f"SSH server {DROPBEAR} missing: run `testbed setup` (dropbear-bin)")
    return [
        *binary_with_libs(DROPBEAR, "usr/sbin/dropbear"),
        Entry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry.file("etc/group", b"root:x:0:\ntty:x:5:\n"),
        Entry.file("etc/shells", b"/bin/sh\n/bin/ash\n"),
        Entry.dir("root", 0o700),
        Entry.dir("root/.ssh", 0o700),
        Entry.dir("etc/dropbear", 0o755),
    ]


def module_load_order(moddir: Path, wanted: Iterable[str]) -> tuple[list[str], list[str]]:
    """Module files (relative to moddir) to insmod in order, and names that are built in.

    Dependencies from modules.dep come first. A name that is neither a module
    nor built in raises BuildError.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        by_name[_modname(mod)] = mod
    builtin_file = moddir / "modules.builtin"
    builtin: set[str] = set()
    if builtin_file.exists():
        builtin = {_modname(ln) for ln in builtin_file.read_text().split()}
    order: list[str] = []
    built_in: list[str] = []

    def visit(mod: str, trail: tuple[str, ...]) -> None:
        if mod in order:
            return
        if mod in trail:
            loop = " -> ".join((*trail, mod))
            raise BuildError(f"module dependency loop in {moddir}/modules.dep: {loop}")
        for dep in deps.get(mod, []):
            visit(dep, (*trail, mod))
        order.append(mod)

    for name in wanted:
        norm = name.replace("-", "_")
        if norm in by_name:
            visit(by_name[norm], ())
        elif norm in builtin:
            built_in.append(name)
        else:
            raise BuildError(f"kernel module {name} is neither in {moddir} nor built in")
    return order, built_in


def _modname(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def image_entries(spec: ImageSpec) -> tuple[list[Entry], tuple[str, ...]]:
    """All entries of the image for `spec`, and the modules init will load."""
    entries: list[Entry] = [
        Entry.chardev("dev/console", 5, 1),
        Entry.chardev("dev/null", 1, 3, 0o666),
        *(Entry.dir(d) for d in ("proc", "sys", "dev", "run", "var", "var/log", "etc/init.d")),
        Entry.dir("tmp", 0o1777),
        Entry.symlink("init", "/bin/busybox"),
        *(Entry.file(f"etc/{name}", _read(paths.IMAGES_DIR / "initramfs" / name, "template"))
          for name in ("inittab", "fstab")),
        Entry.file("usr/sbin/tb-cmdport",
                   _read(paths.IMAGES_DIR / "initramfs" / "cmdport.sh", "template"), 0o755),
    ]
    entries += busybox_entries()
    entries += ssh_server_entries()

    loaded: list[str] = []
    moddir = modules_dir(spec.kernel) if spec.kernel else None
    if moddir and spec.modules:
        order, _ = module_load_order(moddir, spec.modules)
        for rel in order:
            guest = f"lib/modules/{spec.kernel.release if spec.kernel else ''}/{rel}"
            entries.append(Entry.file(guest, _read(moddir / rel, "module")))
            loaded.append(guest)

    if spec.guest_programs:
        progs = guestprogs.build()
        for name, host in sorted(progs.programs.items()):
            entries.append(Entry.file(f"usr/bin/{name}", host.read_bytes(), 0o755))
    for guest_path, host_path in sorted(spec.extra_files.items()):
        mode = 0o755 if os.access(host_path, os.X_OK) else 0o644
        entries.append(Entry.file(guest_path, _read(Path(host_path), "extra file"), mode))

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(paths.IMAGES_DIR / "initramfs"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    rcs = env.get_template("rcS.j2").render(
        modules=loaded,
        hostname=spec.hostname,
        extra_rc=spec.extra_rc,
        ready_marker=READY_MARKER,
        serial_ports_param=SERIAL_PORTS_PARAM,
    )
    entries.append(Entry.file("etc/init.d/rcS", rcs.encode(), 0o755))
    return entries, tuple(loaded)


def build_image(spec: ImageSpec) -> Image:
    """Build (or take from the cache) the base image for `spec`."""
    entries, loaded = image_entries(spec)
    data = cpio.archive(entries)
    key = hashlib.sha256(data).hexdigest()[:20]
    out = paths.cache_dir() / "initramfs" / f"{key}.cpio"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return Image(out, key, loaded)


def with_overlay(base: Path, overlay: list[Entry], dest: Path) -> Path:
    """Write `base` followed by an archive of `overlay` to `dest` (the kernel unpacks both)."""
    with open(dest, "wb") as out, open(base, "rb") as src:
        shutil.copyfileobj(src, out)
        out.write(cpio.archive(overlay))
    return dest
