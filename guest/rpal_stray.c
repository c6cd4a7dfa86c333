/*
 * tb-rpal_stray: what MPK and the slot layout block, and what they don't.
 * (TESTBED_RPAL_SERVICE: stamped as an RPAL service.)
 *
 * Two services, a victim holding a secret and a stray that goes for it:
 *   unpaired   the stray reads the victim's secret through a pointer into
 *              the victim's slot before any pairing: must be SIGSEGV;
 *   pkey_deny  after pairing, with the stray's own default PKRU: must be
 *              SIGSEGV with si_code SEGV_PKUERR and the victim's pkey;
 *   gadget     the known weakness: WRPKRU is unprivileged, so a gadget that
 *              writes PKRU = 0 reads the secret anyway.  Shown, not failed:
 *              "stray: ok gadget: weakness shown: ...".  If the gadget
 *              cannot read it, the pairing itself is broken: FAIL.
 *   release    after the victim released the stray, the stray's read with
 *              PKRU 0 must be SIGSEGV (no copy left);
 *   dead_key   paired again, the stray exits: the victim is told.
 * The victim takes checkpoints (facts victim.* stray.* pairs=, from what
 * the kernel returned) while the stray waits on the pipe: enabled, paired,
 * brk (both grew the heap by 3 pages, the stray gave one back), in_handler
 * (from the victim's SIGUSR1 handler entered at PKRU 0), released,
 * peer_exited (stray.alive=0).
 * Exit 0 when every check passed, 1 otherwise.
 *   tb-rpal_stray [--die-in ROLE:STEP[:hang]]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rpal.h"

#define SECRET 0x5ec7e75ec7e75ec7ull

struct info {
	struct rpal_svc svc;	/* as the kernel told us */
	uint64_t secret;
};

static uint64_t secret_page[512] __attribute__((aligned(4096)));
static char facts[512];

static void set_facts(int victim, const struct info *me, const struct info *peer, int paired)
{
	rpal_svc_facts(facts, sizeof(facts), "victim", victim ? &me->svc : &peer->svc,
		       "stray", victim ? &peer->svc : &me->svc, paired);
}

/* Both request; the kernel's answers say whether we are paired. */
static int request(struct rpal_link *l, int fd, const struct info *peer, int *mine)
{
	int theirs;

	*mine = rpal_request(fd, peer->svc.key);
	rpal_link_send(l, mine, sizeof(*mine));
	rpal_link_recv(l, &theirs, sizeof(theirs));
	return *mine == 1 || theirs == 1;
}

static int run(struct rpal_link *l, int victim)
{
	struct info me = { 0 }, peer;
	struct rpal_fault f;
	volatile uint64_t *s;
	uint64_t v = 0;
	uint32_t own, in = 0;
	int fd, r, paired;

	rpal_step(l, "enable");
	fd = rpal_open();
	if (rpal_svc_enable(l, fd, RPAL_PKEY_DEFAULT, &me.svc))
		return 1;
	own = rpal_pkru_for(me.svc.pkey);
	secret_page[3] = victim ? SECRET : 0;
	me.secret = (uintptr_t)&secret_page[3];
	rpal_link_send(l, &me, sizeof(me));
	rpal_link_recv(l, &peer, sizeof(peer));
	s = (uint64_t *)(uintptr_t)peer.secret;
	set_facts(victim, &me, &peer, 0);
	rpal_pair_checkpoint(l, victim, "enabled", facts);

	if (!victim) {
		/* not paired: the victim's slot is not in our page tables */
		rpal_step(l, "unpaired");
		wrpkru(0);
		r = rpal_try_read64(s, &v, 3000, &f);
		wrpkru(own);
		rpal_check(l, r < 0 && f.sig == SIGSEGV, "unpaired",
			   "read of %p in slot %d without pairing (PKRU 0): %s%s",
			   (void *)s, rpal_slot_of((void *)s), rpal_fault_str(&f),
			   r ? "" : " -- the secret leaked");
	}
	rpal_link_sync(l, 'u');
	rpal_step(l, "request");
	paired = request(l, fd, &peer, &r);
	if (r < 0) {
		rpal_check(l, 0, "request", "%s", rpal_errname(r));
		return 1;
	}
	set_facts(victim, &me, &peer, paired);
	rpal_pair_checkpoint(l, victim, "paired", facts);
	if (!victim) {
		rpal_step(l, "pkey_deny");
		r = rpal_try_read64(s, &v, 3000, &f);
		rpal_check(l, r < 0 && f.sig == SIGSEGV && f.code == SEGV_PKUERR &&
			       f.pkey == peer.svc.pkey, "pkey_deny",
			   "paired, PKRU %#x: %s%s", rdpkru(), rpal_fault_str(&f),
			   r ? "" : " -- the secret leaked");
		/* the gadget: an unprivileged WRPKRU opens every key */
		rpal_step(l, "gadget");
		wrpkru(0);
		v = 0;
		r = rpal_try_read64(s, &v, 3000, &f);
		wrpkru(own);
		if (r == 0 && v == SECRET)
			rpal_check(l, 1, "gadget", "weakness shown: WRPKRU(0) "
				   "then read the victim's secret %#llx",
				   (unsigned long long)v);
		else
			rpal_check(l, 0, "gadget", "WRPKRU(0) then read: %s, "
				   "value %#llx", rpal_fault_str(&f),
				   (unsigned long long)v);
	}
	rpal_link_sync(l, 'd');

	rpal_brk_step(l, &me.svc, 3, !victim);
	rpal_pair_checkpoint(l, victim, "brk", facts);

	/* the victim in a signal handler, entered with every key open */
	rpal_step(l, "pkru");
	rpal_link_sync(l, '<');
	if (victim && rpal_checkpoint_in_handler(l, "in_handler", facts, 0, &in) == 0)
		rpal_check(l, in == own, "pkru", "PKRU in a signal handler entered with 0: "
			   "%#x, expected the service default %#x", in, own);
	rpal_link_sync(l, '>');

	/* the victim releases: the stray, even with PKRU 0, must fault */
	rpal_step(l, "release");
	if (victim) {
		r = rpal_release(fd, peer.svc.key);
		rpal_check(l, r == 0, "release_call", "release -> %s", rpal_errname(r));
	}
	rpal_link_sync(l, 'r');
	if (!victim) {
		wrpkru(0);
		r = rpal_try_read64(s, &v, 3000, &f);
		wrpkru(own);
		rpal_check(l, r < 0 && f.sig == SIGSEGV, "release",
			   "read of the victim after its release (PKRU 0): %s%s",
			   rpal_fault_str(&f), r ? "" : " -- the copy is still mapped");
	}
	set_facts(victim, &me, &peer, 0);
	rpal_pair_checkpoint(l, victim, "released", facts);

	/* pair again (the stray's request may still stand: EEXIST), then the
	 * stray exits */
	rpal_step(l, "repair");
	paired = request(l, fd, &peer, &r);
	if (victim)
		rpal_check(l, paired, "repair", "both requested again: ours -> %s, "
			   "mapped: %s", rpal_errname(r), paired ? "yes" : "no");
	rpal_link_sync(l, 'e');
	if (!victim)
		return l->failures ? 1 : 0;
	rpal_dead_key_step(l, fd, peer.svc.key);
	peer.svc.alive = 0;
	set_facts(victim, &me, &peer, 0);
	rpal_checkpoint(l, "peer_exited", facts);
	return l->failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	int r, i, n;

	if (argc >= 4 && (!strcmp(argv[1], "victim") || !strcmp(argv[1], "stray"))) {
		struct rpal_link l;

		rpal_link_init(&l, argv[1], atoi(argv[2]), atoi(argv[3]));
		return run(&l, !strcmp(argv[1], "victim"));
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 1; i < argc; i += n)
		if (!(n = rpal_die_in_option(argc, argv, i))) {
			fprintf(stderr, "usage: %s [--die-in ROLE:STEP[:hang]]\n", argv[0]);
			return 2;
		}
	r = rpal_run_pair("victim", "stray", 0, NULL);
	printf("rpal_stray: %s\n", r ? "FAILED" : "PASSED");
	return r;
}
