/*
 * Guest-side library over the RPAL reference ABI (/proc/rpal).
 * The constants and structs mirror include/uapi/linux/rpal.h of the
 * kernel-patches/rpal-ref series; keep the two in step.
 */
#ifndef TESTBED_GUEST_RPAL_H
#define TESTBED_GUEST_RPAL_H

#include <stdint.h>
#include <signal.h>
#include <sys/ioctl.h>

/* ---- mirror of include/uapi/linux/rpal.h ---- */
#define RPAL_IOCTL_MAGIC	0x33
#define RPAL_API_VERSION	1

#define RPAL_SLOT_SHIFT		39
#define RPAL_SLOT_SIZE		(1ULL << RPAL_SLOT_SHIFT)
#define RPAL_NR_IDS		254
#define RPAL_MAX_PEERS		15
#define RPAL_PKEY_DEFAULT	(-1)

#define RPAL_CAP_PKU		(1U << 0)
#define RPAL_CAP_5LEVEL		(1U << 1)
#define RPAL_CAP_PTI		(1U << 2)

struct rpal_version_info {
	uint32_t api_version;
	uint32_t cap;
};

struct rpal_enable_arg {
	int32_t pkey;		/* in: 0..15 or RPAL_PKEY_DEFAULT; out: pkey used */
	uint32_t flags;		/* must be 0 */
};

#define RPAL_IOCTL_GET_API_VERSION_AND_CAP	_IOWR(RPAL_IOCTL_MAGIC, 0, uint64_t)
#define RPAL_IOCTL_GET_SERVICE_KEY		_IOWR(RPAL_IOCTL_MAGIC, 1, uint64_t)
#define RPAL_IOCTL_GET_SERVICE_ID		_IOWR(RPAL_IOCTL_MAGIC, 2, uint64_t)
#define RPAL_IOCTL_REGISTER_SENDER		_IOWR(RPAL_IOCTL_MAGIC, 3, uint64_t)
#define RPAL_IOCTL_UNREGISTER_SENDER		_IO(RPAL_IOCTL_MAGIC, 4)
#define RPAL_IOCTL_REGISTER_RECEIVER		_IOWR(RPAL_IOCTL_MAGIC, 5, uint64_t)
#define RPAL_IOCTL_UNREGISTER_RECEIVER		_IO(RPAL_IOCTL_MAGIC, 6)
#define RPAL_IOCTL_ENABLE_SERVICE		_IOWR(RPAL_IOCTL_MAGIC, 7, uint64_t)
#define RPAL_IOCTL_DISABLE_SERVICE		_IO(RPAL_IOCTL_MAGIC, 8)
#define RPAL_IOCTL_REQUEST_SERVICE		_IOWR(RPAL_IOCTL_MAGIC, 9, uint64_t)
#define RPAL_IOCTL_RELEASE_SERVICE		_IOWR(RPAL_IOCTL_MAGIC, 10, uint64_t)
#define RPAL_IOCTL_GET_SERVICE_PKEY		_IOWR(RPAL_IOCTL_MAGIC, 11, uint64_t)
#define RPAL_IOCTL_UDS_FDMAP			_IOWR(RPAL_IOCTL_MAGIC, 12, uint64_t)
/* ---- end of mirror ---- */

/* All functions return >= 0 on success and -errno on failure. */
int rpal_open(void);
int rpal_version(int fd, struct rpal_version_info *vi);
int rpal_enable(int fd, int pkey);			/* returns the pkey used */
int rpal_get_key(int fd, uint64_t *key);
int rpal_get_id(int fd, uint64_t *id);
int rpal_get_pkey(int fd, uint64_t *pkey);
int rpal_request(int fd, uint64_t key);		/* 1: now mapped, 0: pending */
int rpal_release(int fd, uint64_t key);
int rpal_read_dead(int fd, uint64_t *keys, int max);	/* number of keys */
int rpal_poll_dead(int fd, int timeout_ms);		/* 1 readable, 0 timeout */

static inline uint64_t rpal_slot_base(uint64_t id)
{
	return (id + 1) << RPAL_SLOT_SHIFT;
}

static inline int rpal_slot_of(const void *p)
{
	return (int)((uintptr_t)p >> RPAL_SLOT_SHIFT);
}

/* The default PKRU of a service with @pkey: deny all keys but its own. */
static inline uint32_t rpal_pkru_for(int pkey)
{
	return 0xFFFFFFFFu & ~(3u << (2 * pkey));
}

static inline uint32_t rdpkru(void)
{
	uint32_t eax, edx;

	__asm__ volatile(".byte 0x0f,0x01,0xee" : "=a"(eax), "=d"(edx) : "c"(0));
	return eax;
}

static inline void wrpkru(uint32_t pkru)
{
	__asm__ volatile(".byte 0x0f,0x01,0xef" : : "a"(pkru), "c"(0), "d"(0)
			 : "memory");
}

/* ELF marker: e_ident[12..15] == "RPAL" makes a binary a service at exec. */
int rpal_elf_is_service(const char *path);	/* 1, 0 or -errno */
int rpal_stamp_elf(const char *path);

/* ---- helpers for the workloads ---- */

/* What a guarded access ran into. */
struct rpal_fault {
	int sig;	/* 0: no fault; SIGSEGV, SIGBUS; SIGALRM: timed out */
	int code;	/* si_code (SEGV_MAPERR, SEGV_ACCERR, SEGV_PKUERR...) */
	int pkey;	/* si_pkey for SEGV_PKUERR */
	void *addr;
};

/* Read/write one u64, catching faults and a hang (timeout_ms).
 * Return 0 if the access completed, -1 if it faulted or timed out. */
int rpal_try_read64(const volatile uint64_t *p, uint64_t *out,
		    int timeout_ms, struct rpal_fault *f);
int rpal_try_write64(volatile uint64_t *p, uint64_t v,
		     int timeout_ms, struct rpal_fault *f);
/* The same without any system call on the way (under PTI without PCID,
 * every return from the kernel flushes the TLB, which would hide a stale
 * translation).  Arm rpal_watchdog() around a loop of these: SIGALRM during
 * an access ends it with f->sig == SIGALRM, outside one it kills us. */
int rpal_try_read64_nosys(const volatile uint64_t *p, uint64_t *out,
			  struct rpal_fault *f);
void rpal_watchdog(int timeout_ms);	/* 0 disarms */
const char *rpal_fault_str(const struct rpal_fault *f);
const char *rpal_errname(int err);	/* "EKEYREJECTED" for -EKEYREJECTED */

/*
 * Workload plumbing: a pair of processes connected by two pipes.
 *
 * Every wait for the partner is bounded (RPAL_LINK_TIMEOUT_MS, or the
 * environment's RPAL_TIMEOUT_MS): a link that fails, because the partner is
 * gone (EOF, EPIPE) or silent too long, prints
 * "ROLE: FAIL link: <what> at <where>, in step STEP" and ends the process
 * with status 1.
 *
 * Each role names the step it is in (rpal_step()): the name of the check
 * that the step exercises.  The step goes to a page shared with the parent
 * of rpal_run_pair(), which reports a role killed by a signal as a failure
 * of that check: "ROLE: FAIL STEP: killed by signal 11 (SIGSEGV) in step
 * STEP".  rpal_step() also prints "ROLE: step STEP" (not a verdict line).
 *
 * For tests of this plumbing: RPAL_DIE_IN=ROLE:STEP in the environment makes
 * ROLE die of SIGSEGV when it enters STEP; RPAL_DIE_IN=ROLE:STEP:hang makes
 * it hang there instead (workloads take --die-in ROLE:STEP[:hang]).
 */
#define RPAL_LINK_TIMEOUT_MS	20000
#define RPAL_PAIR_TIMEOUT_MS	240000	/* the whole pair, then both are killed */

struct rpal_link {
	int rfd, wfd;
	const char *role;
	int failures;
	const char *step;	/* the step this role is in; NULL before the first */
};
/* A child's start: fill in @l, make stdout line-buffered in a static buffer
 * (no malloc: under a kernel that mistags later mmaps, the heap would kill
 * the first printf and the output with it), attach the step page. */
void rpal_link_init(struct rpal_link *l, const char *role, int rfd, int wfd);
void rpal_step(struct rpal_link *l, const char *step);
int rpal_link_send(struct rpal_link *l, const void *buf, int len);
int rpal_link_recv(struct rpal_link *l, void *buf, int len);
int rpal_link_sync(struct rpal_link *l, char tag);	/* both sides call */
/* Wait for the partner's end of the link to close: it exited (its mm is
 * gone by then: exit_mm() comes before exit_files()). */
void rpal_link_wait_gone(struct rpal_link *l);
void rpal_check(struct rpal_link *l, int ok, const char *check,
		const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* Parent side: fork+exec "/proc/self/exe ROLE rfd wfd EXTRA..." for two roles
 * connected to each other; waits for both, at most RPAL_PAIR_TIMEOUT_MS, and
 * a role still running 1.5 link timeouts after its partner ended is killed; prints a FAIL line of the step a role was in when it died of a
 * signal or was killed; returns 0 if both exited 0. */
int rpal_run_pair(const char *role_a, const char *role_b, int extra_argc,
		  char **extra_argv);
/* For a workload's main: "--die-in ROLE:STEP[:hang]" at argv[i] sets
 * RPAL_DIE_IN for the children; returns the number of arguments used (0, 2). */
int rpal_die_in_option(int argc, char **argv, int i);

/*
 * What the kernel told a service about itself through the ABI, for the
 * host's checks (checkpoint facts "R.pid= R.id= R.key= R.pkey= R.alive=").
 */
struct rpal_svc {
	uint64_t pid, key, id;
	int32_t pkey, alive;
};
/* Enable the service (pkey_req: 0..15 or RPAL_PKEY_DEFAULT) and read back
 * its key, id and pkey with the ioctls; "ROLE: FAIL enable: ..." and -1 when
 * any of them fails or the two pkeys (ENABLE's, GET_SERVICE_PKEY's) differ. */
int rpal_svc_enable(struct rpal_link *l, int fd, int pkey_req, struct rpal_svc *me);
/* Facts of two services and whether they are paired (pairs=RA-RB|none). */
void rpal_svc_facts(char *buf, int cap, const char *ra, const struct rpal_svc *a,
		    const char *rb, const struct rpal_svc *b, int paired);
/* Take checkpoint @name with @facts: "ROLE: ok|FAIL checkpoint: NAME: ..." */
int rpal_checkpoint(struct rpal_link *l, const char *name, const char *facts);
/* The same from inside a SIGUSR1 handler that the thread enters with PKRU
 * @pkru; *in_handler is the PKRU the handler ran with (the kernel sets the
 * service's default PKRU on signal delivery). */
int rpal_checkpoint_in_handler(struct rpal_link *l, const char *name, const char *facts,
			       uint32_t pkru, uint32_t *in_handler);
/* Both roles call it: sync, the @taker takes checkpoint @name, sync again
 * (the partner waits in read(), at its own PKRU, while the host looks). */
void rpal_pair_checkpoint(struct rpal_link *l, int taker, const char *name, const char *facts);

/* Step brk_tagged: grow the heap by @pages pages (sbrk), write each with the
 * current PKRU (the check: the service's own key must open them), then
 * write them again with key 0 open too, so that a page the kernel left
 * untagged is in the page tables for the host to see; @give_back: shrink by
 * one page again (a flush of our mm, which must reach the peers' too). */
int rpal_brk_step(struct rpal_link *l, const struct rpal_svc *me, int pages, int give_back);
/* Step dead_key: poll() then read() on /proc/rpal must report @peer_key. */
int rpal_dead_key_step(struct rpal_link *l, int fd, uint64_t peer_key);
int rpal_pin_cpu(int cpu);
int rpal_nr_cpus(void);

#endif
