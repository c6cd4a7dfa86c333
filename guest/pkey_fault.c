/*
 * tb-pkey_fault: allocate a protection key, tag a page with it, deny access
 * through PKRU and touch the page. Under a kernel and CPU with working MPK
 * the access raises SIGSEGV with si_code SEGV_PKUERR; this program reports
 * what it saw and exits:
 *   0  the access faulted with SEGV_PKUERR and si_pkey matched (MPK works)
 *   1  the access went through (MPK did not protect the page)
 *   2  it faulted with another si_code or key
 *   3  pkey_alloc/pkey_mprotect failed (no PKU, or the kernel refuses)
 * With --raw it does not catch the signal, so the process dies of SIGSEGV.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef SEGV_PKUERR
#define SEGV_PKUERR 4
#endif

static sigjmp_buf jump;
static volatile int seen_code, seen_pkey;

static void on_segv(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	seen_code = si->si_code;
#ifdef si_pkey
	seen_pkey = si->si_pkey;
#else
	seen_pkey = -1;
#endif
	siglongjmp(jump, 1);
}

int main(int argc, char **argv)
{
	int raw = argc > 1 && strcmp(argv[1], "--raw") == 0;
	long page = sysconf(_SC_PAGESIZE);
	volatile char *p = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		return 3;
	}
	p[0] = 1;
	int pkey = pkey_alloc(0, 0);
	if (pkey < 0) {
		printf("pkey_alloc: %s\n", strerror(errno));
		return 3;
	}
	if (pkey_mprotect((void *)p, page, PROT_READ | PROT_WRITE, pkey) != 0) {
		printf("pkey_mprotect: %s\n", strerror(errno));
		return 3;
	}
	printf("pkey %d on %p\n", pkey, (void *)p);
	if (!raw) {
		struct sigaction sa = { .sa_sigaction = on_segv, .sa_flags = SA_SIGINFO };
		sigaction(SIGSEGV, &sa, NULL);
	}
	if (pkey_set(pkey, PKEY_DISABLE_ACCESS) != 0) {
		printf("pkey_set: %s\n", strerror(errno));
		return 3;
	}
	if (sigsetjmp(jump, 1) == 0) {
		char v = p[0];
		pkey_set(pkey, 0);
		printf("access went through (read %d): MPK did not protect the page\n", v);
		return 1;
	}
	pkey_set(pkey, 0);
	printf("SIGSEGV si_code=%d (SEGV_PKUERR=%d) si_pkey=%d\n", seen_code, SEGV_PKUERR, seen_pkey);
	fflush(stdout);
	if (seen_code == SEGV_PKUERR && seen_pkey == pkey)
		return 0;
	return 2;
}
