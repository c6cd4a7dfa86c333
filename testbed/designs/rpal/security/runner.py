"""The security scenario on a guest: `tb-rpal_security`, a snapshot per row, the verdicts.

The design's special runner (Design.extra["scenario_runners"]["security"]): one guest
runs every row of SECURITY.md in order (`tb-rpal_security ROW...`); at each row's
checkpoint the host snapshots the guest and, for the gadget rows, scans the services'
executable pages while the guest is still paused. Afterwards each row is judged
(judge.py) and its evidence written to `security/ROW.json`; `security.json` holds the
table (row, expected, observed, verdict, evidence file).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from testbed.boot.machine import Checkpoint, Machine
from testbed.check.model import Finding, ScenarioResult, Status
from testbed.designs import Scenario
from testbed.designs.rpal.security.gadgets import Scan, scan_services
from testbed.designs.rpal.security.hostview import host_view, translations
from testbed.designs.rpal.security.judge import CHECK, judge_row
from testbed.designs.rpal.security.observe import Observation, parse_output
from testbed.designs.rpal.security.table import Row, load_table
from testbed.designs.rpal.security.window import EnableWatch, WatchResult, available
from testbed.errors import TestbedError
from testbed.rundir import save_snapshot
from testbed.runner import GuestSpec, _check_bugs, machine_config
from testbed.snapshot.live import LiveSnapshotter
from testbed.snapshot.model import Snapshot, Trigger

PROGRAM = "tb-rpal_security"
SCAN_ROWS = ("gadget_scan", "gadget_planted")
WINDOW_ROW, WINDOW_ARM = "enable_window", "enable_window_arm"
TIMEOUT = 900.0
EVIDENCE_DIR = "security"


def selected_rows(spec: GuestSpec, table: tuple[Row, ...]) -> tuple[Row, ...]:
    """The rows to run: spec.extra["security_rows"] (names, checked) or all."""
    names = spec.extra.get("security_rows") or ()
    if not names:
        return table
    known = {r.name: r for r in table}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TestbedError(f"no security row {', '.join(unknown)}: see SECURITY.md")
    return tuple(known[n] for n in names)


def _roles(snap: Snapshot) -> list[tuple[str, int]]:
    out = []
    for role in ("victim", "attacker"):
        pid = snap.facts.get(f"{role}.pid", "")
        if pid.isdigit():
            out.append((role, int(pid)))
    return out


def run_security_scenario(sc: Scenario, spec: GuestSpec, bugs: tuple[str, ...], run_dir: Path,
                          result: ScenarioResult) -> None:
    from testbed.designs.rpal import DESIGN

    try:
        rows = selected_rows(spec, load_table())
    except TestbedError as exc:
        result.error = exc.one_line()
        return
    cfg = machine_config(sc, spec, bugs)
    watch_why, vmlinux = "", None
    if any(r.name == WINDOW_ROW for r in rows):
        from testbed.boot.commands import gdb_qemu_args
        from testbed.snapshot.memdump import kernel_files

        vmlinux = kernel_files(spec.kernel).get("vmlinux")
        watch_why = available() or ("" if vmlinux else "no vmlinux beside the kernel")
        if not watch_why:
            cfg = replace(cfg, extra_args=[*cfg.extra_args, *gdb_qemu_args()])
    watch: EnableWatch | None = None
    window: dict[str, Any] | None = None
    machine = Machine(cfg, run_dir)
    views: dict[str, dict[str, Any]] = {}
    scans: dict[str, Scan] = {}
    snaps: dict[str, str] = {}
    taken: list[str] = []
    snapper: LiveSnapshotter | None = None
    output = ""
    try:
        with machine as m:
            assert m.qmp is not None
            _check_bugs(m, bugs, DESIGN)
            snapper = LiveSnapshotter(m.qmp, m.ram_path, spec.kernel)
            live = snapper

            def on_checkpoint(ck: Checkpoint) -> None:
                nonlocal watch, window
                walks: dict[str, Any] = {}
                if ck.name == WINDOW_ARM:  # before the attacker's ENABLE: no snapshot
                    if watch_why:
                        window = WatchResult(skip=watch_why).to_dict()
                        return
                    assert vmlinux is not None
                    watch = EnableWatch(run_dir, Path(vmlinux), live.kaslr_offset() or 0)
                    try:
                        watch.arm()
                    except Exception as exc:  # noqa: BLE001 - the row says it
                        window = watch.disarm().to_dict()
                        window["error"] = f"arming the watch: {exc}"
                        watch = None
                    return
                if ck.name == WINDOW_ROW and watch is not None:
                    window, watch = watch.disarm().to_dict(), None

                def while_paused(snap: Snapshot) -> None:
                    walker, read = live.walker_and_memory()
                    walks.clear()
                    walks.update(translations(snap, walker.translate))
                    if ck.name in SCAN_ROWS:
                        def phys(root: int, va: int) -> int | None:
                            return walker.translate(root, va).phys

                        scans[ck.name] = scan_services(snap, _roles(snap), phys, read)

                snap = live.capture(ck.name, Trigger(ck.name, ck.pid, ck.tid, dict(ck.facts)),
                                    while_paused=while_paused)
                rel = save_snapshot(snap, run_dir, taken)
                taken.append(rel)
                snaps.setdefault(ck.name, rel)
                views.setdefault(ck.name, host_view(snap, walks))

            m.on_checkpoint = on_checkpoint
            res = m.run(" ".join([PROGRAM, *(r.name for r in rows)]) + " 2>&1",
                        timeout=TIMEOUT, label=sc.name)
            output = res.stdout.decode(errors="replace")
    except TestbedError as exc:
        result.error = exc.one_line()
    finally:
        if watch is not None:
            window = watch.disarm().to_dict()
        if snapper is not None:
            snapper.close()
    if window is not None:
        views.setdefault(WINDOW_ROW, {})["window"] = window
    result.output = output
    result.findings += judge_all(rows, parse_output(output), views, scans, snaps, run_dir,
                                 result.scenario, ran=not result.error)


def judge_all(rows: tuple[Row, ...], observations: dict[str, Observation],
              views: dict[str, dict[str, Any]], scans: dict[str, Scan], snaps: dict[str, str],
              run_dir: Path, scenario: str, *, ran: bool = True) -> list[Finding]:
    """A finding per row, its evidence file, and security.json (the table)."""
    folder = run_dir / EVIDENCE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    findings, table = [], []
    for row in rows:
        rel = f"{EVIDENCE_DIR}/{row.name}.json"
        f = judge_row(row, observations.get(row.name), views.get(row.name),
                      scans.get(row.name), scenario=scenario, evidence_file=rel)
        if not ran and f.status is Status.ERROR:
            f = Finding(CHECK, Status.ERROR, f"{row.name}: not judged: the scenario could not "
                        f"run", scenario, row.name, row.name, f.evidence, f.source)
        doc = {**f.evidence, "status": f.status.value, "message": f.message,
               "snapshot": snaps.get(row.name), "host": views.get(row.name),
               "scan": scans[row.name].to_dict() if row.name in scans else None}
        (run_dir / rel).write_text(json.dumps(doc, indent=1) + "\n")
        findings.append(f)
        table.append({k: doc[k] for k in ("row", "group", "expected", "observed", "verdict",
                                          "status", "file")})
    (run_dir / "security.json").write_text(json.dumps({"rows": table}, indent=1) + "\n")
    return findings
