/*
 * tb-pkey_mark [ADDR] [MARKER]: allocate a protection key, map one page at
 * the fixed address ADDR (default 0x7e0000000000), tag it with the key, write
 * MARKER (default "testbed-marker") at its start, set a distinctive PKRU
 * (write-disable on the new key, plus the default access-disable bits), read
 * it back with RDPKRU, print one line
 *   pkey_mark addr=0x... pkey=N pkru=0x... pid=N tid=N
 * and block in checkpoint "mark" so the host can compare what it sees.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "tb_checkpoint.h"

static inline unsigned int rdpkru(void)
{
	unsigned int eax, edx, ecx = 0;
	__asm__ volatile(".byte 0x0f,0x01,0xee" : "=a"(eax), "=d"(edx) : "c"(ecx));
	return eax;
}

static inline void wrpkru(unsigned int pkru)
{
	__asm__ volatile(".byte 0x0f,0x01,0xef" : : "a"(pkru), "c"(0), "d"(0));
}

int main(int argc, char **argv)
{
	unsigned long addr = argc > 1 ? strtoul(argv[1], NULL, 0) : 0x7e0000000000UL;
	const char *marker = argc > 2 ? argv[2] : "testbed-marker";
	long page = sysconf(_SC_PAGESIZE);
	char *p = mmap((void *)addr, page, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	if (p == MAP_FAILED || (unsigned long)p != addr) {
		fprintf(stderr, "mmap at 0x%lx: %s\n", addr, strerror(errno));
		return 3;
	}
	int pkey = pkey_alloc(0, 0);
	if (pkey < 0 || pkey_mprotect(p, page, PROT_READ | PROT_WRITE, pkey) != 0) {
		fprintf(stderr, "pkey_alloc/pkey_mprotect: %s\n", strerror(errno));
		return 3;
	}
	strcpy(p, marker);
	/* write-disable the new key (reads still work), keep what the kernel set */
	wrpkru(rdpkru() | (2u << (2 * pkey)));
	unsigned int pkru = rdpkru();
	printf("pkey_mark addr=0x%lx pkey=%d pkru=0x%08x pid=%d tid=%ld\n", addr, pkey, pkru,
	       getpid(), (long)syscall(SYS_gettid));
	fflush(stdout);
	if (tb_checkpoint("mark") != 0) {
		fprintf(stderr, "tb_checkpoint: %s\n", strerror(errno));
		return 1;
	}
	/* after the checkpoint the page must still hold the marker, readable under our PKRU */
	return strcmp(p, marker) == 0 ? 0 : 2;
}
