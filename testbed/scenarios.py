"""The RPAL scenarios: which workloads a guest runs, and with what, to exercise each invariant.

Each scenario runs on a guest of its own; snapshots are taken at the
workloads' checkpoints; findings come from the snapshot checks
(testbed.check.rpal) and from the workloads' verdict lines
(testbed.check.output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from testbed.check.rpal import CHECKS
from testbed.errors import TestbedError

# What only a kernel with RPAL (CONFIG_RPAL) has: the code behind /proc/rpal, and its
# service type (in the kernel's BTF, which the testbed needs anyway).
RPAL_SYMBOLS = ("rpal_init", "rpal_proc_ops")
RPAL_TYPE = "rpal_service"


def requires(kernel: Path) -> None:
    """Refuse, before any guest boots, a kernel the scenarios cannot run on: one
    without RPAL (no /proc/rpal). Told from its System.map or vmlinux when it has
    real ones, else from its BTF; a kernel with neither is let through (later
    stages say why they cannot read it)."""
    from testbed.snapshot.btf import BtfError
    from testbed.snapshot.kernel_image import KernelImage, KernelImageError

    try:
        image = KernelImage.from_paths(kernel)
        symbols = image.symbols
        if symbols is not None and len(symbols) > 0:
            has = any(name in symbols for name in RPAL_SYMBOLS)
            where = f"none of {', '.join(RPAL_SYMBOLS)} in its symbols"
        else:
            has = bool(image.btf.ids(RPAL_TYPE))
            where = f"no struct {RPAL_TYPE} in its BTF"
    except (KernelImageError, BtfError, OSError):
        return
    if not has:
        raise TestbedError(f"kernel {kernel} has no RPAL ({where}, so no /proc/rpal; "
                           "CONFIG_RPAL?): pass a kernel built with the RPAL series "
                           "(testbed kernel build)")


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
                 ("slot_confinement", "slot_copies", "keys", "pkru", "faults", "isolation",
                  "exit")),
        Scenario("same_pkey", "services with the same pkey must not pair",
                 ("tb-rpal_pair --same-pkey",), ("keys",)),
        Scenario("stale_tlb", "stale-TLB probe while the peer unmaps and re-protects",
                 ("tb-rpal_stale_probe",), ("tlb_shootdown",)),
        Scenario("stray", "stray accesses without pairing, pkey faults, the WRPKRU gadget",
                 ("tb-rpal_stray",), ("faults", "isolation")),
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
