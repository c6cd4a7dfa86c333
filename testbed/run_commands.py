"""`testbed run` (the main job) and `testbed matrix` (every injected bug against every check)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from testbed import paths
from testbed.boot.commands import terminate_on_signals
from testbed.boot.kernelimage import inspect_kernel
from testbed.boot.machine import resolve_accel
from testbed.build.initramfs import ImageSpec, build_image
from testbed.check.kernel_log import CHECK as KERNEL_LOG
from testbed.check.model import CheckInfo, ScenarioResult, Status
from testbed.designs import DEFAULT_DESIGN, Design, get_design
from testbed.errors import EXIT_TESTBED_ERROR, UsageError
from testbed.progress import Progress
from testbed.report.common import RunMeta
from testbed.reproduce import resolve_kernel_spec
from testbed.runner import (
    DEFAULT_MODES,
    MODES,
    GuestSpec,
    Mode,
    RunInterrupted,
    check_append,
    default_parallel,
    expand_modes,
    parse_modes,
    run_all,
)
from testbed.snapshot.memdump import DEFAULT_MAX_MIB, DumpPolicy


def _design(args: argparse.Namespace) -> Design:
    return get_design(getattr(args, "design", DEFAULT_DESIGN))


def all_checks(design: Design) -> dict[str, CheckInfo]:
    """The design's checks and the design-independent kernel_log check."""
    return {KERNEL_LOG.name: KERNEL_LOG, **design.checks}


def guest_spec(args: argparse.Namespace) -> tuple[GuestSpec, dict[str, float]]:
    """Kernel (built or cached reference kernel unless --kernel), image and accelerator."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    if args.kernel is not None:
        kernel = resolve_kernel_spec(args.kernel, getattr(args, "kernel_series", None))
    else:
        from testbed.build.kernel import build_kernel

        kernel = build_kernel(series=_design(args).kernel_series).bzimage
    timings["kernel"] = round(time.monotonic() - t0, 2)
    info = inspect_kernel(kernel)
    check_kernel = _design(args).check_kernel
    if check_kernel is not None:
        check_kernel(kernel)  # before any guest boots: a kernel the design cannot run on
    t0 = time.monotonic()
    image = build_image(ImageSpec(kernel=info))
    timings["image"] = round(time.monotonic() - t0, 2)
    modes = run_modes(args)
    accel = resolve_accel(args.accel, modes[0].paging, kernel, image.path)
    print(f"testbed: {accel.describe()}", file=sys.stderr)
    spec = GuestSpec(kernel=kernel, initrd=image.path, accel=accel, paging=modes[0].paging,
                     pti=modes[0].pti, append=args.append, dump=dump_policy(args))
    return spec, timings


def dump_policy(args: argparse.Namespace) -> DumpPolicy:
    """--no-dump / --dump-max-mib (commands without them take no dumps)."""
    return DumpPolicy(enabled=not getattr(args, "no_dump", True),
                      max_mib=getattr(args, "dump_max_mib", DEFAULT_MAX_MIB))


def run_modes(args: argparse.Namespace) -> tuple[Mode, ...]:
    """--paging/--pti name one mode; otherwise --modes (default: l5 and l4pti)."""
    if args.paging is not None or args.pti is not None:
        if args.modes is not None:
            raise UsageError("--modes and --paging/--pti exclude each other: use one")
        paging = args.paging or 5
        pti = args.pti or "auto"
        known = next((m for m in MODES.values() if (m.paging, m.pti) == (paging, pti)), None)
        return (known or Mode(f"l{paging}-pti{pti}", paging, pti),)
    return parse_modes(",".join(DEFAULT_MODES) if args.modes is None else args.modes)


def check_usage(args: argparse.Namespace) -> None:
    """Option values checked before anything is built or booted."""
    check_append(args.append)
    run_modes(args)
    if getattr(args, "repeat", 1) < 1:
        raise UsageError(f"--repeat {args.repeat}: must be 1 or more")
    if args.parallel < 1:
        raise UsageError(f"--parallel {args.parallel}: must be 1 or more")
    if getattr(args, "dump_max_mib", 1) < 1:
        raise UsageError(f"--dump-max-mib {args.dump_max_mib}: must be 1 or more")


def _meta(spec: GuestSpec, bugs: tuple[str, ...], started: float, timings: dict[str, float],
          results: list[ScenarioResult], modes: tuple[Mode, ...], design: Design) -> RunMeta:
    osrel = next((s.kernel.osrelease for r in results for s in r.snapshots.values()), "")
    return RunMeta(
        design=design.name, title=design.title, checks=all_checks(design),
        kernel=str(spec.kernel), osrelease=osrel, bugs=bugs, accel=spec.accel.describe(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        seconds=round(time.time() - started, 1), timings=timings,
        extra={"modes": [m.name for m in modes], "append": spec.append},
    )


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.report.html import write_html
    from testbed.report.jsonreport import write_json
    from testbed.report.junit import write_junit
    from testbed.report.summary import print_summary

    terminate_on_signals()
    started = time.time()
    check_usage(args)
    design = _design(args)
    scenarios = design.select(args.scenario)
    modes = run_modes(args)
    bugs = tuple(args.bug or ())
    design.check_bugs(bugs)
    parent = _parent(args.run_dir, "run")
    spec, timings = guest_spec(args)
    prog = Progress("run")
    jobs = [(sc, bugs, mode) for sc, mode in expand_modes(scenarios, modes)]
    prog.update(f"{len(jobs)} scenario run(s) ({', '.join(m.name for m in modes)}) on "
                f"{args.parallel} guest(s) at a time", force=True)
    t0 = time.monotonic()
    stopped: RunInterrupted | None = None
    try:
        results = run_all(jobs, spec, parent, args.parallel)
    except RunInterrupted as exc:
        stopped, results = exc, exc.finished
    timings["scenarios"] = round(time.monotonic() - t0, 2)
    prog.done("interrupted" if stopped else "done")
    meta = _meta(spec, bugs, started, timings, results, modes, design)
    if stopped:
        meta.extra["interrupted"] = str(stopped)
    print_summary(results, meta)
    outputs = {"junit": args.junit, "json": args.json, "html": args.html}
    for kind, path in outputs.items():
        if path is None:
            path = parent / f"report.{'xml' if kind == 'junit' else kind}"
        {"junit": write_junit, "json": write_json, "html": write_html}[kind](results, path, meta)
        print(f"{kind}: {path}")
    print(f"run folder: {parent}")
    if stopped:
        print(f"testbed: interrupted by {stopped}: the reports cover those", file=sys.stderr)
        return stopped.signal.exit_status
    return run_status(results)


def run_status(results: list[ScenarioResult]) -> int:
    """0 all passed; 1 a check failed; 125 nothing failed but something could not be
    judged (a scenario that could not run, a check that could not be evaluated)."""
    if any(r.checks_with(Status.FAIL) for r in results):
        return 1
    if all(r.passed for r in results):
        return 0
    return EXIT_TESTBED_ERROR


def _parent(run_dir: Path | None, kind: str) -> Path:
    """The run's folder: --run-dir (checked now, before any build or boot) or a new one."""
    if run_dir is None:
        return paths.new_run_dir(kind)
    return paths.make_private(paths.prepare_run_dir(run_dir))


def matrix_rows(per_bug: dict[str, list[list[ScenarioResult]]], checks: list[str],
                *, every_bug_must_show: bool = True, infos: dict[str, CheckInfo] | None = None
                ) -> tuple[list[dict[str, Any]], list[str]]:
    """Cells of the matrix and the problems (false alarms, uncaught bugs). Pure.

    Without `every_bug_must_show` (some of the scenarios, every bug) an uncaught
    bug is reported in its row but is not a problem: those scenarios may not
    exercise it.
    """
    infos = infos if infos is not None else all_checks(get_design())
    rows, problems = [], []
    for bug, reps in per_bug.items():
        failed = [set().union(*(r.failed_checks() for r in rep)) for rep in reps]
        # a bug is caught by a check's *fail*: an error (could not judge, not exercised,
        # e.g. a workload that crashed before its checkpoints) shows as ERR, catches nothing
        fails = [set().union(*(r.checks_with(Status.FAIL) for r in rep)) for rep in reps]
        cells = {}
        for c in checks:
            n = sum(c in f for f in fails)
            e = sum(c in f and c not in g for f, g in zip(failed, fails, strict=True))
            named = "*" if bug and c in infos and bug in infos[c].bugs else ""
            cells[c] = (f"FAIL{named}" if n == len(reps) else f"FAIL {n}/{len(reps)}{named}"
                        if n else f"ERR{named}" if e == len(reps) else
                        f"ERR {e}/{len(reps)}{named}" if e else ("-" + named if named else "-"))
        other = sorted(set().union(*failed) - set(checks))
        if not bug:
            bad = sorted(set().union(*failed))
            verdict = "ok" if not bad else f"FALSE ALARM: {', '.join(bad)}"
            if bad:
                problems.append(f"the correct kernel failed {', '.join(bad)}")
        else:
            caught = all(any(c in f and c in infos and bug in infos[c].bugs for c in checks)
                         for f in fails)
            if caught:
                verdict = "caught"
            elif every_bug_must_show:
                verdict = "NOT CAUGHT"
                problems.append(f"{bug} not caught by a check named for it in every repetition")
            else:
                verdict = "not shown by these scenarios"
        if other:
            verdict += f" (also: {', '.join(other)})"
        rows.append({"bug": bug, "cells": cells, "verdict": verdict})
    return rows, problems


def cmd_matrix(args: argparse.Namespace) -> int:
    from testbed.report.common import text_env

    terminate_on_signals()
    started = time.time()
    check_usage(args)
    design = _design(args)
    scenarios = design.select(args.scenario)
    modes = run_modes(args)
    bugs = [""] + list(args.bug or design.bugs)
    parent = _parent(args.run_dir, "matrix")
    spec, timings = guest_spec(args)
    runs = expand_modes(scenarios, modes)
    jobs = [(sc, (b,) if b else (), mode) for _ in range(args.repeat) for b in bugs
            for sc, mode in runs]
    prog = Progress("matrix")
    prog.update(f"{len(jobs)} guests, {args.parallel} at a time", force=True)
    try:
        results = run_all(jobs, spec, parent, args.parallel)
    except RunInterrupted as exc:
        prog.done("interrupted")
        return _matrix_interrupted(exc, args, scenarios, parent, started)
    prog.done()
    per_bug: dict[str, list[list[ScenarioResult]]] = {b: [] for b in bugs}
    i = 0
    for _ in range(args.repeat):
        for b in bugs:
            per_bug[b].append(results[i:i + len(runs)])
            i += len(runs)
    infos = all_checks(design)
    checks = list(infos)
    # every bug must show when all scenarios ran, or when the bugs were chosen by name
    must_show = bool(args.bug) or len(scenarios) == len(design.scenarios)
    rows, problems = matrix_rows(per_bug, checks, every_bug_must_show=must_show, infos=infos)
    text = text_env().get_template("matrix.txt.j2").render(
        rows=rows, checks=checks, repeat=args.repeat, ok=not problems, problems=problems,
        seconds=time.time() - started,
    )
    sys.stdout.write(text)
    doc = {
        "schema": "testbed.matrix", "schema_version": 1, "repeat": args.repeat,
        "scenarios": [s.name for s in scenarios], "modes": [m.name for m in modes],
        "checks": checks, "rows": rows,
        "problems": problems, "seconds": round(time.time() - started, 1),
        "runs": _matrix_runs(results),
    }
    out = args.json or parent / "matrix.json"
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"json: {out}\nrun folder: {parent}")
    return 0 if not problems else 1


def _matrix_runs(results: list[ScenarioResult]) -> list[dict[str, Any]]:
    return [{"scenario": r.scenario, "bugs": list(r.bugs), "run_dir": r.run_dir,
             "failed_checks": sorted(r.failed_checks()), "error": r.error} for r in results]


def _matrix_interrupted(exc: RunInterrupted, args: argparse.Namespace, scenarios: list[Any],
                        parent: Path, started: float) -> int:
    """An interrupted matrix: no verdict, the finished runs in matrix.json."""
    doc = {
        "schema": "testbed.matrix", "schema_version": 1, "repeat": args.repeat,
        "scenarios": [s.name for s in scenarios], "interrupted": str(exc),
        "seconds": round(time.time() - started, 1), "runs": _matrix_runs(exc.finished),
    }
    out = args.json or parent / "matrix.json"
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"json: {out}\nrun folder: {parent}")
    print(f"testbed: matrix interrupted by {exc}: no verdict", file=sys.stderr)
    return exc.signal.exit_status


def _common(p: argparse.ArgumentParser) -> None:
    design = get_design(DEFAULT_DESIGN)
    p.add_argument("scenario", nargs="*",
                   help=f"scenarios (default all: {', '.join(design.scenarios)})")
    p.add_argument("--kernel", type=Path,
                   help=f"bzImage with vmlinux or System.map beside it, or a cached build's "
                        f"key (default: the "
                        f"{design.kernel_series} reference kernel, built or from the cache)")
    p.add_argument("--kernel-series", metavar="NAME",
                   help="with --kernel KEY: build this series when the cache lacks KEY "
                        "(how reproduce.sh names its kernel)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--modes", metavar="M,M",
                   help=f"paging modes to run the scenarios in, of {', '.join(MODES)} "
                        f"(l5: 5-level paging, PTI off; l4pti: 4-level, PTI on; default "
                        f"{','.join(DEFAULT_MODES)}); the selftest runs in the first only")
    p.add_argument("--paging", type=int, choices=(4, 5), default=None,
                   help="run in this one paging mode (with --pti; default: --modes)")
    p.add_argument("--pti", choices=("auto", "on", "off"), default=None)
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--parallel", type=int, default=default_parallel(), metavar="N",
                   help="guests at a time (default: host CPUs / 2, at most 4)")
    p.add_argument("--run-dir", type=Path, help="parent folder of the scenarios' run folders")
    p.add_argument("--bug", action="append", choices=design.bugs, metavar="NAME",
                   help=f"boot with this injected bug (repeatable): {', '.join(design.bugs)}")
    p.add_argument("--json", type=Path, metavar="FILE", help="JSON report")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("run", help="verify RPAL: scenarios, snapshots, checks, reports")
    _common(p)
    p.add_argument("--junit", type=Path, metavar="FILE", help="JUnit XML report")
    p.add_argument("--html", type=Path, metavar="FILE", help="HTML report with the slot picture")
    p.add_argument("--no-dump", action="store_true",
                   help="keep no memory dump: by default, when a host check fails at a "
                        "checkpoint, the guest's memory at that moment is kept in the "
                        "scenario's run folder (memory-CHECKPOINT.elf, dump.json; open it "
                        "with `testbed inspect --dump RUN_DIR`)")
    p.add_argument("--dump-max-mib", type=int, default=DEFAULT_MAX_MIB, metavar="MIB",
                   help=f"no dump of a guest with more RAM than this (default "
                        f"{DEFAULT_MAX_MIB}; a dump is as large as the guest's RAM)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "matrix", help="run every scenario with no bug and with each injected bug",
        description="Run the scenarios on the reference kernel with no bug and with each "
        "injected bug, and show which checks catch what. Exit status 1 on a false alarm, or "
        "when a bug is not caught by a check named for it; with only some scenarios (and no "
        "--bug) a bug they do not show is listed, not failed.",
    )
    _common(p)
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="repetitions (flakes)")
    p.set_defaults(func=cmd_matrix)
