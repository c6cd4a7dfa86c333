"""One explorer session on one guest: execute steps, judge each, keep the trace.

`Session.execute(step)` resolves a symbolic step into the agent's command,
sends it, judges the answer against the model's prediction, moves the model
on, does what the step implies (arm and stop a spinner it cut off, read
back the dead-key queues after a death), then runs the oracles. A failed
judgment raises `StepFailure` (one subclass per check, so the shrinker keeps
to the same check). Both hypothesis and `--replay` drive it the same way.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from testbed.check.model import Finding
from testbed.designs.rpal.explore import oracles
from testbed.designs.rpal.explore.choices import REFERENCE_CHOICES, Choices
from testbed.designs.rpal.explore.model import PAGE, Model, Prediction, World
from testbed.designs.rpal.explore.steps import Agent, AnswerLike, Step
from testbed.errors import TestbedError
from testbed.snapshot.model import Snapshot

# A spinner read completes after `arm` without proof of a stale translation once: the
# load may have happened before the flush and its count after. Two after-arm reads are
# proof (the second one began after the cut-off returned).
SPIN_PROOF = 2
SPIN_SETTLE_S = 0.005  # let the spinner run a little after arm before stopping it
COW_READS, COW_GAP_S = 3, 0.02  # the fork child's reads of a page a peer keeps writing
ID_FREE_SLACK_S = 0.1  # how late the delayed work that frees an id may run
# before a fill: how late after the answer that reported a death its id's delayed free
# may still come, on a loaded TCG host; past it the model takes the id as free
SETTLE_SLACK_S = 0.5


MACROS = ("crowd", "pair")
SKIPPED = "(skipped: names nothing that exists now)"


class StepFailure(AssertionError):
    check = "result"

    def __init__(self, step_index: int, step: Step, findings: list[Finding]) -> None:
        self.step_index = step_index
        self.step = step
        self.findings = findings
        first = findings[0]
        super().__init__(f"step {step_index} ({step.text()}): {first.check}: {first.message}")


_failure_types: dict[str, type[StepFailure]] = {}


def failure_type(check: str) -> type[StepFailure]:
    """One exception class per check: hypothesis shrinks a failure to one of the same kind."""
    t = _failure_types.get(check)
    if t is None:
        t = type(f"CheckFailed_{check}", (StepFailure,), {"check": check})
        _failure_types[check] = t
    return t


class AgentBroken(Exception):
    """The agent or guest stopped answering sensibly; the session cannot go on."""


@dataclass
class Record:
    step: Step
    sent: list[str] = field(default_factory=list)  # concrete commands, for the script
    answer: str = ""
    expect: str = ""
    check: str = ""


class Session:
    def __init__(self, agent: Agent, *, snapshotter: oracles.Snapshotter | None = None,
                 console: oracles.ConsoleWatch | None = None,
                 choices: Choices = REFERENCE_CHOICES, clock: Callable[[], float] = time.monotonic,
                 judge_snapshots: bool = True,
                 sleep: Callable[[float], None] = time.sleep,
                 world: World | None = None) -> None:
        self.agent = agent
        self.snap = snapshotter if judge_snapshots else None
        self.console = console
        self.choices = choices
        self.clock = clock
        self.sleep = sleep
        self.world = world if world is not None else World()
        self.model = Model(choices, self.world)
        # by when every id the model holds for the dead is surely free: the latest
        # answer that reported a death, plus the delay and SETTLE_SLACK_S (the model's
        # own times are the lower bound: when the killing step was sent)
        self._ids_free_at = 0.0
        self._held_seen: dict[int, float] = {}
        self.trace: list[Record] = []
        self.last_snap: Snapshot | None = None
        self.steps_done = 0
        self.snapshots = 0
        self.seconds_snapshot = 0.0
        self.seconds_reset = 0.0
        self.broken = False  # the guest died: no more steps on it
        # wait at reset until the dead ids are free again, so that a sequence runs the same
        # every time (hypothesis' reruns, shrinking, replay). Without, the model still
        # judges right (it knows the held ids) but failures may not reproduce.
        self.wait_ids = True
        self.judged: Counter[str] = Counter()  # check -> judgments that passed
        self.current_step: Step | None = None  # the step (of a macro: the sub-step) now

    # ----- sequences ------------------------------------------------------------------------

    def reset(self) -> None:
        """Kill every service of the previous sequence; a fresh model on the same world."""
        t0 = time.perf_counter()
        # the agent's holders go (also any the model lost track of, e.g. after a fill
        # whose answer it could not read)
        a = self.agent.call("unfill")
        unfilled = a.kind == "ok" and bool(a.get_int("killed"))
        if a.kind == "ok":
            if a.get_int("killed") != len(self.model.holders):
                self.model.holders = []
                for i in range(self.choices.nr_ids):
                    if i not in self.world.used:
                        self.model._hold_id(i, self.clock())
            self.model._a_unfill(Step("unfill", "-"), a, self.clock())
        for s in self.model.live():
            for child in s.children:  # fork children are no services: they would linger
                self.agent.call("childexit", svc=s.name, child=child)
            a = self.agent.call("kill", svc=s.name, sig=9)
            if a.kind == "ok":
                self.model._die(s, self.clock())
        self._wait_gone()
        self._track_held()
        self._wait_ids_free(force=unfilled)  # after a fill, always: nearly no id is free
        if not self.wait_ids:
            # not waited for: an id held by the previous sequence may or may not be free
            # now. Judging its reuse would blame this sequence for what the last one did
            # (and not reproduce); early reuse is judged within a sequence.
            for i in self.world.held:
                self.world.held[i] = 0.0
            self._held_seen = dict(self.world.held)  # no new death: _ids_free_at stands
        # every WARN_ON_ONCE armed again: a replay (shrinking) shows the warning again.
        # A kernel without debugfs answers err; its warnings then show once per boot.
        self.agent.call("clearwarn")
        self.agent.events()
        self.model = Model(self.choices, self.world)
        self.trace = []
        self.last_snap = None
        if self.console is not None:
            self.console.new_lines()
        self.seconds_reset += time.perf_counter() - t0

    def _wait_ids_free(self, force: bool = False) -> None:
        """Every sequence starts with the same ids free, so that it runs the same again.

        The kernel frees a dead service's id after its delay; wait until the latest
        death is past that, with a margin for the delayed work.
        """
        if not (self.wait_ids or force) or not self.world.held \
                or self.choices.id_free_delay_ms is None:
            return
        until = max(self.world.held.values()) + (
            self.choices.id_delay_tolerance_ms / 1000 + ID_FREE_SLACK_S)
        left = until - self.clock()
        if left > 0:
            self.sleep(left)

    def _track_held(self) -> None:
        """Note the time of the answer that reported new deaths (see _ids_free_at)."""
        if self.world.held != self._held_seen:
            if any(self._held_seen.get(i) != t for i, t in self.world.held.items()):
                delay = (self.choices.id_free_delay_ms or 0) / 1000
                self._ids_free_at = self.clock() + delay + SETTLE_SLACK_S
            self._held_seen = dict(self.world.held)

    def _settle_ids(self) -> None:
        """Before a fill: wait until every dead id is surely free, then tell the model so.

        Otherwise a delayed free landing between fill's refusal and its retry hands the
        retry that id, which the model must allow; and then a refusal that freed a live
        id (the retry getting the id a live holder has) passes unseen. Seen: an
        exhaustion_frees_id failure that did not run the same again.
        """
        if self.choices.id_free_delay_ms is None or not self.world.held:
            return
        self._wait_ids_free(force=True)
        left = self._ids_free_at - self.clock()
        if left > 0:
            self.sleep(left)
        self.world.held.clear()
        self._held_seen = {}

    def _wait_gone(self) -> None:
        deadline = self.clock() + 5
        while self.clock() < deadline:
            a = self.agent.call("list")
            if a.kind != "ok" or a.fields.get("svcs", "none") in ("none", ""):
                return
            time.sleep(0.01)

    # ----- one step -------------------------------------------------------------------------

    def resolve(self, step: Step) -> dict[str, Any] | None:
        """The agent arguments of a step (None: the step names something that is not there)."""
        m = self.model
        a = step.args
        out: dict[str, Any] = {"svc": step.svc}
        s = m.svc(step.svc)
        op = step.op
        if op in ("fill", "unfill"):  # the agent's own: no service
            if op == "fill" and m.holders or op == "unfill" and not m.holders:
                return None
            return {}
        if (s is None) != (op == "spawn"):
            return None  # acting through a service that is not alive, or spawning a live one
        if op in ("request", "release"):
            if s is None:
                return None
            key = m.resolve_key(a, s)
            if key is None:
                return None
            out["key"] = key
            return out
        if op == "enable":
            out["pkey"] = m.resolve_pkey(a)
            return out
        if op in ("pkey_free",):
            out["pkey"] = int(a["pkey"])
            return out
        if op == "deadkeys" and "count" in a:
            out["count"] = int(a["count"])
            return out
        if op in ("spawn", "exit", "exec", "thread", "fork", "signal", "deadkeys", "poll",
                  "pkey_alloc"):
            return out
        if op == "mmap":
            out.update(len=int(a.get("pages", 1)) * PAGE, prot=str(a.get("prot", "rw")))
            return out
        if op == "brk":
            out["delta"] = int(a.get("pages", 1)) * PAGE
            return out
        r = m.regions.get(str(a.get("region", "")))
        if r is None:
            return None
        page = int(a.get("page", 0))
        addr = r.addr + page * PAGE
        length = r.pages * PAGE
        if op == "touch":
            out.update(addr=r.addr, len=length, value=int(a.get("value", 0)))
        elif op in ("read", "spin"):
            out["addr"] = addr
            if a.get("pkru", "own") == "open" or op == "spin":
                out["pkru"] = 0
            if op == "spin":
                out["cpu"] = 1
                if a.get("mode") == "write":
                    out.update(mode="write", value=int(a.get("value", 0)))
        elif op == "write":
            out.update(addr=addr, value=int(a.get("value", 0)))
            if a.get("pkru", "own") == "open":
                out["pkru"] = 0
        elif op in ("munmap", "madvise", "mprotect", "pkey_mprotect"):
            out.update(addr=r.addr, len=length)
            if op == "madvise":
                out["advice"] = str(a.get("advice", "dontneed"))
            if op in ("mprotect", "pkey_mprotect"):
                out["prot"] = str(a["prot"])
            if op == "pkey_mprotect":
                out["pkey"] = int(a["pkey"])
        elif op == "mremap":
            how = a.get("how", "grow")
            new = length + PAGE if how == "grow" else length - PAGE if how == "shrink" \
                else length
            out.update(addr=r.addr, old=length, new=new, maymove=1)
            if how == "move":
                out["fixed"] = m.move_target(r)
        else:
            return None
        return out

    def _call(self, rec: Record, op: str, **args: Any) -> AnswerLike:
        rec.sent.append(" ".join([op] + [f"{k}={_fmt(k, v)}" for k, v in args.items()]))
        try:
            return self.agent.call(op, **args)
        except TestbedError as exc:
            # the agent's channel died: the guest crashed or hung. A kernel that says why
            # in its log fails kernel_log at this step; otherwise the run cannot go on.
            self.broken = True
            lines = self.console.new_lines() if self.console is not None else []
            bad = [ln for ln in lines if oracles.KERNEL_LOG_PATTERNS.search(ln)]
            if not bad:
                raise
            index = len(self.trace) - 1
            f = oracles.finding("kernel_log", False,
                                f"the guest died at {rec.step.text()}: {bad[0].strip()[:200]}",
                                index, rec.step.svc, lines=bad[:20], agent=exc.one_line())
            raise failure_type("kernel_log")(index, rec.step, [f]) from None

    def execute(self, step: Step) -> None:
        index = sum(1 for r in self.trace if r.answer != SKIPPED)
        rec = Record(step)
        self.trace.append(rec)
        if step.op in MACROS:
            subs = self.expand(step)
            if subs is None:
                rec.answer = SKIPPED
                return
            for sub in subs:
                self._run(sub, rec, index)
            return
        self._run(step, rec, index)

    def expand(self, step: Step) -> Iterable[Step] | None:
        """The steps of a macro step, from the model's state now (None: not possible now).

        crowd svc=A n=N: N new services A1..AN, each enabled with a pkey other than
        A's, each requested by A (the way to A's 15th request, the peer limit).
        """
        if step.op == "pair":
            return self._expand_pair(step)
        s = self.model.svc(step.svc)
        if step.op != "crowd" or s is None:
            return None
        n = max(1, min(int(step.args.get("n", self.choices.max_peers)), 15))
        out = [] if s.enabled else [Step("enable", s.name, {"pkey": -1})]
        base = s.pkey if s.enabled and s.pkey is not None else s.id % 16
        for i in range(1, n + 1):
            name = f"{s.name}{i}"
            if self.model.svc(name) is not None:
                return None
            out += [Step("spawn", name), Step("enable", name, {"pkey": (base + i) % 16}),
                    Step("request", s.name, {"key_of": name})]
        return out

    def _expand_pair(self, step: Step) -> Iterator[Step] | None:
        """pair svc=A peer=B [same=1]: spawn and enable what is missing (B with another
        pkey than A's when theirs would collide; with same=1, with A's), then the requests
        each lacks: A and B end up mapped (with same=1: refused). Each sub-step is chosen
        from the state the previous one left."""
        a, b = step.svc, str(step.args.get("peer", ""))
        same = bool(step.args.get("same", 0))  # the same pkey for both: pairing must fail
        if not b or a == b:
            return None
        m = self.model

        def gen() -> Iterator[Step]:
            for n in (a, b):
                if m.svc(n) is None:
                    yield Step("spawn", n)
            for n, other in ((a, b), (b, a)):
                s, o = m.svc(n), m.svc(other)
                if s is None or s.enabled:
                    continue
                want = s.id % 16
                if o is not None and o.enabled and o.pkey is not None:
                    if same:
                        want = o.pkey
                    elif o.pkey == want:
                        want = (want + 1) % 16
                yield Step("enable", n, {"pkey": want})
            for n, other in ((a, b), (b, a)):
                s = m.svc(n)
                if s is not None and other not in s.requests:
                    yield Step("request", n, {"key_of": other})
        return gen()

    def _run(self, step: Step, rec: Record, index: int) -> None:
        self.current_step = step
        args = self.resolve(step)
        if args is None:
            if rec.step == step:
                rec.answer = SKIPPED
            return
        m = self.model
        pids = {s.name: s.pid for s in m.live()}
        # whose page tables the step changes: an access to a peer's page faults it in (or
        # breaks its COW) in the peer's mm
        region = m.regions.get(str(step.args.get("region", "")))
        actor = region.owner if region is not None and step.op in ("read", "write", "spin") \
            else step.svc
        facts_before = oracles.model_facts(m)
        if step.op == "fill":
            self._settle_ids()
        # Predicted on the state before the step, with the time the answer came: an id
        # the kernel may free by then may be reused. Applied with the time it was sent:
        # a death is no earlier than that.
        sent = self.clock()
        a = self._call(rec, step.op, **args)
        pred = m.predict(step, self.clock())
        rec.expect = pred.expect.text()
        rec.check = pred.expect.check
        now = sent
        if a.kind == "bad" and step.op == "spin" and a.fields.get("reason") == "busy":
            # the agent still runs a spinner the model thinks is gone (a desync, logged in
            # the record): stop it and start this one
            self._call(rec, "spinstop", svc=step.svc)
            a = self._call(rec, step.op, **args)
        rec.answer = a.text() if rec.step == step else f"{step.text()} -> {a.text()}"
        if a.kind == "err" and verdict_allows(pred, a):
            # a refusal the model allows changed nothing: no flush, no cut-off to judge
            # (an exec refused for want of an id, say)
            pred.flush, pred.cutoff = set(), []
        if a.kind == "bad":
            raise AgentBroken(f"the agent refused {rec.sent[-1]!r}: {a.text()}")
        findings: list[Finding] = []
        verdict = pred.expect.judge(a)
        if verdict is False:
            check = pred.expect.check_for(a)
            if a.kind == "died" and check == "keys":
                check = self._diagnose_death()
            findings.append(oracles.finding(
                check, False,
                f"{step.text()} -> {a.text()}; the model expects {pred.expect.text()}"
                + (f" ({pred.expect.why})" if pred.expect.why else ""),
                index, step.svc, sent=rec.sent[-1], answer=a.text(),
                expected=pred.expect.text()))
        if step.op == "spin":
            findings += self._judge_spin_start(step, index)
        spinning = {x.name for x in m.live() if x.spinner is not None}
        m.apply(step, a, now)
        findings += self._after(step, pred, rec, index)
        self._track_held()
        # a spinner the model lost without a cut-off to judge (its region moved): stop
        # it, so that the agent runs no spinner the model does not know
        judged = {name for name, _ in pred.cutoff}
        for name in sorted(spinning - judged):
            x = m.svc(name)
            if x is not None and x.spinner is None:
                self._call(rec, "spinstop", svc=name)
        self.steps_done += 1
        if self.snap is not None:
            t0 = time.perf_counter()
            snap = self.snap.capture(f"step-{index}")
            self.seconds_snapshot += time.perf_counter() - t0
            self.snapshots += 1
            findings += oracles.snapshot_findings(snap, m, index)
            if self.last_snap is not None:
                findings += oracles.tlb_step_findings(self.last_snap, snap, facts_before, m,
                                                      pred, pids, index, actor, step.svc)
            self.last_snap = snap
        if self.console is not None:
            findings += self.console.findings(index)
        if verdict is True:
            self.judged[pred.expect.check] += 1
        for f in findings:
            if f.passed:
                self.judged[f.check] += 1
        bad = sorted((f for f in findings if f.bad), key=_rank)
        if bad:
            rec.check = bad[0].check
            raise failure_type(bad[0].check)(index, step, bad)

    def _judge_spin_start(self, step: Step, index: int) -> list[Finding]:
        """The PKRU a spinner thread says it started with (RDPKRU, a guest claim) against
        the model's for a new thread: its creator's. A wrong one can kill the service at
        the spinner's first access, before any snapshot sees the thread."""
        s = self.model.svc(step.svc)
        starts = self.agent.take_events("spinstart", svc=step.svc)
        if s is None or s.main_pkru is None or not starts:
            return []
        want = s.main_pkru
        out = []
        for ev in starts:
            got = ev.get_int("pkru")
            if got is None:  # hostile or broken: no verdict on a PKRU we could not read
                out.append(replace(oracles.finding(
                    "pkru", False, f"{s.name}'s spinner start line carries no PKRU: "
                    f"{ev.text()[:200]}", index, s.name, error=True), source="guest"))
                continue
            f = oracles.finding(
                "pkru", got == want,
                f"{s.name}'s spinner thread {ev.fields.get('tid', '?')} started with PKRU "
                f"{ev.fields.get('pkru', '?')}, the model expects 0x{want:x} (a new thread "
                "inherits its creator's PKRU)", index, s.name, answer=ev.text(),
                expected=f"pkru=0x{want:x}")
            out.append(replace(f, source="guest"))
        return out

    def _diagnose_death(self) -> str:
        """An enabled service died of SIGSEGV on its own new memory (a thread's stack, an
        mmap): either that memory lacks its pkey (keys) or the thread's PKRU denies it
        (pkru). A fresh enabled service tells which: its new page must be writable with
        its PKRU; a pkey fault there means untagged memory."""
        name = "diag"
        try:
            sp = self.agent.call("spawn", svc=name)
            if sp.kind != "ok":
                return "keys"
            key, sid = sp.get_int("key"), sp.get_int("id")
            if key is not None:
                self.world.next_key = key + 1  # the diagnosis took a key and an id
            if sid is not None:
                delay = (self.choices.id_free_delay_ms or 0) - self.choices.id_delay_tolerance_ms
                self.world.held[sid] = self.clock() + max(0, delay) / 1000
            if self.agent.call("enable", svc=name, pkey=-1).kind != "ok":
                return "keys"
            a = self.agent.call("mmap", svc=name, len=PAGE, prot="rw")
            addr = a.get_int("addr")
            if a.kind != "ok" or addr is None:
                return "keys"
            t = self.agent.call("touch", svc=name, addr=addr, len=PAGE, value=1)
            return "pkru" if t.kind == "ok" else "keys"
        finally:
            self.agent.call("kill", svc=name, sig=9)
            self._wait_gone_name(name)

    def _wait_gone_name(self, name: str) -> None:
        deadline = self.clock() + 5
        while self.clock() < deadline:
            a = self.agent.call("list")
            if a.kind != "ok" or name not in a.fields.get("svcs", "").split(","):
                return
            time.sleep(0.01)

    def _after(self, step: Step, pred: Prediction, rec: Record, index: int) -> list[Finding]:
        """What a step implies: stop a spinner it cut off; read back dead-key queues."""
        out: list[Finding] = []
        for cut in pred.cutoff:
            out += self._judge_spinner(cut, rec, index)
        if step.op in ("exit", "exec"):
            for s in self.model.live():
                if step.op == "exec" and s.name == step.svc:
                    continue
                if not int(step.args.get("readback", 1)):
                    # the queues are left to grow (a later read() with a small count
                    # sees several keys); poll() says whether there are any
                    a = self._call(rec, "poll", svc=s.name)
                    want_poll = 1 if s.deadkeys else 0
                    if a.kind != "ok" or a.get_int("pollin") != want_poll:
                        out.append(oracles.finding(
                            "exit", False,
                            f"after {step.text()}: poll() of {s.name}'s /proc/rpal says "
                            f"{a.text()}, the model expects pollin={want_poll} (keys of the "
                            "dead it requested or was requested by)", index, s.name,
                            got=a.text(), expected=f"pollin={want_poll}"))
                        break
                    continue
                want = ",".join(str(k) for k in s.deadkeys[:64]) or "none"
                a = self._call(rec, "deadkeys", svc=s.name)
                got = a.fields.get("keys", "none") if a.kind == "ok" else \
                    ("none" if a.errname == self.choices.errno["read_empty_nonblock"]
                     else a.text())
                if got != want:
                    out.append(oracles.finding(
                        "exit", False,
                        f"after {step.text()}: {s.name}'s dead-key queue reads {got}, the "
                        f"model expects {want} (keys of the dead it requested or was "
                        "requested by)", index, s.name, got=got, expected=want))
                    break
                s.deadkeys.clear()
        for ev in self.agent.events():
            if ev.event == "exited" and "child" not in ev.fields:
                name = ev.fields.get("svc", "")
                gone = self.model.svc(name)
                if gone is not None and str(gone.pid) == ev.fields.get("pid"):
                    out.append(oracles.finding(
                        "result", False, f"{name} died on its own: {ev.text()}", index, name))
                    self.model._die(gone, self.clock())
        return out

    def _judge_spinner(self, cutoff: tuple[str, str], rec: Record, index: int
                       ) -> list[Finding]:
        name, kind = cutoff
        if self.model.svc(name) is None:
            return []
        if kind == "cow":
            return self._judge_cow(name, rec, index)
        self._call(rec, "arm", svc=name)
        time.sleep(SPIN_SETTLE_S)
        a = self._call(rec, "spinstop", svc=name)
        self.model.spinner_done(name)
        if a.kind != "ok":
            return [oracles.finding("tlb_shootdown", False, f"spinstop of {name}: {a.text()}",
                                    index, name, error=True)]
        after, stale = a.get_int("after") or 0, a.get_int("stale") or 0
        hung = a.get_int("hung") == 1
        witness = after if kind == "gone" else stale
        ok = witness < SPIN_PROOF and not hung
        what = "reads completed" if kind == "gone" else "reads returned the old value"
        return [oracles.finding(
            "tlb_shootdown", ok,
            f"{name}'s spinner after {rec.step.text()} returned: {witness} {what}"
            + (" (the spinner hung)" if hung else ""),
            index, name, spinstop=a.text())]

    def _judge_cow(self, name: str, rec: Record, index: int) -> list[Finding]:
        """After the owner's fork, with `name` writing one of its pages on the other CPU:
        the fork child's copy of the page must stay as it was at the fork. A value that
        changes is a write of the peer through a writable translation the fork's flush
        did not take away, into the page the child now shares."""
        x = self.model.svc(name)
        assert x is not None and x.spinner is not None
        r = self.model.regions.get(x.spinner[0])
        owner = self.model.svc(r.owner) if r is not None else None
        if r is None or owner is None or not owner.children:
            return []
        page = x.spinner[1]
        child, addr = owner.children[-1], r.addr + page * PAGE
        self._call(rec, "arm", svc=name)
        values = []
        for _ in range(COW_READS):
            time.sleep(COW_GAP_S)
            a = self._call(rec, "childread", svc=owner.name, child=child, addr=addr, pkru=0)
            values.append(a.fields.get("value") if a.kind == "ok" else a.text())
        stop = self._call(rec, "spinstop", svc=name)
        self.model.spinner_done(name)
        writes = stop.get_int("after") or 0
        frozen = len(set(values)) == 1
        return [oracles.finding(
            "tlb_shootdown", frozen,
            f"{owner.name}'s fork child read {r.name} page {page} {COW_READS} times "
            f"while {name} kept writing it ({writes} writes after the fork): "
            + ("unchanged" if frozen else f"it changed: {', '.join(map(str, values))} (the "
               "peer wrote through a stale writable translation into the page the child "
               "shares)"), index, name, values=values, spinstop=stop.text())]

    def replay(self, steps: list[Step]) -> None:
        for st in steps:
            self.execute(st)


# Which finding names a failing step when several checks fail at once: the most direct
# evidence of the broken invariant first (the kernel's answer, when the model names a
# specific invariant for it; then what the page tables, keys and PKRU show), the
# consequences last (a stale read follows from a copy left behind; a WARNING from either).
_RANK = {"slot_copies": 1, "keys": 1, "pkru": 1, "ids": 1, "peer_limit": 1, "faults": 1,
         "isolation": 1, "slot_confinement": 2, "claims": 2, "exit": 2, "tlb_state": 3,
         "tlb_shootdown": 4, "result": 5, "kernel_log": 6}


def _rank(f: Finding) -> float:
    if "answer" in f.evidence:  # the kernel's answer to the step itself
        if f.check in ("keys", "ids", "peer_limit", "exit", "pkru"):
            return 0  # the ABI said it outright (e.g. a pairing of two equal pkeys)
        if f.check in ("faults", "isolation"):
            return 1.5  # an access: what the page tables show explains it better
    return _RANK.get(f.check, 5)


def verdict_allows(pred: Prediction, a: AnswerLike) -> bool:
    return pred.expect.judge(a) is True


def _fmt(key: str, v: Any) -> str:
    if isinstance(v, int) and key in ("addr", "value", "pkru"):
        return f"0x{v:x}"
    return str(v)
