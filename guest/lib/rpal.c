/* Guest-side library over the RPAL reference ABI; see rpal.h. */
#define _GNU_SOURCE
#include "rpal.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tb_checkpoint.h"

static int rpal_ioctl_u64(int fd, unsigned long cmd, uint64_t *v)
{
	int r = ioctl(fd, cmd, v);

	return r < 0 ? -errno : r;
}

int rpal_open(void)
{
	int fd = open("/proc/rpal", O_RDWR | O_CLOEXEC);

	return fd < 0 ? -errno : fd;
}

int rpal_version(int fd, struct rpal_version_info *vi)
{
	return rpal_ioctl_u64(fd, RPAL_IOCTL_GET_API_VERSION_AND_CAP,
			      (uint64_t *)vi);
}

int rpal_enable(int fd, int pkey)
{
	struct rpal_enable_arg ea = { .pkey = pkey, .flags = 0 };
	int r = rpal_ioctl_u64(fd, RPAL_IOCTL_ENABLE_SERVICE, (uint64_t *)&ea);

	return r < 0 ? r : ea.pkey;
}

int rpal_get_key(int fd, uint64_t *key)
{
	return rpal_ioctl_u64(fd, RPAL_IOCTL_GET_SERVICE_KEY, key);
}

int rpal_get_id(int fd, uint64_t *id)
{
	return rpal_ioctl_u64(fd, RPAL_IOCTL_GET_SERVICE_ID, id);
}

int rpal_get_pkey(int fd, uint64_t *pkey)
{
	return rpal_ioctl_u64(fd, RPAL_IOCTL_GET_SERVICE_PKEY, pkey);
}

int rpal_request(int fd, uint64_t key)
{
	return rpal_ioctl_u64(fd, RPAL_IOCTL_REQUEST_SERVICE, &key);
}

int rpal_release(int fd, uint64_t key)
{
	return rpal_ioctl_u64(fd, RPAL_IOCTL_RELEASE_SERVICE, &key);
}

int rpal_read_dead(int fd, uint64_t *keys, int max)
{
	ssize_t n = read(fd, keys, (size_t)max * sizeof(*keys));

	return n < 0 ? -errno : (int)(n / sizeof(*keys));
}

int rpal_poll_dead(int fd, int timeout_ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	int r = poll(&p, 1, timeout_ms);

	if (r < 0)
		return -errno;
	return r > 0 && (p.revents & POLLIN) ? 1 : 0;
}

int rpal_elf_is_service(const char *path)
{
	unsigned char id[EI_NIDENT];
	int fd = open(path, O_RDONLY | O_CLOEXEC), r;

	if (fd < 0)
		return -errno;
	r = read(fd, id, sizeof(id)) == (ssize_t)sizeof(id) &&
	    !memcmp(id, ELFMAG, SELFMAG) && !memcmp(id + 12, "RPAL", 4);
	close(fd);
	return r;
}

int rpal_stamp_elf(const char *path)
{
	unsigned char id[EI_NIDENT];
	int fd = open(path, O_RDWR | O_CLOEXEC), r = 0;

	if (fd < 0)
		return -errno;
	if (pread(fd, id, sizeof(id), 0) != (ssize_t)sizeof(id) ||
	    memcmp(id, ELFMAG, SELFMAG))
		r = -ENOEXEC;
	else if (pwrite(fd, "RPAL", 4, 12) != 4)
		r = -errno;
	close(fd);
	return r;
}

/* ---- guarded accesses ---- */

static sigjmp_buf try_env;
static volatile sig_atomic_t try_armed;
static struct rpal_fault try_fault;

static void try_handler(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (!try_armed) {
		signal(sig, SIG_DFL);
		raise(sig);
		return;
	}
	try_fault.sig = sig;
	try_fault.code = si->si_code;
	try_fault.addr = si->si_addr;
	try_fault.pkey = (sig == SIGSEGV && si->si_code == SEGV_PKUERR) ?
			 (int)si->si_pkey : -1;
	siglongjmp(try_env, 1);
}

static void try_setup(int timeout_ms)
{
	static int installed;
	struct itimerval it = { { 0, 0 }, { timeout_ms / 1000,
					     (timeout_ms % 1000) * 1000 } };

	if (!installed) {
		struct sigaction sa;

		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = try_handler;
		sa.sa_flags = SA_SIGINFO | SA_NODEFER;
		sigaction(SIGSEGV, &sa, NULL);
		sigaction(SIGBUS, &sa, NULL);
		sigaction(SIGALRM, &sa, NULL);
		installed = 1;
	}
	memset(&try_fault, 0, sizeof(try_fault));
	setitimer(ITIMER_REAL, &it, NULL);
}

static void try_done(void)
{
	struct itimerval off = { { 0, 0 }, { 0, 0 } };

	try_armed = 0;
	setitimer(ITIMER_REAL, &off, NULL);
}

/*
 * The PKRU at the time of the access is restored after a fault: the
 * signal handler ran with the service's default PKRU and we leave it with
 * siglongjmp, not sigreturn.
 */
static int try_access64(volatile uint64_t *p, int write, uint64_t v, uint64_t *out,
			int timeout_ms, struct rpal_fault *f)
{
	volatile uint32_t pkru = rdpkru();

	try_setup(timeout_ms);
	if (sigsetjmp(try_env, 1)) {
		wrpkru(pkru);
		try_done();
		*f = try_fault;
		return -1;
	}
	try_armed = 1;
	if (write)
		*p = v;
	else
		*out = *p;
	try_done();
	*f = try_fault;
	return 0;
}

int rpal_try_read64(const volatile uint64_t *p, uint64_t *out, int timeout_ms,
		    struct rpal_fault *f)
{
	return try_access64((volatile uint64_t *)p, 0, 0, out, timeout_ms, f);
}

int rpal_try_write64(volatile uint64_t *p, uint64_t v, int timeout_ms,
		     struct rpal_fault *f)
{
	return try_access64(p, 1, v, NULL, timeout_ms, f);
}

void rpal_watchdog(int timeout_ms)
{
	try_setup(timeout_ms);
}

int rpal_try_read64_nosys(const volatile uint64_t *p, uint64_t *out,
			  struct rpal_fault *f)
{
	volatile uint32_t pkru = rdpkru();

	if (sigsetjmp(try_env, 0)) {	/* 0: no sigprocmask call */
		wrpkru(pkru);
		try_armed = 0;
		*f = try_fault;
		return -1;
	}
	try_fault.sig = 0;
	try_armed = 1;
	*out = *p;
	try_armed = 0;
	f->sig = 0;
	return 0;
}

const char *rpal_fault_str(const struct rpal_fault *f)
{
	static char buf[96];
	const char *code = "?";

	if (!f->sig)
		return "no fault";
	if (f->sig == SIGALRM)
		return "timed out (the access hung: fault livelock?)";
	switch (f->code) {
	case SEGV_MAPERR: code = "SEGV_MAPERR"; break;
	case SEGV_ACCERR: code = "SEGV_ACCERR"; break;
	case SEGV_PKUERR: code = "SEGV_PKUERR"; break;
	}
	snprintf(buf, sizeof(buf), "%s %s pkey %d at %p",
		 f->sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", code, f->pkey,
		 f->addr);
	return buf;
}

const char *rpal_errname(int err)
{
	static char buf[32];

	switch (-err) {
	case 0: return "0";
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case ESRCH: return "ESRCH";
	case EFAULT: return "EFAULT";
	case EBUSY: return "EBUSY";
	case EEXIST: return "EEXIST";
	case EINVAL: return "EINVAL";
	case ENOSPC: return "ENOSPC";
	case EAGAIN: return "EAGAIN";
	case EALREADY: return "EALREADY";
	case ENOTTY: return "ENOTTY";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case EKEYREJECTED: return "EKEYREJECTED";
	}
	snprintf(buf, sizeof(buf), "%d", err);
	return buf;
}

/* ---- workload plumbing ---- */

#define STEP_LEN 64
#define STEP_ENV "RPAL_STEP"		/* "FD:INDEX": the parent's step page */
#define DIE_ENV "RPAL_DIE_IN"		/* "ROLE:STEP[:hang]" */
#define TIMEOUT_ENV "RPAL_TIMEOUT_MS"	/* link timeout instead of RPAL_LINK_TIMEOUT_MS */

struct step_page {
	char step[2][STEP_LEN];
};

static volatile char *my_step;		/* our entry in the parent's step page */
static char stdout_buf[4096];

static int link_timeout_ms(void)
{
	const char *e = getenv(TIMEOUT_ENV);
	int v = e ? atoi(e) : 0;

	return v > 0 ? v : RPAL_LINK_TIMEOUT_MS;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

void rpal_link_init(struct rpal_link *l, const char *role, int rfd, int wfd)
{
	const char *e = getenv(STEP_ENV);
	int fd, idx;

	setvbuf(stdout, stdout_buf, _IOLBF, sizeof(stdout_buf));
	memset(l, 0, sizeof(*l));
	l->rfd = rfd;
	l->wfd = wfd;
	l->role = role;
	signal(SIGPIPE, SIG_IGN);	/* a write to a dead partner is EPIPE */
	if (e && sscanf(e, "%d:%d", &fd, &idx) == 2 && (idx == 0 || idx == 1)) {
		struct step_page *p = mmap(NULL, sizeof(*p), PROT_READ | PROT_WRITE,
					   MAP_SHARED, fd, 0);

		if (p != MAP_FAILED)
			my_step = p->step[idx];
		close(fd);
	}
	unsetenv(STEP_ENV);		/* not for our own children */
}

static void die_if_asked(struct rpal_link *l, const char *step)
{
	const char *e = getenv(DIE_ENV);
	size_t rl = strlen(l->role), sl = strlen(step);

	if (!e || strncmp(e, l->role, rl) || e[rl] != ':' || strncmp(e + rl + 1, step, sl))
		return;
	e += rl + 1 + sl;
	if (!strcmp(e, ":hang")) {
		printf("%s: hanging in step %s (" DIE_ENV ")\n", l->role, step);
		fflush(stdout);
		for (;;)
			pause();
	}
	if (*e)
		return;
	printf("%s: dying of SIGSEGV in step %s (" DIE_ENV ")\n", l->role, step);
	fflush(stdout);
	signal(SIGSEGV, SIG_DFL);
	raise(SIGSEGV);
}

void rpal_step(struct rpal_link *l, const char *step)
{
	int i;

	l->step = step;
	if (my_step) {
		for (i = 0; i < STEP_LEN - 1 && step[i]; i++)
			my_step[i] = step[i];
		my_step[i] = 0;
	}
	printf("%s: step %s\n", l->role, step);
	fflush(stdout);
	die_if_asked(l, step);
}

static void link_fail(struct rpal_link *l, const char *what, const char *where)
{
	printf("%s: FAIL link: %s at %s, in step %s\n", l->role, what, where,
	       l->step ? l->step : "(none yet)");
	fflush(stdout);
	exit(1);
}

int rpal_link_send(struct rpal_link *l, const void *buf, int len)
{
	ssize_t n = write(l->wfd, buf, len);

	if (n != len)
		link_fail(l, n < 0 && errno == EPIPE ? "the peer is gone (EPIPE)" :
			  "cannot write to the peer", "a send");
	return 0;
}

static int link_read(struct rpal_link *l, void *buf, int len, const char *where)
{
	char *p = buf, msg[96];
	int got = 0, timeout = link_timeout_ms();

	while (got < len) {
		struct pollfd pf = { .fd = l->rfd, .events = POLLIN };
		int r = poll(&pf, 1, timeout);
		ssize_t n;

		if (r < 0 && errno == EINTR)
			continue;
		if (r == 0) {
			snprintf(msg, sizeof(msg), "no word from the peer for %.1f s",
				 timeout / 1000.0);
			link_fail(l, msg, where);
		}
		n = r < 0 ? -1 : read(l->rfd, p + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0)
			link_fail(l, "the peer is gone (EOF)", where);
		if (n < 0)
			link_fail(l, "cannot read from the peer", where);
		got += n;
	}
	return 0;
}

int rpal_link_recv(struct rpal_link *l, void *buf, int len)
{
	return link_read(l, buf, len, "a receive");
}

int rpal_link_sync(struct rpal_link *l, char tag)
{
	char c, where[32];

	snprintf(where, sizeof(where), "sync '%c'", tag);
	rpal_link_send(l, &tag, 1);
	link_read(l, &c, 1, where);
	if (c != tag) {
		snprintf(where, sizeof(where), "sync '%c' (the peer is at '%c')", tag, c);
		link_fail(l, "out of step", where);
	}
	return 0;
}

void rpal_link_wait_gone(struct rpal_link *l)
{
	struct pollfd pf = { .fd = l->rfd, .events = POLLIN };
	char c;
	int r, timeout = link_timeout_ms();

	do
		r = poll(&pf, 1, timeout);
	while (r < 0 && errno == EINTR);
	if (r == 0)
		link_fail(l, "the peer did not exit", "the end");
	if (r < 0 || read(l->rfd, &c, 1) != 0)
		link_fail(l, "the peer sent more instead of exiting", "the end");
}

void rpal_check(struct rpal_link *l, int ok, const char *check,
		const char *fmt, ...)
{
	char msg[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	printf("%s: %s %s: %s\n", l->role, ok ? "ok" : "FAIL", check, msg);
	fflush(stdout);
	if (!ok)
		l->failures++;
}

int rpal_die_in_option(int argc, char **argv, int i)
{
	if (i + 1 >= argc || strcmp(argv[i], "--die-in") || !strchr(argv[i + 1], ':'))
		return 0;
	setenv(DIE_ENV, argv[i + 1], 1);
	return 2;
}

/* ---- the parent of a pair ---- */

static pid_t spawn_role(const char *role, int idx, int rfd, int wfd, int close1,
			int close2, int step_fd, int extra_argc, char **extra_argv)
{
	char r[16], w[16], st[32];
	char *argv[64];
	int i, n = 0;
	pid_t pid;

	snprintf(r, sizeof(r), "%d", rfd);
	snprintf(w, sizeof(w), "%d", wfd);
	snprintf(st, sizeof(st), "%d:%d", step_fd, idx);
	argv[n++] = "/proc/self/exe";
	argv[n++] = (char *)role;
	argv[n++] = r;
	argv[n++] = w;
	for (i = 0; i < extra_argc && n < 62; i++)
		argv[n++] = extra_argv[i];
	argv[n] = NULL;
	pid = fork();
	if (pid == 0) {
		/* only our own ends: the partner's death must be EOF/EPIPE to us */
		close(close1);
		close(close2);
		if (step_fd >= 0)
			setenv(STEP_ENV, st, 1);
		signal(SIGPIPE, SIG_IGN);
		execv("/proc/self/exe", argv);
		perror("execv");
		_exit(127);
	}
	return pid;
}

static const char *sig_str(int sig)
{
	static char buf[32];
	const char *a = sigabbrev_np(sig);

	snprintf(buf, sizeof(buf), "SIG%s", a ? a : "?");
	return buf;
}

int rpal_run_pair(const char *role_a, const char *role_b, int extra_argc,
		  char **extra_argv)
{
	const char *roles[2] = { role_a, role_b };
	int ab[2], ba[2], status[2], done[2] = { 0, 0 }, killed[2] = { 0, 0 };
	int ok = 1, i, step_fd;
	double t0 = now_s(), ended[2] = { 0, 0 };
	double grace = link_timeout_ms() * 1.5 / 1000.0;
	struct step_page *page = MAP_FAILED;
	pid_t pids[2];

	if (pipe(ab) || pipe(ba)) {
		perror("pipe");
		return 1;
	}
	step_fd = memfd_create("rpal-steps", 0);
	if (step_fd >= 0 && ftruncate(step_fd, sizeof(*page)) == 0)
		page = mmap(NULL, sizeof(*page), PROT_READ | PROT_WRITE, MAP_SHARED,
			    step_fd, 0);
	if (page == MAP_FAILED)
		printf("parent: no step page (%s): a crash will not name its step\n",
		       strerror(errno));
	fflush(stdout);
	pids[0] = spawn_role(role_a, 0, ba[0], ab[1], ab[0], ba[1], step_fd,
			     extra_argc, extra_argv);
	pids[1] = spawn_role(role_b, 1, ab[0], ba[1], ba[0], ab[1], step_fd,
			     extra_argc, extra_argv);
	close(ab[0]); close(ab[1]); close(ba[0]); close(ba[1]);
	if (step_fd >= 0)
		close(step_fd);
	for (i = 0; i < 2; i++)
		if (pids[i] < 0) {
			printf("parent: FAIL %s: could not run it\n", roles[i]);
			done[i] = 1;
			ended[i] = t0;
			ok = 0;
		}
	while (!done[0] || !done[1]) {
		double t = now_s();

		for (i = 0; i < 2; i++) {
			if (done[i] || waitpid(pids[i], &status[i], WNOHANG) != pids[i])
				continue;
			done[i] = 2;
			ended[i] = t;
		}
		for (i = 0; i < 2; i++) {
			int late = done[!i] && t - ended[!i] > grace;

			if (done[i] || killed[i] || (!late && t - t0 < RPAL_PAIR_TIMEOUT_MS / 1000.0))
				continue;
			killed[i] = late ? 1 : 2;
			kill(pids[i], SIGKILL);
		}
		if (!done[0] || !done[1])
			usleep(20000);
	}
	for (i = 0; i < 2; i++) {
		const char *step = page != MAP_FAILED && page->step[i][0] ? page->step[i] : NULL;
		int st = status[i];

		if (done[i] != 2)
			continue;
		if (step)
			page->step[i][STEP_LEN - 1] = 0;
		if (killed[i]) {
			printf("%s: FAIL %s: %s, killed in step %s\n", roles[i], step ? step : "start",
			       killed[i] == 1 ? "still running long after its partner ended" :
			       "the pair ran out of time", step ? step : "(none yet)");
			ok = 0;
		} else if (WIFSIGNALED(st)) {
			printf("%s: FAIL %s: killed by signal %d (%s) in step %s\n", roles[i],
			       step ? step : "start", WTERMSIG(st), sig_str(WTERMSIG(st)),
			       step ? step : "(none yet)");
			ok = 0;
		} else if (WEXITSTATUS(st)) {
			printf("parent: %s exited with status %d\n", roles[i], WEXITSTATUS(st));
			ok = 0;
		}
	}
	if (done[0] == 2 && done[1] == 2) {
		i = ended[1] < ended[0];
		printf("parent: %s ended after %.2f s, %s %.2f s later\n", roles[i],
		       ended[i] - t0, roles[!i], ended[!i] - ended[i]);
	}
	if (page != MAP_FAILED)
		munmap(page, sizeof(*page));
	fflush(stdout);
	return ok ? 0 : 1;
}

/* ---- what a service is, as the kernel says, and checkpoints ---- */

int rpal_svc_enable(struct rpal_link *l, int fd, int pkey_req, struct rpal_svc *me)
{
	uint64_t pk = ~0ull;
	int pkey = fd < 0 ? fd : rpal_enable(fd, pkey_req), r = 0;
	const char *what = "enable";

	memset(me, 0, sizeof(*me));
	if (pkey >= 0 && (r = rpal_get_key(fd, &me->key)) < 0)
		what = "GET_SERVICE_KEY";
	else if (pkey >= 0 && (r = rpal_get_id(fd, &me->id)) < 0)
		what = "GET_SERVICE_ID";
	else if (pkey >= 0 && (r = rpal_get_pkey(fd, &pk)) < 0)
		what = "GET_SERVICE_PKEY";
	if (pkey < 0 || r < 0) {
		printf("%s: FAIL enable: %s -> %s\n", l->role, fd < 0 ? "open /proc/rpal" : what,
		       rpal_errname(pkey < 0 ? pkey : r));
		l->failures++;
		return -1;
	}
	if (pk != (uint64_t)pkey) {
		printf("%s: FAIL enable: ENABLE said pkey %d, GET_SERVICE_PKEY says %llu\n",
		       l->role, pkey, (unsigned long long)pk);
		l->failures++;
		return -1;
	}
	me->pid = getpid();
	me->pkey = pkey;
	me->alive = 1;
	return 0;
}

void rpal_svc_facts(char *buf, int cap, const char *ra, const struct rpal_svc *a,
		    const char *rb, const struct rpal_svc *b, int paired)
{
	snprintf(buf, cap,
		 "%s.pid=%llu %s.id=%llu %s.key=%llu %s.pkey=%d %s.alive=%d "
		 "%s.pid=%llu %s.id=%llu %s.key=%llu %s.pkey=%d %s.alive=%d pairs=%s%s%s",
		 ra, (unsigned long long)a->pid, ra, (unsigned long long)a->id,
		 ra, (unsigned long long)a->key, ra, a->pkey, ra, a->alive,
		 rb, (unsigned long long)b->pid, rb, (unsigned long long)b->id,
		 rb, (unsigned long long)b->key, rb, b->pkey, rb, b->alive,
		 paired ? ra : "none", paired ? "-" : "", paired ? rb : "");
}

int rpal_checkpoint(struct rpal_link *l, const char *name, const char *facts)
{
	int r = tb_checkpoint_facts(name, facts);

	rpal_check(l, r == 0, "checkpoint", "%s: %s", name, r ? strerror(errno) : "taken");
	return r;
}

static const char *volatile sig_ck_name, *volatile sig_ck_facts;
static volatile uint32_t sig_ck_pkru;
static volatile int sig_ck_r, sig_ck_errno;

static void checkpoint_handler(int sig)
{
	int e = errno;

	(void)sig;
	sig_ck_pkru = rdpkru();
	sig_ck_r = tb_checkpoint_facts(sig_ck_name, sig_ck_facts);
	sig_ck_errno = errno;
	errno = e;
}

int rpal_checkpoint_in_handler(struct rpal_link *l, const char *name, const char *facts,
			       uint32_t pkru, uint32_t *in_handler)
{
	struct sigaction sa, old;
	uint32_t before = rdpkru();

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = checkpoint_handler;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, &old);
	sig_ck_name = name;
	sig_ck_facts = facts;
	sig_ck_r = 1;
	sig_ck_errno = 0;
	sig_ck_pkru = 0;
	wrpkru(pkru);
	raise(SIGUSR1);
	wrpkru(before);
	sigaction(SIGUSR1, &old, NULL);
	*in_handler = sig_ck_pkru;
	rpal_check(l, sig_ck_r == 0, "checkpoint", "%s (in a signal handler entered with "
		   "PKRU %#x): %s", name, pkru, sig_ck_r == 1 ? "the handler did not run" :
		   sig_ck_r ? strerror(sig_ck_errno) : "taken");
	return sig_ck_r ? -1 : 0;
}

void rpal_pair_checkpoint(struct rpal_link *l, int taker, const char *name, const char *facts)
{
	rpal_link_sync(l, '<');
	if (taker)
		rpal_checkpoint(l, name, facts);
	rpal_link_sync(l, '>');
}

int rpal_brk_step(struct rpal_link *l, const struct rpal_svc *me, int pages, int give_back)
{
	uint32_t pkru = rdpkru();
	struct rpal_fault f = { 0 };
	char *p;
	int i, bad = 0, r;

	rpal_step(l, "brk_tagged");
	p = sbrk(0);
	p = (char *)(((uintptr_t)p + 4095) & ~4095ul);
	if (brk(p + (size_t)pages * 4096)) {
		rpal_check(l, 0, "brk_tagged", "brk(%p) -> %s", p + pages * 4096, strerror(errno));
		return 1;
	}
	for (i = 0; i < pages; i++) {
		r = rpal_try_write64((uint64_t *)(p + i * 4096), me->key, 3000, &f);
		if (r && !bad++)
			rpal_check(l, 0, "brk_tagged", "brk page %d at %p, PKRU %#x: %s", i,
				   p + i * 4096, pkru, rpal_fault_str(&f));
	}
	rpal_check(l, !bad && rpal_slot_of(p) == (int)me->id + 1, "brk_tagged",
		   "%d of %d new brk pages at %p (slot %d, ours %d) written with PKRU %#x",
		   pages - bad, pages, p, rpal_slot_of(p), (int)me->id + 1, pkru);
	wrpkru(pkru & ~3u);
	for (i = 0; i < pages; i++)
		rpal_try_write64((uint64_t *)(p + i * 4096), me->key, 3000, &f);
	wrpkru(pkru);
	if (give_back && brk(p + (size_t)(pages - 1) * 4096))
		rpal_check(l, 0, "brk_tagged", "giving back a brk page: %s", strerror(errno));
	return bad ? 1 : 0;
}

int rpal_dead_key_step(struct rpal_link *l, int fd, uint64_t peer_key)
{
	uint64_t dead[4] = { 0 };
	int r;

	rpal_step(l, "dead_key");
	r = rpal_poll_dead(fd, 5000);
	if (r == 1)
		r = rpal_read_dead(fd, dead, 4);
	rpal_check(l, r >= 1 && dead[0] == peer_key, "dead_key",
		   "poll/read of /proc/rpal after the peer's exit -> %d, key %llu (peer %llu)", r,
		   (unsigned long long)(r >= 1 ? dead[0] : 0), (unsigned long long)peer_key);
	return r >= 1 && dead[0] == peer_key ? 0 : 1;
}

int rpal_pin_cpu(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set) ? -errno : 0;
}

int rpal_nr_cpus(void)
{
	cpu_set_t set;

	if (sched_getaffinity(0, sizeof(set), &set))
		return 1;
	return CPU_COUNT(&set);
}
