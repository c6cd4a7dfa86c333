"""RPAL invariants (../shared/RPAL-SPEC.md) as pure functions from snapshots to findings.

The guest workloads say at each checkpoint who the services are and what the
kernel told them through the ABI, as checkpoint facts
(`A.pid= A.id= A.key= A.pkey= [A.alive=0] B.pid= ... pairs=A-B,A-C|none`).
The host decides from the snapshot and cross-checks those claims:

- a service's slot is the one its own page tables hold an *unmarked* entry for
  (slot = id + 1 is what the workload claims);
- its pkey is the pkey its own slot's leaves carry (the most pages');
- the PKRU its threads must have follows from that pkey;
- copies are the *marked* entries; they must be exactly the facts' pairs
  (what the workloads did: request, release, exit), pointing at the owner's table.

A claim that contradicts the snapshot is a failing finding of check `claims`.
Data the host could not read (`Absent`) makes every check that needs it an
error finding, never a pass; a checkpoint without services is a `skip` of the
scenario's declared host checks.

Evidence keys used for the report's picture: `pid`, `slot`, `expected_table`,
`actual_table`, `raw` (see testbed/report/slotgraph.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from testbed.check.kernel_log import CHECK as KERNEL_LOG
from testbed.check.model import CheckInfo, Finding, Status
from testbed.designs import Scenario
from testbed.snapshot.model import Absent, Mapping, Mm, Snapshot, hx

FULL_PKRU = 0xFFFFFFFF
SERVICE_SLOTS = range(1, 255)  # slot = id + 1, ids 0..253

CHECKS: dict[str, CheckInfo] = {
    c.name: c
    for c in (
        CheckInfo(
            "slot_confinement", "Slot confinement",
            "a service's user mappings lie in its own slot or in a mapped peer's slot", (),
        ),
        CheckInfo(
            "slot_copies", "Slot copies",
            "for paired services, each one's entry for the other's slot points at the same PUD "
            "table as the owner's own entry and carries the marker bit; nothing else is copied; "
            "after release or exit, no copies",
            ("keep_copy_on_release", "keep_copy_on_exit", "wrong_slot_copy",
             "release_clears_first_peer", "fork_keeps_copy"),
        ),
        CheckInfo(
            "keys", "Protection keys",
            "every leaf in a service's slot carries its pkey; paired services have different "
            "pkeys; keys are locked",
            ("same_pkey", "untagged_mmap", "pkey_free_allowed", "pkey0_mprotect_allowed",
             "mremap_drops_pkey", "pkey_mprotect_foreign_allowed"),
        ),
        CheckInfo(
            "pkru", "PKRU",
            "a service thread outside a call denies every key but its own; never fully open",
            ("pkru_open", "thread_default_pkru", "enable_opens_threads",
             "signal_pkru_inherit"),
        ),
        CheckInfo(
            "tlb_state", "TLB generations",
            "a flush of a service's mm bumps the TLB generation of every mapped peer, and every "
            "CPU that has an mm loaded is at or past its generation",
            ("skip_peer_flush", "dontneed_skips_peers", "mremap_move_skips_peers",
             "fork_cow_skips_peers", "first_peer_only_flush", "release_flushes_caller_only",
             "peer_flush_own_gen"),
        ),
        CheckInfo(
            "claims", "Workload claims",
            "what the kernel told a workload (its service id, its pkey) agrees with its page "
            "tables (the slot of its unmarked entry, the pkey of its leaves)", (),
        ),
        CheckInfo(
            "tlb_shootdown", "TLB shootdown (functional)",
            "a peer never reads data its owner already unmapped or re-protected",
            ("skip_peer_flush", "dontneed_skips_peers", "mremap_move_skips_peers",
             "fork_cow_skips_peers", "first_peer_only_flush", "peer_flush_own_gen"),
            source="guest",
        ),
        CheckInfo(
            "faults", "Faults",
            "an access into a mapped peer's slot is served against the peer's mm; outside any "
            "mapped peer it is a SIGSEGV",
            ("no_fault_redirect", "wrong_slot_copy"), source="guest",
        ),
        CheckInfo(
            "isolation", "MPK isolation",
            "a stray access to a peer faults with a pkey error; the WRPKRU weakness is shown",
            (), source="guest",
        ),
        CheckInfo(
            "exit", "Exit",
            "a dead peer leaves no copies, and its key is reported by read()/poll(); read() "
            "writes no more than count bytes",
            ("keep_copy_on_exit", "read_ignores_count", "dead_key_twice",
             "exit_pending_no_dead_key"), source="guest",
        ),
        CheckInfo(
            "ids", "Service ids",
            "every live service has an id of its own (0..253, slot id + 1); with none free, "
            "exec fails with ENOSPC and frees nothing; a dead service's id is reused only "
            "after the delay",
            ("exhaustion_frees_id", "id_reused_at_once"), source="guest",
        ),
        CheckInfo(
            "peer_limit", "Peer limit",
            "a service can have 15 requested peers, all mapped at once, and not a 16th",
            ("peer_limit_off_by_one",), source="guest",
        ),
    )
}

# the design-independent kernel_log check, with the reference kernel's bug named for it
CHECKS[KERNEL_LOG.name] = replace(KERNEL_LOG, bugs=("warn_on_release", "peer_flush_own_gen"))
# the explorer's judge of each operation's answer against the model of the spec
# the security review's rows (testbed/designs/rpal/SECURITY.md, security/judge.py)
CHECKS["security"] = CheckInfo(
    "security", "Security review",
    "each attack between a victim and an attacker service is blocked where the design says "
    "it is (SECURITY.md: expected blocked) and shown where the design names a known "
    "weakness; a row contradicting its expectation fails",
    ("signal_pkru_inherit", "pkey_mprotect_foreign_allowed", "fork_keeps_copy",
     "enable_opens_threads", "placeholder_may_access"),
)
CHECKS["result"] = CheckInfo(
    "result", "Operation results",
    "every operation returns what the spec says (value or errno; where the spec leaves it "
    "open, the reference's choice in testbed/designs/rpal/explore/choices.py): a request "
    "of a service that is not enabled, of a dead or unknown key, of one's own key is refused",
    ("request_unenabled_peer", "request_dead_key"),
)

# the checks judged from snapshots (kernel_log reads the console, result the answers)
HOST_CHECKS = tuple(n for n, c in CHECKS.items()
                    if c.source == "host" and n not in (KERNEL_LOG.name, "result", "security"))


def expected_pkru(pkey: int) -> int:
    return FULL_PKRU & ~(3 << (2 * pkey))


# ----------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Claim:
    """A service as its workload describes it (what the kernel told it)."""

    role: str
    pid: int
    id: int
    key: int
    pkey: int
    alive: bool = True

    @property
    def slot(self) -> int:
        return self.id + 1


@dataclass(frozen=True)
class Facts:
    services: dict[str, Claim]
    pairs: frozenset[frozenset[str]]

    def peers(self, role: str) -> list[str]:
        return sorted(r for pair in self.pairs if role in pair for r in pair if r != role)


class FactsError(ValueError):
    pass


def parse_facts(facts: dict[str, str]) -> Facts:
    """Services and pairs from checkpoint facts (see the module docstring)."""
    roles: dict[str, dict[str, str]] = {}
    for k, v in facts.items():
        role, dot, attr = k.partition(".")
        if dot:
            roles.setdefault(role, {})[attr] = v
    services = {}
    for role, a in roles.items():
        try:
            services[role] = Claim(role, int(a["pid"]), int(a["id"]), int(a["key"]),
                                   int(a["pkey"]), a.get("alive", "1") != "0")
        except (KeyError, ValueError) as exc:
            raise FactsError(f"incomplete facts for service {role}: {a}") from exc
    pairs = set()
    spec = facts.get("pairs", "none")
    if spec and spec != "none":
        for p in spec.split(","):
            members = frozenset(p.split("-"))
            if len(members) != 2 or not members <= set(services):
                raise FactsError(f"pair {p!r} does not name two known services")
            pairs.add(members)
    return Facts(services, frozenset(pairs))


# ----------------------------------------------------------------------------- host's view


@dataclass
class Service:
    """A live service as the host sees it: its mm, its slot and its pkey from the snapshot.

    `slot` / `pkey` are None when the host could not tell (`why_slot` / `why_pkey` say
    why); the checks that need them then give error findings.
    """

    claim: Claim
    mm: Mm | None
    mappings: tuple[Mapping, ...] | Absent
    slot: int | None = None
    why_slot: str = ""
    pkey: int | None = None
    why_pkey: str = ""
    leaves: list[Mapping] = field(default_factory=list)  # leaves in its own slot

    @property
    def role(self) -> str:
        return self.claim.role

    @property
    def pid(self) -> int:
        return self.claim.pid

    def label(self) -> str:
        slot = self.slot if self.slot is not None else "?"
        pkey = self.pkey if self.pkey is not None else "?"
        return f"{self.role} (pid {self.pid}, slot {slot}, pkey {pkey})"


@dataclass
class Ctx:
    scenario: str
    checkpoint: str

    def finding(self, check: str, status: Status | bool, msg: str, subject: str = "",
                **evidence: Any) -> Finding:
        st = status if isinstance(status, Status) else Status.of(status)
        return Finding(check, st, msg, self.scenario, self.checkpoint, subject, evidence)

    def error(self, check: str, msg: str, subject: str = "", **evidence: Any) -> Finding:
        return self.finding(check, Status.ERROR, msg, subject, **evidence)


def own_slot(mm: Mm, claimed: int) -> tuple[int | None, str]:
    """The slot a service's page tables own: the slot of its unmarked entry in 1..254."""
    if isinstance(mm.slots, Absent):
        return None, f"slot entries could not be read: {mm.slots.reason}"
    unmarked = [e.slot for e in mm.slots if e.present and not e.marker and e.slot in SERVICE_SLOTS]
    if claimed in unmarked:
        return claimed, ""
    if len(unmarked) == 1:
        return unmarked[0], ""
    if not unmarked:
        marked = mm.slot(claimed)
        return None, ("no unmarked entry in the service slots"
                      + (f" (the entry for slot {claimed} carries the copy marker)"
                         if marked and marked.marker else ""))
    return None, f"unmarked entries for several service slots {unmarked}, none the claimed one"


def own_pkey(leaves: list[Mapping]) -> int | None:
    """The pkey most of the own slot's leaf pages carry (ties: the lower key)."""
    pages: Counter[int] = Counter()
    for m in leaves:
        pages[m.pkey] += m.pages
    if not pages:
        return None
    return min(pages, key=lambda k: (-pages[k], k))


def resolve(snap: Snapshot, facts: Facts) -> dict[str, Service]:
    """The host's view of each live service the facts name."""
    out: dict[str, Service] = {}
    for c in facts.services.values():
        if not c.alive:
            continue
        mm = snap.mm_of(c.pid)
        threads = snap.threads(c.pid)
        maps: tuple[Mapping, ...] | Absent
        if not threads:
            maps = Absent(f"pid {c.pid} not in the snapshot")
        else:
            maps = threads[0].mappings
        s = Service(c, mm, maps)
        if mm is None:
            s.why_slot = s.why_pkey = f"no mm for pid {c.pid} in the snapshot"
        else:
            s.slot, s.why_slot = own_slot(mm, c.slot)
        if s.slot is not None:
            if isinstance(maps, Absent):
                s.why_pkey = f"mappings could not be read: {maps.reason}"
            else:
                s.leaves = [m for m in maps if m.kind == "leaf" and s.slot in m.slots]
                s.pkey = own_pkey(s.leaves)
                if s.pkey is None:
                    s.why_pkey = f"no leaf mapping in its slot {s.slot}"
        elif not s.why_pkey:
            s.why_pkey = f"its slot is not known: {s.why_slot}"
        out[c.role] = s
    return out


# ----------------------------------------------------------------------------- checks


def check_claims(snap: Snapshot, facts: Facts, svcs: dict[str, Service], ctx: Ctx
                 ) -> Iterator[Finding]:
    for s in svcs.values():
        c = s.claim
        if s.slot is None or s.pkey is None:
            yield ctx.error("claims", f"cannot check {c.role}'s claims: "
                            f"{s.why_slot or s.why_pkey}", s.label(), pid=c.pid)
            continue
        wrong = []
        if s.slot != c.slot:
            wrong.append(f"id {c.id} (slot {c.slot}), its page tables own slot {s.slot}")
        if s.pkey != c.pkey:
            wrong.append(f"pkey {c.pkey}, its slot's leaves carry pkey {s.pkey}")
        yield ctx.finding(
            "claims", not wrong,
            f"{c.role}'s workload was told " + "; ".join(wrong) if wrong else
            f"{c.role}'s id {c.id} and pkey {c.pkey} agree with its page tables",
            s.label(), pid=c.pid, claimed_id=c.id, claimed_pkey=c.pkey, slot=s.slot,
            leaf_pkey=s.pkey,
        )


def check_slot_confinement(snap: Snapshot, facts: Facts, svcs: dict[str, Service], ctx: Ctx
                           ) -> Iterator[Finding]:
    for s in svcs.values():
        if isinstance(s.mappings, Absent):
            yield ctx.error("slot_confinement", f"{s.role}'s mappings: {s.mappings.reason}",
                            s.label(), pid=s.pid)
            continue
        peers = [svcs.get(p) for p in facts.peers(s.role)]
        if s.slot is None or any(p is not None and p.slot is None for p in peers):
            yield ctx.error("slot_confinement",
                            f"the slots of {s.role} or its peers are not known: {s.why_slot}",
                            s.label(), pid=s.pid)
            continue
        allowed = {s.slot} | {p.slot for p in peers if p is not None and p.slot is not None}
        outside = [m for m in s.mappings if not set(m.slots) <= allowed]
        yield ctx.finding(
            "slot_confinement", not outside,
            f"{len(outside)} mapping(s) of {s.role} outside slots {sorted(allowed)}"
            if outside else
            f"all {len(s.mappings)} mappings of {s.role} in slots {sorted(allowed)}",
            s.label(), pid=s.pid, slot=s.slot, allowed_slots=sorted(allowed),
            outside=[m.to_json() for m in outside[:5]],
        )


def check_slot_copies(snap: Snapshot, facts: Facts, svcs: dict[str, Service], ctx: Ctx,
                      dead_slots: dict[str, int] | None = None) -> Iterator[Finding]:
    pti = snap.kernel.pti
    for role, s in svcs.items():
        mm = s.mm
        if mm is None:
            yield ctx.error("slot_copies", f"no mm for service {role} (pid {s.pid}) in the "
                            "snapshot", s.label(), pid=s.pid)
            continue
        if isinstance(mm.slots, Absent):
            yield ctx.error("slot_copies", f"{role}'s slot entries: {mm.slots.reason}",
                            s.label(), pid=s.pid)
            continue
        if s.slot is None:
            yield ctx.finding("slot_copies", False, f"{role} has no entry of its own: "
                              f"{s.why_slot}", s.label(), pid=s.pid, slot=s.claim.slot)
            continue
        peer_svcs = {p: svcs.get(p) for p in facts.peers(role)}
        peer_slots: set[int] = set()
        for p_role, p in sorted(peer_svcs.items()):
            if p is None:
                continue  # dead: judged below
            if p.slot is None or p.mm is None or isinstance(p.mm.slots, Absent):
                yield ctx.error("slot_copies", f"cannot judge {role}'s copy of {p_role}'s slot: "
                                f"{p_role}'s own entry is not known ({p.why_slot})", s.label(),
                                pid=s.pid, peer_pid=p.pid)
                continue
            peer_slots.add(p.slot)
            powner = p.mm.slot(p.slot)
            expected = hx(powner.table) if powner else None
            copy = mm.slot(p.slot)
            ev: dict[str, Any] = dict(
                pid=s.pid, slot=p.slot, expected_table=expected,
                actual_table=hx(copy.table) if copy else None,
                raw=hx(copy.raw) if copy else None, peer_pid=p.pid)
            if copy is None or not copy.present:
                yield ctx.finding("slot_copies", False,
                                  f"{role} paired with {p_role} but has no entry for slot "
                                  f"{p.slot}", s.label(), **ev)
                continue
            why = []
            if hx(copy.table) != expected:
                why.append(f"points at table {hx(copy.table)}, {p_role}'s own entry at {expected}")
            if not copy.marker:
                why.append("lacks the marker bit 9")
            yield ctx.finding(
                "slot_copies", not why,
                f"{role}'s copy of {p_role}'s slot {p.slot}: "
                + ("; ".join(why) if why else f"same table {expected}, marked"),
                s.label(), **ev,
            )
            if pti:
                if isinstance(mm.user_slots, Absent):
                    yield ctx.error("slot_copies", f"{role}'s user-root (PTI) entries: "
                                    f"{mm.user_slots.reason}", s.label(), pid=s.pid,
                                    slot=p.slot, root="user")
                    continue
                if mm.user_slots is None:
                    yield ctx.error("slot_copies", f"PTI is on but {role}'s user root was not "
                                    "read", s.label(), pid=s.pid, slot=p.slot, root="user")
                    continue
                ucopy = mm.slot(p.slot, user=True)
                uok = bool(ucopy and hx(ucopy.table) == expected and not ucopy.nx)
                yield ctx.finding(
                    "slot_copies", uok,
                    f"{role}'s user-root (PTI) copy of slot {p.slot}: "
                    + ("same table, NX clear" if uok else
                       "missing" if ucopy is None else
                       f"table {hx(ucopy.table)}, nx {ucopy.nx}"),
                    s.label(), pid=s.pid, slot=p.slot, expected_table=expected,
                    actual_table=hx(ucopy.table) if ucopy else None, root="user",
                )
        # nothing else: no entry in another service's slot unless paired, no stray markers
        others = {o.slot: o.role for o in svcs.values() if o.role != role and o.slot is not None}
        foreign = 0
        for e in mm.slots:
            if e.slot == s.slot or e.slot in peer_slots:
                continue
            if e.marker or e.slot in others:
                foreign += 1
                whose = others.get(e.slot, "no known service")
                yield ctx.finding(
                    "slot_copies", False,
                    f"{role} has an entry for slot {e.slot} ({whose}) without being paired with "
                    "it" + (" (marked as a copy)" if e.marker else ""),
                    s.label(), pid=s.pid, slot=e.slot, actual_table=hx(e.table), raw=hx(e.raw),
                    expected_table=None,
                )
        if not foreign and not peer_svcs:
            yield ctx.finding("slot_copies", True,
                              f"{role} is not paired and holds no entry of another slot",
                              s.label(), pid=s.pid, slot=s.slot,
                              slots=[e.slot for e in mm.slots])
    # a copy belongs to a pair: an mm that is no service's (a fork child of a paired
    # service, say) holds none; its own entries (a child's copy of its parent's slot) are
    # not marked
    own_mms = {s.mm.address for s in svcs.values() if s.mm is not None}
    for other in snap.mms:
        if other.address in own_mms or isinstance(other.slots, Absent):
            continue
        for e in other.slots:
            if e.marker:
                pids = ",".join(str(t) for t in other.tasks) or "none"
                yield ctx.finding(
                    "slot_copies", False,
                    f"an mm that is no service's (tasks {pids}) holds a copy of slot {e.slot}"
                    " (marked): a copy belongs to a pair", f"mm {hx(other.address)}",
                    pids=list(other.tasks), slot=e.slot, actual_table=hx(e.table),
                    raw=hx(e.raw), expected_table=None)
    # a dead service's slot must not be mapped by anyone
    for d in (c for c in facts.services.values() if not c.alive):
        slot = (dead_slots or {}).get(d.role, d.slot)
        for role, s in svcs.items():
            if s.mm is None or isinstance(s.mm.slots, Absent):
                continue  # reported above
            left = s.mm.slot(slot)
            yield ctx.finding(
                "slot_copies", left is None,
                f"{role} still has an entry for the dead {d.role}'s slot {slot}" if left else
                f"{role} holds no entry for the dead {d.role}'s slot {slot}",
                s.label(), pid=s.pid, slot=slot,
                actual_table=hx(left.table) if left else None, expected_table=None,
                raw=hx(left.raw) if left else None,
            )


def check_keys(snap: Snapshot, facts: Facts, svcs: dict[str, Service], ctx: Ctx
               ) -> Iterator[Finding]:
    for s in svcs.values():
        if s.slot is None or isinstance(s.mappings, Absent):
            why = s.why_slot if s.slot is None else f"mappings: {s.mappings.reason}"  # type: ignore[union-attr]
            yield ctx.error("keys", f"cannot judge the pkeys of {s.role}: {why}", s.label(),
                            pid=s.pid)
            continue
        own = s.leaves
        wrong = [m for m in own if m.pkey != s.pkey]
        pkeys = sorted({m.pkey for m in own})
        yield ctx.finding(
            "keys", bool(own) and not wrong,
            f"no leaf mapping in {s.role}'s slot {s.slot}" if not own else
            f"{len(wrong)} of {len(own)} mapping(s) in {s.role}'s slot {s.slot} carry other "
            f"pkeys than {s.pkey} (pkeys seen: {pkeys})" if wrong else
            f"all {len(own)} mapping(s) in {s.role}'s slot carry pkey {s.pkey}",
            s.label(), pid=s.pid, slot=s.slot, pkey=s.pkey, pkeys=pkeys,
            untagged=[m.to_json() for m in wrong[:5]],
        )
    for pair in sorted(facts.pairs, key=sorted):
        a, b = (svcs.get(r) for r in sorted(pair))
        if a is None or b is None:
            continue  # a dead member: nothing to compare any more
        if a.pkey is None or b.pkey is None:
            yield ctx.error("keys", f"cannot compare the pkeys of {a.role} and {b.role}: "
                            f"{a.why_pkey or b.why_pkey}", f"{a.role}-{b.role}",
                            pid=a.pid, peer_pid=b.pid)
            continue
        yield ctx.finding(
            "keys", a.pkey != b.pkey,
            f"paired {a.role} and {b.role} have "
            + ("different pkeys" if a.pkey != b.pkey else f"the same pkey {a.pkey}"),
            f"{a.role}-{b.role}", pid=a.pid, peer_pid=b.pid, pkeys=[a.pkey, b.pkey],
        )


def check_pkru(snap: Snapshot, facts: Facts, svcs: dict[str, Service], ctx: Ctx
               ) -> Iterator[Finding]:
    for s in svcs.values():
        threads = snap.threads(s.pid)
        if not threads:
            yield ctx.error("pkru", f"no thread of {s.role} (pid {s.pid}) in the snapshot",
                            s.label(), pid=s.pid)
            continue
        if s.pkey is None:
            yield ctx.error("pkru", f"the expected PKRU of {s.role} is not known: its pkey is "
                            f"not known ({s.why_pkey})", s.label(), pid=s.pid)
            continue
        want = expected_pkru(s.pkey)
        for t in threads:
            if isinstance(t.pkru, Absent):
                yield ctx.error("pkru", f"thread {t.pid} of {s.role}: PKRU not read: "
                                f"{t.pkru.reason}", s.label(), pid=s.pid, tid=t.pid)
                continue
            got = t.pkru
            yield ctx.finding(
                "pkru", got == want,
                f"thread {t.pid} of {s.role}: PKRU {hx(got)}"
                + ("" if got == want else f", expected {hx(want)} for pkey {s.pkey}")
                + (" (fully open)" if got == 0 else ""),
                s.label(), pid=s.pid, tid=t.pid, pkru=hx(got), expected=hx(want),
                pkru_source=t.pkru_source,
            )


def check_tlb_state(snap: Snapshot, facts: Facts, svcs: dict[str, Service], ctx: Ctx
                    ) -> Iterator[Finding]:
    """Every CPU with a service's mm loaded (not lazily) is at or past that mm's generation."""
    by_pid = {p: s for s in svcs.values() for p in (s.mm.tasks if s.mm else ())}
    judged = 0
    for c in snap.cpus:
        tlb = c.tlb
        if isinstance(tlb, Absent):
            yield ctx.error("tlb_state", f"CPU {c.index}: TLB state not read: {tlb.reason}",
                            f"CPU {c.index}", cpu=c.index)
            continue
        mm = snap.mm_at(tlb.loaded_mm)
        if mm is None or tlb.is_lazy:
            continue
        owners = [by_pid[p] for p in mm.tasks if p in by_pid]
        if not owners:
            continue
        judged += 1
        gen = tlb.loaded_gen
        ok = gen is not None and gen >= mm.tlb_gen
        yield ctx.finding(
            "tlb_state", ok,
            f"CPU {c.index} has {owners[0].role}'s mm loaded at generation {gen}, "
            f"mm at {mm.tlb_gen}",
            owners[0].label(), cpu=c.index, loaded_mm=hx(mm.address), cpu_tlb_gen=gen,
            mm_tlb_gen=mm.tlb_gen, pid=owners[0].pid,
        )
    if not judged and not any(isinstance(c.tlb, Absent) for c in snap.cpus):
        yield ctx.finding("tlb_state", Status.SKIP,
                          "no CPU has a service's mm loaded (not lazily): no TLB to compare")


def check_tlb_propagation(before: Snapshot, after: Snapshot, facts: Facts, ctx: Ctx,
                          owners: frozenset[str] | None = None) -> Iterator[Finding]:
    """Between two snapshots of paired services: a peer's flushes move our generation too.

    `owners`: judge only the flushes of these roles (the ones whose own page tables
    changed). A generation also moves when a peer's flush reaches it; that flush need
    not go on to the peer's own peers, so without knowing who changed what, a move of
    one side alone is evidence only for the side that acted.
    """
    for pair in sorted(facts.pairs, key=sorted):
        for owner_role in sorted(pair):
            if owners is not None and owner_role not in owners:
                continue
            owner = facts.services[owner_role]
            peer = next(facts.services[r] for r in pair if r != owner_role)
            if not (owner.alive and peer.alive):
                continue
            o0, o1 = before.mm_of(owner.pid), after.mm_of(owner.pid)
            p0, p1 = before.mm_of(peer.pid), after.mm_of(peer.pid)
            if not (o0 and o1 and p0 and p1):
                yield ctx.error("tlb_state", f"{owner.role} or {peer.role} missing from a "
                                "snapshot", owner.role, pid=owner.pid, peer_pid=peer.pid)
                continue
            if o1.tlb_gen - o0.tlb_gen <= 0:
                continue  # the owner did not flush: nothing to propagate
            ok = p1.tlb_gen - p0.tlb_gen > 0
            yield ctx.finding(
                "tlb_state", ok,
                f"{owner.role}'s mm flushed (tlb_gen {o0.tlb_gen} -> {o1.tlb_gen}); mapped "
                f"peer {peer.role}'s tlb_gen {p0.tlb_gen} -> {p1.tlb_gen}"
                + ("" if ok else ": the flush did not reach the peer"),
                f"{owner.role} (pid {owner.pid})", pid=owner.pid, peer_pid=peer.pid,
                owner_tlb_gen=[o0.tlb_gen, o1.tlb_gen],
                peer_tlb_gen=[p0.tlb_gen, p1.tlb_gen], peer_cpumask=list(p1.cpumask),
            )


SNAPSHOT_CHECKS = (check_claims, check_slot_confinement, check_slot_copies, check_keys,
                   check_pkru, check_tlb_state)


def check_snapshots(snapshots: Sequence[Snapshot], scenario: str,
                    declared: Sequence[str] = ()) -> list[Finding]:
    """Run every snapshot check on each checkpoint in order, and the two-snapshot checks.

    A checkpoint without services (no facts) gives a `skip` of each declared host
    check; unusable facts an `error` of each (of `slot_copies` when none is declared).
    With `declared`, skips of the checks not declared are left out (errors never are).
    """
    out: list[Finding] = []
    prev: tuple[Snapshot, Facts] | None = None
    host_declared = [c for c in declared if c in HOST_CHECKS]
    known_slots: dict[str, int] = {}  # role -> slot its page tables owned at a checkpoint
    for snap in snapshots:
        ctx = Ctx(scenario, snap.name)
        try:
            facts = parse_facts(snap.facts)
        except FactsError as exc:
            for c in host_declared or ["slot_copies"]:
                out.append(ctx.error(c, f"checkpoint facts unusable: {exc}",
                                     facts=dict(snap.facts)))
            continue
        if not facts.services:
            for c in host_declared:
                out.append(ctx.finding(c, Status.SKIP,
                                       f"checkpoint {snap.name} names no service: nothing to "
                                       "judge"))
            continue
        svcs = resolve(snap, facts)
        for role, s in svcs.items():
            if s.slot is not None:
                known_slots[role] = s.slot
        for check in SNAPSHOT_CHECKS:
            if check is check_slot_copies:
                out.extend(check_slot_copies(snap, facts, svcs, ctx, known_slots))
            else:
                out.extend(check(snap, facts, svcs, ctx))
        if prev is not None and facts.pairs and prev[1].pairs == facts.pairs:
            out.extend(check_tlb_propagation(prev[0], snap, facts, ctx))
        prev = (snap, facts)
    if declared:  # "nothing to judge" of a check the scenario does not claim to exercise
        out = [f for f in out if f.status is not Status.SKIP or f.check in declared]
    return out


def judge(snapshots: Sequence[Snapshot], scenario: Scenario) -> list[Finding]:
    return check_snapshots(snapshots, scenario.name, scenario.checks)
