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
 * Before and after the probing, the peer takes checkpoints (facts peer.*
 * probe.* pairs=, from what the kernel returned) while the probe waits on
 * the pipe: enabled, paired, brk (both grew the heap by 3 pages, the peer
 * gave one back: a flush of its mm, which must reach the probe's), in_handler
 * (from the peer's SIGUSR1 handler entered at the union PKRU), probed (after
 * the probing: the peer's flushes must have moved the probe's TLB
 * generation), released, peer_exited (the probe exited: probe.alive=0).
 * The probing is skipped (the rest goes on) when the probe cannot read the
 * peer's slot or the peer's fresh mmaps are not usable (peer_read,
 * mmap_tagged fail).
 *   tb-rpal_stale_probe [ROUNDS] [--die-in ROLE:STEP[:hang]]
 *                                    (default 3 rounds of each change)
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
	struct rpal_svc svc;	/* as the kernel told us */
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
static char facts[512];

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

static void set_facts(int is_peer, const struct info *me, const struct info *other, int paired)
{
	rpal_svc_facts(facts, sizeof(facts), "peer", is_peer ? &me->svc : &other->svc,
		       "probe", is_peer ? &other->svc : &me->svc, paired);
}

/* Both request each other; 1 when the kernel said that made them paired. */
static int request(struct rpal_link *l, int fd, const struct info *other, int *mine)
{
	int theirs;

	*mine = rpal_request(fd, other->svc.key);
	rpal_link_send(l, mine, sizeof(*mine));
	rpal_link_recv(l, &theirs, sizeof(theirs));
	return *mine == 1 || theirs == 1;
}

/* Enable, exchange, checkpoint "enabled", pair, checkpoint "paired". */
static int setup(struct rpal_link *l, int fd, struct info *me, struct info *other,
		 int is_peer)
{
	int r;

	rpal_step(l, "enable");
	if (rpal_svc_enable(l, fd, RPAL_PKEY_DEFAULT, &me->svc))
		return -1;
	rpal_link_send(l, me, sizeof(*me));
	rpal_link_recv(l, other, sizeof(*other));
	set_facts(is_peer, me, other, 0);
	rpal_pair_checkpoint(l, is_peer, "enabled", facts);
	rpal_step(l, "request");
	if (!request(l, fd, other, &r)) {
		rpal_check(l, 0, "request", "request(%llu) -> %s, and the peer's did not "
			   "map us either", (unsigned long long)other->svc.key, rpal_errname(r));
		return -1;
	}
	set_facts(is_peer, me, other, 1);
	rpal_pair_checkpoint(l, is_peer, "paired", facts);
	return 0;
}

/* Before relying on them: the probe reads T and the flags through its copy
 * of the peer's slot, the peer checks that a fresh mmap (it makes one for
 * each remap) is usable with its PKRU.  1 when both worked (both learn). */
static int first_checks(struct rpal_link *l, const struct info *me, const struct info *peer,
			int is_probe)
{
	struct rpal_fault f = { 0 };
	uint64_t v = 0, ph = ~0ull;
	int ok = 1, theirs;

	if (is_probe) {
		rpal_step(l, "peer_read");
		wrpkru(rpal_pkru_for(me->svc.pkey) & rpal_pkru_for(peer->svc.pkey));
		ok = rpal_try_read64((uint64_t *)(uintptr_t)peer->target, &v, 3000, &f) == 0 &&
		     v == OLD &&
		     rpal_try_read64((uint64_t *)(uintptr_t)peer->flags, &ph, 3000, &f) == 0 &&
		     ph == 0;
		wrpkru(rpal_pkru_for(me->svc.pkey));
		rpal_check(l, ok, "peer_read", "T at %#llx: %#llx, phase %#llx: %s",
			   (unsigned long long)peer->target, (unsigned long long)v,
			   (unsigned long long)ph, rpal_fault_str(&f));
	} else {
		uint64_t *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		rpal_step(l, "mmap_tagged");
		ok = p != MAP_FAILED && rpal_try_write64(p, NEW, 3000, &f) == 0;
		rpal_check(l, ok, "mmap_tagged", "fresh mmap at %p: %s", (void *)p,
			   rpal_fault_str(&f));
		if (p != MAP_FAILED)
			munmap(p, 4096);
	}
	rpal_link_send(l, &ok, sizeof(ok));
	rpal_link_recv(l, &theirs, sizeof(theirs));
	if (ok && !theirs)
		printf("%s: skipping the probing: the %s could not go on\n", l->role,
		       is_probe ? "peer" : "probe");
	return ok && theirs;
}

/* Paired, before the probing: brk, then a signal handler, with checkpoints. */
static void before_probing(struct rpal_link *l, struct info *me, struct info *other,
			   int is_peer)
{
	uint32_t own = rpal_pkru_for(me->svc.pkey);
	uint32_t both = own & rpal_pkru_for(other->svc.pkey), in = 0;

	/* the peer gives a page back: since "paired" only the peer's mm was
	 * flushed, so the host sees whether that flush reached the probe */
	rpal_brk_step(l, &me->svc, 3, is_peer);
	rpal_pair_checkpoint(l, is_peer, "brk", facts);

	rpal_step(l, "pkru");
	rpal_link_sync(l, '<');
	if (is_peer && rpal_checkpoint_in_handler(l, "in_handler", facts, both, &in) == 0)
		rpal_check(l, in == own, "pkru", "PKRU in a signal handler entered with %#x: "
			   "%#x, expected the service default %#x", both, in, own);
	rpal_link_sync(l, '>');
}

/* After the probing (checkpoint "probed" if it ran: the peer's flushes must
 * have moved the probe's TLB generation), release, pairing again, the
 * probe's exit, with checkpoints. */
static int after_probing(struct rpal_link *l, int fd, struct info *me, struct info *other,
			 int is_peer, int probed)
{
	uint32_t own = rpal_pkru_for(me->svc.pkey);
	uint32_t both = own & rpal_pkru_for(other->svc.pkey);
	struct rpal_fault f;
	uint64_t v;
	int r;

	if (probed)
		rpal_pair_checkpoint(l, is_peer, "probed", facts);
	rpal_step(l, "release");
	if (is_peer) {
		r = rpal_release(fd, other->svc.key);
		rpal_check(l, r == 0, "release_call", "release -> %s", rpal_errname(r));
	}
	rpal_link_sync(l, 'R');
	if (!is_peer) {
		wrpkru(both);
		r = rpal_try_read64((uint64_t *)(uintptr_t)other->target, &v, 3000, &f);
		wrpkru(own);
		rpal_check(l, r < 0 && f.sig == SIGSEGV, "release",
			   "read of T after the peer's release: %s%s", rpal_fault_str(&f),
			   r ? "" : " (stale copy still mapped)");
	}
	set_facts(is_peer, me, other, 0);
	rpal_pair_checkpoint(l, is_peer, "released", facts);

	rpal_step(l, "repair");
	r = request(l, fd, other, &r);
	if (is_peer)
		rpal_check(l, r, "repair", "both requested again: mapped: %s", r ? "yes" : "no");
	rpal_link_sync(l, 'e');
	if (!is_peer)
		return 0;
	rpal_dead_key_step(l, fd, other->svc.key);
	other->svc.alive = 0;
	set_facts(is_peer, me, other, 0);
	rpal_checkpoint(l, "peer_exited", facts);
	return 0;
}

static int peer_main(struct rpal_link *l, int rounds)
{
	struct info me = { 0 }, peer;
	uint64_t *t = fresh_page(OLD), *n, ph = 0;
	int fd = rpal_open(), k, i, ok;

	rpal_pin_cpu(0);
	me.target = (uintptr_t)t;
	me.flags = (uintptr_t)&fl;
	if (setup(l, fd, &me, &peer, 1))
		return 1;
	ok = first_checks(l, &me, &peer, 0);
	before_probing(l, &me, &peer, 1);
	for (i = 0; ok && i < rounds; i++) {
		for (k = 0; k < NR_KINDS; k++) {
			rpal_step(l, kind_name[k]);
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
	if (ok)
		rpal_link_sync(l, 'd');
	after_probing(l, fd, &me, &peer, 1, ok);
	return l->failures ? 1 : 0;
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
	int fd = rpal_open(), k, i, j, r, ok;
	int stale[NR_KINDS] = { 0 }, checks[NR_KINDS] = { 0 };
	double end;

	if (rpal_pin_cpu(1)) {
		printf("%s: FAIL pin: cannot run on CPU 1\n", l->role);
		return 1;
	}
	if (setup(l, fd, &me, &peer, 0))
		return 1;
	ok = first_checks(l, &me, &peer, 1);
	before_probing(l, &me, &peer, 0);
	if (!ok)
		goto after;
	t = (uint64_t *)(uintptr_t)peer.target;
	pf = (struct flags *)(uintptr_t)peer.flags;
	wrpkru(rpal_pkru_for(me.svc.pkey) & rpal_pkru_for(peer.svc.pkey));
	for (i = 0; i < rounds; i++) {
		for (k = 0; k < NR_KINDS; k++) {
			rpal_step(l, kind_name[k]);
			/* warm: wait for the ready phase, read T, ack */
			ph++;
			end = now() + RPAL_LINK_TIMEOUT_MS / 1000;
			while (pf->phase != ph)
				if (now() > end) {
					wrpkru(rpal_pkru_for(me.svc.pkey));
					printf("%s: FAIL protocol: the peer did not get to phase "
					       "%llu in %d s\n", l->role, (unsigned long long)ph,
					       RPAL_LINK_TIMEOUT_MS / 1000);
					return 1;
				}
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
	wrpkru(rpal_pkru_for(me.svc.pkey));
	rpal_link_sync(l, 'd');
	for (k = 0; k < NR_KINDS; k++)
		rpal_check(l, stale[k] == 0, kind_name[k],
			   "%d stale reads of %d after the peer's %s (%d rounds)",
			   stale[k], checks[k], kind_name[k], rounds);
after:
	after_probing(l, fd, &me, &peer, 0, ok);
	return l->failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	int rounds = 3, r, i, n;
	char nbuf[16];

	if (argc >= 5 && (!strcmp(argv[1], "peer") || !strcmp(argv[1], "probe"))) {
		struct rpal_link l;

		rpal_link_init(&l, argv[1], atoi(argv[2]), atoi(argv[3]));
		rounds = atoi(argv[4]);
		return !strcmp(argv[1], "peer") ? peer_main(&l, rounds) :
						  probe_main(&l, rounds);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 1; i < argc; i += n) {
		n = rpal_die_in_option(argc, argv, i);
		if (!n && (rounds = atoi(argv[i])) >= 1) {
			n = 1;
		} else if (!n) {
			fprintf(stderr, "usage: %s [ROUNDS] [--die-in ROLE:STEP[:hang]]\n",
				argv[0]);
			return 2;
		}
	}
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
