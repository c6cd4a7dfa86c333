"""Round-trip time of tb-rpal_agent commands (host -> agent -> service -> back), per op.

    .venv/bin/python bench/agent_rtt.py [--kernel PATH] [--reps 20]

Boots one guest (default: the rpal-ref kernel from the cache), pairs two services and
times each op `--reps` times; prints the median and the 90th percentile in ms. The
agent-only `hello` is the floor (virtio-serial both ways, no service).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from testbed import paths
from testbed.boot.kernelimage import inspect_kernel
from testbed.boot.machine import Machine, MachineConfig, resolve_accel
from testbed.build.initramfs import ImageSpec, build_image
from testbed.designs.rpal.agent import AGENT_PORT, Agent, start_agent


def pkru_for(pkey: int) -> int:
    return 0xFFFFFFFF & ~(3 << (2 * pkey))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.kernel is None:
        from testbed.build.kernel import build_kernel

        args.kernel = build_kernel(series="rpal-ref").bzimage
    image = build_image(ImageSpec(kernel=inspect_kernel(args.kernel)))
    accel = resolve_accel("auto", 5, args.kernel, image.path)
    cfg = MachineConfig(kernel=args.kernel, initrd=image.path, accel=accel,
                        serial_ports=(AGENT_PORT,))
    times: dict[str, list[float]] = {}

    def timed(ag: Agent, label: str, op: str, **kw: object) -> None:
        t0 = time.monotonic()
        a = ag.call(op, **kw)
        times.setdefault(label, []).append((time.monotonic() - t0) * 1000)
        if a.status not in ("ok", "fault", "err"):
            raise SystemExit(f"{label}: {a.text()}")

    with Machine(cfg, paths.new_run_dir("bench-agent")) as m:
        ag = start_agent(m)
        sa, sb = ag.call("spawn", svc="a"), ag.call("spawn", svc="b")
        pa = ag.call("enable", svc="a").need_int("pkey")
        pb = ag.call("enable", svc="b").need_int("pkey")
        ag.call("request", svc="a", key=sb.need_int("key"))
        ag.call("request", svc="b", key=sa.need_int("key"))
        union = hex(pkru_for(pa) & pkru_for(pb))
        r = ag.call("mmap", svc="b", len=4096 * 64, populate=1).need_int("addr")
        for i in range(args.reps):
            timed(ag, "hello (agent only)", "hello")
            timed(ag, "state", "state", svc="a")
            timed(ag, "read peer", "read", svc="a", addr=r, pkru=union)
            timed(ag, "read peer (fault)", "read", svc="a", addr=r)
            timed(ag, "write peer", "write", svc="a", addr=r, value=i, pkru=union)
            timed(ag, "mmap", "mmap", svc="b", len=4096)
            timed(ag, "mprotect", "mprotect", svc="b", addr=r + 4096, len=4096,
                  prot="r" if i % 2 else "rw")
            timed(ag, "madvise dontneed", "madvise", svc="b", addr=r + 8192, len=4096,
                  advice="dontneed")
            timed(ag, "madvise pageout", "madvise", svc="b", addr=r + 12288, len=4096,
                  advice="pageout")
            timed(ag, "pagemap", "pagemap", svc="b", addr=r)
            timed(ag, "deadkeys", "deadkeys", svc="a")
            if i < 8:  # bounded: threads and children stay
                timed(ag, "thread", "thread", svc="a")
                timed(ag, "fork", "fork", svc="b")
        for i in range(min(args.reps, 10)):
            name = f"s{i}"
            timed(ag, "spawn", "spawn", svc=name)
            timed(ag, "enable", "enable", svc=name)
            timed(ag, "exec", "exec", svc=name)
            timed(ag, "exit", "exit", svc=name)
        ag.call("quit")
        ag.close()
    print(f"tb-rpal_agent round trips, {accel.accel} -cpu {accel.cpu}, ms (median / p90):")
    for label, xs in times.items():
        xs.sort()
        p90 = xs[min(len(xs) - 1, int(len(xs) * 0.9))]
        print(f"  {label:22s} {statistics.median(xs):7.1f} {p90:7.1f}   (n={len(xs)})")


if __name__ == "__main__":
    main()
