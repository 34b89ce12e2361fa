/* SPDX-License-Identifier: MIT */
/*
 * What the benchmarks share: a clock, percentiles, populated memory and
 * the order of the sampled pages.
 */
#ifndef COWMM_BENCH_H
#define COWMM_BENCH_H

#include <err.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define PAGE 4096UL

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

/* Populate every page of a fresh mapping (or region). */
static inline void populate(char *p, size_t len)
{
	size_t i;

	for (i = 0; i < len; i += PAGE)
		p[i] = (char)i | 1;
}

/*
 * The order in which @sample of @npages pages are first written, malloc'd.
 * Sequential: the first pages, one after another.  Random: pages spread
 * over the whole region, shuffled (the same order in every run).
 */
static inline size_t *order_of(size_t npages, size_t sample, bool random)
{
	size_t *o = malloc(sample * sizeof(*o)), i, stride;
	uint64_t x = 0x9e3779b97f4a7c15ULL;

	if (!o)
		err(1, "malloc");
	stride = random && npages / sample ? npages / sample : 1;
	for (i = 0; i < sample; i++)
		o[i] = (i * stride) % npages;
	if (random)
		for (i = sample - 1; i > 0; i--) {
			size_t j, t;

			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			j = x % (i + 1);
			t = o[i];
			o[i] = o[j];
			o[j] = t;
		}
	return o;
}

#endif
