"""Run scenarios on guests, in parallel, and turn what they show into findings.

`run_scenario` boots one guest for one scenario (with the injected bugs
asked for), snapshots it at every checkpoint, runs the workloads and checks
everything; `run_all` runs several in parallel guests.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from testbed import paths
from testbed.boot.hostcaps import Accel
from testbed.boot.machine import Checkpoint, Machine, MachineConfig, stop_all_guests
from testbed.boot.rr import RR_INITRD, RR_LOG, CheckpointMark, Recording, sha256_file
from testbed.check.model import ScenarioResult, Status, missing_checks
from testbed.designs import Design, Scenario, get_design
from testbed.errors import Interrupted, TestbedError, UsageError
from testbed.progress import Progress
from testbed.reproduce import PRELUDE, PROGRAM, exec_line, kernel_args
from testbed.rundir import (
    ScenarioRecord,
    judge_scenario,
    kernel_log_findings,
    save_snapshot,
)
from testbed.snapshot.live import LiveSnapshotter
from testbed.snapshot.memdump import DumpPolicy, FailureDump
from testbed.snapshot.model import Snapshot, Trigger

WORKLOAD_TIMEOUT = 300.0


@dataclass(frozen=True)
class Mode:
    """A paging mode the scenarios run in: page-table levels and page-table isolation."""

    name: str
    paging: int
    pti: str  # on | off | auto

    def describe(self) -> str:
        return f"{self.paging}-level paging, PTI {self.pti}"


# The modes of the default job: some bugs exist only under 4-level paging with PTI (the
# user-root copy of a slot entry), and stale TLB entries show differently under PTI.
MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("l5", 5, "off"),
    Mode("l4pti", 4, "on"),
    Mode("l5pti", 5, "on"),
    Mode("l4", 4, "off"),
)}
DEFAULT_MODES = ("l5", "l4pti")


def parse_modes(text: str) -> tuple[Mode, ...]:
    """`l5,l4pti` -> modes; a usage error names the unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODES]
    if unknown or not names:
        raise UsageError(f"--modes {text!r}: choose from {', '.join(MODES)} "
                         "(comma-separated)")
    return tuple(dict.fromkeys(MODES[n] for n in names))


def check_append(text: str) -> str:
    """The user's extra kernel command line, refused when it would swallow what follows.

    The kernel's parser lets a double quote run to the end of the line, so an odd
    number of quotes would hide the bug parameter (`rpal.bug=`) and everything after it; a control
    character (newline) has no place on a command line either.
    """
    if text.count('"') % 2:
        raise UsageError(f"--append {text!r}: unbalanced double quote (the kernel would "
                         "read the rest of the command line as its value)")
    if any(not c.isprintable() for c in text):
        raise UsageError(f"--append {text!r}: control characters are not allowed")
    return text


@dataclass(frozen=True)
class GuestSpec:
    """What every scenario's guest boots with."""

    kernel: Path
    initrd: Path
    accel: Accel
    paging: int = 5
    pti: str = "auto"
    mem_mib: int = 512
    append: str = ""
    boot_timeout: float = 180.0
    extra: dict[str, Any] = field(default_factory=dict)
    dump: DumpPolicy = DumpPolicy()  # the guest's memory at the first failing checkpoint
    # under QEMU record/replay (one vCPU): `testbed replay` runs it again exactly
    record: bool = False


@dataclass
class RecordState:
    """What a recorded run learns for its rr.json: each checkpoint's stop, and the end."""

    marks: list[CheckpointMark] = field(default_factory=list)
    end_icount: int | None = None


def record_refusal(sc: Scenario) -> str:
    """Why `sc` cannot be recorded ("" when it can): QEMU records one vCPU only (pure)."""
    if sc.needs_cpus > 1:
        return f"needs {sc.needs_cpus} CPUs ({sc.needs_cpus_why}); QEMU records one vCPU"
    if sc.selftest:
        return "the kernel's selftest takes no snapshots: there is no checkpoint to replay to"
    if not sc.workloads:
        return "it runs no workloads of its own (the design runs it its own way)"
    return ""


def guest_script(workloads: tuple[str, ...]) -> str:
    """Shell that runs each workload and brackets its output and status with markers."""
    lines = []
    for i, w in enumerate(workloads):
        lines += [f"echo '@@@ begin {i}'", f"{w} 2>&1", f"echo \"@@@ end {i} $?\""]
    return "\n".join(lines)


END_RE = re.compile(r"@@@ end (0|[1-9]\d{0,5}) (\d{1,9})")


def split_output(text: str, count: int) -> list[tuple[str, int | None]]:
    """(output, status) of each workload from the bracketed guest output (pure).

    The guest's output is hostile: one linear pass over its lines, whatever it
    prints (marker lines of its own included); a workload without its end marker
    gets the rest of the output and no status.
    """
    parts = text.split("\n")  # lines as the markers' shell writes them: "\n" only
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    begins: dict[int, int] = {}  # workload -> index of its first begin line
    ends: dict[int, list[tuple[int, int]]] = {}  # workload -> (line index, status)
    for n, line in enumerate(lines):
        if not line.startswith("@@@ "):
            continue
        body = line.rstrip("\n")
        num = body[10:]
        if (body.startswith("@@@ begin ") and line.endswith("\n") and num.isascii()
                and num.isdigit()
                and len(num) <= 6 and str(int(num)) == num):
            begins.setdefault(int(num), n)
        elif m := END_RE.fullmatch(body):
            ends.setdefault(int(m.group(1)), []).append((n, int(m.group(2))))
    out: list[tuple[str, int | None]] = []
    for i in range(count):
        start = begins.get(i)
        if start is None:
            out.append(("", None))
            continue
        end = next(((n, st) for n, st in ends.get(i, ()) if n > start), None)
        if end is None:
            out.append(("".join(lines[start + 1:]), None))
        else:
            out.append(("".join(lines[start + 1:end[0]]), end[1]))
    return out


def kernel_append(spec: GuestSpec, bugs: tuple[str, ...], design: Design) -> str:
    """The extra kernel command line of a scenario's guest: the design's bug parameter
    (e.g. rpal.bug=), then the spec's.

    The bug parameter goes first so that nothing the user appends can hide it; the
    runner still reads back the bugs in effect after boot (bugs_in_effect).
    """
    return " ".join(x for x in (design.bug_append(bugs), spec.append) if x)


def parse_bug_param(text: str) -> tuple[str, ...]:
    """The contents of a bug parameter's sysfs file ("none" or "a,b") as sorted names."""
    names = [n for n in text.strip().split(",") if n and n != "none"]
    return tuple(sorted(names))


def bug_command(design: Design) -> str:
    return f"cat {design.bug_sysfs}"


def bugs_in_effect(m: Machine, design: Design) -> tuple[str, ...]:
    """The injected bugs the guest kernel really runs with, read from sysfs."""
    path = design.bug_sysfs
    res = m.run(bug_command(design), timeout=30, label="read the bugs in effect")
    if res.status != 0:
        raise TestbedError(f"cannot read {path} in the guest (status {res.status}): "
                           f"is this a {design.kernel_series} reference kernel?",
                           run_dir=m.run_dir)
    return parse_bug_param(res.stdout.decode(errors="replace")[:4096])


def _testbed_program() -> str:
    """How a reproducer calls the testbed: `testbed`, as PRELUDE resolves it ($TESTBED, PATH
    or python3 -m testbed); never this machine's path (testbed/reproduce.py)."""
    return PROGRAM


def reproduce_commands(sc: Scenario, spec: GuestSpec, bugs: tuple[str, ...]
                       ) -> tuple[list[str], list[str]]:
    """The commands that run a scenario again as it ran here (pure).

    First `testbed run SCENARIO` with the same kernel, bugs, accelerator,
    paging, PTI and extra command line (checks and reports again); then
    `testbed boot` of the same guest, to run the workloads by hand.
    """
    prog = _testbed_program()
    guest = [*kernel_args(spec.kernel), "--accel", spec.accel.accel,
             "--paging", str(spec.paging), "--pti", spec.pti]
    run = [prog, "run", sc.name.split("@")[0], *guest]
    for b in bugs:
        run += ["--bug", b]
    if spec.record:
        run.append("--record")
    if spec.append:
        run += ["--append", spec.append]
    append = kernel_append(spec, bugs, get_design(sc.design))
    boot = [prog, "boot", *guest, "--smp", str(sc.smp), "--mem", str(spec.mem_mib)]
    if append:
        boot += ["--append", append]
    return run, boot


def _comment_lines(lines: list[str]) -> list[str]:
    """Shell comment lines: every line of every text gets its own "# " (a newline in an
    argument can't end a comment early and become a command)."""
    return ["# " + part for text in lines for part in text.splitlines() or [""]]


def write_reproducer(run_dir: Path, sc: Scenario, spec: GuestSpec, bugs: tuple[str, ...]
                     ) -> Path:
    """run_dir/reproduce.sh: runs the scenario again; its comments say how to do it by hand."""
    run, boot = reproduce_commands(sc, spec, bugs)
    by_hand = (f"then, in the guest: {'; '.join(sc.workloads)}" if sc.workloads
               else f"then: {_testbed_program()} selftest {sc.selftest} with the same options")
    comment = [
        f"Scenario {sc.name} (bugs: {', '.join(bugs) or 'none'}) as testbed ran it (its run "
        "folder: where this script is).",
        "Runs it again with its checks and reports. A kernel named by cache key is rebuilt "
        "from its series when this machine's cache lacks it. The testbed: $TESTBED, else "
        "`testbed` on PATH, else `python3 -m testbed` (from the project's checkout).",
        "To work in the same guest by hand:",
        f"  {shlex.join(boot)}",
        f"  {by_hand}",
    ]
    if spec.record:
        comment += ["It was recorded (QEMU record/replay): `testbed replay DIR [--gdb]` of this "
                    "folder replays the recording instruction for instruction."]
    text = "\n".join(["#!/bin/sh", *_comment_lines(comment), *PRELUDE,
                      exec_line(run[1:]), ""])
    path = run_dir / "reproduce.sh"
    path.write_text(text)
    path.chmod(0o755)
    return path


def machine_config(sc: Scenario, spec: GuestSpec, bugs: tuple[str, ...],
                   mode: Mode | None = None) -> MachineConfig:
    """The guest a scenario boots (in `mode` when given): its kernel, CPUs, paging, PTI and
    command line (the design's bug parameter first)."""
    if mode is not None:
        spec = replace(spec, paging=mode.paging, pti=mode.pti)
    cfg = MachineConfig(
        kernel=spec.kernel, initrd=spec.initrd, accel=spec.accel, smp=sc.smp,
        mem_mib=spec.mem_mib, paging=spec.paging, pti=spec.pti,
        append=kernel_append(spec, bugs, get_design(sc.design)),
        boot_timeout=spec.boot_timeout,
    )
    if spec.record:  # one vCPU, no SSH, the commands in the image (testbed/boot/rr.py)
        design = get_design(sc.design)
        cfg = replace(cfg, smp=1, ssh=False, rr="record", rr_log=RR_LOG,
                      rr_commands=(bug_command(design), guest_script(sc.workloads)))
    return cfg


def run_scenario(sc: Scenario, spec: GuestSpec, bugs: tuple[str, ...], parent: Path,
                 mode: Mode | None = None) -> ScenarioResult:
    """One scenario on a guest of its own; with `mode`, in that paging mode, and the
    result is named `SCENARIO@MODE`."""
    t0 = time.monotonic()
    if mode is not None:
        spec = replace(spec, paging=mode.paging, pti=mode.pti)
    name = f"{sc.name}@{mode.name}" if mode is not None else sc.name
    tag = "+".join(bugs) if bugs else "nobug"
    run_dir = paths.new_run_dir(f"{name.replace('@', '-')}-{tag}", parent)
    design = get_design(sc.design)
    cfg = machine_config(sc, spec, bugs)
    result = ScenarioResult(name, [], str(run_dir), bugs, design=design.name)
    record = ScenarioRecord(name, sc.name, design.name, bugs,
                            mode=mode.name if mode is not None else "", paging=spec.paging,
                            pti=spec.pti, workloads=sc.workloads,
                            kernel={"path": str(spec.kernel), **kernel_identity(spec.kernel)})
    refusal = record_refusal(sc) if spec.record else ""
    rr = RecordState()
    try:
        if refusal:
            result.error = f"{sc.name} cannot be recorded: {refusal}"
        else:
            _run_scenario(sc, spec, bugs, run_dir, cfg, result, design, record, rr)
    finally:
        result.seconds = round(time.monotonic() - t0, 2)
        (run_dir / "findings.json").write_text(
            json.dumps([f.to_dict() for f in result.findings], indent=1) + "\n"
        )
        record.error, record.seconds = result.error, result.seconds
        record.write(run_dir)
        if spec.record and not refusal:
            write_recording(run_dir, cfg, result, record, rr)
        result.evidence = evidence_files(run_dir, result)
        if not result.passed:
            result.console_tail = console_tail(run_dir / "console.log")
    return result


def first_failing(result: ScenarioResult, snapshots: Sequence[str]) -> tuple[str, list[str]]:
    """The snapshot file of the first checkpoint where a host check failed, and those
    failures as "check: message" ("" and [] when none failed), pure."""
    failed: dict[str, list[str]] = {}
    for f in result.findings:
        if f.status is Status.FAIL and f.source == "host" and f.checkpoint:
            failed.setdefault(f.checkpoint, []).append(f"{f.check}: {f.message}")
    for rel in snapshots:
        name = Path(rel).stem.split("@")[0]
        if name in failed:
            return rel, failed[name]
    return "", []


def write_recording(run_dir: Path, cfg: MachineConfig, result: ScenarioResult,
                    record: ScenarioRecord, rr: RecordState) -> None:
    """rr.json beside the scenario's rr.bin: what `testbed replay` needs."""
    from testbed.boot.machine import kernel_cmdline

    marks = rr.marks
    failing, failed = first_failing(result, [m.file for m in marks])
    initrd = run_dir / RR_INITRD
    try:
        kernel_sha = sha256_file(cfg.kernel)
        initrd_sha = sha256_file(initrd) if initrd.is_file() else ""
    except OSError as exc:
        result.error = result.error or f"the recording cannot be kept: {exc}"
        return
    machine = {"kernel": str(cfg.kernel), "kernel_sha256": kernel_sha,
               **{k: v for k, v in record.kernel.items() if k != "path"},
               "accel": {"accel": cfg.accel.accel, "cpu": cfg.accel.cpu,
                         "reason": cfg.accel.reason},
               "mem_mib": cfg.mem_mib, "paging": cfg.paging, "pti": cfg.pti,
               "append": cfg.append, "cmdline": kernel_cmdline(cfg),
               "boot_timeout": cfg.boot_timeout}
    Recording(result.scenario, machine, initrd_sha, marks, rr.end_icount, failing, failed,
              result.seconds).write(run_dir)


def kernel_identity(kernel: Path) -> dict[str, str]:
    """The cache key and series of a cached kernel build ({} for another kernel)."""
    from testbed.snapshot.memdump import kernel_files

    info = kernel_files(kernel)
    return {k: info[v] for k, v in (("key", "kernel_key"), ("series", "kernel_series"))
            if info.get(v)}


# What a reader opens first in a scenario's run folder, in this order (name, glob).
EVIDENCE = (("console", "console.log"), ("snapshots", "snapshots"),
            ("findings", "findings.json"), ("reproduce", "reproduce.sh"),
            ("replay", "failure-*.sh"), ("dump", "memory-*.elf"), ("error", "error.txt"))


def evidence_files(run_dir: Path, result: ScenarioResult | None = None) -> dict[str, str]:
    """name -> path of the files of a scenario's run folder that exist (pure over the
    folder); `snapshots` only when it holds one."""
    out: dict[str, str] = {}
    for name, pattern in EVIDENCE:
        found = sorted(run_dir.glob(pattern))
        if name == "snapshots":
            found = [d for d in found if d.is_dir() and any(d.glob("*.json"))]
        if found:
            out[name] = str(found[-1])
    if result is not None and result.reproduce and "reproduce" not in out:
        out["reproduce"] = result.reproduce
    return out


CONSOLE_TAIL_LINES = 40
CONSOLE_TAIL_BYTES = 8192


def console_tail(console_log: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    """The last `lines` lines of a console log (at most 8 KiB of it), "" when unreadable."""
    try:
        with open(console_log, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - CONSOLE_TAIL_BYTES))
            data = f.read(CONSOLE_TAIL_BYTES)
    except OSError:
        return ""
    text = data.decode(errors="replace").replace("\r\n", "\n")
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) + ("\n" if kept else "")


def _check_bugs(m: Machine, bugs: tuple[str, ...], design: Design) -> None:
    """Stop unless the guest kernel runs with exactly the injected bugs asked for."""
    got = bugs_in_effect(m, design)
    if got != tuple(sorted(bugs)):
        raise TestbedError(
            f"the guest kernel runs with injected bugs {', '.join(got) or 'none'}, not the "
            f"bugs asked for ({', '.join(sorted(bugs)) or 'none'}): check --append and the "
            f"kernel's {design.bug_param}= names", run_dir=m.run_dir)


def failing_at(design: Design, snapshots: Sequence[Snapshot], sc: Scenario, checkpoint: str
               ) -> list[str]:
    """The host checks that fail at `checkpoint` (the last of `snapshots`), as lines."""
    return [f"{f.check}: {f.message}" for f in design.judge_snapshots(snapshots, sc)
            if f.status is Status.FAIL and f.checkpoint == checkpoint]


def _dump_hook(dumper: FailureDump | None, design: Design, snapshots: list[Snapshot],
               sc: Scenario, record: ScenarioRecord) -> Callable[[Snapshot], None] | None:
    """What to do while the guest is paused for a checkpoint's snapshot: judge it with the
    snapshots before it and, at the first failing checkpoint, keep the guest's memory."""
    if dumper is None or dumper.taken:
        return None

    def hook(snap: Snapshot) -> None:
        try:
            why = failing_at(design, [*snapshots, snap], sc, snap.name)
        except Exception as exc:  # noqa: BLE001 - judged again after the run, where it counts
            why, dumper.taken = [], True
            print(f"testbed: judging {sc.name} at {snap.name} for a dump failed: {exc!r}",
                  file=sys.stderr)
        if why:
            record.dump = dumper.take(snap.name, why)

    return hook


def _run_scenario(sc: Scenario, spec: GuestSpec, bugs: tuple[str, ...], run_dir: Path,
                  cfg: MachineConfig, result: ScenarioResult, design: Design,
                  record: ScenarioRecord, rr: RecordState | None = None) -> None:
    name = result.scenario
    result.reproduce = str(write_reproducer(run_dir, sc, spec, bugs))
    snapshots: list[Snapshot] = []
    outputs: list[tuple[str, str, int | None]] = []
    snapper: LiveSnapshotter | None = None
    special = design.extra.get("scenario_runners", {}).get(sc.name)
    if special is not None:  # a scenario the design runs its own way (RPAL: explore)
        record.kind = "special"
        special(sc, spec, bugs, run_dir, result)
        result.findings += kernel_log_findings(run_dir / "console.log", name)
        return
    machine = Machine(cfg, run_dir)
    if sc.selftest:
        record.kind = "selftest"
        try:
            _run_selftest(sc, machine, result, bugs, design)
        except TestbedError as exc:
            result.error = exc.one_line()
        finally:
            result.findings += kernel_log_findings(machine.console_log, name)
        return
    named = replace(sc, name=name)
    rr = rr or RecordState()
    marks = rr.marks
    try:
        with machine as m:
            assert m.qmp is not None
            _check_bugs(m, bugs, design)
            # recorded: no migration stream (it is no part of the recording)
            snapper = LiveSnapshotter(m.qmp, m.ram_path, spec.kernel,
                                      cpu_state="hmp" if cfg.rr else "migration")
            dumper = (FailureDump(m.qmp, run_dir, spec.dump, cfg.mem_mib, spec.kernel)
                      if spec.dump.enabled else None)

            def on_checkpoint(ck: Checkpoint) -> None:
                assert snapper is not None
                hook = _dump_hook(dumper, design, snapshots, named, record)
                icount: list[int] = []
                if cfg.rr:  # where the guest stopped: the replay stops there too
                    def hook_rr(snap: Snapshot, dump: Any = hook) -> None:
                        icount.append(m.replay_icount())
                        if dump is not None:
                            dump(snap)
                    hook = hook_rr
                snap = snapper.capture(ck.name, Trigger(ck.name, ck.pid, ck.tid, dict(ck.facts)),
                                       while_paused=hook)
                rel = save_snapshot(snap, run_dir, record.snapshots, timing=not cfg.rr)
                record.snapshots.append(rel)
                snapshots.append(snap)
                if cfg.rr:
                    path = run_dir / rel
                    marks.append(CheckpointMark(ck.name, rel, icount[-1], sha256_file(path),
                                                path.stat().st_size, trigger_line(ck)))

            m.on_checkpoint = on_checkpoint
            res = m.run(guest_script(sc.workloads), timeout=WORKLOAD_TIMEOUT, label=sc.name)
            if cfg.rr:
                rr.end_icount = m.replay_icount()
            if m.last_stdout is not None:
                record.output_file = m.last_stdout.name
            text = res.stdout.decode(errors="replace")
            result.output = text
            for w, (out, status) in zip(sc.workloads, split_output(text, len(sc.workloads)),
                                        strict=True):
                outputs.append((w.split()[0], out, status))
    except TestbedError as exc:
        result.error = exc.one_line()
    finally:
        if snapper is not None:
            snapper.close()
    result.findings += judge_scenario(design, named, snapshots, outputs, machine.checkpoint_log,
                                      machine.console_log, result.error)
    result.snapshots = {s.name: s for s in snapshots}


def trigger_line(ck: Checkpoint) -> str:
    """A checkpoint request as one canonical line (pure): how a replay shows it asked the
    same."""
    facts = " ".join(f"{k}={v}" for k, v in ck.facts.items())
    return f"checkpoint {ck.name} {ck.pid} {ck.tid}" + (f" {facts}" if facts else "")


def _run_selftest(sc: Scenario, machine: Machine, result: ScenarioResult,
                  bugs: tuple[str, ...], design: Design) -> None:
    from testbed.build.selftests import build_selftest
    from testbed.check.selftests import put_in_image, run_selftest

    assert sc.selftest is not None
    st = build_selftest(sc.selftest)
    put_in_image(machine, st)
    try:
        with machine as m:
            _check_bugs(m, bugs, design)
            sub = run_selftest(m, st)
    except TestbedError as exc:
        result.error = exc.one_line()
    else:
        result.findings = [replace(f, scenario=result.scenario) for f in sub.findings]
        result.output = sub.output
        result.error = sub.error
        if not result.error:
            result.findings += missing_checks(sc.checks, result.findings,
                                              scenario=result.scenario)


Job = tuple[Scenario, tuple[str, ...], "Mode | None"]


def expand_modes(scenarios: Sequence[Scenario], modes: Sequence[Mode]
                 ) -> list[tuple[Scenario, Mode]]:
    """Each scenario in each mode; a scenario that takes no snapshot (the selftest) runs
    once, in the first mode."""
    out: list[tuple[Scenario, Mode]] = []
    for sc in scenarios:
        for i, mode in enumerate(modes):
            if sc.selftest and i:
                continue
            out.append((sc, mode))
    return out


class RunInterrupted(Exception):
    """A signal stopped run_all: the results of the jobs that finished before it."""

    def __init__(self, signal: Interrupted, finished: list[ScenarioResult], total: int) -> None:
        super().__init__(f"{signal.signal_name}: {len(finished)} of {total} finished")
        self.signal = signal
        self.finished = finished
        self.total = total


STOP_GRACE = 5.0  # seconds an interrupted run gives its workers to wind down


def job_name(job: Job) -> str:
    sc, bugs, mode = job
    name = f"{sc.name}@{mode.name}" if mode is not None else sc.name
    return name + (f" +{'+'.join(bugs)}" if bugs else "")


def run_all(jobs: Sequence[Job], spec: GuestSpec, parent: Path, parallel: int, *,
            on_result: Callable[[ScenarioResult, int, int], None] | None = None,
            stop_on_failure: bool = False, progress: Progress | None = None
            ) -> list[ScenarioResult]:
    """Run (scenario, bugs, mode) jobs on `parallel` guests at a time; results in job order.

    `on_result(result, finished, total)` is called in this thread as each job ends.
    With `stop_on_failure` (-x) no queued job starts after the first that did not
    pass (the running ones finish); the results then hold only the jobs that ran.
    `progress` heartbeats name the jobs running and for how long.
    On a signal (Interrupted, see terminate_on_signals): no queued job starts, every
    guest is stopped, and RunInterrupted carries the results finished before it.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    running: dict[int, float] = {}
    lock = threading.Lock()

    stop = threading.Event()  # -x: set by the worker whose scenario did not pass

    def one(i: int) -> ScenarioResult | None:
        if stop.is_set():
            return None  # not started: an earlier scenario failed under -x
        sc, bugs, mode = jobs[i]
        with lock:
            running[i] = time.monotonic()
        try:
            r = run_scenario(sc, spec, bugs, parent, mode)
        finally:
            with lock:
                running.pop(i, None)
        if stop_on_failure and not r.passed:
            stop.set()
        return r

    finished = 0
    if progress is not None:
        def detail() -> str:
            now = time.monotonic()
            with lock:
                now_running = sorted(running.items())
            names = ", ".join(f"{job_name(jobs[i])} {now - t:.0f} s" for i, t in now_running)
            return f"{finished}/{len(jobs)} finished; running: {names or 'none'}"
        progress.detail_fn = detail
        progress.start_heartbeat()
    futures = [pool.submit(one, i) for i in range(len(jobs))]
    index = {f: i for i, f in enumerate(futures)}
    try:
        pending = set(futures)
        while pending:
            # with a timeout: futures cancelled by -x never complete a wait()
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=index.__getitem__):
                if f.cancelled():
                    continue
                r = f.result()
                if r is None:
                    continue
                finished += 1
                if on_result is not None:
                    on_result(r, finished, len(jobs))
                if stop_on_failure and not r.passed:
                    pool.shutdown(wait=False, cancel_futures=True)
            pending = {f for f in pending if not f.cancelled()}
        results = [r for f in futures if not f.cancelled() and (r := f.result()) is not None]
    except Interrupted as sig:
        ended = [r for f in futures if f.done() and not f.cancelled()
                 and f.exception() is None and (r := f.result()) is not None]
        _stop_workers(pool, futures)
        raise RunInterrupted(sig, ended, len(jobs)) from None
    pool.shutdown()
    return results


def _stop_workers(pool: ThreadPoolExecutor, futures: list[Any]) -> None:
    """Cancel queued jobs and stop the guests of running ones, until they are done."""
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + STOP_GRACE
    # New guests stay refused: the process is about to exit (allow_new_guests() undoes it).
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        stop_all_guests()  # again and again: a worker may be starting a guest
        wait(futures, timeout=0.1)
    stop_all_guests()


def default_parallel(smp: int = 2) -> int:
    """Guests at a time: one per `smp` host CPUs, at most 4.

    Each TCG guest keeps a host CPU busy per vCPU; on this 2-core machine one
    guest at a time was fastest (bench/run_time.py: 31 s, 2 at a time 37 s,
    4 at a time 44 s).
    """
    import os

    return max(1, min(4, (os.cpu_count() or 2) // max(1, smp)))


def describe_bugs(bugs: tuple[str, ...]) -> str:
    return shlex.quote(",".join(bugs)) if bugs else "none"
