"""A security row's verdict: its expected value (SECURITY.md) against what was observed.

Pure. The observation is the guest's line for the row, except where the host decides
(HOST_RULES): the gadget scan, the planted gadget (the scan must list it where the
guest put it) and slot_after_deputies (the attacker's own entry for the victim's slot
in the host's view). Only a contradiction fails: `blocked` expected and `open` seen,
or `weakness` expected and `blocked` seen; `skip` is a skip, anything that could not
be judged an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from testbed.check.model import Finding, Status
from testbed.designs.rpal.security.gadgets import Scan
from testbed.designs.rpal.security.observe import Observation
from testbed.designs.rpal.security.table import Row

CHECK = "security"


@dataclass(frozen=True)
class Observed:
    value: str  # blocked | open | skip | error
    message: str
    source: str = "guest"  # guest | host


HostRule = Callable[[Observation | None, Mapping[str, Any] | None, Scan | None], Observed]


def _guest(obs: Observation | None) -> Observed:
    if obs is None:
        return Observed("error", "no observation line from the guest for this row")
    if obs.observed == "host":
        return Observed("error", f"the guest left this row to the host: {obs.message}")
    return Observed(obs.observed, obs.message)


def _scan_rule(obs: Observation | None, host: Mapping[str, Any] | None,
               scan: Scan | None) -> Observed:
    if scan is None:
        return Observed("error", "the host took no gadget scan at this row's checkpoint",
                        "host")
    bad = [s for s in scan.services if s.error]
    if not scan.pages:
        return Observed("error", "the scan read no executable page"
                        + (f" ({bad[0].error})" if bad else ""), "host")
    kinds: dict[str, int] = {}
    for s in scan.services:
        for g in s.gadgets:
            kinds[g.kind] = kinds.get(g.kind, 0) + 1
    per = ", ".join(f"{s.role} {len(s.gadgets)} in {s.pages} pages" for s in scan.services)
    what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    if not scan.gadgets:
        return Observed("blocked", f"no WRPKRU/XRSTOR in {scan.pages} executable pages "
                        f"({per})", "host")
    return Observed("open", f"{scan.gadgets} gadgets ({what}) in {scan.pages} executable "
                    f"pages ({per}; {scan.seconds:.2f} s)", "host")


def _planted_rule(obs: Observation | None, host: Mapping[str, Any] | None,
                  scan: Scan | None) -> Observed:
    g = _guest(obs)
    planted = obs.fields.get("planted") if obs is not None else None
    if scan is None or planted is None:
        return Observed("error", "no scan" if scan is None else
                        "the guest did not say where it planted the gadget", "host")
    try:
        va = int(planted, 0)
    except ValueError:
        return Observed("error", f"planted={planted!r} is not an address", "host")
    found = scan.find(va, "wrpkru")
    if not found:
        return Observed("error", f"the host's scan does not list the gadget planted at "
                        f"{planted} ({scan.gadgets} gadgets in {scan.pages} pages)", "host")
    who = found[0][0]
    return Observed(g.value, f"{g.message}; the host's scan lists WRPKRU at {planted} in the "
                    f"{who.role}'s pages (pid {who.pid})", "host")


def _slot_rule(obs: Observation | None, host: Mapping[str, Any] | None,
               scan: Scan | None) -> Observed:
    g = _guest(obs)
    if host is None:
        return Observed("error", f"no host view at this row's checkpoint; guest: {g.message}",
                        "host")
    entry = host.get("attacker", {}).get("victim_slot_entry")
    if host.get("own_entry_in_victim_slot"):
        return Observed("open", f"after release the attacker's page tables hold an entry of "
                        f"their own for the victim's slot {host.get('victim_slot')} (table "
                        f"{entry['table']}, no marker); guest: {g.message}", "host")
    if g.value == "open":
        return g
    return Observed(g.value, f"{g.message}; host: the attacker's entry for slot "
                    f"{host.get('victim_slot')}: {'none' if entry is None else entry}",
                    "host")


def _alias_rule(obs: Observation | None, host: Mapping[str, Any] | None,
                scan: Scan | None) -> Observed:
    """shared_memfd: the guest's read, and the host's walks of both mappings of the page."""
    g = _guest(obs)
    try:
        a = (host or {})["attacker"]["walks"]["alias"]
        v = (host or {})["victim"]["walks"]["victim_alias"]
    except (KeyError, TypeError):
        return Observed(g.value, f"{g.message}; host: no walk of the two mappings", "guest")
    if a.get("phys") and a.get("phys") == v.get("phys"):
        return Observed(g.value, f"{g.message}; host: one physical page {a['phys']}, pkey "
                        f"{v.get('pkey')} in the victim's tables, {a.get('pkey')} in the "
                        f"attacker's", "host")
    return Observed(g.value, f"{g.message}; host: victim's mapping {v.get('phys')}, "
                    f"attacker's {a.get('phys')}", "host")


def _window_rule(obs: Observation | None, host: Mapping[str, Any] | None,
                 scan: Scan | None) -> Observed:
    from testbed.designs.rpal.security.window import judge_window

    pid = (host or {}).get("attacker", {}).get("pid")
    value, message = judge_window((host or {}).get("window"), pid)
    guest = f"; guest: {obs.message}" if obs is not None and obs.message else ""
    return Observed(value, message + guest, "host")


HOST_RULES: dict[str, HostRule] = {
    "enable_window": _window_rule,
    "shared_memfd": _alias_rule,
    "gadget_scan": _scan_rule,
    "gadget_planted": _planted_rule,
    "slot_after_deputies": _slot_rule,
}


def verdict(expected: str, observed: str) -> tuple[Status, str]:
    """(status, how) of a row from its expected and observed values."""
    if observed == "skip":
        return Status.SKIP, "not run here"
    if observed not in ("blocked", "open"):
        return Status.ERROR, "could not be judged"
    if expected == "either":
        return Status.PASS, "as the design allows (either)"
    if expected == "blocked":
        return ((Status.PASS, "blocked, as designed") if observed == "blocked" else
                (Status.FAIL, "NOT blocked: contradicts the design"))
    if expected == "weakness":
        return ((Status.PASS, "known weakness shown") if observed == "open" else
                (Status.FAIL, "blocked although the design says it is not: contradicts "
                 "the design"))
    return Status.ERROR, f"unknown expectation {expected!r}"


def judge_row(row: Row, obs: Observation | None, host: Mapping[str, Any] | None,
              scan: Scan | None, *, scenario: str = "", evidence_file: str = "") -> Finding:
    rule = HOST_RULES.get(row.name)
    seen = rule(obs, host, scan) if rule is not None else _guest(obs)
    status, how = verdict(row.expected, seen.value)
    evidence: dict[str, Any] = {
        "row": row.name, "group": row.group, "expected": row.expected,
        "observed": seen.value, "verdict": how, "reason": row.reason,
        "guest": obs.to_dict() if obs is not None else None,
    }
    if evidence_file:
        evidence["file"] = evidence_file
    return Finding(CHECK, status, f"{row.name}: expected {row.expected}, observed "
                   f"{seen.value} ({how}): {seen.message}", scenario, row.name, row.name,
                   evidence, source="host" if seen.source == "host" else "guest")
