// SPDX-License-Identifier: MIT
/*
 * Clones, mapped snapshot views and restore: independence in both
 * directions for every order of first touches, concurrent writers, chains
 * of 8, snapshots of clones, release in every order with nothing leaked,
 * memory cost, views, and restore (in place, under concurrency, pinned).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

#define NPAGES 64

static bool page_is(const unsigned char *page, uint64_t seed)
{
	unsigned char want[T_PAGE];

	t_fill_page(want, seed);
	return !memcmp(page, want, T_PAGE);
}

static size_t resident(const void *p, size_t npages)
{
	unsigned char vec[4096];
	size_t i, n = 0;

	ck_assert_uint_le(npages, sizeof(vec));
	ck_assert_int_eq(mincore((void *)p, npages * T_PAGE, vec), 0);
	for (i = 0; i < npages; i++)
		n += vec[i] & 1;
	return n;
}

START_TEST(test_first_touch_orders)
{
	cowmm_t *mm = t_open_fa(0, 1); /* counts page by page */
	cowmm_region_t *r, *c;
	unsigned char *p, *q;
	struct cowmm_stats st0, st;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert_ptr_ne(p, q);
	ck_assert_uint_eq(cowmm_region_size(c), NPAGES * T_PAGE);
	ck_assert_uint_eq(resident(q, NPAGES), 0); /* costs nothing yet */
	st0 = t_stats(mm);

	/* clone: read, then write */
	ck_assert(page_is(q, 1));
	q[10] ^= 1;
	ck_assert(page_is(p, 1));
	/* clone: write, then read */
	q[T_PAGE + 10] ^= 1;
	ck_assert_int_eq(q[T_PAGE + 11], p[T_PAGE + 11]);
	ck_assert(page_is(p + T_PAGE, 2));
	/* source first: the clone still reads the old bytes, zero copy */
	p[2 * T_PAGE + 10] ^= 1;
	ck_assert(page_is(q + 2 * T_PAGE, 3));
	/* clone first, then the source writes: no copy is needed */
	ck_assert(page_is(q + 3 * T_PAGE, 4));
	p[3 * T_PAGE] ^= 1;
	ck_assert(page_is(q + 3 * T_PAGE, 4));
	/* source writes, then the clone writes */
	{
		unsigned char want[T_PAGE];

		t_fill_page(want, 5);
		p[4 * T_PAGE] = 0xaa;
		q[4 * T_PAGE + 1] = 0xbb;
		ck_assert_int_eq(q[4 * T_PAGE], want[0]);
		ck_assert_int_eq(p[4 * T_PAGE + 1], want[1]);
	}

	st = t_stats(mm);
	/* The source copied exactly the pages the clone had not read. */
	ck_assert_uint_eq(st.copies - st0.copies, 2);       /* pages 2, 4 */
	ck_assert_uint_eq(st.moves - st0.moves, 2);         /* 2, 4 handed */
	ck_assert_uint_eq(st.frames_live, 0);
	ck_assert_uint_eq(resident(q, NPAGES), 5);
	ck_assert_uint_eq(st.missing_faults - st0.missing_faults, 5);

	ck_assert_int_eq(cowmm_region_release(c), 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_uint_eq(t_stats(mm).regions_live, 0);
	cowmm_close(mm);
}
END_TEST

/* Pages the source never populated read as zero and cost nothing. */
START_TEST(test_unpopulated_source)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r, *c;
	unsigned char *p, *q;
	size_t i;

	ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE,
					    COWMM_REGION_NOTHP, &r),
			 0);
	p = cowmm_region_base(r);
	p[0] = 1;
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	for (i = 1; i < NPAGES; i++)
		ck_assert_int_eq(q[i * T_PAGE + 7], 0);
	ck_assert_int_eq(q[0], 1);
	ck_assert_uint_eq(resident(p, NPAGES), 1); /* source untouched */
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	cowmm_close(mm);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Concurrent writers on both sides */

struct side {
	unsigned char *mem;
	size_t npages;
	atomic_uchar *written;
	uint64_t seed;
	unsigned char mark;
};

static void *side_writer(void *arg)
{
	struct side *s = arg;
	uint64_t x = s->seed;
	int i;

	for (i = 0; i < 4000; i++) {
		size_t pg = t_rand(&x) % s->npages;

		atomic_store(&s->written[pg], 1);
		__atomic_store_n(&s->mem[pg * T_PAGE + (t_rand(&x) % T_PAGE)],
				 s->mark, __ATOMIC_RELAXED);
	}
	return NULL;
}

START_TEST(test_concurrent_writers)
{
	const size_t npages = 1024;
	cowmm_t *mm = t_open(2);
	atomic_uchar *wp = calloc(npages, 1), *wc = calloc(npages, 1);
	struct side sides[4];
	pthread_t th[4];
	cowmm_region_t *r, *c;
	unsigned char *p, *q;
	size_t i, pg;

	p = t_filled_region(mm, npages, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	for (i = 0; i < 4; i++) {
		sides[i] = (struct side){ i % 2 ? q : p, npages,
					  i % 2 ? wc : wp, 77 + i,
					  (unsigned char)(i % 2 ? 0xc1 : 0x51) };
		pthread_create(&th[i], NULL, side_writer, &sides[i]);
	}
	for (i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	/* Each byte is the original or its own side's mark, never the
	 * other side's write. */
	for (pg = 0; pg < npages; pg++) {
		unsigned char want[T_PAGE];

		t_fill_page(want, pg + 1);
		for (i = 0; i < T_PAGE; i++) {
			unsigned char a = p[pg * T_PAGE + i];
			unsigned char b = q[pg * T_PAGE + i];

			/* Check's assertions cost a write(2) each even when
			 * they hold: assert only on a mismatch. */
			if (!(a == want[i] || (wp[pg] && a == 0x51)))
				ck_abort_msg("source page %zu byte %zu", pg, i);
			if (!(b == want[i] || (wc[pg] && b == 0xc1)))
				ck_abort_msg("clone page %zu byte %zu", pg, i);
		}
	}
	free(wp);
	free(wc);
	cowmm_close(mm);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Chains, snapshots of clones, clones of snapshotted regions */

START_TEST(test_chain)
{
	enum { GEN = 9 };
	cowmm_t *mm = t_open(0);
	cowmm_region_t *g[GEN];
	unsigned char *m[GEN];
	int i, j;

	m[0] = t_filled_region(mm, NPAGES, &g[0]);
	for (i = 1; i < GEN; i++) {
		/* Each generation marks page i before it is cloned. */
		m[i - 1][i * T_PAGE] = (unsigned char)(0x80 + i);
		ck_assert_int_eq(cowmm_clone(g[i - 1], 0, &g[i]), 0);
		m[i] = cowmm_region_base(g[i]);
	}
	/* Generation i sees the marks 1..i+1, nothing later. */
	for (i = 0; i < GEN; i++)
		for (j = 1; j < GEN; j++) {
			unsigned char want = j <= i + 1 ? 0x80 + j : 0;

			if (!want) {
				unsigned char page[T_PAGE];

				t_fill_page(page, j + 1);
				want = page[0];
			}
			ck_assert_msg(m[i][j * T_PAGE] == want,
				      "generation %d page %d: %#x", i, j,
				      m[i][j * T_PAGE]);
		}
	/* Untouched pages come through every generation. */
	ck_assert(page_is(m[GEN - 1] + 40 * T_PAGE, 41));
	/* Release from the middle outwards; the rest still reads right. */
	ck_assert_int_eq(cowmm_region_release(g[4]), 0);
	ck_assert_int_eq(cowmm_region_release(g[0]), 0);
	ck_assert(page_is(m[5] + 50 * T_PAGE, 51));
	ck_assert(page_is(m[8] + 51 * T_PAGE, 52));
	for (i = GEN - 1; i > 0; i--)
		if (i != 4)
			ck_assert_int_eq(cowmm_region_release(g[i]), 0);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	ck_assert_uint_eq(t_stats(mm).regions_live, 0);
	cowmm_close(mm);
}
END_TEST

START_TEST(test_snapshot_of_clone)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r, *c;
	cowmm_snap_t *s, *rs;
	unsigned char *p, *q, b[T_PAGE];
	size_t pg;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &rs), 0); /* a live snapshot */
	p[0] = 0x10;
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	q[T_PAGE] = 0x20; /* materialised before the snapshot */
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0);
	for (pg = 0; pg < NPAGES; pg++)
		q[pg * T_PAGE + 1] = 0x30; /* every page, most not yet read */
	p[5 * T_PAGE + 1] = 0x40;
	for (pg = 0; pg < NPAGES; pg++) {
		unsigned char want[T_PAGE];

		t_fill_page(want, pg + 1);
		if (pg == 0)
			want[0] = 0x10;
		if (pg == 1)
			want[0] = 0x20;
		ck_assert_int_eq(cowmm_snap_read(s, pg * T_PAGE, b, T_PAGE),
				 T_PAGE);
		ck_assert_msg(!memcmp(b, want, T_PAGE), "clone snapshot "
			      "page %zu", pg);
		if (pg == 0)
			t_fill_page(want, 1);
		ck_assert_int_eq(cowmm_snap_read(rs, pg * T_PAGE, b, T_PAGE),
				 T_PAGE);
		ck_assert_msg(page_is(b, pg + 1), "source snapshot page %zu",
			      pg);
	}
	/* Release the clone first: its snapshot keeps its content. */
	ck_assert_int_eq(cowmm_region_release(c), 0);
	ck_assert_int_eq(cowmm_snap_read(s, 7 * T_PAGE, b, T_PAGE), T_PAGE);
	ck_assert(page_is(b, 8));
	cowmm_snap_release(s);
	cowmm_snap_release(rs);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	cowmm_close(mm);
}
END_TEST

/* Release in every order: nothing left behind, memory back. */
START_TEST(test_release_orders)
{
	const size_t npages = 2048; /* 8 MiB */
	cowmm_t *mm = t_open(0);
	long rss0 = -1;
	int order;

	for (order = 0; order < 2; order++) {
		cowmm_region_t *r, *c;
		unsigned char *p, *q;
		size_t pg;

		p = t_filled_region(mm, npages, &r);
		if (rss0 < 0)
			rss0 = t_rss_kb();
		ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
		q = cowmm_region_base(c);
		for (pg = 0; pg < npages; pg += 4)
			p[pg * T_PAGE] ^= 1; /* K = npages / 4 copies */
		ck_assert_uint_eq(t_stats(mm).frames_live, npages / 4);
		if (order == 0) {
			ck_assert_int_eq(cowmm_region_release(c), 0);
			ck_assert_uint_eq(t_stats(mm).frames_live, 0);
			ck_assert_int_eq(cowmm_region_release(r), 0);
		} else {
			ck_assert_int_eq(cowmm_region_release(r), 0);
			/* The clone still reads the source of its instant. */
			for (pg = 0; pg < npages; pg += 97)
				ck_assert(page_is(q + pg * T_PAGE, pg + 1));
			ck_assert_int_eq(cowmm_region_release(c), 0);
		}
		ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	}
	t_rcu_barrier();
	ck_assert_msg(T_SANITIZED || t_rss_kb() < rss0 + 2048,
		      "RSS %ld kB, started at %ld", t_rss_kb(), rss0);
	cowmm_close(mm);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Views */

START_TEST(test_view)
{
	cowmm_t *mm = t_open(0);
	const unsigned char *v, *v2;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	int status;
	pid_t pid;

	p = t_filled_region(mm, NPAGES, &r);
	/* A pointer stored inside the region, to follow by offset. */
	*(unsigned char **)(p + 8) = p + 9 * T_PAGE + 3;
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	memset(p + 9 * T_PAGE, 0xee, T_PAGE);
	ck_assert_int_eq(cowmm_snap_map(s, (const void **)&v), 0);
	ck_assert_int_eq(cowmm_snap_map(s, (const void **)&v2), 0);
	ck_assert_ptr_eq(v, v2);
	ck_assert_ptr_ne(v, p);
	{
		unsigned char *ptr = *(unsigned char *const *)(v + 8);
		const unsigned char *at = v + (ptr - p);
		unsigned char want[T_PAGE];

		t_fill_page(want, 10);
		ck_assert_int_eq(*at, want[3]);
	}
	ck_assert(page_is(v + 9 * T_PAGE, 10));
	ck_assert(page_is(v + 33 * T_PAGE, 34));
	ck_assert_uint_eq(resident(v, NPAGES), 3); /* filled lazily */

	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		alarm(10);
		signal(SIGSEGV, SIG_DFL); /* not a sanitizer's handler */
		((volatile unsigned char *)v)[0] = 1;
		_exit(0);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV,
		      "a write to the view: status %#x", status);

	cowmm_snap_release(s);
	ck_assert_int_eq(msync((void *)v, T_PAGE, MS_ASYNC), -1);
	ck_assert_int_eq(errno, ENOMEM); /* unmapped with the snapshot */
	cowmm_close(mm);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Restore */

START_TEST(test_restore)
{
	cowmm_t *mm = t_open(0);
	cowmm_snap_t *s, *later;
	cowmm_region_t *r;
	unsigned char *p, b[T_PAGE];
	uint64_t pfn = 0;
	size_t pg;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_pin(r, p + 3 * T_PAGE, T_PAGE,
				   COWMM_PIN_READ),
			 0);
	if (geteuid() == 0)
		pfn = t_pfn(p + 3 * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	for (pg = 0; pg < NPAGES; pg += 2)
		memset(p + pg * T_PAGE, 0x33, 100);
	p[3 * T_PAGE] = 0x44;
	ck_assert_int_eq(cowmm_snapshot(r, &later), 0);

	for (int round = 0; round < 3; round++) {
		ck_assert_int_eq(cowmm_snap_restore(s), 0);
		for (pg = 0; pg < NPAGES; pg++)
			ck_assert_msg(page_is(p + pg * T_PAGE, pg + 1),
				      "round %d page %zu", round, pg);
		memset(p + 5 * T_PAGE, 0x55, T_PAGE); /* diverge again */
	}
	if (pfn)
		ck_assert_uint_eq(t_pfn(p + 3 * T_PAGE), pfn);
	/* Both snapshots stay valid. */
	ck_assert_int_eq(cowmm_snap_read(s, 0, b, T_PAGE), T_PAGE);
	ck_assert(page_is(b, 1));
	ck_assert_int_eq(cowmm_snap_read(later, 0, b, T_PAGE), T_PAGE);
	ck_assert_int_eq(b[0], 0x33);
	ck_assert_int_eq(cowmm_snap_read(later, 3 * T_PAGE, b, T_PAGE), T_PAGE);
	ck_assert_int_eq(b[0], 0x44);
	/* And the newer one restores just as well. */
	ck_assert_int_eq(cowmm_snap_restore(later), 0);
	ck_assert_int_eq(p[2 * T_PAGE], 0x33);
	ck_assert_int_eq(p[3 * T_PAGE], 0x44);
	ck_assert(page_is(p + 5 * T_PAGE, 6));

	cowmm_snap_release(later);
	ck_assert_int_eq(cowmm_unpin(r, p + 3 * T_PAGE, T_PAGE), 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_int_eq(cowmm_snap_restore(s), -ENOENT);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_snap_restore(s), -EBADF);
	ck_assert_int_eq(cowmm_snap_restore(NULL), -EINVAL);
	cowmm_close(mm);
}
END_TEST

struct churn {
	unsigned char *mem;
	size_t npages;
	atomic_bool stop;
};

static void *churn_main(void *arg)
{
	struct churn *c = arg;
	uint64_t x = 5;

	while (!atomic_load(&c->stop)) {
		size_t pg = t_rand(&x) % c->npages;

		__atomic_store_n(&c->mem[pg * T_PAGE + t_rand(&x) % T_PAGE],
				 0x99, __ATOMIC_RELAXED);
	}
	return NULL;
}

/* Restores while writers run, then a quiet one that must be exact. */
START_TEST(test_restore_concurrent)
{
	const size_t npages = 512;
	cowmm_t *mm = t_open(2);
	struct churn ch = { .npages = npages };
	pthread_t th[2];
	cowmm_region_t *r, *c;
	cowmm_snap_t *s;
	int i;

	ch.mem = t_filled_region(mm, npages, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	atomic_init(&ch.stop, false);
	for (i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, churn_main, &ch);
	for (i = 0; i < 20; i++) {
		usleep(2000);
		ck_assert_int_eq(cowmm_snap_restore(s), 0);
		if (i == 10) { /* a clone taken in the middle of it all */
			ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
		}
	}
	atomic_store(&ch.stop, true);
	for (i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	for (size_t pg = 0; pg < npages; pg++)
		ck_assert_msg(page_is(ch.mem + pg * T_PAGE, pg + 1),
			      "page %zu after a quiet restore", pg);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(c), 0);
	cowmm_close(mm);
}
END_TEST

/* A clone of a region with write pins: the pinned page is copied now. */
START_TEST(test_clone_pinned)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r, *c;
	unsigned char *p, *q;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_pin(r, p, 2 * T_PAGE, COWMM_PIN_WRITE), 0);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	ck_assert_uint_eq(t_stats(mm).pin_copies, 2);
	q = cowmm_region_base(c);
	p[0] = 0x12; /* a "device" write: no fault needed for the clone */
	ck_assert(page_is(q, 1));
	ck_assert_int_eq(cowmm_pin(c, q, T_PAGE, COWMM_PIN_READ), 0);
	ck_assert_int_eq(cowmm_region_release(c), -EBUSY);
	ck_assert_int_eq(cowmm_unpin(c, q, T_PAGE), 0);
	ck_assert_int_eq(cowmm_region_release(c), 0);
	ck_assert_int_eq(cowmm_unpin(r, p, 2 * T_PAGE), 0);
	cowmm_close(mm);
}
END_TEST

START_TEST(test_bad_args)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r, *c = (cowmm_region_t *)&mm;
	cowmm_snap_t *s;
	const void *v = &mm;

	t_filled_region(mm, 4, &r);
	ck_assert_int_eq(cowmm_clone(NULL, 0, &c), -EINVAL);
	ck_assert_int_eq(cowmm_clone(r, 0, NULL), -EINVAL);
	ck_assert_int_eq(cowmm_clone(r, 1u << 9, &c), -EINVAL);
	ck_assert_int_eq(cowmm_clone(r, COWMM_REGION_THP | COWMM_REGION_NOTHP,
				     &c),
			 -EINVAL);
	ck_assert_ptr_eq(c, (cowmm_region_t *)&mm);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_map(s, NULL), -EINVAL);
	ck_assert_int_eq(cowmm_snap_map(NULL, &v), -EINVAL);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_snap_map(s, &v), -EBADF);
	ck_assert_ptr_eq(v, &mm);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), -EBADF);
	cowmm_close(mm);
}
END_TEST

int main(void)
{
	const uint64_t move = 1 << 16; /* UFFD_FEATURE_MOVE */
	const struct t_case cases[] = {
		{ "first-touch-orders", test_first_touch_orders,
		  T_WP_UNPOPULATED | move },
		{ "unpopulated-source", test_unpopulated_source,
		  T_WP_UNPOPULATED },
		{ "concurrent-writers", test_concurrent_writers,
		  T_WP_UNPOPULATED },
		{ "chain", test_chain, T_WP_UNPOPULATED },
		{ "snapshot-of-clone", test_snapshot_of_clone, T_WP_UNPOPULATED },
		{ "release-orders", test_release_orders, T_WP_UNPOPULATED },
		{ "view", test_view, T_WP_UNPOPULATED },
		{ "restore", test_restore, T_WP_UNPOPULATED },
		{ "restore-concurrent", test_restore_concurrent,
		  T_WP_UNPOPULATED, 0, 120 },
		{ "clone-pinned", test_clone_pinned, T_WP_UNPOPULATED },
		{ "bad-args", test_bad_args, T_WP_UNPOPULATED },
	};

	return t_run("clone", cases, ARRAY_SIZE(cases));
}
