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
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

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
int rpal_try_read64(const volatile uint64_t *p, uint64_t *out, int timeout_ms,
		    struct rpal_fault *f)
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
	*out = *p;
	try_done();
	*f = try_fault;
	return 0;
}

int rpal_try_write64(volatile uint64_t *p, uint64_t v, int timeout_ms,
		     struct rpal_fault *f)
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
	*p = v;
	try_done();
	*f = try_fault;
	return 0;
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

int rpal_link_send(struct rpal_link *l, const void *buf, int len)
{
	return write(l->wfd, buf, len) == len ? 0 : -1;
}

int rpal_link_recv(struct rpal_link *l, void *buf, int len)
{
	char *p = buf;
	int got = 0;

	while (got < len) {
		ssize_t n = read(l->rfd, p + got, len - got);

		if (n <= 0)
			return -1;
		got += n;
	}
	return 0;
}

int rpal_link_sync(struct rpal_link *l, char tag)
{
	char c;

	if (rpal_link_send(l, &tag, 1) || rpal_link_recv(l, &c, 1))
		return -1;
	return c == tag ? 0 : -1;
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

static pid_t spawn_role(const char *role, int rfd, int wfd, int extra_argc,
			char **extra_argv)
{
	char r[16], w[16];
	char *argv[64];
	int i, n = 0;
	pid_t pid;

	snprintf(r, sizeof(r), "%d", rfd);
	snprintf(w, sizeof(w), "%d", wfd);
	argv[n++] = "/proc/self/exe";
	argv[n++] = (char *)role;
	argv[n++] = r;
	argv[n++] = w;
	for (i = 0; i < extra_argc && n < 62; i++)
		argv[n++] = extra_argv[i];
	argv[n] = NULL;
	pid = fork();
	if (pid == 0) {
		execv("/proc/self/exe", argv);
		perror("execv");
		_exit(127);
	}
	return pid;
}

int rpal_run_pair(const char *role_a, const char *role_b, int extra_argc,
		  char **extra_argv)
{
	int ab[2], ba[2], status, ok = 1, i;
	pid_t pids[2];

	if (pipe(ab) || pipe(ba)) {
		perror("pipe");
		return 1;
	}
	fflush(stdout);
	pids[0] = spawn_role(role_a, ba[0], ab[1], extra_argc, extra_argv);
	pids[1] = spawn_role(role_b, ab[0], ba[1], extra_argc, extra_argv);
	close(ab[0]); close(ab[1]); close(ba[0]); close(ba[1]);
	for (i = 0; i < 2; i++) {
		const char *role = i ? role_b : role_a;

		if (pids[i] < 0 || waitpid(pids[i], &status, 0) < 0) {
			printf("parent: FAIL %s: could not run it\n", role);
			ok = 0;
			continue;
		}
		if (WIFSIGNALED(status)) {
			printf("parent: FAIL %s: killed by signal %d\n", role,
			       WTERMSIG(status));
			ok = 0;
		} else if (WEXITSTATUS(status)) {
			printf("parent: %s exited with status %d\n", role,
			       WEXITSTATUS(status));
			ok = 0;
		}
	}
	fflush(stdout);
	return ok ? 0 : 1;
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
