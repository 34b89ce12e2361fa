// SPDX-License-Identifier: MIT
/*
 * The application's own mm calls while a snapshot is alive: a snapshot
 * keeps its bytes or reports -EIO, never silently changes.  MADV_DONTNEED
 * and MADV_FREE, munmap of part of a region, mremap of a whole region.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "harness.h"

#define NPAGES 64

static unsigned char *anon(size_t npages)
{
	unsigned char *p = mmap(NULL, npages * T_PAGE, PROT_READ | PROT_WRITE,
				MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	ck_assert_ptr_ne(p, MAP_FAILED);
	madvise(p, npages * T_PAGE, MADV_NOHUGEPAGE);
	return p;
}

/* Every page of @s: the bytes of seed pg + 1, or the whole read is -EIO. */
static int snap_state(cowmm_snap_t *s, size_t npages, size_t zero_from)
{
	unsigned char b[T_PAGE], want[T_PAGE];
	size_t pg;

	for (pg = 0; pg < npages; pg++) {
		ssize_t n = cowmm_snap_read(s, pg * T_PAGE, b, T_PAGE);

		if (n == -EIO)
			return -EIO;
		ck_assert_int_eq(n, T_PAGE);
		if (pg >= zero_from)
			memset(want, 0, T_PAGE);
		else
			t_fill_page(want, pg + 1);
		ck_assert_msg(!memcmp(b, want, T_PAGE),
			      "snapshot page %zu changed silently", pg);
	}
	return 0;
}

static void discard_rounds(int advice, const char *name)
{
	cowmm_t *mm = t_open(0);
	int round, kept = 0, broken = 0;

	for (round = 0; round < 40; round++) {
		cowmm_region_t *r;
		cowmm_snap_t *s;
		unsigned char *p;
		size_t pg;

		ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE,
						    COWMM_REGION_NOTHP, &r),
				 0);
		p = cowmm_region_base(r);
		for (pg = 0; pg < NPAGES / 2; pg++) /* the rest: never touched */
			t_fill_page(p + pg * T_PAGE, pg + 1);
		ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
		ck_assert_int_eq(madvise(p, NPAGES * T_PAGE, advice), 0);
		if (snap_state(s, NPAGES, NPAGES / 2) == -EIO)
			broken++;
		else
			kept++;
		/* The region goes on working. */
		memset(p + 3 * T_PAGE, 0x44, T_PAGE);
		ck_assert_int_eq(p[3 * T_PAGE + 9], 0x44);
		cowmm_snap_release(s);
		ck_assert_int_eq(cowmm_region_release(r), 0);
	}
	printf("%s: 40 rounds of 32 populated + 32 empty pages discarded "
	       "under a live snapshot: %d kept every byte, %d reported -EIO, "
	       "0 changed\n", name, kept, broken);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	cowmm_close(mm);
}

START_TEST(test_dontneed)
{
	discard_rounds(MADV_DONTNEED, "dontneed");
}
END_TEST

START_TEST(test_free)
{
	discard_rounds(MADV_FREE, "free");
}
END_TEST

START_TEST(test_munmap_part)
{
	cowmm_t *mm = t_open(0);
	cowmm_snap_t *s1, *s2, *s3;
	unsigned char *p = anon(NPAGES), b[T_PAGE];
	cowmm_region_t *r;
	size_t pg;

	for (pg = 0; pg < NPAGES; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, NPAGES * T_PAGE, 0, &r), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s1), 0);
	for (pg = 0; pg < 8; pg++)
		p[pg * T_PAGE] ^= 1; /* s1 has its own copy of 0..7 */
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);

	/* Unmap 0..7: s2 still shared them, s1 did not. */
	ck_assert_int_eq(munmap(p, 8 * T_PAGE), 0);
	t_stats(mm); /* the UNMAP event is handled */
	ck_assert_int_eq(cowmm_snap_read(s2, 20 * T_PAGE, b, 1), -EIO);
	ck_assert_int_eq(snap_state(s1, NPAGES, NPAGES), 0);

	/* The rest of the region works; a new snapshot sees zero there. */
	memset(p + 10 * T_PAGE, 0x21, T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s3), 0);
	p[11 * T_PAGE] = 0x22;
	ck_assert_int_eq(cowmm_snap_read(s3, 2 * T_PAGE, b, T_PAGE), T_PAGE);
	ck_assert_int_eq(b[0], 0);
	ck_assert_int_eq(cowmm_snap_read(s3, 10 * T_PAGE, b, 1), 1);
	ck_assert_int_eq(b[0], 0x21);
	cowmm_snap_release(s1);
	cowmm_snap_release(s2);
	cowmm_snap_release(s3);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	p[20 * T_PAGE] = 5; /* adopted memory: ours again */
	munmap(p + 8 * T_PAGE, (NPAGES - 8) * T_PAGE);
	cowmm_close(mm);
}
END_TEST

/*
 * A clone's page discarded after it was filled reads as zero; a snapshot
 * taken then keeps that zero when the page is written again.
 */
START_TEST(test_clone_discard_snapshot)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r, *c;
	unsigned char *p, *q, b[T_PAGE];
	cowmm_snap_t *s;

	ck_assert_int_eq(cowmm_region_alloc(mm, 4 * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	memset(p, 0x17, 4 * T_PAGE);
	ck_assert_int_eq(cowmm_clone(r, 0, &c), 0);
	q = cowmm_region_base(c);
	ck_assert_int_eq(q[5], 0x17); /* filled */
	ck_assert_int_eq(madvise(q, T_PAGE, MADV_DONTNEED), 0);
	ck_assert_int_eq(cowmm_snapshot(c, &s), 0);
	q[7] = 0x99; /* refills as zero, protected for the snapshot */
	ck_assert_int_eq(q[5], 0);
	ck_assert_int_eq(cowmm_snap_read(s, 0, b, T_PAGE), T_PAGE);
	ck_assert_int_eq(b[7], 0);
	ck_assert_int_eq(b[5], 0);
	cowmm_snap_release(s);
	cowmm_close(mm);
}
END_TEST

/* Release never unmaps what the application unmapped and reused. */
START_TEST(test_release_after_munmap)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r;
	unsigned char *p, *q;

	ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	memset(p, 1, NPAGES * T_PAGE);
	ck_assert_int_eq(munmap(p + 8 * T_PAGE, 8 * T_PAGE), 0);
	/* (Under a sanitizer its allocator may take the hole first.) */
	q = mmap(p + 8 * T_PAGE, 8 * T_PAGE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	ck_assert(q == p + 8 * T_PAGE || (q == MAP_FAILED && T_SANITIZED));
	if (q != MAP_FAILED)
		q[0] = 7;
	t_stats(mm); /* the UNMAP event is handled */
	ck_assert_int_eq(cowmm_region_release(r), 0);
	if (q != MAP_FAILED) {
		ck_assert_int_eq(q[0], 7); /* still mapped, still ours */
		munmap(q, 8 * T_PAGE);
	}
	cowmm_close(mm);
}
END_TEST

START_TEST(test_mremap_whole)
{
	cowmm_t *mm = t_open(0);
	unsigned char *p = anon(NPAGES), *q, *hole;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	uint64_t copies;
	size_t pg;

	for (pg = 0; pg < NPAGES; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, NPAGES * T_PAGE, 0, &r), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	p[0] ^= 1; /* one page preserved before the move */
	hole = anon(NPAGES);
	q = mremap(p, NPAGES * T_PAGE, NPAGES * T_PAGE,
		   MREMAP_MAYMOVE | MREMAP_FIXED, hole);
	ck_assert_ptr_eq(q, hole);
	copies = t_stats(mm).copies; /* settles the REMAP event */
	ck_assert_ptr_eq(cowmm_region_base(r), q);
	/* Writes at the new address still preserve for the snapshot. */
	for (pg = 0; pg < NPAGES; pg += 2)
		q[pg * T_PAGE + 1] ^= 1;
	ck_assert_uint_eq(t_stats(mm).copies, copies + NPAGES / 2 - 1);
	ck_assert_int_eq(snap_state(s, NPAGES, NPAGES), 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	q[5] = 1;
	munmap(q, NPAGES * T_PAGE);
	cowmm_close(mm);
}
END_TEST

/*
 * mremap() growing a region in place (no event: nothing moved) or a clone
 * moved while growing (REMAP for its old length): the region keeps its
 * size, address and snapshots; the grown tail is plain memory that faults
 * nowhere for good.
 */
START_TEST(test_mremap_grow)
{
	const size_t len = NPAGES * T_PAGE;
	cowmm_t *mm = t_open(0);
	unsigned char *p = anon(2 * NPAGES), *q, *c;
	unsigned char want[T_PAGE], buf[T_PAGE];
	cowmm_region_t *r, *cl;
	cowmm_snap_t *s, *s2;
	size_t pg;

	for (pg = 0; pg < NPAGES; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len, 0, &r), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	p[0] ^= 1;
	(void)t_stats(mm);
	/*
	 * Room to grow into, freed only now: the library's own mappings
	 * (frame chunks, maps; ASan's too) could land in a hole left earlier.
	 */
	ck_assert_int_eq(munmap(p + len, len), 0);
	q = mremap(p, len, 2 * len, 0);
	ck_assert_ptr_eq(q, p);
	for (pg = 0; pg < 2 * NPAGES; pg++)
		p[pg * T_PAGE + 2] ^= 1; /* the tail too: no hang */
	ck_assert_ptr_eq(cowmm_region_base(r), p);
	ck_assert_uint_eq(cowmm_region_size(r), len);
	ck_assert_int_eq(snap_state(s, NPAGES, NPAGES), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), 0);
	ck_assert_uint_eq(cowmm_snap_size(s2), len);
	p[T_PAGE + 3] = 0x33; /* preserved for s2 */
	t_fill_page(want, 2);
	want[2] ^= 1;
	ck_assert_int_eq(cowmm_snap_read(s2, T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert(!memcmp(buf, want, T_PAGE));

	/* A clone that moves as it grows follows the move. */
	ck_assert_int_eq(cowmm_clone(r, COWMM_REGION_NOTHP, &cl), 0);
	c = cowmm_region_base(cl);
	q = mremap(c, len, 2 * len, MREMAP_MAYMOVE);
	ck_assert_ptr_ne(q, MAP_FAILED);
	(void)t_stats(mm); /* settles a REMAP event */
	ck_assert_ptr_eq(cowmm_region_base(cl), q);
	for (pg = 0; pg < NPAGES; pg++) {
		t_fill_page(want, pg + 1);
		want[2] ^= 1;
		if (pg == 0)
			want[0] ^= 1;
		if (pg == 1)
			want[3] = 0x33;
		ck_assert_msg(!memcmp(q + pg * T_PAGE, want, T_PAGE),
			      "clone page %zu is not its source's", pg);
	}
	for (pg = NPAGES; pg < 2 * NPAGES; pg++) {
		ck_assert_int_eq(q[pg * T_PAGE + 7], 0); /* the grown tail */
		q[pg * T_PAGE + 7] = 1;
	}
	ck_assert_int_eq(snap_state(s, NPAGES, NPAGES), 0);
	cowmm_snap_release(s);
	cowmm_snap_release(s2);
	ck_assert_int_eq(cowmm_region_release(cl), 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	munmap(p, 2 * len);
	cowmm_close(mm);
}
END_TEST

/*
 * mprotect() of part of a region under a live snapshot, to read-only and to
 * nothing and back: the write protection the snapshot relies on survives
 * it, so every later write still copies and the snapshot keeps every byte.
 * MADV_REMOVE is refused by the kernel for private anonymous memory
 * (EINVAL), and changes nothing.
 */
START_TEST(test_mprotect)
{
	cowmm_t *mm = t_open_fa(0, 1); /* counts page by page */
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p = t_filled_region(mm, NPAGES, &r);
	size_t pg;

	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(mprotect(p, NPAGES / 2 * T_PAGE, PROT_READ), 0);
	ck_assert_int_eq(mprotect(p + NPAGES / 2 * T_PAGE, NPAGES / 4 * T_PAGE,
				  PROT_NONE),
			 0);
	ck_assert_int_eq(mprotect(p, NPAGES * T_PAGE, PROT_READ | PROT_WRITE),
			 0);
	ck_assert_int_eq(madvise(p, NPAGES * T_PAGE, MADV_REMOVE), -1);
	ck_assert_int_eq(errno, EINVAL);
	for (pg = 0; pg < NPAGES; pg++)
		p[pg * T_PAGE + 11] ^= 0x3c;
	ck_assert_uint_eq(t_stats(mm).copies, NPAGES);
	ck_assert_int_eq(snap_state(s, NPAGES, NPAGES), 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * Fault-around racing discards: a sequential writer makes the workers copy
 * pages ahead of it while another thread discards pages ahead of it too.
 * A copy taken across a discard would hand the snapshot the kernel's
 * zeroed refill: every round's snapshot must keep every byte or be broken.
 * Most rounds end broken (a discard reaches a page still shared, which is
 * the documented outcome); what is checked is that none changes, nothing
 * hangs and no frame leaks while fault-around runs against discards.
 */
struct ahead_race {
	unsigned char *p;
	size_t npages;
	atomic_size_t at; /* the writer's page */
	atomic_bool done;
};

static void *ahead_writer(void *arg)
{
	struct ahead_race *a = arg;
	size_t pg;

	for (pg = 0; pg < a->npages; pg++) {
		a->p[pg * T_PAGE + 17] ^= 0x5a;
		atomic_store(&a->at, pg);
	}
	atomic_store(&a->done, true);
	return NULL;
}

static void *ahead_discarder(void *arg)
{
	struct ahead_race *a = arg;
	uint64_t x = (uint64_t)(uintptr_t)arg | 1;

	/* Now and then, so that the windows grow between discards. */
	while (!atomic_load(&a->done)) {
		size_t pg = atomic_load(&a->at) + 1 + t_rand(&x) % 24;

		if (pg < a->npages)
			madvise(a->p + pg * T_PAGE, T_PAGE, MADV_DONTNEED);
		usleep(t_rand(&x) % 400);
	}
	return NULL;
}

START_TEST(test_fault_around_discard)
{
	const size_t npages = 1024;
	cowmm_t *mm = t_open_fa(2, COWMM_FAULT_AROUND_SEQUENTIAL);
	int round, kept = 0, broken = 0;
	uint64_t ahead = 0;

	for (round = 0; round < 20; round++) {
		struct ahead_race a = { .npages = npages };
		pthread_t w, d;
		cowmm_region_t *r;
		cowmm_snap_t *s;

		a.p = t_filled_region(mm, npages, &r);
		ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
		pthread_create(&d, NULL, ahead_discarder, &a);
		pthread_create(&w, NULL, ahead_writer, &a);
		pthread_join(w, NULL);
		pthread_join(d, NULL);
		if (snap_state(s, npages, npages) == -EIO)
			broken++;
		else
			kept++;
		cowmm_snap_release(s);
		ck_assert_int_eq(cowmm_region_release(r), 0);
	}
	ahead = t_stats(mm).ahead_copies;
	printf("fault-around-discard: 20 rounds, %lu pages copied ahead, "
	       "%d snapshots kept every byte, %d reported -EIO, 0 changed\n",
	       (unsigned long)ahead, kept, broken);
	ck_assert_uint_gt(ahead, 0);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	cowmm_close(mm);
}
END_TEST

int main(void)
{
	const uint64_t events = (1 << 2) | (1 << 3) | (1 << 6); /* REMAP,
						REMOVE, UNMAP */
	const struct t_case cases[] = {
		{ "dontneed", test_dontneed, T_WP_UNPOPULATED | events },
		{ "free", test_free, T_WP_UNPOPULATED | events },
		{ "munmap-part", test_munmap_part, T_WP_UNPOPULATED | events },
		{ "mremap-whole", test_mremap_whole, T_WP_UNPOPULATED | events },
		{ "mremap-grow", test_mremap_grow, T_WP_UNPOPULATED | events },
		{ "mprotect", test_mprotect, T_WP_UNPOPULATED | events },
		{ "release-after-munmap", test_release_after_munmap,
		  T_WP_UNPOPULATED | events },
		{ "clone-discard-snapshot", test_clone_discard_snapshot,
		  T_WP_UNPOPULATED | events },
		{ "fault-around-discard", test_fault_around_discard,
		  T_WP_UNPOPULATED | events, 0, 120 },
	};

	return t_run("events", cases, ARRAY_SIZE(cases));
}
