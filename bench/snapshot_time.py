"""Full snapshot of a guest with 10 user processes: fast path against a dump-guest-memory path.

    .venv/bin/python bench/snapshot_time.py [--runs 5] [--procs 10]

(TB_DEBUG=1 also prints each fast snapshot's own timing breakdown.)

Fast path: pause, vCPUs from a migration stream, kernel objects and page
tables read through the mmap of the shared RAM file, resume.
Baselines, in the same run on the same guest: dump-guest-memory to an ELF
file (in /dev/shm, and in the run folder on disk, where a user would put
it), then the same snapshot read from the dump with pyelftools.
The fast path is timed twice per round: as repeated snapshots of one guest
(the walker reuses work for page tables whose bytes did not change, as
checkpoints of a scenario do) and cold (that memory dropped first).
Prints medians and the ratios. Goal: fast path under 50 ms, 20x faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from testbed import paths
from testbed.boot.hostcaps import choose_accel
from testbed.boot.kernelimage import default_kernel, inspect_kernel
from testbed.boot.machine import Machine, MachineConfig
from testbed.build.initramfs import ImageSpec, build_image
from testbed.snapshot.kernel import KernelView
from testbed.snapshot.live import LiveSnapshotter
from testbed.snapshot.physmem import ElfDumpMemory
from testbed.snapshot.snapshot import assemble


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--procs", type=int, default=10)
    ap.add_argument("--kernel", type=Path, default=None)
    args = ap.parse_args()
    kernel = args.kernel or default_kernel()
    image = build_image(ImageSpec(kernel=inspect_kernel(kernel)))
    cfg = MachineConfig(kernel=kernel, initrd=image.path, accel=choose_accel("auto", 5))
    parent = paths.runs_dir() / "bench-snapshot"
    parent.mkdir(exist_ok=True)
    with Machine(cfg, paths.new_run_dir("bench", parent)) as m:
        assert m.qmp is not None
        m.run(f"for i in $(seq {args.procs}); do sleep 600 >/dev/null 2>&1 & done")
        snapper = LiveSnapshotter(m.qmp, m.ram_path, kernel)
        snapper.capture("warm-up")  # attaches once (finds the kernel, reads its types)
        fast: dict[str, list[float]] = {"repeat": [], "cold": []}
        ntasks = 0
        parts: dict[str, list[float]] = {"cpus_ms": [], "migration_ms": [], "assemble_ms": []}
        slow: dict[str, list[float]] = {"/dev/shm": [], str(m.run_dir): []}
        for _ in range(args.runs):
            for kind, times in fast.items():
                if kind == "cold":
                    snapper.forget()  # page tables walked afresh, as in a first snapshot
                t0 = time.perf_counter()
                snap = snapper.capture("bench")
                times.append(time.perf_counter() - t0)
                ntasks = len(snap.tasks)
                if os.environ.get("TB_DEBUG"):
                    print(kind, snap.timing)
                if kind == "repeat":
                    for key, values in parts.items():
                        values.append(snap.timing[key])

            for where, times in slow.items():
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory(dir=where) as tmp:
                    dump = Path(tmp) / "guest.elf"
                    m.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"})
                    with ElfDumpMemory(dump) as mem:
                        assemble(KernelView.attach(mem, snapper.image), ())
                times.append(time.perf_counter() - t0)
        snapper.close()
    print(f"guest: {cfg.accel.describe()}, {ntasks} user tasks")
    labels = {
        "repeat": "fast path (mmap + migration stream), repeated snapshots",
        "cold": "fast path, page tables walked afresh (a first snapshot)",
    }
    for kind, times in fast.items():
        print(f"{labels[kind]}: median {statistics.median(times) * 1000:.1f} ms "
              f"({' '.join(f'{x * 1000:.1f}' for x in times)})")
        if kind == "repeat":
            print("  of which (medians): " + ", ".join(
                f"{k.removesuffix('_ms')} {statistics.median(v):.1f} ms" for k, v in parts.items()
            ) + " (cpus: stop, migration stream, parse; assemble: kernel objects, page tables)")
    for where, times in slow.items():
        s = statistics.median(times)
        kind = "tmpfs" if where == "/dev/shm" else "disk, run folder"
        ratios = ", ".join(
            f"{s / statistics.median(f):.1f}x against {k}" for k, f in fast.items()
        )
        print(f"dump path via {kind}: median {s * 1000:.1f} ms "
              f"({' '.join(f'{x * 1000:.1f}' for x in times)}); ratio dump / fast: {ratios}")


if __name__ == "__main__":
    main()
