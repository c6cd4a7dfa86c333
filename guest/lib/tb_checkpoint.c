/*
 * Guest end of the checkpoint channel: a virtio-serial port named
 * org.testbed.checkpoint. Protocol, one line each way:
 *   guest -> host: "checkpoint <name> <pid> <tid> [key=value ...]\n"
 *   host -> guest: "ok <name>\n" or "err <reason>\n"
 * flock() on the port serializes checkpoints of concurrent processes.
 */
#define _GNU_SOURCE
#include "tb_checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <unistd.h>

static int find_port(char *dev, size_t len)
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
		if (strcmp(name, TB_CHECKPOINT_PORT) == 0) {
			snprintf(dev, len, "/dev/%s", e->d_name);
			found = 0;
			break;
		}
	}
	closedir(d);
	return found;
}

int tb_checkpoint(const char *name)
{
	return tb_checkpoint_facts(name, NULL);
}

int tb_checkpoint_facts(const char *name, const char *facts)
{
	char dev[300], line[4096], reply[512];
	size_t got = 0;
	int fd, n;

	if (strpbrk(name, " \n") || !*name || (facts && strchr(facts, '\n'))) {
		errno = EINVAL;
		return -1;
	}
	if (find_port(dev, sizeof(dev)) != 0) {
		errno = ENODEV;
		return -1;
	}
	fd = open(dev, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return -1;
	/* a kernel without CONFIG_FILE_LOCKING (tinyconfig) has no flock: go unserialized */
	if (flock(fd, LOCK_EX) != 0 && errno != ENOSYS)
		goto fail;
	n = snprintf(line, sizeof(line), "checkpoint %s %d %ld%s%s\n", name, getpid(),
		     (long)syscall(SYS_gettid), facts && *facts ? " " : "", facts ? facts : "");
	if (n >= (int)sizeof(line)) {
		errno = E2BIG;
		goto fail;
	}
	if (write(fd, line, n) != n)
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
	fprintf(stderr, "tb_checkpoint %s: host says: %s", name, reply);
	errno = EIO;
	return -1;
fail:
	n = errno;
	close(fd);
	errno = n;
	return -1;
}
