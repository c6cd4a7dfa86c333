#!/usr/bin/env python3
"""Which injected bugs `testbed explore` catches, per seed, and by which check.

For every (bug, seed) it runs `testbed explore --bug BUG --seed S --time T` on a fresh
guest and reads the run's explore.json: the failing check, whether that check is one
the design names for the bug (its invariant), the shrunk sequence length and the
time to the failure. Prints one row per run and a table per bug; with --json, the
rows. `--bugs none` runs the correct kernel (a failure there is a false alarm).

    python bench/explore_bugs.py --seeds 1,2,3 --time 120            # every bug
    python bench/explore_bugs.py --bugs none --seeds 1,2,3,4,5 --time 600

Not a test: it takes hours for every bug; its output goes into the issue notes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed.designs import get_design


@dataclass
class Row:
    bug: str
    seed: int
    exit: int
    check: str | None
    named: bool  # the failing check is one the design names for this bug
    steps: int | None  # shrunk length
    unshrunk: int | None
    step_at: int | None
    explore_s: float | None  # time exploring until the failure (or the budget)
    wall_s: float
    judged_steps: int | None
    run_dir: str
    message: str = ""

    @property
    def verdict(self) -> str:
        if self.bug == "none":
            return "pass" if self.exit == 0 else "FALSE ALARM" if self.exit == 1 else "error"
        if self.exit == 1 and self.check:
            return "caught" if self.named else "caught (other check)"
        return "missed" if self.exit == 0 else "error"


def run_one(testbed: str, bug: str, seed: int, seconds: float, out: Path,
            extra: list[str]) -> Row:
    run_dir = out / f"{bug}-s{seed}"
    cmd = [testbed, "explore", "--seed", str(seed), "--time", str(seconds),
           "--run-dir", str(run_dir), *extra]
    if bug != "none":
        cmd += ["--bug", bug]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = round(time.monotonic() - t0, 1)
    (out / f"{bug}-s{seed}.log").write_text(p.stdout + p.stderr)
    doc: dict = {}
    try:
        doc = json.loads((run_dir / "explore.json").read_text())
    except (OSError, ValueError):
        pass
    f = doc.get("failure") or {}
    design = get_design("rpal")
    check = f.get("check")
    named = bool(check and check in design.checks and bug in design.checks[check].bugs)
    last = (p.stderr.strip().splitlines() or [""])[-1] if p.returncode not in (0, 1) else ""
    return Row(bug, seed, p.returncode, check, named, f.get("steps"), f.get("unshrunk_steps"),
               f.get("step"), doc.get("seconds"), wall, doc.get("steps"), str(run_dir),
               (f.get("message") or last)[:160])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bugs", default="all", help="comma list, 'all' or 'none'")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--time", type=float, default=120)
    ap.add_argument("--out", type=Path, default=Path("/tmp/explore-bugs"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--testbed", default=str(Path(sys.executable).with_name("testbed")))
    ap.add_argument("extra", nargs="*", help="more arguments for testbed explore (after --)")
    a = ap.parse_args(argv)
    design = get_design("rpal")
    bugs = list(design.bugs) if a.bugs == "all" else a.bugs.split(",")
    for b in bugs:
        if b != "none" and b not in design.bugs:
            ap.error(f"unknown bug {b!r}")
    seeds = [int(s) for s in a.seeds.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for bug in bugs:
        for seed in seeds:
            r = run_one(a.testbed, bug, seed, a.time, a.out, a.extra)
            rows.append(r)
            print(f"{time.strftime('%H:%M:%S')} {bug:28s} seed {seed}: {r.verdict:20s} "
                  f"check={r.check} steps={r.steps} (from {r.unshrunk}) at "
                  f"{r.explore_s} s, wall {r.wall_s} s  {r.message[:80]}", flush=True)
            if a.json:
                a.json.write_text(json.dumps([asdict(x) for x in rows], indent=1) + "\n")
    print()
    cells = {(r.bug, r.seed): f"{r.verdict[:6]} {r.check or '-'}/{r.steps or '-'}"
             for r in rows}
    width = max(len(c) for c in [*cells.values(), "seed 10"])  # never cut a cell
    print(f"{'bug':28s} " + " ".join(f"{'seed ' + str(s):>{width}s}" for s in seeds))
    for bug in bugs:
        print(f"{bug:28s} " + " ".join(cells[bug, seed].rjust(width) for seed in seeds))
    bad = [r for r in rows if (r.bug == "none" and r.exit != 0)
           or (r.bug != "none" and not (r.exit == 1 and r.named))]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} runs as expected")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
