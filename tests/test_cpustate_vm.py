"""Live snapshot of a guest that sets PKRU (boots a VM through tests/data/record_migstream.py).

The recording script is the same code path that made the stored streams: it
launches QEMU directly, snapshots with ``cpustate.take_migration_stream``
(running, then paused), reads HMP registers, and always kills QEMU and
removes its /dev/shm file.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from testbed.boot.kernelimage import debian_kernel
from testbed.snapshot.migstream import parse_migration_stream

DATA = Path(__file__).parent / "data"
pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None
        or shutil.which("gcc") is None
        or debian_kernel() is None,
        reason="needs qemu-system-x86_64, gcc and the Debian kernel",
    ),
]


def test_live_snapshot_finds_pkru(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("record_migstream", DATA / "record_migstream.py")
    assert spec and spec.loader
    rec_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rec_mod)
    work = tmp_path / "work"
    work.mkdir()
    initrd = rec_mod.build_initramfs(work)
    asyncio.run(rec_mod.record("la57-amd", tmp_path, work, initrd))

    rec = json.loads((tmp_path / "record-la57-amd.json").read_text())
    assert rec["running_snapshot"]["status_before"] == "running"
    assert rec["running_snapshot"]["status_after"] == "running"
    assert rec["paused_snapshot"]["status_before"] == "paused"
    assert rec["paused_snapshot"]["status_after"] == "postmigrate"
    assert rec["postmigrate_snapshot"]["ok"] is False  # QEMU 7.2 refuses; we report it
    assert rec["status_after_cont"] == "running"
    m = parse_migration_stream(
        gzip.decompress((tmp_path / "migstream-la57-amd.bin.gz").read_bytes())
    )
    v = m.vcpu(rec["cpu"])
    assert v.pkru == rec["pkru"] == 0x5A5A5A54 and v.cpl == 3
    assert m.vcpu(1 - rec["cpu"]).pkru != rec["pkru"]
    print("snapshot ms (stopped, total):", rec["more_snapshots_ms_stopped_total"])
