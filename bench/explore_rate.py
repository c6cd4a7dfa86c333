"""Explore: judged steps per second (snapshot + every check after each step) vs. unjudged.

    .venv/bin/python bench/explore_rate.py [--kernel K] [--examples 8] [--steps 20] [--seed 1]

One guest (the reference kernel, no bug). First the same seeded sequences
with only the answers judged (no snapshot, no snapshot checks), then again
with a host snapshot and all checks after every step; both runs do the same
operations (same seed, same sequences). Prints steps/s of both, the ratio,
and the snapshot's share of the judged time. Goal: 20 judged steps/s under TCG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from testbed import paths
from testbed.boot.hostcaps import choose_accel
from testbed.boot.kernelimage import inspect_kernel, resolve_kernel
from testbed.build.initramfs import ImageSpec, build_image
from testbed.designs.rpal.explore.choices import REFERENCE_CHOICES
from testbed.designs.rpal.explore.driver import explore
from testbed.designs.rpal.explore.guest import explore_guest
from testbed.designs.rpal.explore.session import Session
from testbed.runner import GuestSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", type=Path, default=None,
                    help="bzImage or cached build key (default: the rpal-ref build)")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--services", type=int, default=4)
    args = ap.parse_args()
    if args.kernel is not None:
        kernel = resolve_kernel(args.kernel)
    else:
        from testbed.build.kernel import build_kernel

        kernel = build_kernel(series="rpal-ref").bzimage
    image = build_image(ImageSpec(kernel=inspect_kernel(kernel)))
    accel = choose_accel("auto", 5)
    spec = GuestSpec(kernel=kernel, initrd=image.path, accel=accel)
    parent = paths.runs_dir() / "bench-explore"
    parent.mkdir(exist_ok=True)
    run_dir = paths.new_run_dir("bench", parent)
    rates = {}
    world = None
    with explore_guest(spec, (), run_dir, REFERENCE_CHOICES) as rig:
        for judged in (False, True):
            s = Session(rig.agent, snapshotter=rig.snapshotter, console=rig.console,
                        judge_snapshots=judged, world=world)
            world = s.world  # the same guest: ids and keys go on
            t0 = time.monotonic()
            res = explore(s, seed=args.seed, steps=args.steps, seconds=1e9,
                          services=args.services, max_examples=args.examples, shrink=False)
            wall = time.monotonic() - t0
            # the reset between sequences (kills, the id delay) is not a step: time it apart
            step_time = wall - s.seconds_reset
            label = "judged" if judged else "unjudged"
            rates[label] = res.steps / step_time if step_time > 0 else 0.0
            print(f"{label:9s}: {res.steps} steps in {step_time:.2f} s of steps "
                  f"({wall:.2f} s with {res.examples} resets): {rates[label]:.1f} steps/s"
                  + (f"; snapshots {res.snapshots}, "
                     f"{1000 * res.snapshot_seconds / max(1, res.snapshots):.1f} ms each"
                     if judged else "")
                  + (f"; FAILED {res.failure.check}: {res.failure.message}"
                     if res.failure else ""))
            s.reset()  # kill what is left, for the next run's fresh session
    if rates.get("judged"):
        print(f"ratio unjudged/judged: {rates['unjudged'] / rates['judged']:.2f}x "
              f"(goal: 20 judged steps/s; {accel.describe()})")


if __name__ == "__main__":
    main()
