"""Where the testbed keeps its sources, caches and run folders."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

# The source checkout: guest C code, image recipes and kernel patch series
# live beside the package (the project is installed editable).
SOURCE_ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = SOURCE_ROOT / "guest"
IMAGES_DIR = SOURCE_ROOT / "images"
PATCHES_DIR = SOURCE_ROOT / "kernel-patches"


def cache_dir() -> Path:
    """Content-addressed cache for kernels, guest programs and images."""
    base = os.environ.get("TESTBED_CACHE")
    if base:
        path = Path(base)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(xdg) / "testbed"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Parent of the per-run artifact folders (TESTBED_RUNS or ./testbed-runs)."""
    path = Path(os.environ.get("TESTBED_RUNS") or "testbed-runs").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_run_dir(kind: str, parent: Path | None = None) -> Path:
    """Make a fresh, unique folder for one run's artifacts."""
    parent = parent or runs_dir()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = parent / f"{stamp}-{kind}-{os.getpid()}-{secrets.token_hex(3)}"
    path.mkdir(parents=True, mode=0o700)
    return make_private(path)


def make_private(path: Path) -> Path:
    """Only the owner may enter `path` (whatever the umask): a run folder holds the QMP
    socket (root-equivalent over root's QEMU), SSH keys and guest memory dumps."""
    path.chmod(0o700)
    return path


def prepare_run_dir(path: Path, what: str = "--run-dir") -> Path:
    """A folder the user named for a run's files: made (private) if missing, and checked
    to be a writable folder now, before any guest boots; TestbedError otherwise."""
    from testbed.errors import TestbedError

    if path.exists() and not path.is_dir():
        raise TestbedError(f"{what} {path} is not a folder: name a folder (or a new path)")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = path / f".testbed-probe-{os.getpid()}-{secrets.token_hex(3)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TestbedError(f"{what} {path} is not a writable folder ({exc.strerror}): "
                           "name one you can write to") from None
    return path
