"""tb-rpal_agent in a guest on the reference kernel: pair two services, read the peer,
cut it off, reclaim a page to swap."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from testbed.designs.rpal.agent import AGENT_PORT, Agent, start_agent

pytestmark = pytest.mark.vm


def pkru_for(pkey: int) -> int:
    return 0xFFFFFFFF & ~(3 << (2 * pkey))


@pytest.fixture
def agent(guest_spec: Any, testbed_runs: Any) -> Iterator[Agent]:
    from testbed import paths
    from testbed.boot.machine import Machine, MachineConfig

    cfg = MachineConfig(kernel=guest_spec.kernel, initrd=guest_spec.initrd,
                        accel=guest_spec.accel, serial_ports=(AGENT_PORT,))
    with Machine(cfg, paths.new_run_dir("pytest-agent", testbed_runs)) as m:
        ag = start_agent(m)
        try:
            yield ag
        finally:
            ag.close()


def test_agent_pairs_reads_the_peer_sees_the_cutoff_and_swaps(agent: Agent):
    ag = agent
    assert ag.hello is not None and ag.hello.need_int("swap") == 1, "no swap in the guest"
    sa, sb = ag.call("spawn", svc="a"), ag.call("spawn", svc="b")
    assert sa.ok and sb.ok, (sa.text(), sb.text())
    assert sa.need_int("key") != sb.need_int("key")
    ea, eb = ag.call("enable", svc="a"), ag.call("enable", svc="b")
    pa, pb = ea.need_int("pkey"), eb.need_int("pkey")
    assert pa != pb and ea.need_int("pkru") == pkru_for(pa)

    region = ag.call("mmap", svc="b", len=8 * 4096, populate=1).need_int("addr")
    assert region >> 39 == sb.need_int("id") + 1  # in b's slot
    assert ag.call("touch", svc="b", addr=region, len=8 * 4096, value=0x5A5A).ok

    assert ag.call("request", svc="a", key=sb.need_int("key")).need_int("ret") == 0
    assert ag.call("request", svc="b", key=sa.need_int("key")).need_int("ret") == 1
    union = pkru_for(pa) & pkru_for(pb)

    # a's own PKRU keeps b's key out; with the union it reads b's page
    denied = ag.call("read", svc="a", addr=region)
    assert denied.status == "fault" and denied.need_int("code") == 4  # SEGV_PKUERR
    assert denied.need_int("pkey") == pb
    assert ag.call("read", svc="a", addr=region, pkru=hex(union)).need_int("value") == 0x5A5A

    # the spinner on the other CPU reads b's page; b unmaps it: the spinner must fault
    # and must not read it after the munmap returned
    spin = ag.call("spin", svc="a", addr=region, pkru=hex(union), cpu=1)
    assert spin.ok and spin.need_int("first") == 0x5A5A, spin.text()
    assert ag.call("munmap", svc="b", addr=region, len=4096).ok
    assert ag.call("arm", svc="a").ok
    time.sleep(0.2)
    stop = ag.call("spinstop", svc="a")
    assert stop.need_int("faulted") == 1 and stop.need_int("hung") == 0, stop.text()
    assert stop.need_int("after") == 0, f"stale reads after munmap: {stop.text()}"
    gone = ag.call("read", svc="a", addr=region, pkru=hex(union))
    assert gone.status == "fault" and gone.need_int("sig") == 11, gone.text()
    assert ag.call("state", svc="a").ok  # a survived its faults

    # reclaim: b pages a page out to swap, its PTE becomes a swap entry, a's read
    # faults it back in through b's mm with the same value
    page = region + 4 * 4096
    before = ag.call("vmstat").need_int("swap_used_kib")
    assert ag.call("madvise", svc="b", addr=page, len=4096, advice="pageout").ok
    pm = ag.call("pagemap", svc="b", addr=page)
    assert pm.need_int("swapped") == 1 and pm.need_int("present") == 0, pm.text()
    assert ag.call("vmstat").need_int("swap_used_kib") > before
    assert ag.call("read", svc="a", addr=page, pkru=hex(union)).need_int("value") == 0x5A5A
    assert ag.call("pagemap", svc="b", addr=page).need_int("present") == 1

    # release: both copies go; the dead-key queue stays empty (nobody died)
    assert ag.call("release", svc="a", key=sb.need_int("key")).ok
    cut = ag.call("read", svc="a", addr=region + 4096, pkru=hex(union))
    assert cut.status == "fault", cut.text()
    assert ag.call("deadkeys", svc="a").int_list("keys") == []
    assert ag.call("exit", svc="b").ok
    assert ag.call("deadkeys", svc="a").int_list("keys") == [sb.need_int("key")]


def test_agent_witnesses_of_dontneed_and_fork_cow_hold_on_the_correct_kernel(agent: Agent):
    """DONTNEED: the peer's spinner reads the fresh zero page, never the old value after
    the cut. Fork: the owner's pages are write-protected for COW; a peer that keeps
    writing must not write into the page the child now shares (its copy stays frozen)."""
    ag = agent
    sa, sb = ag.call("spawn", svc="a"), ag.call("spawn", svc="b")
    pa = ag.call("enable", svc="a").need_int("pkey")
    pb = ag.call("enable", svc="b").need_int("pkey")
    assert ag.call("request", svc="a", key=sb.need_int("key")).ok
    assert ag.call("request", svc="b", key=sa.need_int("key")).need_int("ret") == 1
    union = hex(pkru_for(pa) & pkru_for(pb))
    r = ag.call("mmap", svc="b", len=2 * 4096, populate=1).need_int("addr")
    assert ag.call("touch", svc="b", addr=r, len=2 * 4096, value=0x77).ok

    assert ag.call("spin", svc="a", addr=r, pkru=union).need_int("first") == 0x77
    assert ag.call("madvise", svc="b", addr=r, len=4096, advice="dontneed").ok
    assert ag.call("arm", svc="a").need_int("old") == 0x77
    time.sleep(0.2)
    stop = ag.call("spinstop", svc="a")
    assert stop.need_int("faulted") == 0 and stop.need_int("after") > 0, stop.text()
    assert stop.need_int("stale") == 0 and stop.need_int("last") == 0, stop.text()

    page = r + 4096
    assert ag.call("spin", svc="a", addr=page, pkru=union, mode="write", value=1 << 32).ok
    time.sleep(0.2)
    child = ag.call("fork", svc="b").need_int("child")
    assert ag.call("arm", svc="a").ok
    seen = [ag.call("childread", svc="b", child=child, addr=page).need_int("value")
            for _ in range(3)]
    stop = ag.call("spinstop", svc="a")
    assert stop.need_int("after") > 0 and stop.need_int("faulted") == 0, stop.text()
    assert len(set(seen)) == 1, f"the peer wrote into the fork child's page: {seen}"
    # the peer's writes went to b's own (new) copy
    assert ag.call("read", svc="b", addr=page).need_int("value") == stop.need_int("last")
    assert ag.call("childexit", svc="b", child=child).need_int("status") == 0
