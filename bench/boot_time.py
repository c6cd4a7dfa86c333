"""Boot-to-command time of `testbed exec`, against a bare QEMU boot measured in the same run.

    .venv/bin/python bench/boot_time.py [--runs 5] [--kernel PATH] [--smp 2]

Baseline: the same kernel and image under plain QEMU, with init replaced by
`poweroff -f` (kernel start to first user process and power-off), no SSH,
no QMP. The ratio says what the testbed adds on top of the kernel's own boot.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from testbed import paths
from testbed.boot.hostcaps import choose_accel, kernel_boots
from testbed.boot.kernelimage import default_kernel, inspect_kernel
from testbed.boot.machine import Machine, MachineConfig
from testbed.build.initramfs import ImageSpec, build_image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", type=Path, default=None)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--accel", default="tcg")
    args = ap.parse_args()
    kernel = args.kernel or default_kernel()
    image = build_image(ImageSpec(kernel=inspect_kernel(kernel)))
    accel = choose_accel(args.accel, 5)
    runs_parent = paths.runs_dir() / "bench-boot"
    runs_parent.mkdir(exist_ok=True)

    bare, full, phases = [], [], []
    for _ in range(args.runs):
        t0 = time.monotonic()
        ok, why = kernel_boots(accel.accel, accel.cpu, kernel, image.path)
        assert ok, why
        bare.append(time.monotonic() - t0)

        cfg = MachineConfig(kernel=kernel, initrd=image.path, accel=accel, smp=args.smp)
        t0 = time.monotonic()
        with Machine(cfg, paths.new_run_dir("bench", runs_parent)) as m:
            res = m.run("true")
            assert res.status == 0
            full.append(time.monotonic() - t0)
            phases.append(dict(m.timings))

    med_bare, med_full = statistics.median(bare), statistics.median(full)
    print(f"kernel {kernel} ({accel.describe()}), -smp {args.smp}, {args.runs} runs")
    def each(xs: list[float]) -> str:
        return " ".join(f"{x:.2f}" for x in xs)

    print(f"baseline bare boot to poweroff: median {med_bare:.2f} s  ({each(bare)})")
    print(f"testbed boot to command done:   median {med_full:.2f} s  ({each(full)})")
    for key in ("launch", "boot", "ssh"):
        print(f"  phase {key:6}: median {statistics.median(p[key] for p in phases):.2f} s")
    print(f"ratio testbed / bare: {med_full / med_bare:.2f}")


if __name__ == "__main__":
    main()
