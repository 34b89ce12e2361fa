// SPDX-License-Identifier: MIT
/*
 * Reliability: allocation failure while preserving a page, and a stress
 * run: 8 writer threads on random pages while snapshots and clones are
 * created, verified against checksums of their instant and released, and
 * pins registered and dropped; then nothing may be left behind.
 *
 * The stress run lasts COWMM_STRESS_SECONDS (default 5) over a region of
 * COWMM_STRESS_MIB (default 256); the 'stress' meson suite runs it long.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "cowmm_i.h"

/* A failed preservation breaks the snapshot, never the writer. */
START_TEST(test_alloc_failure)
{
	cowmm_t *mm = t_open(0);
	cowmm_snap_t *s1, *s2, *s3;
	cowmm_region_t *r;
	unsigned char *p, b[T_PAGE];

	ck_assert_int_eq(cowmm_region_alloc(mm, 16 * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	memset(p, 0x61, 16 * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s1), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);
	cowmm__inject_frame_failures(mm, 1);
	p[0] = 0x62; /* needs one frame for s1 and s2: it fails */
	ck_assert_int_eq(p[0], 0x62);
	ck_assert_int_eq(cowmm_snap_read(s1, T_PAGE, b, 1), -EIO);
	ck_assert_int_eq(cowmm_snap_read(s2, 0, b, 1), -EIO);
	ck_assert_int_eq(cowmm_snap_map(s1, &(const void *){ NULL }), -EIO);
	ck_assert_int_eq(cowmm_snap_restore(s2), -EIO);
	ck_assert_uint_eq(t_stats(mm).broken, 2);
	ck_assert_ptr_nonnull(strstr(t_log_text(), "broken"));
	/* The manager goes on: a new snapshot works. */
	ck_assert_int_eq(cowmm_snapshot(r, &s3), 0);
	p[T_PAGE] = 0x63;
	ck_assert_int_eq(cowmm_snap_read(s3, T_PAGE, b, 1), 1);
	ck_assert_int_eq(b[0], 0x61);
	cowmm_snap_release(s1);
	cowmm_snap_release(s2);
	cowmm_snap_release(s3);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);

	/* A write-pinned page that cannot be copied: no snapshot, no clone. */
	ck_assert_int_eq(cowmm_pin(r, p + 2 * T_PAGE, T_PAGE, COWMM_PIN_WRITE),
			 0);
	cowmm__inject_frame_failures(mm, 1);
	s1 = NULL;
	ck_assert_int_eq(cowmm_snapshot(r, &s1), -ENOMEM);
	ck_assert_ptr_null(s1);
	cowmm__inject_frame_failures(mm, 1);
	{
		cowmm_region_t *c = NULL;

		ck_assert_int_eq(cowmm_clone(r, 0, &c), -ENOMEM);
		ck_assert_ptr_null(c);
	}
	ck_assert_uint_eq(t_stats(mm).snapshots_live, 0);
	ck_assert_uint_eq(t_stats(mm).regions_live, 1);
	ck_assert_int_eq(cowmm_snapshot(r, &s1), 0); /* memory is back */
	ck_assert_int_eq(cowmm_snap_read(s1, 2 * T_PAGE, b, 1), 1);
	cowmm_snap_release(s1);
	ck_assert_int_eq(cowmm_unpin(r, p + 2 * T_PAGE, T_PAGE), 0);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	cowmm_close(mm);
}
END_TEST

/* ------------------------------------------------------------------------ */

struct stress {
	unsigned char *mem;
	size_t npages;
	pthread_rwlock_t pause;
	atomic_bool stop;
	atomic_uint_fast64_t writes;
};

static void *stress_writer(void *arg)
{
	struct stress *st = arg;
	uint64_t x = (uintptr_t)&x | 1;

	while (!atomic_load(&st->stop)) {
		pthread_rwlock_rdlock(&st->pause);
		for (int i = 0; i < 64; i++) {
			uint64_t v = t_rand(&x);

			__atomic_store_n((uint64_t *)(st->mem + (v % st->npages) *
								T_PAGE) +
						 (v >> 52) % (T_PAGE / 8),
					 v, __ATOMIC_RELAXED);
		}
		pthread_rwlock_unlock(&st->pause);
		atomic_fetch_add(&st->writes, 64);
	}
	return NULL;
}

struct held {
	cowmm_snap_t *snap;    /* or */
	cowmm_region_t *clone; /* one of them */
	uint64_t *sums;
	size_t npages; /* of sums */
};

/*
 * The checksums of every page, in memory of their own (mmap): 8 MiB each
 * for 4 GiB, which malloc would keep in its arenas after free and which
 * would then count against the RSS check below.
 */
static uint64_t *sums_now(struct stress *st)
{
	uint64_t *s = mmap(NULL, st->npages * sizeof(*s),
			   PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			   -1, 0);

	ck_assert_ptr_ne(s, MAP_FAILED);
	for (size_t pg = 0; pg < st->npages; pg++)
		s[pg] = t_page_sum(st->mem + pg * T_PAGE);
	return s;
}

/* Pages of @h that differ from its instant (a sample of 256 for clones). */
static size_t check(struct held *h, size_t npages, uint64_t *x)
{
	unsigned char *buf = malloc(256 * T_PAGE);
	size_t bad = 0, pg, i;

	ck_assert_ptr_nonnull(buf);
	if (h->snap) {
		for (pg = 0; pg < npages; pg += 256) {
			size_t n = npages - pg < 256 ? npages - pg : 256;

			ck_assert_int_eq(cowmm_snap_read(h->snap, pg * T_PAGE,
							 buf, n * T_PAGE),
					 (ssize_t)(n * T_PAGE));
			for (i = 0; i < n; i++)
				bad += t_page_sum(buf + i * T_PAGE) !=
				       h->sums[pg + i];
		}
	} else {
		const unsigned char *q = cowmm_region_base(h->clone);

		for (i = 0; i < 256; i++) {
			pg = t_rand(x) % npages;
			bad += t_page_sum(q + pg * T_PAGE) != h->sums[pg];
		}
	}
	free(buf);
	return bad;
}

static void drop(struct held *h)
{
	if (h->snap)
		cowmm_snap_release(h->snap);
	if (h->clone)
		ck_assert_int_eq(cowmm_region_release(h->clone), 0);
	if (h->sums)
		munmap(h->sums, h->npages * sizeof(*h->sums));
	memset(h, 0, sizeof(*h));
}

START_TEST(test_stress)
{
	const char *e1 = getenv("COWMM_STRESS_SECONDS");
	const char *e2 = getenv("COWMM_STRESS_MIB");
	double seconds = e1 ? atof(e1) : 5;
	size_t mib = e2 ? strtoul(e2, NULL, 0) : 256;
	cowmm_t *mm = t_open(2);
	struct stress st = { 0 };
	struct held held[4] = { 0 };
	uint64_t x = 1234, ops = 0, snaps = 0, clones = 0, pins = 0;
	size_t bad = 0, checked = 0, i;
	struct cowmm_stats s;
	cowmm_region_t *r;
	pthread_t th[8];
	time_t end;
	long rss0;

	ck_assert_int_eq(cowmm_region_alloc(mm, mib << 20, 0, &r), 0);
	st.mem = cowmm_region_base(r);
	st.npages = (mib << 20) / T_PAGE;
	for (i = 0; i < st.npages; i++) /* all populated: RSS is stable */
		if (i % 2)
			memset(st.mem + i * T_PAGE, 0, T_PAGE);
		else
			t_fill_page(st.mem + i * T_PAGE, i);
	rss0 = t_rss_kb();
	{
		pthread_rwlockattr_t a;

		/* The pause must win against 8 readers that never let go. */
		pthread_rwlockattr_init(&a);
		pthread_rwlockattr_setkind_np(
			&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
		pthread_rwlock_init(&st.pause, &a);
		pthread_rwlockattr_destroy(&a);
	}
	atomic_init(&st.stop, false);
	for (i = 0; i < 8; i++)
		pthread_create(&th[i], NULL, stress_writer, &st);

	end = time(NULL) + (time_t)(seconds + 0.999);
	while (time(NULL) < end) {
		struct held *h = &held[t_rand(&x) % 4];
		unsigned char *pin_at;

		if (h->sums) {
			bad += check(h, st.npages, &x);
			checked++;
			drop(h);
		}
		/* A pin registered and dropped around the next instant. */
		pin_at = st.mem + (t_rand(&x) % st.npages) * T_PAGE;
		ck_assert_int_eq(cowmm_pin(r, pin_at, T_PAGE,
					   COWMM_PIN_READ | COWMM_PIN_WRITE),
				 0);
		pins++;
		pthread_rwlock_wrlock(&st.pause);
		h->sums = sums_now(&st);
		h->npages = st.npages;
		if (t_rand(&x) % 3) {
			ck_assert_int_eq(cowmm_snapshot(r, &h->snap), 0);
			snaps++;
		} else {
			ck_assert_int_eq(cowmm_clone(r, 0, &h->clone), 0);
			clones++;
		}
		pthread_rwlock_unlock(&st.pause);
		ck_assert_int_eq(cowmm_unpin(r, pin_at, T_PAGE), 0);
		ops += 3;
	}
	atomic_store(&st.stop, true);
	for (i = 0; i < 8; i++)
		pthread_join(th[i], NULL);
	for (i = 0; i < 4; i++)
		if (held[i].sums) {
			bad += check(&held[i], st.npages, &x);
			checked++;
			drop(&held[i]);
		}
	s = t_stats(mm);
	printf("stress: %.0f s, %zu MiB, 8 writers, %" PRIu64 " writes, %" PRIu64
	       " snapshots, %" PRIu64 " clones, %" PRIu64 " pins, %zu views "
	       "verified, %zu mismatches; wp_faults %" PRIu64 ", copies %" PRIu64
	       ", missing %" PRIu64 ", moves %" PRIu64 "\n",
	       seconds, mib, (uint64_t)atomic_load(&st.writes), snaps, clones,
	       pins, checked, bad, s.wp_faults, s.copies, s.missing_faults,
	       s.moves);
	ck_assert_uint_eq(bad, 0);
	ck_assert_uint_gt(checked, 0);
	ck_assert_uint_eq(s.frames_live, 0);
	ck_assert_uint_eq(s.snapshots_live, 0);
	ck_assert_uint_eq(s.regions_live, 1);
	ck_assert_uint_eq(s.broken, 0);
	t_rcu_barrier();
	/*
	 * Back near the start: what stays is the frame store's one spare
	 * chunk (2 MiB) and what malloc keeps of freed checksum arrays and
	 * frame maps in its arenas.
	 */
	ck_assert_msg(T_SANITIZED || t_rss_kb() < rss0 + 16384,
		      "RSS %ld kB, was %ld kB", t_rss_kb(), rss0);
	(void)ops;
	cowmm_close(mm);
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "alloc-failure", test_alloc_failure, T_WP_UNPOPULATED },
		{ "stress", test_stress, T_WP_UNPOPULATED, 0, 3600 },
	};

	return t_run("stress", cases, ARRAY_SIZE(cases));
}
