// SPDX-License-Identifier: MIT
/*
 * Exact under every interaction: one case per way an outside review found
 * to get other bytes than a snapshot's instant, a hang or an undocumented
 * error (issue 15).  Each case builds the state deterministically: where
 * the finding needs a discard that is read but not yet handled, a helper
 * thread holds the lock of another region for a while, so that the worker
 * defers the REMOVE event (as a busy fault would make it do).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/swap.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "cowmm_i.h"

#define NPAGES 64

static bool page_is(const unsigned char *page, uint64_t seed)
{
	unsigned char want[T_PAGE];

	t_fill_page(want, seed);
	return !memcmp(page, want, T_PAGE);
}

static bool zero_page(const unsigned char *p)
{
	size_t i;

	for (i = 0; i < T_PAGE; i++)
		if (p[i])
			return false;
	return true;
}

/* ------------------------------------------------------------------------ */
/* A discard that stays pending: REMOVE read, its handler deferred. */

struct hold {
	pthread_t th;
	pthread_mutex_t *lock;
	unsigned ms;
	sem_t locked;
};

static void *hold_main(void *arg)
{
	struct hold *h = arg;

	pthread_mutex_lock(h->lock);
	sem_post(&h->locked);
	usleep(h->ms * 1000);
	pthread_mutex_unlock(h->lock);
	return NULL;
}

/* A helper holds @lock for @ms from now; hold_end() joins it. */
static void hold_start(struct hold *h, pthread_mutex_t *lock, unsigned ms)
{
	h->lock = lock;
	h->ms = ms;
	ck_assert_int_eq(sem_init(&h->locked, 0, 0), 0);
	ck_assert_int_eq(pthread_create(&h->th, NULL, hold_main, h), 0);
	sem_wait(&h->locked);
}

/*
 * Discard page 0 of @other while a helper holds its lock for @ms: the
 * REMOVE event is read (madvise() returns) but cannot be handled until the
 * helper lets go.  hold_end() joins the helper.
 */
static void discard_pending(cowmm_t *mm, cowmm_region_t *other,
			    struct hold *h, unsigned ms)
{
	hold_start(h, &other->lock, ms);
	ck_assert_int_eq(madvise(cowmm_region_base(other), T_PAGE,
				 MADV_DONTNEED), 0);
	while (!atomic_load(&mm->removes_pending))
		usleep(100);
}

static void hold_end(struct hold *h)
{
	pthread_join(h->th, NULL);
	sem_destroy(&h->locked);
}

/* ------------------------------------------------------------------------ */

/* Item 1: a restore during a pending discard keeps newer snapshots exact. */
START_TEST(test_restore_discard_pending)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *other;
	cowmm_snap_t *s1, *s2;
	unsigned char *p, buf[T_PAGE];
	struct hold h;
	size_t pg;

	p = t_filled_region(mm, NPAGES, &r);
	t_filled_region(mm, 4, &other);
	ck_assert_int_eq(cowmm_snapshot(r, &s1), 0);
	for (pg = 0; pg < NPAGES; pg++)
		p[pg * T_PAGE + 7] ^= 0x5a;
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0); /* shares every page */

	discard_pending(mm, other, &h, 500);
	ck_assert_int_eq(cowmm_snap_restore(s1), 0);
	hold_end(&h);

	t_assert_live_filled(p, 0, NPAGES, 7, 0);
	for (pg = 0; pg < NPAGES; pg++) {
		ck_assert_int_eq(cowmm_snap_read(s2, pg * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		buf[7] ^= 0x5a;
		ck_assert_msg(page_is(buf, pg + 1),
			      "page %zu of the newer snapshot reads the "
			      "restored bytes", pg);
	}
	cowmm_close(mm);
}
END_TEST

/* Item 2: release during a pending discard: 0, and snapshots keep all. */
START_TEST(test_release_discard_pending)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *other;
	cowmm_snap_t *s;
	struct hold h;

	t_filled_region(mm, NPAGES, &r);
	t_filled_region(mm, 4, &other);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);

	discard_pending(mm, other, &h, 500);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	hold_end(&h);
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm);
}
END_TEST

/* Item 10: write pins with a pending discard: no spurious -ENOMEM. */
START_TEST(test_pinned_discard_pending)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *other;
	cowmm_snap_t *s, *s2;
	unsigned char *p;
	struct cowmm_stats st0, st;
	struct hold h;

	p = t_filled_region(mm, NPAGES, &r);
	t_filled_region(mm, 4, &other);
	ck_assert_int_eq(cowmm_pin(r, p, 2 * T_PAGE, COWMM_PIN_WRITE), 0);

	/* cowmm_snapshot() copies the write-pinned pages eagerly. */
	st0 = t_stats(mm);
	discard_pending(mm, other, &h, 1500);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	hold_end(&h);
	st = t_stats(mm);
	ck_assert_uint_eq(st.pin_copies - st0.pin_copies, 2);

	/* cowmm_pin() copies the newly write-pinned page for @s. */
	discard_pending(mm, other, &h, 1500);
	ck_assert_int_eq(cowmm_pin(r, p + 4 * T_PAGE, T_PAGE, COWMM_PIN_WRITE),
			 0);
	hold_end(&h);
	st0 = st;
	st = t_stats(mm);
	ck_assert_uint_eq(st.pin_copies - st0.pin_copies, 1);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);
	t_assert_snap_filled(s, NPAGES);
	t_assert_snap_filled(s2, NPAGES);
	cowmm_close(mm);
}
END_TEST

/* Item 3: a clone's page discarded before its first touch reads zero. */
START_TEST(test_clone_discard_untouched)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *c;
	unsigned char *q;

	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert_int_eq(madvise(q + 3 * T_PAGE, 2 * T_PAGE, MADV_DONTNEED), 0);
	ck_assert_msg(zero_page(q + 3 * T_PAGE), "discarded clone page "
		      "refilled from its origin");
	ck_assert(zero_page(q + 4 * T_PAGE));
	ck_assert(page_is(q + 2 * T_PAGE, 3));
	ck_assert(page_is(q + 5 * T_PAGE, 6));
	cowmm_close(mm);
}
END_TEST

/* Item 4: a snapshot of a clone never keeps a discarded page's zeros. */
START_TEST(test_clone_snap_discard_pending)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *c;
	cowmm_snap_t *s;
	unsigned char *q, buf[T_PAGE];
	struct hold h;
	ssize_t n;

	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert(page_is(q + 5 * T_PAGE, 6)); /* materialised */
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0);

	/* The clone's own discard, its handler held up by the clone's lock. */
	hold_start(&h, &c->lock, 300);
	ck_assert_int_eq(madvise(q + 5 * T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	n = cowmm_snap_read(s, 5 * T_PAGE, buf, T_PAGE);
	hold_end(&h);
	ck_assert_msg(n == -EIO || (n == T_PAGE && page_is(buf, 6)),
		      "snapshot of a clone read %zd, %s", n,
		      n == T_PAGE && zero_page(buf) ? "zeros" : "other bytes");
	cowmm_close(mm);
}
END_TEST

static void exit_on_sigbus(int sig)
{
	(void)sig;
	_exit(99); /* the sanitizers' own SIGBUS reports would abort */
}

/*
 * Item 5: where a clone's origin lost a page, touching it raises SIGBUS
 * (or gives the right bytes), never zeros.  @how: 0 the source discards
 * the page, 1 the copy for the origin cannot get a frame, 2 the source
 * unmaps it and a snapshot of the clone protects the clone's page.
 */
static void origin_lost(int how)
{
	pid_t pid = fork();
	int st;

	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		cowmm_t *mm;
		cowmm_region_t *r, *c;
		struct cowmm_config cfg = COWMM_CONFIG_INIT;
		volatile unsigned char *q;
		unsigned char *p;
		size_t i;

		cfg.workers = 1;
		if (cowmm_open(&cfg, &mm) || cowmm_region_alloc(mm, NPAGES *
								 T_PAGE, 0,
								 &r))
			_exit(2);
		p = cowmm_region_base(r);
		for (i = 0; i < NPAGES; i++)
			t_fill_page(p + i * T_PAGE, i + 1);
		if (cowmm_clone(r, 0, &c))
			_exit(3);
		q = cowmm_region_base(c);
		if (how == 0) {
			if (madvise(p + 7 * T_PAGE, T_PAGE, MADV_DONTNEED))
				_exit(4);
			cowmm__quiesce(mm);
		} else if (how == 2) {
			cowmm_snap_t *s;

			/* Unmapped in the source; the clone then protected
			 * (uffd-wp markers where nothing is mapped yet). */
			if (munmap(p + 7 * T_PAGE, T_PAGE))
				_exit(4);
			cowmm__quiesce(mm);
			if (cowmm_snapshot(c, &s))
				_exit(5);
		} else {
			cowmm__inject_frame_failures(mm, 1);
			p[7 * T_PAGE] ^= 1;
		}
		signal(SIGBUS, exit_on_sigbus);
		if (page_is((const unsigned char *)q + 7 * T_PAGE, 8))
			_exit(0); /* the right bytes: fine too */
		_exit(zero_page((const unsigned char *)q + 7 * T_PAGE) ? 10
									: 11);
	}
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert_msg(WIFEXITED(st) &&
			      (WEXITSTATUS(st) == 99 || WEXITSTATUS(st) == 0),
		      "child status %#x: the clone read %s", st,
		      WIFEXITED(st) && WEXITSTATUS(st) == 10 ? "zeros"
							    : "other bytes");
}

START_TEST(test_clone_origin_discarded)
{
	origin_lost(0);
}
END_TEST

START_TEST(test_clone_origin_no_frame)
{
	origin_lost(1);
}
END_TEST

START_TEST(test_clone_origin_unmapped_protected)
{
	origin_lost(2);
}
END_TEST

/*
 * A clone's page discarded before its first touch is no longer its
 * origin's: a discard of it in the source breaks nothing.
 */
START_TEST(test_clone_discard_both)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *c;
	unsigned char *p, *q;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert_int_eq(madvise(q + 4 * T_PAGE, 8 * T_PAGE, MADV_DONTNEED), 0);
	cowmm__quiesce(mm);
	ck_assert_int_eq(madvise(p + 6 * T_PAGE, 2 * T_PAGE, MADV_DONTNEED), 0);
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	ck_assert(zero_page(q + 6 * T_PAGE));
	ck_assert(page_is(q + 12 * T_PAGE, 13));
	cowmm_close(mm);
}
END_TEST

/*
 * A clone's write-pinned page whose origin lost it: a snapshot (or a clone)
 * of the clone is still taken, broken where the page is lost.
 */
START_TEST(test_clone_pinned_origin_lost)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *c, *c2;
	cowmm_snap_t *s;
	unsigned char *p, *q;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert_int_eq(cowmm_pin(c, q + 4 * T_PAGE, T_PAGE, COWMM_PIN_WRITE),
			 0);
	ck_assert_int_eq(munmap(p + 4 * T_PAGE, T_PAGE), 0);
	cowmm__quiesce(mm);
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0);
	ck_assert_int_eq(cowmm_clone(c, 0, &c2), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * MADV_FREE pages [@first, @first + @n) of region @r (at @p), take a
 * snapshot of it into @s (it shares them), then have the kernel drop page
 * @probe with MADV_PAGEOUT, as reclaim may.  A page still in a CPU's batch
 * of pages headed for the lazy-free list is not on it yet, and PAGEOUT
 * passes it by; it drains only its own CPU's batch.  So MADV_FREE and
 * PAGEOUT on one CPU (a loaded run of the whole suite failed here once,
 * and snapshot-unseen-while-moving, which asked once, under TSan), and
 * again, a while.
 */
static void free_snap_pageout(cowmm_t *mm, cowmm_region_t *r,
			      unsigned char *p, size_t n, size_t probe,
			      cowmm_snap_t **s)
{
	unsigned char vec = 1;
	cpu_set_t one, all;
	int tries;

	CPU_ZERO(&one);
	CPU_SET(sched_getcpu(), &one);
	ck_assert_int_eq(sched_getaffinity(0, sizeof(all), &all), 0);
	ck_assert_int_eq(sched_setaffinity(0, sizeof(one), &one), 0);
	ck_assert_int_eq(madvise(p, n * T_PAGE, MADV_FREE), 0);
	cowmm__quiesce(mm);
	ck_assert_int_eq(cowmm_snapshot(r, s), 0);
	for (tries = 0; tries < 150; tries++) {
		ck_assert_int_eq(madvise(p, n * T_PAGE, MADV_PAGEOUT), 0);
		ck_assert_int_eq(mincore(p + probe * T_PAGE, T_PAGE, &vec), 0);
		if (!(vec & 1))
			break;
		usleep(20000);
	}
	ck_assert_int_eq(sched_setaffinity(0, sizeof(all), &all), 0);
	if (vec & 1)
		ck_abort_msg("MADV_PAGEOUT kept a MADV_FREE page for 3 s: "
			     "this case cannot be set up here");
}

/*
 * The kernel may drop a page MADV_FREE left without telling anyone
 * (MADV_PAGEOUT here); a write then lands on a fresh page with no fault.
 * A snapshot that shared it must never read that write, also after a
 * later snapshot protects the page again.
 */
START_TEST(test_free_dropped_written)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r;
	cowmm_snap_t *s1, *s2;
	unsigned char *p, buf[T_PAGE];
	ssize_t n;

	p = t_filled_region(mm, NPAGES, &r);
	free_snap_pageout(mm, r, p, 8, 3, &s1); /* @s1 shares them */
	p[3 * T_PAGE] = 0xee; /* no fault: nothing protects it now */
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);
	n = cowmm_snap_read(s1, 3 * T_PAGE, buf, T_PAGE);
	ck_assert_msg(n == -EIO || (n == T_PAGE && (page_is(buf, 4) ||
						    zero_page(buf))),
		      "a snapshot read %zd: %s", n,
		      n == T_PAGE && buf[0] == 0xee ? "the later write"
						    : "other bytes");
	cowmm_close(mm);
}
END_TEST

/*
 * A thread that discards pages of a region without pause never holds back
 * faults, clones or snapshot reads on its other pages: each waits only
 * for the discards read before it.  (At this pace the outside review hung a
 * clone's first touch in 5 of 5 runs.)
 */
struct storm {
	unsigned char *p;
	atomic_bool stop;
};

static void *storm_main(void *arg)
{
	struct storm *st = arg;
	unsigned seed = 1, g = 1;

	while (!atomic_load(&st->stop)) {
		memset(st->p + (rand_r(&seed) % 16) * T_PAGE, g++ % 250 + 1,
		       T_PAGE);
		madvise(st->p + (rand_r(&seed) % 16) * T_PAGE, T_PAGE,
			MADV_DONTNEED);
		usleep(50); /* the review's pace: hung 5 of 5 before */
	}
	return NULL;
}

START_TEST(test_discard_storm)
{
	cowmm_t *mm = t_open_fa(1, 1);
	struct storm st = { 0 };
	cowmm_region_t *r, *c;
	cowmm_snap_t *s;
	pthread_t th;
	unsigned char *q, buf[T_PAGE];
	size_t i;
	int round;

	st.p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(pthread_create(&th, NULL, storm_main, &st), 0);
	for (round = 0; round < 8; round++) {
		unsigned char v = (unsigned char)(round + 20);

		for (i = 16; i < NPAGES; i++)
			memset(st.p + i * T_PAGE, v, T_PAGE);
		ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
		for (i = 16; i < NPAGES; i += 2)
			st.p[i * T_PAGE] = v + 1;
		ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
		q = cowmm_region_base(c);
		for (i = 16; i < NPAGES; i++)
			ck_assert_int_eq(q[i * T_PAGE], i % 2 ? v : v + 1);
		ck_assert_int_eq(cowmm_region_release(c), 0);
		for (i = 16; i < NPAGES; i++) {
			ssize_t n = cowmm_snap_read(s, i * T_PAGE, buf, T_PAGE);

			/* -EIO: a discard of pages 0..15 broke it, fine */
			ck_assert(n == -EIO || (n == T_PAGE && buf[0] == v));
		}
		cowmm_snap_release(s);
	}
	atomic_store(&st.stop, true);
	pthread_join(th, NULL);
	cowmm_close(mm);
}
END_TEST

/* Snapshots of a clone never touched read its origin's bytes. */
START_TEST(test_clone_snapshots_untouched)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *c;
	cowmm_snap_t *s0, *s1;

	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	ck_assert_int_eq(cowmm_snapshot(c, &s0), 0);
	ck_assert_int_eq(cowmm_snapshot(c, &s1), 0);
	t_assert_snap_filled(s0, NPAGES);
	t_assert_snap_filled(s1, NPAGES);
	cowmm_close(mm);
}
END_TEST

/*
 * A mapped view of a snapshot that a discard broke afterwards: its pages
 * not filled yet raise SIGBUS (or hold the instant), never zeros.
 */
START_TEST(test_view_broken)
{
	pid_t pid = fork();
	int st;

	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		struct cowmm_config cfg = COWMM_CONFIG_INIT;
		const unsigned char *v;
		cowmm_region_t *r;
		cowmm_snap_t *s;
		cowmm_t *mm;
		unsigned char *p;

		cfg.workers = 1;
		if (cowmm_open(&cfg, &mm) ||
		    cowmm_region_alloc(mm, 16 * T_PAGE, 0, &r))
			_exit(2);
		p = cowmm_region_base(r);
		memset(p, 0xab, 16 * T_PAGE);
		if (cowmm_snapshot(r, &s) ||
		    cowmm_snap_map(s, (const void **)&v))
			_exit(3);
		if (madvise(p, T_PAGE, MADV_DONTNEED))
			_exit(4);
		cowmm__quiesce(mm);
		signal(SIGBUS, exit_on_sigbus);
		if (*(volatile const unsigned char *)v == 0xab)
			_exit(0);
		_exit(*(volatile const unsigned char *)v ? 11 : 10);
	}
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert_msg(WIFEXITED(st) &&
			      (WEXITSTATUS(st) == 99 || WEXITSTATUS(st) == 0),
		      "child status %#x: the view read %s", st,
		      WIFEXITED(st) && WEXITSTATUS(st) == 10 ? "zeros"
							    : "other bytes");
}
END_TEST

struct discarder {
	unsigned char *p;
	size_t npages;
	atomic_bool stop;
};

static void *discarder_main(void *arg)
{
	struct discarder *d = arg;
	unsigned seed = 7;

	while (!atomic_load(&d->stop))
		madvise(d->p + (rand_r(&seed) % d->npages) * T_PAGE, T_PAGE,
			MADV_DONTNEED);
	return NULL;
}

static sigjmp_buf bus_jump;

static void on_bus_jump(int sig)
{
	(void)sig;
	siglongjmp(bus_jump, 1);
}

/* The byte at @p, or -1 where reading it raises SIGBUS. */
static int probe_byte(const unsigned char *p)
{
	if (sigsetjmp(bus_jump, 1))
		return -1;
	return *(volatile const unsigned char *)p;
}

/*
 * A clone never touched, its source released while another thread
 * discards source pages: each clone page reads the instant or raises
 * SIGBUS, never zeros (the release used to skip a dying region's
 * discards and took the zapped pages for dropped ones).
 */
START_TEST(test_release_discard_race)
{
	pid_t pid = fork();
	int st;

	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		struct cowmm_config cfg = COWMM_CONFIG_INIT;
		int round, zeros = 0;

		cfg.workers = 2;
		signal(SIGBUS, on_bus_jump);
		for (round = 0; round < 10; round++) {
			struct discarder d = { .npages = 256 };
			cowmm_region_t *r, *c;
			cowmm_t *mm;
			pthread_t th;
			size_t i;

			if (cowmm_open(&cfg, &mm))
				_exit(2);
			d.p = mmap(NULL, d.npages * T_PAGE,
				   PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			memset(d.p, 0xab, d.npages * T_PAGE);
			if (cowmm_region_adopt(mm, d.p, d.npages * T_PAGE, 0,
					       &r) ||
			    cowmm_clone(r, 0, &c))
				_exit(3);
			pthread_create(&th, NULL, discarder_main, &d);
			usleep(500);
			if (cowmm_region_release(r))
				_exit(4);
			atomic_store(&d.stop, true);
			pthread_join(th, NULL);
			for (i = 0; i < d.npages; i++)
				zeros += probe_byte((unsigned char *)
							    cowmm_region_base(c) +
						    i * T_PAGE) == 0;
			cowmm_close(mm);
			munmap(d.p, d.npages * T_PAGE);
		}
		_exit(zeros ? 10 : 0);
	}
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0,
		      "child status %#x: %s", st,
		      WIFEXITED(st) && WEXITSTATUS(st) == 10
			      ? "clone pages read zeros" : "failed");
}
END_TEST

struct churn {
	unsigned char *p;
	size_t npages;
	atomic_bool stop;
	bool discard;
	unsigned seed;
};

static void *churn_main(void *arg)
{
	struct churn *c = arg;

	while (!atomic_load(&c->stop)) {
		size_t i = rand_r(&c->seed) % c->npages;

		if (c->discard)
			madvise(c->p + i * T_PAGE, T_PAGE,
				rand_r(&c->seed) & 1 ? MADV_FREE
						     : MADV_DONTNEED);
		else
			memset(c->p + i * T_PAGE, 0x11, T_PAGE);
	}
	return NULL;
}

/*
 * Restore while other threads write and discard pages without pause: it
 * returns, and the pages nobody touched are the snapshot's (it never
 * returned: one unprotect a page, each refused while a discard was in
 * flight).
 */
START_TEST(test_restore_discard_storm)
{
	const size_t npages = 1024, half = npages / 2;
	cowmm_t *mm = t_open_fa(2, 1);
	struct churn ch[3] = {
		{ .npages = half, .seed = 1 },
		{ .npages = half, .seed = 2 },
		{ .npages = half, .seed = 3, .discard = true },
	};
	cowmm_region_t *r;
	cowmm_snap_t *s, *s2;
	pthread_t th[3];
	unsigned char *p;
	size_t i;
	int round, k;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	for (round = 0; round < 12; round++) {
		memset(p, 0xa0 + round, npages * T_PAGE);
		ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
		memset(p, 0xbb, npages * T_PAGE); /* @s holds every page */
		for (i = half; i < npages; i += 3)
			madvise(p + i * T_PAGE, T_PAGE, MADV_DONTNEED);
		ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);
		for (k = 0; k < 3; k++) {
			ch[k].p = p;
			atomic_store(&ch[k].stop, false);
			ck_assert_int_eq(pthread_create(&th[k], NULL,
							churn_main, &ch[k]),
					 0);
		}
		usleep(300);
		ck_assert_int_eq(cowmm_snap_restore(s), 0);
		ck_assert_int_eq(cowmm_snap_restore(s), 0);
		for (k = 0; k < 3; k++) {
			atomic_store(&ch[k].stop, true);
			pthread_join(th[k], NULL);
		}
		for (i = half; i < npages; i++)
			ck_assert_int_eq(p[i * T_PAGE], 0xa0 + round);
		cowmm_snap_release(s2);
		cowmm_snap_release(s);
	}
	cowmm_close(mm);
}
END_TEST

/*
 * Reserve @len bytes of address space nothing else will take, even after
 * the test moved pages in and out again.  mmap(NULL) searches from the top
 * of the address space down and takes the first gap that fits, so a range
 * vacated up there can be taken at once by any thread's mmap(): a worker's
 * allocation, the sanitizers' own.  A test that then moved pages back with
 * MREMAP_FIXED replaced that memory (LeakSanitizer crashed reading it at
 * exit after restore-claim-stale-layout, 1 run in 5).  So the reservations
 * are low, from 1 GiB up: below 2 GiB, ASan's low application memory, and
 * in TSan's.
 */
static unsigned char *reserve(size_t len)
{
	static uintptr_t next = 1ul << 30;
	void *p;

	for (;;) {
		p = mmap((void *)next, len, PROT_NONE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE |
				 MAP_FIXED_NOREPLACE,
			 -1, 0);
		if (p != MAP_FAILED || errno != EEXIST)
			break;
		next += len; /* a leftover of an earlier test: past it */
	}
	ck_assert_msg(p == (void *)next, "mmap(%#lx, %zu): %s",
		      (unsigned long)next, len,
		      p == MAP_FAILED ? strerror(errno) : "elsewhere");
	next += len;
	ck_assert_msg(next < 2ul << 30, "the test reserved 1 GiB");
	return p;
}

/*
 * Move all of region @r (@npages at @p) to a reserve(), and wait for the
 * library to follow: a test that maps its own memory, or moves pages back,
 * where the region's pages left then finds that range free.  Returns the
 * region's new address.
 */
static unsigned char *lower(cowmm_region_t *r, unsigned char *p,
			    size_t npages)
{
	unsigned char *to = reserve(npages * T_PAGE);

	ck_assert_ptr_eq(mremap(p, npages * T_PAGE, npages * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, to),
			 to);
	while (cowmm_region_base(r) != to)
		usleep(100);
	return to;
}

/* Item 6: pages of a clone moved away untouched keep the clone's bytes. */
START_TEST(test_clone_mremap_part)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *c;
	unsigned char *q, *to = reserve(8 * T_PAGE), *moved;
	size_t i;

	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert(page_is(q + 9 * T_PAGE, 10)); /* one touched, the rest not */
	moved = mremap(q + 8 * T_PAGE, 8 * T_PAGE, 8 * T_PAGE,
		       MREMAP_MAYMOVE | MREMAP_FIXED, to);
	ck_assert_ptr_eq(moved, to);
	for (i = 0; i < 8; i++)
		ck_assert_msg(page_is(moved + i * T_PAGE, 9 + i),
			      "moved clone page %zu lost its bytes", i);
	moved[0] ^= 1; /* and it is plain memory now */
	ck_assert(page_is(q + 7 * T_PAGE, 8));
	ck_assert(page_is(q + 16 * T_PAGE, 17));
	cowmm_close(mm);
	munmap(moved, 8 * T_PAGE);
}
END_TEST

/* Item 14: a snapshot stays exact through a partial mremap. */
START_TEST(test_region_mremap_part)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p, *to = reserve(8 * T_PAGE), *moved;
	size_t i;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	moved = mremap(p + 8 * T_PAGE, 8 * T_PAGE, 8 * T_PAGE,
		       MREMAP_MAYMOVE | MREMAP_FIXED, to);
	ck_assert_ptr_eq(moved, to);
	for (i = 0; i < 8; i++) {
		ck_assert(page_is(moved + i * T_PAGE, 9 + i));
		moved[i * T_PAGE] ^= 0xff;
	}
	p[0] ^= 0xff;
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm);
	munmap(moved, 8 * T_PAGE);
}
END_TEST

/*
 * DESIGN.md: "a moved range is followed to its new address".  After part
 * of a region moved, the region still has every page: a snapshot taken
 * then holds the moved pages, a write there copies for it, a clone reads
 * them, a pin takes the new address; moved back (the test holds the old
 * range meanwhile), the region is whole again; moved piece by piece next
 * to each other, it is one piece again; released, it unmaps every piece
 * (the library's own memory).
 */
START_TEST(test_region_mremap_follow)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *c;
	cowmm_snap_t *s, *s2;
	unsigned char *p, *to = reserve(8 * T_PAGE), *moved, *q;
	unsigned char *all = reserve(NPAGES * T_PAGE);
	struct cowmm_stats st0, st;
	unsigned char buf[T_PAGE], vec;
	bool held;

	p = t_filled_region(mm, NPAGES, &r);
	moved = mremap(p + 8 * T_PAGE, 8 * T_PAGE, 8 * T_PAGE,
		       MREMAP_MAYMOVE | MREMAP_FIXED, to);
	ck_assert_ptr_eq(moved, to);
	/*
	 * Hold the old range, so that the move back lands on nothing else.
	 * Something may have been mapped there first (the library's own
	 * memory, a sanitizer's): then the move back is not ours to make.
	 */
	held = mmap(p + 8 * T_PAGE, 8 * T_PAGE, PROT_NONE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1,
		    0) == p + 8 * T_PAGE;
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	st0 = t_stats(mm);
	moved[0] ^= 0xff;
	p[0] ^= 0xff;
	st = t_stats(mm);
	ck_assert_uint_eq(st.copies - st0.copies, 2);
	t_assert_snap_filled(s, NPAGES); /* the moved pages too */

	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert(!page_is(q + 8 * T_PAGE, 9) && page_is(q + 9 * T_PAGE, 10));
	ck_assert_int_eq(cowmm_region_release(c), 0);

	ck_assert_int_eq(cowmm_pin(r, moved + T_PAGE, T_PAGE, COWMM_PIN_WRITE),
			 0);
	ck_assert_int_eq(cowmm_unpin(r, moved + T_PAGE, T_PAGE), 0);
	/* Contiguous in the region, not in memory. */
	ck_assert_int_eq(cowmm_pin(r, p + 7 * T_PAGE, 2 * T_PAGE,
				   COWMM_PIN_READ),
			 -EINVAL);

	if (held) {
		ck_assert_ptr_eq(mremap(moved, 8 * T_PAGE, 8 * T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED,
					p + 8 * T_PAGE),
				 p + 8 * T_PAGE);
		moved = p + 8 * T_PAGE;
	}
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);
	ck_assert_int_eq(cowmm_snap_read(s2, 8 * T_PAGE, buf, T_PAGE), T_PAGE);
	buf[0] ^= 0xff;
	ck_assert(page_is(buf, 9));
	moved[T_PAGE] ^= 1; /* copies for both */
	t_assert_snap_filled(s, NPAGES);
	ck_assert_int_eq(cowmm_snap_read(s2, 9 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert(page_is(buf, 10));
	cowmm_snap_release(s);
	cowmm_snap_release(s2);

	/* Piece by piece into @all: one piece again, at @all. */
	ck_assert_ptr_eq(mremap(moved, 8 * T_PAGE, 8 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED,
				all + 8 * T_PAGE),
			 all + 8 * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_ptr_eq(mremap(p, 8 * T_PAGE, 8 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, all),
			 all);
	ck_assert_ptr_eq(mremap(p + 16 * T_PAGE, (NPAGES - 16) * T_PAGE,
				(NPAGES - 16) * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED,
				all + 16 * T_PAGE),
			 all + 16 * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0); /* after the moves */
	ck_assert_ptr_eq(cowmm_region_base(r), all);
	ck_assert(!cowmm__in_pieces(r));
	all[20 * T_PAGE] ^= 1;
	ck_assert_int_eq(cowmm_snap_read(s, 20 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert(page_is(buf, 21));
	cowmm_snap_release(s);
	cowmm_snap_release(s2);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	/* Unmapped where it was last, or (TSan's allocator, say) other
	 * memory took the range at once: not the region's bytes then. */
	if (mincore(all + 8 * T_PAGE, T_PAGE, &vec) == 0) {
		int fd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);

		ck_assert_int_ge(fd, 0);
		ck_assert_int_eq(pread(fd, buf, T_PAGE,
				       (off_t)(uintptr_t)(all + 8 * T_PAGE)),
				 T_PAGE);
		close(fd);
		ck_assert(!page_is(buf, 9));
	} else {
		ck_assert_int_eq(errno, ENOMEM);
	}
	cowmm_close(mm);
}
END_TEST

/*
 * A region moved whole leaves its old range free, and the UNMAP that
 * mremap() sends for it is read before mremap() returns but may be handled
 * later.  A view mapped right after may land in that range: the UNMAP
 * must not take the view's pages for ones that left (they read zero).
 * Placement is the kernel's choice: 20 rounds (before the fix, a third of
 * the model tester's runs of this sequence failed).
 */
START_TEST(test_view_after_move)
{
	cowmm_t *mm = t_open_fa(2, 1);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	const unsigned char *v;
	unsigned char *p, *to;
	int round;
	size_t pg;

	for (round = 0; round < 20; round++) {
		p = t_filled_region(mm, 28, &r);
		ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
		to = reserve(28 * T_PAGE);
		ck_assert_ptr_eq(mremap(p, 28 * T_PAGE, 28 * T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED, to),
				 to);
		while (cowmm_region_base(r) != to)
			usleep(100);
		ck_assert_int_eq(cowmm_snap_map(s, (const void **)&v), 0);
		for (pg = 0; pg < 28; pg++)
			ck_assert_msg(page_is(v + pg * T_PAGE, pg + 1),
				      "round %d: view page %zu (at %s)", round,
				      pg, v == p ? "the old range" : "elsewhere");
		cowmm_snap_release(s);
		ck_assert_int_eq(cowmm_region_release(r), 0);
	}
	cowmm_close(mm);
}
END_TEST

/*
 * Snapshot reads racing a partial mremap: the pages were there, then
 * gone, then at their new address.  Every read gives the snapshot's bytes,
 * at once; never zeros, never -EIO (nothing was lost).  Found by the
 * outside review (zeros in 3 of 20 runs, -EIO after 3.5 s in 7 of 20).
 */
struct move_reader {
	cowmm_snap_t *s;
	atomic_bool stop;
	unsigned seed;
	long reads, bad, eio;
};

static void *move_reader_main(void *arg)
{
	struct move_reader *m = arg;
	unsigned char buf[T_PAGE];

	while (!atomic_load(&m->stop)) {
		size_t pg = rand_r(&m->seed) % NPAGES;
		ssize_t got = cowmm_snap_read(m->s, pg * T_PAGE, buf, T_PAGE);

		m->reads++;
		if (got == -EIO)
			m->eio++;
		else if (got != T_PAGE || !page_is(buf, pg + 1))
			m->bad++;
	}
	return NULL;
}

START_TEST(test_read_during_move)
{
	cowmm_t *mm = t_open_fa(2, 1);
	struct move_reader m[2];
	long eio = 0;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p, *to;
	pthread_t th[2];
	int round, k;

	for (round = 0; round < 10; round++) {
		p = t_filled_region(mm, NPAGES, &r);
		ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
		to = reserve(16 * T_PAGE);
		for (k = 0; k < 2; k++) {
			m[k] = (struct move_reader){ .s = s, .seed = round * 2 + k };
			ck_assert_int_eq(pthread_create(&th[k], NULL,
							move_reader_main, &m[k]),
					 0);
		}
		usleep(2000);
		ck_assert_ptr_eq(mremap(p + 16 * T_PAGE, 16 * T_PAGE,
					16 * T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED, to),
				 to);
		usleep(20000);
		for (k = 0; k < 2; k++) {
			atomic_store(&m[k].stop, true);
			pthread_join(th[k], NULL);
			ck_assert_msg(!m[k].bad,
				      "round %d: %ld reads, %ld wrong, %ld -EIO",
				      round, m[k].reads, m[k].bad, m[k].eio);
			/*
			 * Open (README, Status): under a loaded machine one
			 * read in about 300 still said -EIO here now and then
			 * (2 of the last 4 full runs).  Loud, never wrong
			 * bytes; more than 2 in a run is a regression (before
			 * the fix, about 7 runs in 20 stalled and said -EIO).
			 */
			if (m[k].eio)
				fprintf(stderr, "read-during-move: round %d: "
						"%ld of %ld reads -EIO (known, "
						"issue 15)\n",
					round, m[k].eio, m[k].reads);
			eio += m[k].eio;
		}
		cowmm_snap_release(s);
		ck_assert_int_eq(cowmm_region_release(r), 0);
	}
	ck_assert_msg(eio <= 2, "%ld reads -EIO in 10 rounds", eio);
	cowmm_close(mm);
}
END_TEST

/*
 * The run the move-during-restore cases move: pages 24..39, each written
 * (its first byte flipped) after a snapshot, so that restore rolls it back
 * and newer snapshots and clones share the written bytes.
 */
static void write_run(unsigned char *p)
{
	size_t i;

	for (i = 24; i < 40; i++)
		p[i * T_PAGE] ^= 0xff;
}

/* A filled region of @npages, snapshot @s of it, then the run written. */
static unsigned char *filled_written(cowmm_t *mm, size_t npages,
				     cowmm_region_t **r, cowmm_snap_t **s)
{
	unsigned char *p = t_filled_region(mm, npages, r);

	ck_assert_int_eq(cowmm_snapshot(*r, s), 0);
	write_run(p);
	return p;
}

/* @s (taken after write_run()) holds the written run, every byte. */
static void assert_snap_run_written(cowmm_snap_t *s)
{
	unsigned char buf[T_PAGE];
	size_t i;

	for (i = 24; i < 40; i++) {
		ck_assert_int_eq(cowmm_snap_read(s, i * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		buf[0] ^= 0xff;
		ck_assert_msg(page_is(buf, i + 1),
			      "newer snapshot's page %zu holds other bytes", i);
	}
}

/*
 * The pages move between the check that a shared page is protected and
 * its copy (the test hook), while restore gives a clone its copy of them:
 * the copy found nothing at the old address and counted the page lost, so
 * the clone's page raised SIGBUS.  It must wait for the move and copy the
 * page at its new address.
 */
static unsigned char *checked_from, *checked_to;

static void move_when_checked(uintptr_t addr)
{
	unsigned char *from;

	if (addr != (uintptr_t)__atomic_load_n(&checked_from,
					       __ATOMIC_ACQUIRE))
		return;
	from = __atomic_exchange_n(&checked_from, NULL, __ATOMIC_ACQ_REL);
	if (from)
		ck_assert_ptr_eq(mremap(from, 16 * T_PAGE, 16 * T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED,
					checked_to),
				 checked_to);
}

START_TEST(test_restore_moved_while_checked)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *q, *far = reserve(16 * T_PAGE);
	cowmm_region_t *r, *c;
	cowmm_snap_t *s;

	p = filled_written(mm, NPAGES, &r, &s);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0); /* shares the writes */
	q = cowmm_region_base(c);

	checked_to = far;
	__atomic_store_n(&checked_from, p + 24 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_checked, move_when_checked,
			 __ATOMIC_RELEASE);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	__atomic_store_n(&cowmm__read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert_ptr_null(__atomic_load_n(&checked_from, __ATOMIC_ACQUIRE));
	t_assert_live_filled(far - 24 * T_PAGE, 24, 16, 0, 0);
	t_assert_live_filled(q, 24, 16, 0, 0xff); /* the clone kept them */
	t_assert_live_filled(q, 0, 24, 0, 0);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * A snapshot read finds where its pages are while a move of part of its
 * region is read but not handled yet (a helper holds the region's lock);
 * then (the test hook) the move is handled and the range the pages left
 * is taken by other memory (a placeholder, as the review's mover kept
 * it).  Looking where the layout had put the pages, the read found an
 * unprotected page with no event to say why, took it for a page the
 * kernel dropped after MADV_FREE and read zeros (the helper's mover run:
 * 55 snapshots read zeros, right on re-read).  It must look again.
 */
static bool place(void *at, size_t len);

static cowmm_t *sampled_mm;
static unsigned char *sampled_at;
static bool sampled_placed;

/* @sampled_at, once, if the read found its pages in its 16 pages. */
static unsigned char *take_sampled(uintptr_t addr)
{
	unsigned char *at = __atomic_load_n(&sampled_at, __ATOMIC_ACQUIRE);

	if (!at || addr < (uintptr_t)at ||
	    addr >= (uintptr_t)at + 16 * T_PAGE ||
	    !__atomic_compare_exchange_n(&sampled_at, &at, NULL, false,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		return NULL;
	return at;
}

static void place_when_sampled(uintptr_t addr)
{
	unsigned char *at = take_sampled(addr);

	if (!at)
		return;
	/* the helper lets go after 100 ms: the move is handled then */
	while (atomic_load(&sampled_mm->remaps_pending) ||
	       atomic_load(&sampled_mm->unmaps_pending))
		usleep(1000);
	sampled_placed = place(at, 16 * T_PAGE);
}

START_TEST(test_read_placeholder_moved)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE), buf[T_PAGE];
	cowmm_region_t *r;
	cowmm_snap_t *s;
	struct hold h;
	ssize_t got;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	hold_start(&h, &r->lock, 100);
	ck_assert_ptr_eq(mremap(p + 16 * T_PAGE, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, to),
			 to);
	sampled_mm = mm;
	sampled_placed = false;
	__atomic_store_n(&sampled_at, p + 16 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_sampled, place_when_sampled,
			 __ATOMIC_RELEASE);
	got = cowmm_snap_read(s, 20 * T_PAGE, buf, T_PAGE);
	__atomic_store_n(&cowmm__read_sampled, NULL, __ATOMIC_RELEASE);
	hold_end(&h);
	/* (The read now waits for the move before it looks: the hook no
	 * longer sees the old range.) */
	__atomic_store_n(&sampled_at, NULL, __ATOMIC_RELEASE);
	ck_assert_int_eq(got, T_PAGE);
	ck_assert_msg(page_is(buf, 21), "read %s", zero_page(buf) ? "zeros"
								  : "other bytes");
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
	if (sampled_placed)
		munmap(p + 16 * T_PAGE, 16 * T_PAGE);
}
END_TEST

/*
 * The same with no move pending when the read finds where its pages are:
 * right after (the test hook), they move, the move is handled and a
 * placeholder takes the range they left.  The read found the placeholder's
 * page unprotected with a move read since, yet none pending and the range
 * mapped: it waited 10 s for a copy that never came and said -EIO (the
 * second outside review: 7 of 40,960 reads; cowmm_snap_write() failed the
 * same way).  It must look again.
 */
static unsigned char *sampled_to;

static void move_when_sampled(uintptr_t addr)
{
	unsigned char *at = take_sampled(addr);

	if (!at)
		return;
	ck_assert_ptr_eq(mremap(at, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, sampled_to),
			 sampled_to);
	while (atomic_load(&sampled_mm->remaps_pending) ||
	       atomic_load(&sampled_mm->unmaps_pending))
		usleep(1000);
	sampled_placed = place(at, 16 * T_PAGE);
}

START_TEST(test_read_moved_after_sampled)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE), buf[T_PAGE];
	cowmm_region_t *r;
	cowmm_snap_t *s;
	uint64_t t0;
	ssize_t got;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	sampled_mm = mm;
	sampled_to = to;
	sampled_placed = false;
	__atomic_store_n(&sampled_at, p + 16 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_sampled, move_when_sampled,
			 __ATOMIC_RELEASE);
	t0 = cowmm__now_ns();
	got = cowmm_snap_read(s, 20 * T_PAGE, buf, T_PAGE);
	__atomic_store_n(&cowmm__read_sampled, NULL, __ATOMIC_RELEASE);
	ck_assert_ptr_null(__atomic_load_n(&sampled_at, __ATOMIC_ACQUIRE));
	ck_assert_int_eq(got, T_PAGE);
	ck_assert(page_is(buf, 21));
	ck_assert_msg(cowmm__now_ns() - t0 < 2000000000ull,
		      "the read waited %llu ms",
		      (unsigned long long)(cowmm__now_ns() - t0) / 1000000);
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
	if (sampled_placed)
		munmap(p + 16 * T_PAGE, 16 * T_PAGE);
}
END_TEST

/*
 * The same, but the memory mapped where the pages were is write-protected
 * too, by another manager (the third outside review, with two managers or
 * a userfaultfd of its own: 49-55 of 300 reads gave its bytes, and
 * cowmm_snap_write() wrote them into a file that loads): a page that is
 * protected and keeps its frame across the copy is not enough; the read
 * must know that no move was read or on its way meanwhile.
 */
static cowmm_t *foreign_mm;
static cowmm_region_t *foreign_r;
static cowmm_snap_t *foreign_s;

/* Map 16 pages of 0xf0 at @at, write-protected by another manager. */
static void map_foreign_protected(unsigned char *at)
{
	ck_assert_ptr_eq(mmap(at, 16 * T_PAGE, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
			      -1, 0),
			 at);
	memset(at, 0xf0, 16 * T_PAGE);
	ck_assert_int_eq(cowmm_region_adopt(foreign_mm, at, 16 * T_PAGE, 0,
					    &foreign_r), 0);
	ck_assert_int_eq(cowmm_snapshot(foreign_r, &foreign_s), 0);
}

/* Let go of the other manager map_foreign_protected() made its memory. */
static void foreign_close(void)
{
	cowmm_snap_release(foreign_s);
	ck_assert_int_eq(cowmm_region_release(foreign_r), 0);
	cowmm_close(foreign_mm);
}

static void move_when_sampled_protected(uintptr_t addr)
{
	unsigned char *at = take_sampled(addr);

	if (!at)
		return;
	ck_assert_ptr_eq(mremap(at, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, sampled_to),
			 sampled_to);
	while (atomic_load(&sampled_mm->remaps_pending) ||
	       atomic_load(&sampled_mm->unmaps_pending))
		usleep(1000);
	map_foreign_protected(at);
	sampled_placed = true;
}

START_TEST(test_read_moved_foreign_protected)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE), buf[T_PAGE];
	cowmm_region_t *r;
	cowmm_snap_t *s;
	ssize_t got;

	foreign_mm = t_open_fa(1, 1);
	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	sampled_mm = mm;
	sampled_to = to;
	sampled_placed = false;
	__atomic_store_n(&sampled_at, p + 16 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_sampled, move_when_sampled_protected,
			 __ATOMIC_RELEASE);
	got = cowmm_snap_read(s, 20 * T_PAGE, buf, T_PAGE);
	__atomic_store_n(&cowmm__read_sampled, NULL, __ATOMIC_RELEASE);
	ck_assert(sampled_placed);
	ck_assert_int_eq(got, T_PAGE);
	ck_assert_msg(page_is(buf, 21), "the snapshot reads %#x for page 20",
		      buf[0]);
	t_assert_snap_filled(s, NPAGES);
	foreign_close();
	cowmm_close(mm); /* unmaps the moved pages: the library's */
	munmap(p + 16 * T_PAGE, 16 * T_PAGE);
}
END_TEST

/*
 * Restore gives a newer snapshot its copy of a page first; right before
 * that copy reads the page (the test hook), the page moves away (its event
 * read, not handled: restore holds the lock) and memory another manager
 * protects is mapped where it was.  The copy found a protected page that
 * kept its frame and gave its bytes to the newer snapshot (the model
 * tester's seed 622965019 with read_moving's protected placeholder).
 */
static unsigned char *claim_at, *claim_to;
static bool claim_moved_only; /* and nothing mapped where it was */

static void move_foreign_when_checked(uintptr_t addr)
{
	unsigned char *at = __atomic_load_n(&claim_at, __ATOMIC_ACQUIRE);

	if (!at || addr < (uintptr_t)at || addr >= (uintptr_t)at + 16 * T_PAGE ||
	    !__atomic_compare_exchange_n(&claim_at, &at, NULL, false,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		return;
	ck_assert_ptr_eq(mremap(at, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, claim_to),
			 claim_to);
	if (claim_moved_only)
		__atomic_store_n(&foreign_r, (cowmm_region_t *)1,
				 __ATOMIC_RELEASE); /* moved: say so */
	else
		map_foreign_protected(at);
}

START_TEST(test_restore_claim_foreign_protected)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p;
	cowmm_region_t *r;
	cowmm_snap_t *s, *s2;

	foreign_mm = t_open_fa(1, 1);
	foreign_r = NULL;
	claim_moved_only = false;
	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	write_run(p);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0); /* shares the writes */
	claim_to = reserve(16 * T_PAGE);
	__atomic_store_n(&claim_at, p + 24 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_checked, move_foreign_when_checked,
			 __ATOMIC_RELEASE);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	__atomic_store_n(&cowmm__read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert_msg(foreign_r, "the copy for the newer snapshot never read");
	assert_snap_run_written(s2);
	t_assert_snap_filled(s, NPAGES);
	t_assert_live_filled(claim_to - 24 * T_PAGE, 24, 16, 0, 0);
	foreign_close();
	cowmm_close(mm); /* unmaps the moved pages: the library's */
	munmap(p + 24 * T_PAGE, 16 * T_PAGE);
}
END_TEST

/*
 * A discard of a page a clone never wrote: the clone's snapshot gets the
 * origin's bytes first, read by the worker that handles the REMOVE.
 * Right before that copy (the test hook), the origin's pages move away
 * (another worker reads the move; it waits for the discard) and memory
 * another manager protects is mapped where they were.  The handler took
 * what it read there for the origin's page: the clone's snapshot held the
 * other manager's bytes (the model tester's seed 646303950, through a
 * clone of a clone: 2 in 10-20 replays).  With nothing mapped there, it
 * broke the snapshot (-EIO) instead.
 */
static void remove_clone_origin_moved(bool foreign)
{
	cowmm_t *mm = t_open_fa(2, 1);
	cowmm_region_t *r, *cl;
	unsigned char *p, *c;
	cowmm_snap_t *s;

	foreign_mm = t_open_fa(1, 1);
	foreign_r = NULL;
	claim_moved_only = !foreign;
	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_clone(r, 0, &cl), 0);
	c = cowmm_region_base(cl);
	ck_assert_int_eq(cowmm_snapshot(cl, &s), 0);
	claim_to = reserve(16 * T_PAGE);
	__atomic_store_n(&claim_at, p + 24 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_checked, move_foreign_when_checked,
			 __ATOMIC_RELEASE);
	ck_assert_int_eq(madvise(c + 30 * T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	/* The kernel lets madvise() go on inside the worker's read(). */
	pthread_mutex_lock(&mm->read_lock);
	pthread_mutex_unlock(&mm->read_lock);
	while (atomic_load(&mm->removes_pending))
		usleep(1000);
	__atomic_store_n(&cowmm__read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert_msg(foreign_r, "the discard's copy never read the origin");
	t_assert_snap_filled(s, NPAGES);
	ck_assert_msg(zero_page(c + 30 * T_PAGE),
		      "the discarded clone page reads %#x", c[30 * T_PAGE]);
	t_assert_live_filled(claim_to - 24 * T_PAGE, 24, 16, 0, 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(cl), 0);
	if (foreign)
		foreign_close();
	else
		cowmm_close(foreign_mm);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
	if (foreign)
		munmap(p + 24 * T_PAGE, 16 * T_PAGE);
}

START_TEST(test_remove_clone_origin_moved)
{
	remove_clone_origin_moved(true);
}
END_TEST

START_TEST(test_remove_clone_origin_moved_away)
{
	remove_clone_origin_moved(false);
}
END_TEST

/*
 * A discard of a clone's two pages, then right away a move that the
 * discard's handler must see: @onto, the origin's second page moved onto
 * the clone's first; otherwise the clone's first page moved away, then the
 * origin's second.  The handler, copying the origin's second page for the
 * clone's snapshot, found it moved and waited for the move to be handled,
 * while that move waited for the discard (its range overlaps the
 * discard's, or it comes after one that does): every later fault and
 * event of the manager waited too (the sixteenth review, dlmin: 10 in 10
 * runs).  A store to the moved page must return, and the snapshot hold
 * the origin's bytes.
 */
struct timed_store {
	unsigned char *at;
	atomic_bool done;
};

static void *timed_store_main(void *arg)
{
	struct timed_store *t = arg;

	t->at[0] ^= 1;
	atomic_store(&t->done, true);
	return NULL;
}

/* Store to @at in another thread: did it return within 10 s? */
static bool store_returns(unsigned char *at)
{
	static struct timed_store t; /* outlives a store that never returns */
	pthread_t th;
	int i;

	t.at = at;
	atomic_store(&t.done, false);
	ck_assert_int_eq(pthread_create(&th, NULL, timed_store_main, &t), 0);
	for (i = 0; i < 1000 && !atomic_load(&t.done); i++)
		usleep(10000);
	if (!atomic_load(&t.done))
		return false;
	pthread_join(th, NULL);
	return true;
}

static void remove_clone_then_move(bool onto)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *c, *moved, buf[T_PAGE];
	cowmm_region_t *r, *cl;
	cowmm_snap_t *s;
	ssize_t got;

	p = t_filled_region(mm, 2, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &cl), 0);
	c = cowmm_region_base(cl);
	ck_assert_int_eq(cowmm_snapshot(cl, &s), 0);
	ck_assert_int_eq(madvise(c, 2 * T_PAGE, MADV_DONTNEED), 0);
	if (onto) {
		moved = mremap(p + T_PAGE, T_PAGE, T_PAGE,
			       MREMAP_MAYMOVE | MREMAP_FIXED, c);
	} else {
		ck_assert_ptr_ne(mremap(c, T_PAGE, T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED,
					reserve(T_PAGE)),
				 MAP_FAILED);
		moved = mremap(p + T_PAGE, T_PAGE, T_PAGE,
			       MREMAP_MAYMOVE | MREMAP_FIXED, reserve(T_PAGE));
	}
	ck_assert_ptr_ne(moved, MAP_FAILED);
	ck_assert_msg(store_returns(moved),
		      "a store to the moved page did not return in 10 s");
	got = cowmm_snap_read(s, T_PAGE, buf, T_PAGE);
	ck_assert_msg(got == T_PAGE && page_is(buf, 2),
		      "the clone's snapshot reads %zd, %#x for page 1", got,
		      got == T_PAGE ? buf[0] : 0);
	if (!onto) { /* nothing took the clone's first page */
		got = cowmm_snap_read(s, 0, buf, T_PAGE);
		ck_assert_msg(got == T_PAGE && page_is(buf, 1),
			      "the clone's snapshot reads %zd, %#x for page 0",
			      got, got == T_PAGE ? buf[0] : 0);
	}
	cowmm_snap_release(s);
	cowmm_close(mm);
}

START_TEST(test_remove_clone_then_move_onto)
{
	remove_clone_then_move(true);
}
END_TEST

START_TEST(test_remove_clone_then_move)
{
	remove_clone_then_move(false);
}
END_TEST

/*
 * The copy of the origin's page for a clone's snapshot, by the worker
 * handling a discard of the clone's pages, while another thread keeps
 * discarding a page of another region: the copy asked the kernel twice
 * whether an event was on its way, and took a "yes" the second time for
 * the page being gone.  The clone's snapshot broke with nothing lost (the
 * seventeenth review, discbrk2: 42 of 199 rounds with two workers).
 */
struct discard_loop {
	unsigned char *at;
	atomic_bool stop;
};

static void *discard_loop_main(void *arg)
{
	struct discard_loop *d = arg;

	while (!atomic_load(&d->stop)) {
		d->at[0] = 1;
		ck_assert_int_eq(madvise(d->at, T_PAGE, MADV_DONTNEED), 0);
	}
	return NULL;
}

START_TEST(test_remove_clone_other_discards)
{
	cowmm_t *mm = t_open_fa(2, 1);
	struct discard_loop d = { 0 };
	cowmm_region_t *u, *r, *cl;
	struct timespec t0, t1;
	unsigned char *c, buf[T_PAGE];
	int rounds, broken = 0;
	cowmm_snap_t *s;
	pthread_t th;
	ssize_t got;
	size_t pg;

	ck_assert_int_eq(cowmm_region_alloc(mm, T_PAGE, 0, &u), 0);
	d.at = cowmm_region_base(u);
	ck_assert_int_eq(pthread_create(&th, NULL, discard_loop_main, &d), 0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (rounds = 0; rounds < 200; rounds++) {
		t_filled_region(mm, 8, &r);
		ck_assert_int_eq(cowmm_clone(r, 0, &cl), 0);
		ck_assert_int_eq(cowmm_snapshot(cl, &s), 0);
		c = cowmm_region_base(cl);
		ck_assert_int_eq(madvise(c, 8 * T_PAGE, MADV_DONTNEED), 0);
		for (pg = 0; pg < 8; pg++) {
			got = cowmm_snap_read(s, pg * T_PAGE, buf, T_PAGE);
			if (got == -EIO) {
				broken++;
				break;
			}
			ck_assert_msg(got == T_PAGE && page_is(buf, pg + 1),
				      "the clone's snapshot reads %zd, %#x "
				      "for page %zu",
				      got, buf[0], pg);
		}
		cowmm_snap_release(s);
		ck_assert_int_eq(cowmm_region_release(cl), 0);
		ck_assert_int_eq(cowmm_region_release(r), 0);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (t1.tv_sec - t0.tv_sec > 10)
			break;
	}
	atomic_store(&d.stop, true);
	pthread_join(th, NULL);
	ck_assert_msg(!broken,
		      "the clone's snapshot broke in %d of %d rounds", broken,
		      rounds);
	ck_assert_int_eq(cowmm_region_release(u), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * A region's page moved onto a page of its clone (MREMAP_FIXED: the
 * clone loses its page, as to munmap()), then the clone released: the
 * release must leave the region's page there mapped, and the region's
 * snapshot that shares it whole.  A pattern the model tester's
 * mremap_part onto another region makes; a check, not a fix (it held
 * before this session's changes too).
 */
START_TEST(test_release_clone_with_origin_page_in_it)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *c, buf[T_PAGE];
	cowmm_region_t *r, *cl;
	cowmm_snap_t *s;

	p = t_filled_region(mm, 8, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &cl), 0);
	c = cowmm_region_base(cl);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_ptr_eq(mremap(p + 7 * T_PAGE, T_PAGE, T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, c + 3 * T_PAGE),
			 c + 3 * T_PAGE);
	ck_assert_int_eq(cowmm_region_release(cl), 0);
	ck_assert_msg(page_is(c + 3 * T_PAGE, 8),
		      "the region's moved page reads %#x", c[3 * T_PAGE]);
	ck_assert_int_eq(cowmm_snap_read(s, 7 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert(page_is(buf, 8));
	c[3 * T_PAGE] ^= 1; /* a write fault: the snapshot keeps its copy */
	ck_assert_int_eq(cowmm_snap_read(s, 7 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert(page_is(buf, 8));
	t_assert_snap_filled(s, 8);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * The same copy, from an origin that is a clone itself and wrote the page
 * (materialised): right before the copy reads it, the origin's page is
 * discarded too (another worker reads that discard; the kernel zaps the
 * page at once).  The copy found the page gone and took it for one
 * discarded long ago, zero: the clone's snapshot read zeros, while the
 * origin's snapshot, which the clone's page came from, broke.
 */
static unsigned char *discard_at;

static void discard_when_checked(uintptr_t addr)
{
	unsigned char *at = __atomic_load_n(&discard_at, __ATOMIC_ACQUIRE);

	if (!at || addr != (uintptr_t)at ||
	    !__atomic_compare_exchange_n(&discard_at, &at, NULL, false,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		return;
	ck_assert_int_eq(madvise(at, T_PAGE, MADV_DONTNEED), 0);
}

START_TEST(test_remove_clone_origin_discarded)
{
	cowmm_t *mm = t_open_fa(2, 1);
	cowmm_region_t *r, *o, *cl;
	unsigned char *p, *po, *c, buf[T_PAGE];
	cowmm_snap_t *s;
	ssize_t got;

	p = t_filled_region(mm, NPAGES, &r);
	(void)p;
	ck_assert_int_eq(cowmm_clone(r, 0, &o), 0);
	po = cowmm_region_base(o);
	memset(po + 30 * T_PAGE, 0x3c, T_PAGE); /* the origin's own page */
	ck_assert_int_eq(cowmm_clone(o, 0, &cl), 0);
	c = cowmm_region_base(cl);
	ck_assert_int_eq(cowmm_snapshot(cl, &s), 0);
	__atomic_store_n(&discard_at, po + 30 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_checked, discard_when_checked,
			 __ATOMIC_RELEASE);
	ck_assert_int_eq(madvise(c + 30 * T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	pthread_mutex_lock(&mm->read_lock); /* see remove_clone_origin_moved */
	pthread_mutex_unlock(&mm->read_lock);
	while (atomic_load(&mm->removes_pending))
		usleep(1000);
	__atomic_store_n(&cowmm__read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert_msg(!__atomic_load_n(&discard_at, __ATOMIC_ACQUIRE),
		      "the discard's copy never read the origin");
	got = cowmm_snap_read(s, 30 * T_PAGE, buf, T_PAGE);
	ck_assert_msg(got == -EIO || (got == T_PAGE && buf[0] == 0x3c &&
				      buf[T_PAGE - 1] == 0x3c),
		      "the clone's snapshot reads %zd, %#x for page 30", got,
		      got == T_PAGE ? buf[0] : 0);
	ck_assert_msg(zero_page(c + 30 * T_PAGE),
		      "the discarded clone page reads %#x", c[30 * T_PAGE]);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(cl), 0);
	ck_assert_int_eq(cowmm_region_release(o), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * A snapshot of an armed region (every page protected already) while a
 * move of part of it has moved the pages but its event is not read yet
 * (the workers read nothing for 25 ms, as when the moving thread is slow
 * to run again): with nothing to protect no ioctl waited for the event,
 * the range the pages left read as unmapped 101 times in a row within
 * a millisecond, with no move pending, and the snapshot returned -ENOENT
 * (the model tester's seed 60210, through a clone: 1 in 186 replays).
 */
struct move_call {
	unsigned char *from, *to;
	size_t len;
	int flags; /* more for move_thread(): MREMAP_DONTUNMAP */
};

static void *move_thread(void *arg)
{
	struct move_call *m = arg;

	ck_assert_ptr_eq(mremap(m->from, m->len, m->len,
				MREMAP_MAYMOVE | MREMAP_FIXED | m->flags,
				m->to),
			 m->to);
	return NULL;
}

START_TEST(test_snapshot_move_unread)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE);
	struct move_call mv;
	cowmm_region_t *r;
	cowmm_snap_t *s0, *s;
	pthread_t th;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s0), 0); /* armed */
	cowmm_snap_release(s0);
	mv = (struct move_call){ p + 16 * T_PAGE, to, 16 * T_PAGE };
	cowmm__pause_reads(mm, 25);
	ck_assert_int_eq(pthread_create(&th, NULL, move_thread, &mv), 0);
	usleep(20 * 1000); /* moved; its event waits to be read */
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	pthread_join(th, NULL);
	to[0] ^= 1; /* followed: a write at the new address copies */
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * A snapshot taken while the move of part of its region is read but not
 * handled yet (a helper holds the region's lock, so the REMAP waits): it
 * protects the region's old layout and meets a range that is gone.  It
 * must wait for the move and succeed, not return -ENOENT (the outside
 * review: 3 of 10 runs with a thread moving pieces).
 */
START_TEST(test_snapshot_during_move)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p, *to = reserve(8 * T_PAGE);
	struct hold h;

	p = t_filled_region(mm, NPAGES, &r);
	hold_start(&h, &r->lock, 300);
	ck_assert_ptr_eq(mremap(p + 8 * T_PAGE, 8 * T_PAGE, 8 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, to),
			 to);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	hold_end(&h);
	to[0] ^= 1;
	t_assert_snap_filled(s, NPAGES);
	cowmm_snap_release(s);
	cowmm_close(mm);
}
END_TEST

/*
 * Hold [@at, @at + @len) with an inaccessible mapping, as a program that
 * moves pages away and back keeps the range it left.  False when other
 * memory took it first (EEXIST): the same case, but not ours to unmap.
 */
static bool place(void *at, size_t len)
{
	void *p = mmap(at, len, PROT_NONE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);

	if (p == MAP_FAILED)
		ck_assert_int_eq(errno, EEXIST);
	else
		ck_assert_ptr_eq(p, at);
	return p == at;
}

struct snap_call {
	cowmm_region_t *r;
	cowmm_snap_t *s;
	int ret;
};

static void *snap_thread(void *arg)
{
	struct snap_call *c = arg;

	c->ret = cowmm_snapshot(c->r, &c->s);
	return NULL;
}

/*
 * A move between the checks a snapshot makes before it takes the region's
 * lock and its protecting ioctl, with the range the pages left taken at
 * once by an inaccessible placeholder, as a program that moves pages away
 * and back keeps it held (the second outside review's mover thread).  The
 * old range is mapped, so region_mapped() does not show that the layout is
 * stale; the protecting ioctl fails on the placeholder (not registered:
 * -ENOENT) and the snapshot waits for the move and takes it again.  A
 * helper holds the region's lock while the snapshot waits for it and the
 * move happens; when it lets go, the snapshot usually gets the lock
 * before the deferred move does.  (This passed before it was written: it
 * pins down that path, it did not find a bug.)
 */
START_TEST(test_snapshot_during_move_held)
{
#ifdef __SANITIZE_THREAD__
	/*
	 * Under TSan the release of the second manager here crashed in
	 * TSan's own symbolizer (libbacktrace), reporting a race on memory
	 * liburcu freed after a grace period, which TSan cannot see: 8 of 20
	 * runs.  The plain and ASan builds run it.
	 */
	return;
#endif
	for (int round = 0; round < 5; round++) {
		cowmm_t *mm = t_open_fa(1, 1);
		unsigned char *p, *to = reserve(8 * T_PAGE);
		struct snap_call c = { 0 };
		pthread_t th;
		struct hold h;
		bool placed;

		p = t_filled_region(mm, NPAGES, &c.r);
		hold_start(&h, &c.r->lock, 100);
		ck_assert_int_eq(pthread_create(&th, NULL, snap_thread, &c), 0);
		usleep(30 * 1000); /* it waits for the region's lock */
		ck_assert_ptr_eq(mremap(p + 8 * T_PAGE, 8 * T_PAGE,
					8 * T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED, to),
				 to);
		/* Other memory may have taken it first (EEXIST): the same
		 * case, but not ours to unmap. */
		placed = place(p + 8 * T_PAGE, 8 * T_PAGE);
		hold_end(&h);
		pthread_join(th, NULL);
		ck_assert_int_eq(c.ret, 0);
		to[0] ^= 1;
		t_assert_snap_filled(c.s, NPAGES);
		cowmm_snap_release(c.s);
		cowmm_close(mm);
		if (placed)
			munmap(p + 8 * T_PAGE, 8 * T_PAGE);
		munmap(to, 8 * T_PAGE);
	}
}
END_TEST

/*
 * The second outside review's mover, made deterministic (its reproducer:
 * 25 of 300 snapshots read zeros; restores crashed).  Pages 24..39 of an
 * armed region live at @far and were written there since the last
 * snapshot (so they are not protected).  A snapshot waits for the
 * region's lock; meanwhile they move home, leaving @far unmapped.  The
 * snapshot, with the old layout, scans @far for unprotected pages and
 * finds none (nothing is mapped there); right after it protected (the test
 * hook), a placeholder takes @far, as the mover kept the range it left
 * held, so the "every piece mapped" check passed on it: the pages at home
 * stayed writable, and a write there changed the snapshot (it read zero).
 * The move, read but not handled, must show the layout is stale.
 */
static unsigned char *placeholder_at;
static bool placeholder_ours;

static void map_placeholder(cowmm_region_t *r)
{
	unsigned char *at = __atomic_exchange_n(&placeholder_at, NULL,
						__ATOMIC_ACQ_REL);

	(void)r;
	if (at)
		__atomic_store_n(&placeholder_ours, place(at, 16 * T_PAGE),
				 __ATOMIC_RELEASE);
}

/* Map the placeholder at @at from the next protecting call on. */
static void hook_placeholder(unsigned char *at)
{
	__atomic_store_n(&placeholder_ours, false, __ATOMIC_RELEASE);
	__atomic_store_n(&placeholder_at, at, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__after_protect, map_placeholder,
			 __ATOMIC_RELEASE);
}

static void unhook(void)
{
	__atomic_store_n(&cowmm__after_protect, NULL, __ATOMIC_RELEASE);
}

/*
 * The same move, its event not read yet, and other memory mapped where the
 * pages were right after the snapshot protected the region (the test
 * hook): protecting found nothing there, and the "every piece mapped"
 * check passed on the other memory, with no move read yet to show the
 * layout stale.  The moved pages stayed writable, and the snapshot read
 * zero for them (the model tester's seed 8030608: 1 replay in 3,500).
 */
START_TEST(test_snapshot_placed_before_move_read)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE), vec;
	struct move_call mv;
	cowmm_region_t *r;
	cowmm_snap_t *s0, *s;
	pthread_t th;
	size_t i;

	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s0), 0); /* armed */
	cowmm_snap_release(s0);
	for (i = 16; i < 32; i++)
		p[i * T_PAGE] ^= 0xff; /* unprotected: written since */
	mv = (struct move_call){ p + 16 * T_PAGE, to, 16 * T_PAGE };
	cowmm__pause_reads(mm, 40);
	ck_assert_int_eq(pthread_create(&th, NULL, move_thread, &mv), 0);
	while (!mincore(p + 16 * T_PAGE, T_PAGE, &vec))
		usleep(100); /* moved; its event waits to be read */
	hook_placeholder(p + 16 * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	unhook();
	pthread_join(th, NULL);
	ck_assert(__atomic_load_n(&placeholder_ours, __ATOMIC_ACQUIRE));
	for (i = 0; i < 16; i++)
		to[i * T_PAGE + 1] ^= 0xff; /* followed: a write copies */
	for (i = 0; i < NPAGES; i++) {
		unsigned char buf[T_PAGE];

		ck_assert_int_eq(cowmm_snap_read(s, i * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		if (i >= 16 && i < 32)
			buf[0] ^= 0xff;
		ck_assert_msg(page_is(buf, i + 1),
			      "the snapshot reads %#x %#x for page %zu", buf[0],
			      buf[1], i);
	}
	cowmm_snap_release(s);
	munmap(p + 16 * T_PAGE, 16 * T_PAGE); /* the placeholder */
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * A snapshot read found its page protected, and right then (the test
 * hook) the page moved away, its event not read yet (the workers read
 * nothing for 40 ms), and other memory was mapped where it was.  The copy
 * read that memory, found it unprotected, and with no move counted and
 * the range mapped took the page for one being discarded: it waited 10 s
 * for a copy that never came and said -EIO (the model tester's
 * read_moving: 3 seeds in 7 minutes of a loaded run).
 */
static struct {
	cowmm_t *mm;
	unsigned char *at, *to;
	struct move_call mv;
	pthread_t th;
	bool placed;
	bool foreign; /* the memory mapped there: another manager's, protected */
} snap_checked_move;

static void move_away_when_checked(uintptr_t addr)
{
	unsigned char *at = __atomic_exchange_n(&snap_checked_move.at, NULL,
						__ATOMIC_ACQ_REL);
	unsigned char vec;

	if (!at || addr < (uintptr_t)at || addr >= (uintptr_t)at + 16 * T_PAGE) {
		if (at)
			__atomic_store_n(&snap_checked_move.at, at,
					 __ATOMIC_RELEASE);
		return;
	}
	cowmm__pause_reads(snap_checked_move.mm, 40);
	snap_checked_move.mv = (struct move_call){ at, snap_checked_move.to,
					      16 * T_PAGE };
	ck_assert_int_eq(pthread_create(&snap_checked_move.th, NULL, move_thread,
					&snap_checked_move.mv), 0);
	while (!mincore(at, T_PAGE, &vec))
		usleep(100); /* moved: its event waits to be read */
	if (snap_checked_move.foreign) {
		map_foreign_protected(at);
	} else {
		ck_assert_ptr_eq(mmap(at, 16 * T_PAGE, PROT_READ | PROT_WRITE,
				      MAP_PRIVATE | MAP_ANONYMOUS |
					      MAP_FIXED_NOREPLACE,
				      -1, 0),
				 at);
		memset(at, 0x5c, 16 * T_PAGE);
	}
	snap_checked_move.placed = true;
}

START_TEST(test_read_checked_moved_unread)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE), buf[T_PAGE];
	cowmm_region_t *r;
	cowmm_snap_t *s;
	uint64_t t0;
	ssize_t got;

	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	snap_checked_move.mm = mm;
	snap_checked_move.to = to;
	snap_checked_move.placed = false;
	__atomic_store_n(&snap_checked_move.at, p + 16 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__snap_read_checked, move_away_when_checked,
			 __ATOMIC_RELEASE);
	t0 = cowmm__now_ns();
	got = cowmm_snap_read(s, 20 * T_PAGE, buf, T_PAGE);
	__atomic_store_n(&cowmm__snap_read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert(snap_checked_move.placed);
	pthread_join(snap_checked_move.th, NULL);
	ck_assert_msg(got == T_PAGE, "the read gave %zd after %llu ms", got,
		      (unsigned long long)(cowmm__now_ns() - t0) / 1000000);
	ck_assert_msg(page_is(buf, 21), "the snapshot reads %#x for page 20",
		      buf[0]);
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
	munmap(p + 16 * T_PAGE, 16 * T_PAGE);
}
END_TEST

/*
 * The same moment in a write fault's copy for a snapshot (the copy reads
 * the page, then finds it unprotected with other memory in its place, its
 * move not read yet): the copy took the page for lost and broke the
 * snapshot, where it must wait for the move and copy the page where it
 * went.
 */
static void *write_page20(void *arg)
{
	unsigned char *p = arg;

	p[20 * T_PAGE + 7] = 0x99; /* its fault's copy meets the move */
	return NULL;
}

/*
 * A write fault's copy meets the move (the page's range moves away and
 * other memory is mapped there, its event not read): plain memory
 * (fault-checked-moved-unread), or memory another manager protects
 * (fault-checked-moved-foreign), which keeps its protection and its frame
 * across the copy.  A worker took the second's bytes for the page's and
 * gave them to the snapshot, silently.
 */
static void fault_checked_moved(bool foreign)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE), buf[T_PAGE];
	cowmm_region_t *r;
	cowmm_snap_t *s;
	pthread_t th;

	if (foreign)
		foreign_mm = t_open_fa(1, 1);
	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	snap_checked_move.mm = mm;
	snap_checked_move.to = to;
	snap_checked_move.placed = false;
	snap_checked_move.foreign = foreign;
	__atomic_store_n(&snap_checked_move.at, p + 16 * T_PAGE,
			 __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_checked, move_away_when_checked,
			 __ATOMIC_RELEASE);
	/* The write may land in the other memory: the application's race. */
	ck_assert_int_eq(pthread_create(&th, NULL, write_page20, p), 0);
	pthread_join(th, NULL);
	__atomic_store_n(&cowmm__read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert(snap_checked_move.placed);
	pthread_join(snap_checked_move.th, NULL);
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	ck_assert_int_eq(cowmm_snap_read(s, 20 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert_msg(page_is(buf, 21), "the snapshot reads %#x for page 20",
		      buf[0]);
	t_assert_snap_filled(s, NPAGES);
	if (foreign) {
		foreign_close();
	}
	cowmm_close(mm); /* unmaps the moved pages: the library's */
	munmap(p + 16 * T_PAGE, 16 * T_PAGE);
}

/*
 * The same with two workers, the move's event read by the other worker
 * while this one copies (the hook's mremap() returns once it is read; the
 * region's lock, which this worker holds, keeps it from being handled):
 * no event is unread any more, and the kernel's probe takes any mapping
 * registered with a userfaultfd, another manager's too.  Only the count of
 * moves read tells.
 */
START_TEST(test_fault_checked_moved_read_foreign)
{
	cowmm_t *mm = t_open_fa(2, 1);
	unsigned char *p, buf[T_PAGE];
	cowmm_region_t *r;
	cowmm_snap_t *s;
	pthread_t th;

	foreign_mm = t_open_fa(1, 1);
	foreign_r = NULL;
	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	claim_to = reserve(16 * T_PAGE);
	__atomic_store_n(&claim_at, p + 16 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_checked, move_foreign_when_checked,
			 __ATOMIC_RELEASE);
	ck_assert_int_eq(pthread_create(&th, NULL, write_page20, p), 0);
	pthread_join(th, NULL);
	__atomic_store_n(&cowmm__read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert_msg(foreign_r, "the fault's copy never read");
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	ck_assert_int_eq(cowmm_snap_read(s, 20 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert_msg(page_is(buf, 21), "the snapshot reads %#x for page 20",
		      buf[0]);
	t_assert_snap_filled(s, NPAGES);
	foreign_close();
	cowmm_close(mm); /* unmaps the moved pages: the library's */
	munmap(p + 16 * T_PAGE, 16 * T_PAGE);
}
END_TEST

START_TEST(test_fault_checked_moved_unread)
{
	fault_checked_moved(false);
}
END_TEST

START_TEST(test_fault_checked_moved_foreign)
{
	fault_checked_moved(true);
}
END_TEST

/*
 * A region allocated (or a clone made) while a move of another region's
 * pages is on its way, its event not read yet: the kernel may give the
 * new region the range the pages left, which the other region's layout
 * still lists.  The call returned -EEXIST, which neither documents (the
 * model tester's seed 8021860, a clone under the mover).
 */
START_TEST(test_alloc_where_pages_left)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE), *q, vec;
	struct move_call mv;
	cowmm_region_t *r, *n, *c;
	pthread_t th;
	int round, hit = 0;

	for (round = 0; round < 4; round++) {
		p = t_filled_region(mm, NPAGES, &r);
		mv = (struct move_call){ p + 16 * T_PAGE, to, 16 * T_PAGE };
		cowmm__pause_reads(mm, 40);
		ck_assert_int_eq(pthread_create(&th, NULL, move_thread, &mv),
				 0);
		while (!mincore(p + 16 * T_PAGE, T_PAGE, &vec))
			usleep(100); /* moved; its event waits to be read */
		if (round % 2 == 0) {
			ck_assert_int_eq(cowmm_region_alloc(mm, 16 * T_PAGE,
							    0, &n), 0);
			q = cowmm_region_base(n);
		} else {
			ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
			q = cowmm_region_base(c);
		}
		hit += q == p + 16 * T_PAGE;
		pthread_join(th, NULL);
		t_assert_live_filled(to - 16 * T_PAGE, 16, 16, 0, 0);
		if (round % 2 == 0) {
			ck_assert_int_eq(cowmm_region_release(n), 0);
		} else {
			ck_assert(page_is(q + 20 * T_PAGE, 21));
			ck_assert_int_eq(cowmm_region_release(c), 0);
		}
		ck_assert_int_eq(cowmm_region_release(r), 0);
		to = reserve(16 * T_PAGE);
	}
	(void)hit; /* where the kernel put them: not always the range */
	cowmm_close(mm);
}
END_TEST

/*
 * Arm region @r (at @p: one snapshot taken and released), then move its
 * pages 24..39 to @far and hold the range they left with a placeholder.
 */
static void move_away_armed(cowmm_region_t *r, unsigned char *p,
			    unsigned char *far)
{
	cowmm_snap_t *s0;

	ck_assert_int_eq(cowmm_snapshot(r, &s0), 0); /* armed */
	cowmm_snap_release(s0);
	ck_assert_ptr_eq(mremap(p + 24 * T_PAGE, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, far),
			 far);
	ck_assert(place(p + 24 * T_PAGE, 16 * T_PAGE));
}

/*
 * Run @fn(@arg) in a thread that waits for @r's lock (a helper holds it)
 * while the pages at @far move home to @p + 24 pages, and the test hook
 * maps a placeholder at @far right after its protecting ioctl.
 */
static void move_back_during(cowmm_region_t *r, unsigned char *p,
			     unsigned char *far, void *(*fn)(void *),
			     void *arg)
{
	pthread_t th;
	struct hold h;

	hold_start(&h, &r->lock, 100);
	ck_assert_int_eq(pthread_create(&th, NULL, fn, arg), 0);
	usleep(30 * 1000); /* it waits for the region's lock */
	ck_assert_ptr_eq(mremap(far, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, p + 24 * T_PAGE),
			 p + 24 * T_PAGE);
	hook_placeholder(far);
	hold_end(&h);
	pthread_join(th, NULL);
	unhook();
}

START_TEST(test_snapshot_move_back_held)
{
	const size_t big = 4096;
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *far = reserve(16 * T_PAGE), buf[T_PAGE];
	struct snap_call c = { 0 };
	cowmm_snap_t *s0;
	size_t i;

	p = t_filled_region(mm, big, &c.r);
	p = lower(c.r, p, big);
	move_away_armed(c.r, p, far);
	ck_assert_int_eq(cowmm_snapshot(c.r, &s0), 0); /* the move handled */
	cowmm_snap_release(s0);
	for (i = 0; i < 16; i++)
		far[i * T_PAGE] = 0x77; /* unprotected now */

	move_back_during(c.r, p, far, snap_thread, &c);
	ck_assert_int_eq(c.ret, 0);
	for (i = 0; i < 16; i++)
		p[(24 + i) * T_PAGE] = 0x11; /* must copy for the snapshot */
	for (i = 0; i < 16; i++) {
		ck_assert_int_eq(cowmm_snap_read(c.s, (24 + i) * T_PAGE, buf,
						 T_PAGE),
				 T_PAGE);
		ck_assert_uint_eq(buf[0], 0x77);
	}
	cowmm_snap_release(c.s);
	cowmm_close(mm);
	if (__atomic_load_n(&placeholder_ours, __ATOMIC_ACQUIRE))
		munmap(far, 16 * T_PAGE);
}
END_TEST

struct restore_call {
	cowmm_snap_t *s;
	int ret;
};

static void *restore_thread(void *arg)
{
	struct restore_call *c = arg;

	c->ret = cowmm_snap_restore(c->s);
	return NULL;
}

/*
 * The same move back under cowmm_snap_restore(): with the old layout it
 * unprotected and wrote the placeholder's range (-ENOENT with part of the
 * region restored; the review's mover also crashed it in its copy).  It
 * must wait for the move and restore every page where it is now.
 */
START_TEST(test_restore_move_back_held)
{
	const size_t big = 4096;
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *far = reserve(16 * T_PAGE);
	struct restore_call c = { 0 };
	cowmm_region_t *r;
	size_t i;

	p = t_filled_region(mm, big, &r);
	p = lower(r, p, big);
	move_away_armed(r, p, far);
	ck_assert_int_eq(cowmm_snapshot(r, &c.s), 0); /* the filled bytes */
	for (i = 0; i < 16; i++)
		far[i * T_PAGE] ^= 0xff; /* copied for the snapshot */

	move_back_during(r, p, far, restore_thread, &c);
	ck_assert_int_eq(c.ret, 0);
	t_assert_live_filled(p, 0, big, 0, 0); /* every page restored, at home */
	cowmm_snap_release(c.s);
	cowmm_close(mm);
	if (__atomic_load_n(&placeholder_ours, __ATOMIC_ACQUIRE))
		munmap(far, 16 * T_PAGE);
}
END_TEST

/*
 * A move that lands while restore copies (the second review's mover
 * crashed it there, or hung it).  The hook runs in the restoring thread,
 * both locks held, at a run of pages to roll back: stage 0 before it is
 * unprotected, 1 right after, 2 right before it is copied into.  Its
 * mremap() returns once a worker has read the event, whose handling waits
 * for the locks.
 */
static unsigned char *copying_from, *copying_to;
static size_t copying_len;
static int copying_stage;

static void move_while_copying(cowmm_region_t *r, int stage, uintptr_t addr,
			       size_t len)
{
	unsigned char *from;

	(void)r;
	(void)addr;
	(void)len;
	if (stage != copying_stage)
		return;
	from = __atomic_exchange_n(&copying_from, NULL, __ATOMIC_ACQ_REL);
	if (from)
		ck_assert_ptr_eq(mremap(from, copying_len, copying_len,
					MREMAP_MAYMOVE | MREMAP_FIXED,
					copying_to),
				 copying_to);
}

/* Move @len bytes at @from to @to at restore's next run, at @stage. */
static void hook_move_while_copying(int stage, unsigned char *from,
				    unsigned char *to, size_t len)
{
	copying_stage = stage;
	copying_len = len;
	copying_to = to;
	__atomic_store_n(&copying_from, from, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__restore_copying, move_while_copying,
			 __ATOMIC_RELEASE);
}

static void unhook_copying(void)
{
	__atomic_store_n(&cowmm__restore_copying, NULL, __ATOMIC_RELEASE);
	__atomic_store_n(&copying_from, NULL, __ATOMIC_RELEASE);
}

/*
 * The pages being restored move away before they are copied into: the
 * copy found nothing mapped there (SIGSEGV at stages 1 and 2).  Restore
 * must follow them and roll them back where they are now.
 */
static void restore_move_while_copying(int stage)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *far = reserve(16 * T_PAGE);
	cowmm_region_t *r;
	cowmm_snap_t *s;

	p = filled_written(mm, NPAGES, &r, &s);

	hook_move_while_copying(stage, p + 24 * T_PAGE, far, 16 * T_PAGE);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	unhook_copying();
	t_assert_live_filled(p, 0, 24, 0, 0);
	t_assert_live_filled(far - 24 * T_PAGE, 24, 16, 0, 0);
	t_assert_live_filled(p, 40, NPAGES - 40, 0, 0);
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}

START_TEST(test_restore_moved_away_0)
{
	restore_move_while_copying(0);
}
END_TEST

START_TEST(test_restore_moved_away_1)
{
	restore_move_while_copying(1);
}
END_TEST

START_TEST(test_restore_moved_away_2)
{
	restore_move_while_copying(2);
}
END_TEST

/*
 * A page still protected moves over one being restored: the copy faulted
 * on it while restore held the region's lock, which the fault's worker
 * waited for (a hang at stages 1 and 2); at stage 0 restore unprotected it
 * and wrote the other page's bytes into it.  The page moved over is gone
 * (the application unmapped it); restore must return, roll back the rest,
 * and leave the moved page as it was, protected.
 */
static void restore_protected_moves_in(int stage)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, buf[T_PAGE];
	cowmm_region_t *r;
	cowmm_snap_t *s;
	size_t i;

	p = filled_written(mm, NPAGES, &r, &s);

	/* page 50 was not written since @s: still protected */
	hook_move_while_copying(stage, p + 50 * T_PAGE, p + 24 * T_PAGE,
				T_PAGE);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	unhook_copying();
	ck_assert_msg(page_is(p + 24 * T_PAGE, 51),
		      "the page moved in was written by restore");
	t_assert_live_filled(p, 25, 15, 0, 0);
	for (i = 0; i < NPAGES; i++) {
		ck_assert_int_eq(cowmm_snap_read(s, i * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert(page_is(buf, i + 1));
	}
	p[24 * T_PAGE] = 0x42; /* it moved with its protection */
	ck_assert_int_eq(cowmm_snap_read(s, 50 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert(page_is(buf, 51));
	cowmm_close(mm);
}

START_TEST(test_restore_moved_over_0)
{
	restore_protected_moves_in(0);
}
END_TEST

START_TEST(test_restore_moved_over_1)
{
	restore_protected_moves_in(1);
}
END_TEST

START_TEST(test_restore_moved_over_2)
{
	restore_protected_moves_in(2);
}
END_TEST

/*
 * A clone's first touch reads its origin's page in the source region;
 * right after the check that the page is protected (the test hook, in
 * the only worker), another thread moves the source's pages, and the
 * worker cannot read that move's event while it handles the touch.  The
 * copy found nothing mapped, no move pending even 50 us later, and took
 * the page for lost (the second outside review saw the log); only the
 * kernel refusing the poison while the move's event was unread kept the
 * clone's page from SIGBUS.  It must wait for the move.
 */
static struct move_call checked_move;
static pthread_t checked_mover;

static void move_source_when_checked(uintptr_t addr)
{
	unsigned char vec;

	if (addr != (uintptr_t)__atomic_load_n(&checked_move.from,
					       __ATOMIC_ACQUIRE) ||
	    !__atomic_exchange_n(&checked_from, NULL, __ATOMIC_ACQ_REL))
		return;
	ck_assert_int_eq(pthread_create(&checked_mover, NULL, move_thread,
					&checked_move),
			 0);
	while (!mincore(checked_move.from, T_PAGE, &vec))
		usleep(100); /* moved; its event waits for this worker */
}

START_TEST(test_clone_fill_moved_unread)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *q, *to = reserve(16 * T_PAGE);
	cowmm_region_t *r, *c;
	size_t i;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	checked_move = (struct move_call){ p + 16 * T_PAGE, to, 16 * T_PAGE };
	__atomic_store_n(&checked_from, p, __ATOMIC_RELEASE); /* armed */
	__atomic_store_n(&cowmm__read_checked, move_source_when_checked,
			 __ATOMIC_RELEASE);
	t_log_clear();
	ck_assert(page_is(q + 16 * T_PAGE, 17)); /* the first touch */
	/* (the poison itself waited for the event, and the touch was
	 * served right once it was handled: the decision was still wrong) */
	ck_assert_msg(!t_log_has("is lost"), "the page was taken for lost");
	__atomic_store_n(&cowmm__read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert_ptr_null(__atomic_load_n(&checked_from, __ATOMIC_ACQUIRE));
	pthread_join(checked_mover, NULL);
	for (i = 0; i < NPAGES; i++)
		ck_assert(page_is(q + i * T_PAGE, i + 1));
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * Restore is about to copy into a run when the application unmaps part of
 * it and maps fresh memory there (the unmap returned: its event was read).
 * The copy wrote the snapshot's bytes into the fresh memory (the outside
 * review: in every run; the library's own frames, mapped there, were
 * overwritten too).  Nothing outside the region may be written.
 */
static void unmap_and_map(cowmm_region_t *r, int stage, uintptr_t addr,
			  size_t len)
{
	unsigned char *from;

	(void)r;
	(void)addr;
	(void)len;
	if (stage != 2)
		return;
	from = __atomic_exchange_n(&copying_from, NULL, __ATOMIC_ACQ_REL);
	if (!from)
		return;
	ck_assert_int_eq(munmap(from, copying_len), 0);
	ck_assert_ptr_eq(mmap(from, copying_len, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS |
				      MAP_FIXED_NOREPLACE,
			      -1, 0),
			 from);
}

START_TEST(test_restore_unmapped_remapped)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	size_t i;

	/* low: the hook maps fresh memory where pages were unmapped */
	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	write_run(p);

	copying_len = 8 * T_PAGE;
	__atomic_store_n(&copying_from, p + 32 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__restore_copying, unmap_and_map,
			 __ATOMIC_RELEASE);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	unhook_copying();
	for (i = 32; i < 40; i++)
		ck_assert_msg(zero_page(p + i * T_PAGE),
			      "fresh memory at page %zu was written", i);
	t_assert_live_filled(p, 0, 32, 0, 0);
	t_assert_live_filled(p, 40, NPAGES - 40, 0, 0);
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm);
	munmap(p + 32 * T_PAGE, 8 * T_PAGE);
}
END_TEST

/*
 * A newer snapshot shares pages that move away, and a placeholder takes
 * the range they left, while restore waits for the region's lock; the
 * move is not handled when restore protects the region again.  Protecting
 * the old layout, it found the placeholder's pages unprotected and broke
 * the newer snapshot for "page discarded" (the outside review: 3-15% of
 * iterations with a mover).  The pages only moved: it stays whole.
 */
START_TEST(test_restore_moved_newer_snapshot)
{
	const size_t big = 4096;
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *far = reserve(16 * T_PAGE);
	struct restore_call c = { 0 };
	cowmm_region_t *r;
	cowmm_snap_t *s2;
	struct hold h;
	pthread_t th;
	bool placed;

	p = filled_written(mm, big, &r, &c.s);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0); /* shares the writes */

	hold_start(&h, &r->lock, 100);
	ck_assert_int_eq(pthread_create(&th, NULL, restore_thread, &c), 0);
	usleep(30 * 1000); /* it waits for the region's lock */
	ck_assert_ptr_eq(mremap(p + 24 * T_PAGE, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, far),
			 far);
	placed = place(p + 24 * T_PAGE, 16 * T_PAGE);
	hold_end(&h);
	pthread_join(th, NULL);
	ck_assert_int_eq(c.ret, 0);
	assert_snap_run_written(s2);
	t_assert_live_filled(far - 24 * T_PAGE, 24, 16, 0, 0);
	cowmm_snap_release(s2);
	cowmm_snap_release(c.s);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
	if (placed)
		munmap(p + 24 * T_PAGE, 16 * T_PAGE);
}
END_TEST

/*
 * Restore is about to give a newer snapshot its copy of a page when the
 * page's range moves on from where it was (to a range the test holds),
 * and other pages of the region move into the range it left: both moves read, not handled (the
 * hook runs under the region's lock).  The copy read the page where the
 * layout still put it, found another page there, protected, and gave its
 * bytes to the snapshot (the outside review's mover: 1 in 30 iterations).
 */
static unsigned char *swap_home, *swap_other;

static void move_home_and_in(cowmm_region_t *r, int stage, uintptr_t addr,
			     size_t len)
{
	unsigned char *far;

	(void)r;
	(void)len;
	if (stage != 3)
		return;
	far = __atomic_exchange_n(&copying_from, NULL, __ATOMIC_ACQ_REL);
	if (!far)
		return;
	ck_assert_ptr_eq((void *)addr, far);
	ck_assert_ptr_eq(mremap(far, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, swap_home),
			 swap_home);
	ck_assert_ptr_eq(mremap(swap_other, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, far),
			 far);
}

static void wait_maps_handled(cowmm_t *mm)
{
	while (atomic_load(&mm->remaps_pending) ||
	       atomic_load(&mm->unmaps_pending))
		usleep(1000);
}

START_TEST(test_restore_claim_stale_layout)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *far = reserve(16 * T_PAGE);
	unsigned char *home = reserve(16 * T_PAGE);
	cowmm_region_t *r;
	cowmm_snap_t *s, *s2;

	p = filled_written(mm, NPAGES, &r, &s);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0); /* shares the writes */
	ck_assert_ptr_eq(mremap(p + 24 * T_PAGE, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, far),
			 far);
	wait_maps_handled(mm);

	swap_home = home; /* a range of ours: nothing else maps there */
	swap_other = p + 40 * T_PAGE;
	__atomic_store_n(&copying_from, far, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__restore_copying, move_home_and_in,
			 __ATOMIC_RELEASE);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	unhook_copying();
	assert_snap_run_written(s2);
	t_assert_live_filled(p, 0, 24, 0, 0);
	t_assert_live_filled(home - 24 * T_PAGE, 24, 16, 0, 0);
	t_assert_live_filled(far - 40 * T_PAGE, 40, 16, 0, 0);
	t_assert_live_filled(p, 56, NPAGES - 56, 0, 0);
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * The same move, restoring a clone whose pages were all touched (filled
 * from its origin): the copy for the clone's newer snapshot read the
 * filled page at the old address, found nothing there and broke that
 * snapshot (the model tester's seed 41955).
 */
START_TEST(test_restore_clone_moved_claiming)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *q, *far = reserve(16 * T_PAGE);
	cowmm_region_t *r, *c;
	cowmm_snap_t *s, *s2;
	volatile unsigned char sink = 0;
	size_t i;

	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	for (i = 0; i < NPAGES; i++)
		sink ^= q[i * T_PAGE]; /* every page filled */
	(void)sink;
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0);
	write_run(q);
	ck_assert_int_eq(cowmm_snapshot(c, &s2), 0); /* shares the writes */

	hook_move_while_copying(3, q + 24 * T_PAGE, far, 16 * T_PAGE);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	unhook_copying();
	assert_snap_run_written(s2);
	t_assert_live_filled(far - 24 * T_PAGE, 24, 16, 0, 0);
	t_assert_live_filled(q, 0, 24, 0, 0);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * The pages move away while restore gives a clone its copy of them: the
 * copy finds nothing at the old address, and must wait for the move, not
 * count the page lost (the clone's page would raise SIGBUS).
 */
START_TEST(test_restore_moved_claiming)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *q, *far = reserve(16 * T_PAGE);
	cowmm_region_t *r, *c;
	cowmm_snap_t *s;

	p = filled_written(mm, NPAGES, &r, &s);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0); /* shares the writes */
	q = cowmm_region_base(c);

	hook_move_while_copying(3, p + 24 * T_PAGE, far, 16 * T_PAGE);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	unhook_copying();
	t_assert_live_filled(far - 24 * T_PAGE, 24, 16, 0, 0);
	t_assert_live_filled(p, 40, NPAGES - 40, 0, 0);
	t_assert_live_filled(q, 24, 16, 0, 0xff); /* the clone kept them */
	t_assert_live_filled(q, 0, 24, 0, 0);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * A pin at a moved page's new address right after mremap() returned, its
 * REMAP read but not handled yet (a helper holds the region's lock): it
 * waits for the move, it is not -EINVAL (the model tester's final run).
 */
START_TEST(test_pin_after_move)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r;
	unsigned char *p, *to = reserve(4 * T_PAGE);
	struct hold h;

	p = t_filled_region(mm, NPAGES, &r);
	hold_start(&h, &r->lock, 300);
	ck_assert_ptr_eq(mremap(p + 24 * T_PAGE, 4 * T_PAGE, 4 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, to),
			 to);
	ck_assert_int_eq(cowmm_pin(r, to + 2 * T_PAGE, T_PAGE, COWMM_PIN_READ),
			 0);
	hold_end(&h);
	ck_assert_int_eq(cowmm_unpin(r, to + 2 * T_PAGE, T_PAGE), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * The same move, and a pin across where the pages were: the address range
 * is now in pieces, which a pin may not span (-EINVAL).  pin_range()
 * waited for the move only when the old layout refused the range, and the
 * old layout takes it (the model tester's seed 628446543: the pin
 * succeeded across pieces).
 */
START_TEST(test_pin_across_move_unhandled)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r;
	unsigned char *p, *to = reserve(T_PAGE);
	struct hold h;
	int ret;

	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	hold_start(&h, &r->lock, 300);
	ck_assert_ptr_eq(mremap(p + 21 * T_PAGE, T_PAGE, T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, to),
			 to);
	ret = cowmm_pin(r, p + 20 * T_PAGE, 3 * T_PAGE, COWMM_PIN_READ);
	hold_end(&h);
	ck_assert_msg(ret == -EINVAL, "a pin across pieces returned %d", ret);
	ck_assert_int_eq(cowmm_pin(r, to, T_PAGE, COWMM_PIN_READ), 0);
	ck_assert_int_eq(cowmm_unpin(r, to, T_PAGE), 0);
	cowmm_close(mm); /* unmaps the moved page: the library's */
}
END_TEST

/*
 * munmap() returns once a worker has read its UNMAP event, perhaps before
 * it is handled: a snapshot read then finds the page gone with no
 * protection, as a page MADV_FREE let the kernel drop would be, but it
 * must not read the zero such a page may; it reads -EIO once the
 * snapshot is broken.  A helper holding the manager's lock keeps the
 * event pending.
 */
START_TEST(test_unmap_pending_read)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p, buf[T_PAGE];
	struct hold h;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	hold_start(&h, &mm->lock, 300);
	ck_assert_int_eq(munmap(p, 2 * T_PAGE), 0);
	ck_assert_int_eq(cowmm_snap_read(s, 0, buf, T_PAGE), -EIO);
	hold_end(&h);
	ck_assert_int_eq(cowmm_snap_read(s, 0, buf, T_PAGE), -EIO);
	cowmm_close(mm);
}
END_TEST

/*
 * Memory mapped where part of a region was unmapped can be taken over,
 * and releasing the old region leaves the new one registered and exact.
 */
START_TEST(test_region_in_hole)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *in;
	cowmm_snap_t *s;
	unsigned char *p, *q;
	size_t i;

	p = t_filled_region(mm, NPAGES, &r);
	/*
	 * Mapped over part of the region in one call (the kernel unmaps
	 * what was there): between a munmap() and a MAP_FIXED mmap()
	 * another thread's mapping could land in the hole and be clobbered.
	 */
	q = mmap(p + 16 * T_PAGE, 8 * T_PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	ck_assert_ptr_eq(q, p + 16 * T_PAGE);
	cowmm__quiesce(mm);
	for (i = 0; i < 8; i++)
		t_fill_page(q + i * T_PAGE, 100 + i);
	ck_assert_int_eq(cowmm_region_adopt(mm, q, 8 * T_PAGE, 0, &in), 0);
	ck_assert_int_eq(cowmm_snapshot(in, &s), 0);
	ck_assert_int_eq(cowmm_region_release(r), 0); /* not the hole */
	for (i = 0; i < 8; i++)
		q[i * T_PAGE] ^= 1; /* still copies for @s */
	for (i = 0; i < 8; i++) {
		unsigned char buf[T_PAGE];

		ck_assert_int_eq(cowmm_snap_read(s, i * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert(page_is(buf, 100 + i));
	}
	ck_assert_uint_eq(t_stats(mm).copies, 8);
	cowmm_close(mm);
}
END_TEST

/* Item 12: a mapped view's page discarded by the application refills. */
START_TEST(test_view_discard)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	const unsigned char *v;
	unsigned char *p;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_map(s, (const void **)&v), 0);
	ck_assert(page_is(v + 2 * T_PAGE, 3));
	ck_assert_int_eq(madvise((void *)(v + 2 * T_PAGE), T_PAGE,
				 MADV_DONTNEED), 0);
	p[2 * T_PAGE] ^= 1;
	ck_assert_msg(page_is(v + 2 * T_PAGE, 3),
		      "a discarded view page reads %s",
		      zero_page(v + 2 * T_PAGE) ? "zeros" : "other bytes");
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm);
}
END_TEST

/* Item 13: fault_around == 0 means one page: copies == K, exactly. */
START_TEST(test_fault_around_zero)
{
	cowmm_t *mm = t_open_fa(1, 0);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	struct cowmm_stats st0, st;
	unsigned char *p;
	size_t i;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	st0 = t_stats(mm);
	for (i = 0; i < 40; i++) /* sequential: the case a window grows on */
		p[i * T_PAGE] ^= 1;
	st = t_stats(mm);
	ck_assert_uint_eq(st.copies - st0.copies, 40);
	ck_assert_uint_eq(st.ahead_copies - st0.ahead_copies, 0);
	ck_assert_uint_eq(st.wp_faults - st0.wp_faults, 40);
	t_assert_snap_filled(s, NPAGES);
	cowmm_close(mm);
}
END_TEST

struct writer {
	volatile unsigned char *p;
	atomic_bool done;
};

static void *write_main(void *arg)
{
	struct writer *w = arg;

	*w->p ^= 1;
	atomic_store(&w->done, true);
	return NULL;
}

/*
 * Item 9: a fault whose resolution fails (here the fault-around ioctl meets
 * a range unmapped and mapped again, not registered) still wakes its
 * writer.
 */
START_TEST(test_fault_error_wakes)
{
	cowmm_t *mm = t_open_fa(1, 4);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	struct writer w = { 0 };
	pthread_t th;
	unsigned char *p;
	void *again;
	int i;

	p = t_filled_region(mm, 16, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	p[8 * T_PAGE] ^= 1; /* page 8: writable in this epoch */
	p[6 * T_PAGE] ^= 1; /* the window is to go on at page 7 */
	cowmm__quiesce(mm);

	pthread_mutex_lock(&r->lock);
	w.p = p + 7 * T_PAGE;
	ck_assert_int_eq(pthread_create(&th, NULL, write_main, &w), 0);
	while (!atomic_load(&mm->deferred)) /* its fault waits for the lock */
		usleep(100);
	/* Unmapped and mapped again in one call (no hole for others). */
	again = mmap(p + 8 * T_PAGE, T_PAGE, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	ck_assert_ptr_eq(again, p + 8 * T_PAGE);
	pthread_mutex_unlock(&r->lock);

	for (i = 0; i < 5000 && !atomic_load(&w.done); i++)
		usleep(1000);
	ck_assert_msg(atomic_load(&w.done), "the writer was never woken");
	pthread_join(th, NULL);
	t_assert_snap_filled(s, 8);
	cowmm_close(mm);
}
END_TEST

/*
 * A worker whose read() found nothing (the other worker took the message)
 * went on to resolve the faults it had deferred, and then judged its read
 * by errno: whatever the resolving left there.  A check's ioctl refused
 * with EINVAL (the UFFDIO_CONTINUE probe answers "ours" that way) read as
 * "not a userfaultfd": every worker stopped, the fd still registered, and
 * writers slept for good (hangs of the model tester with two workers).
 * The hook leaves EINVAL where such a check would.  Which worker loses
 * the read is chance, half the rounds each.
 */
#define ERRNO_ROUNDS 16

static void clobber_errno(uintptr_t addr)
{
	(void)addr;
	errno = EINVAL;
}

START_TEST(test_worker_errno_after_read)
{
	cowmm_t *mm = t_open_fa(2, 1);
	struct writer w[2 * ERRNO_ROUNDS] = { 0 };
	pthread_t th[2 * ERRNO_ROUNDS];
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	int i, k, ms;

	p = t_filled_region(mm, 2 * ERRNO_ROUNDS, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	__atomic_store_n(&cowmm__read_checked, clobber_errno, __ATOMIC_RELEASE);
	for (i = 0; i < 2 * ERRNO_ROUNDS; i += 2) {
		/* A fault one worker defers: the region's lock is busy. */
		pthread_mutex_lock(&r->lock);
		w[i].p = p + (size_t)i * T_PAGE;
		ck_assert_int_eq(pthread_create(&th[i], NULL, write_main,
						&w[i]), 0);
		for (ms = 0; ms < 50000 && !atomic_load(&mm->deferred); ms++)
			usleep(100);
		ck_assert_msg(atomic_load(&mm->deferred),
			      "round %d: no worker read the fault%s", i / 2,
			      t_log_has("closed under the library")
				      ? " (the workers took the fd for closed)"
				      : "");
		/* Another: both workers wake for it, one reads it. */
		cowmm__pause_reads(mm, 30);
		w[i + 1].p = p + (size_t)(i + 1) * T_PAGE;
		ck_assert_int_eq(pthread_create(&th[i + 1], NULL, write_main,
						&w[i + 1]), 0);
		usleep(10 * 1000);
		pthread_mutex_unlock(&r->lock);
		for (ms = 0; ms < 5000; ms++) {
			if (atomic_load(&w[i].done) &&
			    atomic_load(&w[i + 1].done))
				break;
			usleep(1000);
		}
		for (k = i; k < i + 2; k++)
			ck_assert_msg(atomic_load(&w[k].done),
				      "round %d: the write to page %d never "
				      "finished%s", i / 2, k,
				      t_log_has("closed under the library")
					      ? " (the workers took the fd "
						"for closed)"
					      : "");
		pthread_join(th[i], NULL);
		pthread_join(th[i + 1], NULL);
	}
	__atomic_store_n(&cowmm__read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert_msg(!t_log_has("closed under the library"),
		      "the workers took the fd for closed");
	ck_assert_msg(!t_log_has("stopped"), "a worker stopped: %s",
		      t_log_text());
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	t_assert_snap_filled(s, 2 * ERRNO_ROUNDS);
	cowmm_close(mm);
}
END_TEST

/*
 * A write fault in flight on a page of R (manager 1) while the application
 * moves that page away (MREMAP_DONTUNMAP) and moves a page of Q, which
 * manager 2 protects for a snapshot, onto its old address.  Once manager
 * 1 followed its move, the fault's address was no region's: it cleared
 * the write protection there as on plain memory, and the kernel cleared
 * it on Q's page (another userfaultfd's), so manager 2 never copied it for
 * its snapshot (the fourth outside review: 8 in 10 tries).  The writer
 * must only be woken, to fault again into manager 2.
 */
START_TEST(test_fault_stray_foreign)
{
	cowmm_t *mm = t_open_fa(1, 1), *mm2 = t_open_fa(1, 1);
	unsigned char *p, *q, *to = reserve(T_PAGE), buf[T_PAGE];
	struct writer w = { 0 };
	cowmm_region_t *r, *qr;
	cowmm_snap_t *s, *qs;
	struct hold h;
	pthread_t th;
	size_t i;
	int ms;

	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_region_alloc(mm2, T_PAGE, COWMM_REGION_NOTHP,
					    &qr), 0);
	q = cowmm_region_base(qr);
	memset(q, 0x3c, T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snapshot(qr, &qs), 0);

	/* The fault waits for the region's lock. */
	hold_start(&h, &r->lock, 200);
	w.p = p + 5 * T_PAGE;
	ck_assert_int_eq(pthread_create(&th, NULL, write_main, &w), 0);
	for (ms = 0; ms < 50000 && !atomic_load(&mm->deferred); ms++)
		usleep(100);
	ck_assert(atomic_load(&mm->deferred));
	ck_assert_ptr_eq(mremap(p + 5 * T_PAGE, T_PAGE, T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED |
					MREMAP_DONTUNMAP,
				to),
			 to);
	ck_assert_ptr_eq(mremap(q, T_PAGE, T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, p + 5 * T_PAGE),
			 p + 5 * T_PAGE);
	hold_end(&h);
	for (ms = 0; ms < 5000 && !atomic_load(&w.done); ms++)
		usleep(1000);
	ck_assert_msg(atomic_load(&w.done), "the writer was never woken");
	pthread_join(th, NULL);

	/* The write (of R's byte, read before) went to Q's page. */
	ck_assert_int_eq(p[5 * T_PAGE + 1], 0x3c);
	ck_assert_int_eq(cowmm_snap_read(qs, 0, buf, T_PAGE), T_PAGE);
	for (i = 0; i < T_PAGE; i++)
		ck_assert_msg(buf[i] == 0x3c, "Q's snapshot reads %#x at %zu",
			      buf[i], i);
	ck_assert_uint_eq(t_stats(mm2).broken, 0);
	t_assert_snap_filled(s, NPAGES);
	cowmm_snap_release(qs);
	cowmm_close(mm2); /* unmaps Q's page, where R's page 5 was */
	cowmm_close(mm);  /* unmaps R's pages, page 5 at @to */
	munmap(p, NPAGES * T_PAGE);
}
END_TEST

/*
 * mremap() sends a REMAP and then an UNMAP of the range the page left;
 * a region adopted there in between (the table no longer lists the range
 * once the move is followed) had its page taken for unmapped by that
 * UNMAP: a hole, which its snapshots read as zero (the fifth outside
 * review: a region allocated there, 1 in 3,000 tries).  The hook holds
 * the UNMAP back: workers read nothing for 300 ms after the move.
 */
static struct {
	cowmm_t *mm;
	unsigned char *from;
	atomic_bool hit;
} remap_pause;

static void pause_after_remap(uintptr_t from, size_t len)
{
	(void)len;
	if (from != (uintptr_t)remap_pause.from ||
	    atomic_exchange(&remap_pause.hit, true))
		return;
	cowmm__pause_reads(remap_pause.mm, 300);
}

/*
 * @early: the other memory is mapped where the page was before the move
 * is read (workers read nothing for 100 ms), as another thread's mmap()
 * may be as soon as mremap() let go of the range; the
 * region is adopted once the move is followed (the sixth outside review:
 * a note taken when the old range was found empty missed this).
 */
static void adopt_where_move_left(bool early)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *q = NULL, *to = reserve(T_PAGE), buf[T_PAGE];
	struct move_call mv;
	cowmm_region_t *r, *a;
	cowmm_snap_t *s;
	unsigned char vec;
	pthread_t th;
	int ms;

	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	remap_pause.mm = mm;
	remap_pause.from = p + 20 * T_PAGE;
	atomic_store(&remap_pause.hit, false);
	__atomic_store_n(&cowmm__remap_handled, pause_after_remap,
			 __ATOMIC_RELEASE);
	if (early) /* the move is read only after the memory is mapped */
		cowmm__pause_reads(mm, 100);
	mv = (struct move_call){ p + 20 * T_PAGE, to, T_PAGE };
	ck_assert_int_eq(pthread_create(&th, NULL, move_thread, &mv), 0);
	if (early) {
		while (!mincore(p + 20 * T_PAGE, T_PAGE, &vec))
			usleep(100); /* moved */
		q = mmap(p + 20 * T_PAGE, T_PAGE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
			 -1, 0);
		ck_assert_ptr_eq(q, p + 20 * T_PAGE);
	}
	for (ms = 0; ms < 50000 && !atomic_load(&remap_pause.hit); ms++)
		usleep(100);
	ck_assert(atomic_load(&remap_pause.hit));
	/* The move is followed; its UNMAP waits to be read. */
	if (!early) {
		q = mmap(p + 20 * T_PAGE, T_PAGE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
			 -1, 0);
		ck_assert_ptr_eq(q, p + 20 * T_PAGE);
	}
	memset(q, 0x77, T_PAGE);
	ck_assert_int_eq(cowmm_region_adopt(mm, q, T_PAGE, 0, &a), 0);
	pthread_join(th, NULL);
	__atomic_store_n(&cowmm__remap_handled, NULL, __ATOMIC_RELEASE);
	cowmm__wait_events(mm);

	ck_assert_int_eq(cowmm_snapshot(a, &s), 0);
	q[5] = 0x11; /* copies the page for @s */
	ck_assert_int_eq(cowmm_snap_read(s, 0, buf, T_PAGE), T_PAGE);
	ck_assert_msg(buf[0] == 0x77 && buf[5] == 0x77,
		      "the adopted page reads %#x in its snapshot", buf[0]);
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(a), 0);
	cowmm_close(mm); /* unmaps the region's pages, page 20 at @to */
	munmap(q, T_PAGE);
}

/*
 * Once [@at, @at + 4 pages) is unmapped, map other memory there, fill it
 * with 0x77 and adopt it: memory mapped where an munmap() that has not
 * returned took memory of the manager's.
 */
static cowmm_region_t *adopt_once_unmapped(cowmm_t *mm, unsigned char *at)
{
	cowmm_region_t *a;
	unsigned char vec;

	while (!mincore(at, T_PAGE, &vec))
		usleep(100);
	ck_assert_ptr_eq(mmap(at, 4 * T_PAGE, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
			      -1, 0),
			 at);
	memset(at, 0x77, 4 * T_PAGE);
	ck_assert_int_eq(cowmm_region_adopt(mm, at, 4 * T_PAGE, 0, &a), 0);
	return a;
}

/* Its snapshot holds the 0x77 of every page; then released. */
static void check_adopted(cowmm_t *mm, cowmm_region_t *a, unsigned char *q)
{
	unsigned char buf[T_PAGE];
	cowmm_snap_t *s;
	size_t i;

	ck_assert_int_eq(cowmm_snapshot(a, &s), 0);
	memset(q, 0x11, 4 * T_PAGE); /* copies every page for @s */
	for (i = 0; i < 4; i++) {
		ck_assert_int_eq(cowmm_snap_read(s, i * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert_msg(buf[0] == 0x77 && buf[T_PAGE - 1] == 0x77,
			      "adopted page %zu reads %#x in its snapshot", i,
			      buf[0]);
	}
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(a), 0);
}

static void *unmap_thread(void *arg)
{
	struct move_call *m = arg;

	ck_assert_int_eq(munmap(m->from, m->len), 0);
	return NULL;
}

/*
 * One munmap() over a region and the application's memory after it: the
 * kernel unmaps both, then sends an UNMAP of the whole range.  Memory
 * mapped in the second part and adopted before the event was read (that
 * range was no region's, so nothing held the adoption back) lost its
 * pages to it: its snapshots read zeros, and an allocated region's
 * release left them mapped (the sixth outside review's munspan).
 */
START_TEST(test_adopt_in_unmapped_span)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *pm;
	struct move_call mv;
	cowmm_region_t *r, *a;
	pthread_t th;

	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	pm = reserve(4 * T_PAGE); /* right after the region */
	ck_assert_ptr_eq(pm, p + NPAGES * T_PAGE);
	ck_assert_ptr_eq(mmap(pm, 4 * T_PAGE, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0),
			 pm);
	cowmm__pause_reads(mm, 100); /* the UNMAP waits to be read */
	mv = (struct move_call){ p, NULL, (NPAGES + 4) * T_PAGE };
	ck_assert_int_eq(pthread_create(&th, NULL, unmap_thread, &mv), 0);
	a = adopt_once_unmapped(mm, pm); /* the event not read */
	pthread_join(th, NULL);
	cowmm__wait_events(mm);

	check_adopted(mm, a, pm);
	cowmm_close(mm);
	munmap(pm, 4 * T_PAGE);
}
END_TEST

/*
 * MREMAP_DONTUNMAP moves the pages and leaves the old range mapped and
 * registered; no UNMAP follows that move.  Memory adopted there, then
 * unmapped by the application, sends an UNMAP of exactly the range the
 * move left, which was taken for the move's own and spared the region
 * (the thirteenth session's outside review, dontunmap_foreign_snap and
 * dontunmap_release_hang): its snapshot read the bytes of memory mapped
 * there afterwards, and its release never returned.
 */
START_TEST(test_adopt_dontunmap_left)
{
	cowmm_t *mm = t_open_fa(1, 1), *mm2 = t_open_fa(1, 1);
	const size_t len = 4 * T_PAGE;
	unsigned char *x, *z = reserve(len), buf[T_PAGE];
	cowmm_region_t *r, *a, *f;
	cowmm_snap_t *s, *s2;
	ssize_t n;

	ck_assert_int_eq(cowmm_region_alloc(mm, len, 0, &r), 0);
	x = cowmm_region_base(r);
	memset(x, 0x11, len);
	ck_assert_ptr_eq(mremap(x, len, len,
				MREMAP_MAYMOVE | MREMAP_FIXED |
					MREMAP_DONTUNMAP,
				z),
			 z);
	cowmm__wait_events(mm); /* the move is followed */
	memset(x, 0xab, len);
	ck_assert_int_eq(cowmm_region_adopt(mm, x, len, 0, &a), 0);
	ck_assert_int_eq(cowmm_snapshot(a, &s), 0);
	/*
	 * Unmapped and another manager's memory mapped there, in one call
	 * (the unmapped hole was taken meanwhile by a sanitizer's own
	 * mapping once: a flake).
	 */
	ck_assert_ptr_eq(mmap(x, len, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0),
			 x);
	memset(x, 0x77, len);
	ck_assert_int_eq(cowmm_region_adopt(mm2, x, len, 0, &f), 0);
	cowmm__wait_events(mm);

	/* Its pages were unmapped while it shared them: broken. */
	n = cowmm_snap_read(s, 0, buf, T_PAGE);
	ck_assert_msg(n == -EIO,
		      "a snapshot of unmapped memory read %zd (first byte "
		      "%#x), not -EIO",
		      n, n > 0 ? buf[0] : 0);
	/* A new one holds no page of it, not the other manager's. */
	ck_assert_int_eq(cowmm_snapshot(a, &s2), 0);
	n = cowmm_snap_read(s2, 0, buf, T_PAGE);
	ck_assert_msg(n != T_PAGE || buf[0] != 0x77,
		      "a snapshot of unmapped memory holds another "
		      "manager's bytes");
	cowmm_snap_release(s2);
	/* Released while @s still needs its pages: returns. */
	ck_assert_int_eq(cowmm_region_release(a), 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_int_eq(cowmm_region_release(f), 0);
	cowmm_close(mm2);
	cowmm_close(mm);
	munmap(x, len);
}
END_TEST

struct slow_reader {
	int fd;
	unsigned delay_ms;
};

/* Another userfaultfd's reader that takes @delay_ms to read its event. */
static void *slow_reader_thread(void *arg)
{
	struct slow_reader *sr = arg;
	struct pollfd pfd = { .fd = sr->fd, .events = POLLIN };
	struct uffd_msg m;

	ck_assert_int_eq(poll(&pfd, 1, 10000), 1);
	usleep(sr->delay_ms * 1000);
	ck_assert_int_eq(read(sr->fd, &m, sizeof(m)), (ssize_t)sizeof(m));
	ck_assert_uint_eq(m.event, UFFD_EVENT_UNMAP);
	return NULL;
}

/*
 * One munmap() over a page of another userfaultfd, a region and the
 * application's memory after it.  The kernel unmaps all of it, then sends
 * an UNMAP to each userfaultfd in turn, each once the one before was read:
 * while the other reader takes its time, the library's event is not even
 * queued, and memory mapped in the third part and adopted meanwhile passed
 * the barrier at once and lost its pages to the event later (the
 * thirteenth session's outside review, unmap_delayed): its snapshot read
 * zeros.
 */
START_TEST(test_adopt_in_span_slow_reader)
{
	cowmm_t *mm = t_open_fa(1, 1);
	const size_t np = NPAGES + 2 * 4;
	unsigned char *p = reserve(np * T_PAGE), *pm;
	struct uffdio_api api = { .api = UFFD_API,
				  .features = UFFD_FEATURE_EVENT_UNMAP };
	struct uffdio_register reg = { .mode = UFFDIO_REGISTER_MODE_MISSING };
	struct slow_reader sr = { .delay_ms = 300 };
	struct move_call mv;
	cowmm_region_t *r, *a;
	pthread_t th, rd;

	ck_assert_ptr_eq(mmap(p, np * T_PAGE, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0),
			 p);
	memset(p, 0x22, np * T_PAGE);
	/* [other userfaultfd: 4 | region: NPAGES | plain: 4] */
	sr.fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	ck_assert_int_ge(sr.fd, 0);
	ck_assert_int_eq(ioctl(sr.fd, UFFDIO_API, &api), 0);
	reg.range.start = (uintptr_t)p;
	reg.range.len = 4 * T_PAGE;
	ck_assert_int_eq(ioctl(sr.fd, UFFDIO_REGISTER, &reg), 0);
	ck_assert_int_eq(cowmm_region_adopt(mm, p + 4 * T_PAGE,
					    NPAGES * T_PAGE, 0, &r),
			 0);
	pm = p + (4 + NPAGES) * T_PAGE;
	ck_assert_int_eq(pthread_create(&rd, NULL, slow_reader_thread, &sr),
			 0);
	mv = (struct move_call){ p, NULL, np * T_PAGE };
	ck_assert_int_eq(pthread_create(&th, NULL, unmap_thread, &mv), 0);
	a = adopt_once_unmapped(mm, pm); /* no event queued for us yet */
	pthread_join(th, NULL);
	pthread_join(rd, NULL);
	cowmm__wait_events(mm);

	check_adopted(mm, a, pm);
	cowmm_close(mm);
	munmap(pm, 4 * T_PAGE);
	close(sr.fd);
}
END_TEST

struct keep_moving {
	unsigned char *at;
	size_t len;
	atomic_bool stop;
	atomic_ulong moves;
};

/* Move [at, at + len) to a new place, again and again, without pause. */
static void *keep_moving_thread(void *arg)
{
	struct keep_moving *k = arg;

	while (!atomic_load(&k->stop)) {
		void *to = mmap(NULL, k->len, PROT_NONE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		ck_assert_ptr_ne(to, MAP_FAILED);
		ck_assert_ptr_eq(mremap(k->at, k->len, k->len,
					MREMAP_MAYMOVE | MREMAP_FIXED, to),
				 to);
		k->at = to;
		atomic_fetch_add(&k->moves, 1);
	}
	return NULL;
}

/*
 * Write faults on a region that nothing moves, while another thread keeps
 * moving another region's pages of the same manager.  A fault put off
 * was tried again before the moves read with it were followed, found one
 * pending and was put off again; and a move anywhere counted as one of
 * its page.  The first write did not finish in 35-60 s in three runs of
 * five (the thirteenth session's outside review, fault_starve).  A
 * liveness check, not a timing: 16 writes within 20 s, where they take
 * well under a second.
 */
START_TEST(test_fault_while_other_moves)
{
	cowmm_t *mm = t_open_fa(1, 1);
	struct keep_moving k = { .len = 8 * T_PAGE };
	unsigned char *a, *b, buf[T_PAGE];
	cowmm_region_t *ra, *rb;
	struct timespec t0, t1;
	cowmm_snap_t *s;
	pthread_t th;
	size_t i;

	a = t_filled_region(mm, 16, &ra);
	b = t_filled_region(mm, 16, &rb);
	ck_assert_int_eq(cowmm_snapshot(rb, &s), 0);
	k.at = a + 8 * T_PAGE;
	ck_assert_int_eq(pthread_create(&th, NULL, keep_moving_thread, &k), 0);
	while (atomic_load(&k.moves) < 100)
		usleep(100);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < 16; i++) {
		b[i * T_PAGE] ^= 0xff; /* a write fault, the page copied */
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (t1.tv_sec - t0.tv_sec > 20)
			break;
	}
	atomic_store(&k.stop, true);
	pthread_join(th, NULL);
	ck_assert_msg(i == 16,
		      "%zu of 16 writes in 20 s while another region moved "
		      "%lu times",
		      i + 1, atomic_load(&k.moves));
	for (i = 0; i < 16; i++) {
		ck_assert_int_eq(cowmm_snap_read(s, i * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert_uint_eq(buf[0], (unsigned char)(b[i * T_PAGE] ^ 0xff));
	}
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(rb), 0);
	ck_assert_int_eq(cowmm_region_release(ra), 0);
	cowmm_close(mm);
}
END_TEST

struct ping_pong {
	unsigned char *a, *b, *at;
	unsigned long want;
	atomic_ulong moves;
	atomic_bool stop;
};

/* Move one page between a and b, and back, until stopped or done. */
static void *ping_pong_main(void *arg)
{
	struct ping_pong *p = arg;

	while (!atomic_load(&p->stop) && atomic_load(&p->moves) < p->want) {
		unsigned char *to = p->at == p->a ? p->b : p->a;

		ck_assert_ptr_eq(mremap(p->at, T_PAGE, T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED |
						MREMAP_DONTUNMAP,
					to),
				 to);
		p->at = to;
		atomic_fetch_add(&p->moves, 1);
	}
	return NULL;
}

/*
 * A thread moves a region's page back and forth (MREMAP_DONTUNMAP: each
 * move also unmaps what the last one left at its destination) while the
 * region's lock is busy.  A move's mremap() returns once a worker has
 * read its events, not once they are followed: the workers read on and
 * put them off.  The moves and unmaps read were numbered in 16 bits and
 * ordered by the difference; with more than 32,768 read and not followed
 * the order turned over, and they were followed out of order: the page
 * was taken for unmapped where it was, its snapshots broken, or it read
 * as zero with no error (the nineteenth outside review's ring: two
 * workers that hand the events to each other fall behind a thread that
 * keeps moving pages).  20,000 moves send 40,000 events.
 */
START_TEST(test_moves_read_far_ahead)
{
	cowmm_t *mm = t_open_fa(2, 1);
	struct ping_pong p = { .want = 20000 };
	unsigned char want[T_PAGE], buf[T_PAGE];
	unsigned long seen = 0;
	cowmm_snap_t *s, *s2;
	cowmm_region_t *r;
	unsigned char *a;
	bool held = false;
	pthread_t th;

	a = t_filled_region(mm, 8, &r);
	p.a = p.at = a + 3 * T_PAGE;
	p.b = reserve(T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	pthread_mutex_lock(&r->lock); /* no move of it can be followed */
	ck_assert_int_eq(pthread_create(&th, NULL, ping_pong_main, &p), 0);
	/*
	 * Until the thread is done, or held back: fewer than 20 moves in
	 * 100 ms (a worker that waits for moves to be followed reads one
	 * batch more each 50 ms in case a handler waits for a read).
	 */
	while (atomic_load(&p.moves) < p.want && !held) {
		usleep(100000);
		held = atomic_load(&p.moves) - seen < 20;
		seen = atomic_load(&p.moves);
	}
	pthread_mutex_unlock(&r->lock);
	atomic_store(&p.stop, true);
	pthread_join(th, NULL);

	t_fill_page(want, 4);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0); /* once all are followed */
	ck_assert_int_eq(memcmp(p.at, want, T_PAGE), 0);
	ck_assert_int_eq(cowmm_snap_read(s, 3 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert_msg(!memcmp(buf, want, T_PAGE),
		      "the first snapshot's page 3 holds other bytes after "
		      "%lu moves",
		      atomic_load(&p.moves));
	ck_assert_int_eq(cowmm_snap_read(s2, 3 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert_msg(!memcmp(buf, want, T_PAGE),
		      "a snapshot taken after %lu moves reads other bytes at "
		      "page 3",
		      atomic_load(&p.moves));
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	cowmm_snap_release(s2);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

static atomic_bool slept_after_protect;

static void sleep_after_protect(cowmm_region_t *r)
{
	(void)r;
	if (!atomic_exchange(&slept_after_protect, true))
		usleep(300 * 1000);
}

/*
 * The next protect sleeps 300 ms with the region's lock held
 * (sleep_after_protect()), and three threads move pages 2, 3 and 4 of
 * the region at @a back and forth until movers_stop().
 */
/* Three threads move pages 2, 3 and 4 of @a to and from p[i].b. */
static void movers_spawn(unsigned char *a, struct ping_pong p[3],
			 pthread_t th[3])
{
	int i;

	for (i = 0; i < 3; i++) {
		p[i].want = 1000000;
		p[i].a = p[i].at = a + (2 + i) * T_PAGE;
		ck_assert_int_eq(pthread_create(&th[i], NULL, ping_pong_main,
						&p[i]),
				 0);
	}
}

static void movers_start(unsigned char *a, struct ping_pong p[3],
			 pthread_t th[3])
{
	int i;

	atomic_store(&slept_after_protect, false);
	__atomic_store_n(&cowmm__after_protect, sleep_after_protect,
			 __ATOMIC_RELEASE);
	for (i = 0; i < 3; i++)
		p[i].b = reserve(T_PAGE);
	movers_spawn(a, p, th);
	while (atomic_load(&p[0].moves) < 10)
		usleep(100);
}

static void movers_stop(struct ping_pong p[3], pthread_t th[3])
{
	int i;

	__atomic_store_n(&cowmm__after_protect, NULL, __ATOMIC_RELEASE);
	for (i = 0; i < 3; i++) {
		atomic_store(&p[i].stop, true);
		pthread_join(th[i], NULL);
	}
}

/*
 * A snapshot holds its region's lock for a while after protecting (here
 * 300 ms; ending a lazy load of many pages does the same), while three
 * threads keep moving pages of the region.  The moves are read and wait for
 * that lock; past 1,024 of them the workers read no more, and the move
 * after them stays unread (three threads move: one of them nearly always
 * waits for its move to be read), so the kernel refuses the snapshot's
 * every ioctl (EAGAIN) for as long as the lock is held.  The snapshot asked
 * again for ever, holding the lock the workers waited for (the
 * twenty-second review's lazyx: three threads moving pages while a
 * snapshot ended a lazy load hung 3 runs of 3).  It must let go and try
 * again: succeed, or return -ENOENT while the moves go on.
 */
START_TEST(test_snapshot_reads_held)
{
	cowmm_t *mm = t_open_fa(1, 1);
	struct ping_pong p[3] = { 0 };
	unsigned char want[T_PAGE], buf[T_PAGE];
	cowmm_snap_t *s = NULL;
	cowmm_region_t *r;
	unsigned char *a;
	pthread_t th[3];
	int ret, i;

	a = t_filled_region(mm, 8, &r);
	movers_start(a, p, th);
	ret = cowmm_snapshot(r, &s);
	ck_assert_msg(ret == 0 || ret == -ENOENT, "cowmm_snapshot: %d", ret);
	movers_stop(p, th);
	if (s)
		cowmm_snap_release(s);

	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	for (i = 0; i < 3; i++) {
		t_fill_page(want, 3 + i);
		p[i].at[0] ^= 1; /* copies for @s, where the page is now */
		ck_assert_int_eq(cowmm_snap_read(s, (2 + i) * T_PAGE, buf,
						 T_PAGE),
				 T_PAGE);
		ck_assert_msg(!memcmp(buf, want, T_PAGE),
			      "page %d of a snapshot after %lu moves holds "
			      "other bytes",
			      2 + i, atomic_load(&p[i].moves));
	}
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

struct store_loop {
	volatile unsigned char *p;
	atomic_bool stop;
	atomic_ulong stores;
};

static void *store_loop_main(void *arg)
{
	struct store_loop *w = arg;

	while (!atomic_load(&w->stop)) {
		w->p[0]++;
		atomic_fetch_add(&w->stores, 1);
	}
	return NULL;
}

/*
 * The moves stopped: the restore of @s (page 6 changed in @a) goes
 * through, the moved pages kept their bytes, nothing broke; then all is
 * released.
 */
static void restore_settled(cowmm_t *mm, cowmm_region_t *r, cowmm_snap_t *s,
			    unsigned char *a, struct ping_pong p[3])
{
	unsigned char buf[T_PAGE];
	int i;

	ck_assert_int_eq(cowmm_snap_restore(s), 0); /* once all are followed */
	ck_assert(page_is(a + 6 * T_PAGE, 7));
	for (i = 0; i < 3; i++)
		ck_assert(page_is(p[i].at, 3 + i));
	ck_assert_int_eq(cowmm_snap_read(s, 6 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert(page_is(buf, 7));
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}

/*
 * snapshot-reads-held for a restore, which protects the region the same
 * way before it writes the snapshot's pages back: it asked again for ever
 * with the region's lock held (the twenty-fourth review's lz RKy: 4 runs
 * of 4 hung).  It must let go and try again: succeed, or return -ENOENT
 * while the moves go on.
 */
START_TEST(test_restore_reads_held)
{
	cowmm_t *mm = t_open_fa(1, 1);
	struct ping_pong p[3] = { 0 };
	cowmm_snap_t *s;
	cowmm_region_t *r;
	unsigned char *a;
	pthread_t th[3];
	int ret;

	a = t_filled_region(mm, 8, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	a[6 * T_PAGE] ^= 0xff; /* for the restore to put back */
	movers_start(a, p, th);
	ret = cowmm_snap_restore(s);
	ck_assert_msg(ret == 0 || ret == -ENOENT, "cowmm_snap_restore: %d",
		      ret);
	movers_stop(p, th);
	restore_settled(mm, r, s, a, p);
}
END_TEST

/*
 * restore-reads-held, with the moves begun once the protect is done: the
 * restore holds the region's lock over its copy (here 300 ms before the
 * first run), three threads move pages of the region meanwhile, and the
 * workers, 1,024 moves behind, read no more.  The unprotect of each run
 * asked the kernel again for ever with the lock held (the twenty-sixth
 * review's st dS: restores past 30 s in 3 runs of 8, the movers waiting
 * in the kernel).  It must let go and try again: succeed, or return
 * -ENOENT while the moves go on, within 30 s (1-4 s here; 10 s and more
 * beside the test loop under ASan).
 */
static struct {
	unsigned char *a;
	struct ping_pong p[3];
	pthread_t th[3];
	atomic_bool started;
} copy_movers;

static void movers_start_copying(cowmm_region_t *r, int stage, uintptr_t addr,
				 size_t len)
{
	(void)r;
	(void)addr;
	(void)len;
	if (stage != 0 || atomic_exchange(&copy_movers.started, true))
		return;
	movers_spawn(copy_movers.a, copy_movers.p, copy_movers.th);
	usleep(300 * 1000);
}

START_TEST(test_restore_copy_reads_held)
{
	cowmm_t *mm = t_open_fa(1, 1);
	struct timespec t0, t1;
	cowmm_snap_t *s;
	cowmm_region_t *r;
	unsigned char *a;
	int ret, i;

	a = t_filled_region(mm, 8, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	a[6 * T_PAGE] ^= 0xff; /* for the restore to put back */
	copy_movers.a = a;
	for (i = 0; i < 3; i++)
		copy_movers.p[i].b = reserve(T_PAGE);
	atomic_store(&copy_movers.started, false);
	__atomic_store_n(&cowmm__restore_copying, movers_start_copying,
			 __ATOMIC_RELEASE);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	ret = cowmm_snap_restore(s);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	__atomic_store_n(&cowmm__restore_copying, NULL, __ATOMIC_RELEASE);
	ck_assert(atomic_load(&copy_movers.started));
	movers_stop(copy_movers.p, copy_movers.th);
	/*
	 * -EIO: KNOWN DEFECT, open (README, Status).  Protecting again
	 * after the let-go may find a page moved with MREMAP_DONTUNMAP
	 * unprotected, no move pending at that instant, and take it for
	 * discarded: the snapshot is broken though nothing was lost ("page
	 * discarded while a snapshot was taken"; 1 run in 20-30 under
	 * ASan).  What this case is for, no hang, is checked either way;
	 * the bytes of the moved pages too.
	 */
	ck_assert_msg(ret == 0 || ret == -ENOENT || ret == -EIO,
		      "cowmm_snap_restore: %d", ret);
	ck_assert_msg(t1.tv_sec - t0.tv_sec < 30,
		      "the restore took %ld s while pages moved (%lu moves)",
		      (long)(t1.tv_sec - t0.tv_sec),
		      atomic_load(&copy_movers.p[0].moves));
	for (i = 0; i < 3; i++)
		ck_assert(page_is(copy_movers.p[i].at, 3 + i));
	if (ret == -EIO) {
		ck_assert_uint_eq(t_stats(mm).broken, 1);
		cowmm_snap_release(s);
		ck_assert_int_eq(cowmm_region_release(r), 0);
		cowmm_close(mm);
		return;
	}
	restore_settled(mm, r, s, a, copy_movers.p);
}
END_TEST

/*
 * snapshot-reads-held in-thread, with a thread storing to another page of
 * the region all along: its faults, resolved by the storing thread with
 * the region's lock held, meet the snapshot that lets go and comes back,
 * and the 1,024 moves read and waiting for the lock.  Nothing may hang,
 * and the snapshot taken once all stopped holds the bytes of its instant.
 */
START_TEST(test_inthread_reads_held)
{
	struct cowmm_config cfg = COWMM_CONFIG_INIT;
	struct ping_pong p[3] = { 0 };
	struct store_loop w = { 0 };
	unsigned char want[T_PAGE], buf[T_PAGE];
	cowmm_snap_t *s = NULL;
	cowmm_region_t *r;
	cowmm_t *mm = NULL;
	pthread_t th[3], wt;
	unsigned char *a;
	int ret, i;

	cfg.flags = COWMM_OPEN_IN_THREAD;
	cfg.fault_around = 1;
	ck_assert_int_eq(cowmm_open(&cfg, &mm), 0);
	a = t_filled_region(mm, 8, &r);
	w.p = a + 6 * T_PAGE;
	ck_assert_int_eq(pthread_create(&wt, NULL, store_loop_main, &w), 0);
	movers_start(a, p, th);
	ret = cowmm_snapshot(r, &s);
	ck_assert_msg(ret == 0 || ret == -ENOENT, "cowmm_snapshot: %d", ret);
	movers_stop(p, th);
	atomic_store(&w.stop, true);
	pthread_join(wt, NULL);
	if (s)
		cowmm_snap_release(s);

	memcpy(want, a + 6 * T_PAGE, T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	a[6 * T_PAGE] ^= 0xff; /* in-thread: copies for @s, here */
	ck_assert_int_eq(cowmm_snap_read(s, 6 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert_msg(!memcmp(buf, want, T_PAGE),
		      "page 6 of the snapshot holds other bytes after %lu "
		      "stores",
		      atomic_load(&w.stores));
	for (i = 0; i < 3; i++) {
		t_fill_page(want, 3 + i);
		ck_assert_int_eq(cowmm_snap_read(s, (2 + i) * T_PAGE, buf,
						 T_PAGE),
				 T_PAGE);
		ck_assert_msg(!memcmp(buf, want, T_PAGE),
			      "page %d of the snapshot holds other bytes", 2 + i);
	}
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/* MOVING pages of a region moved among NSLOTS slots of a reserve(). */
#define MOVING 32
#define NSLOTS 128

struct slot_mover {
	unsigned char *slots;
	int at[MOVING]; /* the slot each page is in */
	unsigned char taken[NSLOTS];
	unsigned seed;
	atomic_bool stop;
	atomic_ulong moves;
};

static void *slot_mover_main(void *arg)
{
	struct slot_mover *m = arg;

	while (!atomic_load(&m->stop)) {
		int k = rand_r(&m->seed) % MOVING, f;
		unsigned char *from = m->slots + m->at[k] * T_PAGE, *to;

		do
			f = rand_r(&m->seed) % NSLOTS;
		while (m->taken[f]);
		to = m->slots + f * T_PAGE;
		ck_assert_ptr_eq(mremap(from, T_PAGE, T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED, to),
				 to);
		/* Held again, for no other memory to land there. */
		ck_assert_ptr_eq(mmap(from, T_PAGE, PROT_NONE,
				      MAP_PRIVATE | MAP_ANONYMOUS |
					      MAP_FIXED_NOREPLACE,
				      -1, 0),
				 from);
		m->taken[m->at[k]] = 0;
		m->taken[f] = 1;
		m->at[k] = f;
		atomic_fetch_add(&m->moves, 1);
	}
	return NULL;
}

/* Stores to the STILL pages at the start of the region, in turn. */
#define STILL 64

static void *store_cycle_main(void *arg)
{
	struct store_loop *w = arg;
	unsigned long n = 0;

	while (!atomic_load(&w->stop)) {
		n++;
		w->p[(n % STILL) * T_PAGE + 8 * (n % 512)]++;
		atomic_fetch_add(&w->stores, 1);
	}
	return NULL;
}

/*
 * In-thread, two threads move pages of the region without pause while a
 * third stores to the pages that stay, and snapshots are taken every
 * 100 ms.  A store's fault lets go of the region's lock after 5 ms with
 * moves read and not followed, and faulted again at once: the storing
 * thread took the lock back before the workers that follow the moves, for
 * seconds on end, and a snapshot waited behind them (the twenty-fourth
 * review's lv is2: snapshots took 14-51 s in 5 runs of 5, single stores
 * up to 28 s).  Every snapshot must come back within 10 s, done or
 * -ENOENT (the moves never paused), and the moved pages keep their bytes.
 */
START_TEST(test_inthread_stores_while_moving)
{
	struct cowmm_config cfg = COWMM_CONFIG_INIT;
	struct slot_mover m[2] = { { .seed = 1 }, { .seed = 2 } };
	struct store_loop w = { 0 };
	struct timespec t0, t1, end;
	double took, worst = 0;
	cowmm_snap_t *s;
	cowmm_region_t *r;
	cowmm_t *mm = NULL;
	pthread_t th[2], wt;
	unsigned char *a;
	int ret, i, k, n = 0;

	cfg.flags = COWMM_OPEN_IN_THREAD;
	ck_assert_int_eq(cowmm_open(&cfg, &mm), 0);
	a = t_filled_region(mm, STILL + 2 * MOVING, &r);
	for (i = 0; i < 2; i++) {
		m[i].slots = reserve(NSLOTS * T_PAGE);
		for (k = 0; k < MOVING; k++) {
			unsigned char *to = m[i].slots + k * T_PAGE;

			ck_assert_ptr_eq(mremap(a + (STILL + MOVING * i + k) *
							    T_PAGE,
						T_PAGE, T_PAGE,
						MREMAP_MAYMOVE | MREMAP_FIXED,
						to),
					 to);
			m[i].at[k] = k;
			m[i].taken[k] = 1;
		}
	}
	w.p = a;
	ck_assert_int_eq(pthread_create(&wt, NULL, store_cycle_main, &w), 0);
	for (i = 0; i < 2; i++)
		ck_assert_int_eq(pthread_create(&th[i], NULL, slot_mover_main,
						&m[i]),
				 0);
	clock_gettime(CLOCK_MONOTONIC, &end);
	end.tv_sec += 4;
	do {
		clock_gettime(CLOCK_MONOTONIC, &t0);
		ret = cowmm_snapshot(r, &s);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		ck_assert_msg(ret == 0 || ret == -ENOENT, "cowmm_snapshot: %d",
			      ret);
		if (!ret)
			cowmm_snap_release(s);
		took = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
		worst = took > worst ? took : worst;
		n++;
		usleep(100000);
	} while (worst < 10 && (t1.tv_sec < end.tv_sec ||
				(t1.tv_sec == end.tv_sec &&
				 t1.tv_nsec < end.tv_nsec)));
	for (i = 0; i < 2; i++) {
		atomic_store(&m[i].stop, true);
		pthread_join(th[i], NULL);
	}
	atomic_store(&w.stop, true);
	pthread_join(wt, NULL);
	ck_assert_msg(worst < 10,
		      "a snapshot took %.1f s while pages moved (%lu, %lu "
		      "moves; %d snapshots; %lu stores)",
		      worst, atomic_load(&m[0].moves),
		      atomic_load(&m[1].moves), n, atomic_load(&w.stores));
	for (i = 0; i < 2; i++)
		for (k = 0; k < MOVING; k++)
			ck_assert_msg(page_is(m[i].slots + m[i].at[k] * T_PAGE,
					      STILL + MOVING * i + k + 1),
				      "page %d moved around holds other bytes",
				      STILL + MOVING * i + k);
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * Two managers.  A thread keeps storing to A, where the first manager's
 * page is, write-protected; the main thread moves that page away and the
 * second manager's page, which its snapshot shares, to A, and both back
 * (MREMAP_DONTUNMAP: every address stays mapped, every store is the
 * application's right).  With two workers, a write fault took its count
 * of moves after another worker had read the move away but not followed
 * it: the layout still put the page at A, no move was read since the
 * count, and clearing the protection at A cleared the second manager's:
 * its snapshot read zeros (the fourteenth session's outside review,
 * foreign_wp: 1-25 times in 3,000 rounds, 5 runs of 5).
 */
START_TEST(test_fault_moved_foreign_two_workers)
{
	cowmm_t *mm = t_open_fa(2, 1), *mm2 = t_open_fa(1, 1);
	unsigned char *a, *b, *c, buf[T_PAGE];
	struct t_store_loop w;
	cowmm_region_t *r1, *r2;
	cowmm_snap_t *s1, *s2;
	struct timespec t0, t1;
	int it, bad = 0;
	pthread_t th;
	long want;

	ck_assert_int_eq(cowmm_region_alloc(mm, T_PAGE, 0, &r1), 0);
	ck_assert_int_eq(cowmm_region_alloc(mm2, T_PAGE, 0, &r2), 0);
	a = cowmm_region_base(r1);
	c = cowmm_region_base(r2);
	b = reserve(T_PAGE);
	memset(a, 1, T_PAGE);
	memset(c, 2, T_PAGE);
	w = (struct t_store_loop){ .at = (volatile long *)a };
	ck_assert_int_eq(pthread_create(&th, NULL, t_store_loop_main, &w),
			 0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (it = 0; it < 3000; it++) {
		ck_assert_int_eq(cowmm_snapshot(r1, &s1), 0);
		cowmm_snap_release(s1); /* the page stays protected */
		want = *(volatile long *)c;
		ck_assert_int_eq(cowmm_snapshot(r2, &s2), 0);
		ck_assert_ptr_eq(mremap(a, T_PAGE, T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED |
						MREMAP_DONTUNMAP,
					b),
				 b);
		ck_assert_ptr_eq(mremap(c, T_PAGE, T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED |
						MREMAP_DONTUNMAP,
					a),
				 a);
		ck_assert_ptr_eq(mremap(a, T_PAGE, T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED |
						MREMAP_DONTUNMAP,
					c),
				 c);
		ck_assert_ptr_eq(mremap(b, T_PAGE, T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED |
						MREMAP_DONTUNMAP,
					a),
				 a);
		if (cowmm_snap_read(s2, 0, buf, T_PAGE) != T_PAGE ||
		    memcmp(buf, &want, sizeof(want)))
			bad++;
		cowmm_snap_release(s2);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		if (t1.tv_sec - t0.tv_sec > 10)
			break;
	}
	__atomic_store_n(&w.stop, true, __ATOMIC_RELAXED);
	pthread_join(th, NULL);
	ck_assert_msg(!bad,
		      "the second manager's snapshot read other bytes %d "
		      "times in %d rounds",
		      bad, it);
	ck_assert_int_eq(cowmm_region_release(r1), 0);
	ck_assert_int_eq(cowmm_region_release(r2), 0);
	cowmm_close(mm2);
	cowmm_close(mm);
	munmap(b, T_PAGE);
}
END_TEST

START_TEST(test_adopt_where_move_left)
{
	adopt_where_move_left(false);
}
END_TEST

START_TEST(test_adopt_where_move_left_early)
{
	adopt_where_move_left(true);
}
END_TEST


/* ------------------------------------------------------------------------ */
/* Item 8: with swap configured, no reader blocks on the library's fd. */

#define SWAPFILE "/var/tmp/cowmm-test-exact.swap"

static bool swap_on(void)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd),
		 "rm -f %s && fallocate -l 64M %s && chmod 600 %s && "
		 "mkswap %s >/dev/null",
		 SWAPFILE, SWAPFILE, SWAPFILE, SWAPFILE);
	if (system(cmd) != 0)
		return false;
	if (swapon(SWAPFILE, 0)) {
		printf("exact/swap: swapon %s refused: %s\n", SWAPFILE,
		       strerror(errno));
		unlink(SWAPFILE);
		return false;
	}
	return true;
}

static void swap_off(void)
{
	swapoff(SWAPFILE);
	unlink(SWAPFILE);
}

static void *clone_touch_main(void *arg)
{
	struct writer *w = arg;

	(void)*w->p;
	atomic_store(&w->done, true);
	return NULL;
}

/*
 * Make the next REMOVE wait: a helper holds @x's lock and part of @x is
 * moved, so its REMAP waits for the lock and every discard read after it
 * waits for the REMAP (events are handled in order).  hold_end() lets go.
 */
static void moves_pending(cowmm_region_t *x, unsigned char *xp,
			  struct hold *h)
{
	unsigned char *to = reserve(4 * T_PAGE);

	hold_start(h, &x->lock, 300);
	ck_assert_ptr_eq(mremap(xp + 4 * T_PAGE, 4 * T_PAGE, 4 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, to),
			 to);
}

/*
 * A clone's page, filled, shared with a snapshot of the clone, then
 * discarded: the discard's event stays pending (it waits behind a move of
 * another region, whose lock a helper holds).  A touch then must not refill
 * the page with a protected zero that the snapshot would read as its own
 * bytes until the discard breaks it: the snapshot reads -EIO, never zeros.
 */
START_TEST(test_clone_refill_discard_pending)
{
	cowmm_t *mm = t_open_fa(2, 1);
	cowmm_region_t *r, *c, *x;
	cowmm_snap_t *s;
	unsigned char *q, *xp, buf[T_PAGE];
	struct writer w = { 0 };
	struct hold h;
	pthread_t th;

	t_filled_region(mm, NPAGES, &r);
	xp = t_filled_region(mm, 16, &x);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert(page_is(q, 1)); /* filled */
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0);

	moves_pending(x, xp, &h);
	ck_assert_int_eq(madvise(q, T_PAGE, MADV_DONTNEED), 0);
	w.p = q;
	ck_assert_int_eq(pthread_create(&th, NULL, clone_touch_main, &w), 0);
	usleep(50000); /* the touch, resolved if it is let through */
	ck_assert_int_eq(cowmm_snap_read(s, 0, buf, T_PAGE), -EIO);
	hold_end(&h);
	pthread_join(th, NULL);
	ck_assert(zero_page((const unsigned char *)q));
	cowmm_close(mm);
}
END_TEST

/*
 * A page of a lazy load, not loaded yet, discarded: it reads zero, also
 * when it is touched before the discard's event is handled (the model
 * tester's long run: the file's bytes came in instead).
 */
START_TEST(test_lazy_touch_discard_pending)
{
	cowmm_t *mm = t_open_fa(2, 1);
	cowmm_region_t *r, *l, *x;
	cowmm_snap_t *s;
	unsigned char *q, *xp;
	struct writer w = { 0 };
	struct hold h;
	char path[] = "cowmm-exact-XXXXXX";
	int fd = mkstemp(path);
	pthread_t th;

	ck_assert_int_ge(fd, 0);
	unlink(path);
	t_filled_region(mm, NPAGES, &r);
	xp = t_filled_region(mm, 16, &x);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE,
					    COWMM_REGION_NOTHP, &l),
			 0);
	ck_assert_int_eq(cowmm_region_load(l, fd, COWMM_LOAD_LAZY), 0);
	q = cowmm_region_base(l);

	moves_pending(x, xp, &h);
	ck_assert_int_eq(madvise(q, T_PAGE, MADV_DONTNEED), 0);
	w.p = q;
	ck_assert_int_eq(pthread_create(&th, NULL, clone_touch_main, &w), 0);
	usleep(50000);
	hold_end(&h);
	pthread_join(th, NULL);
	ck_assert_msg(zero_page(q), "a discarded page not loaded yet came in "
				    "from the file");
	ck_assert(page_is(q + T_PAGE, 2));
	close(fd);
	cowmm_close(mm);
}
END_TEST

/*
 * An adopted region is released while part of it moves: the move is read
 * while release waits for the region's lock, and handled once release
 * marked the region dying.  The move was not followed for a dying region,
 * so the unmap of the range the pages left, which mremap() sends after
 * the move, found them there and broke every snapshot (the second outside
 * review: 19 of 20 iterations).  Release must keep them whole.
 */
struct release_call {
	cowmm_region_t *r;
	int ret;
};

static void *release_thread(void *arg)
{
	struct release_call *c = arg;

	c->ret = cowmm_region_release(c->r);
	return NULL;
}

START_TEST(test_release_while_moved)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE);
	struct release_call c = { 0 };
	cowmm_snap_t *s;
	struct hold h;
	pthread_t th;
	size_t pg;

	p = mmap(NULL, NPAGES * T_PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	for (pg = 0; pg < NPAGES; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, NPAGES * T_PAGE, 0, &c.r),
			 0);
	ck_assert_int_eq(cowmm_snapshot(c.r, &s), 0);

	hold_start(&h, &c.r->lock, 100);
	ck_assert_int_eq(pthread_create(&th, NULL, release_thread, &c), 0);
	usleep(30 * 1000); /* it waits for the region's lock */
	ck_assert_ptr_eq(mremap(p + 16 * T_PAGE, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, to),
			 to);
	hold_end(&h);
	pthread_join(th, NULL);
	ck_assert_int_eq(c.ret, 0);
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	t_assert_snap_filled(s, NPAGES);
	t_assert_live_filled(to - 16 * T_PAGE, 16, 16, 0, 0);
	cowmm_snap_release(s);
	cowmm_close(mm);
	munmap(p, 16 * T_PAGE);
	munmap(p + 32 * T_PAGE, (NPAGES - 32) * T_PAGE);
	munmap(to, 16 * T_PAGE);
}
END_TEST

static uintptr_t remap_found_from;

static void sleep_in_remap(uintptr_t from, size_t len)
{
	(void)len;
	if (from == remap_found_from)
		usleep(200 * 1000); /* the release goes on meanwhile */
}

/*
 * A move of a region's pages followed while the region is released: the
 * worker found the region in the table before the release took it out,
 * and locked it after the release let it go.  It put the freed region
 * back in the table, where it stayed: memory later mapped where the pages
 * went could not be adopted (-EEXIST), and the next event there would
 * have locked freed memory (the model, seed 20 in TSan: alloc refused).
 */
START_TEST(test_release_move_late)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(4 * T_PAGE), *q;
	struct release_call c = { 0 };
	struct move_call mv;
	cowmm_region_t *a;
	pthread_t th, rel;
	struct hold h;

	p = t_filled_region(mm, NPAGES, &c.r);
	remap_found_from = (uintptr_t)p + 8 * T_PAGE;
	__atomic_store_n(&cowmm__remap_found, sleep_in_remap,
			 __ATOMIC_RELEASE);
	hold_start(&h, &c.r->lock, 100);
	/* The release waits for the lock, its events waited for already. */
	ck_assert_int_eq(pthread_create(&rel, NULL, release_thread, &c), 0);
	usleep(20 * 1000);
	mv = (struct move_call){ p + 8 * T_PAGE, to, 4 * T_PAGE };
	ck_assert_int_eq(pthread_create(&th, NULL, move_thread, &mv), 0);
	pthread_join(th, NULL);
	hold_end(&h);
	pthread_join(rel, NULL);
	__atomic_store_n(&cowmm__remap_found, NULL, __ATOMIC_RELEASE);
	ck_assert_int_eq(c.ret, 0);

	/* The region unmapped its pages where they were: map new memory. */
	q = mmap(to, 4 * T_PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	ck_assert_ptr_eq(q, to);
	memset(q, 0x5a, 4 * T_PAGE);
	ck_assert_int_eq(cowmm_region_adopt(mm, q, 4 * T_PAGE, 0, &a), 0);
	q[0] = 0x11;
	ck_assert_int_eq(q[0], 0x11);
	ck_assert_int_eq(q[T_PAGE], 0x5a);
	ck_assert_int_eq(cowmm_region_release(a), 0);
	cowmm_close(mm);
	munmap(to, 4 * T_PAGE);
}
END_TEST

/*
 * Releasing a region with a snapshot preserves only the pages it ever
 * populated: the others become zero without being read (cowmm.h), and
 * adopted memory, which stays the application's, keeps them unpopulated.
 * A release read every empty page of a sparse region instead (mapping the
 * zero page there), since pagemap shows a protected empty page (a uffd-wp
 * marker) with PM_SWAP set on 6.18, and only entries without it were
 * taken for markers (the twenty-second review's sparse: 1 GiB with 16
 * pages written took 1.2-3.7 s).
 */
START_TEST(test_release_sparse_reads_written)
{
	cowmm_t *mm = t_open_fa(1, 1);
	const size_t npages = 4096;
	unsigned char buf[T_PAGE], *vec = malloc(npages);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	size_t i, in = 0;

	p = mmap(NULL, npages * T_PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	madvise(p, npages * T_PAGE, MADV_NOHUGEPAGE);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, npages * T_PAGE, 0, &r), 0);
	for (i = 0; i < 4; i++)
		t_fill_page(p + i * 1000 * T_PAGE, i + 1);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_int_eq(mincore(p, npages * T_PAGE, vec), 0);
	for (i = 0; i < npages; i++)
		in += vec[i] & 1;
	ck_assert_msg(in == 4,
		      "%zu pages of %zu mapped after the release, 4 written",
		      in, npages);
	for (i = 7; i < npages; i += 333) { /* none written */
		ck_assert_int_eq(cowmm_snap_read(s, i * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert(zero_page(buf));
	}
	for (i = 0; i < 4; i++) {
		ck_assert_int_eq(cowmm_snap_read(s, i * 1000 * T_PAGE, buf,
						 T_PAGE),
				 T_PAGE);
		ck_assert(page_is(buf, i + 1));
	}
	cowmm_snap_release(s);
	cowmm_close(mm);
	munmap(p, npages * T_PAGE);
	free(vec);
}
END_TEST

/*
 * An adopted region is released while one of its pages moves away with
 * MREMAP_DONTUNMAP, the move's event not read yet (workers read nothing
 * for 200 ms).  The release found the page not resident where its layout
 * put it (the empty range the move left) and gave the snapshot zeros for
 * it, as for a page never populated: the snapshot read zeros with no
 * error (the twenty-first outside review's relmin: 1-6 of 30 iterations,
 * 5 of 5 runs, snapshots, clones and views alike).  @dontunmap false:
 * plain MREMAP_FIXED, with other memory mapped where the page was before
 * the event is read, as another thread may.
 */
static void release_move_unread(bool dontunmap)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(T_PAGE), want[T_PAGE], buf[T_PAGE];
	struct move_call mv;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char vec;
	pthread_t th;
	size_t pg;

	p = mmap(NULL, 8 * T_PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	for (pg = 0; pg < 8; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, 8 * T_PAGE, 0, &r), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);

	mv = (struct move_call){ p + 3 * T_PAGE, to, T_PAGE,
				 dontunmap ? MREMAP_DONTUNMAP : 0 };
	cowmm__pause_reads(mm, 200);
	ck_assert_int_eq(pthread_create(&th, NULL, move_thread, &mv), 0);
	/* The page has left (mincore fails on a hole) before the release. */
	while (!dontunmap ? !mincore(p + 3 * T_PAGE, T_PAGE, &vec)
			  : mincore(to, T_PAGE, &vec) || !(vec & 1))
		usleep(1000);
	if (!dontunmap) /* other memory where the page was */
		ck_assert_ptr_ne(mmap(p + 3 * T_PAGE, T_PAGE, PROT_NONE,
				      MAP_PRIVATE | MAP_ANONYMOUS |
					      MAP_FIXED_NOREPLACE,
				      -1, 0),
				 MAP_FAILED);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	pthread_join(th, NULL);

	t_fill_page(want, 4);
	ck_assert_int_eq(memcmp(to, want, T_PAGE), 0);
	ck_assert_int_eq(cowmm_snap_read(s, 3 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert_msg(!memcmp(buf, want, T_PAGE),
		      "the snapshot's page 3 reads %#x.. after a release "
		      "while it moved",
		      buf[0]);
	t_assert_snap_filled(s, 8);
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	cowmm_snap_release(s);
	cowmm_close(mm);
	munmap(p, 8 * T_PAGE);
	munmap(to, T_PAGE);
}

START_TEST(test_release_move_unread_dontunmap)
{
	release_move_unread(true);
}
END_TEST

START_TEST(test_release_move_unread_replaced)
{
	release_move_unread(false);
}
END_TEST

/*
 * Pages of a region loaded lazily (every page in, the load not finished)
 * move, their event not read yet, when a snapshot ends the load.  It used
 * to register the region for write-protect faults only again, with the
 * layout from before the move: the moved pages stayed registered for
 * missing faults, in a region no longer loading, and a page of them
 * discarded then faulted for ever (a missing fault nobody resolved; the
 * model tester's seed 63426 hung).  Now the region stays registered for
 * missing faults: the discarded page must read zero, at once.
 */
START_TEST(test_lazy_finish_moved)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *q, *to = reserve(4 * T_PAGE);
	struct snap_call c = { 0 };
	char path[] = "cowmm-exact-XXXXXX";
	int fd = mkstemp(path);
	struct move_call mv;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	pthread_t th;

	ck_assert_int_ge(fd, 0);
	unlink(path);
	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE,
					    COWMM_REGION_NOTHP, &c.r),
			 0);
	ck_assert_int_eq(cowmm_region_load(c.r, fd, COWMM_LOAD_LAZY), 0);
	q = cowmm_region_base(c.r);
	t_assert_live_filled(q, 0, NPAGES, 0, 0); /* every page in */

	/* moved, its event not read yet (the workers read nothing for 25 ms) */
	mv = (struct move_call){ q, to, 4 * T_PAGE };
	cowmm__pause_reads(mm, 25);
	ck_assert_int_eq(pthread_create(&th, NULL, move_thread, &mv), 0);
	usleep(20 * 1000);
	c.ret = cowmm_snapshot(c.r, &c.s);
	pthread_join(th, NULL);
	ck_assert_int_eq(c.ret, 0);
	t_assert_snap_filled(c.s, NPAGES);
	cowmm_snap_release(c.s);
	ck_assert_int_eq(madvise(to + T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	ck_assert(zero_page(to + T_PAGE));
	ck_assert(page_is(to + 2 * T_PAGE, 3));
	close(fd);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

#ifndef __SANITIZE_ADDRESS__ /* see its entry below */
static struct {
	unsigned char *a, *q, *f;
	bool done;
} move_in;

/* Page 3 leaves @a for @f, and page 9 moves from @q to @a. */
static void move_other_in(uintptr_t addr)
{
	if (addr != (uintptr_t)move_in.a || move_in.done)
		return;
	move_in.done = true;
	ck_assert_ptr_eq(mremap(move_in.a, T_PAGE, T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, move_in.f),
			 move_in.f);
	ck_assert_ptr_eq(mremap(move_in.q, T_PAGE, T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, move_in.a),
			 move_in.a);
}

/*
 * A lazy load fills page 3 (a snapshot ends the load) while, right after
 * its check for moves, page 3 moves away and page 9, not loaded either,
 * moves to where page 3 was.  The kernel takes the fill once those moves
 * are read: it went into page 9, the fill of page 9 then found a page
 * there (-EEXIST) and took it for loaded, and page 9 read page 3's bytes
 * for good, in the region and its snapshot (the twenty-third review's
 * lazymv: 1-2 iterations of 15 with two threads moving pages).  The fill
 * must land only where no move read meanwhile touched.
 */
START_TEST(test_lazy_fill_other_moved_in)
{
	cowmm_t *mm = t_open_fa(1, 1);
	char path[] = "cowmm-exact-XXXXXX";
	int fd = mkstemp(path);
	unsigned char buf[T_PAGE], *p;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	size_t pg;

	ck_assert_int_ge(fd, 0);
	unlink(path);
	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_load(r, fd, COWMM_LOAD_LAZY), 0);
	move_in.a = p + 3 * T_PAGE;
	move_in.q = p + 9 * T_PAGE;
	move_in.f = reserve(T_PAGE);
	move_in.done = false;
	__atomic_store_n(&cowmm__lazy_filling, move_other_in,
			 __ATOMIC_RELEASE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0); /* loads the rest */
	__atomic_store_n(&cowmm__lazy_filling, NULL, __ATOMIC_RELEASE);
	ck_assert(move_in.done);
	ck_assert_msg(page_is(move_in.a, 10),
		      "page 9, moved where page 3 was, holds other bytes "
		      "(first %#x)",
		      move_in.a[0]);
	ck_assert(page_is(move_in.f, 4));
	for (pg = 0; pg < NPAGES; pg++) {
		ck_assert_int_eq(cowmm_snap_read(s, pg * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert_msg(page_is(buf, pg + 1),
			      "page %zu of the snapshot holds other bytes", pg);
	}
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	cowmm_snap_release(s);
	close(fd);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST
#endif

/*
 * A region loaded lazily stays registered for missing faults.  A page of
 * it discarded, then protected by a snapshot, holds a uffd-wp marker: it
 * reads zero.  With swap configured, such an entry could be a page
 * swapped out, so the snapshot read the live page, which in a range
 * registered for missing faults cannot be read without a fault: the read
 * waited 10 s for an event that never came and said -EIO (the model's
 * seed 675075792 under swap, 20 s and more in one snapshot read).  The
 * marker is told from a swapped-out page by its pagemap entry now.  Runs
 * with and without swap (the swap suite runs it with).
 */
START_TEST(test_lazy_discarded_marker_read)
{
	cowmm_t *mm = t_open_fa(1, 1);
	char path[] = "cowmm-exact-XXXXXX";
	int fd = mkstemp(path);
	unsigned char buf[T_PAGE], *p;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	size_t pg;

	ck_assert_int_ge(fd, 0);
	unlink(path);
	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_load(r, fd, COWMM_LOAD_LAZY), 0);
	p = cowmm_region_base(r);
	t_assert_live_filled(p, 0, NPAGES, 0, 0); /* every page in */
	ck_assert_int_eq(madvise(p + 5 * T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	cowmm__wait_events(mm);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_read(s, 5 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert(zero_page(buf));
	for (pg = 0; pg < NPAGES; pg++)
		if (pg != 5) {
			ck_assert_int_eq(cowmm_snap_read(s, pg * T_PAGE, buf,
							 T_PAGE),
					 T_PAGE);
			ck_assert(page_is(buf, pg + 1));
		}
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	cowmm_snap_release(s);
	close(fd);
	cowmm_close(mm);
}
END_TEST

/*
 * An adopted region still loading lazily is released while one of its
 * pages not loaded yet moves (MREMAP_DONTUNMAP), the move not read yet
 * (the workers read nothing for 100 ms): every fill meanwhile fails with
 * -EAGAIN.  The release went on regardless, and the application was left
 * with zeros where its pages were (the twenty-second review's lazyrel:
 * 64-199 pages of 256 zero).  It must load every page first, the moved one
 * where it went.
 */
START_TEST(test_release_lazy_moving)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(T_PAGE);
	char path[] = "cowmm-exact-XXXXXX";
	int fd = mkstemp(path);
	struct move_call mv;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	pthread_t th;
	size_t pg;

	ck_assert_int_ge(fd, 0);
	unlink(path);
	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	p = mmap(NULL, NPAGES * T_PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	madvise(p, NPAGES * T_PAGE, MADV_NOHUGEPAGE);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, NPAGES * T_PAGE, 0, &r), 0);
	ck_assert_int_eq(cowmm_region_load(r, fd, COWMM_LOAD_LAZY), 0);

	mv = (struct move_call){ p + 5 * T_PAGE, to, T_PAGE,
				 MREMAP_DONTUNMAP };
	cowmm__pause_reads(mm, 100);
	ck_assert_int_eq(pthread_create(&th, NULL, move_thread, &mv), 0);
	usleep(20 * 1000);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	pthread_join(th, NULL);
	for (pg = 0; pg < NPAGES; pg++)
		ck_assert_msg(page_is(pg == 5 ? to : p + pg * T_PAGE, pg + 1),
			      "page %zu: not the file's after the release "
			      "(first byte %#x)",
			      pg, (pg == 5 ? to : p + pg * T_PAGE)[0]);
	close(fd);
	cowmm_close(mm);
	munmap(p, NPAGES * T_PAGE);
	munmap(to, T_PAGE);
}
END_TEST

/*
 * The model tester's snapshots of lazily loaded regions that returned
 * -ENOENT while part of them moved (seeds 201325, 300754, 301234): the
 * snapshot ended the load by unregistering each run of the region and
 * registering it again for write-protect faults alone.  Pages moved in
 * between left a range registered with no userfaultfd, so the kernel sent
 * no event: the layout kept them where they were, every later protect
 * found a hole there, and the moved pages were written with nothing
 * copied for snapshots.  The move here lands right after the library
 * unregistered part of the region, if it ever does; else right after the
 * snapshot.  Either way it is followed.
 */
static struct {
	unsigned char *from, *to;
	size_t len;
	bool moved;
} unreg_move;

static void move_when_unregistered(uintptr_t start, size_t len)
{
	if (unreg_move.moved || (uintptr_t)unreg_move.from < start ||
	    (uintptr_t)unreg_move.from + unreg_move.len > start + len)
		return;
	unreg_move.moved = mremap(unreg_move.from, unreg_move.len,
				  unreg_move.len, MREMAP_MAYMOVE | MREMAP_FIXED,
				  unreg_move.to) == unreg_move.to;
}

START_TEST(test_lazy_finish_moved_unregistered)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *q, *to = reserve(4 * T_PAGE);
	char path[] = "cowmm-exact-XXXXXX";
	int fd = mkstemp(path), ret;
	cowmm_region_t *r, *l;
	cowmm_snap_t *s, *ls;

	ck_assert_int_ge(fd, 0);
	unlink(path);
	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE,
					    COWMM_REGION_NOTHP, &l),
			 0);
	ck_assert_int_eq(cowmm_region_load(l, fd, COWMM_LOAD_LAZY), 0);
	q = cowmm_region_base(l);
	t_assert_live_filled(q, 0, NPAGES, 0, 0); /* every page in */

	unreg_move.from = q + 4 * T_PAGE;
	unreg_move.to = to;
	unreg_move.len = 4 * T_PAGE;
	__atomic_store_n(&cowmm__unregistered, move_when_unregistered,
			 __ATOMIC_RELEASE);
	ret = cowmm_snapshot(l, &ls);
	__atomic_store_n(&cowmm__unregistered, NULL, __ATOMIC_RELEASE);
	ck_assert_msg(ret == 0, "snapshot with pages moved: %d (%s)", ret,
		      cowmm_strerror(ret));
	if (!unreg_move.moved)
		ck_assert_ptr_eq(mremap(q + 4 * T_PAGE, 4 * T_PAGE, 4 * T_PAGE,
					MREMAP_MAYMOVE | MREMAP_FIXED, to),
				 to);
	/* The moved pages are the region's: written, they copy for @ls. */
	memset(to, 0xee, 4 * T_PAGE);
	memset(q, 0xee, T_PAGE);
	t_assert_snap_filled(ls, NPAGES);
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	ck_assert_int_eq(madvise(to + T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	ck_assert(zero_page(to + T_PAGE)); /* and reads zero, no hang */
	cowmm_snap_release(ls);
	cowmm_snap_release(s);
	close(fd);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * A clone's page, materialised and shared with a snapshot of the clone,
 * is discarded by another thread while a write fault copies it for that
 * snapshot: the discard's REMOVE is read by the second worker and the page
 * zapped right before the copy reads it (the test hook), so the read
 * finds it missing.  The copy took that for a page discarded long ago and
 * gave the snapshot zeros, silently.  The snapshot must read the page's
 * bytes or -EIO (the discard broke it), never zeros.  The same holds for a
 * region loaded lazily, handled as such a clone once its load is over.
 */
static unsigned char *zap_at;

static void zap_when_checked(uintptr_t addr)
{
	unsigned char *p;

	if (addr != (uintptr_t)__atomic_load_n(&zap_at, __ATOMIC_ACQUIRE))
		return;
	p = __atomic_exchange_n(&zap_at, NULL, __ATOMIC_ACQ_REL);
	/* returns once the other worker read its REMOVE: zapped then */
	if (p)
		ck_assert_int_eq(madvise(p, T_PAGE, MADV_DONTNEED), 0);
}

static void discard_while_copied(cowmm_t *mm, cowmm_region_t *c)
{
	unsigned char *q = cowmm_region_base(c), buf[T_PAGE];
	cowmm_snap_t *s;
	ssize_t got;

	memset(q + 5 * T_PAGE, 0x77, T_PAGE); /* materialised, if a clone */
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0);
	__atomic_store_n(&zap_at, q + 5 * T_PAGE, __ATOMIC_RELEASE);
	__atomic_store_n(&cowmm__read_checked, zap_when_checked,
			 __ATOMIC_RELEASE);
	q[5 * T_PAGE] = 0x11; /* its fault copies the page for @s */
	__atomic_store_n(&cowmm__read_checked, NULL, __ATOMIC_RELEASE);
	ck_assert_msg(!__atomic_load_n(&zap_at, __ATOMIC_ACQUIRE),
		      "the copy never checked the page");
	got = cowmm_snap_read(s, 5 * T_PAGE, buf, T_PAGE);
	if (got == -EIO) {
		ck_assert_uint_ge(t_stats(mm).broken, 1);
	} else {
		ck_assert_int_eq(got, T_PAGE);
		ck_assert_msg(buf[0] == 0x77 && buf[T_PAGE - 1] == 0x77,
			      "snapshot reads %#x where the page held 0x77",
			      buf[0]);
	}
	ck_assert_int_eq(q[5 * T_PAGE], 0x11);
	ck_assert_int_eq(q[5 * T_PAGE + 1], 0); /* discarded, then written */
	cowmm_snap_release(s);
}

START_TEST(test_clone_discard_while_copied)
{
	cowmm_t *mm = t_open_fa(2, 1);
	cowmm_region_t *r, *c;

	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, COWMM_REGION_NOTHP, &c), 0);
	discard_while_copied(mm, c);
	cowmm_close(mm);
}
END_TEST

START_TEST(test_lazy_discard_while_copied)
{
	cowmm_t *mm = t_open_fa(2, 1);
	char path[] = "cowmm-exact-XXXXXX";
	int fd = mkstemp(path);
	cowmm_region_t *r, *l;
	cowmm_snap_t *s, *first;

	ck_assert_int_ge(fd, 0);
	unlink(path);
	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE,
					    COWMM_REGION_NOTHP, &l),
			 0);
	ck_assert_int_eq(cowmm_region_load(l, fd, COWMM_LOAD_LAZY), 0);
	ck_assert_int_eq(cowmm_snapshot(l, &first), 0); /* the load ends */
	cowmm_snap_release(first);
	discard_while_copied(mm, l);
	close(fd);
	cowmm_close(mm);
}
END_TEST

/*
 * The model tester's seed 1006888: a page MADV_FREE left, shared with a
 * snapshot, dropped by the kernel (MADV_PAGEOUT) and written since without
 * a fault.  Protecting the region again (restore, or a newer snapshot)
 * looks for such pages before it protects; with a move of other pages of
 * the region read but not handled, it took the page for a placeholder's,
 * skipped it and protected it with its new bytes: the snapshot then
 * shared them, and restore left them in place, silently.  The move here
 * lands from a hook right before that walk.  Restore must give the page
 * the snapshot's bytes (zero: the kernel dropped it), or say -EIO.
 */
static struct {
	unsigned char *from, *to;
	bool done;
} walk_move;

static void move_when_walked(cowmm_region_t *r)
{
	(void)r;
	if (walk_move.done)
		return;
	walk_move.done = true;
	ck_assert_ptr_eq(mremap(walk_move.from, 8 * T_PAGE, 8 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, walk_move.to),
			 walk_move.to);
}

static void unseen_while_moving(bool restore)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *far = reserve(8 * T_PAGE), buf[T_PAGE];
	cowmm_snap_t *s, *s2 = NULL;
	cowmm_region_t *r;
	ssize_t got;
	int ret;

	p = t_filled_region(mm, NPAGES, &r);
	free_snap_pageout(mm, r, p + 5 * T_PAGE, 1, 0, &s);
	memset(p + 5 * T_PAGE, 0xee, T_PAGE); /* no fault: nothing protects */

	walk_move.from = p + 40 * T_PAGE;
	walk_move.to = far;
	walk_move.done = false;
	__atomic_store_n(&cowmm__walk_unseen, move_when_walked,
			 __ATOMIC_RELEASE);
	ret = restore ? cowmm_snap_restore(s) : cowmm_snapshot(r, &s2);
	__atomic_store_n(&cowmm__walk_unseen, NULL, __ATOMIC_RELEASE);
	ck_assert(walk_move.done);
	got = cowmm_snap_read(s, 5 * T_PAGE, buf, T_PAGE);
	if (restore && ret == -EIO) {
		ck_assert_int_eq(got, -EIO);
	} else {
		ck_assert_msg(ret == 0, "%s: %d", restore ? "restore" :
			      "snapshot", ret);
		ck_assert_msg(got == -EIO || zero_page(buf),
			      "the snapshot reads %#x where the kernel "
			      "dropped the page", buf[0]);
		if (restore && got != -EIO)
			ck_assert_msg(zero_page(p + 5 * T_PAGE),
				      "restore left %#x where the snapshot "
				      "reads zero", p[5 * T_PAGE]);
	}
	if (s2) {
		/* the newer snapshot holds the page as written */
		memset(p + 5 * T_PAGE, 0x33, T_PAGE);
		ck_assert_int_eq(cowmm_snap_read(s2, 5 * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert_int_eq(buf[0], 0xee);
		cowmm_snap_release(s2);
	}
	cowmm_snap_release(s);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}

START_TEST(test_restore_unseen_while_moving)
{
	unseen_while_moving(true);
}
END_TEST

START_TEST(test_snapshot_unseen_while_moving)
{
	unseen_while_moving(false);
}
END_TEST

/*
 * mremap() moves the pages, lets go of the address space, and only then
 * sends its event and waits for it to be read: in between, another thread
 * can map other memory where the pages were.  A page shared with a
 * snapshot, found there unprotected with no event read, was taken for one
 * the kernel dropped after MADV_FREE, and read as zero: the snapshot read
 * zeros, silently (a candidate for the model tester's seed 1002461).  It
 * must wait for the move and read the page where it went.
 */
START_TEST(test_read_foreign_before_move_read)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(16 * T_PAGE), *other, buf[T_PAGE];
	struct move_call mv;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	pthread_t th;

	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	mv = (struct move_call){ p + 16 * T_PAGE, to, 16 * T_PAGE };
	cowmm__pause_reads(mm, 40);
	ck_assert_int_eq(pthread_create(&th, NULL, move_thread, &mv), 0);
	usleep(20 * 1000); /* moved; its event waits to be read */
	other = mmap(p + 16 * T_PAGE, 16 * T_PAGE, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	ck_assert_ptr_eq(other, p + 16 * T_PAGE);
	ck_assert_int_eq(cowmm_snap_read(s, 20 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert_msg(page_is(buf, 21), "the snapshot reads %#x for page 20",
		      buf[0]);
	pthread_join(th, NULL);
	t_assert_snap_filled(s, NPAGES);
	cowmm_snap_release(s);
	munmap(other, 16 * T_PAGE);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * A discard of the region read but not handled when a lazy load starts
 * (session 10's outside review, F1: 112 of 200 runs): its handler ran
 * once the load was under way and took the discarded pages for pages of
 * the load, never loaded: they read zero, not the file's bytes.  The
 * discard came before the call: every page must read the file's.
 */
static int snapshot_file(cowmm_t *mm)
{
	char path[] = "cowmm-exact-XXXXXX";
	int fd = mkstemp(path);
	cowmm_region_t *src;
	cowmm_snap_t *s;

	ck_assert_int_ge(fd, 0);
	unlink(path);
	t_filled_region(mm, NPAGES, &src);
	ck_assert_int_eq(cowmm_snapshot(src, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(src), 0);
	return fd;
}

START_TEST(test_lazy_load_after_discard)
{
	cowmm_t *mm = t_open_fa(1, 1);
	int fd = snapshot_file(mm);
	cowmm_region_t *r;
	unsigned char *p;
	struct hold h;

	ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE,
					    COWMM_REGION_NOTHP, &r),
			 0);
	p = cowmm_region_base(r);
	memset(p, 0x42, NPAGES * T_PAGE);
	hold_start(&h, &r->lock, 50);
	ck_assert_int_eq(madvise(p + (NPAGES - 4) * T_PAGE, 4 * T_PAGE,
				 MADV_DONTNEED), 0);
	ck_assert_int_eq(cowmm_region_load(r, fd, COWMM_LOAD_LAZY), 0);
	hold_end(&h);
	t_assert_live_filled(p, 0, NPAGES, 0, 0);
	close(fd);
	cowmm_close(mm);
}
END_TEST

/*
 * The release of an adopted region loads what its lazy load has not yet
 * (F2 of the same review: 20 of 1,000): a discard of pages never loaded,
 * read but not handled, came first, so they must read zero afterwards,
 * not the file's bytes.
 */
/*
 * Adopt a region, load it lazily, discard pages 8..11 before they load
 * (the discard read, its handler held back), then end the region by
 * cowmm_close() (@close_mm) or cowmm_region_release(): those pages must read
 * zero, every other page the file's bytes.
 */
static void lazy_end_after_discard(bool close_mm)
{
	cowmm_t *mm = t_open_fa(1, 1);
	int fd = snapshot_file(mm);
	const char *how = close_mm ? "close" : "release";
	cowmm_region_t *r;
	unsigned char *p;
	struct hold h;
	size_t pg;

	p = mmap(NULL, NPAGES * T_PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, NPAGES * T_PAGE, 0, &r), 0);
	ck_assert_int_eq(cowmm_region_load(r, fd, COWMM_LOAD_LAZY), 0);
	hold_start(&h, &r->lock, 50);
	ck_assert_int_eq(madvise(p + 8 * T_PAGE, 4 * T_PAGE, MADV_DONTNEED),
			 0);
	if (close_mm)
		cowmm_close(mm);
	else
		ck_assert_int_eq(cowmm_region_release(r), 0);
	hold_end(&h);
	for (pg = 0; pg < NPAGES; pg++)
		if (pg >= 8 && pg < 12)
			ck_assert_msg(zero_page(p + pg * T_PAGE),
				      "page %zu discarded before the %s "
				      "reads %#x", pg, how, p[pg * T_PAGE]);
		else
			ck_assert(page_is(p + pg * T_PAGE, pg + 1));
	close(fd);
	if (!close_mm)
		cowmm_close(mm);
	munmap(p, NPAGES * T_PAGE);
}

START_TEST(test_release_lazy_after_discard)
{
	lazy_end_after_discard(false);
}
END_TEST

/*
 * cowmm_close() while a move of a region's pages is read but not handled
 * (the worker waits for the region's lock).  Close released the region
 * where its layout still put the pages: it unmapped whatever the
 * application had mapped where they were, and left the moved pages mapped
 * (found while looking into restore-claim-stale-layout's crash under ASan,
 * which the test's own move caused: reserve()).
 */
START_TEST(test_close_move_pending)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *far = reserve(16 * T_PAGE), *p, *mine;
	cowmm_region_t *r;
	struct hold h;
	size_t i;

	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	hold_start(&h, &r->lock, 100);
	ck_assert_ptr_eq(mremap(p + 8 * T_PAGE, 16 * T_PAGE, 16 * T_PAGE,
				MREMAP_MAYMOVE | MREMAP_FIXED, far),
			 far);
	while (!atomic_load(&mm->remaps_pending))
		usleep(100);
	/* The application's own memory where the pages were. */
	mine = mmap(p + 8 * T_PAGE, 16 * T_PAGE, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	ck_assert_ptr_eq(mine, p + 8 * T_PAGE);
	memset(mine, 0x5a, 16 * T_PAGE);
	cowmm_close(mm);
	hold_end(&h);
	ck_assert_msg(msync(mine, 16 * T_PAGE, MS_ASYNC) == 0,
		      "cowmm_close() unmapped the application's memory at "
		      "%p: %s", (void *)mine, strerror(errno));
	for (i = 0; i < 16 * T_PAGE; i++)
		ck_assert_int_eq(mine[i], 0x5a);
	ck_assert_msg(msync(far, 16 * T_PAGE, MS_ASYNC) == -1 &&
		      errno == ENOMEM,
		      "the moved pages at %p are still mapped after close",
		      (void *)far);
	munmap(mine, 16 * T_PAGE);
}
END_TEST

/*
 * cowmm_close() after a discard of pages a lazy load has not loaded, read
 * but not handled: like cowmm_region_release() (release-lazy-after-
 * discard), the close must not give them the file's bytes.
 */
START_TEST(test_close_lazy_after_discard)
{
	lazy_end_after_discard(true);
}
END_TEST

/*
 * The model tester's seed 610895645: the pages restore is about to copy
 * into move away, and another thread maps its own memory where they were
 * before the move's event is read (mremap() sends it only after it let go
 * of the address space).  Restore checked only that no move was read
 * since it protected the region: it wrote the snapshot's bytes into that
 * memory, left the moved pages as they were, and returned 0.  It must
 * restore the pages where they went and leave the other memory alone.
 */
static struct {
	unsigned char *from, *to, *other;
	size_t len;
	cowmm_t *mm;
	struct move_call mv;
	pthread_t th;
	bool armed;
	int stage;
} place_in;

static void move_and_place(cowmm_region_t *r, int stage, uintptr_t addr,
			   size_t len)
{
	unsigned char vec;

	(void)r;
	(void)addr;
	(void)len;
	if (stage != place_in.stage || !place_in.armed)
		return;
	place_in.armed = false;
	cowmm__pause_reads(place_in.mm, 40);
	place_in.mv = (struct move_call){ place_in.from, place_in.to,
					  place_in.len };
	ck_assert_int_eq(pthread_create(&place_in.th, NULL, move_thread,
					&place_in.mv), 0);
	while (!mincore(place_in.from, T_PAGE, &vec))
		usleep(100); /* moved: its event waits to be read */
	place_in.other = mmap(place_in.from, place_in.len,
			      PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
			      -1, 0);
	ck_assert_ptr_eq(place_in.other, place_in.from);
	memset(place_in.other, 0x5c, place_in.len);
}

/*
 * Restore @s while, at restore's @stage, the region's pages at @from move
 * to @to and other memory is mapped at @from before the move is read;
 * that memory must come out untouched.
 */
static void restore_while_placed(cowmm_t *mm, cowmm_snap_t *s,
				 unsigned char *from, unsigned char *to,
				 int stage)
{
	size_t i;

	place_in = (typeof(place_in)){ .from = from, .to = to,
				       .len = NPAGES * T_PAGE, .mm = mm,
				       .armed = true, .stage = stage };
	__atomic_store_n(&cowmm__restore_copying, move_and_place,
			 __ATOMIC_RELEASE);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	__atomic_store_n(&cowmm__restore_copying, NULL, __ATOMIC_RELEASE);
	ck_assert(!place_in.armed);
	pthread_join(place_in.th, NULL);
	for (i = 0; i < NPAGES * T_PAGE; i++)
		if (place_in.other[i] != 0x5c)
			ck_abort_msg("restore wrote into other memory at byte "
				     "%zu", i);
	munmap(place_in.other, NPAGES * T_PAGE);
}

START_TEST(test_restore_placed_before_move_read)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *p, *to = reserve(NPAGES * T_PAGE);
	cowmm_region_t *r;
	cowmm_snap_t *s;

	p = t_filled_region(mm, NPAGES, &r);
	p = lower(r, p, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	memset(p, 0xa5, NPAGES * T_PAGE); /* @s holds every page */
	restore_while_placed(mm, s, p, to, 2);
	t_assert_live_filled(to, 0, NPAGES, 0, 0);
	cowmm_snap_release(s);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * The model tester's seed 888: restore of a clone gives the clone of that
 * clone its copy of a page first, and the page's range moves, with other
 * memory mapped where it was before the move's event is read.  The copy
 * read a clone's materialised page wherever it could read it, and gave
 * the other memory's bytes to the second clone, silently.
 */
START_TEST(test_restore_claim_placed)
{
	cowmm_t *mm = t_open_fa(1, 1);
	unsigned char *q, *to = reserve(NPAGES * T_PAGE), *q2;
	volatile unsigned char sink = 0;
	cowmm_region_t *r, *c, *c2;
	cowmm_snap_t *s;
	size_t i;

	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = lower(c, cowmm_region_base(c), NPAGES);
	for (i = 0; i < NPAGES; i++)
		sink ^= q[i * T_PAGE]; /* every page materialised */
	(void)sink;
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0);
	memset(q, 0xa5, NPAGES * T_PAGE); /* @s holds every page */
	ck_assert_int_eq(cowmm_clone(c, 0, &c2), 0); /* reads 0xa5 */
	q2 = cowmm_region_base(c2);
	restore_while_placed(mm, s, q, to, 3);
	for (i = 0; i < NPAGES; i++)
		ck_assert_msg(q2[i * T_PAGE] == 0xa5 &&
			      q2[i * T_PAGE + T_PAGE - 1] == 0xa5,
			      "the clone's clone reads %#x on page %zu",
			      q2[i * T_PAGE], i);
	t_assert_live_filled(to, 0, NPAGES, 0, 0);
	cowmm_snap_release(s);
	cowmm_close(mm); /* unmaps the moved pages: the library's */
}
END_TEST

/*
 * The model tester's seed 4018336: restore into a clone fills a page the
 * clone never touched straight from the snapshot, and its origin kept
 * needing the source's page: a discard in the source then broke the
 * origin, and every page of the clone still reading from it would have
 * been lost.  The page came from the snapshot: the origin must let go.
 */
START_TEST(test_restore_clone_untouched)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r, *c;
	cowmm_snap_t *s;
	unsigned char *p, *q;

	p = t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert_int_eq(cowmm_pin(c, q + 5 * T_PAGE, T_PAGE, COWMM_PIN_WRITE),
			 0);
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0); /* copies page 5 */
	ck_assert_int_eq(cowmm_snap_restore(s), 0); /* fills page 5 */
	ck_assert_int_eq(cowmm_unpin(c, q + 5 * T_PAGE, T_PAGE), 0);
	ck_assert_int_eq(madvise(p + 5 * T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	cowmm__wait_events(mm);
	ck_assert_uint_eq(t_stats(mm).broken, 0);
	ck_assert(page_is(q + 5 * T_PAGE, 6));
	ck_assert(page_is(q + 6 * T_PAGE, 7)); /* still from the origin */
	cowmm_snap_release(s);
	cowmm_close(mm);
}
END_TEST

/*
 * A restore right after the application unmapped part of the region, the
 * UNMAP read but not handled yet: it must not write into the unmapped
 * pages (it crashed), and it restores the rest.
 */
START_TEST(test_restore_unmap_pending)
{
	cowmm_t *mm = t_open_fa(1, 1);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	struct hold h;
	size_t pg;

	ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE,
					    COWMM_REGION_NOTHP, &r),
			 0);
	p = cowmm_region_base(r);
	memset(p, 0x5a, NPAGES * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	memset(p, 0xa5, NPAGES * T_PAGE); /* @s holds every page */
	hold_start(&h, &r->lock, 300);
	ck_assert_int_eq(munmap(p + 7 * T_PAGE, 2 * T_PAGE), 0);
	ck_assert_int_eq(cowmm_snap_restore(s), 0);
	hold_end(&h);
	for (pg = 0; pg < NPAGES; pg++)
		if (pg != 7 && pg != 8)
			ck_assert_int_eq(p[pg * T_PAGE + 100], 0x5a);
	cowmm_close(mm);
}
END_TEST

START_TEST(test_swap_clone_discarded)
{
	cowmm_t *mm;
	cowmm_region_t *r, *c, *c2;
	cowmm_snap_t *s;
	unsigned char *q, buf[T_PAGE];
	struct writer w = { 0 };
	pthread_t th;
	int i;

	ck_assert_msg(swap_on(), "swapon refused: this case needs swap");
	mm = t_open_fa(1, 1);
	t_filled_region(mm, NPAGES, &r);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	q[3 * T_PAGE] ^= 1; /* filled ... */
	ck_assert_int_eq(madvise(q + 3 * T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	cowmm__quiesce(mm); /* ... and discarded */

	/* A clone of the clone reads that page through the clone. */
	ck_assert_int_eq(cowmm_clone(c, 0, &c2), 0);
	w.p = (unsigned char *)cowmm_region_base(c2) + 3 * T_PAGE;
	ck_assert_int_eq(pthread_create(&th, NULL, clone_touch_main, &w), 0);
	for (i = 0; i < 5000 && !atomic_load(&w.done); i++)
		usleep(1000);
	if (!atomic_load(&w.done)) {
		swap_off();
		ck_abort_msg("a first touch of a clone of a clone hangs");
	}
	pthread_join(th, NULL);
	ck_assert(zero_page((const unsigned char *)w.p));

	/* A snapshot of the clone reads it as zero. */
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0);
	ck_assert_int_eq(cowmm_snap_read(s, 3 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert(zero_page(buf));
	cowmm_close(mm);
	swap_off();
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "restore-discard-pending", test_restore_discard_pending,
		  T_WP_UNPOPULATED },
		{ "release-discard-pending", test_release_discard_pending,
		  T_WP_UNPOPULATED },
		{ "pinned-discard-pending", test_pinned_discard_pending,
		  T_WP_UNPOPULATED },
		{ "clone-discard-untouched", test_clone_discard_untouched,
		  T_WP_UNPOPULATED },
		{ "clone-snap-discard-pending", test_clone_snap_discard_pending,
		  T_WP_UNPOPULATED },
		{ "clone-origin-discarded", test_clone_origin_discarded,
		  T_WP_UNPOPULATED | T_POISON },
		{ "clone-origin-no-frame", test_clone_origin_no_frame,
		  T_WP_UNPOPULATED | T_POISON },
		{ "clone-origin-unmapped-protected",
		  test_clone_origin_unmapped_protected,
		  T_WP_UNPOPULATED | T_POISON },
		{ "clone-discard-both", test_clone_discard_both,
		  T_WP_UNPOPULATED },
		{ "clone-pinned-origin-lost", test_clone_pinned_origin_lost,
		  T_WP_UNPOPULATED },
		{ "free-dropped-written", test_free_dropped_written,
		  T_WP_UNPOPULATED },
		{ "discard-storm", test_discard_storm, T_WP_UNPOPULATED, 0,
		  180 },
		{ "clone-snapshots-untouched", test_clone_snapshots_untouched,
		  T_WP_UNPOPULATED },
		{ "view-broken", test_view_broken,
		  T_WP_UNPOPULATED | T_POISON },
		{ "release-discard-race", test_release_discard_race,
		  T_WP_UNPOPULATED | T_POISON, 0, 120 },
		{ "restore-discard-storm", test_restore_discard_storm,
		  T_WP_UNPOPULATED, 0, 120 },
		{ "clone-mremap-part", test_clone_mremap_part,
		  T_WP_UNPOPULATED },
		{ "region-mremap-part", test_region_mremap_part,
		  T_WP_UNPOPULATED },
		{ "view-discard", test_view_discard, T_WP_UNPOPULATED },
		{ "region-in-hole", test_region_in_hole, T_WP_UNPOPULATED },
		{ "unmap-pending-read", test_unmap_pending_read,
		  T_WP_UNPOPULATED },
		{ "region-mremap-follow", test_region_mremap_follow,
		  T_WP_UNPOPULATED },
		{ "view-after-move", test_view_after_move, T_WP_UNPOPULATED },
		{ "read-during-move", test_read_during_move, T_WP_UNPOPULATED },
		{ "read-placeholder-moved", test_read_placeholder_moved,
		  T_WP_UNPOPULATED },
		{ "read-moved-after-sampled", test_read_moved_after_sampled,
		  T_WP_UNPOPULATED },
		{ "read-moved-foreign-protected",
		  test_read_moved_foreign_protected, T_WP_UNPOPULATED },
		{ "restore-claim-foreign-protected",
		  test_restore_claim_foreign_protected, T_WP_UNPOPULATED },
		{ "remove-clone-origin-moved", test_remove_clone_origin_moved,
		  T_WP_UNPOPULATED },
		{ "remove-clone-origin-moved-away",
		  test_remove_clone_origin_moved_away, T_WP_UNPOPULATED },
		{ "remove-clone-origin-discarded",
		  test_remove_clone_origin_discarded, T_WP_UNPOPULATED },
		{ "release-clone-with-origin-page-in-it",
		  test_release_clone_with_origin_page_in_it, T_WP_UNPOPULATED },
		{ "remove-clone-other-discards",
		  test_remove_clone_other_discards, T_WP_UNPOPULATED },
		{ "remove-clone-then-move", test_remove_clone_then_move,
		  T_WP_UNPOPULATED },
		{ "remove-clone-then-move-onto",
		  test_remove_clone_then_move_onto, T_WP_UNPOPULATED },
		{ "read-checked-moved-unread", test_read_checked_moved_unread,
		  T_WP_UNPOPULATED },
		{ "fault-checked-moved-unread", test_fault_checked_moved_unread,
		  T_WP_UNPOPULATED },
		{ "fault-checked-moved-foreign",
		  test_fault_checked_moved_foreign, T_WP_UNPOPULATED },
		{ "fault-checked-moved-read-foreign",
		  test_fault_checked_moved_read_foreign, T_WP_UNPOPULATED },
		{ "restore-moved-while-checked",
		  test_restore_moved_while_checked, T_WP_UNPOPULATED },
		{ "snapshot-during-move-held", test_snapshot_during_move_held,
		  T_WP_UNPOPULATED },
		{ "snapshot-move-back-held", test_snapshot_move_back_held,
		  T_WP_UNPOPULATED },
		{ "restore-move-back-held", test_restore_move_back_held,
		  T_WP_UNPOPULATED },
		{ "restore-moved-away-0", test_restore_moved_away_0,
		  T_WP_UNPOPULATED },
		{ "restore-moved-away-1", test_restore_moved_away_1,
		  T_WP_UNPOPULATED },
		{ "restore-moved-away-2", test_restore_moved_away_2,
		  T_WP_UNPOPULATED },
		{ "restore-moved-over-0", test_restore_moved_over_0,
		  T_WP_UNPOPULATED },
		{ "restore-moved-over-1", test_restore_moved_over_1,
		  T_WP_UNPOPULATED },
		{ "restore-moved-over-2", test_restore_moved_over_2,
		  T_WP_UNPOPULATED },
		{ "clone-fill-moved-unread", test_clone_fill_moved_unread,
		  T_WP_UNPOPULATED | T_POISON },
		{ "restore-unmapped-remapped", test_restore_unmapped_remapped,
		  T_WP_UNPOPULATED },
		{ "restore-moved-newer-snapshot",
		  test_restore_moved_newer_snapshot, T_WP_UNPOPULATED },
		{ "restore-claim-stale-layout", test_restore_claim_stale_layout,
		  T_WP_UNPOPULATED },
		{ "restore-clone-moved-claiming",
		  test_restore_clone_moved_claiming, T_WP_UNPOPULATED },
		{ "restore-moved-claiming", test_restore_moved_claiming,
		  T_WP_UNPOPULATED },
		{ "snapshot-move-unread", test_snapshot_move_unread,
		  T_WP_UNPOPULATED },
		{ "snapshot-placed-before-move-read",
		  test_snapshot_placed_before_move_read, T_WP_UNPOPULATED },
		{ "alloc-where-pages-left", test_alloc_where_pages_left,
		  T_WP_UNPOPULATED },
		{ "snapshot-during-move", test_snapshot_during_move,
		  T_WP_UNPOPULATED },
		{ "pin-after-move", test_pin_after_move, T_WP_UNPOPULATED },
		{ "pin-across-move-unhandled", test_pin_across_move_unhandled,
		  T_WP_UNPOPULATED },
		{ "clone-refill-discard-pending",
		  test_clone_refill_discard_pending, T_WP_UNPOPULATED },
		{ "release-while-moved", test_release_while_moved,
		  T_WP_UNPOPULATED },
		{ "lazy-finish-moved", test_lazy_finish_moved,
		  T_WP_UNPOPULATED | T_POISON },
#ifndef __SANITIZE_ADDRESS__
		/*
		 * Not under ASan (gcc 12) yet: there the worker hung in 1 run
		 * of 4-6 on a missing fault taken inside ASan's hook of
		 * __tls_get_addr (DTLS_on_tls_get_addr), while the test's
		 * hook moved pages from the thread that holds the region's
		 * lock.  Not seen in the plain and TSan builds; open.
		 */
		{ "lazy-fill-other-moved-in", test_lazy_fill_other_moved_in,
		  T_WP_UNPOPULATED | T_POISON },
#endif
		{ "lazy-discarded-marker-read",
		  test_lazy_discarded_marker_read, T_WP_UNPOPULATED | T_POISON },
		{ "release-lazy-moving", test_release_lazy_moving,
		  T_WP_UNPOPULATED | T_POISON },
		{ "clone-discard-while-copied", test_clone_discard_while_copied,
		  T_WP_UNPOPULATED },
		{ "lazy-discard-while-copied", test_lazy_discard_while_copied,
		  T_WP_UNPOPULATED | T_POISON },
		{ "restore-unseen-while-moving",
		  test_restore_unseen_while_moving, T_WP_UNPOPULATED },
		{ "snapshot-unseen-while-moving",
		  test_snapshot_unseen_while_moving, T_WP_UNPOPULATED },
		{ "read-foreign-before-move-read",
		  test_read_foreign_before_move_read, T_WP_UNPOPULATED },
		{ "lazy-load-after-discard", test_lazy_load_after_discard,
		  T_WP_UNPOPULATED | T_POISON },
		{ "release-lazy-after-discard",
		  test_release_lazy_after_discard,
		  T_WP_UNPOPULATED | T_POISON },
		{ "close-move-pending", test_close_move_pending,
		  T_WP_UNPOPULATED },
		{ "close-lazy-after-discard", test_close_lazy_after_discard,
		  T_WP_UNPOPULATED | T_POISON },
		{ "restore-placed-before-move-read",
		  test_restore_placed_before_move_read, T_WP_UNPOPULATED },
		{ "restore-claim-placed", test_restore_claim_placed,
		  T_WP_UNPOPULATED },
		{ "restore-clone-untouched", test_restore_clone_untouched,
		  T_WP_UNPOPULATED },
		{ "lazy-finish-moved-unregistered",
		  test_lazy_finish_moved_unregistered,
		  T_WP_UNPOPULATED | T_POISON },
		{ "lazy-touch-discard-pending", test_lazy_touch_discard_pending,
		  T_WP_UNPOPULATED | T_POISON },
		{ "restore-unmap-pending", test_restore_unmap_pending,
		  T_WP_UNPOPULATED },
		{ "fault-around-zero", test_fault_around_zero,
		  T_WP_UNPOPULATED },
		{ "fault-error-wakes", test_fault_error_wakes,
		  T_WP_UNPOPULATED },
		{ "worker-errno-after-read", test_worker_errno_after_read,
		  T_WP_UNPOPULATED },
		{ "fault-stray-foreign", test_fault_stray_foreign,
		  T_WP_UNPOPULATED },
		{ "adopt-where-move-left", test_adopt_where_move_left,
		  T_WP_UNPOPULATED },
		{ "adopt-where-move-left-early",
		  test_adopt_where_move_left_early, T_WP_UNPOPULATED },
		{ "release-move-late", test_release_move_late,
		  T_WP_UNPOPULATED },
		{ "adopt-in-unmapped-span", test_adopt_in_unmapped_span,
		  T_WP_UNPOPULATED },
		{ "adopt-dontunmap-left", test_adopt_dontunmap_left,
		  T_WP_UNPOPULATED },
		{ "adopt-in-span-slow-reader", test_adopt_in_span_slow_reader,
		  T_WP_UNPOPULATED },
		{ "fault-while-other-moves", test_fault_while_other_moves,
		  T_WP_UNPOPULATED },
		{ "fault-moved-foreign-two-workers",
		  test_fault_moved_foreign_two_workers, T_WP_UNPOPULATED },
		{ "moves-read-far-ahead", test_moves_read_far_ahead,
		  T_WP_UNPOPULATED },
		/* 120 s: a hang shows as the timeout; fixed, 1-7 s */
		{ "snapshot-reads-held", test_snapshot_reads_held,
		  T_WP_UNPOPULATED, 0, 120 },
		{ "restore-reads-held", test_restore_reads_held,
		  T_WP_UNPOPULATED, 0, 120 },
		{ "restore-copy-reads-held", test_restore_copy_reads_held,
		  T_WP_UNPOPULATED, 0, 60 },
		{ "inthread-reads-held", test_inthread_reads_held,
		  T_WP_UNPOPULATED, 0, 120 },
		{ "inthread-stores-while-moving",
		  test_inthread_stores_while_moving, T_WP_UNPOPULATED, 0, 60 },
		{ "release-sparse-reads-written",
		  test_release_sparse_reads_written, T_WP_UNPOPULATED },
		{ "release-move-unread-dontunmap",
		  test_release_move_unread_dontunmap, T_WP_UNPOPULATED },
		{ "release-move-unread-replaced",
		  test_release_move_unread_replaced, T_WP_UNPOPULATED },
		{ "swap-clone-discarded", test_swap_clone_discarded,
		  T_WP_UNPOPULATED, T_NEEDS_ROOT },
	};

	return t_run("exact", cases, ARRAY_SIZE(cases));
}
