"""The guest's memory at a failing checkpoint, kept in the run folder as an ELF dump.

When a host check fails at a checkpoint, the runner (still inside the snapshot, with
the guest paused) asks QEMU for `dump-guest-memory` (ELF, physical memory): the file
`memory-CHECKPOINT.elf` in the run folder, and `dump.json` beside it saying which
checkpoint, which findings, which kernel (bzImage, vmlinux and its BUILD-ID) it comes
from. `testbed inspect --dump RUN_DIR` opens it with that vmlinux (testbed/snapshot/
commands.py). One dump per scenario run: the first failing checkpoint's. A guest whose
RAM is larger than the cap (`--dump-max-mib`), or a disk without room for it, gets no
dump, and dump.json says why. A dump that fails is said in dump.json and on stderr; it
never changes a verdict.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DUMP_INFO = "dump.json"
DEFAULT_MAX_MIB = 2048
DUMP_TIMEOUT = 300.0  # seconds QMP may take for the dump (512 MiB: about 1 s here)
SPARE_MIB = 256  # disk space left free beside a dump


@dataclass(frozen=True)
class DumpPolicy:
    """Whether to keep the guest's memory at the first failing checkpoint, up to what RAM size."""

    enabled: bool = True
    max_mib: int = DEFAULT_MAX_MIB


def dump_file_name(checkpoint: str) -> str:
    return f"memory-{checkpoint}.elf"


class FailureDump:
    """Takes at most one dump of one guest (`take`), while it is paused."""

    def __init__(self, qmp: Any, run_dir: Path, policy: DumpPolicy, mem_mib: int,
                 kernel: Path) -> None:
        self.qmp = qmp
        self.run_dir = run_dir
        self.policy = policy
        self.mem_mib = mem_mib
        self.kernel = kernel
        self.taken = False  # tried once: the first failing checkpoint's memory only
        self.file: str = ""  # the dump's name in the run folder, once written

    def take(self, checkpoint: str, why: list[str]) -> str:
        """Dump now (the guest must be paused); the file name, "" when none was written."""
        if self.taken:
            return self.file
        self.taken = True
        info: dict[str, Any] = {"checkpoint": checkpoint, "failed": why[:20],
                                "kernel": str(self.kernel), "mem_mib": self.mem_mib}
        info.update(kernel_files(self.kernel))
        skip = self._why_not()
        if skip:
            info["skipped"] = skip
        else:
            path = self.run_dir / dump_file_name(checkpoint)
            t0 = time.monotonic()
            try:
                self.qmp.execute("dump-guest-memory", {
                    "paging": False, "protocol": f"file:{path}", "format": "elf"},
                    timeout=DUMP_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - a dump is an aid: it fails alone
                info["error"] = f"dump-guest-memory failed: {exc}"
                path.unlink(missing_ok=True)
            else:
                path.chmod(0o600)  # the guest's whole memory
                info["file"] = path.name
                info["bytes"] = path.stat().st_size
                info["seconds"] = round(time.monotonic() - t0, 2)
                self.file = path.name
        (self.run_dir / DUMP_INFO).write_text(json.dumps(info, indent=1) + "\n")
        if "error" in info or "skipped" in info:
            print(f"testbed: no memory dump at {checkpoint} in {self.run_dir}: "
                  f"{info.get('error') or info.get('skipped')}", file=sys.stderr)
        return self.file

    def _why_not(self) -> str:
        if self.mem_mib > self.policy.max_mib:
            return (f"guest RAM {self.mem_mib} MiB is over the dump cap of "
                    f"{self.policy.max_mib} MiB (--dump-max-mib)")
        free = shutil.disk_usage(self.run_dir).free >> 20
        if free < self.mem_mib + SPARE_MIB:
            return (f"{free} MiB free on the run folder's disk, a dump needs "
                    f"{self.mem_mib} MiB and {SPARE_MIB} MiB to spare")
        return ""


def kernel_files(kernel: Path) -> dict[str, str]:
    """The vmlinux beside a bzImage (the kernel cache's layout), its BUILD-ID, and the
    cache key of the build it belongs to (when it is a cached build)."""
    from testbed.snapshot.vmcoreinfo import elf_build_id

    out: dict[str, str] = {}
    vmlinux = kernel if _is_elf(kernel) else kernel.parent / "vmlinux"
    if vmlinux.is_file():
        out["vmlinux"] = str(vmlinux)
        out["vmlinux_build_id"] = elf_build_id(vmlinux) or ""
    meta = kernel.parent / "meta.json"
    try:
        doc = json.loads(meta.read_text())
        out["kernel_key"] = str(doc["key"])
        out["kernel_series"] = str(doc.get("series", {}).get("name", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return out


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def load_dump_info(run_dir: Path) -> dict[str, Any] | None:
    """dump.json of a scenario's run folder, None when there is none."""
    try:
        doc = json.loads((run_dir / DUMP_INFO).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        from testbed.errors import TestbedError

        raise TestbedError(f"{run_dir / DUMP_INFO} cannot be read ({exc})") from None
    return doc if isinstance(doc, dict) else None
