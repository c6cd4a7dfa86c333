/*
 * tb-rpal_security: the security review's attacks, one row each, between a
 * victim service holding a secret and an attacker service.
 * (TESTBED_RPAL_SERVICE: stamped as an RPAL service.)
 *
 *   tb-rpal_security [ROW...]     run these rows (default: every row), in order
 *   tb-rpal_security --list       the row names
 *
 * Each row is a pair of its own (rpal_run_pair): the victim (pkey 5) holds
 * a secret page and a 4-page target area in its slot; the attacker (pkey 9)
 * is paired with it or not (ROW(..., pair)), tries the attack with its own
 * PKRU unless the attack is about PKRU, asks the victim whether its memory
 * changed, takes the checkpoint ROW (facts: victim.* attacker.* pairs=
 * row= secret= target= and the row's own, e.g. planted=) and prints one line
 *
 *   ROW NAME OBSERVED key=value... | what happened
 *
 * OBSERVED is what the kernel let through, without judging it: "blocked"
 * (the access was refused or did not reach the victim), "open" (it did),
 * "skip" (this kernel lacks the facility), "error" (the attack could not be
 * set up) or "host" (only the host can tell: the gadget scan).  What the
 * design expects of each row is written down in
 * testbed/designs/rpal/SECURITY.md, not here.  Exit 0 unless a pair could
 * not run.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include "rpal.h"

#define SECRET		0x5ec7e75ec7e75ec7ull	/* the victim's secret page, every word */
#define SECRET_W	0x5ec7e70000000077ull	/* the second victim's (key_reuse) */
#define SECRET_M	0x5ec7e7000000f11eull	/* the victim's memfd page */
#define TARGET(i)	(0x7a7a000000000000ull | (i))	/* target word i */
#define FORGED		0xbadbadbadbadbad0ull	/* what an attack writes */
#define VICTIM_PKEY	5
#define ATTACKER_PKEY	9
#define TARGET_WORDS	(4 * 512)
#define T_STACK_ADDR	0x10000000ul	/* slot 0: no service's, pkey 0 */

/* raw system calls: for code that must not touch TLS (errno) or the heap */
#define SYS3(n, a, b, c) ({ long _r; __asm__ volatile("syscall" : "=a"(_r) \
	: "0"((long)(n)), "D"((long)(a)), "S"((long)(b)), "d"((long)(c)) \
	: "rcx", "r11", "memory"); _r; })

static uint64_t secret_page[512] __attribute__((aligned(4096)));
static uint64_t target_pages[TARGET_WORDS] __attribute__((aligned(4096)));

struct peer {
	struct rpal_svc svc;
	uint64_t secret, target;
};

/* The victim's answer to 'I': how much of its memory an attack changed. */
struct integ {
	int32_t bad_secret, bad_target;
	uint64_t first_bad;
};

struct ctx {
	struct rpal_link *l;
	const char *row;
	int fd;			/* /proc/rpal */
	struct peer me, v;	/* the attacker, the victim */
	int paired;
	uint32_t own;		/* the attacker's default PKRU */
	int victim_gone;
	/* the row's result */
	const char *obs;
	char ev[512], msg[384], facts_extra[160];
};

static void take_checkpoint(struct ctx *c);

/* ------------------------------------------------------------------ helpers */

static void ev(struct ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void ev(struct ctx *c, const char *fmt, ...)
{
	size_t n = strlen(c->ev);
	va_list ap;

	if (n + 2 >= sizeof(c->ev))
		return;
	if (n)
		c->ev[n++] = ' ';
	va_start(ap, fmt);
	vsnprintf(c->ev + n, sizeof(c->ev) - n, fmt, ap);
	va_end(ap);
}

static int result(struct ctx *c, const char *obs, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int result(struct ctx *c, const char *obs, const char *fmt, ...)
{
	va_list ap;

	c->obs = obs;
	va_start(ap, fmt);
	vsnprintf(c->msg, sizeof(c->msg), fmt, ap);
	va_end(ap);
	return 0;
}

/* "EFAULT" for -EFAULT, "8" for 8 (eight buffers: several in one printf) */
static const char *errstr(long r)
{
	static char buf[8][24];
	static int k;
	char *b = buf[k++ & 7];
	const char *name = r < 0 ? strerrorname_np((int)-r) : NULL;

	if (r >= 0)
		snprintf(b, sizeof(buf[0]), "%ld", r);
	else
		snprintf(b, sizeof(buf[0]), "%s", name ? name : "E?");
	return b;
}

/* a read through the kernel (write(2) of @addr into a pipe): -errno or the value */
static long deputy_read64(const void *addr, uint64_t *out)
{
	int p[2];
	long r;

	if (pipe(p))
		return -errno;
	r = write(p[1], addr, 8);
	r = r < 0 ? -errno : r;
	if (r == 8 && read(p[0], out, 8) != 8)
		r = -EIO;
	close(p[0]);
	close(p[1]);
	return r;
}

static void victim_cmd(struct ctx *c, char cmd, void *reply, int len)
{
	rpal_link_send(c->l, &cmd, 1);
	if (len)
		rpal_link_recv(c->l, reply, len);
}

static struct integ integrity(struct ctx *c)
{
	struct integ in = { 0 };

	if (!c->victim_gone)
		victim_cmd(c, 'I', &in, sizeof(in));
	return in;
}

/* "open" when the victim's memory changed, else @fallback */
static int judged_by_victim(struct ctx *c, long r, const char *what)
{
	struct integ in = integrity(c);

	ev(c, "ret=%s bad_target=%d bad_secret=%d", errstr(r), in.bad_target, in.bad_secret);
	if (in.bad_target || in.bad_secret)
		return result(c, "open", "%s -> %s; the victim's memory changed (%d target, %d "
			      "secret words; first %#llx)", what, errstr(r), in.bad_target,
			      in.bad_secret, (unsigned long long)in.first_bad);
	return result(c, "blocked", "%s -> %s; the victim's memory is unchanged", what,
		      errstr(r));
}

/* "open" when @v is the secret */
static int judged_by_value(struct ctx *c, int got, uint64_t v, uint64_t secret,
			   const char *what, const char *how)
{
	ev(c, "value=%#llx", (unsigned long long)(got ? v : 0));
	if (got && v == secret)
		return result(c, "open", "%s: read the secret %#llx (%s)", what,
			      (unsigned long long)v, how);
	if (got)
		return result(c, "blocked", "%s: no secret (%s; value %#llx)", what, how,
			      (unsigned long long)v);
	return result(c, "blocked", "%s: no secret (%s)", what, how);
}

static int guarded_read(struct ctx *c, const void *p, uint64_t secret, const char *what)
{
	struct rpal_fault f;
	uint64_t v = 0;
	int r = rpal_try_read64(p, &v, 3000, &f);

	ev(c, "pkru=%#x fault=%s code=%d pkey=%d", rdpkru(), r ? (f.sig == SIGALRM ?
	   "timeout" : f.sig == SIGBUS ? "SIGBUS" : "SIGSEGV") : "none", f.code, f.pkey);
	return judged_by_value(c, r == 0, v, secret, what, rpal_fault_str(&f));
}

/* ------------------------------------------------------------------ gadgets */

static int a_wrpkru_gadget(struct ctx *c)
{
	int r;

	wrpkru(0);
	r = guarded_read(c, (void *)c->v.secret, SECRET, "WRPKRU(0), then a read of the "
			 "victim's secret");
	wrpkru(c->own);
	return r;
}

static void cpuid2(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b)
{
	uint32_t cc, d;

	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(cc), "=d"(d) : "0"(leaf), "2"(sub));
}

static uint8_t xbuf[16384] __attribute__((aligned(64)));

static int a_xrstor_gadget(struct ctx *c)
{
	uint32_t a, b, lo, hi, size, off;
	int r;

	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(lo), "=d"(hi) : "0"(1), "2"(0));
	if (!(lo & (1u << 27)))
		return result(c, "skip", "no OSXSAVE: XRSTOR not usable");
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	if (!(lo & (1u << 9)))
		return result(c, "skip", "XCR0 %#x has no PKRU component", lo);
	cpuid2(0xd, 0, &a, &size);
	cpuid2(0xd, 9, &a, &off);
	if (size > sizeof(xbuf) || off + 4 > size)
		return result(c, "error", "XSAVE area %u bytes, PKRU at %u", size, off);
	memset(xbuf, 0, size);
	__asm__ volatile("xsave64 %0" : "+m"(*(uint8_t (*)[16384])xbuf) : "a"(1u << 9), "d"(0));
	*(uint32_t *)(xbuf + off) = 0;			/* the forged PKRU */
	*(uint64_t *)(xbuf + 512) |= 1ull << 9;		/* XSTATE_BV: PKRU in the area */
	__asm__ volatile("xrstor64 %0" : : "m"(*(uint8_t (*)[16384])xbuf), "a"(1u << 9), "d"(0)
			 : "memory");
	ev(c, "xsave_size=%u pkru_offset=%u", size, off);
	r = guarded_read(c, (void *)c->v.secret, SECRET, "XRSTOR of an XSAVE area whose "
			 "PKRU is 0, then a read of the victim's secret");
	wrpkru(c->own);
	return r;
}

static int a_wrpkru_unpaired(struct ctx *c)
{
	int r;

	wrpkru(0);
	r = guarded_read(c, (void *)c->v.secret, SECRET, "unpaired: WRPKRU(0), then a read "
			 "of the victim's secret");
	wrpkru(c->own);
	return r;
}

static int a_gadget_scan(struct ctx *c)
{
	return result(c, "host", "the host scans every service's executable pages");
}

/* wrpkru; ret at an odd offset of an executable page of ours */
static int a_gadget_planted(struct ctx *c)
{
	static const uint8_t code[] = { 0x0f, 0x01, 0xef, 0xc3 };
	uint8_t *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint8_t *g;
	int r;

	if (page == MAP_FAILED)
		return result(c, "error", "mmap RWX: %s", strerror(errno));
	g = page + 0x123;
	memcpy(g, code, sizeof(code));
	snprintf(c->facts_extra, sizeof(c->facts_extra), "planted=%#lx", (unsigned long)g);
	ev(c, "planted=%#lx", (unsigned long)g);
	/* call it with eax = ecx = edx = 0 */
	__asm__ volatile("call *%0" : : "r"(g), "a"(0), "c"(0), "d"(0) : "memory");
	r = guarded_read(c, (void *)c->v.secret, SECRET, "the planted gadget (PKRU 0), then "
			 "a read of the victim's secret");
	wrpkru(c->own);
	return r;
}

/* ------------------------------------------------------------------ signals */

static uint32_t pkru_off;
static volatile uint32_t in_handler_pkru;
static volatile long in_handler_probe;
static volatile uint64_t in_handler_value;
static volatile int forged;
static const void *volatile probe_addr;

static void forge_handler(int sig, siginfo_t *si, void *ucv)
{
	ucontext_t *uc = ucv;
	uint8_t *fp = (uint8_t *)uc->uc_mcontext.fpregs;

	(void)sig;
	(void)si;
	/* sw_reserved (bytes 464..511) start with FP_XSTATE_MAGIC1 for an XSAVE frame */
	if (!fp || *(uint32_t *)(fp + 464) != 0x46505853u)
		return;
	*(uint32_t *)(fp + pkru_off) = 0;
	*(uint64_t *)(fp + 512) |= 1ull << 9;
	forged = 1;
}

static int a_sigreturn_forged_pkru(struct ctx *c)
{
	struct sigaction sa;
	uint32_t a, after;
	int r;

	cpuid2(0xd, 9, &a, &pkru_off);
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = forge_handler;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGUSR2, &sa, NULL);
	forged = 0;
	raise(SIGUSR2);
	after = rdpkru();
	signal(SIGUSR2, SIG_DFL);
	ev(c, "forged=%d pkru_after_sigreturn=%#x", forged, after);
	if (!forged)
		return result(c, "error", "the signal frame has no XSAVE area to forge");
	r = guarded_read(c, (void *)c->v.secret, SECRET, "a signal frame whose saved PKRU is "
			 "0, sigreturn, then a read of the victim's secret");
	wrpkru(c->own);
	return r;
}

static void probe_handler(int sig)
{
	uint64_t v = 0;

	(void)sig;
	in_handler_pkru = rdpkru();
	in_handler_probe = deputy_read64((const void *)probe_addr, &v);
	in_handler_value = v;
}

static int a_signal_holding_peer_key(struct ctx *c)
{
	uint32_t holding = c->own & ~(3u << (2 * c->v.svc.pkey));

	probe_addr = (const void *)c->v.secret;
	signal(SIGUSR2, probe_handler);
	wrpkru(holding);
	raise(SIGUSR2);
	wrpkru(c->own);
	signal(SIGUSR2, SIG_DFL);
	ev(c, "interrupted_pkru=%#x handler_pkru=%#x probe=%s", holding, in_handler_pkru,
	   errstr(in_handler_probe));
	return judged_by_value(c, in_handler_probe == 8, in_handler_value, SECRET,
			       "a handler entered while the thread holds the victim's key reads "
			       "the victim's secret through write(2)",
			       in_handler_probe == 8 ? "the handler's PKRU opens it" :
			       "refused");
}

static sigjmp_buf alt_env;
static volatile int alt_ran;

static void alt_usr2(int sig)
{
	(void)sig;
	alt_ran = 1;
}

static void alt_segv(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	in_handler_probe = si->si_code;
	siglongjmp(alt_env, 1);
}

static int a_sigaltstack_in_peer(struct ctx *c)
{
	struct sigaction sa;
	stack_t ss = { .ss_sp = (void *)c->v.target, .ss_size = TARGET_WORDS * 8 }, old;
	volatile int segv = 0;
	long r;

	r = sigaltstack(&ss, &old) ? -errno : 0;
	if (r)
		return result(c, "error", "sigaltstack in the victim's target area -> %s",
			      errstr(r));
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = alt_segv;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;	/* on our own stack */
	sigaction(SIGSEGV, &sa, NULL);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = alt_usr2;
	sa.sa_flags = SA_ONSTACK;
	sigaction(SIGUSR2, &sa, NULL);
	alt_ran = 0;
	in_handler_probe = 0;
	if (sigsetjmp(alt_env, 1) == 0)
		raise(SIGUSR2);
	else
		segv = 1;
	ss.ss_flags = SS_DISABLE;
	sigaltstack(&ss, NULL);
	signal(SIGUSR2, SIG_DFL);
	signal(SIGSEGV, SIG_DFL);
	ev(c, "handler_ran=%d sigsegv=%d si_code=%ld", alt_ran, segv, in_handler_probe);
	return judged_by_victim(c, alt_ran ? 0 : -EFAULT, alt_ran ?
				"a signal frame on an alternate stack in the victim's memory: the "
				"handler ran" : "a signal frame on an alternate stack in the "
				"victim's memory: not written (SIGSEGV)");
}

/* ------------------------------------------------------------------ deputies */

static int a_read_into_peer(struct ctx *c)
{
	uint64_t x = FORGED;
	int p[2];
	long r;

	if (pipe(p))
		return result(c, "error", "pipe: %s", strerror(errno));
	if (write(p[1], &x, 8) != 8)
		return result(c, "error", "write: %s", strerror(errno));
	r = read(p[0], (void *)c->v.target, 8);
	r = r < 0 ? -errno : r;
	close(p[0]);
	close(p[1]);
	return judged_by_victim(c, r, "read(pipe) into the victim's target");
}

static int a_write_from_peer(struct ctx *c)
{
	uint64_t v = 0;
	long r = deputy_read64((void *)c->v.secret, &v);

	ev(c, "ret=%s", errstr(r));
	return judged_by_value(c, r == 8, v, SECRET, "write(pipe) from the victim's secret",
			       r == 8 ? "copied" : errstr(r));
}

static int a_recv_into_peer(struct ctx *c)
{
	uint64_t x = FORGED;
	int sv[2];
	long r;

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		return result(c, "error", "socketpair: %s", strerror(errno));
	if (send(sv[0], &x, 8, 0) != 8)
		return result(c, "error", "send: %s", strerror(errno));
	r = recv(sv[1], (void *)c->v.target, 8, MSG_DONTWAIT);
	r = r < 0 ? -errno : r;
	close(sv[0]);
	close(sv[1]);
	return judged_by_victim(c, r, "recv(unix socket) into the victim's target");
}

static int a_send_from_peer(struct ctx *c)
{
	uint64_t v = 0;
	int sv[2];
	long r;

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		return result(c, "error", "socketpair: %s", strerror(errno));
	r = send(sv[0], (void *)c->v.secret, 8, MSG_DONTWAIT);
	r = r < 0 ? -errno : r;
	if (r == 8 && recv(sv[1], &v, 8, 0) != 8)
		r = -EIO;
	close(sv[0]);
	close(sv[1]);
	ev(c, "ret=%s", errstr(r));
	return judged_by_value(c, r == 8, v, SECRET, "send(unix socket) from the victim's "
			       "secret", r == 8 ? "copied" : errstr(r));
}

static int a_vmsplice_from_peer(struct ctx *c)
{
	struct iovec iov = { (void *)c->v.secret, 4096 };
	uint64_t v = 0;
	int p[2];
	long r;

	if (pipe(p))
		return result(c, "error", "pipe: %s", strerror(errno));
	r = vmsplice(p[1], &iov, 1, SPLICE_F_NONBLOCK);
	r = r < 0 ? -errno : r;
	if (r > 0 && read(p[0], &v, 8) != 8)
		r = -EIO;
	close(p[0]);
	close(p[1]);
	ev(c, "ret=%s", errstr(r));
	return judged_by_value(c, r > 0, v, SECRET, "vmsplice of the victim's secret page "
			       "into a pipe (get_user_pages)", r > 0 ? "spliced" : errstr(r));
}

static long mem_rw(const char *path, int write, uint64_t addr, uint64_t *v)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);
	long r;

	if (fd < 0)
		return -errno;
	r = write ? pwrite(fd, v, 8, (off_t)addr) : pread(fd, v, 8, (off_t)addr);
	r = r < 0 ? -errno : r;
	close(fd);
	return r;
}

static int a_proc_self_mem_read(struct ctx *c)
{
	uint64_t v = 0;
	long r = mem_rw("/proc/self/mem", 0, c->v.secret, &v);

	ev(c, "ret=%s", errstr(r));
	return judged_by_value(c, r == 8, v, SECRET, "pread(/proc/self/mem) at the victim's "
			       "secret", r == 8 ? "8 bytes" : errstr(r));
}

static int a_proc_self_mem_write(struct ctx *c)
{
	uint64_t v = FORGED;
	long r = mem_rw("/proc/self/mem", 1, c->v.target, &v);

	return judged_by_victim(c, r, "pwrite(/proc/self/mem) at the victim's target");
}

static int a_proc_peer_mem_read(struct ctx *c)
{
	char path[64];
	uint64_t v = 0;
	long r;

	snprintf(path, sizeof(path), "/proc/%llu/mem", (unsigned long long)c->v.svc.pid);
	r = mem_rw(path, 0, c->v.secret, &v);
	ev(c, "ret=%s", errstr(r));
	return judged_by_value(c, r == 8, v, SECRET, "pread(/proc/VICTIM/mem) at the secret",
			       r == 8 ? "8 bytes" : errstr(r));
}

static long ptrace_do(pid_t pid, int poke, uint64_t addr, uint64_t *v)
{
	long r = 0;
	int st;

	if (ptrace(PTRACE_ATTACH, pid, 0, 0))
		return -errno;
	if (waitpid(pid, &st, __WALL) != pid)
		r = -errno;
	if (!r) {
		errno = 0;
		if (poke)
			r = ptrace(PTRACE_POKEDATA, pid, (void *)addr, (void *)*v) ? -errno : 8;
		else {
			*v = (uint64_t)ptrace(PTRACE_PEEKDATA, pid, (void *)addr, 0);
			r = errno ? -errno : 8;
		}
	}
	ptrace(PTRACE_DETACH, pid, 0, 0);
	return r;
}

static int a_ptrace_peek(struct ctx *c)
{
	uint64_t v = 0;
	long r = ptrace_do((pid_t)c->v.svc.pid, 0, c->v.secret, &v);

	ev(c, "ret=%s", errstr(r));
	return judged_by_value(c, r == 8, v, SECRET, "PTRACE_PEEKDATA of the victim's secret",
			       r == 8 ? "peeked" : errstr(r));
}

static int a_ptrace_poke(struct ctx *c)
{
	uint64_t v = FORGED;
	long r = ptrace_do((pid_t)c->v.svc.pid, 1, c->v.target, &v);

	return judged_by_victim(c, r, "PTRACE_POKEDATA into the victim's target");
}

static int a_process_vm_readv(struct ctx *c)
{
	uint64_t v = 0;
	struct iovec l = { &v, 8 }, rv = { (void *)c->v.secret, 8 };
	long r = process_vm_readv((pid_t)c->v.svc.pid, &l, 1, &rv, 1, 0);

	r = r < 0 ? -errno : r;
	ev(c, "ret=%s", errstr(r));
	if (r == -ENOSYS)
		return result(c, "skip", "process_vm_readv: ENOSYS (CONFIG_CROSS_MEMORY_ATTACH "
			      "is off in this kernel)");
	return judged_by_value(c, r == 8, v, SECRET, "process_vm_readv of the victim's secret",
			       r == 8 ? "8 bytes" : errstr(r));
}

static int a_process_vm_writev(struct ctx *c)
{
	uint64_t v = FORGED;
	struct iovec l = { &v, 8 }, rv = { (void *)c->v.target, 8 };
	long r = process_vm_writev((pid_t)c->v.svc.pid, &l, 1, &rv, 1, 0);

	r = r < 0 ? -errno : r;
	if (r == -ENOSYS) {
		ev(c, "ret=ENOSYS");
		return result(c, "skip", "process_vm_writev: ENOSYS (CONFIG_CROSS_MEMORY_ATTACH "
			      "is off in this kernel)");
	}
	return judged_by_victim(c, r, "process_vm_writev into the victim's target");
}

static int a_o_direct_read(struct ctx *c)
{
	static uint8_t block[4096] __attribute__((aligned(4096)));
	int fd = open("/tmp/tb-security-odirect", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	long r;

	if (fd < 0)
		return result(c, "error", "create a file: %s", strerror(errno));
	memset(block, 0xab, sizeof(block));
	if (write(fd, block, sizeof(block)) != (ssize_t)sizeof(block))
		return result(c, "error", "write a file: %s", strerror(errno));
	close(fd);
	fd = open("/tmp/tb-security-odirect", O_RDONLY | O_DIRECT | O_CLOEXEC);
	unlink("/tmp/tb-security-odirect");
	if (fd < 0) {
		ev(c, "open=%s", rpal_errname(-errno));
		return result(c, "skip", "open(O_DIRECT) -> %s: no file system here does direct "
			      "I/O (tmpfs; the kernel has no block layer)", rpal_errname(-errno));
	}
	r = pread(fd, (void *)c->v.target, 4096, 0);
	r = r < 0 ? -errno : r;
	close(fd);
	return judged_by_victim(c, r, "O_DIRECT read into the victim's target");
}

static int a_io_uring_read(struct ctx *c)
{
	long r = syscall(425 /* __NR_io_uring_setup */, 4, NULL);

	r = r < 0 ? -errno : r;
	ev(c, "io_uring_setup=%s", errstr(r));
	if (r >= 0)
		close((int)r);
	if (r == -ENOSYS)
		return result(c, "skip", "io_uring_setup: ENOSYS (no io_uring in this kernel)");
	return result(c, "skip", "io_uring_setup -> %s: this probe does not drive a ring yet",
		      errstr(r));
}

static int a_slot_after_deputies(struct ctx *c)
{
	uint64_t v = 0, x = FORGED;
	long r1, r2, r3, r4, rel, mine, theirs = 0;

	r1 = mem_rw("/proc/self/mem", 0, c->v.secret, &v);	/* while paired */
	rel = rpal_release(c->fd, c->v.svc.key);
	victim_cmd(c, 'R', &theirs, sizeof(theirs));
	c->paired = 0;
	r2 = mem_rw("/proc/self/mem", 0, c->v.secret, &v);	/* released */
	r3 = mem_rw("/proc/self/mem", 1, c->v.target, &x);
	r4 = deputy_read64((void *)c->v.secret, &v);
	ev(c, "paired_read=%s release=%s,%s released_read=%s released_write=%s write2=%s",
	   errstr(r1), errstr(rel), errstr(theirs), errstr(r2), errstr(r3), errstr(r4));
	/* the host looks at our entry for the victim's slot now (checkpoint), then: */
	if (rel || theirs)
		return result(c, "error", "release -> %s / %s", errstr(rel), errstr(theirs));
	take_checkpoint(c);
	mine = rpal_request(c->fd, c->v.svc.key);
	victim_cmd(c, 'Q', &theirs, sizeof(theirs));
	ev(c, "rerequest=%s,%s", errstr(mine), errstr(theirs));
	c->paired = mine == 1 || theirs == 1;
	if (!c->paired)
		return result(c, "open", "after /proc/self/mem accesses at the released victim's "
			      "addresses, pairing again fails: ours -> %s, the victim's -> %s "
			      "(our page tables hold the victim's slot)", errstr(mine),
			      errstr(theirs));
	return result(c, "blocked", "/proc/self/mem at the released victim's addresses -> %s, "
		      "%s; paired again (%s / %s)", errstr(r2), errstr(r3), errstr(mine),
		      errstr(theirs));
}

/* ------------------------------------------------------------------ keys */

static int a_pkey_alloc_enabled(struct ctx *c)
{
	long r = syscall(SYS_pkey_alloc, 0, 0);

	r = r < 0 ? -errno : r;
	ev(c, "ret=%s", r < 0 ? errstr(r) : "key");
	if (r >= 0) {
		syscall(SYS_pkey_free, r);
		return result(c, "open", "pkey_alloc in an enabled service -> key %ld", r);
	}
	return result(c, "blocked", "pkey_alloc in an enabled service -> %s", errstr(r));
}

static int pkey_free_row(struct ctx *c, int key, const char *which)
{
	long r = syscall(SYS_pkey_free, key);

	r = r < 0 ? -errno : r;
	ev(c, "key=%d ret=%s", key, errstr(r));
	return result(c, r == 0 ? "open" : "blocked", "pkey_free(%d, %s) -> %s", key, which,
		      errstr(r));
}

static int a_pkey_free_own(struct ctx *c)
{
	return pkey_free_row(c, c->me.svc.pkey, "our own");
}

static int a_pkey_free_foreign(struct ctx *c)
{
	return pkey_free_row(c, c->v.svc.pkey, "the victim's");
}

static int a_pkey_free_zero(struct ctx *c)
{
	return pkey_free_row(c, 0, "key 0");
}

static uint64_t own_page[512] __attribute__((aligned(4096)));

static int pkey_mprotect_row(struct ctx *c, int key, const char *which)
{
	long r;

	own_page[0] = 1;
	r = syscall(SYS_pkey_mprotect, own_page, 4096, PROT_READ | PROT_WRITE, key);
	r = r < 0 ? -errno : r;
	ev(c, "key=%d ret=%s", key, errstr(r));
	if (r == 0)	/* give the page our key back (allowed once a bug let the first through) */
		syscall(SYS_pkey_mprotect, own_page, 4096, PROT_READ | PROT_WRITE,
			c->me.svc.pkey);
	return result(c, r == 0 ? "open" : "blocked", "pkey_mprotect(our page, %d = %s) -> %s",
		      key, which, errstr(r));
}

static int a_pkey_mprotect_own(struct ctx *c)
{
	return pkey_mprotect_row(c, c->me.svc.pkey, "our own key");
}

static int a_pkey_mprotect_foreign(struct ctx *c)
{
	return pkey_mprotect_row(c, c->v.svc.pkey, "the victim's key");
}

static int a_pkey_mprotect_zero(struct ctx *c)
{
	return pkey_mprotect_row(c, 0, "key 0");
}

static int a_same_pkey_request(struct ctx *c)
{
	long mine = rpal_request(c->fd, c->v.svc.key), theirs = 0;

	victim_cmd(c, 'Q', &theirs, sizeof(theirs));
	c->paired = mine == 1 || theirs == 1;
	ev(c, "our_pkey=%d victim_pkey=%d request=%s,%s", c->me.svc.pkey, c->v.svc.pkey,
	   errstr(mine), errstr(theirs));
	if (!c->paired)
		return result(c, "blocked", "both enabled with pkey %d: REQUEST -> %s / %s",
			      c->me.svc.pkey, errstr(mine), errstr(theirs));
	return guarded_read(c, (void *)c->v.secret, SECRET, "paired although both have the "
			    "same pkey: a read with our own default PKRU");
}

static pid_t spawn_w(struct ctx *c, int *rfd, int *wfd);

static int a_key_reuse(struct ctx *c)
{
	uint32_t holding = c->own & ~(3u << (2 * c->v.svc.pkey));
	static struct rpal_link w;	/* the attacker's link from now on */
	struct peer wp;
	long mine, theirs = 0;
	uint64_t dead[4];
	int r, n;
	pid_t pid;

	wrpkru(holding);	/* as in a call into the victim */
	victim_cmd(c, 'X', NULL, 0);
	rpal_link_wait_gone(c->l);
	c->victim_gone = 1;
	n = rpal_poll_dead(c->fd, 5000) == 1 ? rpal_read_dead(c->fd, dead, 4) : 0;
	c->v.svc.alive = 0;
	w = *c->l;
	pid = spawn_w(c, &w.rfd, &w.wfd);
	if (pid < 0) {
		wrpkru(c->own);
		return result(c, "error", "cannot start the second victim");
	}
	w.role = "attacker";
	c->l = &w;
	rpal_link_recv(&w, &wp, sizeof(wp));
	rpal_link_send(&w, &c->me, sizeof(c->me));
	mine = rpal_request(c->fd, wp.svc.key);
	rpal_link_send(&w, &mine, sizeof(mine));
	rpal_link_recv(&w, &theirs, sizeof(theirs));
	c->v = wp;
	c->victim_gone = 0;
	c->paired = mine == 1 || theirs == 1;
	ev(c, "dead_keys=%d new_victim_pkey=%d request=%s,%s", n, wp.svc.pkey, errstr(mine),
	   errstr(theirs));
	r = guarded_read(c, (void *)wp.secret, SECRET_W, "the victim died while we held its "
			 "key; a new service got the same pkey and paired with us: a read of its "
			 "secret with the PKRU we kept");
	wrpkru(c->own);
	return r;
}

/* ------------------------------------------------------------------ aliasing */

static int a_mremap_peer_range(struct ctx *c)
{
	void *dst = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct integ in;
	void *p;
	long r;

	if (dst == MAP_FAILED)
		return result(c, "error", "mmap: %s", strerror(errno));
	p = mremap((void *)c->v.secret, 4096, 4096, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
	r = p == MAP_FAILED ? -errno : 0;
	ev(c, "mremap=%s dst=%#lx", errstr(r), (unsigned long)dst);
	if (r)
		return judged_by_victim(c, r, "mremap of the victim's secret page into our slot");
	wrpkru(0);
	guarded_read(c, dst, SECRET, "mremap of the victim's secret page into our slot, then a "
		     "read there (PKRU 0)");
	wrpkru(c->own);
	in = integrity(c);
	ev(c, "bad_secret=%d", in.bad_secret);
	if (in.bad_secret)
		return result(c, "open", "mremap of the victim's secret page into our slot: the "
			      "victim lost it (%d words changed)", in.bad_secret);
	return 0;
}

static int a_mremap_into_peer(struct ctx *c)
{
	uint64_t *src = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			     -1, 0);
	void *p;
	long r;

	if (src == MAP_FAILED)
		return result(c, "error", "mmap: %s", strerror(errno));
	src[0] = FORGED;
	p = mremap(src, 4096, 4096, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)c->v.target);
	r = p == MAP_FAILED ? -errno : 0;
	return judged_by_victim(c, r, "mremap of a page of ours onto the victim's target");
}

static int a_map_fixed_over_peer(struct ctx *c)
{
	struct rpal_fault f = { 0 };
	void *p = mmap((void *)c->v.target, 4096, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	void *q = mmap((void *)(c->v.target + 4096), 4096, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_POPULATE, -1, 0);
	long r = p == MAP_FAILED ? -errno : 0, r2 = q == MAP_FAILED ? -errno : 0;
	int w = -1, w2 = -1;

	if (r == 0)
		w = rpal_try_write64((uint64_t *)c->v.target, FORGED, 3000, &f);
	if (r2 == 0)
		w2 = rpal_try_write64((uint64_t *)(c->v.target + 4096), FORGED, 3000, &f);
	ev(c, "map_fixed=%s map_fixed_populate=%s write=%d write2=%d last_fault=%s", errstr(r),
	   errstr(r2), w, w2, f.sig == SIGSEGV ? (f.code == SEGV_PKUERR ? "PKUERR" :
	   f.code == SEGV_ACCERR ? "ACCERR" : "MAPERR") : f.sig ? "other" : "none");
	return judged_by_victim(c, r, "MAP_FIXED (and MAP_FIXED|MAP_POPULATE) of our own "
				"memory over the victim's target, then writes there");
}

static int a_munmap_peer_range(struct ctx *c)
{
	long r = munmap((void *)c->v.secret, 4096) ? -errno : 0;
	long r2 = munmap((void *)c->v.target, TARGET_WORDS * 8) ? -errno : 0;

	ev(c, "munmap_secret=%s munmap_target=%s", errstr(r), errstr(r2));
	return judged_by_victim(c, r, "munmap of the victim's secret and target in our mm");
}

static int a_madvise_dontneed_peer(struct ctx *c)
{
	long r = madvise((void *)c->v.target, TARGET_WORDS * 8, MADV_DONTNEED) ? -errno : 0;

	return judged_by_victim(c, r, "madvise(DONTNEED) of the victim's target in our mm");
}

static int a_mprotect_peer_range(struct ctx *c)
{
	long r = mprotect((void *)c->v.secret, 4096, PROT_READ | PROT_WRITE) ? -errno : 0;
	int g;

	ev(c, "mprotect=%s", errstr(r));
	g = guarded_read(c, (void *)c->v.secret, SECRET, "mprotect(RW) of the victim's secret "
			 "range in our mm, then a read with our own PKRU");
	if (!strcmp(c->obs, "open"))
		return g;
	return judged_by_victim(c, r, "mprotect(RW) of the victim's secret range in our mm, "
				"then a read with our own PKRU: refused");
}

static int a_shared_memfd(struct ctx *c)
{
	struct { int32_t fd; uint64_t addr; } m = { -1, 0 };
	char path[64];
	uint64_t *p;
	int fd, r;

	victim_cmd(c, 'M', &m, sizeof(m));
	if (m.fd < 0)
		return result(c, "error", "the victim's memfd: %s", rpal_errname(m.fd));
	snprintf(path, sizeof(path), "/proc/%llu/fd/%d", (unsigned long long)c->v.svc.pid, m.fd);
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return judged_by_value(c, 0, 0, SECRET_M, "open of the victim's memfd through "
				       "/proc/VICTIM/fd", rpal_errname(-errno));
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	if (p == MAP_FAILED)
		return result(c, "error", "mmap of the victim's memfd: %s", strerror(errno));
	snprintf(c->facts_extra, sizeof(c->facts_extra), "alias=%#lx victim_alias=%#llx",
		 (unsigned long)p, (unsigned long long)m.addr);
	ev(c, "alias=%#lx victim_alias=%#llx", (unsigned long)p, (unsigned long long)m.addr);
	r = guarded_read(c, p, SECRET_M, "the victim's memfd (a page in its slot, with its "
			 "pkey) opened through /proc/VICTIM/fd and mapped in our slot: a read "
			 "with our own PKRU");
	return r;
}

static int a_fork_child_reads_peer(struct ctx *c)
{
	struct { long r; uint64_t v; } res = { -1, 0 };
	int p[2], st;
	pid_t pid;

	if (pipe(p))
		return result(c, "error", "pipe: %s", strerror(errno));
	pid = fork();
	if (pid == 0) {
		uint64_t v = 0;
		int q[2];
		long r;

		wrpkru(0);
		if (SYS3(SYS_pipe2, q, 0, 0))
			SYS3(SYS_exit_group, 2, 0, 0);
		r = SYS3(SYS_write, q[1], c->v.secret, 8);
		if (r == 8 && SYS3(SYS_read, q[0], &v, 8) != 8)
			r = -EIO;
		res.r = r;
		res.v = v;
		SYS3(SYS_write, p[1], &res, sizeof(res));
		SYS3(SYS_exit_group, 0, 0, 0);
	}
	close(p[1]);
	if (pid < 0 || read(p[0], &res, sizeof(res)) != sizeof(res))
		res.r = -ECHILD;
	close(p[0]);
	if (pid > 0)
		waitpid(pid, &st, 0);
	ev(c, "child_read=%s", errstr(res.r));
	return judged_by_value(c, res.r == 8, res.v, SECRET, "our fork child (PKRU 0) reads "
			       "the victim's secret through write(2)", res.r == 8 ? "copied" :
			       errstr(res.r));
}

static int a_fork_child_request(struct ctx *c)
{
	struct { long open, req; } res = { -1, -1 };
	int p[2], st;
	pid_t pid;

	if (pipe(p))
		return result(c, "error", "pipe: %s", strerror(errno));
	pid = fork();
	if (pid == 0) {
		int fd = rpal_open();

		res.open = fd < 0 ? fd : 0;
		res.req = fd < 0 ? fd : rpal_request(fd, c->v.svc.key);
		if (write(p[1], &res, sizeof(res)) < 0)
			_exit(1);
		_exit(0);
	}
	close(p[1]);
	if (pid < 0 || read(p[0], &res, sizeof(res)) != sizeof(res))
		res.req = -ECHILD;
	close(p[0]);
	if (pid > 0)
		waitpid(pid, &st, 0);
	ev(c, "child_request=%s", errstr(res.req));
	return result(c, res.req >= 0 ? "open" : "blocked", "our fork child opens /proc/rpal "
		      "and requests the victim -> %s", errstr(res.req));
}

static int a_exec_then_read(struct ctx *c)
{
	char rfd[16], wfd[16];
	char *argv[] = { "/proc/self/exe", "execd", rfd, wfd, (char *)c->row, NULL };

	snprintf(rfd, sizeof(rfd), "%d", c->l->rfd);
	snprintf(wfd, sizeof(wfd), "%d", c->l->wfd);
	fflush(stdout);
	execv("/proc/self/exe", argv);
	return result(c, "error", "exec: %s", strerror(errno));
}

/* the attacker again, after its exec: a new service, unpaired */
static int a_execd_read(struct ctx *c)
{
	int r;

	wrpkru(0);
	r = guarded_read(c, (void *)c->v.secret, SECRET, "after our exec (a new service; the "
			 "old one was paired): WRPKRU(0), then a read of the victim's secret");
	wrpkru(c->own);
	return r;
}

/* ------------------------------------------------------------------ windows */

struct tblock {
	int go_r, probe_w, res_w;
};

struct tres {
	long r;
	uint64_t pkru;
};

/* A thread created before ENABLE: it touches only its own stack (pkey 0, in slot 0)
 * and makes raw system calls (no errno, no stack protector: both live in TLS). */
__attribute__((no_stack_protector, noinline)) static int early_thread(void *arg)
{
	struct tblock *b = arg;
	uint64_t addr = 0;
	struct tres res;
	int go = b->go_r, pw = b->probe_w, rw = b->res_w;

	if (SYS3(SYS_read, go, &addr, 8) != 8)
		SYS3(SYS_exit, 1, 0, 0);
	res.pkru = rdpkru();
	res.r = SYS3(SYS_write, pw, addr, 8);
	SYS3(SYS_write, rw, &res, sizeof(res));
	SYS3(SYS_exit, 0, 0, 0);
	return 0;
}

static int t_go_w = -1, t_probe_r = -1, t_res_r = -1;
static pid_t t_tid;

static void pre_threads_before_enable(struct ctx *c)
{
	int go[2], pr[2], rs[2];
	char *stack = mmap((void *)T_STACK_ADDR, 65536, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	struct tblock *b;

	(void)c;
	if (stack == MAP_FAILED || pipe(go) || pipe(pr) || pipe(rs))
		return;
	b = (struct tblock *)stack;
	b->go_r = go[0];
	b->probe_w = pr[1];
	b->res_w = rs[1];
	t_go_w = go[1];
	t_probe_r = pr[0];
	t_res_r = rs[0];
	t_tid = clone(early_thread, stack + 65536 - 64, CLONE_VM | CLONE_FS | CLONE_FILES |
		      CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM, b);
}

static int a_threads_before_enable(struct ctx *c)
{
	struct tres res = { -1, 0 };
	uint64_t addr = c->v.secret, v = 0;

	if (t_tid <= 0)
		return result(c, "error", "the early thread could not be created");
	if (write(t_go_w, &addr, 8) != 8 || read(t_res_r, &res, sizeof(res)) != sizeof(res))
		return result(c, "error", "no answer from the early thread");
	if (res.r == 8 && read(t_probe_r, &v, 8) != 8)
		res.r = -EIO;
	char what[128];

	ev(c, "thread_pkru=%#llx thread_read=%s", (unsigned long long)res.pkru, errstr(res.r));
	snprintf(what, sizeof(what), "a thread created before ENABLE (PKRU now %#llx) reads the "
		 "victim's secret through write(2)", (unsigned long long)res.pkru);
	return judged_by_value(c, res.r == 8, v, SECRET, what,
			       res.r == 8 ? "copied" : errstr(res.r));
}

static uint32_t pkru_before_enable;

/* the host arms its watch of every WRPKRU in the kernel (gdbstub) at this checkpoint */
static void pre_enable_window(struct ctx *c)
{
	pkru_before_enable = rdpkru();
	rpal_checkpoint(c->l, "enable_window_arm", "row=enable_window phase=arm");
}

static int a_enable_window(struct ctx *c)
{
	ev(c, "pkru_before=%#x pkru_after=%#x", pkru_before_enable, rdpkru());
	return result(c, "host", "PKRU %#x before ENABLE, %#x after; the host watched every "
		      "PKRU write in between", pkru_before_enable, rdpkru());
}

/* ------------------------------------------------------------------ direct */

static int a_direct_read(struct ctx *c)
{
	return guarded_read(c, (void *)c->v.secret, SECRET, "a read of the victim's secret "
			    "with our own PKRU");
}

static int a_direct_write(struct ctx *c)
{
	struct rpal_fault f;
	int r = rpal_try_write64((uint64_t *)c->v.target, FORGED, 3000, &f);

	ev(c, "fault=%s code=%d pkey=%d", r ? "SIGSEGV" : "none", f.code, f.pkey);
	return judged_by_victim(c, r ? -EFAULT : 0, "a write to the victim's target with our "
				"own PKRU");
}

static int a_request_one_sided(struct ctx *c)
{
	long r = rpal_request(c->fd, c->v.svc.key);
	int g;

	ev(c, "request=%s", errstr(r));
	wrpkru(0);
	g = guarded_read(c, (void *)c->v.secret, SECRET, "only we requested the victim (it "
			 "did not request us): WRPKRU(0), then a read of its secret");
	wrpkru(c->own);
	return g;
}

static int a_release_then_read(struct ctx *c)
{
	long r = 0;
	int g;

	victim_cmd(c, 'R', &r, sizeof(r));
	c->paired = 0;
	ev(c, "victim_release=%s", errstr(r));
	wrpkru(0);
	g = guarded_read(c, (void *)c->v.secret, SECRET, "the victim released us: WRPKRU(0), "
			 "then a read of its secret");
	wrpkru(c->own);
	return g;
}

static int a_exit_then_read(struct ctx *c)
{
	struct rpal_fault f;
	uint64_t dead[4], v = 0;
	int n, r;

	victim_cmd(c, 'X', NULL, 0);
	rpal_link_wait_gone(c->l);
	c->victim_gone = 1;
	c->v.svc.alive = 0;
	c->paired = 0;
	n = rpal_poll_dead(c->fd, 5000) == 1 ? rpal_read_dead(c->fd, dead, 4) : 0;
	wrpkru(0);
	r = rpal_try_read64((void *)c->v.secret, &v, 3000, &f);
	wrpkru(c->own);
	ev(c, "dead_keys=%d fault=%s code=%d", n, r ? "SIGSEGV" : "none", f.code);
	if (r == 0)
		return result(c, "open", "the victim exited: a read at its secret's address with "
			      "PKRU 0 did not fault (value %#llx): its slot is still in our page "
			      "tables", (unsigned long long)v);
	return result(c, "blocked", "the victim exited: a read at its secret's address with "
		      "PKRU 0: %s", rpal_fault_str(&f));
}

/* ------------------------------------------------------------------ the rows */

struct row {
	const char *name;
	int pair;		/* paired before the attack */
	int same_pkey;		/* the attacker enables with the victim's pkey */
	int (*attack)(struct ctx *);
	void (*pre_enable)(struct ctx *);
};

/* ROW(name, paired, attack[, pre-enable]): tests/test_security_review.py reads these */
#define ROW(n, p, a) { #n, p, 0, a, NULL }
static const struct row rows[] = {
	ROW(wrpkru_gadget, 1, a_wrpkru_gadget),
	ROW(xrstor_gadget, 1, a_xrstor_gadget),
	ROW(wrpkru_unpaired, 0, a_wrpkru_unpaired),
	ROW(gadget_scan, 1, a_gadget_scan),
	ROW(gadget_planted, 1, a_gadget_planted),
	ROW(sigreturn_forged_pkru, 1, a_sigreturn_forged_pkru),
	ROW(signal_holding_peer_key, 1, a_signal_holding_peer_key),
	ROW(sigaltstack_in_peer, 1, a_sigaltstack_in_peer),
	ROW(read_into_peer, 1, a_read_into_peer),
	ROW(write_from_peer, 1, a_write_from_peer),
	ROW(recv_into_peer, 1, a_recv_into_peer),
	ROW(send_from_peer, 1, a_send_from_peer),
	ROW(vmsplice_from_peer, 1, a_vmsplice_from_peer),
	ROW(proc_self_mem_read, 1, a_proc_self_mem_read),
	ROW(proc_self_mem_write, 1, a_proc_self_mem_write),
	ROW(proc_peer_mem_read, 1, a_proc_peer_mem_read),
	ROW(ptrace_peek, 1, a_ptrace_peek),
	ROW(ptrace_poke, 1, a_ptrace_poke),
	ROW(process_vm_readv, 1, a_process_vm_readv),
	ROW(process_vm_writev, 1, a_process_vm_writev),
	ROW(o_direct_read, 1, a_o_direct_read),
	ROW(io_uring_read, 1, a_io_uring_read),
	ROW(slot_after_deputies, 1, a_slot_after_deputies),
	ROW(pkey_alloc_enabled, 0, a_pkey_alloc_enabled),
	ROW(pkey_free_own, 0, a_pkey_free_own),
	ROW(pkey_free_foreign, 0, a_pkey_free_foreign),
	ROW(pkey_free_zero, 0, a_pkey_free_zero),
	ROW(pkey_mprotect_own, 0, a_pkey_mprotect_own),
	ROW(pkey_mprotect_foreign, 0, a_pkey_mprotect_foreign),
	ROW(pkey_mprotect_zero, 0, a_pkey_mprotect_zero),
	{ "same_pkey_request", 0, 1, a_same_pkey_request, NULL },
	ROW(key_reuse, 1, a_key_reuse),
	ROW(mremap_peer_range, 1, a_mremap_peer_range),
	ROW(mremap_into_peer, 1, a_mremap_into_peer),
	ROW(map_fixed_over_peer, 1, a_map_fixed_over_peer),
	ROW(munmap_peer_range, 1, a_munmap_peer_range),
	ROW(madvise_dontneed_peer, 1, a_madvise_dontneed_peer),
	ROW(mprotect_peer_range, 1, a_mprotect_peer_range),
	ROW(shared_memfd, 1, a_shared_memfd),
	ROW(fork_child_reads_peer, 1, a_fork_child_reads_peer),
	ROW(fork_child_request, 1, a_fork_child_request),
	ROW(exec_then_read, 1, a_exec_then_read),
	{ "threads_before_enable", 1, 0, a_threads_before_enable, pre_threads_before_enable },
	{ "enable_window", 0, 0, a_enable_window, pre_enable_window },
	ROW(direct_read, 1, a_direct_read),
	ROW(direct_write, 1, a_direct_write),
	ROW(request_one_sided, 0, a_request_one_sided),
	ROW(release_then_read, 1, a_release_then_read),
	ROW(exit_then_read, 1, a_exit_then_read),
};
#define NROWS ((int)(sizeof(rows) / sizeof(rows[0])))

static const struct row *find_row(const char *name)
{
	int i;

	for (i = 0; i < NROWS; i++)
		if (!strcmp(rows[i].name, name))
			return &rows[i];
	return NULL;
}

/* ------------------------------------------------------------------ victim */

static void fill(uint64_t secret)
{
	int i;

	for (i = 0; i < 512; i++)
		secret_page[i] = secret;
	for (i = 0; i < TARGET_WORDS; i++)
		target_pages[i] = TARGET(i);
}

static struct integ check_mine(uint64_t secret)
{
	struct integ in = { 0 };
	int i;

	for (i = 0; i < 512; i++)
		if (secret_page[i] != secret && !in.bad_secret++ && !in.bad_target)
			in.first_bad = secret_page[i];
	for (i = 0; i < TARGET_WORDS; i++)
		if (target_pages[i] != TARGET(i) && !in.bad_target++ && !in.bad_secret)
			in.first_bad = target_pages[i];
	return in;
}

/* The victim (and key_reuse's second victim, @pkey given, @secret its own). */
static int victim(struct rpal_link *l, const struct row *row, int pkey, uint64_t secret)
{
	struct peer me = { 0 }, a;
	int fd = rpal_open(), mfd = -1;
	long mine, theirs;
	char cmd;

	if (rpal_svc_enable(l, fd, pkey, &me.svc))
		return 1;
	fill(secret);
	me.secret = (uintptr_t)secret_page;
	me.target = (uintptr_t)target_pages;
	rpal_link_send(l, &me, sizeof(me));
	rpal_link_recv(l, &a, sizeof(a));
	if (row->pair) {
		mine = rpal_request(fd, a.svc.key);
		rpal_link_send(l, &mine, sizeof(mine));
		rpal_link_recv(l, &theirs, sizeof(theirs));
	}
	for (;;) {
		rpal_link_recv(l, &cmd, 1);
		switch (cmd) {
		case 'I': {
			struct integ in = check_mine(secret);

			rpal_link_send(l, &in, sizeof(in));
			break;
		}
		case 'R':
			mine = rpal_release(fd, a.svc.key);
			rpal_link_send(l, &mine, sizeof(mine));
			break;
		case 'Q':
			mine = rpal_request(fd, a.svc.key);
			rpal_link_send(l, &mine, sizeof(mine));
			break;
		case 'S':
			rpal_link_send(l, &me, sizeof(me));
			rpal_link_recv(l, &a, sizeof(a));
			break;
		case 'M': {
			struct { int32_t fd; uint64_t addr; } m = { -1, 0 };
			uint64_t *p = MAP_FAILED;

			mfd = memfd_create("tb-security-secret", 0);
			if (mfd >= 0 && ftruncate(mfd, 4096) == 0)
				p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
			if (p != MAP_FAILED) {
				p[0] = SECRET_M;
				m.fd = mfd;
				m.addr = (uintptr_t)p;
			} else {
				m.fd = -errno;
			}
			rpal_link_send(l, &m, sizeof(m));
			break;
		}
		case 'X':
			_exit(0);	/* the attacker waits for our end of the link to close */
		case 'Z':
			return 0;
		default:
			printf("%s: FAIL protocol: command %#x\n", l->role, cmd);
			return 1;
		}
	}
}

/* ------------------------------------------------------------------ attacker */

static void take_checkpoint(struct ctx *c)
{
	char facts[1024];
	int n;

	rpal_svc_facts(facts, sizeof(facts), "victim", &c->v.svc, "attacker", &c->me.svc,
		       c->paired);
	n = strlen(facts);
	snprintf(facts + n, sizeof(facts) - n, " row=%s secret=%#llx target=%#llx%s%s",
		 c->row, (unsigned long long)c->v.secret, (unsigned long long)c->v.target,
		 c->facts_extra[0] ? " " : "", c->facts_extra);
	rpal_checkpoint(c->l, c->row, facts);
}

static int attacker(struct rpal_link *l, const struct row *row, int execd)
{
	struct ctx c;
	long mine, theirs;

	memset(&c, 0, sizeof(c));
	c.l = l;
	c.row = row->name;
	c.obs = "error";
	if (row->pre_enable && !execd)
		row->pre_enable(&c);
	c.fd = rpal_open();
	if (execd) {	/* the victim's facts again, from the victim */
		char cmd = 'S';

		rpal_link_send(l, &cmd, 1);
		rpal_link_recv(l, &c.v, sizeof(c.v));
	} else {
		rpal_link_recv(l, &c.v, sizeof(c.v));
	}
	if (rpal_svc_enable(l, c.fd, row->same_pkey ? c.v.svc.pkey : ATTACKER_PKEY, &c.me.svc)) {
		printf("ROW %s error | the attacker could not enable\n", row->name);
		return 1;
	}
	c.own = rpal_pkru_for(c.me.svc.pkey);
	rpal_link_send(l, &c.me, sizeof(c.me));
	if (row->pair && !execd) {
		mine = rpal_request(c.fd, c.v.svc.key);
		rpal_link_send(l, &mine, sizeof(mine));
		rpal_link_recv(l, &theirs, sizeof(theirs));
		c.paired = mine == 1 || theirs == 1;
		if (!c.paired) {
			printf("ROW %s error request=%s,%s | could not pair\n", row->name,
			       errstr(mine), errstr(theirs));
			return 1;
		}
	}
	if (execd)
		a_execd_read(&c);
	else
		row->attack(&c);
	if (row->attack != a_slot_after_deputies)
		take_checkpoint(&c);
	printf("ROW %s %s %s | %s\n", row->name, c.obs, c.ev, c.msg);
	fflush(stdout);
	if (!c.victim_gone) {
		char cmd = 'Z';

		rpal_link_send(c.l, &cmd, 1);
	}
	return 0;
}

static pid_t spawn_w(struct ctx *c, int *rfd, int *wfd)
{
	int ab[2], ba[2];
	char r[16], w[16], pk[16];
	char *argv[] = { "/proc/self/exe", "w", r, w, (char *)c->row, pk, NULL };
	pid_t pid;

	if (pipe(ab) || pipe(ba))
		return -1;
	snprintf(r, sizeof(r), "%d", ab[0]);
	snprintf(w, sizeof(w), "%d", ba[1]);
	snprintf(pk, sizeof(pk), "%d", c->v.svc.pkey);
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		close(ab[1]);
		close(ba[0]);
		execv("/proc/self/exe", argv);
		_exit(127);
	}
	close(ab[0]);
	close(ba[1]);
	*rfd = ba[0];
	*wfd = ab[1];
	return pid;
}

int main(int argc, char **argv)
{
	const struct row *row;
	int i, bad = 0;

	if (argc >= 5 && (!strcmp(argv[1], "victim") || !strcmp(argv[1], "attacker") ||
			  !strcmp(argv[1], "execd") || !strcmp(argv[1], "w"))) {
		struct rpal_link l;

		/* ROLE RFD WFD ROW [PKEY]: as rpal_run_pair() starts the roles */
		row = find_row(argv[4]);
		if (!row)
			return 2;
		rpal_link_init(&l, !strcmp(argv[1], "execd") ? "attacker" : argv[1],
			       atoi(argv[2]), atoi(argv[3]));
		if (!strcmp(argv[1], "victim"))
			return victim(&l, row, VICTIM_PKEY, SECRET);
		if (!strcmp(argv[1], "w")) {
			struct row paired = *row;

			paired.pair = 1;
			return victim(&l, &paired, argc > 5 ? atoi(argv[5]) : VICTIM_PKEY,
				      SECRET_W);
		}
		if (!strcmp(argv[1], "execd"))
			return attacker(&l, &(struct row){ row->name, 0, 0, a_execd_read, NULL },
					1);
		return attacker(&l, row, 0);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 2 && !strcmp(argv[1], "--list")) {
		for (i = 0; i < NROWS; i++)
			printf("%s\n", rows[i].name);
		return 0;
	}
	for (i = 1; i < argc; i++)
		if (!find_row(argv[i])) {
			fprintf(stderr, "%s: no row %s (--list)\n", argv[0], argv[i]);
			return 2;
		}
	for (i = 0; i < (argc > 1 ? argc - 1 : NROWS); i++) {
		const char *name = argc > 1 ? argv[i + 1] : rows[i].name;
		char *extra[] = { (char *)name };

		printf("rpal_security: row %s\n", name);
		if (rpal_run_pair("victim", "attacker", 1, extra)) {
			printf("rpal_security: row %s: the pair did not end cleanly\n", name);
			bad = 1;
		}
	}
	printf("rpal_security: %s\n", bad ? "some pairs did not end cleanly" : "done");
	return bad;
}
