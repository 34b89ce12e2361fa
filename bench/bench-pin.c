// SPDX-License-Identifier: MIT
/*
 * bench-pin: what a write pin costs at snapshot time.
 *
 * A write-pinned page is copied eagerly into every new snapshot.  This
 * measures cowmm_snapshot() on a populated region with 0, 1, 4, 16 and 64
 * MiB write-pinned, and reports the extra time per pinned MiB (median of
 * several runs, with min and max).
 *
 * Usage: bench-pin [--size MiB] [--runs N] [--quick]
 */
#include <err.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cowmm.h>

#include "bench.h"

static double now_ms(void)
{
	return now_ns() / 1e6;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "size", required_argument, NULL, 's' },
		{ "runs", required_argument, NULL, 'n' },
		{ "quick", no_argument, NULL, 'q' },
		{ 0 },
	};
	unsigned long mib = 128, runs = 9, pinned[] = { 0, 1, 4, 16, 64 };
	double base = 0;
	unsigned long prev = ~0UL;
	cowmm_region_t *r;
	cowmm_t *mm;
	size_t i, k;
	char *p;
	int c, ret;

	while ((c = getopt_long(argc, argv, "s:n:q", opts, NULL)) != -1) {
		switch (c) {
		case 's':
			mib = strtoul(optarg, NULL, 0);
			break;
		case 'n':
			runs = strtoul(optarg, NULL, 0);
			break;
		case 'q':
			mib = 16;
			runs = 3;
			break;
		default:
			fprintf(stderr, "usage: %s [--size MiB] [--runs N] "
					"[--quick]\n", argv[0]);
			return 2;
		}
	}
	if (!runs || runs > 1000 || mib < 2)
		errx(2, "--runs 1..1000, --size 2 or more");
	ret = cowmm_open(NULL, &mm);
	if (ret)
		errx(1, "cowmm_open: %s", cowmm_strerror(ret));
	ret = cowmm_region_alloc(mm, mib << 20, COWMM_REGION_NOTHP, &r);
	if (ret)
		errx(1, "cowmm_region_alloc: %s", cowmm_strerror(ret));
	p = cowmm_region_base(r);
	memset(p, 1, mib << 20);

	printf("bench,metric,pinned_mib,median_ms,min_ms,max_ms,runs\n");
	for (k = 0; k < sizeof(pinned) / sizeof(pinned[0]); k++) {
		unsigned long pm = pinned[k] > mib / 2 ? mib / 2 : pinned[k];
		double *t;

		if (pm == prev)
			continue; /* clamped to the same size as before */
		prev = pm;
		t = calloc(runs, sizeof(*t));
		if (!t)
			err(1, "calloc");
		if (pm && (ret = cowmm_pin(r, p, pm << 20, COWMM_PIN_WRITE)))
			errx(1, "cowmm_pin: %s", cowmm_strerror(ret));
		for (i = 0; i < runs; i++) {
			cowmm_snap_t *s;
			double t0 = now_ms();

			ret = cowmm_snapshot(r, &s);
			t[i] = now_ms() - t0;
			if (ret)
				errx(1, "cowmm_snapshot: %s",
				     cowmm_strerror(ret));
			cowmm_snap_release(s);
		}
		qsort(t, runs, sizeof(*t), cmp_double);
		printf("pin,snapshot_ms,%lu,%.3f,%.3f,%.3f,%lu\n", pm,
		       t[runs / 2], t[0], t[runs - 1], runs);
		if (!pm)
			base = t[runs / 2];
		else
			printf("pin,eager_copy_ms_per_mib,%lu,%.3f,,,%lu\n", pm,
			       (t[runs / 2] - base) / pm, runs);
		if (pm)
			cowmm_unpin(r, p, pm << 20);
		free(t);
	}
	cowmm_close(mm);
	return 0;
}
