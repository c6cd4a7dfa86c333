"""The RPAL state as the spec (../shared/RPAL-SPEC.md) says it must be: the spec as code.

The model knows services (id, key, pkey, enabled), their requests (directed),
the pairs (mutual requests: mapped both ways), each service's dead-key
queue, the regions of memory the explorer mapped (and what it wrote there),
and the PKRU every thread must have. For each step it predicts the answer
(`Expect`: the outcomes it allows, or None when it cannot know) and which
mms must see a TLB flush; `apply` then moves the state on with what the
kernel answered (pids, tids and addresses the model does not choose).

Details the spec leaves open come from `choices.REFERENCE_CHOICES` only.

The world (which ids are taken or still held back after a death, the next
key) outlives one sequence: the explorer reuses one guest for many.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from testbed.designs.rpal.explore.choices import REFERENCE_CHOICES, Choices
from testbed.designs.rpal.explore.steps import (
    SEGV_ACCERR,
    SEGV_PKUERR,
    SIGSEGV,
    AnswerLike,
    Step,
)

PAGE = 4096
# steps the agent does itself, through no service (and spawn, which makes one)
AGENT_OPS = ("spawn", "fill", "unfill")
SLOT_SHIFT = 39
FULL_PKRU = 0xFFFFFFFF


def service_pkru(pkey: int) -> int:
    """A service thread's default PKRU: every key denied (AD and WD) except its own."""
    return FULL_PKRU & ~(3 << (2 * pkey))


def pkru_allows(pkru: int, pkey: int, write: bool) -> bool:
    bits = (pkru >> (2 * pkey)) & 3
    return not (bits & 1) and not (write and bits & 2)


# ----------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Outcome:
    """One answer the model accepts: its kind and the fields that must have these values.

    A field's value is an int, a str, or a frozenset of ints (any of them).
    """

    kind: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, a: AnswerLike) -> bool:
        if a.kind != self.kind:
            return False
        for k, want in self.fields.items():
            if k == "name":
                if a.errname != want:
                    return False
                continue
            got: Any = a.get_int(k)
            if got is None:
                got = a.fields.get(k)
            if isinstance(want, frozenset):
                if got not in want:
                    return False
            elif isinstance(want, int) and not isinstance(want, bool):
                if got != want:
                    return False
            elif str(got) != str(want):
                return False
        return True

    def text(self) -> str:
        parts = [self.kind]
        for k, v in self.fields.items():
            if isinstance(v, frozenset):
                v = "|".join(str(x) for x in sorted(v))
            elif isinstance(v, int) and k in ("value", "pkru", "addr"):
                v = f"0x{v:x}"
            parts.append(f"{k}={v}")
        return " ".join(parts)


def ok(**fields: Any) -> Outcome:
    return Outcome("ok", fields)


def err(name: str) -> Outcome:
    return Outcome("err", {"name": name})


def segv(code: int | None = None, pkey: int | None = None) -> Outcome:
    f: dict[str, Any] = {"sig": SIGSEGV}
    if code is not None:
        f["code"] = code
    if pkey is not None:
        f["pkey"] = pkey
    return Outcome("fault", f)


def access_outcomes(r: Region, page: int, write: bool, pkru: int
                    ) -> tuple[bool, tuple[Outcome, ...]]:
    """Whether `pkru` lets the access through the region's key, and what it may return:
    the page's value (or a plain ok for a write) when prot and key allow it, else the
    faults they call for (a pkey error first)."""
    allowed_prot = r.prot == "rw" or (r.prot == "r" and not write)
    allowed_key = pkru_allows(pkru, r.pkey, write)
    if allowed_prot and allowed_key:
        v = r.values[page]
        return True, (ok(**({} if write or v is None else {"value": v})),)
    outs = []
    if not allowed_key:
        outs.append(segv(SEGV_PKUERR, r.pkey))
    if not allowed_prot:
        outs.append(segv(SEGV_ACCERR))
    return allowed_key, tuple(outs)


@dataclass(frozen=True)
class Expect:
    """What the model allows for one step, and the check that a mismatch fails."""

    check: str
    outcomes: tuple[Outcome, ...] | None  # None: the model cannot know; not judged
    why: str = ""
    fault_check: str | None = None  # the check a wrong *fault* fails, if not `check`
    # the check a SIGSEGV death fails: an enabled service that dies on its own new memory
    # (a thread's stack, an mmap, brk) touched memory its PKRU denies: the memory does not
    # carry its pkey, or the thread's PKRU is wrong (the session's diagnosis tells which)
    died_check: str | None = None

    def check_for(self, a: AnswerLike) -> str:
        """The check a mismatching answer fails. A pkey fault naming another pkey than the
        expected one says the page carries the wrong key: keys."""
        if a.kind == "died" and self.died_check and a.get_int("sig") == SIGSEGV:
            return self.died_check
        if a.kind != "fault" or not self.fault_check:
            return self.check
        wanted = {o.fields.get("pkey") for o in self.outcomes or () if o.kind == "fault"}
        got = a.get_int("pkey")
        if a.get_int("code") == SEGV_PKUERR and got not in (None, -1) and got not in wanted:
            return "keys"
        return self.fault_check

    def judge(self, a: AnswerLike) -> bool | None:
        if self.outcomes is None:
            return None
        return any(o.matches(a) for o in self.outcomes)

    def text(self) -> str:
        if self.outcomes is None:
            return "(not judged)"
        return " or ".join(o.text() for o in self.outcomes)


UNKNOWN = Expect("result", None)


@dataclass
class Prediction:
    expect: Expect
    # services whose mm must show a TLB flush across this step (release, exit, exec)
    flush: set[str] = field(default_factory=set)
    # the spinner this step must cut off: (spinning service, "gone" | "zeroed")
    cutoff: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- state


@dataclass
class Region:
    name: str
    owner: str  # service name
    incarnation: int  # which life of the owner (exec and respawn start a new one)
    addr: int
    pages: int
    prot: str  # "rw" | "r" | "none"
    pkey: int
    values: list[int | None]  # None: unknown (a peer's write spinner keeps changing it)
    alive: bool = True
    # the owner's internal_maps when the region went: a later thread stack (or any
    # mapping the model does not name) may take the same addresses
    maps_at_death: int = 0

    @property
    def end(self) -> int:
        return self.addr + self.pages * PAGE

    def overlaps(self, addr: int, end: int) -> bool:
        return self.addr < end and addr < self.end


@dataclass
class Service:
    name: str
    incarnation: int
    pid: int
    id: int
    key: int
    enabled: bool = False
    pkey: int | None = None  # the enabled pkey
    alive: bool = True
    requests: set[str] = field(default_factory=set)  # names of live services requested
    allocated: set[int] = field(default_factory=lambda: {0})  # pkeys allocated in the mm
    main_pkru: int | None = None
    threads: dict[int, int | None] = field(default_factory=dict)  # tid -> expected PKRU
    deadkeys: list[int] = field(default_factory=list)
    children: list[int] = field(default_factory=list)
    spinner: tuple[str, int, int] | None = None  # (region, page, tid) while one runs
    spin_write: bool = False  # the spinner writes (else it reads)
    internal_maps: int = 0  # mappings the model does not name (thread stacks) so far
    died_at: float | None = None

    @property
    def slot(self) -> int:
        return self.id + 1

    @property
    def pkey_now(self) -> int:
        return self.pkey if self.pkey is not None else self.id % 16

    def in_slot(self, addr: int) -> bool:
        return addr >> SLOT_SHIFT == self.slot


@dataclass
class World:
    """What outlives one sequence on the same guest: ids in use or held back, the next key."""

    used: dict[int, str] = field(default_factory=dict)  # id -> service name
    held: dict[int, float] = field(default_factory=dict)  # dead id -> earliest reuse (s)
    next_key: int | None = 1  # None: unknown (a guest used before the model started)

    def id_candidates(self, now: float, nr: int) -> tuple[frozenset[int], bool]:
        """Ids the next registration may get (first free; held ones only past the delay)."""
        taken = set(self.used) | set(self.held)
        free = [i for i in range(nr) if i not in taken]
        maybe = {i for i, t in self.held.items() if now >= t}
        lo = free[0] if free else nr
        cands = frozenset({lo} if free else set()) | frozenset(i for i in maybe if i < lo)
        return cands, bool(cands)


class Model:
    def __init__(self, choices: Choices = REFERENCE_CHOICES, world: World | None = None) -> None:
        self.c = choices
        self.world = world if world is not None else World()
        self.svcs: dict[str, Service] = {}  # name -> its latest life
        self.dead: list[Service] = []  # earlier lives and dead services
        self.regions: dict[str, Region] = {}
        self.holders: list[int] = []  # ids held by the agent's holders (op fill)
        self._nregion = 0
        self._incarnation = 0

    # ----- queries --------------------------------------------------------------------------

    def live(self) -> list[Service]:
        return [s for s in self.svcs.values() if s.alive]

    def svc(self, name: str) -> Service | None:
        s = self.svcs.get(name)
        return s if s and s.alive else None

    def paired(self, a: str, b: str) -> bool:
        sa, sb = self.svc(a), self.svc(b)
        return bool(sa and sb and a != b and b in sa.requests and a in sb.requests)

    def peers(self, name: str) -> list[str]:
        return sorted(o.name for o in self.live() if self.paired(name, o.name))

    def pairs(self) -> set[frozenset[str]]:
        return {frozenset((a.name, b)) for a in self.live() for b in self.peers(a.name)}

    def live_regions(self, owner: str | None = None) -> list[Region]:
        return [r for r in self.regions.values() if r.alive
                and (owner is None or r.owner == owner)]

    def by_key(self, key: int) -> Service | None:
        for s in self.live():
            if s.key == key:
                return s
        return None

    def key_of(self, name: str) -> int | None:
        s = self.svcs.get(name)
        return s.key if s else None

    def expected_threads(self, name: str) -> dict[int, int | None]:
        s = self.svc(name)
        if s is None:
            return {}
        out = dict(s.threads)
        out[s.pid] = s.main_pkru
        return out

    def resolve_pkey(self, args: Mapping[str, Any]) -> int:
        """ENABLE's pkey argument: a number, or `pkey_of=S` (that service's pkey now)."""
        if "pkey_of" in args:
            s = self.svc(str(args["pkey_of"]))
            return s.pkey_now if s is not None else -1
        return int(args.get("pkey", -1))

    def resolve_key(self, args: Mapping[str, Any], caller: Service) -> int | None:
        if "key_of" in args:
            return self.key_of(str(args["key_of"]))
        if args.get("key") == "own":
            return caller.key
        k = args.get("key")
        return int(k) if isinstance(k, int) else None

    # ----- prediction -----------------------------------------------------------------------

    def predict(self, step: Step, now: float) -> Prediction:
        fn = getattr(self, f"_p_{step.op}", None)
        if fn is None:
            return Prediction(UNKNOWN)
        if step.op not in AGENT_OPS and self.svc(step.svc) is None:
            return Prediction(Expect("result", None, f"{step.svc} is not alive"))
        pred: Prediction = fn(step, now)
        return pred

    def _p_spawn(self, step: Step, now: float) -> Prediction:
        cands, any_free = self.world.id_candidates(now, self.c.nr_ids)
        if not any_free:
            return Prediction(Expect("ids", (err("ENOSPC"),), "no id free"))
        f: dict[str, Any] = {"id": cands}
        if self.c.keys_consecutive and self.world.next_key is not None:
            f["key"] = self.world.next_key
        f["pkey"] = frozenset(i % 16 for i in cands)
        taken = set(self.world.used) | set(self.world.held)
        if all(i in taken for i in range(self.c.nr_ids)):
            # every candidate is a dead service's id that may or may not be free yet
            return Prediction(Expect("ids", (ok(**f), err("ENOSPC")),
                                     f"an id among {sorted(cands)} if its delay is over, "
                                     "else ENOSPC"))
        return Prediction(Expect("ids", (ok(**f),),
                                 f"first free id among {sorted(cands)}, the next key"))

    def _p_fill(self, step: Step, now: float) -> Prediction:
        """Registrations until none is free: every free id (those a dead service held past
        its delay may or may not be free yet), then ENOSPC, and ENOSPC again: a refused
        registration frees nothing."""
        taken = set(self.world.used) | set(self.world.held)
        sure = sum(1 for i in range(self.c.nr_ids) if i not in taken)
        past = frozenset(i for i, t in self.world.held.items() if now >= t)
        maybe = len(past)
        held = frozenset(range(sure, sure + maybe + 1))
        outs = [ok(held=held, err="ENOSPC", again="ENOSPC")]
        if past:  # a dead service's delay may end between the refusal and the retry
            outs.append(ok(held=held, err="ENOSPC", again_id=past))
        return Prediction(Expect("ids", tuple(outs),
                                 f"{sure}{f'..{sure + maybe}' if maybe else ''} free ids, then "
                                 "no free id: ENOSPC, twice"))

    def _p_unfill(self, step: Step, now: float) -> Prediction:
        return Prediction(Expect("result", (ok(killed=len(self.holders)),)))

    def _p_exec(self, step: Step, now: float) -> Prediction:
        s = self.svc(step.svc)
        assert s is not None
        pred = self._p_spawn(step, now)  # the new mm registers while the old one lives
        pred.flush = set(self.peers(s.name))
        pred.cutoff = self._cutoff_of_owner(s.name, None)
        return pred

    def _p_exit(self, step: Step, now: float) -> Prediction:
        s = self.svc(step.svc)
        assert s is not None
        return Prediction(Expect("exit", (ok(),)), set(self.peers(s.name)),
                          self._cutoff_of_owner(s.name, None))

    def _p_enable(self, step: Step, now: float) -> Prediction:
        s = self.svc(step.svc)
        assert s is not None
        pkey = self.resolve_pkey(step.args)
        refusals = []
        if not -1 <= pkey <= 15:
            refusals.append("enable_bad_pkey")
        if s.enabled:
            refusals.append("enable_again")
        if refusals:
            names = self._ordered(refusals, ("enable_bad_pkey", "enable_again"))
            return Prediction(Expect("result", tuple(err(self.c.errno[n]) for n in names)))
        want = s.id % 16 if pkey == -1 else pkey
        return Prediction(Expect("keys", (ok(pkey=want),),
                                 f"pkey {want} ({'id % 16' if pkey == -1 else 'asked'})"))

    def _ordered(self, refusals: list[str], order: tuple[str, ...] | None) -> list[str]:
        if order is None:
            return refusals
        return [min(refusals, key=lambda r: order.index(r) if r in order else len(order))]

    def _caller_and_target(self, step: Step) -> tuple[Service, int, Service | None] | None:
        """REQUEST's and RELEASE's caller, the key it passes, and the live service of that
        key (None: no such service); None when the key can't be resolved."""
        s = self.svc(step.svc)
        assert s is not None
        key = self.resolve_key(step.args, s)
        return None if key is None else (s, key, self.by_key(key))

    def _p_request(self, step: Step, now: float) -> Prediction:
        got = self._caller_and_target(step)
        if got is None:
            return Prediction(UNKNOWN)
        s, key, t = got
        refusals = []
        if not s.enabled:
            refusals.append("request_not_enabled")
        if key == s.key:
            refusals.append("request_own_key")
        elif t is None:
            refusals.append("request_no_service")
        else:
            if not t.enabled:
                refusals.append("request_peer_not_enabled")
            elif s.enabled and t.pkey == s.pkey:
                refusals.append("request_same_pkey")
            if t.name in s.requests:
                refusals.append("request_already")
            if len(s.requests) >= self.c.max_peers:
                refusals.append("request_full")
        near_limit = len(s.requests) >= self.c.max_peers - 1
        if refusals:
            names = self._ordered(refusals, self.c.request_order)
            check = ("keys" if "request_same_pkey" in names else
                     "peer_limit" if "request_full" in names or near_limit else "result")
            return Prediction(Expect(check, tuple(err(self.c.errno[n]) for n in names),
                                     ", ".join(names)))
        assert t is not None
        mapped = s.name in t.requests
        return Prediction(Expect("peer_limit" if near_limit else "result",
                                 (ok(ret=1 if mapped else 0),),
                                 "mutual: now mapped" if mapped else "recorded"))

    def _p_release(self, step: Step, now: float) -> Prediction:
        got = self._caller_and_target(step)
        if got is None:
            return Prediction(UNKNOWN)
        s, _, t = got
        if t is None or t.name not in s.requests:
            return Prediction(Expect("result", (err(self.c.errno["release_not_requested"]),)))
        flush = {s.name, t.name} if self.paired(s.name, t.name) else set()
        cut = self._cutoff_pair(s.name, t.name) if flush else []
        return Prediction(Expect("result", (ok(),)), flush, cut)

    def _own_memory_op(self, step: Step) -> Prediction:
        s = self.svc(step.svc)
        enabled = bool(s and s.enabled)
        return Prediction(Expect("result", (ok(),), died_check="keys" if enabled else None))

    def _p_thread(self, step: Step, now: float) -> Prediction:
        return self._own_memory_op(step)

    def _p_threadpkru(self, step: Step, now: float) -> Prediction:
        s = self.svc(step.svc)
        assert s is not None
        want = s.threads.get(int(step.args.get("tid", -1)))
        return Prediction(Expect("pkru", None if want is None else (ok(pkru=want),)))

    def _p_signal(self, step: Step, now: float) -> Prediction:
        s = self.svc(step.svc)
        assert s is not None
        want = service_pkru(s.pkey) if s.enabled and s.pkey is not None else self.c.init_pkru
        return Prediction(Expect("pkru", (ok(pkru=want),),
                                 "a signal handler runs with the service's default PKRU"))

    def _p_pkey_alloc(self, step: Step, now: float) -> Prediction:
        s = self.svc(step.svc)
        assert s is not None
        if s.enabled:
            return Prediction(Expect("keys", (err(self.c.errno["pkey_alloc_locked"]),),
                                     "all 16 keys count as allocated"))
        # the lowest free key: 0 too, once a pkey_free(0) went through (6.1 allows it)
        free = [k for k in range(16) if k not in s.allocated]
        if not free:
            return Prediction(Expect("result", (err("ENOSPC"),)))
        return Prediction(Expect("result", (ok(pkey=free[0]),)))

    def _p_pkey_free(self, step: Step, now: float) -> Prediction:
        s = self.svc(step.svc)
        assert s is not None
        k = int(step.args["pkey"])
        if s.enabled:
            return Prediction(Expect("keys", (err(self.c.errno["pkey_free_locked"]),),
                                     "keys are locked in an enabled service"))
        if k not in s.allocated:
            return Prediction(Expect("result", (err("EINVAL"),)))
        if k == 0:  # Linux: 6.1 frees key 0 like any other; later kernels refuse (EINVAL)
            return Prediction(Expect("result", (ok(), err("EINVAL"))))
        return Prediction(Expect("result", (ok(),)))

    def _region(self, step: Step) -> Region | None:
        return self.regions.get(str(step.args.get("region", "")))

    def _own_region(self, step: Step) -> Region | None:
        r = self._region(step)
        s = self.svc(step.svc)
        if r is None or s is None or r.owner != s.name or r.incarnation != s.incarnation:
            return None
        return r

    def _p_mmap(self, step: Step, now: float) -> Prediction:
        return self._own_memory_op(step)

    def _p_brk(self, step: Step, now: float) -> Prediction:
        return self._own_memory_op(step)

    def _p_touch(self, step: Step, now: float) -> Prediction:
        return self._access(step, write=True)

    def _p_read(self, step: Step, now: float) -> Prediction:
        return self._access(step, write=False)

    def _p_write(self, step: Step, now: float) -> Prediction:
        return self._access(step, write=True)

    def _access(self, step: Step, write: bool) -> Prediction:
        """A guarded access by step.svc to a page of a region (its own or a peer's)."""
        a = self.svc(step.svc)
        r = self._region(step)
        assert a is not None
        if r is None:
            return Prediction(UNKNOWN)
        page = int(step.args.get("page", 0))
        if not 0 <= page < r.pages:
            return Prediction(UNKNOWN)
        mode = step.args.get("pkru", "own")
        owner = self.svcs.get(r.owner)
        own = owner is not None and owner.alive and owner.name == a.name \
            and r.incarnation == a.incarnation
        if not own:
            return self._peer_access(a, r, page, write, mode)
        if not r.alive:
            return Prediction(Expect("faults", None, "own unmapped region: may be reused"))
        pkru = 0 if mode == "open" else a.main_pkru
        if pkru is None:
            return Prediction(UNKNOWN)
        allowed_key, outs = access_outcomes(r, page, write, pkru)
        if outs[0].kind == "ok":
            return Prediction(Expect("keys", outs, f"own page, pkey {r.pkey}"))
        return Prediction(Expect("keys" if not allowed_key else "faults", outs,
                                 fault_check="faults"))

    def _peer_access(self, a: Service, r: Region, page: int, write: bool, mode: str
                     ) -> Prediction:
        if not 0 <= page < r.pages:
            return Prediction(UNKNOWN)
        owner = self.svcs.get(r.owner)
        if owner is None or not owner.alive or owner.incarnation != r.incarnation:
            # the owner (that life of it) is dead: its slot must be gone from our tables,
            # unless its id went to a new service meanwhile
            dead_id = next((d.id for d in self.dead if d.name == r.owner
                            and d.incarnation == r.incarnation), None)
            if dead_id is None or dead_id in self.world.used:
                return Prediction(Expect("exit", None, "the dead owner's slot was reused"))
            return Prediction(Expect("exit", (segv(self.c.unmapped_slot_code),),
                                     "the owner is dead: its slot is no longer mapped"))
        if not self.paired(a.name, owner.name):
            return Prediction(Expect("faults", (segv(self.c.unmapped_slot_code),),
                                     f"{owner.name}'s slot is not mapped for {a.name}"))
        if not r.alive:
            if any(o.overlaps(r.addr, r.end) for o in self.live_regions(owner.name)) \
                    or owner.internal_maps > r.maps_at_death:
                return Prediction(UNKNOWN)  # something else may live there now
            return Prediction(Expect("faults", (segv(),), "the peer unmapped that region"))
        pkru = 0 if mode == "open" else a.main_pkru
        if pkru is None:
            return Prediction(UNKNOWN)
        allowed_key, outs = access_outcomes(r, page, write, pkru)
        if outs[0].kind == "ok":
            return Prediction(Expect("faults", outs, f"served against {owner.name}'s mm"))
        # the access went through where the key denies it: isolation; it faulted, but not
        # with the peer's pkey error: the fault was not served against the peer's mm
        return Prediction(Expect("isolation" if not allowed_key else "faults", outs,
                                 f"{a.name}'s PKRU denies {owner.name}'s pkey {r.pkey}"
                                 if not allowed_key else "not permitted by the peer's prot",
                                 fault_check="faults"))

    def _p_munmap(self, step: Step, now: float) -> Prediction:
        r = self._own_region(step)
        if r is None or not r.alive:
            return Prediction(UNKNOWN)
        return Prediction(Expect("result", (ok(),)), cutoff=self._cutoff_region(r, "gone"))

    def _p_mprotect(self, step: Step, now: float) -> Prediction:
        r = self._own_region(step)
        if r is None or not r.alive:
            return Prediction(UNKNOWN)
        prot = str(step.args["prot"])
        cut = self._cutoff_region(r, "gone") if prot == "none" else \
            self._cutoff_region(r, "gone", writers_only=True) if prot == "r" else []
        return Prediction(Expect("result", (ok(),)), cutoff=cut)

    def _p_pkey_mprotect(self, step: Step, now: float) -> Prediction:
        s = self.svc(step.svc)
        r = self._own_region(step)
        assert s is not None
        if r is None or not r.alive:
            return Prediction(UNKNOWN)
        k = int(step.args["pkey"])
        if k == -1:
            return self._p_mprotect(step, now)
        if not 0 <= k <= 15:
            return Prediction(Expect("result", (err("EINVAL"),)))
        if s.enabled:
            return Prediction(Expect("keys", (err(self.c.errno["pkey_mprotect_locked"]),),
                                     "keys are locked in an enabled service"))
        if k not in s.allocated:
            return Prediction(Expect("result", (err("EINVAL"),)))
        return Prediction(Expect("result", (ok(),)))

    def _p_mremap(self, step: Step, now: float) -> Prediction:
        r = self._own_region(step)
        if r is None or not r.alive:
            return Prediction(UNKNOWN)
        how = step.args.get("how", "grow")
        if how == "shrink" and r.pages < 2:
            return Prediction(UNKNOWN)
        # shrinking cuts a spinner on the last page; growing may move the region (a spinner
        # the model then loses is stopped, not judged: the old address may stay mapped)
        cut = [(name, "gone") for name, page in self._spinners_on(r)
               if how == "shrink" and page >= r.pages - 1 or how == "move"]
        if how == "move":
            return Prediction(Expect("result", (ok(addr=self.move_target(r)),)), cutoff=cut)
        return Prediction(Expect("result", (ok(),)), cutoff=cut)

    def move_target(self, r: Region) -> int:
        """Where mremap(MREMAP_FIXED) moves a region: a free spot of its owner's slot (the
        middle of the slot, which nothing else uses), a different one for each move."""
        s = self.svcs[r.owner]
        self._moves = getattr(self, "_moves", 0)
        return (s.slot << SLOT_SHIFT) + (1 << 38) + (self._moves + 1) * 0x20_0000

    def _p_madvise(self, step: Step, now: float) -> Prediction:
        r = self._own_region(step)
        if r is None or not r.alive:
            return Prediction(UNKNOWN)
        advice = step.args.get("advice", "dontneed")
        cut = self._cutoff_region(r, "zeroed") if advice == "dontneed" else []
        return Prediction(Expect("result", (ok(),)), cutoff=cut)

    def _p_fork(self, step: Step, now: float) -> Prediction:
        """A fork write-protects the owner's pages for COW: a peer writing one of them must
        lose its writable translation (its next write breaks the COW in the owner's mm),
        so the child's copy stays as it was at the fork."""
        cut = [(name, "cow") for r in self.live_regions(step.svc)
               for name, _ in self._spinners_on(r) if self.svcs[name].spin_write]
        return Prediction(Expect("result", (ok(),)), cutoff=cut)

    def _p_deadkeys(self, step: Step, now: float) -> Prediction:
        """read() of `count` bytes (default 64 keys): as many queued keys as fit, never a
        byte past count; fewer than 8 bytes is EINVAL."""
        s = self.svc(step.svc)
        assert s is not None
        count = int(step.args.get("count", 64 * 8))
        if count < 8:
            return Prediction(Expect("exit", (err(self.c.errno["read_small_count"]),),
                                     f"count {count} holds no key"))
        if not s.deadkeys:
            return Prediction(Expect("exit", (ok(keys="none", over=0),
                                              err(self.c.errno["read_empty_nonblock"])),
                                     "no peer died"))
        n = min(count // 8, 64, len(s.deadkeys))
        keys = ",".join(str(k) for k in s.deadkeys[:n])
        return Prediction(Expect("exit", (ok(keys=keys, ret=8 * n, over=0),),
                                 f"the first {n} keys of the dead services it requested or was "
                                 f"requested by, {8 * n} bytes of count {count}"))

    def _p_poll(self, step: Step, now: float) -> Prediction:
        s = self.svc(step.svc)
        assert s is not None
        return Prediction(Expect("exit", (ok(pollin=1 if s.deadkeys else 0),)))

    def _p_spin(self, step: Step, now: float) -> Prediction:
        r = self._region(step)
        a = self.svc(step.svc)
        assert a is not None
        if r is None or a.spinner is not None:
            return Prediction(UNKNOWN)
        write = step.args.get("mode") == "write"
        pred = self._peer_access(a, r, int(step.args.get("page", 0)), write, "open")
        if pred.expect.outcomes and pred.expect.outcomes[0].kind == "ok":
            # a reader's first read is the page's value, a writer's first write its value
            v = int(step.args.get("value", 0)) if write else \
                pred.expect.outcomes[0].fields.get("value")
            # a service that dies of SIGSEGV here could not even take the fault in the
            # new thread: its PKRU or its stack's key is wrong (diagnosed as for `thread`)
            return Prediction(Expect("faults", (ok(**({} if v is None else {"first": v})),),
                                     pred.expect.why,
                                     died_check="keys" if a.enabled else None))
        return pred

    # ----- spinner cut-offs -----------------------------------------------------------------

    def _spinners_on(self, r: Region) -> list[tuple[str, int]]:
        return [(s.name, s.spinner[1]) for s in self.live()
                if s.spinner is not None and s.spinner[0] == r.name]

    def _cutoff_region(self, r: Region, kind: str, writers_only: bool = False
                       ) -> list[tuple[str, str]]:
        # "zeroed" (DONTNEED: the fresh page reads 0) shows a stale read only where the
        # page held something else, and only to a reader
        out = []
        for name, page in self._spinners_on(r):
            writer = self.svcs[name].spin_write
            if writers_only and not writer:
                continue
            if kind == "zeroed" and (writer or page >= r.pages or r.values[page] in (0, None)):
                continue
            out.append((name, kind))
        return out

    def _cutoff_of_owner(self, owner: str, _: Any) -> list[tuple[str, str]]:
        return [(name, "gone") for r in self.live_regions(owner)
                for name, _ in self._spinners_on(r) if name != owner]

    def _cutoff_pair(self, a: str, b: str) -> list[tuple[str, str]]:
        out = []
        for s, other in ((a, b), (b, a)):
            sv = self.svc(s)
            if sv and sv.spinner:
                r = self.regions.get(sv.spinner[0])
                if r and r.owner == other:
                    out.append((s, "gone"))
        return out

    # ----- applying what happened ------------------------------------------------------------

    def apply(self, step: Step, a: AnswerLike, now: float) -> None:
        """Move the state on after the kernel answered `a` (an accepted or unjudged answer)."""
        fn = getattr(self, f"_a_{step.op}", None)
        if fn is not None:
            fn(step, a, now)
        if a.kind in ("died", "timeout"):
            s = self.svc(step.svc)
            if s is not None:
                self._die(s, now)

    def _register(self, name: str, a: AnswerLike) -> Service | None:
        sid, key, pid = a.get_int("id"), a.get_int("key"), a.get_int("pid")
        if sid is None or key is None or pid is None:
            return None
        self._incarnation += 1
        s = Service(name, self._incarnation, pid, sid, key, main_pkru=self.c.init_pkru)
        self.world.used[sid] = name
        self.world.held.pop(sid, None)
        self.world.next_key = key + 1
        self.svcs[name] = s
        return s

    def _a_spawn(self, step: Step, a: AnswerLike, now: float) -> None:
        if a.kind == "ok":
            self._register(step.svc, a)

    def _a_exec(self, step: Step, a: AnswerLike, now: float) -> None:
        old = self.svc(step.svc)
        if a.kind != "ok" or old is None:
            return
        self._die(old, now)
        new = self._register(step.svc, a)
        if new is not None:
            new.pid = old.pid if a.get_int("pid") is None else new.pid

    def _a_exit(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        if s is not None and a.kind == "ok":
            self._die(s, now)

    def _die(self, s: Service, now: float) -> None:
        """Exit of a service: unpaired, requests dropped both ways, its key queued to others."""
        for p in self.live():
            if p.name == s.name:
                continue
            if s.name in p.requests or p.name in s.requests:
                if len(p.deadkeys) < self.c.dead_key_queue:
                    p.deadkeys.append(s.key)
                p.requests.discard(s.name)
            if p.spinner is not None:
                r = self.regions.get(p.spinner[0])
                if r is not None and r.owner == s.name:
                    p.threads.pop(p.spinner[2], None)
                    p.spinner = None
        s.requests.clear()
        s.alive = False
        s.died_at = now
        s.spinner = None
        for r in self.live_regions(s.name):
            r.alive = False
        self.world.used.pop(s.id, None)
        self._hold_id(s.id, now)
        self.dead.append(s)

    def _hold_id(self, i: int, now: float) -> None:
        """A dead registration's id: reused only after the delay."""
        if self.c.id_free_delay_ms is not None:
            self.world.held[i] = now + max(
                0, self.c.id_free_delay_ms - self.c.id_delay_tolerance_ms) / 1000
        else:
            self.world.held[i] = float("inf")

    def _a_enable(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        pkey = a.get_int("pkey")
        if s is None or a.kind != "ok" or pkey is None:
            return
        s.enabled = True
        s.pkey = pkey
        s.allocated = set(range(16))
        s.main_pkru = service_pkru(pkey)
        if self.c.other_threads_at_enable != "keep":
            s.threads = {t: None for t in s.threads}
        for r in self.live_regions(s.name):
            if s.in_slot(r.addr):
                r.pkey = pkey

    def _a_request(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        if s is None or a.kind != "ok":
            return
        key = self.resolve_key(step.args, s)
        t = self.by_key(key) if key is not None else None
        if t is not None:
            s.requests.add(t.name)

    def _a_release(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        if s is None or a.kind != "ok":
            return
        key = self.resolve_key(step.args, s)
        t = self.by_key(key) if key is not None else None
        if t is None:
            return
        for x, y in ((s, t), (t, s)):
            if x.spinner is not None:
                r = self.regions.get(x.spinner[0])
                if r is not None and r.owner == y.name and self.paired(s.name, t.name):
                    x.threads.pop(x.spinner[2], None)
                    x.spinner = None
        s.requests.discard(t.name)

    def _a_thread(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        tid = a.get_int("tid")
        if s is not None and a.kind == "ok" and tid is not None:
            s.threads[tid] = s.main_pkru  # a new thread inherits its creator's PKRU
            s.internal_maps += 1  # its stack

    def _a_pkey_alloc(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        k = a.get_int("pkey")
        if s is None or a.kind != "ok" or k is None or not 0 <= k <= 15:
            return
        s.allocated.add(k)
        rights = int(step.args.get("rights", 0))
        if s.main_pkru is not None:
            s.main_pkru = (s.main_pkru & ~(3 << 2 * k)) | ((rights & 3) << 2 * k)

    def _a_pkey_free(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        if s is not None and a.kind == "ok":
            s.allocated.discard(int(step.args["pkey"]))

    def _a_mmap(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        addr = a.get_int("addr")
        if s is None or a.kind != "ok" or addr is None:
            return
        pages = int(step.args.get("pages", 1))
        self._new_region(s, str(step.args.get("region") or ""), addr, pages,
                         str(step.args.get("prot", "rw")))

    def _new_region(self, s: Service, name: str, addr: int, pages: int, prot: str) -> Region:
        self._nregion += 1
        if not name:
            name = f"r{self._nregion}"
        pkey = s.pkey if s.enabled and s.pkey is not None and s.in_slot(addr) else 0
        r = Region(name, s.name, s.incarnation, addr, pages, prot, pkey, [0] * pages)
        for o in self.live_regions(s.name):  # a fixed mapping would replace old ones
            if o.overlaps(r.addr, r.end):
                o.alive = False
                o.maps_at_death = s.internal_maps
        self.regions[name] = r
        return r

    def next_region_name(self) -> str:
        return f"r{self._nregion + 1}"

    def _a_brk(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        old, new = a.get_int("old"), a.get_int("new")
        if s is None or a.kind != "ok" or old is None or new is None or new <= old:
            return
        start = (old + PAGE - 1) // PAGE * PAGE
        if new - start >= PAGE:
            self._new_region(s, str(step.args.get("region") or ""), start,
                             (new - start) // PAGE, "rw")

    def _a_touch(self, step: Step, a: AnswerLike, now: float) -> None:
        r = self._region(step)
        if r is not None and a.kind == "ok":
            r.values = [int(step.args.get("value", 0))] * r.pages
            self._unknown_spun(r)

    def _a_write(self, step: Step, a: AnswerLike, now: float) -> None:
        r = self._region(step)
        page = int(step.args.get("page", 0))
        if r is not None and a.kind == "ok" and 0 <= page < r.pages:
            r.values[page] = int(step.args.get("value", 0))
            self._unknown_spun(r)

    def _unknown_spun(self, r: Region) -> None:
        """A page a write spinner writes has no value the model can know."""
        for s in self.live():
            if s.spinner is not None and s.spin_write and s.spinner[0] == r.name \
                    and s.spinner[1] < r.pages:
                r.values[s.spinner[1]] = None

    def _a_munmap(self, step: Step, a: AnswerLike, now: float) -> None:
        r = self._own_region(step)
        if r is not None and a.kind == "ok":
            r.alive = False
            r.maps_at_death = self.svcs[r.owner].internal_maps
            self._stop_spinners_on(r)

    def _stop_spinners_on(self, r: Region, writers_only: bool = False) -> None:
        self._unknown_spun(r)  # what a writer wrote last, until it is stopped
        for s in self.live():
            if s.spinner is not None and s.spinner[0] == r.name \
                    and (s.spin_write or not writers_only):
                s.threads.pop(s.spinner[2], None)  # its thread faults and ends
                s.spinner = None

    def _a_mprotect(self, step: Step, a: AnswerLike, now: float) -> None:
        r = self._own_region(step)
        if r is not None and a.kind == "ok":
            r.prot = str(step.args["prot"])
            if r.prot == "none":
                self._stop_spinners_on(r)
            elif r.prot == "r":
                self._stop_spinners_on(r, writers_only=True)

    def _a_pkey_mprotect(self, step: Step, a: AnswerLike, now: float) -> None:
        r = self._own_region(step)
        if r is not None and a.kind == "ok":
            r.prot = str(step.args["prot"])
            k = int(step.args["pkey"])
            if k != -1:
                r.pkey = k
            if r.prot == "none":
                self._stop_spinners_on(r)

    def _a_mremap(self, step: Step, a: AnswerLike, now: float) -> None:
        r = self._own_region(step)
        addr = a.get_int("addr")
        if r is None or a.kind != "ok" or addr is None:
            return
        how = step.args.get("how", "grow")
        if how == "shrink":
            r.pages -= 1
            r.values = r.values[:r.pages]
        elif how == "grow":
            r.pages += 1
            r.values = r.values + [0]
        elif how == "move":
            self._moves = getattr(self, "_moves", 0) + 1
        if addr != r.addr:
            self._stop_spinners_on(r)
        r.addr = addr

    def _a_madvise(self, step: Step, a: AnswerLike, now: float) -> None:
        r = self._own_region(step)
        if r is not None and a.kind == "ok" and step.args.get("advice") == "dontneed":
            r.values = [0] * r.pages
            self._stop_spinners_on(r)
            self._unknown_spun(r)

    def _a_fork(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        child = a.get_int("child")
        if s is not None and a.kind == "ok" and child is not None:
            s.children.append(child)

    def _a_deadkeys(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        if s is None or a.kind != "ok":
            return
        got = a.fields.get("keys", "none")
        n = 0 if got in ("none", "") else len(got.split(","))
        del s.deadkeys[:n]

    def _a_fill(self, step: Step, a: AnswerLike, now: float) -> None:
        if a.kind != "ok":
            return
        got = a.fields.get("ids", "none")
        ids = [int(x) for x in got.split(",") if x.isdigit()] if got != "none" else []
        again = a.get_int("again_id")
        if again is not None:
            ids.append(again)
        for i in ids:
            self.world.used[i] = "(holder)"
            self.world.held.pop(i, None)
        self.holders += ids
        key = a.get_int("last_key")
        if key is not None:
            self.world.next_key = key + 1

    def _a_unfill(self, step: Step, a: AnswerLike, now: float) -> None:
        if a.kind != "ok":
            return
        for i in self.holders:
            if self.world.used.get(i) == "(holder)":
                self.world.used.pop(i)
            self._hold_id(i, now)
        self.holders = []

    def _a_spin(self, step: Step, a: AnswerLike, now: float) -> None:
        s = self.svc(step.svc)
        tid = a.get_int("tid")
        if s is not None and a.kind == "ok" and tid is not None:
            s.spinner = (str(step.args["region"]), int(step.args.get("page", 0)), tid)
            s.spin_write = step.args.get("mode") == "write"
            s.threads[tid] = 0  # it WRPKRUs the open PKRU once
            s.internal_maps += 1  # its stack
            r = self._region(step)
            if r is not None:
                self._unknown_spun(r)

    def spinner_done(self, name: str) -> None:
        s = self.svc(name)
        if s is not None and s.spinner is not None:
            r = self.regions.get(s.spinner[0])
            if r is not None:
                self._unknown_spun(r)
            s.threads.pop(s.spinner[2], None)
            s.spinner = None

    # ----- for the snapshot checks ------------------------------------------------------------

    def snapshot_view(self) -> tuple[list[Service], list[Service], set[frozenset[str]]]:
        """Live services, dead ones whose slot nobody took since, and the pairs."""
        gone = [d for d in self.dead if d.id not in self.world.used
                and not any(x.id == d.id for x in self.dead if x.died_at and d.died_at
                            and x.died_at > d.died_at)]
        return self.live(), gone, self.pairs()


def describe(services: Iterable[Service]) -> list[dict[str, Any]]:
    return [{"name": s.name, "pid": s.pid, "id": s.id, "key": s.key, "enabled": s.enabled,
             "pkey": s.pkey, "requests": sorted(s.requests), "deadkeys": list(s.deadkeys)}
            for s in services]
