"""The `explore` scenario of `testbed run`: a bounded exploration with a fixed seed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from testbed.check.model import Finding, ScenarioResult, Status
from testbed.designs import Scenario
from testbed.designs.rpal.explore import driver
from testbed.designs.rpal.explore.choices import REFERENCE_CHOICES
from testbed.designs.rpal.explore.guest import dump_at_failure, explore_guest
from testbed.designs.rpal.explore.session import AgentBroken, Session
from testbed.errors import TestbedError
from testbed.reproduce import kernel_args
from testbed.runner import GuestSpec, _testbed_program

SEED = 1
STEPS = 20
SERVICES = 4


SECONDS = 30.0  # per paging mode: the default job runs two


def run_explore_scenario(sc: Scenario, spec: GuestSpec, bugs: tuple[str, ...], run_dir: Path,
                         result: ScenarioResult) -> None:
    """`testbed run`'s scenario explore (Design.extra["scenario_runners"])."""
    _run(SECONDS, sc.checks, spec, bugs, run_dir, result, time.monotonic())


def _run(seconds: float, declared: tuple[str, ...], spec: GuestSpec, bugs: tuple[str, ...],
         run_dir: Path, result: ScenarioResult, t0: float) -> ScenarioResult:
    try:
        with explore_guest(spec, bugs, run_dir, REFERENCE_CHOICES) as rig:
            session = Session(rig.agent, snapshotter=rig.snapshotter, console=rig.console)
            res = driver.explore(session, seed=SEED, steps=STEPS, seconds=seconds,
                                 services=SERVICES, shrink_seconds=min(120.0, 2 * seconds))
            if res.failure is not None:  # the guest's memory at the failure
                dump_at_failure(rig, session, res.failure.steps, run_dir, spec)
    except (TestbedError, AgentBroken) as exc:
        result.error = exc.one_line() if isinstance(exc, TestbedError) else str(exc)
        result.seconds = round(time.monotonic() - t0, 2)
        return result
    if res.failure is None:
        for check in declared:
            n = res.judged.get(check, 0)
            result.findings.append(Finding(
                check, Status.PASS if n else Status.ERROR,
                f"{n} judgments passed in {res.steps} steps of "
                f"{res.examples} sequences (seed {SEED})" if n else
                f"not exercised in {res.steps} steps of {res.examples} sequences (seed {SEED})",
                result.scenario))
    else:
        f = res.failure
        cmd = [_testbed_program(), "explore", *kernel_args(spec.kernel), "--accel",
               spec.accel.accel, "--paging", str(spec.paging), "--pti", spec.pti]
        for b in bugs:
            cmd += ["--bug", b]
        meta = {"seed": SEED, "bugs": list(bugs), "kernel": str(spec.kernel),
                "unshrunk_steps": res.unshrunk_steps, "shrink_runs": res.shrink_runs}
        jpath, spath = driver.write_failure(run_dir, 1, f, meta, cmd)
        result.reproduce = str(spath)
        for x in f.findings:
            if x.bad:
                result.findings.append(Finding(
                    x.check, x.status, f"{x.message} [{len(f.steps)}-step sequence in "
                    f"{jpath.name}]", result.scenario, x.checkpoint, x.subject, x.evidence))
    (run_dir / "explore.json").write_text(json.dumps({
        "seed": SEED, "examples": res.examples, "steps": res.steps, "seconds": res.seconds,
        "judged": res.judged,
        "failure": None if res.failure is None else res.failure.check}, indent=1) + "\n")
    result.seconds = round(time.monotonic() - t0, 2)
    return result
