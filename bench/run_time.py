"""Wall time of `testbed run` (all scenarios) by number of parallel guests, and of the matrix.

    .venv/bin/python bench/run_time.py [--parallel 1 2 4] [--matrix]

Warm caches are assumed (the reference kernel built once before). The
baseline is the run with one guest at a time, measured in the same
invocation; each other setting is printed as a ratio against it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str]) -> float:
    """Wall time of one testbed command; its run folder is kept (and named) when it fails."""
    tmp = tempfile.mkdtemp(prefix="bench-run-")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "testbed", *args, "--run-dir", tmp],
                         capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if res.returncode != 0:
        Path(tmp, "stdout.txt").write_text(res.stdout)
        Path(tmp, "stderr.txt").write_text(res.stderr)
        print(res.stdout[-2000:], res.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"testbed {' '.join(args)} failed with {res.returncode}; "
                         f"run folder and its output kept in {tmp}")
    shutil.rmtree(tmp, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--matrix", action="store_true", help="also time testbed matrix")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "testbed", "kernel", "build", "--series", "rpal-ref"],
                   check=True, capture_output=True)  # warm the cache
    base = None
    for n in args.parallel:
        s = timed(["run", "--parallel", str(n)])
        base = base or s
        print(f"testbed run, {n} guest(s) at a time: {s:6.1f} s  ratio {s / base:.2f}")
    if args.matrix:
        for n in args.parallel:
            s = timed(["matrix", "--parallel", str(n)])
            print(f"testbed matrix, {n} guest(s) at a time: {s:6.1f} s")


if __name__ == "__main__":
    main()
