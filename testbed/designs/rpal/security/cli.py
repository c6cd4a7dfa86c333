"""`testbed security`: the security review on one guest, its table and reports.

The same as `testbed run --suite security` (scenario `security`, judged against
testbed/designs/rpal/SECURITY.md), in one paging mode by default (l5) and with the
review table first in the summary; ROW names run only those rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from testbed.errors import UsageError


def cmd_security(args: argparse.Namespace) -> int:
    from testbed.designs.rpal.security.table import load_table
    from testbed.run_commands import cmd_run

    names = {r.name for r in load_table()}
    unknown = [r for r in args.row if r not in names]
    if unknown:
        raise UsageError(f"no security row {', '.join(unknown)}: choose from "
                         f"{', '.join(sorted(names))} (testbed/designs/rpal/SECURITY.md)")
    run = argparse.Namespace(
        scenario=["security"], suite=None, kernel=args.kernel, kernel_series=args.kernel_series,
        accel=args.accel, modes=args.modes, paging=None, pti=None, append=args.append,
        parallel=1, run_dir=args.run_dir, bug=args.bug, json=args.json, junit=args.junit,
        html=args.html, keyword=None, shard=None, dry_run=args.dry_run, exitfirst=False,
        no_dump=True, dump_max_mib=1, scenario_options={"security_rows": list(args.row)},
        design="rpal",
    )
    return cmd_run(run)


def add_parser(sub: Any) -> None:
    from testbed.designs import get_design
    from testbed.run_commands import EXIT_STATUS_HELP

    design = get_design("rpal")
    p = sub.add_parser(
        "security", help="the security review: attacks between RPAL services, row by row",
        description="Run every attack of testbed/designs/rpal/SECURITY.md between a victim "
        "service holding a secret and an attacker service (paired and unpaired) on one "
        "guest, and judge each row against the expected column of that table: blocked, or "
        "a known weakness shown. Only a row that contradicts its expectation fails; a row "
        "this kernel cannot run is a skip. Each row's evidence (the guest's observation, "
        "the host's view of the entries involved, the gadget scan) is in the run folder's "
        "security/ROW.json. Same as `testbed run --suite security` in one mode.",
        epilog=EXIT_STATUS_HELP,
    )
    p.add_argument("row", nargs="*", help="only these rows (default: every row)")
    p.add_argument("--kernel", type=Path,
                   help=f"bzImage with vmlinux beside it, or a cached build's key (default: "
                        f"the {design.kernel_series} reference kernel)")
    p.add_argument("--kernel-series", metavar="NAME",
                   help="with --kernel KEY: build this series when the cache lacks KEY")
    p.add_argument("--bug", action="append", choices=design.bugs, metavar="NAME",
                   help="boot with this injected bug (repeatable; `testbed list` names them)")
    p.add_argument("--modes", default="l5", metavar="M,M",
                   help="paging modes (default l5; l5,l4pti for both)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--run-dir", type=Path, help="parent folder of the run folders")
    p.add_argument("--json", type=Path, metavar="FILE", help="JSON report")
    p.add_argument("--junit", type=Path, metavar="FILE", help="JUnit XML report")
    p.add_argument("--html", type=Path, metavar="FILE",
                   help="HTML report (the review table, each row linking to its evidence)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would run; build, boot and write nothing")
    p.set_defaults(func=cmd_security)
