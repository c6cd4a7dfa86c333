/*
 * tb-rpal_pair: two RPAL services pair up and read and write each other's
 * memory through plain pointers.  (TESTBED_RPAL_SERVICE: the build stamps
 * e_ident[12..15] = "RPAL" into this binary.)
 *
 *   tb-rpal_pair               the full scenario; exit 0 only if every check
 *                              passed
 *   tb-rpal_pair --same-pkey   both ask for pkey 5: the pairing must fail
 *                              with EKEYREJECTED (exit 0 when it does)
 *   --die-in ROLE:STEP[:hang]  ROLE dies of SIGSEGV (or hangs) when it enters
 *                              STEP: a test of the clean failure (rpal.h)
 *
 * The parent forks and execs itself twice (roles A and B, connected by two
 * pipes through which they exchange keys, ids, pkeys and addresses).  Each
 * check prints "ROLE: ok NAME: ..." or "ROLE: FAIL NAME: ...".  Checks and
 * the injected bug each one catches:
 *   pkru            PKRU after enable denies all keys but our own  (pkru_open);
 *                   a signal handler runs at the service default PKRU
 *   keys_locked     pkey_free / pkey_mprotect refused with EPERM (pkey_free_allowed)
 *   mmap_tagged     a fresh mmap in the slot is usable with the service
 *                   PKRU                                           (untagged_mmap)
 *   same_pkey       (--same-pkey) request fails with EKEYREJECTED  (same_pkey)
 *   peer_read       read the peer's data through a pointer         (wrong_slot_copy)
 *   fault_redirect  write a page the peer never touched            (no_fault_redirect)
 *   pkey_deny       with our own PKRU the peer's page faults with
 *                   SEGV_PKUERR and the peer's pkey
 *   peer_write      what the peer wrote into our memory arrived
 *   fork_child      a child forked by a paired service can't reach the peer
 *   brk_tagged      brk growth (while paired) is usable with the
 *                   service PKRU                                   (untagged_mmap)
 *   release         after release the peer's slot faults           (keep_copy_on_release)
 *   dead_key        poll/read on /proc/rpal report the peer's exit
 *   exit_copy       after the peer exited its slot faults          (keep_copy_on_exit)
 *
 * A takes the checkpoints, with facts A.* B.* pairs= from what the kernel
 * returned (ENABLE, GET_SERVICE_*, REQUEST), while B waits on the pipe:
 *   enabled      both enabled, not paired
 *   paired       both requested each other (--same-pkey: "requested")
 *   brk          both grew their heap by 3 pages, A gave one back
 *   in_handler   from A's SIGUSR1 handler, entered at the union PKRU
 *                (--same-pkey: at PKRU 0): A must be at its default PKRU
 *   released     both released
 *   peer_exited  paired again, then B exited (B.alive=0)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "rpal.h"

#define TIMEOUT_MS 3000

struct info {
	struct rpal_svc svc;	/* key, id, pkey as the kernel told us */
	uint64_t buf;		/* our data page (4 KiB, populated) */
	uint64_t lazy;		/* a page we mapped but never touched */
};

static uint64_t buf[512] __attribute__((aligned(4096)));
static char facts[512];

static uint64_t magic(const char *role, int i)
{
	return (role[0] == 'A' ? 0xA000000000000000ull : 0xB000000000000000ull) |
	       (uint64_t)i;
}

/* A's and B's facts for the host (A takes every checkpoint) */
static void set_facts(int is_a, const struct info *me, const struct info *peer, int paired)
{
	rpal_svc_facts(facts, sizeof(facts), "A", is_a ? &me->svc : &peer->svc,
		       "B", is_a ? &peer->svc : &me->svc, paired);
}

/* Both request each other; what the kernel answered decides "paired". */
static int request_step(struct rpal_link *l, int fd, const struct info *peer, int *mine)
{
	int theirs;

	rpal_step(l, "request");
	*mine = rpal_request(fd, peer->svc.key);
	rpal_link_send(l, mine, sizeof(*mine));
	rpal_link_recv(l, &theirs, sizeof(theirs));
	return *mine == 1 || theirs == 1;
}

/* A enters a signal handler at the union PKRU ("in a call"); the handler
 * takes the checkpoint: the host must see A at its own default PKRU. */
static void signal_step(struct rpal_link *l, int is_a, uint32_t pkru_own, uint32_t pkru_both)
{
	uint32_t in = 0;

	rpal_step(l, "pkru");
	rpal_link_sync(l, '<');
	if (is_a && rpal_checkpoint_in_handler(l, "in_handler", facts, pkru_both, &in) == 0)
		rpal_check(l, in == pkru_own, "pkru",
			   "PKRU in a signal handler entered with %#x: %#x, expected the "
			   "service default %#x", pkru_both, in, pkru_own);
	rpal_link_sync(l, '>');
}

static int child(const char *role, int rfd, int wfd, int same_pkey)
{
	struct rpal_link l;
	struct info me, peer;
	struct rpal_fault f;
	uint64_t v;
	uint32_t pkru_own, pkru_both;
	volatile uint64_t *lazy, *pbuf, *plazy;
	int is_a = role[0] == 'A', fd, pkey, r, i, paired;

	rpal_link_init(&l, role, rfd, wfd);
	rpal_step(&l, "enable");
	memset(&me, 0, sizeof(me));
	fd = rpal_open();
	if (rpal_svc_enable(&l, fd, same_pkey ? 5 : RPAL_PKEY_DEFAULT, &me.svc))
		return 1;
	pkey = me.svc.pkey;
	pkru_own = rpal_pkru_for(pkey);
	printf("%s: service key %llu id %llu pkey %d slot %#llx buf %p\n", role,
	       (unsigned long long)me.svc.key, (unsigned long long)me.svc.id, pkey,
	       (unsigned long long)rpal_slot_base(me.svc.id), (void *)buf);
	rpal_step(&l, "slot_layout");
	rpal_check(&l, rpal_slot_of(buf) == (int)me.svc.id + 1, "slot_layout",
		   "data at %p is in slot %d (id %llu)", (void *)buf,
		   rpal_slot_of(buf), (unsigned long long)me.svc.id);

	/* PKRU and locked keys */
	rpal_step(&l, "pkru");
	rpal_check(&l, rdpkru() == pkru_own, "pkru",
		   "PKRU after enable %#x, expected %#x", rdpkru(), pkru_own);
	wrpkru(pkru_own);
	rpal_step(&l, "keys_locked");
	r = pkey_free(pkey);
	rpal_check(&l, r < 0 && errno == EPERM, "keys_locked",
		   "pkey_free(%d) -> %d (%s)", pkey, r, r ? strerror(errno) : "allowed");
	r = pkey_mprotect(buf, sizeof(buf), PROT_READ | PROT_WRITE, pkey);
	rpal_check(&l, r < 0 && errno == EPERM, "keys_locked",
		   "pkey_mprotect(explicit key %d) -> %d (%s)", pkey, r,
		   r ? strerror(errno) : "allowed");

	/* later mmaps in the slot carry the service pkey (brk: below, paired) */
	rpal_step(&l, "mmap_tagged");
	for (i = 0; i < 512; i++)
		buf[i] = magic(role, i);
	lazy = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	v = 0;
	r = rpal_try_write64(lazy, 0, TIMEOUT_MS, &f) ?:
	    rpal_try_read64(lazy, &v, TIMEOUT_MS, &f);
	rpal_check(&l, r == 0 && rpal_slot_of((void *)lazy) == (int)me.svc.id + 1,
		   "mmap_tagged", "fresh mmap at %p: %s", (void *)lazy,
		   rpal_fault_str(&f));
	/* a page the peer will fault in through our slot */
	lazy = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	me.buf = (uintptr_t)buf;
	me.lazy = (uintptr_t)lazy;

	rpal_link_send(&l, &me, sizeof(me));
	rpal_link_recv(&l, &peer, sizeof(peer));
	pkru_both = pkru_own & rpal_pkru_for(peer.svc.pkey);
	pbuf = (uint64_t *)(uintptr_t)peer.buf;
	plazy = (uint64_t *)(uintptr_t)peer.lazy;
	set_facts(is_a, &me, &peer, 0);
	rpal_pair_checkpoint(&l, is_a, "enabled", facts);

	/* pairing */
	paired = request_step(&l, fd, &peer, &r);
	set_facts(is_a, &me, &peer, paired);
	if (same_pkey) {
		rpal_step(&l, "same_pkey");
		rpal_check(&l, r == -EKEYREJECTED, "same_pkey",
			   "request of a peer with the same pkey %d -> %s (expected EKEYREJECTED)",
			   pkey, rpal_errname(r));
		rpal_pair_checkpoint(&l, is_a, "requested", facts);
		rpal_brk_step(&l, &me.svc, 3, !is_a);
		rpal_pair_checkpoint(&l, is_a, "brk", facts);
		signal_step(&l, is_a, pkru_own, 0);	/* from a fully open PKRU */
		rpal_link_sync(&l, 'e');	/* both done before B exits */
		if (!is_a)
			return l.failures ? 1 : 0;
		/* a refused request is no request: B's death is A's news only if
		 * they were paired after all */
		if (paired) {
			rpal_dead_key_step(&l, fd, peer.svc.key);
		} else {
			rpal_step(&l, "peer_exit");
			rpal_link_wait_gone(&l);
		}
		peer.svc.alive = 0;
		set_facts(is_a, &me, &peer, 0);
		rpal_checkpoint(&l, "peer_exited", facts);
		return l.failures ? 1 : 0;
	}
	rpal_check(&l, r >= 0, "request", "request(%llu) -> %s",
		   (unsigned long long)peer.svc.key, rpal_errname(r));
	rpal_pair_checkpoint(&l, is_a, "paired", facts);

	rpal_step(&l, "peer_read");
	wrpkru(pkru_both);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	rpal_check(&l, r == 0 && v == magic(role[0] == 'A' ? "B" : "A", 7),
		   "peer_read", "peer[7] at %p: %s, value %#llx", (void *)&pbuf[7],
		   rpal_fault_str(&f), (unsigned long long)v);
	rpal_step(&l, "fault_redirect");
	r = rpal_try_write64(&plazy[1], magic(role, 1000), TIMEOUT_MS, &f);
	rpal_check(&l, r == 0, "fault_redirect",
		   "write to the peer's untouched page %p: %s", (void *)plazy,
		   rpal_fault_str(&f));
	rpal_step(&l, "peer_write");
	rpal_try_write64(&pbuf[500], magic(role, 500), TIMEOUT_MS, &f);
	if (role[0] == 'A') {
		/* a fork of a paired service is not a service: no copy of the slot */
		pid_t pid;
		int st = 0;

		rpal_step(&l, "fork_child");
		pid = fork();
		/* No handler in the child: it is not a service, so a signal
		 * handler would run with the default PKRU, which denies the
		 * key of its (inherited) stack.  It must die of SIGSEGV. */
		if (pid == 0) {
			signal(SIGSEGV, SIG_DFL);
			alarm(5);
			v = pbuf[7];
			_exit(v == magic(role[0] == 'A' ? "B" : "A", 7) ? 3 : 4);
		}
		waitpid(pid, &st, 0);
		rpal_check(&l, WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "fork_child",
			   "a forked child reading the peer: %s",
			   WIFSIGNALED(st) ? strsignal(WTERMSIG(st)) :
			   WEXITSTATUS(st) == 3 ? "read the peer's data (copy inherited)" :
			   "read something else");
	}

	rpal_step(&l, "pkey_deny");
	wrpkru(pkru_own);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	rpal_check(&l, r < 0 && f.sig == SIGSEGV && f.code == SEGV_PKUERR &&
		       f.pkey == peer.svc.pkey, "pkey_deny",
		   "read of the peer with our own PKRU %#x: %s", pkru_own,
		   r ? rpal_fault_str(&f) : "went through");

	rpal_link_sync(&l, 'w');
	rpal_step(&l, "peer_write");
	{
		/* guarded: under a kernel that mistags later mmaps, lazy faults */
		const char *other = role[0] == 'A' ? "B" : "A";
		uint64_t w = 0;

		r = rpal_try_read64(&lazy[1], &w, TIMEOUT_MS, &f);
		rpal_check(&l, buf[500] == magic(other, 500) && r == 0 &&
			       w == magic(other, 1000), "peer_write",
			   "our buf[500] %#llx, lazy[1] %#llx%s%s",
			   (unsigned long long)buf[500], (unsigned long long)w,
			   r ? ": " : "", r ? rpal_fault_str(&f) : "");
	}

	/* brk growth while paired; A gives a page back: a flush of A's mm,
	 * which must reach B's (B's mm is not flushed between "paired" and
	 * "brk": only then does the host see whether A's flushes reach it) */
	rpal_brk_step(&l, &me.svc, 3, is_a);
	rpal_pair_checkpoint(&l, is_a, "brk", facts);
	signal_step(&l, is_a, pkru_own, pkru_both);

	/* release: both sides must lose the copies */
	rpal_step(&l, "release");
	r = rpal_release(fd, peer.svc.key);
	rpal_check(&l, r == 0 || r == -ENOENT, "release_call", "release -> %s",
		   rpal_errname(r));
	rpal_link_sync(&l, 'R');
	wrpkru(pkru_both);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	rpal_check(&l, r < 0 && f.sig == SIGSEGV, "release",
		   "read of the peer after release: %s%s", rpal_fault_str(&f),
		   r ? "" : " (stale copy still mapped)");
	wrpkru(pkru_own);
	set_facts(is_a, &me, &peer, 0);
	rpal_pair_checkpoint(&l, is_a, "released", facts);

	/* pair again, then B exits and A watches */
	rpal_step(&l, "repair");
	r = rpal_request(fd, peer.svc.key);
	rpal_link_sync(&l, 'q');
	wrpkru(pkru_both);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	rpal_check(&l, r == 0, "repair", "read after pairing again: %s",
		   rpal_fault_str(&f));
	wrpkru(pkru_own);
	rpal_link_sync(&l, 'e');
	if (role[0] == 'B')
		return l.failures ? 1 : 0;

	rpal_dead_key_step(&l, fd, peer.svc.key);
	peer.svc.alive = 0;
	set_facts(is_a, &me, &peer, 0);
	rpal_checkpoint(&l, "peer_exited", facts);
	/* with every key open: our placeholder there is PROT_NONE (SIGSEGV
	 * SEGV_ACCERR), so a pkey fault can't pass for "not mapped" */
	rpal_step(&l, "exit_copy");
	wrpkru(0);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	wrpkru(pkru_own);
	rpal_check(&l, r < 0 && f.sig == SIGSEGV, "exit_copy",
		   "read of the dead peer's slot: %s%s", rpal_fault_str(&f),
		   r ? "" : " (its slot is still mapped)");
	return l.failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	int same = 0, i, n;

	if (argc >= 4 && (!strcmp(argv[1], "A") || !strcmp(argv[1], "B")))
		return child(argv[1], atoi(argv[2]), atoi(argv[3]),
			     argc > 4 && !strcmp(argv[4], "--same-pkey"));
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (i = 1; i < argc; i += n) {
		n = 1;
		if (!strcmp(argv[i], "--same-pkey")) {
			same = 1;
		} else if (!(n = rpal_die_in_option(argc, argv, i))) {
			fprintf(stderr, "usage: %s [--same-pkey] [--die-in ROLE:STEP[:hang]]\n",
				argv[0]);
			return 2;
		}
	}
	{
		struct rpal_version_info vi = { 0, 0 };
		int fd = rpal_open();

		if (fd >= 0 && rpal_version(fd, &vi) == 0)
			printf("rpal_pair: api %u, caps%s%s%s\n", vi.api_version,
			       vi.cap & RPAL_CAP_PKU ? " pku" : "",
			       vi.cap & RPAL_CAP_5LEVEL ? " 5level" : " 4level",
			       vi.cap & RPAL_CAP_PTI ? " pti" : " nopti");
		if (fd >= 0)
			close(fd);
	}
	i = rpal_run_pair("A", "B", same, same ? (char *[]){ "--same-pkey" } : NULL);
	printf("rpal_pair%s: %s\n", same ? " --same-pkey" : "",
	       i ? "FAILED" : "PASSED");
	return i;
}
