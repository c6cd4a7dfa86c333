/*
 * tb-rpal_stale_probe: does a TLB shootdown of a service reach the CPUs of
 * its mapped peers?  (TESTBED_RPAL_SERVICE: stamped as an RPAL service.)
 *
 * The parent (pinned to CPU 0) forks and execs two paired services:
 *   peer   (CPU 0) owns page T and changes it: replaces it with a new page
 *          (mremap over it), takes its protection away (mprotect PROT_NONE),
 *          unmaps it;
 *   probe  (CPU 1) keeps reading T through its pointer into the peer's slot,
 *          so its TLB holds T's translation; after each change it reads T
 *          again.
 * A correct kernel flushes the probe's TLB when the peer's mm is flushed:
 * the probe then sees the new page, or faults.  A kernel that skips the
 * peer flush (rpal.bug=skip_peer_flush) leaves the old translation on
 * CPU 1 (QEMU's software TLB keeps it), and the probe reads stale data.
 * Prints "probe: FAIL <phase>: N stale reads ..." and exits 1 when it sees
 * any; exits 0 when none; 77 when there is only one CPU.
 *   tb-rpal_stale_probe [ROUNDS]     (default 3 rounds of each change)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "rpal.h"

#define OLD 0x1111111111111111ull
#define NEW 0x2222222222222222ull
#define CHECK_READS 200

struct info {
	uint64_t key, id;
	int32_t pkey, pad;
	uint64_t target;	/* T */
	uint64_t flags;		/* struct flags in the peer's memory */
};

struct flags {
	volatile uint64_t phase;	/* odd: T is ready; even: T changed */
	volatile uint64_t ack;
};

static struct flags fl __attribute__((aligned(4096)));
enum { REMAP, PROTECT, UNMAP, NR_KINDS };
static const char *kind_name[NR_KINDS] = { "remap", "protect", "unmap" };

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int wait_ack(uint64_t want)
{
	double end = now() + 10;

	while (fl.ack != want)
		if (now() > end)
			return -1;
	return 0;
}

static uint64_t *fresh_page(uint64_t val)
{
	uint64_t *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	int i;

	for (i = 0; i < 512; i++)
		p[i] = val;
	return p;
}

static int setup(struct rpal_link *l, int fd, struct info *me, struct info *peer)
{
	int pkey = rpal_enable(fd, RPAL_PKEY_DEFAULT), r;

	if (pkey < 0) {
		printf("%s: FAIL enable: %s\n", l->role, rpal_errname(pkey));
		return -1;
	}
	rpal_get_key(fd, &me->key);
	rpal_get_id(fd, &me->id);
	me->pkey = pkey;
	if (rpal_link_send(l, me, sizeof(*me)) ||
	    rpal_link_recv(l, peer, sizeof(*peer)))
		return -1;
	r = rpal_request(fd, peer->key);
	if (r < 0) {
		printf("%s: FAIL request: %s\n", l->role, rpal_errname(r));
		return -1;
	}
	return rpal_link_sync(l, 'r');
}

static int peer_main(struct rpal_link *l, int rounds)
{
	struct info me = { 0 }, peer;
	uint64_t *t = fresh_page(OLD), *n, ph = 0;
	int fd = rpal_open(), k, i;

	rpal_pin_cpu(0);
	me.target = (uintptr_t)t;
	me.flags = (uintptr_t)&fl;
	if (fd < 0 || setup(l, fd, &me, &peer))
		return 1;
	for (i = 0; i < rounds; i++) {
		for (k = 0; k < NR_KINDS; k++) {
			/* T readable with OLD; let the probe warm its TLB */
			fl.phase = ++ph;
			if (wait_ack(ph))
				goto lost;
			usleep(20000);
			switch (k) {
			case REMAP:
				n = fresh_page(NEW);
				if (mremap(n, 4096, 4096, MREMAP_MAYMOVE | MREMAP_FIXED,
					   t) != t)
					perror("mremap");
				break;
			case PROTECT:
				mprotect(t, 4096, PROT_NONE);
				break;
			case UNMAP:
				munmap(t, 4096);
				break;
			}
			fl.phase = ++ph;	/* changed, and flushed */
			if (wait_ack(ph))
				goto lost;
			/* restore T (same address) with OLD for the next phase */
			munmap(t, 4096);
			n = fresh_page(OLD);	/* may land right at t */
			if (n != t && mremap(n, 4096, 4096,
					     MREMAP_MAYMOVE | MREMAP_FIXED, t) != t)
				perror("mremap");
		}
	}
	fl.phase = ~0ull;
	rpal_link_sync(l, 'd');
	return 0;
lost:
	printf("%s: FAIL protocol: the probe stopped answering in phase %llu\n",
	       l->role, (unsigned long long)ph);
	return 1;
}

static int probe_main(struct rpal_link *l, int rounds)
{
	struct info me = { 0 }, peer;
	struct rpal_fault f;
	volatile uint64_t *t;
	struct flags *pf;
	uint64_t ph = 0, seen, v;
	int fd = rpal_open(), k, i, j, r;
	int stale[NR_KINDS] = { 0 }, checks[NR_KINDS] = { 0 };

	if (rpal_pin_cpu(1)) {
		printf("%s: FAIL pin: cannot run on CPU 1\n", l->role);
		return 1;
	}
	if (fd < 0 || setup(l, fd, &me, &peer))
		return 1;
	t = (uint64_t *)(uintptr_t)peer.target;
	pf = (struct flags *)(uintptr_t)peer.flags;
	wrpkru(rpal_pkru_for(me.pkey) & rpal_pkru_for(peer.pkey));
	for (i = 0; i < rounds; i++) {
		for (k = 0; k < NR_KINDS; k++) {
			/* warm: wait for the ready phase, read T, ack */
			ph++;
			while (pf->phase != ph)
				;
			for (j = 0; j < 100; j++)
				rpal_try_read64(&t[j & 7], &v, 1000, &f);
			/*
			 * From here to the end of the checks: no system call,
			 * so nothing but the peer's flush (and, under PTI,
			 * interrupts) can drop T's translation.
			 */
			rpal_watchdog(10000);
			pf->ack = ph;
			/* keep T hot until the peer says it changed it */
			ph++;
			do {
				seen = pf->phase;
				rpal_try_read64_nosys(&t[0], &v, &f);
			} while (seen != ph);
			/* the change and its flush happened before this point */
			for (j = 0; j < CHECK_READS; j++) {
				r = rpal_try_read64_nosys(&t[j & 7], &v, &f);
				checks[k]++;
				if (k == REMAP ? (r || v != NEW) : (r == 0))
					stale[k]++;
			}
			rpal_watchdog(0);
			pf->ack = ph;
		}
	}
	wrpkru(rpal_pkru_for(me.pkey));
	rpal_link_sync(l, 'd');
	for (k = 0; k < NR_KINDS; k++)
		rpal_check(l, stale[k] == 0, kind_name[k],
			   "%d stale reads of %d after the peer's %s (%d rounds)",
			   stale[k], checks[k], kind_name[k], rounds);
	return l->failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	int rounds = 3, r;
	char nbuf[16];

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 5 && (!strcmp(argv[1], "peer") || !strcmp(argv[1], "probe"))) {
		struct rpal_link l = { .rfd = atoi(argv[2]), .wfd = atoi(argv[3]),
				       .role = argv[1] };

		rounds = atoi(argv[4]);
		return !strcmp(argv[1], "peer") ? peer_main(&l, rounds) :
						  probe_main(&l, rounds);
	}
	if (argc > 1)
		rounds = atoi(argv[1]);
	if (rounds < 1)
		rounds = 3;
	if (rpal_nr_cpus() < 2) {
		printf("rpal_stale_probe: SKIP: needs 2 CPUs\n");
		return 77;
	}
	rpal_pin_cpu(0);
	snprintf(nbuf, sizeof(nbuf), "%d", rounds);
	r = rpal_run_pair("peer", "probe", 1, (char *[]){ nbuf });
	printf("rpal_stale_probe: %s\n", r ? "FAILED" : "PASSED");
	return r;
}
