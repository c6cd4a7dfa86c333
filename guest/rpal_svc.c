/*
 * tb-rpal_svc: one RPAL service under the control of tb-rpal_agent.
 * TESTBED_RPAL_SERVICE (the build stamps this binary: every exec registers a service)
 *
 *   tb-rpal_svc --fd N --seq S [--cpu C]
 *
 * Reads commands of guest/AGENT-PROTOCOL.md ("<seq> <op> key=value ...") from fd N
 * (a socketpair to the agent), one at a time, and writes one answer line per command.
 * Its first line is the answer to the spawn/exec with seq S: "S ok pid= id= key= pkey=".
 * Accesses that may fault (peer reads and writes, touch, the spinner, a fork child's
 * reads) are guarded: SIGSEGV/SIGBUS come back as "fault sig= code= addr= pkey=".
 */
#define _GNU_SOURCE
#include "agent_proto.h"
#include "rpal.h"
#include "tb_checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#ifndef MADV_COLD
#define MADV_COLD 20
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

#define MAX_THREADS 32
#define MAX_CHILDREN 16
#define ACCESS_TIMEOUT_MS 2000

static int ctl_fd = -1;		/* to the agent */
static int rpal_fd = -1;
static int my_cpu;
static uint64_t my_id, my_key, my_pkey;
static int enabled;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

/* OSPKE (CPUID.7.0:ECX[4]): without it RDPKRU/WRPKRU are #UD; PKRU then reads 0 */
static int has_pku;

static void detect_pku(void)
{
	unsigned int a = 7, b, c = 0, d;

	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	has_pku = (c >> 4) & 1;
}

static inline uint32_t pk_read(void)
{
	return has_pku ? rdpkru() : 0;
}

static inline void pk_write(uint32_t v)
{
	if (has_pku)
		wrpkru(v);
}

static pid_t gettid_(void)
{
	return (pid_t)syscall(SYS_gettid);
}

static void send_line(struct ap_ans *a)
{
	size_t n = ap_end(a);

	pthread_mutex_lock(&out_lock);
	if (ap_write_all(ctl_fd, a->buf, n) < 0)
		_exit(3);	/* the agent is gone */
	pthread_mutex_unlock(&out_lock);
}

/* ---- guarded accesses (per thread) ---- */

struct fault {
	int sig, code, pkey;
	uint64_t addr;
};

static __thread sigjmp_buf g_env;
static __thread volatile sig_atomic_t g_armed;
static __thread struct fault g_fault;

static void fault_handler(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (!g_armed) {
		signal(sig, SIG_DFL);
		raise(sig);
		return;
	}
	g_armed = 0;
	g_fault.sig = sig;
	g_fault.code = si->si_code;
	g_fault.addr = (uint64_t)(uintptr_t)si->si_addr;
	g_fault.pkey = (sig == SIGSEGV && si->si_code == SEGV_PKUERR) ? (int)si->si_pkey : -1;
	siglongjmp(g_env, 1);
}

static void timer_ms(int ms)
{
	struct itimerval it = { { 0, 0 }, { ms / 1000, (ms % 1000) * 1000 } };

	setitimer(ITIMER_REAL, &it, NULL);
}

/* WRPKRU, one access, WRPKRU back, with nothing on the stack in between. */
static inline uint64_t access_pkru(volatile uint64_t *p, uint32_t pkru, int write, uint64_t v)
{
	uint32_t old = pk_read();
	uint64_t out = v;

	if (!has_pku) {
		if (write)
			*p = v;
		else
			out = *p;
		return out;
	}
	if (write)
		__asm__ volatile("xor %%ecx,%%ecx\n\txor %%edx,%%edx\n\tmov %[pk],%%eax\n\t"
				 ".byte 0x0f,0x01,0xef\n\tmovq %[v],(%[p])\n\t"
				 "mov %[old],%%eax\n\t.byte 0x0f,0x01,0xef"
				 : : [p] "r"(p), [v] "r"(v), [pk] "r"(pkru), [old] "r"(old)
				 : "rax", "rcx", "rdx", "memory");
	else
		__asm__ volatile("xor %%ecx,%%ecx\n\txor %%edx,%%edx\n\tmov %[pk],%%eax\n\t"
				 ".byte 0x0f,0x01,0xef\n\tmovq (%[p]),%[out]\n\t"
				 "mov %[old],%%eax\n\t.byte 0x0f,0x01,0xef"
				 : [out] "=&r"(out) : [p] "r"(p), [pk] "r"(pkru), [old] "r"(old)
				 : "rax", "rcx", "rdx", "memory");
	return out;
}

/*
 * One guarded u64 access (main thread or a fork child: SIGALRM bounds it).
 * Returns 0 done, -1 faulted (*f filled). PKRU is what it was before, either way.
 */
static int guarded(volatile uint64_t *p, int write, uint64_t v0, uint64_t *out,
		   int use_pkru, uint32_t pkru, struct fault *f)
{
	volatile uint32_t saved = pk_read();
	volatile uint64_t v = v0;

	memset(&g_fault, 0, sizeof(g_fault));
	if (sigsetjmp(g_env, 1)) {
		timer_ms(0);
		pk_write(saved);
		*f = g_fault;
		return -1;
	}
	timer_ms(ACCESS_TIMEOUT_MS);
	g_armed = 1;
	if (use_pkru)
		v = access_pkru(p, pkru, write, v);
	else if (write)
		*p = v;
	else
		v = *p;
	g_armed = 0;
	timer_ms(0);
	*out = v;
	return 0;
}

/* Fill [p, p + n words) with v under one guard (no system call per word). */
static int guarded_fill(volatile uint64_t *p, uint64_t n, uint64_t v, struct fault *f)
{
	volatile uint64_t i;
	volatile uint32_t saved = pk_read();

	memset(&g_fault, 0, sizeof(g_fault));
	if (sigsetjmp(g_env, 1)) {
		timer_ms(0);
		/* siglongjmp skips sigreturn: the handler's PKRU (the signal-delivery
		 * default) would stay; put the thread's own back */
		pk_write(saved);
		*f = g_fault;
		return -1;
	}
	timer_ms(ACCESS_TIMEOUT_MS + (int)(n >> 10));	/* ~1 ms per 8 KiB under TCG */
	g_armed = 1;
	for (i = 0; i < n; i++)
		p[i] = v;
	g_armed = 0;
	timer_ms(0);
	return 0;
}

static void ans_fault(struct ap_ans *a, uint64_t seq, const struct fault *f)
{
	ap_begin(a, seq, "fault");
	ap_add(a, "sig=%d code=%d addr=0x%llx pkey=%d pkru=0x%x", f->sig,
	       f->sig == SIGALRM ? 0 : f->code, (unsigned long long)f->addr, f->pkey, pk_read());
}

/* ---- threads ---- */

struct thr {
	pthread_t th;
	pid_t tid;
	int cmd[2], rep[2];
};
static struct thr threads[MAX_THREADS];
static int nthreads;

static void block_for_helpers(sigset_t *old)
{
	sigset_t s;

	sigemptyset(&s);
	sigaddset(&s, SIGALRM);
	pthread_sigmask(SIG_BLOCK, &s, old);	/* new threads inherit: only main gets SIGALRM */
}

static void *idle_thread(void *arg)
{
	struct thr *t = arg;
	char c;

	t->tid = gettid_();
	for (;;) {
		ssize_t n = read(t->cmd[0], &c, 1);

		if (n <= 0) {
			if (n < 0 && errno == EINTR)
				continue;
			return NULL;
		}
		if (c == 'p') {
			uint32_t pk = pk_read();

			if (write(t->rep[1], &pk, sizeof(pk)) != sizeof(pk))
				return NULL;
		}
	}
}

static struct thr *find_thread(pid_t tid)
{
	int i;

	for (i = 0; i < nthreads; i++)
		if (threads[i].tid == tid)
			return &threads[i];
	return NULL;
}

/* ---- signal op ---- */

static volatile sig_atomic_t sig_done;
static volatile uint32_t sig_pkru;
static volatile pid_t sig_tid;
static volatile int sig_ckpt_rc;
static char sig_ckpt[64];
static char svc_name[40] = "?";

static void usr1_handler(int sig)
{
	(void)sig;
	sig_pkru = pk_read();
	sig_tid = gettid_();
	sig_ckpt_rc = 0;
	if (sig_ckpt[0]) {
		char facts[160];

		snprintf(facts, sizeof(facts), "svc=%s tid=%d pkru=0x%x", svc_name, (int)sig_tid,
			 (unsigned)sig_pkru);
		sig_ckpt_rc = tb_checkpoint_facts(sig_ckpt, facts) == 0 ? 1 : -1;
	}
	sig_done = 1;
}

/* ---- spinner ---- */

struct spinner {
	pthread_t th;
	int running;		/* a thread exists (joined or not) */
	volatile uint64_t *addr;
	int mode_write, use_pkru, cpu;
	uint32_t pkru;
	uint64_t value;
	volatile int stop, started, done, armed, faulted;
	volatile uint64_t reads, after, stale, changed, last, old, first, early;
	volatile pid_t tid;
	struct fault f;
};
static struct spinner spin;

static void *spin_thread(void *arg)
{
	struct spinner *s = arg;
	uint64_t n = 0, after = 0, stale = 0, changed = 0, v = 0;
	cpu_set_t set;
	sigset_t blk;

	sigemptyset(&blk);
	sigaddset(&blk, SIGALRM);
	sigaddset(&blk, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &blk, NULL);
	CPU_ZERO(&set);
	CPU_SET(s->cpu, &set);
	sched_setaffinity(0, sizeof(set), &set);
	s->tid = gettid_();
	{
		/* the PKRU this thread starts with, said before its first access: if that
		 * faults and the fault cannot be delivered, the service dies with it */
		struct ap_ans a;

		ap_event(&a, "spinstart");
		ap_add(&a, "svc=%s tid=%d pkru=0x%x", svc_name, (int)s->tid, pk_read());
		send_line(&a);
	}
	if (sigsetjmp(g_env, 0)) {
		s->f = g_fault;
		s->faulted = 1;
		__atomic_store_n(&s->done, 1, __ATOMIC_SEQ_CST);
		s->started = 1;
		{
			struct ap_ans a;

			ap_event(&a, "spinfault");
			ap_add(&a, "svc=%s tid=%d sig=%d code=%d pkey=%d addr=0x%llx reads=%llu after=%llu",
			       svc_name, (int)s->tid, s->f.sig, s->f.code, s->f.pkey,
			       (unsigned long long)s->f.addr, (unsigned long long)s->reads,
			       (unsigned long long)s->after);
			send_line(&a);
		}
		return NULL;
	}
	g_armed = 1;
	if (s->use_pkru)
		pk_write(s->pkru);
	/* from here: no system call, no WRPKRU until stop */
	while (!__atomic_load_n(&s->stop, __ATOMIC_RELAXED)) {
		int armed = __atomic_load_n(&s->armed, __ATOMIC_ACQUIRE);

		if (s->mode_write) {
			*s->addr = s->value + n;
			v = s->value + n;
		} else {
			v = *s->addr;
		}
		n++;
		if (n == 1)
			s->first = v;
		if (armed) {
			after++;
			if (v == s->old)
				stale++;
			else
				changed++;
			s->after = after;
			s->stale = stale;
			s->changed = changed;
		}
		else if (v != s->first && !s->mode_write)
			s->early++;	/* before arm, not what it read first */
		s->last = v;
		s->reads = n;
		s->started = 1;
	}
	g_armed = 0;
	__atomic_store_n(&s->done, 1, __ATOMIC_SEQ_CST);
	return NULL;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* ---- fork children ---- */

struct child {
	pid_t pid;
	int fd;
};
static struct child children[MAX_CHILDREN];
static int nchildren;

struct child_req {
	char op;		/* r w x */
	int use_pkru;
	uint32_t pkru;
	uint64_t addr, value;
};
struct child_rep {
	int faulted;
	uint64_t value;
	struct fault f;
	uint32_t pkru;
};

static void child_loop(int fd)
{
	struct child_req q;
	struct child_rep r;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	for (;;) {
		ssize_t n = read(fd, &q, sizeof(q));

		if (n != sizeof(q) || q.op == 'x')
			_exit(0);
		memset(&r, 0, sizeof(r));
		r.faulted = guarded((volatile uint64_t *)(uintptr_t)q.addr, q.op == 'w', q.value,
				    &r.value, q.use_pkru, q.pkru, &r.f) != 0;
		r.pkru = pk_read();
		if (write(fd, &r, sizeof(r)) != sizeof(r))
			_exit(0);
	}
}

static struct child *find_child(pid_t pid)
{
	int i;

	for (i = 0; i < nchildren; i++)
		if (children[i].pid == pid)
			return &children[i];
	return NULL;
}

static void drop_child(struct child *c)
{
	close(c->fd);
	*c = children[--nchildren];
}

/* ---- helpers ---- */

static int parse_prot(const char *s, int *prot)
{
	int p = 0;

	if (!s)
		return -1;
	if (!strcmp(s, "none")) {
		*prot = PROT_NONE;
		return 0;
	}
	for (; *s; s++) {
		if (*s == 'r')
			p |= PROT_READ;
		else if (*s == 'w')
			p |= PROT_WRITE;
		else if (*s == 'x')
			p |= PROT_EXEC;
		else
			return -1;
	}
	*prot = p;
	return 0;
}

static int read_ids(void)
{
	if (ioctl(rpal_fd, RPAL_IOCTL_GET_SERVICE_ID, &my_id) < 0)
		return -errno;
	if (ioctl(rpal_fd, RPAL_IOCTL_GET_SERVICE_KEY, &my_key) < 0)
		return -errno;
	if (ioctl(rpal_fd, RPAL_IOCTL_GET_SERVICE_PKEY, &my_pkey) < 0)
		return -errno;
	return 0;
}

static void list_tids(struct ap_ans *a)
{
	char buf[600];
	size_t n = 0;
	int i;

	n += (size_t)snprintf(buf + n, sizeof(buf) - n, "tids=%d", (int)getpid());
	for (i = 0; i < nthreads && n < sizeof(buf) - 16; i++)
		n += (size_t)snprintf(buf + n, sizeof(buf) - n, ",%d", (int)threads[i].tid);
	if (spin.running && !spin.done && n < sizeof(buf) - 16)
		n += (size_t)snprintf(buf + n, sizeof(buf) - n, ",%d", (int)spin.tid);
	ap_add(a, "%s", buf);
	n = 0;
	n += (size_t)snprintf(buf + n, sizeof(buf) - n, "children=");
	if (!nchildren)
		snprintf(buf + n, sizeof(buf) - n, "none");
	for (i = 0; i < nchildren && n < sizeof(buf) - 16; i++)
		n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s%d", i ? "," : "",
				      (int)children[i].pid);
	ap_add(a, "%s", buf);
}

#define NEED(expr, what) do { if ((expr) < 0) { ap_bad(a, seq, what); return; } } while (0)
#define REQ(expr, what) do { if ((expr) != 1) { ap_bad(a, seq, what); return; } } while (0)

static void do_exec(uint64_t seq, struct ap_ans *a)
{
	char fdb[16], seqb[24], cpub[16];
	char *argv[] = { "tb-rpal_svc", "--fd", fdb, "--seq", seqb, "--cpu", cpub,
			 "--name", svc_name, NULL };

	snprintf(fdb, sizeof(fdb), "%d", ctl_fd);
	snprintf(seqb, sizeof(seqb), "%llu", (unsigned long long)seq);
	snprintf(cpub, sizeof(cpub), "%d", my_cpu);
	execv("/proc/self/exe", argv);
	ap_err(a, seq, errno);
}

/* ---- one command ---- */

static void handle(const struct ap_cmd *c, struct ap_ans *a)
{
	uint64_t seq = c->seq, addr, len, v;
	int64_t iv;
	const char *op = c->op;
	int prot, r;

	if (!strcmp(op, "enable")) {
		struct rpal_enable_arg ea;

		NEED(ap_i64(c, "pkey", -1, &iv), "arg");
		ea.pkey = (int32_t)iv;
		ea.flags = 0;
		if (iv < INT32_MIN || iv > INT32_MAX) {
			ap_bad(a, seq, "arg");
			return;
		}
		if (ioctl(rpal_fd, RPAL_IOCTL_ENABLE_SERVICE, &ea) < 0) {
			ap_err(a, seq, errno);
			return;
		}
		enabled = 1;
		my_pkey = (uint64_t)ea.pkey;
		ap_begin(a, seq, "ok");
		ap_add(a, "pkey=%d pkru=0x%x", ea.pkey, pk_read());
	} else if (!strcmp(op, "request") || !strcmp(op, "release")) {
		REQ(ap_u64(c, "key", 0, &v), "arg");
		r = ioctl(rpal_fd, op[2] == 'q' ? RPAL_IOCTL_REQUEST_SERVICE :
			  RPAL_IOCTL_RELEASE_SERVICE, &v);
		if (r < 0) {
			ap_err(a, seq, errno);
			return;
		}
		ap_begin(a, seq, "ok");
		if (op[2] == 'q')
			ap_add(a, "ret=%d", r);
	} else if (!strcmp(op, "ioctl")) {
		uint64_t nr, raw, arg;
		unsigned long cmd;

		NEED(ap_u64(c, "cmd", 0, &nr), "arg");
		NEED(ap_u64(c, "raw", 0, &raw), "arg");
		NEED(ap_u64(c, "arg", 0, &arg), "arg");
		if (nr > 255) {
			ap_bad(a, seq, "arg");
			return;
		}
		cmd = ap_get(c, "raw") ? (unsigned long)raw :
		      (unsigned long)_IOWR(RPAL_IOCTL_MAGIC, nr, uint64_t);
		r = ioctl(rpal_fd, cmd, &arg);
		if (r < 0) {
			ap_err(a, seq, errno);
			return;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "ret=%d out=0x%llx", r, (unsigned long long)arg);
	} else if (!strcmp(op, "state")) {
		if (rpal_fd >= 0 && (r = read_ids()) < 0) {
			ap_err(a, seq, -r);
			return;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "pid=%d id=%llu key=%llu pkey=%llu enabled=%d pkru=0x%x", (int)getpid(),
		       (unsigned long long)my_id, (unsigned long long)my_key,
		       (unsigned long long)my_pkey, enabled, pk_read());
		list_tids(a);
	} else if (!strcmp(op, "pin")) {
		cpu_set_t set;

		NEED(ap_u64(c, "cpu", 0, &v), "arg");
		if (v >= CPU_SETSIZE) {
			ap_bad(a, seq, "arg");
			return;
		}
		CPU_ZERO(&set);
		CPU_SET((int)v, &set);
		if (sched_setaffinity(0, sizeof(set), &set) < 0) {
			ap_err(a, seq, errno);
			return;
		}
		my_cpu = (int)v;
		ap_begin(a, seq, "ok");
	} else if (!strcmp(op, "thread")) {
		struct thr *t;
		sigset_t old;
		int i;

		if (nthreads == MAX_THREADS) {
			ap_bad(a, seq, "limit");
			return;
		}
		t = &threads[nthreads];
		memset(t, 0, sizeof(*t));
		if (pipe2(t->cmd, O_CLOEXEC) || pipe2(t->rep, O_CLOEXEC)) {
			ap_err(a, seq, errno);
			return;
		}
		block_for_helpers(&old);
		r = pthread_create(&t->th, NULL, idle_thread, t);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		if (r) {
			ap_err(a, seq, r);
			return;
		}
		for (i = 0; i < 2000 && !__atomic_load_n(&t->tid, __ATOMIC_ACQUIRE); i++)
			sleep_ms(1);
		nthreads++;
		ap_begin(a, seq, "ok");
		ap_add(a, "tid=%d", (int)t->tid);
	} else if (!strcmp(op, "threadpkru")) {
		struct thr *t;
		struct pollfd pfd;
		uint32_t pk;

		REQ(ap_u64(c, "tid", 0, &v), "arg");
		t = find_thread((pid_t)v);
		if ((pid_t)v == getpid()) {
			ap_begin(a, seq, "ok");
			ap_add(a, "tid=%d pkru=0x%x", (int)v, pk_read());
			return;
		}
		if (!t) {
			ap_bad(a, seq, "no_thread");
			return;
		}
		pfd.fd = t->rep[0];
		pfd.events = POLLIN;
		if (write(t->cmd[1], "p", 1) != 1 || poll(&pfd, 1, 2000) != 1 ||
		    read(t->rep[0], &pk, sizeof(pk)) != sizeof(pk)) {
			ap_bad(a, seq, "thread_silent");
			return;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "tid=%d pkru=0x%x", (int)v, pk);
	} else if (!strcmp(op, "mmap")) {
		uint64_t hint, fixed, shared, populate, align;
		int flags;
		void *p;
		const char *ps = ap_get(c, "prot");

		REQ(ap_u64(c, "len", 0, &len), "arg");
		NEED(ap_u64(c, "addr", 0, &hint), "arg");
		NEED(ap_u64(c, "fixed", 0, &fixed), "arg");
		NEED(ap_u64(c, "shared", 0, &shared), "arg");
		NEED(ap_u64(c, "populate", 0, &populate), "arg");
		NEED(ap_u64(c, "align", 0, &align), "arg");
		prot = PROT_READ | PROT_WRITE;
		if (ps && parse_prot(ps, &prot)) {
			ap_bad(a, seq, "arg");
			return;
		}
		if (align & (align - 1)) {
			ap_bad(a, seq, "arg");
			return;
		}
		flags = (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS;
		if (fixed)
			flags |= MAP_FIXED;
		if (populate)
			flags |= MAP_POPULATE;
		if (align > 4096 && !fixed) {
			/* over-allocate, keep an aligned [p, p+len) */
			uint8_t *q = mmap((void *)(uintptr_t)hint, len + align, prot, flags, -1, 0);
			uintptr_t start;

			if (q == MAP_FAILED) {
				ap_err(a, seq, errno);
				return;
			}
			start = ((uintptr_t)q + align - 1) & ~(uintptr_t)(align - 1);
			if (start > (uintptr_t)q)
				munmap(q, start - (uintptr_t)q);
			if ((uintptr_t)q + len + align > start + len)
				munmap((void *)(start + len), (uintptr_t)q + len + align - start - len);
			p = (void *)start;
		} else {
			p = mmap((void *)(uintptr_t)hint, len, prot, flags, -1, 0);
		}
		if (p == MAP_FAILED) {
			ap_err(a, seq, errno);
			return;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "addr=0x%llx", (unsigned long long)(uintptr_t)p);
	} else if (!strcmp(op, "munmap") || !strcmp(op, "mprotect") ||
		   !strcmp(op, "pkey_mprotect") || !strcmp(op, "madvise")) {
		REQ(ap_u64(c, "addr", 0, &addr), "arg");
		REQ(ap_u64(c, "len", 0, &len), "arg");
		if (!strcmp(op, "munmap") && ap_get(c, "stride")) {
			/* one page every stride bytes of [addr, addr+len): holes that fragment
			 * free memory (compaction needs small free blocks to migrate into) */
			uint64_t stride, off;

			REQ(ap_u64(c, "stride", 0, &stride), "arg");
			if (stride < 4096 || (stride & 4095)) {
				ap_bad(a, seq, "arg");
				return;
			}
			r = 0;
			for (off = 0; off < len && r == 0; off += stride)
				r = munmap((void *)(uintptr_t)(addr + off), 4096);
		} else if (!strcmp(op, "munmap")) {
			r = munmap((void *)(uintptr_t)addr, len);
		} else if (!strcmp(op, "madvise")) {
			const char *adv = ap_get(c, "advice");
			int advice;

			if (!adv) {
				ap_bad(a, seq, "arg");
				return;
			}
			if (!strcmp(adv, "dontneed")) advice = MADV_DONTNEED;
			else if (!strcmp(adv, "pageout")) advice = MADV_PAGEOUT;
			else if (!strcmp(adv, "cold")) advice = MADV_COLD;
			else if (!strcmp(adv, "willneed")) advice = MADV_WILLNEED;
			else if (!strcmp(adv, "collapse")) advice = MADV_COLLAPSE;
			else if (!strcmp(adv, "hugepage")) advice = MADV_HUGEPAGE;
			else if (!strcmp(adv, "nohugepage")) advice = MADV_NOHUGEPAGE;
			else if (!strcmp(adv, "free")) advice = MADV_FREE;
			else {
				ap_bad(a, seq, "arg");
				return;
			}
			r = madvise((void *)(uintptr_t)addr, len, advice);
		} else {
			if (parse_prot(ap_get(c, "prot"), &prot)) {
				ap_bad(a, seq, "arg");
				return;
			}
			if (op[1] == 'k') {
				REQ(ap_i64(c, "pkey", 0, &iv), "arg");
				r = (int)syscall(SYS_pkey_mprotect, (unsigned long)addr,
						 (size_t)len, (unsigned long)prot, (int)iv);
			} else {
				r = mprotect((void *)(uintptr_t)addr, len, prot);
			}
		}
		if (r < 0) {
			ap_err(a, seq, errno);
			return;
		}
		ap_begin(a, seq, "ok");
	} else if (!strcmp(op, "mremap")) {
		uint64_t oldl, newl, maymove, fixed;
		void *p;
		int flags = 0;

		REQ(ap_u64(c, "addr", 0, &addr), "arg");
		REQ(ap_u64(c, "old", 0, &oldl), "arg");
		REQ(ap_u64(c, "new", 0, &newl), "arg");
		NEED(ap_u64(c, "maymove", 0, &maymove), "arg");
		NEED(ap_u64(c, "fixed", 0, &fixed), "arg");
		if (maymove || ap_get(c, "fixed"))
			flags |= MREMAP_MAYMOVE;
		if (ap_get(c, "fixed"))
			flags |= MREMAP_FIXED;
		p = mremap((void *)(uintptr_t)addr, oldl, newl, flags, (void *)(uintptr_t)fixed);
		if (p == MAP_FAILED) {
			ap_err(a, seq, errno);
			return;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "addr=0x%llx", (unsigned long long)(uintptr_t)p);
	} else if (!strcmp(op, "brk")) {
		uint64_t oldb, newb;

		NEED(ap_i64(c, "delta", 0, &iv), "arg");
		oldb = (uint64_t)syscall(SYS_brk, 0);
		newb = iv ? (uint64_t)syscall(SYS_brk, oldb + (uint64_t)iv) : oldb;
		ap_begin(a, seq, "ok");
		ap_add(a, "old=0x%llx new=0x%llx", (unsigned long long)oldb,
		       (unsigned long long)newb);
	} else if (!strcmp(op, "pagemap") && ap_get(c, "pages")) {
		int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
		uint64_t pages, e, i;
		char buf[3200];
		size_t m = 0;

		REQ(ap_u64(c, "addr", 0, &addr), "arg");
		REQ(ap_u64(c, "pages", 0, &pages), "arg");
		if (fd < 0) {
			ap_err(a, seq, errno);
			return;
		}
		if (pages < 1 || pages > 256) {
			close(fd);
			ap_bad(a, seq, "arg");
			return;
		}
		buf[0] = 0;
		for (i = 0; i < pages; i++) {
			e = 0;
			if (pread(fd, &e, 8, (off_t)(addr / 4096 + i) * 8) != 8)
				e = 0;
			/* pfn in hex, s = swap entry, - = none */
			m += (size_t)snprintf(buf + m, sizeof(buf) - m, i ? ",%s%llx" : "%s%llx",
					      (e >> 63) & 1 ? "" : (e >> 62) & 1 ? "s" : "-",
					      (e >> 63) & 1 ? (unsigned long long)(e & ((1ULL << 55) - 1))
							    : 0ULL);
		}
		close(fd);
		ap_begin(a, seq, "ok");
		ap_add(a, "pfns=%s", buf);
	} else if (!strcmp(op, "pagemap")) {
		int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
		uint64_t e = 0, kf = 0;

		REQ(ap_u64(c, "addr", 0, &addr), "arg");
		if (fd < 0 || pread(fd, &e, 8, (off_t)(addr / 4096) * 8) != 8) {
			ap_err(a, seq, errno);
			if (fd >= 0)
				close(fd);
			return;
		}
		close(fd);
		if ((e >> 63) & 1) {
			fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
			if (fd >= 0) {
				if (pread(fd, &kf, 8, (off_t)(e & ((1ULL << 55) - 1)) * 8) != 8)
					kf = 0;
				close(fd);
			}
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "present=%d swapped=%d pfn=0x%llx thp=%d", (int)((e >> 63) & 1),
		       (int)((e >> 62) & 1),
		       (unsigned long long)(((e >> 63) & 1) ? (e & ((1ULL << 55) - 1)) : 0),
		       (int)((kf >> 22) & 1));
	} else if (!strcmp(op, "touch")) {
		struct fault f;

		REQ(ap_u64(c, "addr", 0, &addr), "arg");
		REQ(ap_u64(c, "len", 0, &len), "arg");
		NEED(ap_u64(c, "value", 0, &v), "arg");
		if (len > (64ULL << 20) || (addr & 7)) {
			ap_bad(a, seq, "arg");
			return;
		}
		if (guarded_fill((volatile uint64_t *)(uintptr_t)addr, len / 8, v, &f)) {
			ans_fault(a, seq, &f);
			return;
		}
		ap_begin(a, seq, "ok");
	} else if (!strcmp(op, "read") || !strcmp(op, "write")) {
		struct fault f;
		uint64_t pk, out;
		int use = ap_get(c, "pkru") != NULL, w = op[0] == 'w';

		REQ(ap_u64(c, "addr", 0, &addr), "arg");
		NEED(ap_u64(c, "pkru", 0, &pk), "arg");
		if (w)
			REQ(ap_u64(c, "value", 0, &v), "arg");
		else
			v = 0;
		if ((addr & 7) || pk > 0xffffffffULL) {
			ap_bad(a, seq, "arg");
			return;
		}
		if (guarded((volatile uint64_t *)(uintptr_t)addr, w, v, &out, use, (uint32_t)pk,
			    &f)) {
			ans_fault(a, seq, &f);
			return;
		}
		ap_begin(a, seq, "ok");
		if (!w)
			ap_add(a, "value=0x%llx", (unsigned long long)out);
		ap_add(a, "pkru=0x%x", pk_read());
	} else if (!strcmp(op, "wrpkru")) {
		uint64_t pk;

		REQ(ap_u64(c, "pkru", 0, &pk), "arg");
		if (pk > 0xffffffffULL) {
			ap_bad(a, seq, "arg");
			return;
		}
		pk_write((uint32_t)pk);
		ap_begin(a, seq, "ok");
		ap_add(a, "pkru=0x%x", pk_read());
	} else if (!strcmp(op, "pkey_alloc")) {
		uint64_t rights;

		NEED(ap_u64(c, "rights", 0, &rights), "arg");
		r = (int)syscall(SYS_pkey_alloc, 0UL, (unsigned long)rights);
		if (r < 0) {
			ap_err(a, seq, errno);
			return;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "pkey=%d", r);
	} else if (!strcmp(op, "pkey_free")) {
		REQ(ap_i64(c, "pkey", 0, &iv), "arg");
		if (syscall(SYS_pkey_free, (int)iv) < 0) {
			ap_err(a, seq, errno);
			return;
		}
		ap_begin(a, seq, "ok");
	} else if (!strcmp(op, "signal")) {
		const char *ck = ap_get(c, "ckpt");
		pid_t tid = getpid();
		int i;

		NEED(ap_u64(c, "tid", (uint64_t)getpid(), &v), "arg");
		tid = (pid_t)v;
		if (tid != getpid() && !find_thread(tid)) {
			ap_bad(a, seq, "no_thread");
			return;
		}
		if (ck && !ap_name_ok(ck, sizeof(sig_ckpt) - 1)) {
			ap_bad(a, seq, "arg");
			return;
		}
		snprintf(sig_ckpt, sizeof(sig_ckpt), "%s", ck ? ck : "");
		sig_done = 0;
		if (syscall(SYS_tgkill, getpid(), tid, SIGUSR1) < 0) {
			ap_err(a, seq, errno);
			return;
		}
		for (i = 0; i < 30000 && !sig_done; i++)	/* a checkpoint can take seconds */
			sleep_ms(1);
		if (!sig_done) {
			ap_bad(a, seq, "thread_silent");
			return;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "tid=%d pkru=0x%x ckpt=%d", (int)sig_tid, sig_pkru, sig_ckpt_rc);
	} else if (!strcmp(op, "deadkeys")) {
		/* read() of count bytes (default: 64 keys) into a buffer with a canary
		 * after count: over= is how many bytes past count the kernel wrote */
		uint64_t keys[64 + 8], count;
		unsigned char *b = (unsigned char *)keys;
		int fl = fcntl(rpal_fd, F_GETFL);
		ssize_t n;
		char buf[64 * 21 + 8];
		size_t m = 0, over = 0, j;
		int i;

		if (ap_u64(c, "count", 64 * 8, &count) < 0 || count > 64 * 8) {
			ap_bad(a, seq, "arg");
			return;
		}
		memset(keys, 0xa5, sizeof(keys));
		fcntl(rpal_fd, F_SETFL, fl | O_NONBLOCK);
		n = read(rpal_fd, keys, count);
		r = errno;
		fcntl(rpal_fd, F_SETFL, fl);
		for (j = count; j < sizeof(keys); j++)
			if (b[j] != 0xa5)
				over = j - count + 1;
		if (n < 0 && r != EAGAIN) {
			ap_err(a, seq, r);
			return;
		}
		ap_begin(a, seq, "ok");
		if (n <= 0) {
			ap_add(a, "keys=none ret=0 over=%zu", over);
			return;
		}
		if (n > (ssize_t)sizeof(keys))
			n = sizeof(keys);
		for (i = 0; i < (int)(n / 8); i++)
			m += (size_t)snprintf(buf + m, sizeof(buf) - m, "%s%llu", i ? "," : "",
					      (unsigned long long)keys[i]);
		ap_add(a, "keys=%s ret=%zd over=%zu", m ? buf : "none", n, over);
	} else if (!strcmp(op, "poll")) {
		struct pollfd p = { .fd = rpal_fd, .events = POLLIN };

		r = poll(&p, 1, 0);
		if (r < 0) {
			ap_err(a, seq, errno);
			return;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "pollin=%d revents=%d", r > 0 && (p.revents & POLLIN) ? 1 : 0,
		       r > 0 ? p.revents : 0);
	} else if (!strcmp(op, "fork")) {
		int sv[2];
		pid_t pid;

		if (nchildren == MAX_CHILDREN) {
			ap_bad(a, seq, "limit");
			return;
		}
		if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv)) {
			ap_err(a, seq, errno);
			return;
		}
		pid = fork();
		if (pid < 0) {
			ap_err(a, seq, errno);
			close(sv[0]);
			close(sv[1]);
			return;
		}
		if (pid == 0) {
			close(sv[0]);
			close(ctl_fd);
			child_loop(sv[1]);
		}
		close(sv[1]);
		children[nchildren].pid = pid;
		children[nchildren].fd = sv[0];
		nchildren++;
		ap_begin(a, seq, "ok");
		ap_add(a, "child=%d", (int)pid);
	} else if (!strcmp(op, "childread") || !strcmp(op, "childwrite") ||
		   !strcmp(op, "childexit")) {
		struct child_req q;
		struct child_rep rp;
		struct child *ch;
		struct pollfd pfd;
		uint64_t pk;

		REQ(ap_u64(c, "child", 0, &v), "arg");
		ch = find_child((pid_t)v);
		if (!ch) {
			ap_bad(a, seq, "no_child");
			return;
		}
		memset(&q, 0, sizeof(q));
		if (op[5] == 'e') {
			int st = 0, i;

			q.op = 'x';
			if (write(ch->fd, &q, sizeof(q)) < 0)
				kill(ch->pid, SIGKILL);
			for (i = 0; i < 3000; i++) {
				if (waitpid(ch->pid, &st, WNOHANG) == ch->pid)
					break;
				sleep_ms(1);
			}
			if (i == 3000) {
				kill(ch->pid, SIGKILL);
				waitpid(ch->pid, &st, 0);
			}
			drop_child(ch);
			ap_begin(a, seq, "ok");
			ap_add(a, "status=%d sig=%d", WIFEXITED(st) ? WEXITSTATUS(st) : 0,
			       WIFSIGNALED(st) ? WTERMSIG(st) : 0);
			return;
		}
		q.op = op[5] == 'w' ? 'w' : 'r';
		REQ(ap_u64(c, "addr", 0, &q.addr), "arg");
		NEED(ap_u64(c, "pkru", 0, &pk), "arg");
		if (q.op == 'w')
			REQ(ap_u64(c, "value", 0, &q.value), "arg");
		if ((q.addr & 7) || pk > 0xffffffffULL) {
			ap_bad(a, seq, "arg");
			return;
		}
		q.use_pkru = ap_get(c, "pkru") != NULL;
		q.pkru = (uint32_t)pk;
		pfd.fd = ch->fd;
		pfd.events = POLLIN;
		if (write(ch->fd, &q, sizeof(q)) != sizeof(q) ||
		    poll(&pfd, 1, ACCESS_TIMEOUT_MS + 2000) != 1 ||
		    read(ch->fd, &rp, sizeof(rp)) != sizeof(rp)) {
			int st = 0;

			/* the child died (or hung): say so, reap it */
			kill(ch->pid, SIGKILL);
			waitpid(ch->pid, &st, 0);
			drop_child(ch);
			ap_begin(a, seq, "died");
			ap_add(a, "svc=%s child=%d sig=%d status=%d", svc_name, (int)v,
			       WIFSIGNALED(st) ? WTERMSIG(st) : 0,
			       WIFEXITED(st) ? WEXITSTATUS(st) : 0);
			return;
		}
		if (rp.faulted) {
			ap_begin(a, seq, "fault");
			ap_add(a, "sig=%d code=%d addr=0x%llx pkey=%d pkru=0x%x", rp.f.sig,
			       rp.f.sig == SIGALRM ? 0 : rp.f.code,
			       (unsigned long long)rp.f.addr, rp.f.pkey, rp.pkru);
			return;
		}
		ap_begin(a, seq, "ok");
		if (q.op == 'r')
			ap_add(a, "value=0x%llx", (unsigned long long)rp.value);
		ap_add(a, "pkru=0x%x", rp.pkru);
	} else if (!strcmp(op, "spin")) {
		uint64_t pk, cpu, val;
		const char *mode = ap_get(c, "mode");
		sigset_t old;
		int i;

		if (spin.running && __atomic_load_n(&spin.done, __ATOMIC_ACQUIRE)) {
			/* the last spinner ended by itself (it faulted when its page went away:
			 * the owner's exit, munmap...): join it; the host already counts it gone */
			pthread_join(spin.th, NULL);
			spin.running = 0;
		}
		if (spin.running) {
			ap_bad(a, seq, "busy");
			return;
		}
		REQ(ap_u64(c, "addr", 0, &addr), "arg");
		NEED(ap_u64(c, "pkru", 0, &pk), "arg");
		NEED(ap_u64(c, "cpu", 1, &cpu), "arg");
		NEED(ap_u64(c, "value", 0, &val), "arg");
		if ((addr & 7) || pk > 0xffffffffULL || cpu >= CPU_SETSIZE ||
		    (mode && strcmp(mode, "read") && strcmp(mode, "write"))) {
			ap_bad(a, seq, "arg");
			return;
		}
		memset(&spin, 0, sizeof(spin));
		spin.addr = (volatile uint64_t *)(uintptr_t)addr;
		spin.mode_write = mode && !strcmp(mode, "write");
		spin.use_pkru = ap_get(c, "pkru") != NULL;
		spin.pkru = (uint32_t)pk;
		spin.cpu = (int)cpu;
		spin.value = val;
		block_for_helpers(&old);
		r = pthread_create(&spin.th, NULL, spin_thread, &spin);
		pthread_sigmask(SIG_SETMASK, &old, NULL);
		if (r) {
			ap_err(a, seq, r);
			return;
		}
		spin.running = 1;
		for (i = 0; i < 5000 && !__atomic_load_n(&spin.started, __ATOMIC_ACQUIRE); i++)
			sleep_ms(1);
		if (spin.faulted) {
			pthread_join(spin.th, NULL);
			spin.running = 0;
			ans_fault(a, seq, &spin.f);
			return;
		}
		if (!spin.started) {
			ap_bad(a, seq, "spinner_silent");
			return;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "tid=%d first=0x%llx", (int)spin.tid, (unsigned long long)spin.first);
	} else if (!strcmp(op, "arm")) {
		uint64_t old;

		if (!spin.running) {
			ap_bad(a, seq, "no_spinner");
			return;
		}
		NEED(ap_u64(c, "old", spin.first, &old), "arg");
		spin.old = old;
		__atomic_store_n(&spin.armed, 1, __ATOMIC_RELEASE);
		ap_begin(a, seq, "ok");
		ap_add(a, "reads=%llu old=0x%llx", (unsigned long long)spin.reads,
		       (unsigned long long)old);
	} else if (!strcmp(op, "spinstop")) {
		int i, hung;

		if (!spin.running) {
			ap_bad(a, seq, "no_spinner");
			return;
		}
		__atomic_store_n(&spin.stop, 1, __ATOMIC_SEQ_CST);
		for (i = 0; i < 2000 && !__atomic_load_n(&spin.done, __ATOMIC_ACQUIRE); i++)
			sleep_ms(1);
		hung = !spin.done;
		if (!hung) {
			pthread_join(spin.th, NULL);
			spin.running = 0;
		}
		ap_begin(a, seq, "ok");
		ap_add(a, "reads=%llu after=%llu stale=%llu changed=%llu early=%llu last=0x%llx "
		       "faulted=%d", (unsigned long long)spin.reads, (unsigned long long)spin.after,
		       (unsigned long long)spin.stale, (unsigned long long)spin.changed,
		       (unsigned long long)spin.early, (unsigned long long)spin.last, spin.faulted);
		if (spin.faulted)
			ap_add(a, "sig=%d code=%d pkey=%d addr=0x%llx", spin.f.sig, spin.f.code,
			       spin.f.pkey, (unsigned long long)spin.f.addr);
		ap_add(a, "hung=%d", hung);
	} else if (!strcmp(op, "exec")) {
		do_exec(seq, a);
	} else {
		ap_bad(a, seq, "op");
	}
}

int main(int argc, char **argv)
{
	struct ap_reader rd;
	struct ap_ans a;
	struct sigaction sa;
	uint64_t seq = 0;
	char line[AP_LINE_MAX];
	int i, r;

	for (i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--fd"))
			ctl_fd = atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "--seq"))
			seq = strtoull(argv[i + 1], NULL, 10);
		else if (!strcmp(argv[i], "--cpu"))
			my_cpu = atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "--name"))
			snprintf(svc_name, sizeof(svc_name), "%s", argv[i + 1]);
	}
	detect_pku();
	if (ctl_fd < 0) {
		fprintf(stderr, "usage: tb-rpal_svc --fd N --seq S [--cpu C] [--name S]"
			" (started by tb-rpal_agent)\n");
		return 2;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = fault_handler;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
	sigaction(SIGALRM, &sa, NULL);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = usr1_handler;
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	prctl(PR_SET_PDEATHSIG, SIGKILL);	/* never outlive the agent */
	{
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(my_cpu, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}

	rpal_fd = open("/proc/rpal", O_RDWR | O_CLOEXEC);
	/* TB_SVC_NO_RPAL=1: run without /proc/rpal (testing the agent on a plain kernel) */
	if (rpal_fd < 0 && getenv("TB_SVC_NO_RPAL")) {
		r = 0;
	} else if (rpal_fd < 0 || (r = read_ids()) < 0) {
		ap_err(&a, seq, rpal_fd < 0 ? errno : -r);
		send_line(&a);
		return 1;
	}
	{
		struct rpal_version_info vi = { 0, 0 };

		ioctl(rpal_fd, RPAL_IOCTL_GET_API_VERSION_AND_CAP, &vi);
		ap_begin(&a, seq, "ok");
		ap_add(&a, "svc=%s pid=%d id=%llu key=%llu pkey=%llu api=%u cap=%u", svc_name,
		       (int)getpid(), (unsigned long long)my_id, (unsigned long long)my_key,
		       (unsigned long long)my_pkey, vi.api_version, vi.cap);
		send_line(&a);
	}

	memset(&rd, 0, sizeof(rd));
	rd.fd = ctl_fd;
	for (;;) {
		struct ap_cmd c;
		const char *why;

		r = ap_next_line(&rd, line);
		if (r == 0) {
			r = ap_fill(&rd);
			if (r == 0)
				return 0;	/* the agent closed us */
			if (r < 0 && r != -EINTR)
				return 3;
			continue;
		}
		if (r == -2) {
			ap_bad(&a, 0, "too_long");
			send_line(&a);
			continue;
		}
		why = ap_parse(line, &c);
		if (why) {
			ap_bad(&a, c.seq, why);
			send_line(&a);
			continue;
		}
		if (!strcmp(c.op, "exit")) {
			int64_t st;

			ap_i64(&c, "status", 0, &st);
			_exit((int)st);	/* the agent answers once it reaped us */
		}
		handle(&c, &a);
		send_line(&a);
	}
}
