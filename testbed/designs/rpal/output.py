"""The RPAL workloads' verdict-line names (guest/lib/rpal.c, rpal_check()) -> checks."""

from __future__ import annotations

OUTPUT_CHECKS = {
    "slot_layout": "slot_confinement",
    "request": "slot_copies",
    "release_call": "slot_copies",
    "release": "slot_copies",
    "repair": "slot_copies",
    "pkru": "pkru",
    "keys_locked": "keys",
    "mmap_tagged": "keys",
    "brk_tagged": "keys",
    "same_pkey": "keys",
    "peer_read": "faults",
    "peer_write": "faults",
    "fault_redirect": "faults",
    "unpaired": "faults",
    "pkey_deny": "isolation",
    "gadget": "isolation",
    "remap": "tlb_shootdown",
    "protect": "tlb_shootdown",
    "unmap": "tlb_shootdown",
    "dead_key": "exit",
    "exit_copy": "exit",
    "read_count": "exit",
    "ids": "ids",
    "id_delay": "ids",
    "peer_limit": "peer_limit",
}
