/*
 * tb-checkpoint NAME: block until the host has snapshotted the guest as NAME.
 * Exits 0 when done, 1 when there is no channel or the host refused.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "tb_checkpoint.h"

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: tb-checkpoint NAME\n");
		return 2;
	}
	if (tb_checkpoint(argv[1]) != 0) {
		fprintf(stderr, "tb-checkpoint %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	return 0;
}
