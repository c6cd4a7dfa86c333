"""The hypothesis state machine that chooses the steps (stateful testing).

Rules draw from what the model knows now (live services, regions, keys of
the living and the dead), so every sequence is one the ABI allows a user to
try. Each example starts on the same guest with no service left
(`Session.reset`); hypothesis is seeded, has no database, and shrinks a
failure to a shortest sequence that fails the same check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from testbed.designs.rpal.explore.model import Region
from testbed.designs.rpal.explore.session import Session
from testbed.designs.rpal.explore.steps import Step

NAMES = "abcdefghijklmnop"
VALUES = st.sampled_from([0x1111, 0x2222, 0xdead0001, 0xfeedface00000001])


def make_machine(session: Session, services: int) -> type[RuleBasedStateMachine]:
    """A state machine class bound to one session (one guest) and at most `services`."""
    names = NAMES[:services]

    class Explore(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            session.reset()
            self.s = session

        # ----- helpers --------------------------------------------------------------------
        def do(self, op: str, svc: str, **args: Any) -> None:
            self.s.execute(Step(op, svc, args))

        def live(self) -> list[str]:
            return sorted(x.name for x in self.s.model.live())

        def pick_live(self, data: st.DataObject, cond: Callable[[str], bool] = lambda n: True
                      ) -> str | None:
            c = [n for n in self.live() if cond(n)]
            return data.draw(st.sampled_from(c), label="svc") if c else None

        def own_regions(self, name: str) -> list[Region]:
            return sorted(self.s.model.live_regions(name), key=lambda r: r.name)

        # ----- services -------------------------------------------------------------------
        @precondition(lambda self: len(self.live()) < services)
        @rule(data=st.data())
        def spawn(self, data: st.DataObject) -> None:
            free = [n for n in names if n not in self.live()]
            self.do("spawn", data.draw(st.sampled_from(free), label="svc"))

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data(), pkey=st.one_of(st.just(-1), st.integers(0, 15),
                                             st.sampled_from([16, -2])))
        def enable(self, data: st.DataObject, pkey: int) -> None:
            n = self.pick_live(data)
            assert n
            self.do("enable", n, pkey=pkey)

        def _target(self, data: st.DataObject, n: str) -> dict[str, Any]:
            m = self.s.model
            others = sorted({x for x in m.svcs if x != n})
            kinds = ["peer"] * 6 + ["own", "bogus"] if others else ["own", "bogus"]
            kind = data.draw(st.sampled_from(kinds), label="target")
            if kind == "peer":
                return {"key_of": data.draw(st.sampled_from(others), label="peer")}
            if kind == "own":
                return {"key": "own"}
            return {"key": data.draw(st.sampled_from([0, 0xFFFFFFFFFFFFFFFF, 999999]))}

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data())
        def request(self, data: st.DataObject) -> None:
            n = self.pick_live(data)
            assert n
            self.do("request", n, **self._target(data, n))

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data())
        def release(self, data: st.DataObject) -> None:
            n = self.pick_live(data)
            assert n
            s = self.s.model.svc(n)
            assert s
            if s.requests and data.draw(st.booleans(), label="requested"):
                self.do("release", n, key_of=data.draw(st.sampled_from(sorted(s.requests))))
            else:
                self.do("release", n, **self._target(data, n))

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data())
        def exit(self, data: st.DataObject) -> None:
            n = self.pick_live(data)
            assert n
            self.do("exit", n)

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data())
        def exec_(self, data: st.DataObject) -> None:
            n = self.pick_live(data)
            assert n
            self.do("exec", n)

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data(), op=st.sampled_from(["thread", "signal", "deadkeys", "poll",
                                                  "pkey_alloc", "fork"]))
        def simple(self, data: st.DataObject, op: str) -> None:
            n = self.pick_live(data)
            assert n
            self.do(op, n)

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data(), pkey=st.integers(0, 15))
        def pkey_free(self, data: st.DataObject, pkey: int) -> None:
            n = self.pick_live(data)
            assert n
            self.do("pkey_free", n, pkey=pkey)

        # ----- memory ---------------------------------------------------------------------
        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data(), pages=st.integers(1, 3),
              prot=st.sampled_from(["rw", "rw", "rw", "r", "none"]))
        def mmap(self, data: st.DataObject, pages: int, prot: str) -> None:
            n = self.pick_live(data)
            assert n
            self.do("mmap", n, pages=pages, prot=prot, region=self.s.model.next_region_name())

        @precondition(lambda self: bool(self.live()))
        @rule(data=st.data(), pages=st.integers(1, 2))
        def brk(self, data: st.DataObject, pages: int) -> None:
            n = self.pick_live(data)
            assert n
            self.do("brk", n, pages=pages, region=self.s.model.next_region_name())

        def pick_own_region(self, data: st.DataObject) -> tuple[str, Region] | None:
            n = self.pick_live(data, lambda x: bool(self.own_regions(x)))
            if n is None:
                return None
            return n, data.draw(st.sampled_from(self.own_regions(n)), label="region")

        @precondition(lambda self: any(self.own_regions(n) for n in self.live()))
        @rule(data=st.data(), value=VALUES)
        def touch(self, data: st.DataObject, value: int) -> None:
            got = self.pick_own_region(data)
            assert got
            self.do("touch", got[0], region=got[1].name, value=value)

        @precondition(lambda self: any(self.own_regions(n) for n in self.live()))
        @rule(data=st.data(),
              op=st.sampled_from(["munmap", "mprotect", "pkey_mprotect", "mremap", "madvise"]))
        def change(self, data: st.DataObject, op: str) -> None:
            got = self.pick_own_region(data)
            assert got
            n, r = got
            args: dict[str, Any] = {"region": r.name}
            if op in ("mprotect", "pkey_mprotect"):
                args["prot"] = data.draw(st.sampled_from(["none", "r", "rw"]), label="prot")
            if op == "pkey_mprotect":
                args["pkey"] = data.draw(st.sampled_from([-1, 0, 1, 5, 15]), label="pkey")
            if op == "mremap":
                args["how"] = data.draw(st.sampled_from(["grow", "shrink"]), label="how")
            if op == "madvise":
                args["advice"] = data.draw(st.sampled_from(["dontneed", "pageout"]),
                                           label="advice")
            self.do(op, n, **args)

        def any_regions(self) -> list[Region]:
            return sorted(self.s.model.regions.values(), key=lambda r: r.name)

        @precondition(lambda self: bool(self.live()) and bool(self.any_regions()))
        @rule(data=st.data(), write=st.booleans(), pkru=st.sampled_from(["own", "open"]),
              value=VALUES)
        def access(self, data: st.DataObject, write: bool, pkru: str, value: int) -> None:
            n = self.pick_live(data)
            assert n
            r = data.draw(st.sampled_from(self.any_regions()), label="region")
            page = data.draw(st.integers(0, max(0, r.pages - 1)), label="page")
            if write:
                self.do("write", n, region=r.name, page=page, pkru=pkru, value=value)
            else:
                self.do("read", n, region=r.name, page=page, pkru=pkru)

        def spinnable(self) -> list[tuple[str, Region]]:
            m = self.s.model
            out = []
            for s in m.live():
                if s.spinner is not None:
                    continue
                for p in m.peers(s.name):
                    out += [(s.name, r) for r in self.own_regions(p) if r.prot != "none"]
            return out

        @precondition(lambda self: bool(self.spinnable()))
        @rule(data=st.data())
        def spin(self, data: st.DataObject) -> None:
            n, r = data.draw(st.sampled_from(self.spinnable()), label="spin")
            self.do("spin", n, region=r.name, page=0)

    return Explore


def explore_settings(examples: int, steps: int, shrink: bool = True) -> settings:
    phases = [Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        phases=phases, derandomize=False, report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
        print_blob=False,
    )
