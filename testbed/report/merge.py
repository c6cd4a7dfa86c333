"""`testbed report merge R1.json R2.json ...`: the reports of shards (`--shard I/N` of run,
matrix or explore, on several CI runners) as one, with the totals and verdicts of an
unsharded run.

The scenario runs are put back in the order of the unsharded run (shard I's k-th run was
the (k*N + I)-th), a run that two reports both hold is refused (the same shard given
twice), and so are missing shards. Reports of `testbed matrix` (run.extra.matrix) are
judged again as a whole: the matrix table and its problems come from all the shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.check.model import ScenarioResult
from testbed.errors import TestbedError, UsageError

from .common import RunMeta


class MergeError(TestbedError):
    pass


def _shard_of(meta: RunMeta) -> tuple[int, int] | None:
    text = str(meta.extra.get("shard", ""))
    if not text:
        return None
    from testbed.selection import parse_shard

    try:
        s = parse_shard(text)
    except UsageError:
        return None
    return s.index, s.count


def merge_reports(reports: Sequence[tuple[str, RunMeta, list[ScenarioResult]]], *,
                  partial: bool = False) -> tuple[RunMeta, list[ScenarioResult]]:
    """One (meta, results) from the shards' (name, meta, results). Pure.

    MergeError for reports of different designs, runs found twice, missing shards
    (unless `partial`)."""
    if not reports:
        raise MergeError("report merge: give at least one report")
    designs = {m.design for _, m, _ in reports}
    if len(designs) > 1:
        names = ", ".join(sorted(designs))
        raise MergeError(f"report merge: reports of different designs ({names}): merge the "
                         "shards of one run")
    kinds = {"matrix" if "matrix" in m.extra else "run" for _, m, _ in reports}
    if len(kinds) > 1:
        raise MergeError("report merge: matrix and run reports mixed: merge the shards of one "
                         "command")
    shards = [_shard_of(m) for _, m, _ in reports]
    counts = {s[1] for s in shards if s is not None}
    if len(counts) > 1:
        splits = ", ".join(map(str, sorted(counts)))
        raise MergeError(f"report merge: shards of different splits ({splits} shards): merge "
                         "the shards of one run")
    if counts and not partial:
        n = counts.pop()
        have = [s[0] for s in shards if s is not None]
        dup = sorted({i for i in have if have.count(i) > 1})
        if dup:
            raise MergeError(f"report merge: shard {dup[0]}/{n} given twice")
        missing = sorted(set(range(1, n + 1)) - set(have))
        if missing:
            raise MergeError(f"report merge: shard {', '.join(f'{i}/{n}' for i in missing)} "
                             "missing: merge every shard's report (or pass --partial)")
    placed: list[tuple[tuple[int, int, int], ScenarioResult]] = []
    seen: dict[tuple[str, tuple[str, ...], int], str] = {}
    for pos, ((name, _meta, results), shard) in enumerate(zip(reports, shards, strict=True)):
        for k, r in enumerate(results):
            key = (r.scenario, tuple(r.bugs), r.repeat)
            if key in seen:
                raise MergeError(f"report merge: {r.scenario} (bugs "
                                 f"{','.join(r.bugs) or 'none'}) is in both {seen[key]} and "
                                 f"{name}: give each shard once")
            seen[key] = name
            # unsharded order: shard I's k-th run was run k*N + I - 1; the rest after them
            order = (0, k * shard[1] + shard[0] - 1, 0) if shard else (1, pos, k)
            placed.append((order, r))
    results = [r for _, r in sorted(placed, key=lambda x: x[0])]
    first = reports[0][1]
    meta = RunMeta.from_dict(first.to_dict())
    meta.extra.pop("shard", None)
    meta.extra["merged_from"] = [name for name, _, _ in reports]
    accels = list(dict.fromkeys(m.accel for _, m, _ in reports if m.accel))
    meta.accel = "; ".join(accels)
    meta.seconds = max(m.seconds for _, m, _ in reports)  # the shards ran side by side
    meta.started = min((m.started for _, m, _ in reports if m.started), default="")
    bugs = list(dict.fromkeys(b for _, m, _ in reports for b in m.bugs))
    meta.bugs = tuple(bugs)
    interrupted = [f"{name}: {m.extra['interrupted']}" for name, m, _ in reports
                   if m.extra.get("interrupted")]
    if interrupted:
        meta.extra["interrupted"] = "; ".join(interrupted)
    return meta, results


def cmd_merge(args: argparse.Namespace) -> int:
    from testbed.report.html import write_html
    from testbed.report.jsonreport import read_json, write_json
    from testbed.report.junit import write_junit
    from testbed.report.summary import print_summary

    loaded = []
    for path in args.reports:
        try:
            meta, results = read_json(path)
        except FileNotFoundError:
            raise UsageError(f"report merge: {path} does not exist: give the shards' "
                             "report.json files") from None
        except (OSError, ValueError) as exc:
            raise TestbedError(f"report merge: {path} is not a testbed report ({exc})") from None
        loaded.append((str(path), meta, results))
    meta, results = merge_reports(loaded, partial=args.partial)
    print_summary(results, meta)
    status = _status(results)
    if "matrix" in meta.extra:
        status = _matrix(meta, results, args.matrix_json)
    for kind, path, fn in (("json", args.json, write_json), ("junit", args.junit, write_junit),
                           ("html", args.html, write_html)):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fn(results, path, meta)
            print(f"{kind}: {path}")
    return status


def _status(results: list[ScenarioResult]) -> int:
    from testbed.run_commands import run_status

    return run_status(results)


def _matrix(meta: RunMeta, results: list[ScenarioResult], out: Path | None) -> int:
    from testbed.run_commands import render_matrix

    info = dict(meta.extra["matrix"])
    info.pop("shard", None)
    text, doc = render_matrix(results, info, meta.checks, meta.seconds)
    sys.stdout.write(text)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"matrix json: {out}")
    return 0 if not doc["problems"] else 1


def add_merge_parser(rsub: Any) -> None:
    p = rsub.add_parser(
        "merge", help="merge the JSON reports of shards into one report",
        description="Merge the report.json files of `--shard I/N` runs (run, matrix, "
        "explore) into one report whose totals and verdicts are those of the unsharded "
        "run; print its summary and write the reports asked for. Exit status as `testbed "
        "run` (or `testbed matrix` for matrix shards) would have given.",
    )
    p.add_argument("reports", nargs="+", type=Path, metavar="REPORT.json")
    p.add_argument("--json", type=Path, metavar="F", help="the merged JSON report")
    p.add_argument("--junit", type=Path, metavar="F", help="the merged JUnit XML")
    p.add_argument("--html", type=Path, metavar="F", help="the merged HTML report")
    p.add_argument("--matrix-json", type=Path, metavar="F",
                   help="matrix shards: the merged matrix.json")
    p.add_argument("--partial", action="store_true",
                   help="merge even when shards are missing (the verdict covers those given)")
    p.set_defaults(func=cmd_merge)


def add_parser(sub: Any) -> None:
    """`testbed report ...`: work on finished runs' reports."""
    p = sub.add_parser("report", help="work on finished runs' reports (merge shards)")
    rsub = p.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    add_merge_parser(rsub)
