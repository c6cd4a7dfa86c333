"""A fake agent for the explorer's plumbing tests (driver, shrinker, replay, reports).

It answers as the model predicts (so it says nothing about the model itself:
tests/test_explore_model.py does that against hand-written tables) and
misbehaves on purpose where a test plants a fault, so the tests see the
driver find, shrink, save and replay a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from testbed.designs.rpal.explore.choices import with_delay
from testbed.designs.rpal.explore.model import Model, Outcome, World
from testbed.designs.rpal.explore.steps import Answer, Step


class Clock:
    """A deterministic clock: 1 ms per look."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


class FakeAgent:
    """Answers like a correct kernel (by the model), except for the planted `faults`."""

    def __init__(self, faults: set[str] | None = None, clock: Clock | None = None,
                 delay_ms: int | None = 1000) -> None:
        # the step being executed, symbolic (set by the test from the session's trace),
        # so the fake needs no reverse mapping of addresses
        self.current: Callable[[], Step | None] = lambda: None
        self.faults = faults or set()
        self.clock = clock or Clock()
        self.model = Model(with_delay(delay_ms), World())
        self.pid = 1000
        self.tid = 5000
        self.maps: dict[str, int] = {}
        self.brk: dict[str, int] = {}
        self.calls: list[str] = []
        self.spinning: dict[str, bool] = {}
        self.cut: set[str] = set()
        self._events: list[Answer] = []

    def events(self) -> list[Answer]:
        out, self._events = self._events, []
        return out

    def take_events(self, event: str, **fields: str) -> list[Answer]:
        took = [a for a in self._events if a.event == event
                and all(a.fields.get(k) == v for k, v in fields.items())]
        self._events = [a for a in self._events if a not in took]
        return took

    def call(self, op: str, **args: Any) -> Answer:
        self.calls.append(op + " " + " ".join(f"{k}={v}" for k, v in args.items()))
        svc = str(args.get("svc", ""))
        if op == "list":
            live = [s.name for s in self.model.live()]
            if not live:
                self.model = Model(self.model.c, self.model.world)
            return Answer("ok", {"svcs": ",".join(live) or "none"})
        if op == "kill":
            s = self.model.svc(svc)
            if s is not None:
                self.model._die(s, self.clock())
            return Answer("ok")
        if op == "clearwarn":
            return Answer("ok")
        if op == "arm":
            return Answer("ok", {"reads": "10", "old": "0x0"})
        if op == "spinstop":
            stale = "stale_spinner" in self.faults
            self.model.spinner_done(svc)
            return Answer("ok", {"reads": "20", "after": "9" if stale else "0",
                                 "stale": "9" if stale else "0", "faulted": "1", "hung": "0"})
        if op == "deadkeys" and "lose_dead_key" in self.faults:
            s = self.model.svc(svc)
            if s is not None:
                s.deadkeys.clear()
            return Answer("ok", {"keys": "none"})
        if op == "fill":  # the session waited out every delay: the dead ids are free
            self.model.world.held.clear()
        cur = self.current()
        step = cur if cur is not None and cur.op == op else Step(op, svc, {})
        now = self.clock()
        pred = self.model.predict(step, now)
        outs = pred.expect.outcomes
        a = self._answer(step, outs[0] if outs else Outcome("ok"), args)
        me = self.model.svc(svc)
        if op == "request" and "peer_limit" in self.faults and me is not None \
                and len(me.requests) == 14 and a.kind == "ok":
            a = Answer("err", {"errno": "28", "name": "ENOSPC"})
        if op == "request" and "same_pkey" in self.faults and a.errname == "EKEYREJECTED":
            a = Answer("ok", {"ret": "0"})
        if op == "spawn" and "id_at_once" in self.faults and self.model.world.held:
            i = min(self.model.world.held)
            f = dict(a.fields)
            f.update(id=str(i), pkey=str(i % 16))
            a = Answer("ok", f)
        self.model.apply(step, a, now)
        return a

    def _answer(self, step: Step, o: Outcome, args: dict[str, Any]) -> Answer:
        f: dict[str, str] = {}
        for k, v in o.fields.items():
            if isinstance(v, frozenset):
                v = min(v)
            f[k] = hex(v) if k in ("value", "pkru") and isinstance(v, int) else str(v)
        op = step.op
        if o.kind == "ok":
            if op in ("spawn", "exec"):
                self.pid += op == "spawn"
                f["pid"] = str(self.pid)
                if "id" in f and "pkey" in f:  # the default pkey goes with the id
                    f["pkey"] = str(int(f["id"]) % 16)
            elif op in ("thread", "spin"):
                self.tid += 1
                f["tid"] = str(self.tid)
                s = self.model.svc(step.svc)
                if op == "spin" and s is not None and s.main_pkru is not None:
                    # "spinner_pkru": the spinner thread starts with every key open
                    pkru = 0 if "spinner_pkru" in self.faults else s.main_pkru
                    self._events.append(Answer("event", {
                        "svc": step.svc, "tid": str(self.tid), "pkru": hex(pkru)},
                        event="spinstart"))
            elif op == "mmap":
                s = self.model.svc(step.svc)
                assert s is not None
                n = self.maps.get(s.name + str(s.incarnation), 0) + 1
                self.maps[s.name + str(s.incarnation)] = n
                f["addr"] = hex((s.slot << 39) + 0x10_0000_0000 + n * 0x10_0000)
            elif op == "brk":
                s = self.model.svc(step.svc)
                assert s is not None
                key = s.name + str(s.incarnation)
                old = self.brk.get(key, (s.slot << 39) + 0x1_0010_0000)
                new = old + int(args["delta"])
                self.brk[key] = new
                f.update(old=hex(old), new=hex(new))
            elif op == "mremap":
                f["addr"] = hex(int(args.get("fixed", args["addr"])))
            elif op == "fork":
                self.pid += 1
                f["child"] = str(self.pid)
            elif op == "enable" and "pkey" in f:
                f["pkru"] = "0x0"
        if o.kind == "fault":
            f.setdefault("code", "2")
            f.setdefault("pkey", "-1")
        return Answer(o.kind, f)
