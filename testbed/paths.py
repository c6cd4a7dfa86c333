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
    path.mkdir(parents=True)
    return path
