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
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from testbed.designs.rpal.explore.model import Region
from testbed.designs.rpal.explore.session import Session
from testbed.designs.rpal.explore.steps import Step

NAMES = "abcdefghijklmnop"
SWARM = ("spawn", "enable_default", "enable", "request_peer", "request", "release", "exit",
         "exec", "simple", "pkey_free", "mmap", "brk", "touch", "change", "access", "spin",
         "cut_off", "crowd", "pair", "fill", "drain", "move_access", "cow", "probe",
         "cow_probe", "pile")
VALUES = st.sampled_from([0x1111, 0x2222, 0xdead0001, 0xfeedface00000001])


def make_machine(session: Session, services: int) -> type[RuleBasedStateMachine]:
    """A state machine class bound to one session (one guest) and at most `services`."""
    names = NAMES[:services]

    class Explore(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            session.reset()
            self.s = session
            self.factor: dict[str, int] = {}
            self.readback = True

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
        def spawn(self, data: st.DataObject) -> None:
            free = [n for n in names if n not in self.live()]
            self.do("spawn", data.draw(st.sampled_from(free), label="svc"))

        def enable(self, data: st.DataObject) -> None:
            kind = data.draw(st.sampled_from(["explicit", "another's", "bad"]), label="kind")
            n = self.pick_live(data)
            assert n
            others = sorted(x.name for x in self.s.model.live() if x.name != n and x.enabled)
            if kind == "another's" and others:
                # symbolic: the same pkey as that service's on a replay too (ids differ)
                self.do("enable", n, pkey_of=data.draw(st.sampled_from(others), label="like"))
                return
            elif kind == "bad":
                pkey = data.draw(st.sampled_from([16, -2, 100]), label="pkey")
            else:
                pkey = data.draw(st.integers(0, 15), label="pkey")
            self.do("enable", n, pkey=pkey)

        def enableable(self) -> list[str]:
            return [n for n in self.live() if not self.s.model.svcs[n].enabled]

        def enable_default(self, data: st.DataObject) -> None:
            """The common case, more often: the default pkey (id % 16)."""
            self.do("enable", data.draw(st.sampled_from(self.enableable()), label="svc"),
                    pkey=-1)

        def pairable(self) -> list[tuple[str, str]]:
            m = self.s.model
            out = []
            for a in m.live():
                for b in m.live():
                    if a.name != b.name and a.enabled and b.enabled and a.pkey != b.pkey \
                            and b.name not in a.requests:
                        out.append((a.name, b.name))
            # the second request of a pair first: it maps them
            return sorted(out, key=lambda p: p[0] not in m.svcs[p[1]].requests)

        def request_peer(self, data: st.DataObject) -> None:
            """A request that can succeed (the common case, more often)."""
            a, b = data.draw(st.sampled_from(self.pairable()), label="pair")
            self.do("request", a, key_of=b)

        def spun(self) -> list[tuple[str, str]]:
            """(owner, region) of each region a spinner reads."""
            m = self.s.model
            return [(m.regions[s.spinner[0]].owner, s.spinner[0]) for s in m.live()
                    if s.spinner is not None and s.spinner[0] in m.regions]

        def cut_off(self, data: st.DataObject) -> None:
            """The owner of a spun region cuts the spinner off."""
            owner, region = data.draw(st.sampled_from(self.spun()), label="spun")
            self._cut(data, owner, region)

        def _cut(self, data: st.DataObject, owner: str, region: str) -> None:
            how = data.draw(st.sampled_from(["munmap", "mprotect", "dontneed", "release",
                                             "exit", "mremap", "fork"]), label="how")
            if how == "mremap":
                self.do("mremap", owner, region=region, how="move")
            elif how == "fork":
                self.do("fork", owner)
            elif how == "munmap":
                self.do("munmap", owner, region=region)
            elif how == "mprotect":
                self.do("mprotect", owner, region=region, prot="none")
            elif how == "dontneed":
                self.do("madvise", owner, region=region, advice="dontneed")
            elif how == "release":
                spinner = next(s.name for s in self.s.model.live() if s.spinner
                               and s.spinner[0] == region)
                self.do("release", owner, key_of=spinner)
            else:
                self.do("exit", owner)

        def _target(self, data: st.DataObject, n: str) -> dict[str, Any]:
            """A key to request or release: one of each way the kernel can answer."""
            m = self.s.model
            me = m.svcs[n]
            live = [x for x in m.live() if x.name != n]
            kinds: dict[str, list[str]] = {
                "same pkey": [x.name for x in live if me.enabled and x.enabled
                              and x.pkey == me.pkey],
                "not enabled": [x.name for x in live if not x.enabled],
                "requested": sorted(me.requests),
                "dead": sorted(x for x, s in m.svcs.items() if not s.alive),
                "any": sorted(x for x in m.svcs if x != n),
            }
            choices = [k for k, v in kinds.items() if v] + ["own", "bogus"]
            kind = data.draw(st.sampled_from(choices), label="target")
            if kind == "own":
                return {"key": "own"}
            if kind == "bogus":
                return {"key": data.draw(st.sampled_from([0, 0xFFFFFFFFFFFFFFFF, 999999]))}
            return {"key_of": data.draw(st.sampled_from(kinds[kind]), label="peer")}

        def request(self, data: st.DataObject) -> None:
            n = self.pick_live(data)
            assert n
            self.do("request", n, **self._target(data, n))

        def release(self, data: st.DataObject) -> None:
            n = self.pick_live(data)
            assert n
            s = self.s.model.svc(n)
            assert s
            if s.requests and bool(data.draw(st.booleans(), label="requested")):
                self.do("release", n, key_of=data.draw(st.sampled_from(sorted(s.requests))))
            else:
                self.do("release", n, **self._target(data, n))

        def exit(self, data: st.DataObject) -> None:
            n = self.pick_live(data)
            assert n
            if self.readback:
                self.do("exit", n)
            else:  # leave the dead keys queued: a later read() sees several
                self.do("exit", n, readback=0)

        def exec(self, data: st.DataObject) -> None:
            n = self.pick_live(data)
            assert n
            self.do("exec", n)

        def simple(self, data: st.DataObject) -> None:
            op = data.draw(st.sampled_from(["thread", "signal", "deadkeys", "poll",
                                            "pkey_alloc", "fork"]), label="op")
            n = self.pick_live(data)
            assert n
            if op == "deadkeys":
                self.do(op, n, count=data.draw(st.sampled_from([512, 512, 8, 16, 4]),
                                               label="count"))
            else:
                self.do(op, n)

        def queued(self) -> list[str]:
            return [x.name for x in self.s.model.live() if len(x.deadkeys) >= 2]

        def drain(self, data: st.DataObject) -> None:
            """A read() of one key from a queue of several."""
            n = data.draw(st.sampled_from(self.queued()), label="svc")
            self.do("deadkeys", n, count=data.draw(st.sampled_from([8, 16]), label="count"))

        def pile(self, data: st.DataObject) -> None:
            """Dead keys piled up on purpose (a macro of plain steps): a service pairs with
            two more, both exit unread, then one read() with a small count (it must write
            no more than count bytes). The plain rules need a sequence that leaves queues
            unread and two deaths of one service's peers: read_ignores_count was missed
            in 2 of 6 runs of 120 s."""
            m = self.s.model
            free = [n for n in names if m.svc(n) is None]
            if len(free) < 2:
                return
            x = data.draw(st.sampled_from(self.live()), label="svc")
            a, b = free[0], free[1]
            self.do("pair", x, peer=a)
            self.do("pair", x, peer=b)
            self.do("exit", a, readback=0)
            self.do("exit", b, readback=0)
            if m.svc(x) is not None and len(m.svcs[x].deadkeys) >= 2:
                self.do("deadkeys", x, count=data.draw(st.sampled_from([8, 16]), label="count"))

        def fill(self, data: st.DataObject) -> None:
            """Registrations until the ids run out (the agent's holders), and one more."""
            self.do("fill", "-")

        def unfill(self, data: st.DataObject) -> None:
            self.do("unfill", "-")

        def pkey_free(self, data: st.DataObject) -> None:
            pkey = data.draw(st.integers(0, 15), label="pkey")
            n = self.pick_live(data)
            assert n
            self.do("pkey_free", n, pkey=pkey)

        # ----- memory ---------------------------------------------------------------------
        def mmap(self, data: st.DataObject) -> None:
            pages = data.draw(st.integers(1, 3), label="pages")
            prot = data.draw(st.sampled_from(["rw", "rw", "rw", "r", "none"]), label="prot")
            n = self.pick_live(data)
            assert n
            self.do("mmap", n, pages=pages, prot=prot, region=self.s.model.next_region_name())

        def brk(self, data: st.DataObject) -> None:
            pages = data.draw(st.integers(1, 2), label="pages")
            n = self.pick_live(data)
            assert n
            self.do("brk", n, pages=pages, region=self.s.model.next_region_name())

        def pick_own_region(self, data: st.DataObject) -> tuple[str, Region] | None:
            n = self.pick_live(data, lambda x: bool(self.own_regions(x)))
            if n is None:
                return None
            return n, data.draw(st.sampled_from(self.own_regions(n)), label="region")

        def touch(self, data: st.DataObject) -> None:
            value = data.draw(VALUES, label="value")
            got = self.pick_own_region(data)
            assert got
            self.do("touch", got[0], region=got[1].name, value=value)

        def change(self, data: st.DataObject) -> None:
            op = data.draw(st.sampled_from(["munmap", "mprotect", "pkey_mprotect", "mremap",
                                            "madvise"]), label="op")
            got = self.pick_own_region(data)
            assert got
            n, r = got
            args: dict[str, Any] = {"region": r.name}
            if op in ("mprotect", "pkey_mprotect"):
                args["prot"] = data.draw(st.sampled_from(["none", "r", "rw"]), label="prot")
            if op == "pkey_mprotect":
                args["pkey"] = data.draw(st.sampled_from([-1, 0, 1, 5, 15]), label="pkey")
            if op == "mremap":
                args["how"] = data.draw(st.sampled_from(["grow", "shrink", "move"]), label="how")
            if op == "madvise":
                args["advice"] = data.draw(st.sampled_from(["dontneed", "pageout"]),
                                           label="advice")
            self.do(op, n, **args)

        def any_regions(self) -> list[Region]:
            return sorted(self.s.model.regions.values(), key=lambda r: r.name)

        def access(self, data: st.DataObject) -> None:
            write = data.draw(st.booleans(), label="write")
            pkru = data.draw(st.sampled_from(["own", "open"]), label="pkru")
            value = data.draw(VALUES, label="value")
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

        def spin(self, data: st.DataObject) -> None:
            n, r = data.draw(st.sampled_from(self.spinnable()), label="spin")
            if r.prot == "rw" and data.draw(st.booleans(), label="writer"):
                self.do("spin", n, region=r.name, page=0, mode="write",
                        value=data.draw(VALUES, label="value"))
            else:
                self.do("spin", n, region=r.name, page=0)

        def writers(self) -> list[str]:
            """Owners of a region a peer's spinner writes."""
            m = self.s.model
            return sorted({m.regions[s.spinner[0]].owner for s in m.live()
                           if s.spinner is not None and s.spin_write
                           and s.spinner[0] in m.regions})

        def cow(self, data: st.DataObject) -> None:
            """The owner of a page a peer keeps writing forks (COW write-protects it)."""
            self.do("fork", data.draw(st.sampled_from(self.writers()), label="svc"))

        def probe(self, data: st.DataObject, cow: bool = False) -> None:
            """A stale-TLB probe on a pair (a macro of plain steps): the owner maps and
            fills a page, the peer reads or writes it on the other CPU, the owner cuts
            it off one of the ways that must flush the peer (with `cow`: the peer
            writes and the owner forks, which write-protects the page for COW)."""
            m = self.s.model
            cands = sorted((o, p) for o in self.live() for p in m.peers(o)
                           if m.svcs[p].spinner is None)
            if not cands:
                return
            owner, peer = data.draw(st.sampled_from(cands), label="owner, peer")
            region = m.next_region_name()
            self.do("mmap", owner, pages=1, prot="rw", region=region)
            self.do("touch", owner, region=region, value=data.draw(VALUES, label="value"))
            if cow or data.draw(st.sampled_from([False, False, True]), label="writer"):
                self.do("spin", peer, region=region, page=0, mode="write",
                        value=data.draw(VALUES, label="value"))
            else:
                self.do("spin", peer, region=region, page=0)
            if region in m.regions and m.svcs[peer].spinner is not None:
                if cow:
                    self.do("fork", owner)
                else:
                    self._cut(data, owner, region)

        def cow_probe(self, data: st.DataObject) -> None:
            """The fork path on purpose: a peer keeps writing the owner's page, the owner
            forks (every writable PTE of a private page becomes read-only: a flush
            that must reach the peer, or its writes go on to the page the child shares).
            The plain rules reach it only when a write spinner and a fork meet by chance
            (fork_cow_skips_peers was missed in 120 s with PTI)."""
            self.probe(data, cow=True)

        def move_access(self, data: st.DataObject) -> None:
            """mremap a region to another place, then use a page of it (an untouched page
            faults in there: with the vma's pkey)."""
            got = self.pick_own_region(data)
            assert got
            n, r = got
            self.do("mremap", n, region=r.name, how="move")
            self.do("write", n, region=r.name, page=data.draw(
                st.integers(0, max(0, r.pages - 1)), label="page"), pkru="own",
                value=data.draw(VALUES, label="value"))

        def pair(self, data: st.DataObject) -> None:
            """Two services mapped both ways (a macro step: spawn, enable, request as needed)."""
            m = self.s.model
            cands = [(x, y) for x in names for y in names if x < y and not m.paired(x, y)
                     and sum(1 for n in (x, y) if m.svc(n) is None) + len(self.live())
                     <= services]
            if not cands:
                return
            a, b = data.draw(st.sampled_from(cands), label="pair")
            if data.draw(st.sampled_from([False, False, False, True]), label="same pkey"):
                self.do("pair", a, peer=b, same=1)
            else:
                self.do("pair", a, peer=b)

        def crowdable(self) -> list[str]:
            m = self.s.model
            return [n for n in self.live() if len(n) == 1 and not m.svc(n + "1")
                    and not m.svcs[n].requests]

        def crowd(self, data: st.DataObject) -> None:
            """Fifteen peers requested by one service (a macro step: the peer limit)."""
            n = data.draw(st.sampled_from(self.crowdable()), label="svc")
            self.do("crowd", n, n=self.s.choices.max_peers)

        # ----- the one rule: a weighted choice among what can be done now ---------------
        def choices(self) -> list[tuple[str, int]]:
            live = bool(self.live())
            regions = any(self.own_regions(n) for n in self.live())
            table = [
                ("spawn", 3, len(self.live()) < services),
                ("enable_default", 3, bool(self.enableable())),
                ("enable", 2, live),
                ("request_peer", 4, bool(self.pairable())),
                ("request", 2, live),
                ("release", 1, live),
                ("exit", 1, live),
                ("exec", 1, live),
                ("simple", 2, live),
                ("pkey_free", 1, live),
                ("mmap", 2, live),
                ("brk", 1, live),
                ("touch", 2, regions),
                ("change", 3, regions),
                ("access", 4, live and bool(self.any_regions())),
                ("spin", 3, bool(self.spinnable())),
                ("cut_off", 4, bool(self.spun())),
                ("crowd", 1, bool(self.crowdable())),
                ("pair", 3, True),
                ("fill", 1, not self.s.model.holders),
                ("unfill", 1, bool(self.s.model.holders)),
                ("drain", 3, bool(self.queued())),
                ("move_access", 2, regions),
                ("cow", 4, bool(self.writers())),
                ("probe", 3, bool(self.s.model.pairs())),
                ("cow_probe", 1, bool(self.s.model.pairs())),
                ("pile", 1, live and len(self.live()) <= services - 2),
            ]
            return [(name, w * self.factor.get(name, 1)) for name, w, can in table
                    if can and self.factor.get(name, 1)]

        @initialize(data=st.data())
        def swarm(self, data: st.DataObject) -> None:
            """Swarm testing: each sequence favours some operations and leaves others out,
            which reaches deep states of a few kinds far more often than uniform choice."""
            # in one sequence of three, dead keys are left queued (exit without reading
            # them back): several pile up for a later read() with a small count
            self.readback = data.draw(st.sampled_from([True, True, False]), label="read back")
            for op in SWARM:
                core = op in ("spawn", "enable_default", "request_peer")
                self.factor[op] = data.draw(st.sampled_from(
                    [1, 3] if core else [0, 0, 0, 1] if op in ("crowd", "fill")
                    else [1, 3, 0]), label=f"swarm {op}")

        @precondition(lambda self: bool(self.choices()))
        @rule(data=st.data())
        def act(self, data: st.DataObject) -> None:
            ops = [name for name, w in self.choices() for _ in range(w)]
            getattr(self, data.draw(st.sampled_from(ops), label="op"))(data)

    return Explore


def explore_settings(examples: int, steps: int, shrink: bool = True) -> settings:
    phases = [Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        phases=phases, derandomize=False, report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
        print_blob=False,
    )
