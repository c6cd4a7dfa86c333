/*
 * tb-checkpoint NAME [KEY=VALUE...]: block until the host has snapshotted the
 * guest as NAME; the KEY=VALUE facts go into the snapshot's trigger.
 * Exits 0 when done, 1 when there is no channel or the host refused.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>

#include "tb_checkpoint.h"

int main(int argc, char **argv)
{
	char facts[400] = "";
	size_t used = 0;

	if (argc < 2) {
		fprintf(stderr, "usage: tb-checkpoint NAME [KEY=VALUE...]\n");
		return 2;
	}
	for (int i = 2; i < argc; i++) {
		int n = snprintf(facts + used, sizeof(facts) - used, "%s%s", used ? " " : "", argv[i]);
		if (!strchr(argv[i], '=') || strchr(argv[i], ' ') || n < 0 ||
		    (size_t)n >= sizeof(facts) - used) {
			fprintf(stderr, "tb-checkpoint: bad fact %s (KEY=VALUE, no spaces)\n", argv[i]);
			return 2;
		}
		used += n;
	}
	if (tb_checkpoint_facts(argv[1], facts) != 0) {
		fprintf(stderr, "tb-checkpoint %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	return 0;
}
