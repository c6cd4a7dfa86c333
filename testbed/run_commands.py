"""`testbed run` (the main job) and `testbed matrix` (every injected bug against every check)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed import paths
from testbed.boot.commands import terminate_on_signals
from testbed.boot.kernelimage import inspect_kernel, resolve_kernel
from testbed.boot.machine import resolve_accel
from testbed.build.initramfs import ImageSpec, build_image
from testbed.check.kernel_log import CHECK as KERNEL_LOG
from testbed.check.model import CheckInfo, ScenarioResult, Status
from testbed.designs import DEFAULT_DESIGN, Design, get_design
from testbed.errors import EXIT_TESTBED_ERROR, UsageError
from testbed.progress import Progress, log_line, verbosity
from testbed.report.common import RunMeta, case_counts
from testbed.reproduce import resolve_kernel_spec
from testbed.runner import (
    DEFAULT_MODES,
    MODES,
    GuestSpec,
    Job,
    Mode,
    RunInterrupted,
    check_append,
    default_parallel,
    expand_modes,
    job_name,
    machine_config,
    parse_modes,
    run_all,
)
from testbed.selection import parse_keyword, parse_shard
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
    record = getattr(args, "record", False)
    if record:
        accel = record_accel(args.accel, modes[0].paging)
    else:
        accel = resolve_accel(args.accel, modes[0].paging, kernel, image.path)
    print(f"testbed: {accel.describe()}", file=sys.stderr)
    spec = GuestSpec(kernel=kernel, initrd=image.path, accel=accel, paging=modes[0].paging,
                     pti=modes[0].pti, append=args.append, dump=dump_policy(args),
                     record=record,
                     extra=dict(getattr(args, "scenario_options", None) or {}))
    return spec, timings


def record_accel(want: str, paging: int) -> Any:
    """The accelerator of a recorded run: TCG (QEMU's record/replay needs -icount)."""
    from testbed.boot.hostcaps import Accel, choose_accel

    if want == "kvm":
        raise UsageError("--record runs under TCG (QEMU's record/replay needs -icount): "
                         "not with --accel kvm")
    tcg = choose_accel("tcg", paging)
    return Accel(tcg.accel, tcg.cpu, "TCG: --record (QEMU's record/replay needs -icount)")


OWN_RUNNER_REFUSAL = "the design runs it its own way (its own guest), not as a recorded run"


def recordable(scenarios: list[Any], named: bool, design: Any = None) -> list[Any]:
    """The scenarios --record can run: one it cannot is a usage error when named, and is
    left out (said on stderr) when the run takes every scenario."""
    from testbed.runner import record_refusal

    own_runners = design.extra.get("scenario_runners", {}) if design is not None else {}
    out = []
    for sc in scenarios:
        why = record_refusal(sc) or (OWN_RUNNER_REFUSAL if sc.name in own_runners else "")
        if not why:
            out.append(sc)
        elif named:
            raise UsageError(f"--record: {sc.name} cannot be recorded: {why}")
        else:
            print(f"testbed: --record leaves out {sc.name}: {why}", file=sys.stderr)
    return out


def dump_policy(args: argparse.Namespace) -> DumpPolicy:
    """--no-dump / --dump-max-mib (commands without them take no dumps)."""
    return DumpPolicy(enabled=not getattr(args, "no_dump", True),
                      max_mib=getattr(args, "dump_max_mib", DEFAULT_MAX_MIB))


def dry_run_spec(args: argparse.Namespace) -> tuple[GuestSpec, list[str]]:
    """The guest spec without building or booting anything (--dry-run): the kernel named
    or the cached reference build (else its future path), a placeholder image, the
    accelerator chosen without the KVM boot probe; and notes on what would be built."""
    from testbed.boot.hostcaps import choose_accel

    notes: list[str] = []
    if args.kernel is not None:
        kernel = resolve_kernel(args.kernel)
    else:
        from testbed.build.kernel import plan_kernel

        plan = plan_kernel(series=_design(args).kernel_series)
        kernel = plan.dir / "bzImage"
        notes.append(f"kernel: {plan.key} ({plan.series.name}) "
                     + ("cached" if plan.cached else "would be built first (not cached)"))
    notes.append("initramfs: built for the kernel (or from the cache) before the first guest")
    modes = run_modes(args)
    accel = choose_accel(args.accel, modes[0].paging)
    notes.append(f"accelerator: {accel.describe()}"
                 + (" (auto: a probe guest would confirm KVM first)"
                    if args.accel == "auto" and accel.accel == "kvm" else ""))
    record = getattr(args, "record", False)
    if record:
        accel = record_accel(args.accel, modes[0].paging)
    spec = GuestSpec(kernel=kernel, initrd=Path("INITRAMFS"), accel=accel,
                     paging=modes[0].paging, pti=modes[0].pti, append=args.append,
                     record=record)
    return spec, notes


def print_dry_run(jobs: Sequence[Job], spec: GuestSpec, notes: list[str], what: str) -> None:
    """What `--dry-run` prints: what would be built, each guest with its QEMU command."""
    from testbed.boot.machine import dry_run_args

    for n in notes:
        print(f"dry run: {n}")
    print(f"dry run: {len(jobs)} {what} would run")
    for i, job in enumerate(jobs, 1):
        sc, bugs, mode = job
        cfg = machine_config(sc, spec, bugs, mode)
        how = (f"workloads: {'; '.join(sc.workloads)}" if sc.workloads else
               f"selftest {sc.selftest}" if sc.selftest else "run by the design itself")
        print(f"{i:3d}. {job_name(job)}: {sc.title}; {how}; checks: {', '.join(sc.checks)}")
        run_dir = Path("RUN_DIR") / job_name(job).replace(" +", "-")
        print(f"     qemu: {shlex.join(dry_run_args(cfg, run_dir))}")


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
    if getattr(args, "shard", None) is not None:
        parse_shard(args.shard)
    if getattr(args, "keyword", None) is not None:
        parse_keyword(args.keyword)
    if getattr(args, "repeat", 1) < 1:
        raise UsageError(f"--repeat {args.repeat}: must be 1 or more")
    if args.parallel < 1:
        raise UsageError(f"--parallel {args.parallel}: must be 1 or more")
    if getattr(args, "dump_max_mib", 1) < 1:
        raise UsageError(f"--dump-max-mib {args.dump_max_mib}: must be 1 or more")


def _meta(spec: GuestSpec, bugs: tuple[str, ...], started: float, timings: dict[str, float],
          results: list[ScenarioResult], modes: tuple[Mode, ...], design: Design,
          args: argparse.Namespace | None = None) -> RunMeta:
    from testbed.build.kernel import kernel_facts

    facts = kernel_facts(spec.kernel)
    osrel = facts["osrelease"] or next(
        (s.kernel.osrelease for r in results for s in r.snapshots.values()
         if s.kernel.osrelease), "")
    extra: dict[str, Any] = {"modes": [m.name for m in modes], "append": spec.append}
    if args is not None:
        if getattr(args, "shard", None):
            extra["shard"] = str(parse_shard(args.shard))
        if getattr(args, "keyword", None):
            extra["selection"] = args.keyword
    return RunMeta(
        design=design.name, title=design.title, checks=all_checks(design),
        kernel=str(spec.kernel), osrelease=osrel, bugs=bugs, accel=spec.accel.describe(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        seconds=round(time.time() - started, 1), timings=timings,
        extra=extra, kernel_info=facts,
    )


def select_jobs(jobs: list[Any], args: argparse.Namespace, names: Any
                ) -> tuple[list[Any], int]:
    """-k then --shard over the full ordered job list; `names(job)` -> the job's names.

    A -k that selects nothing is a usage error; an empty shard (more shards than jobs)
    is not: it runs nothing and passes. Returns the jobs and how many -k selected."""
    if getattr(args, "keyword", None):
        match = parse_keyword(args.keyword)
        jobs = [j for j in jobs if match(names(j))]
        if not jobs:
            raise UsageError(f"-k {args.keyword!r} selects nothing: name a scenario, a mode "
                             "or a check (testbed list)")
    selected = len(jobs)
    if getattr(args, "shard", None):
        jobs = parse_shard(args.shard).take(jobs)
    return jobs, selected


def job_names(job: Job) -> list[str]:
    """What -k matches for a (scenario, bugs, mode) job."""
    sc, bugs, mode = job
    names = [sc.name, *sc.checks, *bugs]
    if mode is not None:
        names += [f"{sc.name}@{mode.name}", mode.name]
    return names


def print_run_folder(parent: Path) -> None:
    """The run folder, first thing on stdout (flushed: CI reads a pipe)."""
    print(f"run folder: {parent}", flush=True)


def result_line(r: ScenarioResult, finished: int, total: int) -> None:
    """One timestamped line per scenario as it finishes (stdout, flushed); -q hides it."""
    if verbosity() < 0:
        return
    c = case_counts(r)
    verdict = "PASS" if r.passed else ("ERROR" if r.error else "FAIL")
    where = "" if r.passed else f"  {r.run_dir}"
    log_line(f"{verdict:<5} {r.scenario} ({finished}/{total}): {c['pass']} passed, "
             f"{c['fail']} failed, {c['error']} errors, {c['skip']} skipped, "
             f"{r.seconds:.1f} s{where}")


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.report.html import write_html
    from testbed.report.jsonreport import write_json
    from testbed.report.junit import write_junit
    from testbed.report.summary import print_summary

    terminate_on_signals()
    started = time.time()
    check_usage(args)
    design = _design(args)
    scenarios = design.select(args.scenario, args.suite)
    if getattr(args, "record", False):
        scenarios = recordable(scenarios, bool(args.scenario), design)
        if args.accel == "kvm":
            record_accel(args.accel, 5)
    modes = run_modes(args)
    bugs = tuple(args.bug or ())
    design.check_bugs(bugs)
    all_jobs: list[Job] = [(sc, bugs, mode) for sc, mode in expand_modes(scenarios, modes)]
    jobs, selected = select_jobs(all_jobs, args, job_names)
    if args.dry_run:
        spec, notes = dry_run_spec(args)
        if args.shard:
            notes.append(f"shard {args.shard}: {len(jobs)} of {selected} scenario runs")
        print_dry_run(jobs, spec, notes, "scenario run(s)")
        return 0
    parent = _parent(args.run_dir, "run")
    print_run_folder(parent)
    spec, timings = guest_spec(args)
    prog = Progress("run")
    prog.update(f"{len(jobs)} scenario run(s) ({', '.join(m.name for m in modes)}) on "
                f"{args.parallel} guest(s) at a time", force=True)
    t0 = time.monotonic()
    stopped: RunInterrupted | None = None
    try:
        results = run_all(jobs, spec, parent, args.parallel, on_result=result_line,
                          stop_on_failure=args.exitfirst, progress=prog)
    except RunInterrupted as exc:
        stopped, results = exc, exc.finished
    timings["scenarios"] = round(time.monotonic() - t0, 2)
    prog.done("interrupted" if stopped else "done")
    meta = _meta(spec, bugs, started, timings, results, modes, design, args)
    if stopped:
        meta.extra["interrupted"] = str(stopped)
    if args.exitfirst and len(results) < len(jobs):
        meta.extra["stopped_at_first_failure"] = f"{len(jobs) - len(results)} not run"
    print_summary(results, meta)
    if "stopped_at_first_failure" in meta.extra:
        print(f"-x: stopped after the first failure; {len(jobs) - len(results)} scenario "
              "run(s) not started")
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


def judged_failures(r: ScenarioResult) -> set[str]:
    """The checks that failed on what they judged.

    A scenario that could not run (boot failure, a panic, a QEMU crash) keeps its
    kernel_log failure (the panic's lines) as evidence of why, but that is no
    judgement of the design: alone it makes the run 125, not 1.
    """
    failed = r.checks_with(Status.FAIL)
    if r.error:
        failed.discard(KERNEL_LOG.name)
    return failed


def run_status(results: list[ScenarioResult]) -> int:
    """0 all passed; 1 a check failed; 125 nothing failed but something could not be
    judged (a scenario that could not run: boot failure, guest panic, QEMU crash; a
    check that could not be evaluated)."""
    if any(judged_failures(r) for r in results):
        return 1
    if all(r.passed for r in results):
        return 0
    return EXIT_TESTBED_ERROR


def _parent(run_dir: Path | None, kind: str) -> Path:
    """The run's folder: --run-dir (checked now, before any build or boot) or a new one."""
    if run_dir is None:
        return paths.new_run_dir(kind)
    return paths.make_private(paths.prepare_run_dir(run_dir))


def bugs_for(design: Design, scenarios: Sequence[Any]) -> list[str]:
    """The injected bugs a matrix of these scenarios runs by default: every bug, except
    those a check of a suite left out is named for (the security review's bugs need
    `--suite security`, even where explore's pkru or keys check also sees them). Pure."""
    chosen = {s.name for s in scenarios}
    declared_in = {c: {s.name for s in design.scenarios.values() if c in s.checks}
                   for c in design.checks}
    suite_only = {c for c, where in declared_in.items()
                  if where and all(design.scenarios[s].suite for s in where)
                  and not where & chosen}
    infos = all_checks(design)
    return [b for b in design.bugs
            if not any(c in suite_only for c, i in infos.items() if b in i.bugs)]


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


def matrix_per_bug(results: Sequence[ScenarioResult], bugs: Sequence[str], repeat: int
                   ) -> dict[str, list[list[ScenarioResult]]]:
    """Results grouped as matrix_rows wants them: bug ("" none) -> per repetition (pure).

    Grouped by each result's bugs and repeat, not by position, so a merge of shards
    groups exactly as the unsharded matrix."""
    per_bug: dict[str, list[list[ScenarioResult]]] = {
        b: [[] for _ in range(repeat)] for b in bugs}
    for r in results:
        b = ",".join(r.bugs)
        if b in per_bug and 0 <= r.repeat < repeat:
            per_bug[b][r.repeat].append(r)
    # a shard may hold no run of a repetition or of a bug: no empty cells for those
    return {b: [rep for rep in reps if rep] for b, reps in per_bug.items() if any(reps)}


def render_matrix(results: Sequence[ScenarioResult], info: dict[str, Any],
                  infos: dict[str, CheckInfo], seconds: float) -> tuple[str, dict[str, Any]]:
    """The matrix text and matrix.json document from results and the matrix's `info`
    (bugs, repeat, scenarios, modes, must_show; as report.json keeps it in run.extra)."""
    from testbed.report.common import text_env

    checks = list(infos)
    per_bug = matrix_per_bug(results, info["bugs"], info["repeat"])
    # a shard's verdict lists what its runs did not show; the merge judges the whole
    must_show = info["must_show"] and not info.get("shard")
    rows, problems = matrix_rows(per_bug, checks, every_bug_must_show=must_show, infos=infos)
    text = text_env().get_template("matrix.txt.j2").render(
        rows=rows, checks=checks, repeat=info["repeat"], ok=not problems, problems=problems,
        seconds=seconds,
    )
    doc = {
        "schema": "testbed.matrix", "schema_version": 1, "repeat": info["repeat"],
        "scenarios": info["scenarios"], "modes": info["modes"],
        "checks": checks, "rows": rows,
        "problems": problems, "seconds": round(seconds, 1),
        "runs": _matrix_runs(list(results)),
    }
    return text, doc


def cmd_matrix(args: argparse.Namespace) -> int:
    from testbed.report.jsonreport import write_json

    terminate_on_signals()
    started = time.time()
    check_usage(args)
    design = _design(args)
    scenarios = design.select(args.scenario, args.suite)
    modes = run_modes(args)
    bugs = [""] + list(args.bug or bugs_for(design, scenarios))
    runs = expand_modes(scenarios, modes)
    all_jobs = [(rep, (sc, (b,) if b else (), mode)) for rep in range(args.repeat)
                for b in bugs for sc, mode in runs]
    chosen, selected = select_jobs(all_jobs, args, lambda rj: job_names(rj[1]))
    jobs: list[Job] = [j for _, j in chosen]
    reps = [rep for rep, _ in chosen]
    if args.dry_run:
        spec, notes = dry_run_spec(args)
        if args.shard:
            notes.append(f"shard {args.shard}: {len(jobs)} of {selected} guests")
        print_dry_run(jobs, spec, notes, "guest(s)")
        return 0
    parent = _parent(args.run_dir, "matrix")
    print_run_folder(parent)
    spec, timings = guest_spec(args)
    prog = Progress("matrix")
    prog.update(f"{len(jobs)} guests, {args.parallel} at a time", force=True)
    try:
        results = run_all(jobs, spec, parent, args.parallel, on_result=result_line,
                          progress=prog)
    except RunInterrupted as exc:
        prog.done("interrupted")
        return _matrix_interrupted(exc, args, scenarios, parent, started)
    prog.done()
    for r, rep in zip(results, reps, strict=True):
        r.repeat = rep
    infos = all_checks(design)
    # every bug must show when all scenarios ran, or when the bugs were chosen by name
    default = design.select(None, args.suite)
    must_show = bool(args.bug) or ({s.name for s in scenarios} >= {s.name for s in default}
                                   and not args.keyword)
    info = {"bugs": bugs, "repeat": args.repeat, "scenarios": [s.name for s in scenarios],
            "modes": [m.name for m in modes], "must_show": must_show}
    if args.shard:
        info["shard"] = str(parse_shard(args.shard))
    text, doc = render_matrix(results, info, infos, time.time() - started)
    if args.shard:
        doc["shard"] = info["shard"]
        text += (f"shard {args.shard}: {len(jobs)} of {selected} guests; the verdict "
                 "covers this shard only: merge the shards' report.json with "
                 "`testbed report merge`\n")
    sys.stdout.write(text)
    out = args.json or parent / "matrix.json"
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    meta = _meta(spec, (), started, timings, results, modes, design, args)
    meta.extra["matrix"] = info
    report = write_json(results, parent / "report.json", meta)
    print(f"json: {out}\nreport: {report}\nrun folder: {parent}")
    return 0 if not doc["problems"] else 1


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


def listing(design: Design) -> dict[str, Any]:
    """What `testbed list` shows, from the design (pure): scenarios, checks, bugs, modes."""
    checks = all_checks(design)
    return {
        "design": design.name,
        "scenarios": [{"name": sc.name, "title": sc.title, "workloads": list(sc.workloads),
                       "selftest": sc.selftest, "smp": sc.smp, "checks": list(sc.checks),
                       "needs_cpus": sc.needs_cpus, "record": _record_note(sc, design),
                       "suite": sc.suite,
                       "modes": [m for m in DEFAULT_MODES[:1 if sc.selftest else None]]}
                      for sc in design.scenarios.values()],
        "checks": [{**c.to_dict(), "scenarios": [sc.name for sc in design.scenarios.values()
                                                 if c.name in sc.checks]}
                   for c in checks.values()],
        "bugs": [{"name": b, "checks": [c.name for c in checks.values() if b in c.bugs]}
                 for b in design.bugs],
        "modes": [{"name": m.name, "paging": m.paging, "pti": m.pti,
                   "default": m.name in DEFAULT_MODES} for m in MODES.values()],
    }


def _record_note(sc: Any, design: Design) -> str:
    from testbed.runner import record_refusal

    why = record_refusal(sc) or (
        OWN_RUNNER_REFUSAL if sc.name in design.extra.get("scenario_runners", {}) else "")
    return f"no: {why}" if why else "yes (one vCPU)"


def cmd_list(args: argparse.Namespace) -> int:
    doc = listing(_design(args))
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(f"design {doc['design']}\n\nscenarios:")
    for sc in doc["scenarios"]:
        how = ("; ".join(sc["workloads"]) or (f"selftest {sc['selftest']}" if sc["selftest"]
                                              else "run by the design"))
        suite = f" (suite {sc['suite']}: --suite {sc['suite']})" if sc["suite"] else ""
        print(f"  {sc['name']:<16} {sc['title']}{suite}\n  {'':<16} runs: {how}\n"
              f"  {'':<16} checks: {', '.join(sc['checks'])}\n"
              f"  {'':<16} --record: {sc['record']}")
    print("\nchecks (source: host = judged from snapshots, guest = the workloads' verdicts):")
    for c in doc["checks"]:
        print(f"  {c['name']:<18} [{c['source']}] {c['title']}; bugs: "
              f"{', '.join(c['bugs']) or '-'}; in: {', '.join(c['scenarios']) or 'every scenario'}")
    print("\ninjected bugs (--bug NAME):")
    for b in doc["bugs"]:
        print(f"  {b['name']:<24} shown by: {', '.join(b['checks'])}")
    print("\nmodes (--modes):")
    for m in doc["modes"]:
        print(f"  {m['name']:<6} {m['paging']}-level paging, PTI {m['pti']}"
              + ("  (default)" if m["default"] else ""))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    design = get_design(DEFAULT_DESIGN)
    p.add_argument("scenario", nargs="*",
                   help=f"scenarios (default all but the suites': "
                        f"{', '.join(s.name for s in design.select(None))})")
    p.add_argument("--suite", choices=design.suites or None, default=None,
                   help=f"the scenarios of a suite instead ({', '.join(design.suites)}: the "
                        "security review, SECURITY.md); left out of the default job")
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
    p.add_argument("-k", dest="keyword", metavar="EXPR",
                   help="only the scenario runs whose scenario, SCENARIO@MODE, mode, check or "
                        "bug name contains a word of EXPR (pytest syntax: and, or, not, "
                        "parentheses), e.g. -k slot_copies, -k 'pair and not l4pti'")
    p.add_argument("--shard", metavar="I/N",
                   help="run only shard I of N: every N-th of the ordered runs from the I-th "
                        "(the same split on every host); merge the shards' report.json files "
                        "with `testbed report merge`")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would run and each guest's QEMU command line; build, "
                        "boot and write nothing")


EXIT_STATUS_HELP = (
    "exit status: 0 every check passed; 1 a check failed; 2 usage error (nothing started); "
    "125 the testbed could not judge (no kernel, boot failure, a guest panic before the "
    "workload or a QEMU crash, a check that could not be evaluated) and nothing failed; "
    "130/143 interrupted by SIGINT/SIGTERM (reports cover what finished)"
)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="verify RPAL: scenarios, snapshots, checks, reports",
        description="Run the scenarios (each on a guest of its own, in each paging mode), "
        "snapshot the guests at every checkpoint, run the checks and write the terminal "
        "summary and the JUnit, JSON and HTML reports. The run folder is printed first, a "
        "line per scenario as it finishes.",
        epilog=EXIT_STATUS_HELP,
    )
    _common(p)
    p.add_argument("-x", "--exitfirst", action="store_true",
                   help="start no further scenario after the first that did not pass")
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
    p.add_argument("--record", action="store_true",
                   help="run each scenario on one vCPU under QEMU's record/replay (TCG, "
                        "no network: commands and checkpoints on serial lines) and keep "
                        "the recording in its run folder (rr.bin, rr.json, initrd.cpio): "
                        "`testbed replay RUN_DIR [--gdb]` replays it instruction for "
                        "instruction to the failing checkpoint. Scenarios that need two "
                        "CPUs cannot be recorded (testbed list says which and why)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "list", help="the scenarios, checks (source, bugs that show them), bugs and modes",
        description="List what `testbed run` can run: the design's scenarios with their "
        "checks and whether `run --record` can run them (QEMU records one vCPU: a scenario "
        "that needs two cannot be recorded, and the list says why), every check with its "
        "source (host: judged from snapshots; guest: the "
        "workloads' verdict lines) and the injected bugs it is named for, the injected "
        "bugs with the checks that show them, and the paging modes.",
    )
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "matrix", help="run every scenario with no bug and with each injected bug",
        description="Run the scenarios on the reference kernel with no bug and with each "
        "injected bug, and show which checks catch what. Exit status 1 on a false alarm, or "
        "when a bug is not caught by a check named for it; with only some scenarios (and no "
        "--bug) a bug they do not show is listed, not failed; a --shard's verdict lists "
        "what it did not show (`testbed report merge` of the shards judges the whole).",
        epilog=EXIT_STATUS_HELP.replace("a check failed", "a false alarm or a bug not caught"),
    )
    _common(p)
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="repetitions (flakes)")
    p.set_defaults(func=cmd_matrix)
