"""Timings that used to be test assertions: recorded page-table walks and a kernel cache hit.

    .venv/bin/python bench/offline_time.py [--runs 20]

No VM. Prints the median time of `PageTableWalker.mappings()` over each recorded
guest's page tables (tests/data/ptpages-*.json.gz; it was `walk_s < 1.0` in
tests/test_pagetable_recorded.py), of a whole `assemble()` over the recorded
kernel objects (tests/data/kernel-objects), and of a `build_kernel()` cache hit
on a toy tarball (it was `kb.seconds < 5` in tests/test_kernel_build.py).
Goals: walk under 1 s, cache hit under 5 s.
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_kernel_build import tiny_tarball  # noqa: E402
from test_kernel_objects import CASES, DATA, attach  # noqa: E402
from test_pagetable_recorded import RAM, load, reader  # noqa: E402

from testbed.snapshot import pagetable as pt  # noqa: E402
from testbed.snapshot.cpustate import parse_info_registers  # noqa: E402
from testbed.snapshot.snapshot import assemble  # noqa: E402


def median_ms(fn: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def cache_hit_seconds() -> float:
    import os

    from testbed.build import kconfig, kernel
    from testbed.build.kernel_source import resolve_source
    from testbed.build.series import load_series

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TESTBED_CACHE"] = str(Path(tmp) / "cache")
        tb = tiny_tarball(Path(tmp) / "linux-toy.tar.gz")
        base = resolve_source(tb, kernel.work_dir())
        frags = [kconfig.load_fragment(kconfig.BASE_FRAGMENT),
                 kconfig.load_fragment("CONFIG_X=y")]
        key = kernel.cache_key(base.identity, load_series(None), frags,
                               kernel.toolchain_versions())
        d = kernel.kernels_dir() / key
        d.mkdir(parents=True)
        for name in kernel.ARTIFACTS:
            (d / name).write_text("x")
        (d / "meta.json").write_text(json.dumps({
            "key": key, "base_version": "toy 6.1.999", "kernel_release": "6.1.999",
            "series": {"name": ""}, "created": "2026-11-26T10:00:00+0000",
            "fragments": ["base.config", "CONFIG_X=y"]}))
        kb = kernel.build_kernel(config_fragments=["CONFIG_X=y"], source=tb)
        assert kb.cached
        return kb.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    for variant in ("la57-amd", "l4-intel", "nopku"):
        rec, pages = load(variant)
        regs = parse_info_registers(rec["hmp_info_registers"][str(rec["cpu"])], rec["cpu"])
        w = pt.PageTableWalker(reader(pages), levels=regs.paging_levels, ram_size=RAM)
        ms = median_ms(lambda w=w, r=regs.cr3: (w.forget(), w.mappings(r)), args.runs)
        print(f"walk {variant}: {ms:.2f} ms (goal < 1000)")
    btf = lzma.decompress((DATA / "debian-6.1-btf-subset.btf.xz").read_bytes())
    for case in CASES:
        _, view = attach(case, btf)
        print(f"assemble {case}: {median_ms(lambda v=view: assemble(v), args.runs):.2f} ms")
    print(f"kernel cache hit: {cache_hit_seconds():.2f} s (goal < 5)")


if __name__ == "__main__":
    main()
