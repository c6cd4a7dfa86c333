/*
 * tb-rpal_limits: the limits of the RPAL ABI.  (TESTBED_RPAL_SERVICE: the
 * build stamps e_ident[12..15] = "RPAL" into this binary, so every exec of
 * it registers a service and takes an id.)
 *
 * The main process spawns services ("hold" children: exec'd copies of this
 * program that report their id, key and pkey and then act on commands from a
 * pipe) and checks, printing "limits: ok|FAIL CHECK: ...":
 *   peer_limit  service C requests 15 peers that request it back: all 15 are
 *               mapped; C's request of a 16th fails with ENOSPC
 *                                                      (peer_limit_off_by_one)
 *               checkpoint "peers15": facts C.* P1.* .. P16.*, pairs C-P1..C-P15
 *   read_count  three of C's peers exit; C reads /proc/rpal with a count of 8
 *               bytes, then 12, then 32: each read returns one key (8 bytes)
 *               and nothing is written past count   (read_ignores_count)
 *   ids         services are exec'd until one fails with ENOSPC (every id
 *               taken); they all have different ids; the next exec fails
 *               with ENOSPC as well                  (exhaustion_frees_id)
 *   id_delay    one of them exits: within rpal.id_free_delay_ms (set to
 *               DELAY_MS here) no new service gets its id; after it, a new
 *               service starts                       (id_reused_at_once)
 * Exit status 0 only if every check passed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "rpal.h"
#include "tb_checkpoint.h"

#define DELAY_MS 500		/* rpal.id_free_delay_ms during the run */
#define NO_ENABLE (-2)		/* hold: register only (exec), no ENABLE */
#define MAX_CHILDREN (RPAL_NR_IDS + 8)
#define NR_PEERS (RPAL_MAX_PEERS + 1)
#define CANARY 0x5afe5afe5afe5afeull

struct hello {
	int32_t err;		/* 0, or -errno of the exec or of ENABLE */
	int32_t pid;
	uint64_t id, key;
	int32_t pkey, pad;
};

struct cmd {
	char op;		/* 'R' request arg (a key); 'D' read test; 'Q' quit */
	char pad[7];
	uint64_t arg;
};

struct child {
	pid_t pid;
	int rfd, wfd;		/* replies from it, commands to it */
	struct hello h;
};

static struct rpal_link out = { .role = "limits" };

static int read_full(int fd, void *buf, size_t len)
{
	char *p = buf;
	size_t got = 0;

	while (got < len) {
		ssize_t n = read(fd, p + got, len - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		got += n;
	}
	return 0;
}

static long ms_since(const struct timespec *t0)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (t.tv_sec - t0->tv_sec) * 1000 + (t.tv_nsec - t0->tv_nsec) / 1000000;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

/* ---- the hold child ---- */

/* C's read() test: three dead keys queued; count 8, 12, then 32 bytes. */
static int64_t read_test(int fd)
{
	uint64_t buf[4];
	size_t counts[3] = { 8, 12, 32 };
	ssize_t n;
	int i, j;

	fcntl(fd, F_SETFL, O_NONBLOCK);
	for (i = 0; i < 3; i++) {
		for (j = 0; j < 4; j++)
			buf[j] = CANARY;
		n = read(fd, buf, counts[i]);
		if (n != 8 || buf[1] != CANARY || buf[2] != CANARY || buf[3] != CANARY) {
			printf("limits: FAIL read_count: read %d (count %zu) returned %zd%s, "
			       "expected 8 (one key, as many as fit)\n", i + 1, counts[i],
			       n < 0 ? -(ssize_t)errno : n,
			       buf[1] != CANARY ? " and wrote past count" : "");
			fflush(stdout);
			return 1;
		}
	}
	n = read(fd, buf, sizeof(buf));
	if (!(n < 0 && errno == EAGAIN)) {
		printf("limits: FAIL read_count: a 4th read returned %zd, expected EAGAIN "
		       "(3 peers died)\n", n < 0 ? -(ssize_t)errno : n);
		fflush(stdout);
		return 1;
	}
	printf("limits: ok read_count: 3 dead keys read one per call with counts 8, 12 "
	       "and 32; nothing written past count; then EAGAIN\n");
	fflush(stdout);
	return 0;
}

static int hold(int rfd, int wfd, int pkey)
{
	struct hello h = { .pid = getpid(), .pkey = -1 };
	struct cmd c;
	int64_t r;
	int fd;

	prctl(PR_SET_NAME, "rpal-hold");	/* not "exe" (we are /proc/self/exe) */
	fd = rpal_open();
	if (fd < 0) {
		h.err = fd;
	} else if (pkey != NO_ENABLE && (h.pkey = rpal_enable(fd, pkey)) < 0) {
		h.err = h.pkey;
	} else {
		rpal_get_id(fd, &h.id);
		rpal_get_key(fd, &h.key);
	}
	if (write(wfd, &h, sizeof(h)) != sizeof(h) || h.err)
		return 1;
	while (read_full(rfd, &c, sizeof(c)) == 0) {
		switch (c.op) {
		case 'R':
			r = rpal_request(fd, c.arg);
			break;
		case 'D':
			r = read_test(fd);
			break;
		default:
			return 0;
		}
		if (write(wfd, &r, sizeof(r)) != sizeof(r))
			return 1;
	}
	return 0;		/* the main process closed the pipe: quit */
}

/* ---- the main process ---- */

/* Exec a hold child; 0, or -errno of its exec / open / enable. */
static int spawn(struct child *c, int pkey)
{
	int cmd[2], rep[2], err;

	if (pipe2(cmd, O_CLOEXEC) || pipe2(rep, O_CLOEXEC))
		return -errno;
	fflush(stdout);
	c->pid = fork();
	if (c->pid == 0) {
		char a[16], b[16], k[16];

		fcntl(cmd[0], F_SETFD, 0);
		fcntl(rep[1], F_SETFD, 0);
		snprintf(a, sizeof(a), "%d", cmd[0]);
		snprintf(b, sizeof(b), "%d", rep[1]);
		snprintf(k, sizeof(k), "%d", pkey);
		execl("/proc/self/exe", "tb-rpal_limits", "hold", a, b, k, (char *)NULL);
		c->h.err = -errno;
		if (write(rep[1], &c->h, sizeof(c->h)) < 0)
			_exit(126);
		_exit(127);
	}
	close(cmd[0]);
	close(rep[1]);
	c->rfd = rep[0];
	c->wfd = cmd[1];
	memset(&c->h, 0, sizeof(c->h));
	err = c->pid < 0 ? -EAGAIN : read_full(c->rfd, &c->h, sizeof(c->h)) ? -EPIPE : c->h.err;
	if (err) {
		close(c->rfd);
		close(c->wfd);
		if (c->pid > 0)
			waitpid(c->pid, NULL, 0);
		c->pid = 0;
	}
	return err;
}

static void quit(struct child *c)
{
	if (c->pid <= 0)
		return;
	close(c->wfd);
	close(c->rfd);
	waitpid(c->pid, NULL, 0);
	c->pid = 0;
}

static int64_t command(struct child *c, char op, uint64_t arg)
{
	struct cmd m = { .op = op, .arg = arg };
	int64_t r;

	if (write(c->wfd, &m, sizeof(m)) != sizeof(m) || read_full(c->rfd, &r, sizeof(r)))
		return -EPIPE;
	return r;
}

static const char *res_name(int64_t r)
{
	static char buf[32];

	if (r < 0)
		return rpal_errname((int)r);
	snprintf(buf, sizeof(buf), "%lld", (long long)r);
	return buf;
}

static int set_delay(int ms)
{
	FILE *f = fopen("/sys/module/rpal/parameters/id_free_delay_ms", "w");
	int ok;

	if (!f)
		return -errno;
	ok = fprintf(f, "%d\n", ms) > 0;
	return fclose(f) == 0 && ok ? 0 : -EIO;
}

static void peers_and_read(void)
{
	static struct child cc, peer[NR_PEERS];
	char facts[3072], pairs[512] = "";
	int i, n, r, pkey, mapped = 0, err;
	int64_t a, b;

	/* C has pkey 1; its 15 peers the 15 others; the 16th shares pkey 2. */
	err = spawn(&cc, 1);
	for (i = 0; !err && i < NR_PEERS; i++) {
		pkey = i == 0 ? 0 : i < RPAL_MAX_PEERS ? i + 1 : 2;
		err = spawn(&peer[i], pkey);
	}
	if (err) {
		rpal_check(&out, 0, "peer_limit", "could not start 17 services: %s",
			   rpal_errname(err));
		goto done;
	}
	for (i = 0; i < RPAL_MAX_PEERS; i++) {
		a = command(&peer[i], 'R', cc.h.key);
		b = command(&cc, 'R', peer[i].h.key);
		if (a != 0 || b != 1) {
			rpal_check(&out, 0, "peer_limit", "request %d of %d: peer -> %s, C -> %s "
				   "(expected 0 and 1: mapped)", i + 1, RPAL_MAX_PEERS, res_name(a),
				   res_name(b));
			continue;
		}
		mapped++;
		n = strlen(pairs);
		snprintf(pairs + n, sizeof(pairs) - n, "%sC-P%d", n ? "," : "", i + 1);
	}
	a = command(&peer[RPAL_MAX_PEERS], 'R', cc.h.key);
	b = command(&cc, 'R', peer[RPAL_MAX_PEERS].h.key);
	if (mapped == RPAL_MAX_PEERS)
		rpal_check(&out, a == 0 && b == -ENOSPC, "peer_limit",
			   "15 peers mapped; request of a 16th: %s (expected ENOSPC)", res_name(b));

	n = snprintf(facts, sizeof(facts), "C.pid=%d C.id=%llu C.key=%llu C.pkey=%d",
		     cc.h.pid, (unsigned long long)cc.h.id, (unsigned long long)cc.h.key,
		     cc.h.pkey);
	for (i = 0; i < NR_PEERS; i++)
		n += snprintf(facts + n, sizeof(facts) - n,
			      " P%d.pid=%d P%d.id=%llu P%d.key=%llu P%d.pkey=%d", i + 1,
			      peer[i].h.pid, i + 1, (unsigned long long)peer[i].h.id, i + 1,
			      (unsigned long long)peer[i].h.key, i + 1, peer[i].h.pkey);
	snprintf(facts + n, sizeof(facts) - n, " pairs=%s", *pairs ? pairs : "none");
	r = tb_checkpoint_facts("peers15", facts);
	rpal_check(&out, r == 0, "checkpoint", "peers15: %s", r ? strerror(errno) : "taken");

	/* three peers die: C must get their keys, one per 8 bytes of count */
	for (i = 0; i < 3; i++)
		quit(&peer[i]);
	a = command(&cc, 'D', 0);
	if (a)
		out.failures++;	/* C printed the verdict */
done:
	quit(&cc);
	for (i = 0; i < NR_PEERS; i++)
		quit(&peer[i]);
}

static void ids(void)
{
	static struct child kids[MAX_CHILDREN];
	static char holder[RPAL_NR_IDS];
	struct child extra = { 0 };
	uint64_t self_id = 0, k;
	int fd = rpal_open(), n = 0, i, err = 0, tries, dup = -1, victim, late = 0;
	struct timespec t0;
	long waited;

	if (fd >= 0)
		rpal_get_id(fd, &self_id);
	if (self_id < RPAL_NR_IDS)
		holder[self_id] = 1;
	while (n < MAX_CHILDREN && !(err = spawn(&kids[n], NO_ENABLE))) {
		k = kids[n].h.id;
		if (k >= RPAL_NR_IDS || holder[k])
			dup = n;
		else
			holder[k] = 1;
		n++;
	}
	if (err != -ENOSPC || dup >= 0 || n == 0) {
		rpal_check(&out, 0, "ids", "after %d services: exec -> %s (expected ENOSPC)%s",
			   n, rpal_errname(err), dup >= 0 ? "; two live services share an id" : "");
		goto done;
	}
	/* once more: a failed registration must not free anything */
	err = spawn(&extra, NO_ENABLE);
	if (err == 0 && extra.h.id < RPAL_NR_IDS && holder[extra.h.id])
		rpal_check(&out, 0, "ids", "after ENOSPC the next exec got id %llu, which a "
			   "live service holds", (unsigned long long)extra.h.id);
	else
		rpal_check(&out, err == -ENOSPC || err == 0, "ids",
			   "%d services and this one hold every free id (%d ids); the next two "
			   "execs: ENOSPC, %s", n, RPAL_NR_IDS, err ? rpal_errname(err) :
			   "a new id (freed by an earlier run's delay)");
	quit(&extra);

	/*
	 * A dead service's id is not reused before the delay.  The kernel can
	 * free it DELAY_MS after the death at the earliest, and the death comes
	 * after t0 (we close its pipe, then it exits): an exec that got the id
	 * and returned before t0 + DELAY_MS got it too early, however slow the
	 * host.  Tries start after DELAY_MS / 10 and stop at 80% of the delay.
	 */
	victim = n - 1;
	k = kids[victim].h.id;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	quit(&kids[victim]);
	holder[k] = 0;
	sleep_ms(DELAY_MS / 10);
	for (tries = 0; tries < 8 && ms_since(&t0) < DELAY_MS * 8 / 10; tries++) {
		err = spawn(&extra, NO_ENABLE);
		waited = ms_since(&t0);
		if (err)
			break;
		if (extra.h.id == k && waited < DELAY_MS) {
			rpal_check(&out, 0, "id_delay", "id %llu came back %ld ms after its "
				   "service died (delay %d ms)", (unsigned long long)k, waited,
				   DELAY_MS);
			quit(&extra);
			goto done;
		}
		if (extra.h.id == k) {	/* k, but after the delay (a slow exec): fine */
			late = 1;
			break;
		}
		kids[n++] = extra;	/* an id another run freed meanwhile: keep it */
		if (n == MAX_CHILDREN)
			break;
	}
	if (!late) {
		sleep_ms(DELAY_MS + DELAY_MS / 2);
		err = spawn(&extra, NO_ENABLE);
	}
	rpal_check(&out, late || err == 0, "id_delay", "id %llu not reused within %d ms of "
		   "its service's death; after the delay a new service got id %llu (%s)",
		   (unsigned long long)k, DELAY_MS, (unsigned long long)extra.h.id,
		   err ? rpal_errname(err) : "started");
	quit(&extra);
done:
	for (i = 0; i < n; i++)
		quit(&kids[i]);
	if (fd >= 0)
		close(fd);
}

int main(int argc, char **argv)
{
	int r;

	if (argc == 5 && !strcmp(argv[1], "hold"))
		return hold(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
	setvbuf(stdout, NULL, _IOLBF, 0);
	r = set_delay(DELAY_MS);
	if (r) {
		rpal_check(&out, 0, "setup", "cannot set rpal.id_free_delay_ms: %s",
			   rpal_errname(r));
		return 1;
	}
	peers_and_read();
	/* the 17 services above must be gone, ids included, before counting ids */
	sleep_ms(DELAY_MS + DELAY_MS / 2);
	ids();
	set_delay(30000);
	return out.failures ? 1 : 0;
}
