"""Snapshots of live guests at checkpoints: what the host sees equals what the guest did."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from testbed.boot.hostcaps import choose_accel
from testbed.boot.kernelimage import default_kernel, inspect_kernel
from testbed.boot.machine import Checkpoint, Machine, MachineConfig
from testbed.build.initramfs import ImageSpec, build_image
from testbed.snapshot.live import LiveSnapshotter
from testbed.snapshot.model import Snapshot, Task, Trigger, json_schema
from testbed.snapshot.pagetable import user_root

from conftest import run_testbed

pytestmark = pytest.mark.vm


def task_named(snap: dict[str, Any], comm: str) -> dict[str, Any]:
    found = [t for t in snap["tasks"] if t["comm"] == comm]
    assert len(found) == 1, [t["comm"] for t in snap["tasks"]]
    return found[0]


def typed_task(snap: Snapshot, comm: str) -> Task:
    found = [t for t in snap.tasks if t.comm == comm]
    assert len(found) == 1, [t.comm for t in snap.tasks]
    return found[0]


def test_exec_writes_a_snapshot_per_checkpoint(runs_dir: Path, tmp_path: Path):
    out = tmp_path / "snaps"
    res = run_testbed("exec", "--snapshots", str(out), "--", "tb-checkpoint", "one", "k=v")
    assert res.returncode == 0, res.stderr
    snap = json.loads((out / "one.json").read_text())
    import jsonschema

    jsonschema.validate(snap, json_schema())
    assert snap["schema"] == "testbed.snapshot" and snap["schema_version"] == 2
    Snapshot.from_json(snap)
    assert snap["trigger"]["name"] == "one" and snap["trigger"]["facts"] == {"k": "v"}
    t = task_named(snap, "tb-checkpoint")
    assert t["pid"] == snap["trigger"]["pid"]
    assert t["state"] == "S" and t["pkru"] == "0x55555554"
    stack = [m for m in t["mappings"] if m.get("region") == "stack"]
    assert len(stack) == 1 and "w" in stack[0]["flags"]
    assert {c["index"] for c in snap["cpus"]} == {0, 1}
    assert all("loaded_mm" in c["tlb"] for c in snap["cpus"])


MARK = re.compile(r"pkey_mark addr=(0x[0-9a-f]+) pkey=(\d+) pkru=(0x[0-9a-f]+) pid=(\d+) tid=(\d+)")


@pytest.mark.parametrize(
    "paging, pti", [(5, "off"), (4, "off"), (5, "on")], ids=["5-level", "4-level", "5-level-pti"]
)
def test_host_sees_the_guest_page_key_marker_and_pkru(runs_dir: Path, paging: int, pti: str):
    kernel = default_kernel()
    image = build_image(ImageSpec(kernel=inspect_kernel(kernel)))
    cfg = MachineConfig(kernel=kernel, initrd=image.path, accel=choose_accel("auto", paging),
                        paging=paging, pti=pti)
    seen: dict[str, Any] = {}
    with Machine(cfg) as m:
        assert m.qmp is not None
        snapper = LiveSnapshotter(m.qmp, m.ram_path, kernel)

        def on_checkpoint(ck: Checkpoint) -> None:
            snap = snapper.capture(ck.name, Trigger(ck.name, ck.pid, ck.tid))
            t = typed_task(snap, "tb-pkey_mark")
            view = snapper._view
            assert view is not None and t.pgd is not None
            root = t.user_pgd if t.user_pgd is not None else t.pgd
            tr = view.walker.translate(root, 0x7E0000000000)
            seen.update(snap=snap, task=t, marker=snapper.memory.read(tr.phys, 14),
                        pkey_in_pte=tr.pkey)

        m.on_checkpoint = on_checkpoint
        res = m.run("tb-pkey_mark 0x7e0000000000 testbed-marker")
        snapper.close()
    assert res.status == 0, res.stderr
    match = MARK.search(res.stdout.decode())
    assert match, res.stdout
    addr, pkey, pkru = int(match[1], 16), int(match[2]), match[3]
    snap, t = seen["snap"], seen["task"]
    assert snap.kernel.paging_levels == paging
    assert snap.kernel.pti is (pti == "on")
    assert seen["marker"] == b"testbed-marker"
    assert seen["pkey_in_pte"] == pkey
    assert isinstance(t.mappings, tuple)
    page = [mp for mp in t.mappings if mp.start <= addr < mp.end]
    assert len(page) == 1 and page[0].pkey == pkey
    assert t.state == "S" and t.running_on is None
    assert t.pkru == int(pkru, 16) and t.pkru_source == "thread.pkru"
    if pti == "on":
        assert t.user_pgd == user_root(t.pgd)


def test_inspect_live_guest_and_offline_dump(runs_dir: Path, tmp_path: Path):
    import subprocess
    import sys
    import time

    kernel = default_kernel()
    image = build_image(ImageSpec(kernel=inspect_kernel(kernel)))
    cfg = MachineConfig(kernel=kernel, initrd=image.path, accel=choose_accel("auto", 5))
    with Machine(cfg) as m:
        res = m.run("sleep 300 >/dev/null 2>&1 & echo $!")
        pid = int(res.stdout)
        time.sleep(0.5)
        live = run_testbed("inspect", "--run", str(m.run_dir), "--json", "--pid", str(pid))
        assert live.returncode == 0, live.stderr
        text = run_testbed("inspect", "--run", str(m.run_dir), "--pid", str(pid))
        assert text.returncode == 0 and re.search(rf"^{pid}\s+{pid}\s+sleep\b", text.stdout, re.M)
        dump = tmp_path / "guest.elf"
        m.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"})
    snap = json.loads(live.stdout)
    assert [t["comm"] for t in snap["tasks"]] == ["sleep"]
    off = subprocess.run(
        [sys.executable, "-m", "testbed", "inspect", "--dump", str(dump), "--vmlinux", str(kernel),
         "--json", "--pid", str(pid)], capture_output=True, text=True, timeout=300,
    )
    assert off.returncode == 0, off.stderr
    offline = json.loads(off.stdout)
    # the same process, the same page tables, the same mappings from both sources
    (a,), (b,) = snap["tasks"], offline["tasks"]
    assert (a["pid"], a["comm"], a["pgd"], a["pkru"]) == (b["pid"], b["comm"], b["pgd"], b["pkru"])
    assert a["mappings"] == b["mappings"]
