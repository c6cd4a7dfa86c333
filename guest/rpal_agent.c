/*
 * tb-rpal_agent: creates RPAL services (execs of tb-rpal_svc) and makes them do
 * operations on the host's command, over the virtio-serial port org.testbed.agent.
 * Protocol: guest/AGENT-PROTOCOL.md. Not an RPAL service itself (not stamped).
 *
 *   tb-rpal_agent [--daemon] [--stdio] [--port NAME] [--svc PATH] [--no-swap]
 *
 * One command at a time: a service op is forwarded to its service over a socketpair
 * and the answer comes back within the command's deadline, or the service is killed
 * and the answer is "timeout". A service that dies is reported, never waited for.
 */
#define _GNU_SOURCE
#include "agent_proto.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_PORT "org.testbed.agent"
#define MAX_SVCS 64
#define DEFAULT_TIMEOUT_MS 10000
#define SPAWN_TIMEOUT_MS 30000
#define MAX_TIMEOUT_MS 120000
#define ZRAM_SIZE "64M"

struct svc {
	char name[33];
	pid_t pid;
	int fd;
	int cpu;
	struct ap_reader rd;
};

static struct svc svcs[MAX_SVCS];
static int nsvcs;

/* Holders (op fill): registered services that only hold an RPAL id, to exhaust them. */
#define MAX_HOLDERS 300
struct holder {
	pid_t pid;
	int fd;
};
static struct holder holders[MAX_HOLDERS];
static int nholders;
static int in_fd = -1, out_fd = -1, sig_fd = -1;
static const char *svc_path = "/usr/bin/tb-rpal_svc";
static int swap_on;
static long swap_kib;

static void emit(struct ap_ans *a)
{
	size_t n = ap_end(a);

	if (ap_write_all(out_fd, a->buf, n) < 0)
		_exit(4);
}

static void log_event(const char *what)
{
	struct ap_ans a;

	ap_event(&a, "log");
	ap_add(&a, "text=%s", what);
	emit(&a);
}

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

static int find_port(const char *want, char *dev, size_t len)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	struct dirent *e;
	int found = -1;

	if (!d)
		return -1;
	while ((e = readdir(d)) != NULL) {
		char path[512], name[128] = "";
		FILE *f;

		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
		f = fopen(path, "r");
		if (!f)
			continue;
		if (fgets(name, sizeof(name), f))
			name[strcspn(name, "\n")] = 0;
		fclose(f);
		if (strcmp(name, want) == 0) {
			snprintf(dev, len, "/dev/%s", e->d_name);
			found = 0;
			break;
		}
	}
	closedir(d);
	return found;
}

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC), r = 0;

	if (fd < 0)
		return -errno;
	if (write(fd, text, strlen(text)) < 0)
		r = -errno;
	close(fd);
	return r;
}

static int run_wait(char *const argv[])
{
	int st;
	pid_t p = fork();

	if (p < 0)
		return -1;
	if (p == 0) {
		int devnull = open("/dev/null", O_RDWR);

		dup2(devnull, 1);
		dup2(devnull, 2);
		execv(argv[0], argv);
		_exit(127);
	}
	while (waitpid(p, &st, 0) < 0 && errno == EINTR)
		;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static long read_swap_kib(void)
{
	FILE *f = fopen("/proc/swaps", "r");
	char line[256];
	long total = 0, size;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (line[0] == '/' && sscanf(line, "%*s %*s %ld", &size) == 1)
			total += size;
	fclose(f);
	return total;
}

/* zram swap, so that madvise(MADV_PAGEOUT) really reclaims anonymous pages */
static void setup_swap(void)
{
	char *mk[] = { "/bin/busybox", "mkswap", "/dev/zram0", NULL };
	char *on[] = { "/bin/busybox", "swapon", "/dev/zram0", NULL };
	struct stat st;

	swap_kib = read_swap_kib();
	if (swap_kib > 0) {
		swap_on = 1;
		return;
	}
	if (stat("/sys/block/zram0", &st) != 0)
		return;		/* no CONFIG_ZRAM: swap=0 in the hello */
	write_file("/sys/block/zram0/disksize", ZRAM_SIZE);
	if (run_wait(mk) == 0 && run_wait(on) == 0) {
		swap_kib = read_swap_kib();
		swap_on = swap_kib > 0;
	}
}

static struct svc *find_svc(const char *name)
{
	int i;

	for (i = 0; i < nsvcs; i++)
		if (!strcmp(svcs[i].name, name))
			return &svcs[i];
	return NULL;
}

static struct svc *svc_of_pid(pid_t pid)
{
	int i;

	for (i = 0; i < nsvcs; i++)
		if (svcs[i].pid == pid)
			return &svcs[i];
	return NULL;
}

static void drop_svc(struct svc *s)
{
	close(s->fd);
	*s = svcs[--nsvcs];
}

/* Reaped processes that nobody waits for: "* exited". */
static void report_exit(pid_t pid, int st)
{
	struct svc *s = svc_of_pid(pid);
	struct ap_ans a;

	ap_event(&a, "exited");
	if (s)
		ap_add(&a, "svc=%s", s->name);
	else
		ap_add(&a, "child=%d", (int)pid);
	ap_add(&a, "pid=%d status=%d sig=%d", (int)pid, WIFEXITED(st) ? WEXITSTATUS(st) : 0,
	       WIFSIGNALED(st) ? WTERMSIG(st) : 0);
	emit(&a);
	if (s)
		drop_svc(s);
}

static void drain_sigchld(void)
{
	struct signalfd_siginfo si;

	while (read(sig_fd, &si, sizeof(si)) == sizeof(si))
		;
}

/* Reap everything; for @wanted (a service being waited for) return its status. */
static int reap(pid_t wanted, int *wanted_st)
{
	int st, got = 0;
	pid_t p;

	drain_sigchld();
	while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
		if (p == wanted) {
			*wanted_st = st;
			got = 1;
		} else {
			report_exit(p, st);
		}
	}
	return got;
}

/* Wait up to @ms for @pid to end (after its socket closed); SIGKILL it after that. */
static int reap_blocking(pid_t pid, int ms, int *st)
{
	long end = now_ms() + ms;

	while (now_ms() < end) {
		if (reap(pid, st))
			return 0;
		sleep_ms(2);
	}
	kill(pid, SIGKILL);
	end = now_ms() + 5000;
	while (now_ms() < end) {
		if (reap(pid, st))
			return 1;
		sleep_ms(2);
	}
	*st = 0;
	return 1;
}

/* Lines from a service between commands: forward events, note strays. */
static void service_idle_input(struct svc *s)
{
	char line[AP_LINE_MAX];
	int r = ap_fill(&s->rd);

	if (r <= 0)
		return;		/* EOF: its SIGCHLD reports it */
	while ((r = ap_next_line(&s->rd, line)) != 0) {
		struct ap_ans a;

		if (r == 1 && line[0] == '*' && line[1] == ' ') {
			a.len = 0;
			a.overflow = 0;
			ap_add(&a, "%s", line);
			emit(&a);
		} else {
			log_event("stray_line_from_service");
		}
	}
}

/*
 * Send @line (the command as received) to @s and wait for the answer with @seq.
 * @expect_exit: the op ends the service (exit): its death is the answer.
 */
/* what @r's socket holds now, without waiting (a fork child may keep it open) */
static void fill_now(struct ap_reader *r)
{
	struct pollfd p = { r->fd, POLLIN, 0 };

	while (r->len < sizeof(r->buf) && poll(&p, 1, 0) == 1 && (p.revents & POLLIN))
		if (ap_fill(r) <= 0)
			break;
}

static void forward(struct svc *s, uint64_t seq, const char *line, int timeout_ms,
		    int expect_exit, struct ap_ans *a)
{
	char ans[AP_LINE_MAX];
	long end = now_ms() + timeout_ms;
	int st = 0, gone = 0;

	if (line) {
		char buf[AP_LINE_MAX + 1];
		size_t n = strlen(line);

		memcpy(buf, line, n);
		buf[n] = '\n';
		if (ap_write_all(s->fd, buf, n + 1) < 0)
			goto died;
	}
	for (;;) {
		struct pollfd p[2] = { { s->fd, POLLIN, 0 }, { sig_fd, POLLIN, 0 } };
		long left = end - now_ms();
		int r;

		while ((r = ap_next_line(&s->rd, ans)) != 0) {
			uint64_t got;
			char *sp;

			if (r == -2) {
				log_event("overlong_line_from_service");
				continue;
			}
			if (ans[0] == '*' && ans[1] == ' ') {
				a->len = 0;
				a->overflow = 0;
				ap_add(a, "%s", ans);
				emit(a);
				continue;
			}
			sp = strchr(ans, ' ');
			if (sp)
				*sp = 0;
			if (ap_parse_u64(ans, &got) || got != seq || !sp) {
				log_event("stray_answer_from_service");
				continue;
			}
			*sp = ' ';
			/* after the death only a spawn's failed exec (its errno) counts */
			if (gone && (line || !strstr(ans, " err ")))
				continue;
			a->len = 0;
			a->overflow = 0;
			ap_add(a, "%s", ans);
			if (gone)
				s->pid = 0;	/* reaped: nobody may wait for or kill it */
			return;
		}
		if (gone)
			goto reaped;
		if (left <= 0) {
			kill(s->pid, SIGKILL);
			reap_blocking(s->pid, 5000, &st);
			ap_begin(a, seq, "timeout");
			ap_add(a, "svc=%s ms=%d", s->name, timeout_ms);
			drop_svc(s);
			return;
		}
		r = poll(p, 2, (int)(left > 1000 ? 1000 : left));
		if (r < 0 && errno != EINTR)
			goto died;
		if (p[1].revents & POLLIN) {
			if (reap(s->pid, &st)) {
				/* its last words (an exec's errno, say) may still be in the
				 * socket when the SIGCHLD comes: read them before the death */
				fill_now(&s->rd);
				gone = 1;
				continue;
			}
		}
		if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
			r = ap_fill(&s->rd);
			if (r <= 0 && r != -EINTR && r != -EAGAIN)
				goto died;
		}
	}
died:
	reap_blocking(s->pid, 3000, &st);
reaped:
	ap_begin(a, seq, expect_exit ? "ok" : "died");
	if (!expect_exit)
		ap_add(a, "svc=%s", s->name);
	ap_add(a, "pid=%d sig=%d status=%d", (int)s->pid, WIFSIGNALED(st) ? WTERMSIG(st) : 0,
	       WIFEXITED(st) ? WEXITSTATUS(st) : 0);
	drop_svc(s);
}

static void do_spawn(const struct ap_cmd *c, struct ap_ans *a)
{
	const char *name = ap_get(c, "svc");
	uint64_t cpu, tmo;
	int sv[2];
	pid_t pid;
	struct svc *s;

	if (!name || !ap_name_ok(name, 32)) {
		ap_bad(a, c->seq, "svc");
		return;
	}
	if (find_svc(name)) {
		ap_bad(a, c->seq, "exists");
		return;
	}
	if (nsvcs == MAX_SVCS) {
		ap_bad(a, c->seq, "limit");
		return;
	}
	if (ap_u64(c, "cpu", 0, &cpu) < 0 || cpu > 1023 ||
	    ap_u64(c, "timeout_ms", SPAWN_TIMEOUT_MS, &tmo) < 0) {
		ap_bad(a, c->seq, "arg");
		return;
	}
	if (tmo > MAX_TIMEOUT_MS)
		tmo = MAX_TIMEOUT_MS;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv)) {
		ap_err(a, c->seq, errno);
		return;
	}
	pid = fork();
	if (pid < 0) {
		ap_err(a, c->seq, errno);
		close(sv[0]);
		close(sv[1]);
		return;
	}
	if (pid == 0) {
		char fdb[16], seqb[24], cpub[16], nameb[40];
		char *argv[] = { "tb-rpal_svc", "--fd", fdb, "--seq", seqb, "--cpu", cpub,
				 "--name", nameb, NULL };
		struct ap_ans e;
		sigset_t none;
		int fd = dup(sv[1]);	/* without CLOEXEC */

		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		snprintf(fdb, sizeof(fdb), "%d", fd);
		snprintf(seqb, sizeof(seqb), "%llu", (unsigned long long)c->seq);
		snprintf(cpub, sizeof(cpub), "%d", (int)cpu);
		snprintf(nameb, sizeof(nameb), "%s", name);
		execv(svc_path, argv);
		ap_err(&e, c->seq, errno);	/* e.g. ENOSPC: no free RPAL id */
		ap_write_all(fd, e.buf, ap_end(&e));
		_exit(127);
	}
	close(sv[1]);
	s = &svcs[nsvcs++];
	memset(s, 0, sizeof(*s));
	snprintf(s->name, sizeof(s->name), "%s", name);
	s->pid = pid;
	s->fd = sv[0];
	s->cpu = (int)cpu;
	s->rd.fd = sv[0];
	forward(s, c->seq, NULL, (int)tmo, 0, a);
	/* an exec that failed answered "err" and exits: drop it at once */
	if (a->len > 0 && strstr(a->buf, " err ") && (s = find_svc(name)) != NULL) {
		int st;

		if (s->pid > 0)
			reap_blocking(s->pid, 3000, &st);
		drop_svc(s);
	}
}

/* One holder: exec of tb-rpal_svc that registers and then idles. Returns its id (>= 0),
 * or -errno when the exec (the registration) failed. */
static long spawn_holder(long *key)
{
	int sv[2], r;
	pid_t pid;
	struct ap_reader rd;
	char line[AP_LINE_MAX];
	long end;

	if (nholders == MAX_HOLDERS)
		return -EMFILE;
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		return -errno;
	pid = fork();
	if (pid < 0) {
		r = errno;
		close(sv[0]);
		close(sv[1]);
		return -r;
	}
	if (pid == 0) {
		char fdb[16];
		char *argv[] = { "tb-rpal_svc", "--fd", fdb, "--seq", "1", "--cpu", "0",
				 "--name", "holder", NULL };
		struct ap_ans e;
		sigset_t none;
		int fd = dup(sv[1]);

		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		snprintf(fdb, sizeof(fdb), "%d", fd);
		execv(svc_path, argv);
		ap_err(&e, 1, errno);
		ap_write_all(fd, e.buf, ap_end(&e));
		_exit(127);
	}
	close(sv[1]);
	memset(&rd, 0, sizeof(rd));
	rd.fd = sv[0];
	end = now_ms() + SPAWN_TIMEOUT_MS;
	for (;;) {
		struct pollfd p = { sv[0], POLLIN, 0 };

		r = ap_next_line(&rd, line);
		if (r > 0)
			break;
		if (now_ms() >= end || poll(&p, 1, 100) < 0 ||
		    ((p.revents & POLLIN) && ap_fill(&rd) <= 0)) {
			r = -1;
			break;
		}
	}
	{
		const char *id = r > 0 ? strstr(line, " id=") : NULL;
		const char *en = r > 0 ? strstr(line, " errno=") : NULL;
		long v = -EIO;

		const char *k = r > 0 ? strstr(line, " key=") : NULL;

		if (id && !strncmp(line, "1 ok ", 5))
			v = strtol(id + 4, NULL, 10);
		if (k && v >= 0)
			*key = strtol(k + 5, NULL, 10);
		else if (en)
			v = -strtol(en + 7, NULL, 10);
		if (v < 0) {
			int st;

			close(sv[0]);
			kill(pid, SIGKILL);
			waitpid(pid, &st, 0);
			return v;
		}
		holders[nholders].pid = pid;
		holders[nholders].fd = sv[0];
		nholders++;
		return v;
	}
}

/* fill [max=N]: register holders until the kernel refuses (no free id), then try once
 * more ("again": a refused registration must free nothing). */
static void do_fill(const struct ap_cmd *c, struct ap_ans *a)
{
	static char ids[MAX_HOLDERS * 5 + 8];
	uint64_t max;
	size_t m = 0;
	int held = 0;
	long v = 0, again, key = -1;

	if (ap_u64(c, "max", MAX_HOLDERS, &max) < 0 || max > MAX_HOLDERS) {
		ap_bad(a, c->seq, "arg");
		return;
	}
	ids[0] = 0;
	while ((uint64_t)held < max) {
		v = spawn_holder(&key);
		if (v < 0)
			break;
		m += (size_t)snprintf(ids + m, sizeof(ids) - m, "%s%ld", held ? "," : "", v);
		held++;
	}
	ap_begin(a, c->seq, "ok");
	ap_add(a, "held=%d ids=%s", held, held ? ids : "none");
	if (v < 0) {
		ap_add(a, "err=%s", ap_errname((int)-v));
		again = spawn_holder(&key);
		if (again >= 0)
			ap_add(a, "again_id=%ld", again);
		else
			ap_add(a, "again=%s", ap_errname((int)-again));
	}
	if (key >= 0)
		ap_add(a, "last_key=%ld", key);
}

/* unfill: end every holder (their ids go the way of any dead service's). */
static void do_unfill(const struct ap_cmd *c, struct ap_ans *a)
{
	int n = nholders, i, st;

	for (i = 0; i < nholders; i++) {
		close(holders[i].fd);
		kill(holders[i].pid, SIGKILL);
	}
	for (i = 0; i < nholders; i++)
		waitpid(holders[i].pid, &st, 0);
	nholders = 0;
	ap_begin(a, c->seq, "ok");
	ap_add(a, "killed=%d", n);
}

static void do_vmstat(const struct ap_cmd *c, struct ap_ans *a)
{
	static const char *dflt = "pswpin,pswpout,pgmigrate_success,pgmigrate_fail,"
				  "compact_migrate_scanned,compact_isolated,thp_fault_alloc,"
				  "thp_collapse_alloc,nr_anon_transparent_hugepages,nr_swapcached";
	const char *want = ap_get(c, "keys");
	FILE *f = fopen("/proc/vmstat", "r");
	char wl[1024], name[64];
	unsigned long long v;

	if (!want)
		want = dflt;
	if (strlen(want) >= sizeof(wl) - 2) {
		ap_bad(a, c->seq, "arg");
		if (f)
			fclose(f);
		return;
	}
	if (!f) {
		ap_err(a, c->seq, errno);
		return;
	}
	snprintf(wl, sizeof(wl), ",%s,", want);
	ap_begin(a, c->seq, "ok");
	while (fscanf(f, "%63s %llu", name, &v) == 2) {
		char pat[80];

		snprintf(pat, sizeof(pat), ",%s,", name);
		if (strstr(wl, pat))
			ap_add(a, "%s=%llu", name, v);
	}
	fclose(f);
	/* /proc/vmstat has no event counters without CONFIG_VM_EVENT_COUNTERS (tinyconfig):
	 * swap in use and THP pages are the evidence then */
	{
		FILE *sw = fopen("/proc/swaps", "r");
		char line[256];
		long used = 0, u;

		if (sw) {
			while (fgets(line, sizeof(line), sw))
				if (line[0] == '/' && sscanf(line, "%*s %*s %*s %ld", &u) == 1)
					used += u;
			fclose(sw);
		}
		ap_add(a, "swap_used_kib=%ld", used);
	}
}

static int path_ok(const char *p)
{
	if (!p || !*p || strstr(p, "..") || p[0] == '/')
		return 0;
	for (; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_' ||
		      *p == '/'))
			return 0;
	return 1;
}

static void quit_all(void)
{
	int st;
	struct ap_cmd none;
	struct ap_ans dummy;

	memset(&none, 0, sizeof(none));
	do_unfill(&none, &dummy);
	while (nsvcs) {
		kill(svcs[0].pid, SIGKILL);
		reap_blocking(svcs[0].pid, 3000, &st);
		if (nsvcs && svc_of_pid(svcs[0].pid) == &svcs[0])
			drop_svc(&svcs[0]);
	}
}

static void handle_line(char *line)
{
	char copy[AP_LINE_MAX];
	struct ap_cmd c;
	struct ap_ans a;
	const char *why;

	snprintf(copy, sizeof(copy), "%s", line);
	why = ap_parse(line, &c);
	if (why) {
		ap_bad(&a, c.seq, why);
		emit(&a);
		return;
	}
	if (!strcmp(c.op, "hello")) {
		ap_begin(&a, c.seq, "ok");
		ap_add(&a, "version=1 pid=%d cpus=%ld swap=%d swap_kib=%ld", (int)getpid(),
		       sysconf(_SC_NPROCESSORS_ONLN), swap_on, swap_kib);
	} else if (!strcmp(c.op, "spawn")) {
		do_spawn(&c, &a);
	} else if (!strcmp(c.op, "list")) {
		char buf[MAX_SVCS * 34 + 8];
		size_t n = 0;
		int i;

		buf[0] = 0;
		for (i = 0; i < nsvcs; i++)
			n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s%s", i ? "," : "",
					      svcs[i].name);
		ap_begin(&a, c.seq, "ok");
		ap_add(&a, "svcs=%s", nsvcs ? buf : "none");
	} else if (!strcmp(c.op, "kill")) {
		const char *name = ap_get(&c, "svc");
		struct svc *s = name ? find_svc(name) : NULL;
		uint64_t sig;

		if (ap_u64(&c, "sig", SIGKILL, &sig) < 0 || sig > 64) {
			ap_bad(&a, c.seq, "arg");
		} else if (!s) {
			ap_bad(&a, c.seq, "no_svc");
		} else if (kill(s->pid, (int)sig) < 0) {
			ap_err(&a, c.seq, errno);
		} else {
			ap_begin(&a, c.seq, "ok");
		}
	} else if (!strcmp(c.op, "vmstat")) {
		do_vmstat(&c, &a);
	} else if (!strcmp(c.op, "clearwarn")) {
		/* re-arm every WARN_ON_ONCE, so that a sequence replayed on the same guest
		 * (shrinking) can show the kernel's warning again */
		const char *f = "/sys/kernel/debug/clear_warn_once";
		int r;

		if (access(f, F_OK) && mount("debugfs", "/sys/kernel/debug", "debugfs", 0, NULL))
			r = -errno;
		else
			r = write_file(f, "1");
		if (r < 0)
			ap_err(&a, c.seq, -r);
		else
			ap_begin(&a, c.seq, "ok");
	} else if (!strcmp(c.op, "fill")) {
		do_fill(&c, &a);
	} else if (!strcmp(c.op, "unfill")) {
		do_unfill(&c, &a);
	} else if (!strcmp(c.op, "compact")) {
		int r = write_file("/proc/sys/vm/compact_memory", "1");

		if (r < 0)
			ap_err(&a, c.seq, -r);
		else
			ap_begin(&a, c.seq, "ok");
	} else if (!strcmp(c.op, "sysctl") || !strcmp(c.op, "thp")) {
		char path[300];
		const char *val;
		int r;

		if (c.op[0] == 't') {
			val = ap_get(&c, "mode");
			if (!val || (strcmp(val, "always") && strcmp(val, "madvise") &&
				     strcmp(val, "never"))) {
				ap_bad(&a, c.seq, "arg");
				emit(&a);
				return;
			}
			snprintf(path, sizeof(path), "/sys/kernel/mm/transparent_hugepage/enabled");
		} else {
			const char *p = ap_get(&c, "path");
			uint64_t dummy;

			val = ap_get(&c, "value");
			if (!path_ok(p) || strlen(p) > 200 || ap_parse_u64(val, &dummy)) {
				ap_bad(&a, c.seq, "arg");
				emit(&a);
				return;
			}
			snprintf(path, sizeof(path), "/proc/sys/%s", p);
		}
		r = write_file(path, val);
		if (r < 0)
			ap_err(&a, c.seq, -r);
		else
			ap_begin(&a, c.seq, "ok");
	} else if (!strcmp(c.op, "quit")) {
		quit_all();
		ap_begin(&a, c.seq, "ok");
		emit(&a);
		exit(0);
	} else {
		const char *name = ap_get(&c, "svc");
		struct svc *s;
		uint64_t tmo;

		if (!name) {
			ap_bad(&a, c.seq, "op");
		} else if (!(s = find_svc(name))) {
			ap_bad(&a, c.seq, "no_svc");
		} else if (ap_u64(&c, "timeout_ms", DEFAULT_TIMEOUT_MS, &tmo) < 0) {
			ap_bad(&a, c.seq, "arg");
		} else {
			if (tmo > MAX_TIMEOUT_MS)
				tmo = MAX_TIMEOUT_MS;
			forward(s, c.seq, copy, (int)tmo, !strcmp(c.op, "exit"), &a);
		}
	}
	emit(&a);
}

static void usage(void)
{
	fprintf(stderr, "usage: tb-rpal_agent [--daemon] [--stdio] [--port NAME] [--svc PATH]"
		" [--no-swap] [--cpu N|-1]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *port = AGENT_PORT;
	int daemon_ = 0, stdio_ = 0, swap = 1, agent_cpu = 0, i;
	struct ap_reader rd;
	sigset_t chld;
	char dev[300];

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--daemon"))
			daemon_ = 1;
		else if (!strcmp(argv[i], "--stdio"))
			stdio_ = 1;
		else if (!strcmp(argv[i], "--no-swap"))
			swap = 0;
		else if (!strcmp(argv[i], "--port") && i + 1 < argc)
			port = argv[++i];
		else if (!strcmp(argv[i], "--svc") && i + 1 < argc)
			svc_path = argv[++i];
		else if (!strcmp(argv[i], "--cpu") && i + 1 < argc)
			agent_cpu = atoi(argv[++i]);	/* -1: not pinned */
		else
			usage();
	}
	if (access(svc_path, X_OK) != 0) {
		fprintf(stderr, "tb-rpal_agent: service binary %s is missing (--svc PATH)\n",
			svc_path);
		return 1;
	}
	if (stdio_) {
		in_fd = 0;
		out_fd = 1;
	} else {
		if (find_port(port, dev, sizeof(dev)) != 0) {
			fprintf(stderr, "tb-rpal_agent: no virtio-serial port named %s\n", port);
			return 1;
		}
		in_fd = out_fd = open(dev, O_RDWR | O_CLOEXEC);
		if (in_fd < 0) {
			fprintf(stderr, "tb-rpal_agent: cannot open %s: %s\n", dev, strerror(errno));
			return 1;
		}
	}
	if (daemon_) {
		pid_t p = fork();
		int devnull;

		if (p < 0)
			return 1;
		if (p > 0) {
			printf("tb-rpal_agent: started pid %d on %s\n", (int)p,
			       stdio_ ? "stdio" : dev);
			return 0;
		}
		setsid();
		devnull = open("/dev/null", O_RDWR);
		if (!stdio_) {
			dup2(devnull, 0);
			dup2(devnull, 1);
		}
		dup2(devnull, 2);
	}
	signal(SIGPIPE, SIG_IGN);
	if (agent_cpu >= 0) {
		/* keep the agent off the spinners' CPU: a context switch there to another
		 * mm reloads CR3 (no PCID under TCG) and flushes the very TLB entries a
		 * spinner is there to catch */
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(agent_cpu, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	prctl(PR_SET_CHILD_SUBREAPER, 1);	/* orphaned fork children come back to us */
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	sig_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	if (swap)
		setup_swap();
	{
		struct ap_ans a;

		ap_event(&a, "hello");
		ap_add(&a, "version=1 pid=%d cpus=%ld swap=%d swap_kib=%ld", (int)getpid(),
		       sysconf(_SC_NPROCESSORS_ONLN), swap_on, swap_kib);
		emit(&a);
	}
	memset(&rd, 0, sizeof(rd));
	rd.fd = in_fd;
	for (;;) {
		struct pollfd p[2 + MAX_SVCS];
		char line[AP_LINE_MAX];
		int n = 0, r, k;

		while ((r = ap_next_line(&rd, line)) != 0) {
			if (r == -2) {
				struct ap_ans a;

				ap_bad(&a, 0, "too_long");
				emit(&a);
				continue;
			}
			handle_line(line);
		}
		p[n++] = (struct pollfd){ in_fd, POLLIN, 0 };
		p[n++] = (struct pollfd){ sig_fd, POLLIN, 0 };
		for (k = 0; k < nsvcs; k++)
			p[n++] = (struct pollfd){ svcs[k].fd, POLLIN, 0 };
		r = poll(p, (nfds_t)n, 1000);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return 5;
		}
		if (p[1].revents & POLLIN) {
			int dummy;

			reap(-1, &dummy);
			continue;	/* the service table may have changed */
		}
		for (k = 2; k < n; k++)
			if (p[k].revents & POLLIN) {
				struct svc *s = NULL;
				int j;

				for (j = 0; j < nsvcs; j++)
					if (svcs[j].fd == p[k].fd)
						s = &svcs[j];
				if (s)
					service_idle_input(s);
			}
		if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
			r = ap_fill(&rd);
			if (r == 0 || (p[0].revents & POLLHUP && r <= 0)) {
				if (stdio_) {
					quit_all();
					return 0;
				}
				sleep_ms(100);	/* the host is not connected (yet/again) */
			}
		}
	}
}
