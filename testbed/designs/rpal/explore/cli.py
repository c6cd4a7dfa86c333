"""`testbed explore`: model-based random testing of the RPAL ABI, judged after every step.

Exit status: 0 no check failed, 1 a check failed (the failure is shrunk and
saved as failure-1.json / failure-1.sh in the run folder), 125 the testbed
could not run (like `testbed run`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from testbed import paths
from testbed.errors import TestbedError

DEFAULT_SEED = 1
DEFAULT_STEPS = 40
DEFAULT_TIME = 120.0
DEFAULT_SERVICES = 4


def _positive(name: str, lo: float, hi: float | None = None, kind: type = int) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} wants a number, not {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{name} must be {rng}, not {text}")
        return v
    return parse


def add_parser(sub: Any) -> None:
    from testbed.scenarios import BUGS
    from testbed.snapshot.memdump import DEFAULT_MAX_MIB

    p = sub.add_parser(
        "explore", help="random operation sequences on RPAL services, judged after every step",
        description="Generate sequences of RPAL operations (hypothesis, seeded) for services in "
        "one guest, judge every step against a model of the spec (the kernel's answer, a host "
        "snapshot with every snapshot check, TLB generations, the spinner's stale reads, "
        "dead-key queues, the kernel log), shrink a failure to a short sequence and save it. "
        "Exit 0 pass, 1 a check failed, 125 the testbed could not run.",
    )
    p.add_argument("--kernel", type=Path,
                   help="bzImage with vmlinux or System.map beside it, or a cached build's key "
                        "(default: the rpal-ref reference kernel, built or from the cache)")
    p.add_argument("--kernel-series", metavar="NAME",
                   help="with --kernel KEY: build this series when the cache lacks KEY")
    p.add_argument("--bug", action="append", choices=BUGS, metavar="NAME",
                   help=f"boot with this injected bug (repeatable): {', '.join(BUGS)}")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="hypothesis seed (default 1)")
    p.add_argument("--steps", type=_positive("--steps", 1, 1000), default=DEFAULT_STEPS,
                   metavar="N", help=f"steps per sequence (default {DEFAULT_STEPS})")
    p.add_argument("--time", type=_positive("--time", 0, None, float), default=DEFAULT_TIME,
                   metavar="S", help=f"seconds of exploration (default {DEFAULT_TIME:g}); "
                   "shrinking a failure comes on top")
    p.add_argument("--services", type=_positive("--services", 1, 16), default=DEFAULT_SERVICES,
                   metavar="N", help=f"services at most at once (default {DEFAULT_SERVICES})")
    p.add_argument("--no-snapshot", action="store_true",
                   help="judge only the answers, no host snapshot after each step (faster, "
                        "blind to page tables, keys and TLB state)")
    p.add_argument("--replay", type=Path, metavar="FILE",
                   help="run a saved sequence (failure-N.json) on a fresh guest instead")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p.add_argument("--paging", type=int, choices=(4, 5), default=5)
    p.add_argument("--pti", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--run-dir", type=Path, help="the run folder (default: a new one)")
    p.add_argument("--no-dump", action="store_true",
                   help="keep no memory dump (by default a failure's shrunk sequence is "
                        "replayed and the guest's memory after its failing step kept as "
                        "memory-stepN.elf; open it with `testbed inspect --dump RUN_DIR`)")
    p.add_argument("--dump-max-mib", type=int, default=DEFAULT_MAX_MIB, metavar="MIB",
                   help=f"no dump of a guest with more RAM (default {DEFAULT_MAX_MIB})")
    p.add_argument("--json", type=Path, metavar="FILE", help="JSON report")
    p.add_argument("--junit", type=Path, metavar="FILE", help="JUnit XML report")
    p.add_argument("--html", type=Path, metavar="FILE", help="HTML report")
    p.add_argument("--shard", metavar="I/N",
                   help="shard I of N explores seed SEED+I-1 (N runners, N different seeds; "
                        "merge their report.json with `testbed report merge`)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the guest's QEMU command line and what would run; start nothing")
    p.set_defaults(func=cmd_explore, modes=None)  # one paging mode (run_modes: --paging/--pti)


def _replay_cmd(args: argparse.Namespace, kernel: Path) -> list[str]:
    from testbed.reproduce import kernel_args
    from testbed.runner import _testbed_program

    cmd = [_testbed_program(), "explore", *kernel_args(kernel), "--accel", args.accel,
           "--paging", str(args.paging), "--pti", args.pti]
    for b in args.bug or ():
        cmd += ["--bug", b]
    if args.append:
        cmd += ["--append", args.append]
    return cmd


def cmd_explore(args: argparse.Namespace) -> int:
    from testbed.boot.commands import terminate_on_signals
    from testbed.check.model import Finding, ScenarioResult
    from testbed.designs.rpal.explore import driver
    from testbed.designs.rpal.explore.choices import REFERENCE_CHOICES
    from testbed.designs.rpal.explore.guest import dump_at_failure, explore_guest
    from testbed.designs.rpal.explore.session import AgentBroken, Session
    from testbed.report.common import RunMeta
    from testbed.run_commands import guest_spec

    terminate_on_signals()
    started = time.time()
    bugs = tuple(args.bug or ())
    shard = None
    if args.shard is not None:
        from testbed.selection import parse_shard

        shard = parse_shard(args.shard)
        args.seed += shard.index - 1  # the shards explore different seeds
    if args.dry_run:
        return _dry_run(args, bugs)
    steps_to_replay = None
    if args.replay is not None:
        try:
            steps_to_replay, _ = driver.load_failure(args.replay)
        except driver.ReplayFileError as exc:
            raise TestbedError(str(exc)) from None
    run_dir = args.run_dir or paths.new_run_dir("explore" if steps_to_replay is None
                                                else "explore-replay")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run folder: {run_dir}", flush=True)  # first: CI reads a pipe
    spec, timings = guest_spec(args)
    choices = REFERENCE_CHOICES
    meta: dict[str, Any] = {"seed": args.seed, "bugs": list(bugs), "kernel": str(spec.kernel),
                            "services": args.services, "steps_per_sequence": args.steps,
                            "paging": args.paging, "pti": args.pti}
    res: driver.ExploreResult | None = None
    failure: driver.Failure | None = None
    session: Session | None = None
    t0 = time.monotonic()
    from testbed.progress import Progress

    prog = Progress("explore")  # without a TTY: a heartbeat line while it explores
    then = (f"replaying {args.replay}" if args.replay
            else f"seed {args.seed} for {args.time:g} s")
    prog.update(f"booting the guest, then {then}", force=True)
    prog.detail_fn = lambda: (f"{session.steps_done} steps judged" if session is not None
                              else "booting the guest")
    try:
        with explore_guest(spec, bugs, run_dir, choices) as rig:
            timings["boot"] = round(time.monotonic() - t0, 2)
            print(f"testbed explore: guest up in {timings['boot']:.1f} s; {rig.hello}",
                  file=sys.stderr)
            session = Session(rig.agent, snapshotter=rig.snapshotter, console=rig.console,
                              choices=choices, judge_snapshots=not args.no_snapshot)
            if steps_to_replay is not None:
                failure = driver.replay(session, steps_to_replay)
                res = driver.ExploreResult(args.seed, 1, session.steps_done,
                                           round(time.monotonic() - t0, 2), failure)
            else:
                res = driver.explore(session, seed=args.seed, steps=args.steps,
                                     seconds=args.time, services=args.services)
                failure = res.failure
            if failure is not None:  # the guest's memory at the failure (--no-dump: none)
                dump_at_failure(rig, session, failure.steps, run_dir, spec)
    except AgentBroken as exc:
        _dump_trace(run_dir, session)
        raise TestbedError(f"explore: {exc}; the sequence so far is in "
                           f"{run_dir / 'trace-at-error.txt'}", run_dir=run_dir) from None
    except driver.ExplorerBug as exc:
        _dump_trace(run_dir, session)
        (run_dir / "explorer-error.txt").write_text(str(exc))
        last = str(exc).strip().splitlines()[-1]
        raise TestbedError(f"explore: internal error of the explorer ({last}); traceback in "
                           f"{run_dir / 'explorer-error.txt'}", run_dir=run_dir) from None
    finally:
        prog.close()
    timings["explore"] = round(time.monotonic() - t0, 2)
    assert res is not None
    findings: list[Finding] = []
    if failure is not None:
        meta_f = {**meta, "unshrunk_steps": res.unshrunk_steps, "shrink_runs": res.shrink_runs}
        jpath, spath = driver.write_failure(run_dir, 1, failure, meta_f,
                                            _replay_cmd(args, spec.kernel))
        res.failure_files = [jpath, spath]
        findings = [f for f in failure.findings if f.bad]
    else:
        findings = [Finding.verdict(
            check, True, f"{n} judgments passed in {res.steps} steps of {res.examples} "
            "sequences", scenario="explore") for check, n in res.judged.items()]
    name = "explore" if steps_to_replay is None else "explore-replay"
    if shard is not None:
        name += f"-seed{args.seed}"  # one result per shard: the merge keeps them apart
    result = ScenarioResult(name, findings, str(run_dir), bugs, seconds=res.seconds)
    summary = {
        "schema": "testbed.explore", "schema_version": 1, **meta,
        "passed": failure is None, "examples": res.examples, "steps": res.steps,
        "seconds": res.seconds, "snapshots": res.snapshots,
        "snapshot_seconds": res.snapshot_seconds, "reset_seconds": res.reset_seconds,
        "steps_per_second": round(res.steps / res.seconds, 2) if res.seconds else None,
        "judged": res.judged,
        "failure": None if failure is None else {
            "check": failure.check, "step": failure.step_index, "message": failure.message,
            "steps": len(failure.steps), "unshrunk_steps": res.unshrunk_steps,
            "shrink_runs": res.shrink_runs, "flaky": failure.flaky,
            "files": [str(p) for p in res.failure_files]},
        "replay": str(args.replay) if args.replay else None,
        "run_dir": str(run_dir), "timings": timings,
    }
    (run_dir / "explore.json").write_text(json.dumps(summary, indent=1) + "\n")
    _print_summary(summary, failure)
    rmeta = RunMeta(kernel=str(spec.kernel), bugs=bugs, accel=spec.accel.describe(),
                    started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                    seconds=round(time.time() - started, 1), timings=timings,
                    extra={k: v for k, v in meta.items() if k not in ("bugs", "kernel")})
    if shard is not None:
        rmeta.extra["shard"] = str(shard)
    _reports(args, run_dir, [result], rmeta)
    print(f"run folder: {run_dir}")
    return 0 if failure is None else 1


def _dry_run(args: argparse.Namespace, bugs: tuple[str, ...]) -> int:
    from testbed.designs import get_design
    from testbed.run_commands import dry_run_spec, print_dry_run
    from testbed.runner import Mode

    spec, notes = dry_run_spec(args)
    what = (f"replay of {args.replay}" if args.replay else
            f"seed {args.seed}, {args.time:g} s, {args.steps} steps per sequence, "
            f"at most {args.services} services")
    notes.append(f"explore: {what}; bugs {', '.join(bugs) or 'none'}")
    sc = get_design("rpal").scenarios["explore"]
    mode = Mode(f"l{args.paging}", args.paging, args.pti)
    print_dry_run([(sc, bugs, mode)], spec, notes, "guest")
    return 0


def _dump_trace(run_dir: Path, session: Any) -> None:
    if session is None:
        return
    lines = []
    for i, r in enumerate(session.trace):
        lines.append(f"{i:3d}. {r.step.text()}")
        lines += [f"       > {x}" for x in r.sent]
        lines.append(f"       < {r.answer}   [model: {r.expect}]")
    (run_dir / "trace-at-error.txt").write_text("\n".join(lines) + "\n")


def _print_summary(s: dict[str, Any], failure: Any) -> None:
    rate = s["steps_per_second"]
    print(f"explore: {s['steps']} judged steps in {s['examples']} sequences, {s['seconds']} s"
          + (f" ({rate} steps/s)" if rate else "")
          + f", seed {s['seed']}, bugs: {', '.join(s['bugs']) or 'none'}")
    if s.get("judged"):
        print("explore: judgments passed per check: "
              + ", ".join(f"{k} {v}" for k, v in s["judged"].items()))
    if failure is None:
        print("explore: PASS (no check failed)")
        return
    f = s["failure"]
    print(f"explore: FAIL {f['check']} at step {f['step']} of a {f['steps']}-step sequence "
          f"(shrunk from {f['unshrunk_steps'] or f['steps']} in {f['shrink_runs']} replays)"
          + (" [flaky]" if f["flaky"] else ""))
    print(f"  {f['message']}")
    for i, r in enumerate(failure.trace):
        print(f"  {i:2d}. {r.step.text():50s} -> {r.answer}")
    for p in f["files"]:
        print(f"  saved: {p}")
    if f["files"]:
        print(f"  replay: sh {shlex.quote(f['files'][-1])}")


def _reports(args: argparse.Namespace, run_dir: Path, results: list[Any], meta: Any) -> None:
    from testbed.report.html import write_html
    from testbed.report.jsonreport import write_json
    from testbed.report.junit import write_junit

    for kind, path, fn in (("json", args.json, write_json), ("junit", args.junit, write_junit),
                           ("html", args.html, write_html)):
        if path is None:
            path = run_dir / f"report.{'xml' if kind == 'junit' else kind}"
        fn(results, path, meta)
