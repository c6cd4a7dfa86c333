/*
 * A pair without RPAL, for tests/test_guest_pair.py: roles A and B go
 * through the steps enable, peer_read and release with a sync after each,
 * through guest/lib's rpal_run_pair() plumbing (RPAL_DIE_IN and
 * RPAL_TIMEOUT_MS as in guest/lib/rpal.h).  Runs on the host.
 */
#include <stdlib.h>
#include <string.h>

#include "rpal.h"

int main(int argc, char **argv)
{
	static const char *steps[] = { "enable", "peer_read", "release" };
	int i, n;

	if (argc >= 4 && (!strcmp(argv[1], "A") || !strcmp(argv[1], "B"))) {
		struct rpal_link l;

		rpal_link_init(&l, argv[1], atoi(argv[2]), atoi(argv[3]));
		for (i = 0; i < 3; i++) {
			rpal_step(&l, steps[i]);
			rpal_link_sync(&l, '0' + i);
			rpal_check(&l, 1, steps[i], "passed");
		}
		return 0;
	}
	for (i = 1; i < argc; i += n)
		if (!(n = rpal_die_in_option(argc, argv, i)))
			return 2;
	return rpal_run_pair("A", "B", 0, NULL);
}
