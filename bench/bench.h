/* SPDX-License-Identifier: MIT */
/* What the benchmarks share: a clock and percentiles. */
#ifndef COWMM_BENCH_H
#define COWMM_BENCH_H

#include <stddef.h>
#include <time.h>

/* CLOCK_MONOTONIC, in ns. */
static inline double now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* For qsort() of doubles, ascending. */
static inline int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* The @p-th percentile (0 to 100) of @v[0..@n), sorted ascending. */
static inline double pct(const double *v, size_t n, double p)
{
	size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);

	return v[i < n ? i : n - 1];
}

#endif
