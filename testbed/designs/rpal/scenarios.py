"""The RPAL scenarios: which workloads a guest runs, and with what, to exercise each invariant.

Each scenario runs on a guest of its own; snapshots are taken at the
workloads' checkpoints; findings come from the snapshot checks (checks.py,
source host) and from the workloads' verdict lines (output.py, source guest).
Every declared check must produce a finding, else `testbed run` reports an error.
"""

from __future__ import annotations

from testbed.designs import Scenario

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("phases", "pairing life cycle, snapshot at each phase", ("tb-rpal_phases",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "tlb_state", "claims",
                  "exit"), design="rpal"),
        Scenario("pair", "two services share memory through pointers", ("tb-rpal_pair",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "tlb_state", "claims",
                  "faults", "isolation", "exit"), design="rpal"),
        Scenario("same_pkey", "services with the same pkey must not pair",
                 ("tb-rpal_pair --same-pkey",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "claims"), design="rpal"),
        Scenario("stale_tlb", "stale-TLB probe while the peer unmaps and re-protects",
                 ("tb-rpal_stale_probe",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "tlb_state", "claims",
                  "tlb_shootdown", "faults", "exit"), design="rpal", needs_cpus=2,
                 needs_cpus_why="its probe reads on one CPU while the peer unmaps and "
                 "re-protects on the other: a stale TLB entry needs a second CPU"),
        Scenario("stray", "stray accesses without pairing, pkey faults, the WRPKRU gadget",
                 ("tb-rpal_stray",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "tlb_state", "claims",
                  "faults", "isolation", "exit"), design="rpal"),
        Scenario("limits", "15 peers at once, read() counts, id exhaustion and reuse delay",
                 ("tb-rpal_limits",),
                 ("slot_confinement", "slot_copies", "keys", "pkru", "claims", "exit", "ids",
                  "peer_limit"), design="rpal"),
        Scenario("explore", "random RPAL operation sequences, judged after every step "
                 "(testbed explore, fixed seed, 30 s in each paging mode)", (),
                 ("result", "slot_confinement", "slot_copies", "keys", "pkru", "tlb_state",
                  "claims", "faults", "exit", "ids"), design="rpal", needs_cpus=2,
                 needs_cpus_why="its spinner reads and writes on the other CPU while a "
                 "step flushes: the stale-TLB probes"),
        Scenario("protection_keys", "the kernel's own protection_keys selftest", (),
                 ("selftest:protection_keys",), selftest="protection_keys", design="rpal"),
        # testbed/designs/rpal/SECURITY.md: one row per attack, judged against the doc
        Scenario("security", "security review: attacks between a victim and an attacker "
                 "service, each row judged against SECURITY.md", ("tb-rpal_security",),
                 ("security",), design="rpal", suite="security"),
    )
}
