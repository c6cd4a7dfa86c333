"""Explore: run seeded hypothesis sequences on a session until a check fails or time is up.

On a failure hypothesis shrinks the sequence; the shortest failing one is
written to the run folder as `failure-N.json` (the steps, symbolic, plus
what was sent and answered) and `failure-N.sh` (a readable script that
replays it with `testbed explore --replay`). `replay_file` runs a saved
sequence again without hypothesis.
"""

from __future__ import annotations

import json
import shlex
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import errors as hyp_errors
from hypothesis import seed as hyp_seed
from hypothesis.stateful import get_state_machine_test

from testbed.check.model import Finding
from testbed.designs.rpal.explore.machine import explore_settings, make_machine
from testbed.designs.rpal.explore.session import (
    SKIPPED,
    AgentBroken,
    Record,
    Session,
    StepFailure,
)
from testbed.designs.rpal.explore.steps import Step
from testbed.errors import TestbedError
from testbed.reproduce import PRELUDE, exec_line

FAILURE_SCHEMA = "testbed.explore.failure"
FAILURE_VERSION = 1
EXAMPLES_PER_BATCH = 4


@dataclass
class Failure:
    check: str
    step_index: int
    message: str
    steps: list[Step]
    trace: list[Record]
    findings: list[Finding]
    flaky: bool = False

    def to_json(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "schema": FAILURE_SCHEMA, "schema_version": FAILURE_VERSION,
            "check": self.check, "step": self.step_index, "message": self.message,
            "flaky": self.flaky, **meta,
            "steps": [s.to_json() for s in self.steps],
            "trace": [{"step": r.step.text(), "sent": r.sent, "answer": r.answer,
                       "expect": r.expect, "check": r.check} for r in self.trace],
            "findings": [f.to_dict() for f in self.findings if f.bad],
        }


@dataclass
class ExploreResult:
    seed: int
    examples: int = 0
    steps: int = 0
    seconds: float = 0.0
    failure: Failure | None = None
    failure_files: list[Path] = field(default_factory=list)
    snapshots: int = 0
    snapshot_seconds: float = 0.0
    reset_seconds: float = 0.0
    raw_failures: int = 0  # failing sequences hypothesis saw
    unshrunk_steps: int = 0
    shrink_runs: int = 0
    judged: dict[str, int] = field(default_factory=dict)  # check -> passed judgments

    @property
    def passed(self) -> bool:
        return self.failure is None


class ExplorerBug(Exception):
    """The explorer itself failed (a bug of the model or driver), with its traceback."""


class _Recorder:
    """Keeps every failing sequence the session raised, to pick the shortest at the end."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.seen: list[Failure] = []
        self.errors: list[str] = []  # tracebacks of the explorer's own errors
        # errors of the guest or QEMU (a crash, a broken agent) met inside hypothesis,
        # which may report them only as an inconsistent replay (Flaky)
        self.guest_errors: list[Exception] = []
        self.examples = 0

    def wrap(self) -> None:
        orig = self.session.execute
        rec = self

        def execute(step: Step) -> None:
            try:
                orig(step)
            except StepFailure as exc:
                trace = [r for r in rec.session.trace if r.answer != SKIPPED]
                rec.seen.append(Failure(exc.check, len(trace) - 1, str(exc),
                                        [r.step for r in trace], trace, exc.findings))
                raise
            except (AgentBroken, TestbedError) as exc:
                rec.guest_errors.append(exc)
                rec.errors.append(traceback.format_exc())
                raise
            except Exception:
                rec.errors.append(traceback.format_exc())
                raise

        self.session.execute = execute  # type: ignore[method-assign]

        orig_reset = self.session.reset

        def reset() -> None:
            rec.examples += 1
            orig_reset()

        self.session.reset = reset  # type: ignore[method-assign]


def shrink_steps(session: Session, failure: Failure, *, seconds: float = 120.0,
                 max_runs: int = 200) -> tuple[Failure, int]:
    """Delta debugging on the symbolic steps: drop chunks while the same check still fails.

    Steps are symbolic, so a step whose service or region a removal took away is
    skipped when replayed; each kept candidate is cut after its failing step.
    """
    t0 = time.monotonic()
    best = failure
    runs = 0

    def fails(cand: list[Step]) -> Failure | None:
        nonlocal runs
        runs += 1
        f = replay(session, cand)
        return f if f is not None and f.check == failure.check else None

    # From the same start as every candidate. A sequence found while generating started
    # from another state (ids, default pkeys, what the previous sequence left), so it
    # may not fail again as a whole; try it twice, then shrink anyway: a shorter
    # candidate that fails is a reproduction, and only if none fails is it kept as found.
    again = fails(failure.steps)
    if again is None:
        failure.flaky = True
        again = fails(failure.steps)
    if again is not None:
        best = again
    reproduced = again is not None

    n = 2
    while len(best.steps) >= 2 and runs < max_runs and time.monotonic() - t0 < seconds:
        cur = best.steps
        chunk = max(1, -(-len(cur) // n))
        for i in range(0, len(cur), chunk):
            if runs >= max_runs or time.monotonic() - t0 >= seconds:
                break
            f = fails(cur[:i] + cur[i + chunk:])
            if f is not None and len(f.steps) < len(cur):
                best, reproduced = f, True
                n = max(n - 1, 2)
                break
        else:
            if chunk == 1:
                break
            n = min(len(cur), n * 2)
    if not reproduced:
        return failure, runs
    best.flaky = failure.flaky
    return best, runs


def explore(session: Session, *, seed: int, steps: int, seconds: float, services: int,
            max_examples: int | None = None, shrink: bool = True,
            shrink_seconds: float = 180.0) -> ExploreResult:
    """Run sequences until `seconds` pass (or `max_examples`), stopping at the first failure.

    Hypothesis generates (seeded); the failing sequence is then shrunk by
    `shrink_steps` on the symbolic steps (each candidate a replay on the same guest),
    which on a slow guest goes much further per second than re-generating.
    """
    res = ExploreResult(seed)
    t0 = time.monotonic()
    rec = _Recorder(session)
    rec.wrap()
    factory = make_machine(session, services)
    batch = 0
    # Generation does not wait for the dead ids at each reset (the model knows which are
    # held; that halves the time per sequence); shrinking and replay do, so that what
    # they run starts the same way every time.
    session.wait_ids = False
    while time.monotonic() - t0 < seconds:
        n = EXAMPLES_PER_BATCH
        if max_examples is not None:
            n = min(n, max_examples - rec.examples)
            if n <= 0:
                break
        test = get_state_machine_test(factory, settings=explore_settings(n, steps, False))
        test = hyp_seed(seed * 1_000_003 + batch)(test)
        batch += 1
        final: BaseException | None = None
        try:
            test()
        except StepFailure as exc:
            final = exc
        except (hyp_errors.Flaky, hyp_errors.FlakyFailure) as exc:
            final = exc
        except BaseExceptionGroup as exc:  # several failures at once (should not happen)
            final = exc
        except (AgentBroken, TestbedError):
            raise
        except Exception as exc:  # the explorer's own bug: never a verdict on the kernel
            raise ExplorerBug(rec.errors[-1] if rec.errors else traceback.format_exc()) \
                from exc
        if final is not None:
            if not rec.seen and rec.guest_errors:
                raise rec.guest_errors[-1]  # QEMU died, say: no verdict, and not our bug
            if not rec.seen and rec.errors:
                raise ExplorerBug(rec.errors[-1])
            res.failure = _pick(rec.seen, final)
            break
    res.raw_failures = len(rec.seen)
    session.wait_ids = True
    if res.failure is not None and shrink and res.failure.steps and not session.broken:
        res.unshrunk_steps = len(res.failure.steps)
        res.failure, res.shrink_runs = shrink_steps(session, res.failure,
                                                    seconds=shrink_seconds)
    res.examples = rec.examples
    res.steps = session.steps_done
    res.seconds = round(time.monotonic() - t0, 2)
    res.snapshots = session.snapshots
    res.judged = dict(sorted(session.judged.items()))
    res.snapshot_seconds = round(session.seconds_snapshot, 3)
    res.reset_seconds = round(session.seconds_reset, 3)
    return res


def _pick(seen: list[Failure], final: BaseException) -> Failure:
    """The shortest failing sequence of the final failure's check (hypothesis' last replay)."""
    check = getattr(final, "check", None)
    flaky = not isinstance(final, StepFailure)
    if check is None and seen:
        check = seen[-1].check
    same = [f for f in seen if f.check == check] or seen
    if not same:
        return Failure("explore", 0, f"hypothesis ended with {final!r} and no failing step",
                       [], [], [], flaky=True)
    best = min(same, key=lambda f: (len(f.steps), -seen.index(f)))
    best.flaky = flaky
    return best


def write_failure(run_dir: Path, n: int, failure: Failure, meta: dict[str, Any],
                  replay_cmd: Sequence[str]) -> tuple[Path, Path]:
    """failure-N.json and failure-N.sh in the run folder."""
    jpath = run_dir / f"failure-{n}.json"
    jpath.write_text(json.dumps(failure.to_json(meta), indent=1) + "\n")
    lines = [
        "#!/bin/sh",
        f"# testbed explore found: {failure.check} at step {failure.step_index}",
        f"#   {failure.message}",
        f"# seed {meta.get('seed')}, bugs: {', '.join(meta.get('bugs') or []) or 'none'}",
        "#",
        "# The sequence (each step: what the host asked; the agent commands it sent;",
        "# what the guest answered; what the model expected):",
    ]
    for i, r in enumerate(failure.trace):
        lines.append(f"#  {i:2d}. {r.step.text()}")
        for s in r.sent:
            lines.append(f"#        > {s}")
        lines.append(f"#        < {r.answer}")
        if r.expect:
            lines.append(f"#        model: {r.expect}")
    # portable (testbed/reproduce.py): replay_cmd[0] is the program, called as $TESTBED;
    # the failure file is named beside this script
    lines += ["#", "# Replay it on a fresh guest:", *PRELUDE,
              exec_line([*replay_cmd[1:], "--replay"], f'"$HERE"/{shlex.quote(jpath.name)}'),
              ""]
    spath = run_dir / f"failure-{n}.sh"
    spath.write_text("\n".join(lines))
    spath.chmod(0o755)
    return jpath, spath


class ReplayFileError(ValueError):
    pass


def load_failure(path: Path) -> tuple[list[Step], dict[str, Any]]:
    """The steps of a saved failure (or a plain JSON list of steps); one-line errors."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ReplayFileError(f"replay file {path} cannot be read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ReplayFileError(f"replay file {path} is not JSON: {exc.msg} at line "
                              f"{exc.lineno}") from exc
    raw: Any
    meta: dict[str, Any]
    if isinstance(doc, list):
        raw, meta = doc, {}
    elif isinstance(doc, dict) and doc.get("schema") == FAILURE_SCHEMA:
        if doc.get("schema_version") != FAILURE_VERSION:
            raise ReplayFileError(f"replay file {path} has schema_version "
                                  f"{doc.get('schema_version')!r}, expected {FAILURE_VERSION}")
        raw, meta = doc.get("steps"), doc
    else:
        raise ReplayFileError(f"replay file {path} is neither a {FAILURE_SCHEMA} document nor "
                              "a list of steps")
    if not isinstance(raw, list):
        raise ReplayFileError(f"replay file {path}: 'steps' is not a list")
    steps = []
    for i, d in enumerate(raw):
        try:
            steps.append(Step.from_json(d))
        except ValueError as exc:
            raise ReplayFileError(f"replay file {path}, step {i}: {exc}") from exc
    return steps, meta


def replay(session: Session, steps: list[Step]) -> Failure | None:
    """Run a saved sequence on a clean session; the failure it shows, or None."""
    session.reset()
    try:
        session.replay(steps)
    except StepFailure as exc:
        trace = [r for r in session.trace if r.answer != SKIPPED]
        return Failure(exc.check, len(trace) - 1, str(exc), [r.step for r in trace], trace,
                       exc.findings)
    return None
