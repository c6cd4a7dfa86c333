/*
 * Guest end of the checkpoint channel: a virtio-serial port named
 * org.testbed.checkpoint, or else /dev/tb-checkpoint (a serial line the guest's
 * init links there in recorded runs: QEMU's record/replay records serial ports,
 * not virtio-serial ones). Protocol, one line each way:
 *   guest -> host: "checkpoint <name> <pid> <tid> [key=value ...]\n"
 *   host -> guest: "ok <name>\n" or "err <reason>\n"
 * flock() on the port serializes checkpoints of concurrent processes.
 *
 * Async-signal-safe: nothing but system calls and our own string code (no
 * stdio, no malloc, no opendir), so a signal handler may take a checkpoint.
 */
#define _GNU_SOURCE
#include "tb_checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <unistd.h>

struct dent64 {
	unsigned long long d_ino;
	long long d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

/* Append s to buf (capacity cap, *len used); 0, or -1 when it does not fit. */
static int put(char *buf, size_t cap, size_t *len, const char *s)
{
	size_t n = strlen(s);

	if (*len + n >= cap)
		return -1;
	memcpy(buf + *len, s, n);
	*len += n;
	buf[*len] = 0;
	return 0;
}

static int put_num(char *buf, size_t cap, size_t *len, long v)
{
	char tmp[24];
	int i = sizeof(tmp) - 1;
	unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;

	tmp[i] = 0;
	do {
		tmp[--i] = '0' + u % 10;
		u /= 10;
	} while (u);
	if (v < 0)
		tmp[--i] = '-';
	return put(buf, cap, len, tmp + i);
}

/* Is /sys/class/virtio-ports/<port>/name our port's name? */
static int is_our_port(const char *port)
{
	char path[300] = "", name[64];
	size_t len = 0;
	ssize_t n;
	int fd;

	if (put(path, sizeof(path), &len, "/sys/class/virtio-ports/") ||
	    put(path, sizeof(path), &len, port) || put(path, sizeof(path), &len, "/name"))
		return 0;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	n = read(fd, name, sizeof(name) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	name[n] = 0;
	name[strcspn(name, "\n")] = 0;
	return strcmp(name, TB_CHECKPOINT_PORT) == 0;
}

/* The serial line of recorded runs, when there is no virtio port. */
static int serial_port(char *dev, size_t cap)
{
	size_t len = 0;

	dev[0] = 0;
	if (access(TB_CHECKPOINT_SERIAL, F_OK) != 0)
		return -1;
	return put(dev, cap, &len, TB_CHECKPOINT_SERIAL);
}

static int find_port(char *dev, size_t cap)
{
	char ents[2048];
	int fd = open("/sys/class/virtio-ports", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	long n;

	if (fd < 0)
		return serial_port(dev, cap);
	while ((n = syscall(SYS_getdents64, fd, ents, sizeof(ents))) > 0) {
		for (long off = 0; off < n;) {
			struct dent64 *e = (struct dent64 *)(ents + off);
			size_t len = 0;

			off += e->d_reclen;
			if (e->d_name[0] == '.' || !is_our_port(e->d_name))
				continue;
			close(fd);
			dev[0] = 0;
			return put(dev, cap, &len, "/dev/") || put(dev, cap, &len, e->d_name) ?
			       -1 : 0;
		}
	}
	close(fd);
	return serial_port(dev, cap);
}

int tb_checkpoint(const char *name)
{
	return tb_checkpoint_facts(name, NULL);
}

static void say(const char *a, const char *b, const char *c)
{
	char msg[600] = "";
	size_t len = 0;

	put(msg, sizeof(msg), &len, a);
	put(msg, sizeof(msg), &len, b);
	put(msg, sizeof(msg), &len, c);
	if (write(2, msg, len) < 0)
		return;
}

int tb_checkpoint_facts(const char *name, const char *facts)
{
	char dev[300], line[4096] = "", reply[512];
	size_t got = 0, n = 0;
	int fd;

	if (strpbrk(name, " \n") || !*name || (facts && strchr(facts, '\n'))) {
		errno = EINVAL;
		return -1;
	}
	if (find_port(dev, sizeof(dev)) != 0) {
		errno = ENODEV;
		return -1;
	}
	if (put(line, sizeof(line), &n, "checkpoint ") || put(line, sizeof(line), &n, name) ||
	    put(line, sizeof(line), &n, " ") || put_num(line, sizeof(line), &n, getpid()) ||
	    put(line, sizeof(line), &n, " ") ||
	    put_num(line, sizeof(line), &n, syscall(SYS_gettid)) ||
	    (facts && *facts && (put(line, sizeof(line), &n, " ") ||
				 put(line, sizeof(line), &n, facts))) ||
	    put(line, sizeof(line), &n, "\n")) {
		errno = E2BIG;
		return -1;
	}
	fd = open(dev, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -1;
	/* a kernel without CONFIG_FILE_LOCKING (tinyconfig) has no flock: go unserialized */
	if (flock(fd, LOCK_EX) != 0 && errno != ENOSYS)
		goto fail;
	if (write(fd, line, n) != (ssize_t)n)
		goto fail;
	while (got < sizeof(reply) - 1) {
		ssize_t r = read(fd, reply + got, 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			goto fail;
		if (reply[got++] == '\n')
			break;
	}
	reply[got] = 0;
	close(fd);
	if (strncmp(reply, "ok ", 3) == 0)
		return 0;
	say("tb_checkpoint ", name, ": host says: ");
	say(reply, "", "");
	errno = EIO;
	return -1;
fail:
	got = errno;
	close(fd);
	errno = (int)got;
	return -1;
}
