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
 * Exit 0 when every check passed, 1 otherwise.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rpal.h"

#define SECRET 0x5ec7e75ec7e75ec7ull

struct info {
	uint64_t key, id;
	int32_t pkey, pad;
	uint64_t secret;
};

static uint64_t secret_page[512] __attribute__((aligned(4096)));

static int run(struct rpal_link *l, int victim)
{
	struct info me = { 0 }, peer;
	struct rpal_fault f;
	volatile uint64_t *s;
	uint64_t v = 0;
	int fd = rpal_open(), pkey, r;

	if (fd < 0 || (pkey = rpal_enable(fd, RPAL_PKEY_DEFAULT)) < 0) {
		printf("%s: FAIL enable\n", l->role);
		return 1;
	}
	rpal_get_key(fd, &me.key);
	rpal_get_id(fd, &me.id);
	me.pkey = pkey;
	secret_page[3] = victim ? SECRET : 0;
	me.secret = (uintptr_t)&secret_page[3];
	if (rpal_link_send(l, &me, sizeof(me)) || rpal_link_recv(l, &peer, sizeof(peer)))
		return 1;
	s = (uint64_t *)(uintptr_t)peer.secret;

	if (!victim) {
		/* not paired: the victim's slot is not in our page tables */
		wrpkru(0);
		r = rpal_try_read64(s, &v, 3000, &f);
		wrpkru(rpal_pkru_for(pkey));
		rpal_check(l, r < 0 && f.sig == SIGSEGV, "unpaired",
			   "read of %p in slot %d without pairing (PKRU 0): %s%s",
			   (void *)s, rpal_slot_of((void *)s), rpal_fault_str(&f),
			   r ? "" : " -- the secret leaked");
	}
	rpal_link_sync(l, 'u');
	r = rpal_request(fd, peer.key);
	if (r < 0) {
		rpal_check(l, 0, "request", "%s", rpal_errname(r));
		return 1;
	}
	rpal_link_sync(l, 'p');
	if (!victim) {
		r = rpal_try_read64(s, &v, 3000, &f);
		rpal_check(l, r < 0 && f.sig == SIGSEGV && f.code == SEGV_PKUERR &&
			       f.pkey == peer.pkey, "pkey_deny",
			   "paired, PKRU %#x: %s%s", rdpkru(), rpal_fault_str(&f),
			   r ? "" : " -- the secret leaked");
		/* the gadget: an unprivileged WRPKRU opens every key */
		wrpkru(0);
		v = 0;
		r = rpal_try_read64(s, &v, 3000, &f);
		wrpkru(rpal_pkru_for(pkey));
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
	return l->failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	int r;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 4 && (!strcmp(argv[1], "victim") || !strcmp(argv[1], "stray"))) {
		struct rpal_link l = { .rfd = atoi(argv[2]), .wfd = atoi(argv[3]),
				       .role = argv[1] };

		return run(&l, !strcmp(argv[1], "victim"));
	}
	r = rpal_run_pair("victim", "stray", 0, NULL);
	printf("rpal_stray: %s\n", r ? "FAILED" : "PASSED");
	return r;
}
