"""The RPAL scenarios: which workloads a guest runs, and with what, to exercise each invariant.

Each scenario runs on a guest of its own; snapshots are taken at the
workloads' checkpoints; findings come from the snapshot checks
(testbed.check.rpal) and from the workloads' verdict lines
(testbed.check.output).
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.check.rpal import CHECKS


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    workloads: tuple[str, ...]  # guest shell commands, run in order
    checks: tuple[str, ...]  # the checks it exercises (the others have nothing to say there)
    smp: int = 2
    selftest: str | None = None  # a kernel selftest suite to run instead (testbed selftest)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("phases", "pairing life cycle, snapshot at each phase", ("tb-rpal_phases",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "tlb_state", "exit")),
        Scenario("pair", "two services share memory through pointers", ("tb-rpal_pair",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "tlb_state", "faults",
                  "isolation", "exit")),
        Scenario("same_pkey", "services with the same pkey must not pair",
                 ("tb-rpal_pair --same-pkey",),
                 ("slot_confinement", "slot_copies", "keys", "pkru")),
        Scenario("stale_tlb", "stale-TLB probe while the peer unmaps and re-protects",
                 ("tb-rpal_stale_probe",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "tlb_state",
                  "tlb_shootdown", "faults", "exit")),
        Scenario("stray", "stray accesses without pairing, pkey faults, the WRPKRU gadget",
                 ("tb-rpal_stray",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "tlb_state", "faults",
                  "isolation", "exit")),
        Scenario("limits", "15 peers at once, read() counts, id exhaustion and reuse delay",
                 ("tb-rpal_limits",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "exit", "ids",
                  "peer_limit")),
        Scenario("protection_keys", "the kernel's own protection_keys selftest", (),
                 ("selftest:protection_keys",), selftest="protection_keys"),
    )
}

# The injected bugs of the reference kernel (rpal.bug=NAME): each is named by some check.
BUGS: tuple[str, ...] = tuple(sorted({b for c in CHECKS.values() for b in c.bugs}))



def select(names: list[str] | None) -> list[Scenario]:
    from testbed.errors import TestbedError

    if not names:
        return list(SCENARIOS.values())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise TestbedError(
            f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}"
        )
    return [SCENARIOS[n] for n in names]
