/*
 * tb-rpal_phases: two RPAL services go through the life of a pairing and stop
 * at a checkpoint in each phase, so the host can compare the guest's page
 * tables, keys, PKRU and TLB state with the design.  (TESTBED_RPAL_SERVICE:
 * the build stamps e_ident[12..15] = "RPAL" into this binary.)
 *
 * A (pinned to CPU 0) takes every checkpoint while B (CPU 1, if there is
 * one) waits on the pipe, and passes what the kernel told both through the
 * ABI as facts:  A.pid= A.id= A.key= A.pkey= B.pid= ... pairs=A-B|none
 *   enabled      both enabled, not paired
 *   paired       both requested each other: copies expected both ways
 *   peer_flushed B re-protected and then unmapped a page of its slot that A
 *                had just read through its copy (B flushed its TLB: A's TLB
 *                generation must have moved too)
 *   released     A released B: no copies either way
 *   peer_exited  paired again, then B exited: A holds no copy of B's slot
 * Usage: tb-rpal_phases [--pkey-a N --pkey-b N]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "rpal.h"
#include "tb_checkpoint.h"

#define TIMEOUT_MS 3000

struct info {
	uint64_t key, id, pid, page;
	int32_t pkey, pad;
};

static char facts[512];

static void set_facts(const struct info *a, const struct info *b, const char *pairs, int b_alive)
{
	snprintf(facts, sizeof(facts),
		 "A.pid=%llu A.id=%llu A.key=%llu A.pkey=%d "
		 "B.pid=%llu B.id=%llu B.key=%llu B.pkey=%d B.alive=%d pairs=%s",
		 (unsigned long long)a->pid, (unsigned long long)a->id,
		 (unsigned long long)a->key, a->pkey, (unsigned long long)b->pid,
		 (unsigned long long)b->id, (unsigned long long)b->key, b->pkey, b_alive, pairs);
}

static void checkpoint(struct rpal_link *l, const char *name)
{
	int r = tb_checkpoint_facts(name, facts);

	rpal_check(l, r == 0, "checkpoint", "%s: %s", name, r ? strerror(errno) : "taken");
}

static int child(const char *role, int rfd, int wfd, int pkey_req)
{
	struct rpal_link l;
	struct info me = { 0 }, peer = { 0 };
	int is_a = role[0] == 'A';
	struct rpal_fault f;
	uint64_t v = 0;
	volatile uint64_t *page, *ppage;
	int fd, pkey, r;

	rpal_link_init(&l, role, rfd, wfd);
	if (rpal_nr_cpus() > 1)
		rpal_pin_cpu(is_a ? 0 : 1);
	rpal_step(&l, "enable");
	fd = rpal_open();
	pkey = fd < 0 ? fd : rpal_enable(fd, pkey_req);
	if (pkey < 0) {
		printf("%s: FAIL enable: %s\n", role, rpal_errname(pkey));
		return 1;
	}
	rpal_get_key(fd, &me.key);
	rpal_get_id(fd, &me.id);
	me.pid = getpid();
	me.pkey = pkey;
	page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	page[0] = me.key;
	me.page = (uintptr_t)page;
	if (rpal_link_send(&l, &me, sizeof(me)) || rpal_link_recv(&l, &peer, sizeof(peer))) {
		printf("%s: FAIL link: peer gone\n", role);
		return 1;
	}
	ppage = (volatile uint64_t *)(uintptr_t)peer.page;
	printf("%s: service pid %llu key %llu id %llu pkey %d\n", role,
	       (unsigned long long)me.pid, (unsigned long long)me.key,
	       (unsigned long long)me.id, pkey);
	if (is_a)
		set_facts(&me, &peer, "none", 1);

	rpal_link_sync(&l, '1');
	if (is_a)
		checkpoint(&l, "enabled");
	rpal_link_sync(&l, '2');

	rpal_step(&l, "request");
	r = rpal_request(fd, peer.key);
	rpal_check(&l, r >= 0, "request", "request(%llu) -> %s",
		   (unsigned long long)peer.key, rpal_errname(r));
	rpal_link_sync(&l, '3');
	if (is_a) {
		set_facts(&me, &peer, "A-B", 1);
		rpal_step(&l, "peer_read");
		wrpkru(rpal_pkru_for(me.pkey) & rpal_pkru_for(peer.pkey));
		r = rpal_try_read64(ppage, &v, TIMEOUT_MS, &f);
		wrpkru(rpal_pkru_for(me.pkey));
		rpal_check(&l, r == 0 && v == peer.key, "peer_read", "B's page through the copy: %s, %#llx",
			   rpal_fault_str(&f), (unsigned long long)v);
		checkpoint(&l, "paired");
	}
	rpal_link_sync(&l, '4');
	if (!is_a) {
		/* B changes its own slot; its flush must reach A's mm as well */
		mprotect((void *)page, 4096, PROT_READ);
		munmap((void *)page, 4096);
	}
	rpal_link_sync(&l, '5');
	if (is_a)
		checkpoint(&l, "peer_flushed");
	rpal_link_sync(&l, '6');

	rpal_step(&l, "release");
	if (is_a) {
		r = rpal_release(fd, peer.key);
		rpal_check(&l, r == 0, "release_call", "release -> %s", rpal_errname(r));
		set_facts(&me, &peer, "none", 1);
	}
	rpal_link_sync(&l, '7');
	if (is_a)
		checkpoint(&l, "released");
	rpal_link_sync(&l, '8');

	/* pair again, then B exits */
	rpal_step(&l, "repair");
	r = rpal_request(fd, peer.key);
	rpal_link_sync(&l, '9');
	if (!is_a)
		return l.failures ? 1 : 0;
	rpal_step(&l, "dead_key");
	r = rpal_poll_dead(fd, 5000);
	rpal_check(&l, r == 1, "dead_key", "poll /proc/rpal after B's exit -> %d", r);
	set_facts(&me, &peer, "none", 0);
	checkpoint(&l, "peer_exited");
	return l.failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	char *extra[2] = { "-1", "-1" };
	int i;

	if (argc >= 5 && (!strcmp(argv[1], "A") || !strcmp(argv[1], "B")))
		return child(argv[1], atoi(argv[2]), atoi(argv[3]),
			     atoi(argv[argv[1][0] == 'A' ? 4 : 5]));
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--pkey-a"))
			extra[0] = argv[i + 1];
		else if (!strcmp(argv[i], "--pkey-b"))
			extra[1] = argv[i + 1];
		else
			break;
	}
	if (i != argc) {
		fprintf(stderr, "usage: %s [--pkey-a N] [--pkey-b N]\n", argv[0]);
		return 2;
	}
	i = rpal_run_pair("A", "B", 2, extra);
	printf("rpal_phases: %s\n", i ? "FAILED" : "PASSED");
	return i;
}
