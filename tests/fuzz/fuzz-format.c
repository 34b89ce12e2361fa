// SPDX-License-Identifier: MIT
/*
 * libFuzzer target for the snapshot file reader (cowmm_region_load()),
 * eager and lazy.
 *
 * Every input is a candidate snapshot file.  It is loaded twice into
 * regions of one size: eagerly into one, lazily (COWMM_LOAD_LAZY) into
 * the other.  The size is the one the header names if that is one of two,
 * 64 pages (one partial chunk) or 1040 (two full chunks and a partial
 * one), else 64 pages.  Both loads must give the same verdict.  A refused
 * load must leave its region byte for byte as it was; after an accepted
 * one, pages of the lazy region are touched one by one (the missing-fault
 * path: a write, then reads), a snapshot loads the rest, and the two
 * regions must hold the same bytes.
 *
 * Built with clang by scripts/fuzz.sh, with tests/fuzz/mutator.c (a
 * mutator that keeps the checksums right); tests/fuzz/replay.c runs the
 * corpus in the normal test suite with any compiler.
 */
#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cowmm.h"

#define PAGE 4096
#define SMALL_PAGES 64
#define BIG_PAGES 1040

struct pair {
	size_t npages;
	cowmm_region_t *eager, *lazy;
	unsigned char *e, *l;
	unsigned char *expect; /* what both regions hold */
};

static cowmm_t *mm;
static struct pair small = { .npages = SMALL_PAGES },
		   big = { .npages = BIG_PAGES };
static int lazy_ok = 1;

static void quiet(enum cowmm_log_level level, const char *msg, void *data)
{
	(void)level;
	(void)msg;
	(void)data;
}

static void pair_setup(struct pair *p)
{
	size_t i, len = p->npages * PAGE;

	if (cowmm_region_alloc(mm, len, 0, &p->eager) ||
	    cowmm_region_alloc(mm, len, 0, &p->lazy)) {
		fprintf(stderr, "fuzz-format: cannot allocate regions\n");
		abort();
	}
	p->e = cowmm_region_base(p->eager);
	p->l = cowmm_region_base(p->lazy);
	p->expect = malloc(len);
	if (!p->expect)
		abort();
	for (i = 0; i < len; i++)
		p->expect[i] = (unsigned char)(i * 31 + 7);
	memcpy(p->e, p->expect, len);
	memcpy(p->l, p->expect, len);
}

static void setup(void)
{
	cowmm_set_log(quiet, NULL);
	if (cowmm_open(NULL, &mm)) {
		fprintf(stderr, "fuzz-format: no userfaultfd here\n");
		abort();
	}
	pair_setup(&small);
	pair_setup(&big);
}

static void check_refused(const unsigned char *region, const struct pair *p)
{
	if (memcmp(region, p->expect, p->npages * PAGE) != 0)
		abort(); /* refused, yet the region changed */
}

/* Page @pg of the lazy region, touched first here: a missing fault. */
static void touch_read(struct pair *p, size_t pg)
{
	if (memcmp(p->l + pg * PAGE, p->e + pg * PAGE, PAGE) != 0)
		abort(); /* lazily loaded bytes differ from eagerly loaded */
}

static void check_lazy(struct pair *p)
{
	const size_t pick[] = { 0, 1, 63, 511, 512, 513, 1023, 1024, 1039 };
	volatile unsigned char *w;
	cowmm_snap_t *s;
	size_t i, mid = p->npages / 2;

	/* A write fault on a page not loaded: the file's bytes, then it. */
	w = p->l + mid * PAGE + 9;
	*w = p->e[mid * PAGE + 9];
	touch_read(p, mid);
	for (i = 0; i < sizeof(pick) / sizeof(pick[0]); i++)
		if (pick[i] < p->npages)
			touch_read(p, pick[i]);
	for (i = 2; i < p->npages; i += 97)
		touch_read(p, i);
	/* A snapshot loads what is left, and ends the lazy load. */
	if (cowmm_snapshot(p->lazy, &s))
		abort();
	cowmm_snap_release(s);
	if (memcmp(p->l, p->e, p->npages * PAGE) != 0)
		abort();
}

static int load(cowmm_region_t *r, const uint8_t *data, size_t size,
		unsigned flags)
{
	size_t done = 0;
	int fd, ret;

	fd = memfd_create("fuzz-format", MFD_CLOEXEC);
	if (fd < 0)
		abort();
	while (done < size) {
		ssize_t n = write(fd, data + done, size - done);

		if (n <= 0)
			abort();
		done += (size_t)n;
	}
	ret = cowmm_region_load(r, fd, flags);
	close(fd);
	if (ret > 0)
		abort(); /* 0 or a negative errno, nothing else */
	return ret;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct pair *p = &small;
	uint64_t region_size;
	int ret_e, ret_l;

	if (!mm)
		setup();
	if (size >= 24) {
		memcpy(&region_size, data + 16, 8);
		if (le64toh(region_size) == (uint64_t)BIG_PAGES * PAGE)
			p = &big;
	}

	ret_e = load(p->eager, data, size, 0);
	if (ret_e)
		check_refused(p->e, p);
	if (!lazy_ok)
		goto done;
	ret_l = load(p->lazy, data, size, COWMM_LOAD_LAZY);
	if (ret_l == -EOPNOTSUPP && !ret_e) {
		lazy_ok = 0; /* kernel older than 6.6: no UFFD_FEATURE_POISON */
		fprintf(stderr, "fuzz-format: lazy loads not supported\n");
		goto done;
	}
	if (ret_l != ret_e)
		abort(); /* the two loaders disagree */
	if (ret_l)
		check_refused(p->l, p);
	else
		check_lazy(p);
done:
	if (!ret_e) {
		memcpy(p->expect, p->e, p->npages * PAGE);
		if (!lazy_ok)
			memcpy(p->l, p->e, p->npages * PAGE);
	}
	return 0;
}
