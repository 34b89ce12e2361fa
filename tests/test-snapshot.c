// SPDX-License-Identifier: MIT
/*
 * Snapshots: point in time under concurrent writers, exact reuse
 * (copies == K), shared frames, release in every order, byte-granular
 * reads, the physical-page anchor, detach on region release, and 4 GiB.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "harness.h"

/* ------------------------------------------------------------------------ */
/* Writers that can be paused for a checksum */

struct writers {
	unsigned char *mem;
	size_t npages;
	pthread_rwlock_t pause;
	atomic_bool stop;
	atomic_uint_fast64_t writes;
	pthread_t th[8];
	unsigned n;
};

static void *writer_main(void *arg)
{
	struct writers *w = arg;
	uint64_t x = (uintptr_t)&x | 1;

	while (!atomic_load(&w->stop)) {
		int i;

		pthread_rwlock_rdlock(&w->pause);
		for (i = 0; i < 32; i++) {
			uint64_t v = t_rand(&x);
			size_t pg = v % w->npages, off = (v >> 40) % (T_PAGE / 8);

			/* Writers overlap on purpose: atomic, so not a race. */
			__atomic_store_n((uint64_t *)(w->mem + pg * T_PAGE) + off,
					 v, __ATOMIC_RELAXED);
		}
		pthread_rwlock_unlock(&w->pause);
		atomic_fetch_add(&w->writes, 32);
	}
	return NULL;
}

static void writers_start(struct writers *w, unsigned char *mem,
			  size_t npages, unsigned n)
{
	unsigned i;

	w->mem = mem;
	w->npages = npages;
	w->n = n;
	atomic_init(&w->stop, false);
	atomic_init(&w->writes, 0);
	pthread_rwlock_init(&w->pause, NULL);
	for (i = 0; i < n; i++)
		ck_assert_int_eq(pthread_create(&w->th[i], NULL, writer_main, w),
				 0);
}

static void writers_stop(struct writers *w)
{
	unsigned i;

	atomic_store(&w->stop, true);
	for (i = 0; i < w->n; i++)
		pthread_join(w->th[i], NULL);
	pthread_rwlock_destroy(&w->pause);
}

struct taken {
	cowmm_snap_t *snap;
	uint64_t *sums;
};

/* Pause the writers, checksum every page, snapshot, let them go. */
static struct taken take(struct writers *w, cowmm_region_t *r)
{
	struct taken t = { NULL, calloc(w->npages, sizeof(uint64_t)) };
	size_t pg;

	ck_assert_ptr_nonnull(t.sums);
	pthread_rwlock_wrlock(&w->pause);
	for (pg = 0; pg < w->npages; pg++)
		t.sums[pg] = t_page_sum(w->mem + pg * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &t.snap), 0);
	pthread_rwlock_unlock(&w->pause);
	return t;
}

/* Read the whole snapshot (writers running) and count changed pages. */
static size_t verify(const struct taken *t, size_t npages)
{
	unsigned char *buf = malloc(64 * T_PAGE);
	size_t pg, i, bad = 0;

	ck_assert_ptr_nonnull(buf);
	for (pg = 0; pg < npages; pg += 64) {
		size_t n = npages - pg < 64 ? npages - pg : 64;

		ck_assert_int_eq(cowmm_snap_read(t->snap, pg * T_PAGE, buf,
						 n * T_PAGE),
				 (ssize_t)(n * T_PAGE));
		for (i = 0; i < n; i++)
			bad += t_page_sum(buf + i * T_PAGE) != t->sums[pg + i];
	}
	free(buf);
	return bad;
}

START_TEST(test_point_in_time)
{
	const size_t npages = 8192; /* 32 MiB */
	cowmm_t *mm = t_open(2);
	struct taken live[3] = { 0 };
	struct writers w;
	cowmm_region_t *r;
	uint64_t x = 42;
	size_t i, pg, bad = 0, verified = 0;
	int round;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE, 0, &r), 0);
	for (pg = 0; pg < npages; pg += 2) /* half populated, half empty */
		t_fill_page((char *)cowmm_region_base(r) + pg * T_PAGE, pg);
	writers_start(&w, cowmm_region_base(r), npages, 4);

	for (round = 0; round < 12; round++) {
		i = t_rand(&x) % 3;
		if (live[i].snap) {
			bad += verify(&live[i], npages);
			verified++;
			cowmm_snap_release(live[i].snap);
			free(live[i].sums);
		}
		usleep(20 * 1000);
		live[i] = take(&w, r);
	}
	for (i = 0; i < 3; i++) {
		if (!live[i].snap)
			continue;
		bad += verify(&live[i], npages);
		verified++;
	}
	writers_stop(&w);
	ck_assert_uint_gt(atomic_load(&w.writes), 0);
	ck_assert_msg(bad == 0, "%zu pages of %zu snapshots changed", bad,
		      verified);
	for (i = 0; i < 3; i++) {
		cowmm_snap_release(live[i].snap);
		free(live[i].sums);
	}
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	ck_assert_uint_eq(t_stats(mm).snapshots_live, 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Exact reuse: snapshot N pages, write K distinct ones: copies == K */

struct kwriter {
	unsigned char *mem;
	const size_t *pages;
	size_t k;
	unsigned id;
};

static void *kwriter_main(void *arg)
{
	struct kwriter *kw = arg;
	size_t i, rep;

	for (rep = 0; rep < 3; rep++)
		for (i = 0; i < kw->k; i++) {
			size_t pg = kw->pages[(i * 7 + kw->id * 13) % kw->k];

			kw->mem[pg * T_PAGE + kw->id * 64 + rep] = 0xee;
		}
	return NULL;
}

START_TEST(test_exact_reuse)
{
	const size_t npages = 2048, k = 601;
	cowmm_t *mm = t_open_fa(2, 1); /* counts page by page */
	struct kwriter kw[4];
	pthread_t th[4];
	struct cowmm_stats st0, st;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p, buf[T_PAGE];
	size_t *pages = malloc(k * sizeof(*pages)), i, pg;
	uint64_t x = 7;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	for (pg = 0; pg < npages; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	/* K distinct pages, spread out */
	for (i = 0; i < k; i++)
		pages[i] = (i * 1031 + (t_rand(&x) % 3 ? 0 : 0)) % npages;

	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	st0 = t_stats(mm);
	for (i = 0; i < 4; i++) {
		kw[i] = (struct kwriter){ p, pages, k, (unsigned)i };
		pthread_create(&th[i], NULL, kwriter_main, &kw[i]);
	}
	for (i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	st = t_stats(mm);

	ck_assert_uint_eq(st.copies - st0.copies, k);
	ck_assert_uint_eq(st.wp_faults - st0.wp_faults,
			  (st.copies - st0.copies) + (st.reuses - st0.reuses));
	ck_assert_uint_ge(st.wp_faults - st0.wp_faults, k);
	ck_assert_uint_eq(st.frames_live, k);
	ck_assert_uint_eq(st.bytes_preserved - st0.bytes_preserved, k * T_PAGE);
	for (i = 0; i < k; i++) {
		unsigned char want[T_PAGE];

		t_fill_page(want, pages[i] + 1);
		ck_assert_int_eq(cowmm_snap_read(s, pages[i] * T_PAGE, buf,
						 T_PAGE),
				 T_PAGE);
		ck_assert(!memcmp(buf, want, T_PAGE));
		ck_assert_int_eq(p[pages[i] * T_PAGE + 64], 0xee);
	}

	/* Written again with the snapshot still alive: no more faults. */
	for (i = 0; i < k; i++)
		p[pages[i] * T_PAGE] ^= 1;
	ck_assert_uint_eq(t_stats(mm).wp_faults, st.wp_faults);

	cowmm_snap_release(s);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);

	/* No snapshot alive: a write to a page still protected reuses. */
	st0 = t_stats(mm);
	p[(k * 1031 + 5) % npages * T_PAGE + 1] = 1;
	st = t_stats(mm);
	ck_assert_uint_eq(st.copies, st0.copies);
	ck_assert_uint_eq(st.reuses - st0.reuses, st.wp_faults - st0.wp_faults);
	free(pages);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * Pages never populated: their preservation holds no memory, and reading
 * the snapshot does not populate them.
 */
START_TEST(test_unpopulated)
{
	const size_t npages = 1024, k = 100;
	cowmm_t *mm = t_open(0);
	struct cowmm_stats st;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p, *buf = malloc(npages * T_PAGE), vec[1024];
	size_t i, resident = 0;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE,
					    COWMM_REGION_NOTHP, &r),
			 0);
	p = cowmm_region_base(r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	for (i = 0; i < k; i++)
		memset(p + i * 8 * T_PAGE, 0x77, T_PAGE);
	st = t_stats(mm);
	ck_assert_uint_eq(st.copies, k);
	ck_assert_uint_eq(st.frames_live, 0); /* all zero: nothing held */

	ck_assert_int_eq(cowmm_snap_read(s, 0, buf, npages * T_PAGE),
			 (ssize_t)(npages * T_PAGE));
	for (i = 0; i < npages * T_PAGE; i++)
		if (buf[i])
			ck_abort_msg("byte %zu of the snapshot is %#x", i, buf[i]);
	ck_assert_int_eq(mincore(p, npages * T_PAGE, vec), 0);
	for (i = 0; i < npages; i++)
		resident += vec[i] & 1;
	ck_assert_uint_eq(resident, k);
	free(buf);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Several snapshots share one copy of the same old bytes */

static unsigned char snap_byte(cowmm_snap_t *s, size_t off)
{
	unsigned char b;

	ck_assert_int_eq(cowmm_snap_read(s, off, &b, 1), 1);
	return b;
}

START_TEST(test_shared_frames)
{
	cowmm_t *mm = t_open_fa(0, 1); /* counts page by page */
	cowmm_snap_t *s1, *s2, *s3;
	cowmm_region_t *r;
	unsigned char *p;

	ck_assert_int_eq(cowmm_region_alloc(mm, 4 * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	memset(p, 0xa0, 4 * T_PAGE);

	ck_assert_int_eq(cowmm_snapshot(r, &s1), 0);
	p[0] = 0xa1; /* page 0: copy for s1 */
	ck_assert_uint_eq(t_stats(mm).copies, 1);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s3), 0);
	p[0] = 0xa2;     /* page 0: one copy shared by s2 and s3 */
	p[T_PAGE] = 0xb; /* page 1: one copy shared by s1, s2 and s3 */
	p[1] = 0xa3;     /* already writable: nothing */
	ck_assert_uint_eq(t_stats(mm).copies, 3);
	ck_assert_uint_eq(t_stats(mm).frames_live, 3);

	ck_assert_int_eq(snap_byte(s1, 0), 0xa0);
	ck_assert_int_eq(snap_byte(s2, 0), 0xa1);
	ck_assert_int_eq(snap_byte(s3, 0), 0xa1);
	ck_assert_int_eq(snap_byte(s1, T_PAGE), 0xa0);
	ck_assert_int_eq(snap_byte(s3, T_PAGE), 0xa0);
	ck_assert_int_eq(snap_byte(s3, 2 * T_PAGE), 0xa0); /* still shared */

	cowmm_snap_release(s2);
	ck_assert_uint_eq(t_stats(mm).frames_live, 3); /* s3 holds both */
	cowmm_snap_release(s3);
	ck_assert_uint_eq(t_stats(mm).frames_live, 2); /* s1: pages 0, 1 */
	p[2 * T_PAGE] = 0xc; /* page 2: s1 still needs it */
	ck_assert_uint_eq(t_stats(mm).copies, 4);
	ck_assert_int_eq(snap_byte(s1, 2 * T_PAGE), 0xa0);
	cowmm_snap_release(s1);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/* Three snapshots released in each of the six orders. */
START_TEST(test_release_orders)
{
	static const int orders[6][3] = { { 0, 1, 2 }, { 0, 2, 1 },
					  { 1, 0, 2 }, { 1, 2, 0 },
					  { 2, 0, 1 }, { 2, 1, 0 } };
	const size_t npages = 16;
	cowmm_t *mm = t_open(0);
	int o, i, j;

	for (o = 0; o < 6; o++) {
		cowmm_snap_t *s[3];
		bool gone[3] = { false };
		cowmm_region_t *r;
		unsigned char *p;

		ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE, 0, &r),
				 0);
		p = cowmm_region_base(r);
		for (i = 0; i < 3; i++) {
			memset(p, 0x10 + i, npages * T_PAGE);
			ck_assert_int_eq(cowmm_snapshot(r, &s[i]), 0);
		}
		memset(p, 0x20, npages * T_PAGE);
		for (i = 0; i < 3; i++) {
			cowmm_snap_release(s[orders[o][i]]);
			gone[orders[o][i]] = true;
			for (j = 0; j < 3; j++)
				if (!gone[j])
					ck_assert_int_eq(snap_byte(s[j],
								   5 * T_PAGE),
							 0x10 + j);
			memset(p, 0x30 + i, npages * T_PAGE);
		}
		ck_assert_uint_eq(t_stats(mm).frames_live, 0);
		ck_assert_int_eq(cowmm_region_release(r), 0);
	}
	ck_assert_uint_eq(t_stats(mm).snapshots_live, 0);
	cowmm_close(mm);
}
END_TEST

START_TEST(test_byte_reads)
{
	const size_t len = 3 * T_PAGE;
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p, buf[2 * T_PAGE];
	size_t i;

	ck_assert_int_eq(cowmm_region_alloc(mm, len, 0, &r), 0);
	p = cowmm_region_base(r);
	for (i = 0; i < len; i++)
		p[i] = (unsigned char)(i * 31);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_uint_eq(cowmm_snap_size(s), len);
	memset(p + T_PAGE - 100, 0, 300); /* across pages 0 and 1 */

	ck_assert_int_eq(cowmm_snap_read(s, T_PAGE - 150, buf, 400), 400);
	for (i = 0; i < 400; i++)
		ck_assert_int_eq(buf[i], (unsigned char)((T_PAGE - 150 + i) * 31));
	ck_assert_int_eq(cowmm_snap_read(s, len - 10, buf, 100), 10);
	ck_assert_int_eq(buf[9], (unsigned char)((len - 1) * 31));
	ck_assert_int_eq(cowmm_snap_read(s, len, buf, 100), 0);
	ck_assert_int_eq(cowmm_snap_read(s, len + 5 * T_PAGE, buf, 1), 0);
	ck_assert_int_eq(cowmm_snap_read(s, (size_t)-1, buf, 100), 0);
	ck_assert_int_eq(cowmm_snap_read(s, 0, NULL, 0), 0);
	ck_assert_int_eq(cowmm_snap_read(s, 0, NULL, 10), -EINVAL);
	ck_assert_int_eq(cowmm_snap_read(NULL, 0, buf, 10), -EINVAL);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_snap_read(s, 0, buf, 10), -EBADF);
	ck_assert_uint_eq(cowmm_snap_size(s), 0);
	cowmm_snap_release(s); /* double release: ignored, logged */
	ck_assert_ptr_nonnull(strstr(t_log_text(), "already released"));
	cowmm_snap_release(NULL);
	ck_assert_int_eq(cowmm_snapshot(NULL, &s), -EINVAL);
	ck_assert_int_eq(cowmm_snapshot(r, NULL), -EINVAL);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s), -EBADF);
	cowmm_close(mm);
}
END_TEST

/*
 * Fault-around: a sequential writer faults once per window, not per page;
 * every page is still preserved exactly once (pages written before are
 * skipped, never-populated ones hold no memory), the snapshot keeps every
 * byte and the writer keeps every physical page.
 */
START_TEST(test_fault_around)
{
	const size_t npages = 2048, filled = 1984;
	cowmm_t *mm = t_open_fa(0, COWMM_FAULT_AROUND_SEQUENTIAL);
	struct cowmm_stats st0, st;
	unsigned char *p, buf[T_PAGE], want[T_PAGE];
	uint64_t *pfn = calloc(npages, sizeof(*pfn));
	cowmm_region_t *r;
	cowmm_snap_t *s;
	size_t pg;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE,
					    COWMM_REGION_NOTHP, &r),
			 0);
	p = cowmm_region_base(r);
	for (pg = 0; pg < filled; pg++) { /* the last 64: never touched */
		t_fill_page(p + pg * T_PAGE, pg + 1);
		pfn[pg] = t_pfn(p + pg * T_PAGE);
	}
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	p[100 * T_PAGE] ^= 1; /* written before: copied once, alone */
	p[700 * T_PAGE] ^= 1;
	st0 = t_stats(mm);
	for (pg = 0; pg < npages; pg++)
		p[pg * T_PAGE + 5] ^= 0x5a;
	st = t_stats(mm);

	ck_assert_uint_eq(st.copies + st.ahead_copies - st0.copies -
				  st0.ahead_copies,
			  npages - 2);
	ck_assert_uint_lt(st.wp_faults - st0.wp_faults, npages / 16);
	ck_assert_uint_eq(st.frames_live, filled);
	ck_assert_uint_eq(st.bytes_preserved, filled * T_PAGE);
	for (pg = 0; pg < npages; pg++) {
		if (pg < filled)
			t_fill_page(want, pg + 1);
		else
			memset(want, 0, T_PAGE);
		ck_assert_int_eq(cowmm_snap_read(s, pg * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert_msg(!memcmp(buf, want, T_PAGE),
			      "snapshot page %zu changed", pg);
		want[5] ^= 0x5a;
		if (pg == 100 || pg == 700)
			want[0] ^= 1;
		ck_assert_msg(!memcmp(p + pg * T_PAGE, want, T_PAGE),
			      "write to page %zu lost", pg);
		if (pfn[pg]) /* 0: not root */
			ck_assert_uint_eq(t_pfn(p + pg * T_PAGE), pfn[pg]);
	}
	cowmm_snap_release(s);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	free(pfn);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/* A random writer gets no fault-around: it copies only what it writes. */
START_TEST(test_fault_around_random)
{
	const size_t npages = 1536, k = npages / 3;
	cowmm_t *mm = t_open(0);
	size_t *pages = malloc(k * sizeof(*pages)), i, j;
	struct cowmm_stats st;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	uint64_t x = 11;

	p = t_filled_region(mm, npages, &r);
	for (i = 0; i < k; i++) /* every third page, shuffled */
		pages[i] = 3 * i;
	for (i = k - 1; i > 0; i--) {
		size_t t;

		j = t_rand(&x) % (i + 1);
		t = pages[i];
		pages[i] = pages[j];
		pages[j] = t;
	}
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	for (i = 0; i < k; i++)
		p[pages[i] * T_PAGE] ^= 1;
	st = t_stats(mm);
	ck_assert_uint_eq(st.ahead_copies, 0);
	ck_assert_uint_eq(st.copies, k);
	ck_assert_uint_eq(st.frames_live, k);
	cowmm_snap_release(s);
	free(pages);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/* Bounded mode: writers wait at max_preserved until a release. */
START_TEST(test_bounded)
{
	t_check_bounded(0, 100);
}
END_TEST

/*
 * The anchor: the writer keeps its physical page.  Every page written
 * during a snapshot has the same page frame number before and after.
 */
START_TEST(test_pfn_anchor)
{
	const size_t npages = 256;
	cowmm_t *mm = t_open_fa(0, COWMM_FAULT_AROUND_SEQUENTIAL);
	struct cowmm_stats st;
	uint64_t pfn[256];
	cowmm_region_t *r;
	cowmm_snap_t *s1, *s2;
	unsigned char *p;
	size_t pg;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE,
					    COWMM_REGION_NOTHP, &r),
			 0);
	p = cowmm_region_base(r);
	for (pg = 0; pg < npages; pg++) {
		t_fill_page(p + pg * T_PAGE, pg);
		pfn[pg] = t_pfn(p + pg * T_PAGE);
		ck_assert_uint_ne(pfn[pg], 0);
	}
	ck_assert_int_eq(cowmm_snapshot(r, &s1), 0);
	for (pg = 0; pg < npages; pg++)
		p[pg * T_PAGE + 9] ^= 0xff;
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);
	for (pg = 0; pg < npages; pg += 3)
		p[pg * T_PAGE + 10] ^= 0xff;
	/* The sequential pass copies ahead of the writer (fault-around),
	 * the stride-3 one page by page. */
	st = t_stats(mm);
	ck_assert_uint_eq(st.copies + st.ahead_copies,
			  npages + (npages + 2) / 3);
	ck_assert_uint_gt(st.ahead_copies, npages / 2);
	for (pg = 0; pg < npages; pg++)
		ck_assert_msg(t_pfn(p + pg * T_PAGE) == pfn[pg],
			      "page %zu moved from pfn %#lx to %#lx", pg,
			      (unsigned long)pfn[pg],
			      (unsigned long)t_pfn(p + pg * T_PAGE));
	cowmm_snap_release(s1);
	cowmm_snap_release(s2);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * A region released while snapshots are alive: they keep their content,
 * and the pages never populated cost nothing.
 */
START_TEST(test_detach)
{
	const size_t npages = 512;
	cowmm_t *mm = t_open_fa(0, 1); /* counts page by page */
	size_t len = npages * T_PAGE, pg;
	unsigned char *p, buf[T_PAGE], want[T_PAGE];
	cowmm_snap_t *s1, *s2;
	struct cowmm_stats st;
	cowmm_region_t *r;

	p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	madvise(p, len, MADV_NOHUGEPAGE);
	for (pg = 0; pg < npages / 2; pg++) /* upper half never touched */
		t_fill_page(p + pg * T_PAGE, pg);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len, 0, &r), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s1), 0);
	for (pg = 0; pg < 10; pg++)
		p[pg * T_PAGE] ^= 1;
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	st = t_stats(mm);
	/* s1 and s2 share pages 10..255 (one copy each); 0..9 differ. */
	ck_assert_uint_eq(st.detach_copies, npages - 10 + 10);
	ck_assert_uint_eq(st.frames_live, 10 + (npages / 2 - 10) + 10);

	memset(p, 0x99, len); /* ours again; the snapshots don't care */
	for (pg = 0; pg < npages; pg++) {
		if (pg < npages / 2)
			t_fill_page(want, pg);
		else
			memset(want, 0, T_PAGE);
		ck_assert_int_eq(cowmm_snap_read(s1, pg * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert_msg(!memcmp(buf, want, T_PAGE), "s1 page %zu", pg);
		if (pg < 10)
			want[0] ^= 1;
		ck_assert_int_eq(cowmm_snap_read(s2, pg * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert_msg(!memcmp(buf, want, T_PAGE), "s2 page %zu", pg);
	}
	cowmm_snap_release(s2);
	cowmm_snap_release(s1);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	cowmm_close(mm);
	munmap(p, len);
}
END_TEST

/* A 4 GiB region: adopt, snapshot, write, read back, release. */
START_TEST(test_big_region)
{
	const size_t len = 4UL << 30, npages = len / T_PAGE, k = 20000;
	cowmm_t *mm = t_open(0);
	const size_t chunk = 16UL << 20;
	unsigned char *p, *buf = malloc(chunk);
	uint64_t x = 99;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	size_t off, i;

	p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	ck_assert_ptr_nonnull(buf);
	madvise(p, len, MADV_HUGEPAGE);
	/* Every 64th page carries its index; the rest is zero. */
	for (i = 0; i < npages; i += 64)
		memcpy(p + i * T_PAGE, &i, sizeof(i));
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len, 0, &r), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	for (i = 0; i < k; i++)
		memset(p + (t_rand(&x) % npages) * T_PAGE, 0xff, 64);
	ck_assert_uint_le(t_stats(mm).copies, k);
	ck_assert_uint_gt(t_stats(mm).copies, k * 9 / 10);

	for (off = 0; off < len; off += chunk) {
		ck_assert_int_eq(cowmm_snap_read(s, off, buf, chunk),
				 (ssize_t)chunk);
		for (i = 0; i < chunk / T_PAGE; i++) {
			size_t pg = off / T_PAGE + i, got;
			unsigned char *q = buf + i * T_PAGE;

			memcpy(&got, q, sizeof(got));
			if (got != (pg % 64 ? 0 : pg) || q[8] || q[63] ||
			    q[T_PAGE - 1])
				ck_abort_msg("page %zu of the snapshot changed",
					     pg);
		}
	}
	cowmm_snap_release(s);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
	munmap(p, len);
	free(buf);
}
END_TEST

/*
 * A repeat snapshot protects only what is not protected already (a
 * PAGEMAP_SCAN finds it): the pages written since, discarded ones, and
 * never-populated ones.  Any page missed would write without a fault.
 */
START_TEST(test_repeat_protects_all)
{
	const size_t npages = 4096;
	cowmm_t *mm = t_open_fa(1, 1);
	struct cowmm_stats a, b;
	unsigned char want[T_PAGE], buf[T_PAGE];
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	size_t pg;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE,
					    COWMM_REGION_NOTHP, &r),
			 0);
	p = cowmm_region_base(r);
	for (pg = 0; pg < npages / 2; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	cowmm_snap_release(s);
	for (pg = 100; pg < 200; pg++)
		p[pg * T_PAGE] ^= 1; /* written since */
	ck_assert_int_eq(madvise(p + 300 * T_PAGE, 10 * T_PAGE, MADV_DONTNEED),
			 0);
	p[3000 * T_PAGE] = 7; /* populated since */
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);

	a = t_stats(mm);
	for (pg = 0; pg < npages; pg++)
		p[pg * T_PAGE + 1] ^= 2;
	b = t_stats(mm);
	ck_assert_uint_eq(b.wp_faults - a.wp_faults, npages);
	ck_assert_uint_eq(b.broken, a.broken);
	for (pg = 0; pg < npages; pg++) {
		memset(want, 0, T_PAGE);
		if (pg < npages / 2 && (pg < 300 || pg >= 310))
			t_fill_page(want, pg + 1);
		if (pg >= 100 && pg < 200)
			want[0] ^= 1;
		if (pg == 3000)
			want[0] = 7;
		ck_assert_int_eq(cowmm_snap_read(s, pg * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert_msg(!memcmp(buf, want, T_PAGE), "page %zu changed",
			      pg);
	}
	cowmm_snap_release(s);
	cowmm_close(mm);
}
END_TEST

/*
 * COWMM_REGION_HUGE_COW: one write in a huge page preserves its whole block
 * and unprotects it in one piece; the huge mapping survives, the rest of
 * the block writes without faults, and the next snapshot protects it as
 * one entry again.  Without the flag the same write splits the page.
 */
START_TEST(test_huge_cow)
{
	const size_t npages = 4 * 512, h = 512 * T_PAGE;
	cowmm_t *mm = t_open_fa(1, 1);
	struct cowmm_stats a, b;
	cowmm_region_t *r, *plain;
	cowmm_snap_t *s, *ps;
	unsigned char *p, *q;
	size_t pg, i;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE,
					    COWMM_REGION_THP |
						    COWMM_REGION_HUGE_COW,
					    &r),
			 0);
	ck_assert_int_eq(cowmm_region_alloc(mm, h, COWMM_REGION_THP, &plain),
			 0);
	p = cowmm_region_base(r);
	q = cowmm_region_base(plain);
	for (pg = 0; pg < npages; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	memset(q, 3, h);
	for (i = 0; i < 4; i++)
		ck_assert_msg(t_huge(p + i * h) == T_HUGE_WRITABLE,
			      "block %zu is not one huge page", i);
	ck_assert_int_eq(t_huge(q), T_HUGE_WRITABLE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snapshot(plain, &ps), 0);
	ck_assert_int_eq(t_huge(p + h), T_HUGE_PROTECTED);

	a = t_stats(mm);
	p[612 * T_PAGE + 9] ^= 1; /* block 1 */
	b = t_stats(mm);
	ck_assert_uint_eq(b.wp_faults, a.wp_faults + 1);
	ck_assert_uint_eq(b.copies, a.copies + 1);
	ck_assert_uint_eq(b.ahead_copies, a.ahead_copies + 511);
	ck_assert_int_eq(t_huge(p + h), T_HUGE_WRITABLE);
	for (i = 0; i < 4; i += 2)
		ck_assert_int_eq(t_huge(p + i * h), T_HUGE_PROTECTED);
	for (pg = 512; pg < 1024; pg++)
		p[pg * T_PAGE + 9] ^= 1;
	ck_assert_uint_eq(t_stats(mm).wp_faults, b.wp_faults);
	t_assert_snap_filled(s, npages);
	p[612 * T_PAGE + 9] ^= 1; /* a third time: as every other page */
	t_assert_live_filled(p, 512, 512, 9, 1);
	t_assert_live_filled(p, 0, 512, 0, 0);

	/* The next snapshot protects the block whole again. */
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(t_huge(p + h), T_HUGE_PROTECTED);
	cowmm_snap_release(s);

	/* Without the flag: 4 KiB, and the huge page is split. */
	q[5] = 4;
	ck_assert_int_eq(t_huge(q), T_HUGE_NO);
	cowmm_snap_release(ps);
	cowmm_close(mm);
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "point-in-time", test_point_in_time, T_WP_UNPOPULATED, 0, 120 },
		{ "exact-reuse", test_exact_reuse, T_WP_UNPOPULATED },
		{ "unpopulated", test_unpopulated, T_WP_UNPOPULATED },
		{ "shared-frames", test_shared_frames, T_WP_UNPOPULATED },
		{ "release-orders", test_release_orders, T_WP_UNPOPULATED },
		{ "byte-reads", test_byte_reads, T_WP_UNPOPULATED },
		{ "pfn-anchor", test_pfn_anchor, T_WP_UNPOPULATED, T_NEEDS_ROOT },
		{ "detach", test_detach, T_WP_UNPOPULATED },
		{ "fault-around", test_fault_around, T_WP_UNPOPULATED },
		{ "fault-around-random", test_fault_around_random,
		  T_WP_UNPOPULATED },
		{ "bounded", test_bounded, T_WP_UNPOPULATED },
		{ "huge-cow", test_huge_cow, T_WP_UNPOPULATED },
		{ "repeat-protects-all", test_repeat_protects_all,
		  T_WP_UNPOPULATED },
		{ "big-region", test_big_region, T_WP_UNPOPULATED, 0, 600 },
	};

	return t_run("snapshot", cases, ARRAY_SIZE(cases));
}
