"""Full snapshot of a guest with 10 user processes: fast path against a dump-guest-memory path.

    .venv/bin/python bench/snapshot_time.py [--runs 5] [--procs 10]

Fast path: pause, vCPUs from a migration stream, kernel objects and page
tables read through the mmap of the shared RAM file, resume.
Baselines, in the same run on the same guest: dump-guest-memory to an ELF
file (in /dev/shm, and in the run folder on disk, where a user would put
it), then the same snapshot read from the dump with pyelftools.
Prints medians and the ratio. Goal: fast path under 50 ms, 20x faster.
"""

from __future__ import annotations

import argparse
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
        fast, ntasks = [], 0
        slow: dict[str, list[float]] = {"/dev/shm": [], str(m.run_dir): []}
        for _ in range(args.runs):
            t0 = time.perf_counter()
            snap = snapper.capture("bench")
            fast.append(time.perf_counter() - t0)
            ntasks = len(snap["tasks"])

            for where, times in slow.items():
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory(dir=where) as tmp:
                    dump = Path(tmp) / "guest.elf"
                    m.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"})
                    with ElfDumpMemory(dump) as mem:
                        assemble(KernelView.attach(mem, snapper.image), ())
                times.append(time.perf_counter() - t0)
        snapper.close()
    f = statistics.median(fast)
    print(f"guest: {cfg.accel.describe()}, {ntasks} user tasks")
    print(f"fast path (mmap + migration stream): median {f * 1000:.1f} ms "
          f"({' '.join(f'{x * 1000:.1f}' for x in fast)})")
    for where, times in slow.items():
        s = statistics.median(times)
        kind = "tmpfs" if where == "/dev/shm" else "disk, run folder"
        print(f"dump path via {kind}: median {s * 1000:.1f} ms "
              f"({' '.join(f'{x * 1000:.1f}' for x in times)}); ratio dump / fast {s / f:.1f}x")


if __name__ == "__main__":
    main()
