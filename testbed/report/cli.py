"""`testbed report ACTION ...`: work on finished runs without booting a guest.

    testbed report RUN_DIR [--json F --junit F --html F]   # = testbed report judge RUN_DIR
    testbed report judge RUN_DIR ...                       # every check again (rejudge.py)

Actions are argparse subcommands of `report` (more can sit beside `judge`, e.g. a
`merge` of shard reports); a first argument that is no action's name is a RUN_DIR
for `judge` (`route`, called by testbed.cli.main before parsing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_ACTION = "judge"


def add_judge_parser(rsub: Any) -> None:
    p = rsub.add_parser(
        DEFAULT_ACTION, help="judge a finished run again from its folder (no guest)",
        description="Run every check again on the saved snapshots, outputs and console "
        "logs of a finished `testbed run` (its folder, or one scenario's folder in it) with "
        "the checks of this tree, print the summary, say which verdicts changed from the "
        "run's, and write the reports again (by default report.json, report.xml and "
        "report.html in RUN_DIR). What the folder lacks is an error, never a pass. Exit "
        "status as `testbed run`'s: 0 all passed, 1 a check failed, 125 something could "
        "not be judged.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--json", type=Path, metavar="FILE", help="JSON report")
    p.add_argument("--junit", type=Path, metavar="FILE", help="JUnit XML report")
    p.add_argument("--html", type=Path, metavar="FILE", help="HTML report with the slot picture")
    p.set_defaults(func=cmd_judge)


_ACTIONS: list[str] = []  # the actions' names, filled by add_parser


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="judge a finished run again (testbed report RUN_DIR)",
        usage="testbed report RUN_DIR [options]\n       testbed report ACTION ...",
        description="Work on finished runs without booting a guest. `testbed report "
        "RUN_DIR` is `testbed report judge RUN_DIR`.",
    )
    rsub = p.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    add_judge_parser(rsub)
    try:  # `testbed report merge` (shard reports), where this tree has it
        from testbed.report import merge
    except ImportError:
        pass
    else:
        merge.add_merge_parser(rsub)
    _ACTIONS[:] = list(rsub.choices)


def route(argv: Sequence[str]) -> list[str]:
    """`report RUN_DIR ...` -> `report judge RUN_DIR ...`; anything else unchanged."""
    args = list(argv)
    i = next((n for n, a in enumerate(args) if not a.startswith("-")), None)
    if i is None or args[i] != "report" or i + 1 >= len(args):
        return args
    first = args[i + 1]
    if first in _ACTIONS or first in ("-h", "--help"):
        return args
    return [*args[:i + 1], DEFAULT_ACTION, *args[i + 1:]]


def cmd_judge(args: argparse.Namespace) -> int:
    from testbed.report.html import write_html
    from testbed.report.jsonreport import write_json
    from testbed.report.junit import write_junit
    from testbed.report.rejudge import rejudge
    from testbed.report.summary import print_summary
    from testbed.run_commands import run_status

    meta, judged = rejudge(args.run_dir)
    results = [j.result for j in judged]
    print_summary(results, meta)
    for j in judged:
        if j.how != "judged again":
            print(f"report: {j.result.scenario}: {j.how}")
        for line in j.changes:
            print(f"report: {j.result.scenario}: changed: {line}")
    changed = sum(bool(j.changes) for j in judged)
    print(f"report: {len(judged)} scenario(s) judged again from {args.run_dir}; "
          + (f"{changed} with verdicts changed from the run's" if changed
             else "every verdict as the run's"))
    for kind, path, fn in (("junit", args.junit, write_junit), ("json", args.json, write_json),
                           ("html", args.html, write_html)):
        if path is None:
            path = args.run_dir / f"report.{'xml' if kind == 'junit' else kind}"
        fn(results, path, meta)
        print(f"{kind}: {path}")
    sys.stdout.flush()
    return run_status(results)
