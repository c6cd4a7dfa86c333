/*
 * Tiny /init for recording migration streams (see record_migstream.py).
 *
 * Pins itself to CPU 1, allocates a protection key, writes a distinctive
 * PKRU value with WRPKRU, prints what RDPKRU reads back (and where a marker
 * lives) on the serial console, then spins forever so the value stays in
 * the vCPU.  Built with `gcc -static -O2`.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef PKRU_VALUE
#define PKRU_VALUE 0x5A5A5A54u /* bits 0-1 clear: key 0 stays accessible */
#endif

static inline void wrpkru(unsigned int v)
{
	__asm__ volatile(".byte 0x0f,0x01,0xef" : : "a"(v), "c"(0), "d"(0) : "memory");
}

static inline unsigned int rdpkru(void)
{
	unsigned int eax, edx;
	__asm__ volatile(".byte 0x0f,0x01,0xee" : "=a"(eax), "=d"(edx) : "c"(0));
	return eax;
}

/* CPUID.(EAX=7,ECX=0):ECX.OSPKE[bit 4]: the OS enabled PKU, WRPKRU/RDPKRU work. */
static int ospke(void)
{
	unsigned int a, b, c, d;
	if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
		return 0;
	return (c >> 4) & 1;
}

int main(void)
{
	cpu_set_t set;
	int pke = ospke();
	int fd = open("/dev/console", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 1);
		dup2(fd, 2);
	}
	CPU_ZERO(&set);
	CPU_SET(1, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		perror("sched_setaffinity");
	sched_yield();

	/* A page at a fixed address tagged with the key, holding a marker. */
	char *page = mmap((void *)0x7e0000000000ul, 4096, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	int pkey = pkey_alloc(0, 0);
	if (page == MAP_FAILED) {
		perror("mmap");
	} else {
		strcpy(page, "TESTBED-MARKER-PAGE");
		if (pkey < 0)
			perror("pkey_alloc");
		else if (pkey_mprotect(page, 4096, PROT_READ | PROT_WRITE, pkey) != 0)
			perror("pkey_mprotect");
	}
	if (pke)
		wrpkru(PKRU_VALUE);
	printf("TESTBED pkey=%d pkru=0x%08x cpu=%d marker=%p\n", pkey, pke ? rdpkru() : 0,
	       sched_getcpu(), (void *)page);
	fflush(stdout);
	for (;;)
		__asm__ volatile("" ::: "memory");
	return 0;
}
