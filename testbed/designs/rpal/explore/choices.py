"""The choices the RPAL spec leaves open, as the reference kernel makes them: ONE table.

../shared/RPAL-SPEC.md says what RPAL promises; it is silent on errno values,
the order of the checks inside one call, the id-reuse delay, what the other
threads' PKRU is after ENABLE, and similar details. The reference kernel
(kernel-patches/rpal-ref/README.md) fixes them for our own kernel. The model
reads them only from here, so a user of the real series changes this table,
not the model. Where the real series may differ and nobody knows how, put
`None` (the oracle then skips that detail instead of guessing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Choices:
    # --- ids and keys ----------------------------------------------------------------------
    nr_ids: int = 254  # spec: ids 0..253, first free bit
    max_peers: int = 15  # spec: at most 15 requested peers
    keys_consecutive: bool = True  # ref: each registration takes the next key (1, 2, 3...)
    # ref: /sys/module/rpal/parameters/id_free_delay_ms (spec: "about 30 s"); the explorer
    # sets it to this at start; None = the kernel has no such knob (ids then never reused).
    id_free_delay_ms: int | None = 600
    # a dead id may be reused from (exit sent + delay - tolerance) on; never before
    id_delay_tolerance_ms: int = 150
    # --- errno of each refusal (ref README, ABI table) ---------------------------------------
    errno: dict[str, str] = field(default_factory=lambda: {
        # REQUEST_SERVICE
        "request_not_enabled": "EPERM",
        "request_own_key": "EINVAL",
        "request_no_service": "ESRCH",
        "request_peer_not_enabled": "EAGAIN",
        "request_same_pkey": "EKEYREJECTED",
        "request_already": "EEXIST",
        "request_full": "ENOSPC",
        # RELEASE_SERVICE
        "release_not_requested": "ENOENT",
        # ENABLE_SERVICE
        "enable_again": "EALREADY",
        "enable_bad_pkey": "EINVAL",
        # keys locked in an enabled service
        "pkey_free_locked": "EPERM",
        "pkey_mprotect_locked": "EPERM",
        "pkey_alloc_locked": "ENOSPC",  # all 16 keys count as allocated
        # read() of /proc/rpal
        "read_small_count": "EINVAL",
        "read_empty_nonblock": "EAGAIN",
    })
    # The order REQUEST checks its refusals in (ref: rpal_request()). With None, any of the
    # refusals that apply is accepted.
    request_order: tuple[str, ...] | None = (
        "request_not_enabled", "request_own_key", "request_no_service",
        "request_peer_not_enabled", "request_same_pkey", "request_already", "request_full",
    )
    # --- PKRU ----------------------------------------------------------------------------------
    init_pkru: int = 0x55555554  # Linux's default for a process that is not an enabled service
    # ref: only the enabling thread gets the service PKRU at once; other existing threads keep
    # theirs ("keep"); None = unknown (not judged)
    other_threads_at_enable: str | None = "keep"
    # --- dead-key queue ------------------------------------------------------------------------
    dead_key_queue: int = 64  # ref: kfifo of 64 keys; more are dropped
    # --- faults --------------------------------------------------------------------------------
    # si_code of an access to a slot that is not mapped for the reader (ref: the placeholder
    # PROT_NONE mapping -> SEGV_ACCERR); None = any SIGSEGV
    unmapped_slot_code: int | None = None


REFERENCE_CHOICES = Choices()


def with_delay(ms: int | None) -> Choices:
    return replace(REFERENCE_CHOICES, id_free_delay_ms=ms)
