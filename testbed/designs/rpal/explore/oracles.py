"""Oracles after every step: host snapshot checks and step checks, judged from the MODEL.

All use of snapshots and of the snapshot checks is here, so a change of the
snapshot's form (dict today, typed objects soon) is a change of this module.

Snapshot checks (testbed.designs.rpal.checks), with their facts built from the model
(never from what the guest says): slot confinement, slot copies (entries,
markers, tables, nothing of a dead slot), keys (every leaf of an enabled
service), TLB state (every CPU with a service's mm loaded is at its
generation), PKRU of every thread the model knows, and the claims (the model's id and pkey
of each enabled service against its page tables).

Step checks: TLB generations across the step (a flush of a paired service's
mm moves each mapped peer's generation; release bumps both sides, exit each
surviving peer); the kernel log since the previous step.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from testbed.check.model import Finding, Status
from testbed.designs.rpal.checks import (
    Claim,
    Ctx,
    Facts,
    check_claims,
    check_keys,
    check_slot_confinement,
    check_slot_copies,
    check_tlb_propagation,
    check_tlb_state,
    resolve,
)
from testbed.designs.rpal.explore.model import Model, Prediction
from testbed.snapshot.model import Absent, Snapshot

KERNEL_LOG_PATTERNS = re.compile(
    r"BUG[: ]|WARNING:|Oops|Bad page|general protection fault|KASAN|"
    r"possible circular locking|lockdep|Kernel panic|kernel BUG|list_add corruption|"
    r"list_del corruption|refcount_t:|UBSAN"
)


def hx(v: int) -> str:
    return f"0x{v:x}"


def finding(check: str, ok: bool, msg: str, step: int, subject: str = "", error: bool = False,
            **evidence: Any) -> Finding:
    status = Status.ERROR if error else Status.of(ok)
    return Finding(check, status, msg, "explore", f"step {step}", subject, evidence)


def model_facts(model: Model, enabled_only: bool = False) -> Facts:
    """The services and pairs as the MODEL has them (never what the guest says)."""
    live, gone, pairs = model.snapshot_view()
    services: dict[str, Claim] = {}
    for s in live:
        if enabled_only and not s.enabled:
            continue
        services[s.name] = Claim(s.name, s.pid, s.id, s.key, s.pkey_now, True)
    if not enabled_only:
        for d in gone:
            services[f"{d.name}~{d.incarnation}"] = Claim(
                f"{d.name}~{d.incarnation}", d.pid, d.id, d.key, d.pkey_now, False)
    keep = {p for p in pairs if p <= set(services)}
    return Facts(services, frozenset(keep))


class Snapshotter(Protocol):
    def capture(self, name: str = "") -> Snapshot: ...


def check_pkru_model(snap: Snapshot, model: Model, step: int) -> Iterator[Finding]:
    """Every thread the model knows has the PKRU the model expects (unknown ones skipped)."""
    tasks = {t.pid: t for t in snap.tasks}
    for s in model.live():
        for tid, want in sorted(model.expected_threads(s.name).items()):
            if want is None:
                continue
            t = tasks.get(tid)
            if t is None or t.tgid != s.pid:
                yield finding("pkru", False, f"thread {tid} of {s.name} is not in the snapshot",
                              step, s.name, error=True)
                continue
            if isinstance(t.pkru, Absent):
                yield finding("pkru", False, f"thread {tid} of {s.name}: PKRU not read: "
                              f"{t.pkru.reason}", step, s.name, error=True)
                continue
            got = t.pkru
            yield finding(
                "pkru", got == want,
                f"thread {tid} of {s.name}: PKRU {hx(got)}"
                + ("" if got == want else f", expected {hx(want)}")
                + (" (fully open)" if got == 0 and want != 0 else ""),
                step, s.name, pid=s.pid, tid=tid, pkru=hx(got), expected=hx(want),
                source=t.pkru_source,
            )


def snapshot_findings(snap: Snapshot, model: Model, step: int) -> list[Finding]:
    ctx = Ctx("explore", f"step {step}")
    facts = model_facts(model)
    out: list[Finding] = []
    if facts.services:
        svcs = resolve(snap, facts)
        out += check_slot_confinement(snap, facts, svcs, ctx)
        out += check_slot_copies(snap, facts, svcs, ctx)
        out += check_tlb_state(snap, facts, svcs, ctx)
    enabled = model_facts(model, enabled_only=True)
    if enabled.services:
        # the pkey of an enabled service is known; before ENABLE its leaves carry pkey 0
        svcs = resolve(snap, enabled)
        out += check_keys(snap, enabled, svcs, ctx)
        out += check_claims(snap, enabled, svcs, ctx)
    out += check_pkru_model(snap, model, step)
    return out


def tlb_step_findings(before: Snapshot, after: Snapshot, model_before: Facts,
                      model: Model, pred: Prediction, pids: dict[str, int], step: int,
                      actor: str, initiator: str | None = None) -> list[Finding]:
    """TLB generations across one step: propagation to peers, and the flushes it must do.

    Propagation is judged for the acting service only: its page tables are the ones the
    step changed, so a flush of its mm must reach every peer mapped before and after.
    (A peer's generation also moves when the actor's flush reaches it; that flush need
    not go on to the peer's own peers, which do not map the actor's slot.)

    `initiator`: the service that did the step when the actor is another (an access to a
    peer's page changes the peer's tables). When the initiator is mapped with the actor
    and its own generation moved too (a spinner's thread stack, say), the actor's move
    may be the initiator's flush reaching it, which need not go on to the actor's other
    peers: propagation is then not judged for that step.
    """
    ctx = Ctx("explore", f"step {step}")
    out: list[Finding] = []
    after_facts = model_facts(model)
    both = frozenset(p for p in model_before.pairs if p in after_facts.pairs and actor in p)
    if initiator is not None and initiator != actor \
            and frozenset((initiator, actor)) in model_before.pairs:
        pid = pids.get(initiator)
        m0 = before.mm_of(pid) if pid is not None else None
        m1 = after.mm_of(pid) if pid is not None else None
        if m0 is None or m1 is None or m1.tlb_gen != m0.tlb_gen:
            both = frozenset()
    if both:
        facts = Facts({r: after_facts.services[r] for p in both for r in p}, both)
        out += check_tlb_propagation(before, after, facts, ctx, owners=frozenset({actor}))
    for name in sorted(pred.flush):
        pid = pids.get(name)
        if pid is None:
            continue
        m0, m1 = before.mm_of(pid), after.mm_of(pid)
        if m0 is None or m1 is None or m0.address != m1.address:
            s = model.svc(name)
            if s is None or m1 is None:
                continue  # that mm is gone (the service exited): nothing left to flush
            out.append(finding("tlb_state", False, f"mm of {name} missing from a snapshot",
                               step, name, error=True))
            continue
        ok = m1.tlb_gen > m0.tlb_gen
        out.append(finding(
            "tlb_state", ok,
            f"{name}'s mm must be flushed by this step: tlb_gen {m0.tlb_gen} -> "
            f"{m1.tlb_gen}" + ("" if ok else " (no flush)"),
            step, name, pid=pid, tlb_gen=[m0.tlb_gen, m1.tlb_gen],
        ))
    return out


class ConsoleWatch:
    """New kernel log lines (BUG, WARNING, Oops...) in the console file since the last look."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.offset = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size if self.path else 0
        except OSError:
            return 0

    def new_lines(self) -> list[str]:
        if self.path is None:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        cut = data.rfind(b"\n") + 1
        self.offset += cut
        return data[:cut].decode(errors="replace").splitlines()

    def findings(self, step: int) -> list[Finding]:
        bad = [ln.strip() for ln in self.new_lines() if KERNEL_LOG_PATTERNS.search(ln)]
        if not bad:
            return []
        return [finding("kernel_log", False, f"kernel log: {bad[0][:200]}", step,
                        lines=bad[:20])]
