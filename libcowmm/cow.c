// SPDX-License-Identifier: MIT
/*
 * The sharing rule and every step that acts on it: is-shared, preserve,
 * publish, break the needers, mark the page written in this epoch.
 *
 * Per page a region keeps one number, wgen: the epoch of the newest
 * snapshot that existed when the page was last made writable.  Every live
 * snapshot with a larger epoch that still needs the page (no frame for it,
 * not drained) shares the page's current content with the region, so the
 * page's mapcount is one (the region) plus the number of such snapshots.
 * A page changes only after cowmm__cow_claim*() gave each of them the old
 * bytes, or marked it broken; wgen is written nowhere else.
 */
#include <errno.h>
#include <unistd.h>

#include "cow.h"

bool cowmm__shared_locked(cowmm_region_t *r, size_t pg)
{
	struct cowmm_snap *s;

	for (s = r->snaps; s && s->epoch > r->wgen[pg]; s = s->next)
		if (cowmm__snap_needs(s, pg))
			return true;
	return false;
}

void cowmm__break_needers(cowmm_region_t *r, size_t pg, const char *why)
{
	struct cowmm_snap *s;

	for (s = r->snaps; s && s->epoch > r->wgen[pg]; s = s->next)
		if (cowmm__snap_needs(s, pg))
			cowmm__snap_break(s, why);
}

bool cowmm__page_is_zero(const void *p)
{
	const uint64_t *w = p;
	size_t i;

	for (i = 0; i < COWMM_PAGE_SIZE / sizeof(*w); i++)
		if (w[i])
			return false;
	return true;
}

/* The one place a page becomes writable in the current epoch. */
static void mark_written(cowmm_region_t *r, size_t pg)
{
	r->wgen[pg] = r->epoch;
}

/* Hand @f to every snapshot that shares page @pg; drop the caller's ref. */
static void publish_locked(cowmm_region_t *r, size_t pg, struct cowmm_frame *f)
{
	uint32_t w = r->wgen[pg];
	struct cowmm_snap *s;

	for (s = r->snaps; s && s->epoch > w; s = s->next) {
		if (!cowmm__snap_needs(s, pg))
			continue;
		cowmm__frame_get(f);
		if (cowmm__fmap_set(&s->frames, pg, f)) {
			cowmm__frame_put(f);
			cowmm__snap_break(s, "out of memory for a frame map");
		}
	}
	cowmm__frame_put(f); /* the allocation's reference */
}

/* Preserve page @pg for its sharers; wgen unchanged.  See the claim. */
static int preserve_locked(cowmm_region_t *r, size_t pg,
			   enum cowmm_cow_src src,
			   atomic_uint_fast64_t *counter)
{
	struct cowmm_frame *f = &cowmm__zero_frame;
	int err;

	if (!cowmm__shared_locked(r, pg))
		return 0;
	if (src == COWMM_COW_READ) {
		f = cowmm__frame_alloc(&r->mm->pool);
		if (!f) {
			cowmm__break_needers(r, pg,
					     "out of memory for a frame");
			return -ENOMEM;
		}
		err = cowmm__region_read_page(r, pg, cowmm__frame_data(f),
					      false);
		if (err == -EAGAIN) {
			cowmm__frame_free_now(f);
			return err;
		}
		if (err) {
			cowmm__frame_free_now(f);
			cowmm__break_needers(r, pg, "source lost");
			return -EIO;
		}
		if (cowmm__page_is_zero(cowmm__frame_data(f))) {
			cowmm__frame_free_now(f); /* never published */
			f = &cowmm__zero_frame;
		} else {
			cowmm__count(r->mm, bytes_preserved, COWMM_PAGE_SIZE);
		}
	}
	publish_locked(r, pg, f);
	atomic_fetch_add_explicit(counter, 1, memory_order_relaxed);
	return 1;
}

int cowmm__cow_claim_locked(cowmm_region_t *r, size_t pg,
			    enum cowmm_cow_src src,
			    atomic_uint_fast64_t *counter)
{
	int ret = preserve_locked(r, pg, src, counter);

	if (ret != -EAGAIN)
		mark_written(r, pg);
	return ret;
}

/*
 * How long a claim waits for a page it cannot read yet (a discard or a
 * move of it pending) before it gives up on its bytes: the snapshots that
 * needed them break, loudly, rather than the caller waiting for ever (the
 * thirteenth session's outside review: a release behind an unmap it never
 * saw).
 */
#define CLAIM_WAIT_NS (10 * 1000 * 1000 * 1000ull)

int cowmm__cow_claim(cowmm_region_t *r, size_t pg, enum cowmm_cow_src src,
		     atomic_uint_fast64_t *counter)
{
	bool outer = cowmm__stamped;
	uint64_t t0 = cowmm__now_ns();
	int ret;

	/*
	 * Wait only for the discards read before now: a steady stream of
	 * discards elsewhere would otherwise hold this page back for ever.
	 */
	if (!outer) {
		cowmm__stamp = cowmm__removes_stamp(r->mm);
		cowmm__stamped = true;
	}
	while ((ret = cowmm__cow_claim_locked(r, pg, src, counter)) ==
	       -EAGAIN) {
		if (cowmm__now_ns() - t0 >= CLAIM_WAIT_NS) {
			cowmm__cow_claim_lost_locked(
				r, pg, "page unreadable for 10 s");
			ret = -EIO;
			break;
		}
		/* The discard's handler may need this very lock. */
		pthread_mutex_unlock(&r->lock);
		cowmm__wait_discards(r->mm);
		usleep(100);
		pthread_mutex_lock(&r->lock);
	}
	cowmm__stamped = outer;
	return ret;
}

void cowmm__cow_claim_frame_locked(cowmm_region_t *r, size_t pg,
				   struct cowmm_frame *f)
{
	publish_locked(r, pg, f);
	mark_written(r, pg);
}

void cowmm__cow_claim_lost_locked(cowmm_region_t *r, size_t pg,
				  const char *why)
{
	cowmm__break_needers(r, pg, why);
	mark_written(r, pg);
}

bool cowmm__cow_claim_unshared(cowmm_region_t *r, size_t pg)
{
	if (cowmm__shared_locked(r, pg))
		return false;
	mark_written(r, pg);
	return true;
}
