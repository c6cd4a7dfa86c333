"""RPAL invariants (../shared/RPAL-SPEC.md) as pure functions from snapshots to findings.

The guest workloads pass what the kernel told them through the ABI as
checkpoint facts (`A.pid= A.id= A.key= A.pkey= B.pid= ... pairs=A-B|none`);
these checks compare the guest's page tables, keys, PKRU and TLB state, as
the host read them, with the design and with those facts.

Evidence keys used for the report's picture: `pid`, `slot`, `expected_table`,
`actual_table`, `raw`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from testbed.check.model import CheckInfo, Finding

SLOT_SHIFT = 39
FULL_PKRU = 0xFFFFFFFF

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
            ("keep_copy_on_release", "keep_copy_on_exit", "wrong_slot_copy"),
        ),
        CheckInfo(
            "keys", "Protection keys",
            "every leaf in a service's slot carries its pkey; paired services have different "
            "pkeys; keys are locked",
            ("same_pkey", "untagged_mmap", "pkey_free_allowed"),
        ),
        CheckInfo(
            "pkru", "PKRU",
            "a service thread outside a call denies every key but its own; never fully open",
            ("pkru_open",),
        ),
        CheckInfo(
            "tlb_state", "TLB generations",
            "a flush of a service's mm bumps the TLB generation of every mapped peer, and every "
            "CPU that has an mm loaded is at or past its generation",
            ("skip_peer_flush",),
        ),
        CheckInfo(
            "tlb_shootdown", "TLB shootdown (functional)",
            "a peer never reads data its owner already unmapped or re-protected",
            ("skip_peer_flush",),
        ),
        CheckInfo(
            "faults", "Faults",
            "an access into a mapped peer's slot is served against the peer's mm; outside any "
            "mapped peer it is a SIGSEGV",
            ("no_fault_redirect", "wrong_slot_copy"),
        ),
        CheckInfo(
            "isolation", "MPK isolation",
            "a stray access to a peer faults with a pkey error; the WRPKRU weakness is shown",
            (),
        ),
        CheckInfo(
            "exit", "Exit",
            "a dead peer leaves no copies, and its key is reported by read()/poll(); read() "
            "writes no more than count bytes",
            ("keep_copy_on_exit", "read_ignores_count"),
        ),
        CheckInfo(
            "ids", "Service ids",
            "every live service has an id of its own (0..253, slot id + 1); with none free, "
            "exec fails with ENOSPC and frees nothing; a dead service's id is reused only "
            "after the delay",
            ("exhaustion_frees_id", "id_reused_at_once"),
        ),
        CheckInfo(
            "peer_limit", "Peer limit",
            "a service can have 15 requested peers, all mapped at once, and not a 16th",
            ("peer_limit_off_by_one",),
        ),
    )
}


def hx(v: int) -> str:
    return f"0x{v:x}"


def expected_pkru(pkey: int) -> int:
    return FULL_PKRU & ~(3 << (2 * pkey))


@dataclass(frozen=True)
class Service:
    role: str
    pid: int
    id: int
    key: int
    pkey: int
    alive: bool = True

    @property
    def slot(self) -> int:
        return self.id + 1

    def label(self) -> str:
        return f"{self.role} (pid {self.pid}, slot {self.slot}, pkey {self.pkey})"


@dataclass(frozen=True)
class Facts:
    services: dict[str, Service]
    pairs: frozenset[frozenset[str]]

    def peers(self, role: str) -> list[Service]:
        out = []
        for pair in self.pairs:
            if role in pair:
                out += [self.services[r] for r in pair if r != role]
        return out


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
            services[role] = Service(role, int(a["pid"]), int(a["id"]), int(a["key"]),
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


# ----------------------------------------------------------------------------- snapshot access


def _mm_of(snap: dict[str, Any], pid: int) -> dict[str, Any] | None:
    for mm in snap["mms"]:
        if pid in mm["tasks"]:
            return mm
    return None


def _threads(snap: dict[str, Any], pid: int) -> list[dict[str, Any]]:
    return [t for t in snap["tasks"] if t["tgid"] == pid]


def _slot_entry(mm: dict[str, Any], slot: int, key: str = "slots") -> dict[str, Any] | None:
    for e in mm.get(key, []):
        if e.get("slot") == slot:
            return e
    return None


def _finding(check: str, ok: bool, msg: str, ctx: dict[str, str], subject: str = "",
             **evidence: Any) -> Finding:
    return Finding(check, ok, msg, ctx.get("scenario", ""), ctx.get("checkpoint", ""), subject,
                   evidence)


def _error(check: str, msg: str, ctx: dict[str, str]) -> Finding:
    return Finding(check, False, msg, ctx.get("scenario", ""), ctx.get("checkpoint", ""),
                   error=True)


# ----------------------------------------------------------------------------- checks


def check_slot_confinement(snap: dict[str, Any], facts: Facts, ctx: dict[str, str]
                           ) -> Iterator[Finding]:
    for s in facts.services.values():
        if not s.alive:
            continue
        threads = _threads(snap, s.pid)
        if not threads:
            yield _error("slot_confinement", f"service {s.label()} not in the snapshot", ctx)
            continue
        allowed = {s.slot} | {p.slot for p in facts.peers(s.role)}
        outside = [m for m in threads[0].get("mappings", [])
                   if not {int(m["start"], 16) >> SLOT_SHIFT,
                           (int(m["end"], 16) - 1) >> SLOT_SHIFT} <= allowed]
        yield _finding(
            "slot_confinement", not outside,
            f"{len(outside)} mapping(s) of {s.role} outside slots {sorted(allowed)}"
            if outside else f"all mappings of {s.role} in slots {sorted(allowed)}",
            ctx, s.label(), pid=s.pid, slot=s.slot, allowed_slots=sorted(allowed),
            outside=outside[:5],
        )


def check_slot_copies(snap: dict[str, Any], facts: Facts, ctx: dict[str, str]
                      ) -> Iterator[Finding]:
    pti = bool(snap["kernel"].get("pti"))
    mms = {s.role: _mm_of(snap, s.pid) for s in facts.services.values() if s.alive}
    for role, mm in mms.items():
        s = facts.services[role]
        if mm is None:
            yield _error("slot_copies", f"no mm for service {s.label()} in the snapshot", ctx)
            continue
        peers = {p.slot: p for p in facts.peers(role) if p.alive}
        own = _slot_entry(mm, s.slot)
        if own is None or not own["present"]:
            yield _finding("slot_copies", False, f"{role} has no entry for its own slot {s.slot}",
                           ctx, s.label(), pid=s.pid, slot=s.slot)
            continue
        if own["marker"]:
            yield _finding("slot_copies", False,
                           f"{role}'s entry for its own slot {s.slot} carries the copy marker",
                           ctx, s.label(), pid=s.pid, slot=s.slot, raw=own["raw"])
        for peer_slot, p in sorted(peers.items()):
            pmm = mms.get(p.role)
            powner = _slot_entry(pmm, peer_slot) if pmm else None
            copy = _slot_entry(mm, peer_slot)
            expected = powner["table"] if powner else None
            ev = dict(pid=s.pid, slot=peer_slot, expected_table=expected,
                      actual_table=copy["table"] if copy else None,
                      raw=copy["raw"] if copy else None, peer_pid=p.pid)
            if copy is None or not copy["present"]:
                yield _finding("slot_copies", False,
                               f"{role} paired with {p.role} but has no entry for slot {peer_slot}",
                               ctx, s.label(), **ev)
                continue
            ok = copy["table"] == expected and copy["marker"]
            why = []
            if copy["table"] != expected:
                why.append(f"points at table {copy['table']}, {p.role}'s own entry at {expected}")
            if not copy["marker"]:
                why.append("lacks the marker bit 9")
            yield _finding(
                "slot_copies", ok,
                f"{role}'s copy of {p.role}'s slot {peer_slot}: "
                + ("; ".join(why) if why else f"same table {expected}, marked"),
                ctx, s.label(), **ev,
            )
            if pti and mm.get("user_slots") is not None:
                ucopy = _slot_entry(mm, peer_slot, "user_slots")
                uok = bool(ucopy and ucopy["table"] == expected and not ucopy["nx"])
                yield _finding(
                    "slot_copies", uok,
                    f"{role}'s user-root (PTI) copy of slot {peer_slot}: "
                    + ("same table, NX clear" if uok else f"{ucopy}"),
                    ctx, s.label(), pid=s.pid, slot=peer_slot, expected_table=expected,
                    actual_table=ucopy["table"] if ucopy else None, root="user",
                )
        # nothing else: no entry in another service's slot unless paired, no stray markers
        others = {o.slot: o for o in facts.services.values() if o.role != role}
        foreign = 0
        for e in mm.get("slots", []):
            slot = e.get("slot")
            if slot is None or slot == s.slot or slot in peers:
                continue
            if e["marker"] or slot in others:
                foreign += 1
                whose = others[slot].role if slot in others else "no known service"
                yield _finding(
                    "slot_copies", False,
                    f"{role} has an entry for slot {slot} ({whose}) without being paired with it"
                    + (" (marked as a copy)" if e["marker"] else ""),
                    ctx, s.label(), pid=s.pid, slot=slot, actual_table=e["table"], raw=e["raw"],
                    expected_table=None,
                )
        if not foreign and not peers:
            yield _finding("slot_copies", True,
                           f"{role} is not paired and holds no entry of another slot",
                           ctx, s.label(), pid=s.pid, slot=s.slot,
                           slots=[e.get("slot") for e in mm.get("slots", [])])
    # a dead service's slot must not be mapped by anyone
    for d in (s for s in facts.services.values() if not s.alive):
        for role, mm in mms.items():
            if mm is None:
                continue
            e = _slot_entry(mm, d.slot)
            yield _finding(
                "slot_copies", e is None,
                f"{role} still has an entry for the dead {d.role}'s slot {d.slot}" if e else
                f"{role} holds no entry for the dead {d.role}'s slot {d.slot}",
                ctx, facts.services[role].label(), pid=facts.services[role].pid, slot=d.slot,
                actual_table=e["table"] if e else None, expected_table=None,
                raw=e["raw"] if e else None,
            )


def check_keys(snap: dict[str, Any], facts: Facts, ctx: dict[str, str]) -> Iterator[Finding]:
    for s in facts.services.values():
        if not s.alive:
            continue
        threads = _threads(snap, s.pid)
        if not threads:
            continue
        own = [m for m in threads[0].get("mappings", [])
               if m["kind"] == "leaf" and int(m["start"], 16) >> SLOT_SHIFT == s.slot]
        wrong = [m for m in own if m["pkey"] != s.pkey]
        yield _finding(
            "keys", bool(own) and not wrong,
            f"{len(wrong)} of {len(own)} mapping(s) in {s.role}'s slot {s.slot} not tagged with "
            f"pkey {s.pkey}" if wrong or not own else
            f"all {len(own)} mapping(s) in {s.role}'s slot carry pkey {s.pkey}",
            ctx, s.label(), pid=s.pid, slot=s.slot, expected_pkey=s.pkey, untagged=wrong[:5],
        )
    for pair in facts.pairs:
        a, b = (facts.services[r] for r in sorted(pair))
        yield _finding(
            "keys", a.pkey != b.pkey,
            f"paired {a.role} and {b.role} have "
            + ("different pkeys" if a.pkey != b.pkey else f"the same pkey {a.pkey}"),
            ctx, f"{a.role}-{b.role}", pid=a.pid, peer_pid=b.pid, pkeys=[a.pkey, b.pkey],
        )


def check_pkru(snap: dict[str, Any], facts: Facts, ctx: dict[str, str]) -> Iterator[Finding]:
    for s in facts.services.values():
        if not s.alive:
            continue
        want = expected_pkru(s.pkey)
        for t in _threads(snap, s.pid):
            got = int(t["pkru"], 16)
            yield _finding(
                "pkru", got == want,
                f"thread {t['pid']} of {s.role}: PKRU {hx(got)}"
                + ("" if got == want else f", expected {hx(want)}")
                + (" (fully open)" if got == 0 else ""),
                ctx, s.label(), pid=s.pid, tid=t["pid"], pkru=hx(got), expected=hx(want),
                source=t["pkru_source"],
            )


def check_tlb_state(snap: dict[str, Any], facts: Facts, ctx: dict[str, str]
                    ) -> Iterator[Finding]:
    """Every CPU with a service's mm loaded (not lazily) is at or past that mm's generation."""
    mm_by_addr = {mm["address"]: mm for mm in snap["mms"]}
    pids = {s.pid: s for s in facts.services.values()}
    for c in snap["cpus"]:
        tlb = c.get("tlb")
        if not tlb or tlb["loaded_mm"] not in mm_by_addr or tlb.get("is_lazy"):
            continue
        mm = mm_by_addr[tlb["loaded_mm"]]
        owners = [pids[p] for p in mm["tasks"] if p in pids]
        if not owners:
            continue
        asid = tlb["loaded_mm_asid"]
        gen = tlb["ctxs"][asid]["tlb_gen"] if asid < len(tlb["ctxs"]) else None
        ok = gen is not None and gen >= mm["tlb_gen"]
        yield _finding(
            "tlb_state", ok,
            f"CPU {c['index']} has {owners[0].role}'s mm loaded at generation {gen}, "
            f"mm at {mm['tlb_gen']}",
            ctx, owners[0].label(), cpu=c["index"], loaded_mm=mm["address"], cpu_tlb_gen=gen,
            mm_tlb_gen=mm["tlb_gen"], pid=owners[0].pid,
        )


def check_tlb_propagation(before: dict[str, Any], after: dict[str, Any], facts: Facts,
                          ctx: dict[str, str]) -> Iterator[Finding]:
    """Between two snapshots of paired services: a peer's flushes move our generation too."""
    for pair in facts.pairs:
        for owner_role in sorted(pair):
            owner = facts.services[owner_role]
            peer = next(facts.services[r] for r in pair if r != owner_role)
            o0, o1 = _mm_of(before, owner.pid), _mm_of(after, owner.pid)
            p0, p1 = _mm_of(before, peer.pid), _mm_of(after, peer.pid)
            if not (o0 and o1 and p0 and p1):
                yield _error("tlb_state", f"{owner.role} or {peer.role} missing from a snapshot",
                             ctx)
                continue
            d_owner = o1["tlb_gen"] - o0["tlb_gen"]
            d_peer = p1["tlb_gen"] - p0["tlb_gen"]
            if d_owner <= 0:
                continue  # the owner did not flush: nothing to propagate
            ok = d_peer > 0
            yield _finding(
                "tlb_state", ok,
                f"{owner.role}'s mm flushed (tlb_gen {o0['tlb_gen']} -> {o1['tlb_gen']}); mapped "
                f"peer {peer.role}'s tlb_gen {p0['tlb_gen']} -> {p1['tlb_gen']}"
                + ("" if ok else ": the flush did not reach the peer"),
                ctx, owner.label(), pid=owner.pid, peer_pid=peer.pid,
                owner_tlb_gen=[o0["tlb_gen"], o1["tlb_gen"]],
                peer_tlb_gen=[p0["tlb_gen"], p1["tlb_gen"]], peer_cpumask=p1["cpumask"],
            )


SNAPSHOT_CHECKS = (check_slot_confinement, check_slot_copies, check_keys, check_pkru,
                   check_tlb_state)


def check_snapshots(snapshots: Sequence[dict[str, Any]], scenario: str) -> list[Finding]:
    """Run every snapshot check on each checkpoint in order, and the two-snapshot checks."""
    out: list[Finding] = []
    prev: tuple[dict[str, Any], Facts] | None = None
    for snap in snapshots:
        ctx = {"scenario": scenario, "checkpoint": snap.get("name", "")}
        trigger = snap.get("trigger") or {}
        try:
            facts = parse_facts(trigger.get("facts") or {})
        except FactsError as exc:
            out.append(_error("slot_copies", f"checkpoint facts unusable: {exc}", ctx))
            continue
        if not facts.services:
            continue
        for check in SNAPSHOT_CHECKS:
            out.extend(check(snap, facts, ctx))
        if prev is not None and facts.pairs and prev[1].pairs == facts.pairs:
            out.extend(check_tlb_propagation(prev[0], snap, facts, ctx))
        prev = (snap, facts)
    return out
