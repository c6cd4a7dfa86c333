/*
 * tb-rpal_pair: two RPAL services pair up and read and write each other's
 * memory through plain pointers.  (TESTBED_RPAL_SERVICE: the build stamps
 * e_ident[12..15] = "RPAL" into this binary.)
 *
 *   tb-rpal_pair               the full scenario; exit 0 only if every check
 *                              passed
 *   tb-rpal_pair --same-pkey   both ask for pkey 5: the pairing must fail
 *                              with EKEYREJECTED (exit 0 when it does)
 *
 * The parent forks and execs itself twice (roles A and B, connected by two
 * pipes through which they exchange keys, ids, pkeys and addresses).  Each
 * check prints "ROLE: ok NAME: ..." or "ROLE: FAIL NAME: ...".  Checks and
 * the injected bug each one catches:
 *   pkru            PKRU after enable denies all keys but our own  (pkru_open)
 *   keys_locked     pkey_free / pkey_mprotect refused with EPERM (pkey_free_allowed)
 *   mmap_tagged     a fresh mmap and brk page in the slot are usable with
 *                   the service PKRU                               (untagged_mmap)
 *   same_pkey       (--same-pkey) request fails with EKEYREJECTED  (same_pkey)
 *   peer_read       read the peer's data through a pointer         (wrong_slot_copy)
 *   fault_redirect  write a page the peer never touched            (no_fault_redirect)
 *   pkey_deny       with our own PKRU the peer's page faults with
 *                   SEGV_PKUERR and the peer's pkey
 *   peer_write      what the peer wrote into our memory arrived
 *   fork_child      a child forked by a paired service can't reach the peer
 *   release         after release the peer's slot faults           (keep_copy_on_release)
 *   dead_key        poll/read on /proc/rpal report the peer's exit
 *   exit_copy       after the peer exited its slot faults          (keep_copy_on_exit)
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
	uint64_t key, id;
	int32_t pkey, pad;
	uint64_t buf;		/* our data page (4 KiB, populated) */
	uint64_t lazy;		/* a page we mapped but never touched */
};

static uint64_t buf[512] __attribute__((aligned(4096)));

static uint64_t magic(const char *role, int i)
{
	return (role[0] == 'A' ? 0xA000000000000000ull : 0xB000000000000000ull) |
	       (uint64_t)i;
}

static int child(const char *role, int rfd, int wfd, int same_pkey)
{
	struct rpal_link l = { .rfd = rfd, .wfd = wfd, .role = role };
	struct info me, peer;
	struct rpal_fault f;
	uint64_t v, dead[4];
	uint32_t pkru_own, pkru_both;
	volatile uint64_t *lazy, *pbuf, *plazy;
	char *brkp;
	int fd, pkey, r, i;

	fd = rpal_open();
	if (fd < 0) {
		printf("%s: FAIL open: /proc/rpal: %s\n", role, rpal_errname(fd));
		return 1;
	}
	pkey = rpal_enable(fd, same_pkey ? 5 : RPAL_PKEY_DEFAULT);
	if (pkey < 0) {
		printf("%s: FAIL enable: %s\n", role, rpal_errname(pkey));
		return 1;
	}
	memset(&me, 0, sizeof(me));
	rpal_get_key(fd, &me.key);
	rpal_get_id(fd, &me.id);
	me.pkey = pkey;
	pkru_own = rpal_pkru_for(pkey);
	printf("%s: service key %llu id %llu pkey %d slot %#llx buf %p\n", role,
	       (unsigned long long)me.key, (unsigned long long)me.id, pkey,
	       (unsigned long long)rpal_slot_base(me.id), (void *)buf);
	rpal_check(&l, rpal_slot_of(buf) == (int)me.id + 1, "slot_layout",
		   "data at %p is in slot %d (id %llu)", (void *)buf,
		   rpal_slot_of(buf), (unsigned long long)me.id);

	/* PKRU and locked keys */
	rpal_check(&l, rdpkru() == pkru_own, "pkru",
		   "PKRU after enable %#x, expected %#x", rdpkru(), pkru_own);
	wrpkru(pkru_own);
	r = pkey_free(pkey);
	rpal_check(&l, r < 0 && errno == EPERM, "keys_locked",
		   "pkey_free(%d) -> %d (%s)", pkey, r, r ? strerror(errno) : "allowed");
	r = pkey_mprotect(buf, sizeof(buf), PROT_READ | PROT_WRITE, pkey);
	rpal_check(&l, r < 0 && errno == EPERM, "keys_locked",
		   "pkey_mprotect(explicit key %d) -> %d (%s)", pkey, r,
		   r ? strerror(errno) : "allowed");

	/* later mmaps and brk in the slot carry the service pkey */
	for (i = 0; i < 512; i++)
		buf[i] = magic(role, i);
	lazy = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	v = 0;
	r = rpal_try_write64(lazy, 0, TIMEOUT_MS, &f) ?:
	    rpal_try_read64(lazy, &v, TIMEOUT_MS, &f);
	rpal_check(&l, r == 0 && rpal_slot_of((void *)lazy) == (int)me.id + 1,
		   "mmap_tagged", "fresh mmap at %p: %s", (void *)lazy,
		   rpal_fault_str(&f));
	brkp = sbrk(4096);
	r = rpal_try_write64((uint64_t *)((((uintptr_t)brkp) + 7) & ~7ul), 1,
			     TIMEOUT_MS, &f);
	rpal_check(&l, r == 0 && rpal_slot_of(brkp) == (int)me.id + 1,
		   "brk_tagged", "brk page at %p: %s", brkp, rpal_fault_str(&f));
	/* a page the peer will fault in through our slot */
	lazy = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	me.buf = (uintptr_t)buf;
	me.lazy = (uintptr_t)lazy;

	if (rpal_link_send(&l, &me, sizeof(me)) || rpal_link_recv(&l, &peer, sizeof(peer))) {
		printf("%s: FAIL link: peer gone\n", role);
		return 1;
	}
	pkru_both = pkru_own & rpal_pkru_for(peer.pkey);
	pbuf = (uint64_t *)(uintptr_t)peer.buf;
	plazy = (uint64_t *)(uintptr_t)peer.lazy;

	/* pairing */
	r = rpal_request(fd, peer.key);
	if (same_pkey) {
		rpal_check(&l, r == -EKEYREJECTED, "same_pkey",
			   "request of a peer with the same pkey %d -> %s (expected EKEYREJECTED)",
			   pkey, rpal_errname(r));
		rpal_link_sync(&l, 's');	/* both asked before either exits */
		return l.failures ? 1 : 0;
	}
	rpal_check(&l, r >= 0, "request", "request(%llu) -> %s",
		   (unsigned long long)peer.key, rpal_errname(r));
	rpal_link_sync(&l, 'r');	/* both requested: mapped both ways */

	wrpkru(pkru_both);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	rpal_check(&l, r == 0 && v == magic(role[0] == 'A' ? "B" : "A", 7),
		   "peer_read", "peer[7] at %p: %s, value %#llx", (void *)&pbuf[7],
		   rpal_fault_str(&f), (unsigned long long)v);
	r = rpal_try_write64(&plazy[1], magic(role, 1000), TIMEOUT_MS, &f);
	rpal_check(&l, r == 0, "fault_redirect",
		   "write to the peer's untouched page %p: %s", (void *)plazy,
		   rpal_fault_str(&f));
	rpal_try_write64(&pbuf[500], magic(role, 500), TIMEOUT_MS, &f);
	if (role[0] == 'A') {
		/* a fork of a paired service is not a service: no copy of the slot */
		pid_t pid = fork();
		int st = 0;

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

	wrpkru(pkru_own);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	rpal_check(&l, r < 0 && f.sig == SIGSEGV && f.code == SEGV_PKUERR &&
		       f.pkey == peer.pkey, "pkey_deny",
		   "read of the peer with our own PKRU %#x: %s", pkru_own,
		   r ? rpal_fault_str(&f) : "went through");

	rpal_link_sync(&l, 'w');
	{
		const char *other = role[0] == 'A' ? "B" : "A";

		rpal_check(&l, buf[500] == magic(other, 500) &&
			       lazy[1] == magic(other, 1000), "peer_write",
			   "our buf[500] %#llx, lazy[1] %#llx",
			   (unsigned long long)buf[500],
			   (unsigned long long)lazy[1]);
	}

	/* release: both sides must lose the copies */
	r = rpal_release(fd, peer.key);
	rpal_check(&l, r == 0 || r == -ENOENT, "release_call", "release -> %s",
		   rpal_errname(r));
	rpal_link_sync(&l, 'R');
	wrpkru(pkru_both);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	rpal_check(&l, r < 0 && f.sig == SIGSEGV, "release",
		   "read of the peer after release: %s%s", rpal_fault_str(&f),
		   r ? "" : " (stale copy still mapped)");
	wrpkru(pkru_own);
	rpal_link_sync(&l, 'x');

	/* pair again, then B exits and A watches */
	r = rpal_request(fd, peer.key);
	rpal_link_sync(&l, 'q');
	wrpkru(pkru_both);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	rpal_check(&l, r == 0, "repair", "read after pairing again: %s",
		   rpal_fault_str(&f));
	wrpkru(pkru_own);
	rpal_link_sync(&l, 'e');
	if (role[0] == 'B')
		return l.failures ? 1 : 0;

	r = rpal_poll_dead(fd, 5000);
	v = 0;
	if (r == 1)
		r = rpal_read_dead(fd, dead, 4);
	rpal_check(&l, r >= 1 && dead[0] == peer.key, "dead_key",
		   "poll/read of /proc/rpal -> %d, key %llu (peer %llu)", r,
		   (unsigned long long)(r >= 1 ? dead[0] : 0),
		   (unsigned long long)peer.key);
	wrpkru(pkru_both);
	r = rpal_try_read64(&pbuf[7], &v, TIMEOUT_MS, &f);
	wrpkru(pkru_own);
	rpal_check(&l, r < 0 && f.sig == SIGSEGV, "exit_copy",
		   "read of the dead peer's slot: %s%s", rpal_fault_str(&f),
		   r ? "" : " (its slot is still mapped)");
	return l.failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	int same = 0, i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 4 && (!strcmp(argv[1], "A") || !strcmp(argv[1], "B")))
		return child(argv[1], atoi(argv[2]), atoi(argv[3]),
			     argc > 4 && !strcmp(argv[4], "--same-pkey"));
	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--same-pkey")) {
			same = 1;
		} else {
			fprintf(stderr, "usage: %s [--same-pkey]\n", argv[0]);
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
