// SPDX-License-Identifier: MIT
/*
 * The application's own mm calls on a region: userfaultfd events.
 *
 * REMOVE (MADV_DONTNEED, MADV_FREE, MADV_REMOVE) comes before the pages
 * are discarded, but the kernel lets the madvise() go on as soon as a
 * worker has read the event, so the copy races with the discard.  Each page
 * a snapshot still shares is copied and verified through pagemap (see
 * cowmm__region_read_page()): if it is still present, write-protected and
 * on the same frame afterwards (a discarded and refaulted page would have
 * lost the uffd-wp bit), the copy is good; otherwise the snapshots that
 * needed it are marked broken.
 *
 * UNMAP comes after the fact: what a snapshot still shared is gone, and
 * those snapshots are broken.  The range leaves the region: it reads as
 * zero in later snapshots, and live reads never touch it.
 *
 * REMAP (mremap) moves pages: the region follows them to their new address,
 * whole or in part (layout.c); its snapshots and clones do not notice.
 *
 * Workers run these: locks are only tried (-EAGAIN: deferred), and every
 * handler is idempotent, since a deferred event runs again from the start.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cow.h"
#include "uffd.h"

/*
 * Run @fn on the part of every region that overlaps [start, end); with
 * @reindex, index the region again after (its pages left it).  Under the
 * region's lock only: an application thread may hold mm->lock while it
 * waits for this event.
 */
static int for_overlap(cowmm_t *mm, uintptr_t start, uintptr_t end,
		       int (*fn)(cowmm_region_t *, size_t, size_t),
		       bool reindex, const struct cowmm_unmap_nr *nr)
{
	struct cowmm_rtable *t;
	int ret = 0;
	size_t i;

	urcu_bp_read_lock();
	t = __atomic_load_n(&mm->rtable, __ATOMIC_ACQUIRE);
	for (i = 0; t && i < t->n; i++) {
		cowmm_region_t *r = t->e[i].r;
		uintptr_t s, e;

		if (t->e[i].base >= end || t->e[i].base + t->e[i].len <= start)
			continue;
		/* Mapped after the event's unmap: not what it took. */
		if (nr && (int32_t)(r->born_maps - (r->born_quiet ? nr->nr
								   : nr->since)) >= 0)
			continue;
		if (cowmm__lock(&r->lock)) {
			ret = -EAGAIN;
			continue;
		}
		/* Each run of the region has its entry: its part only. */
		s = start > t->e[i].base ? start : t->e[i].base;
		e = end < t->e[i].base + t->e[i].len ? end
						     : t->e[i].base + t->e[i].len;
		/*
		 * A region being released still takes its discards and
		 * unmaps: its release waits for them (cow.c) and must see
		 * its snapshots broken, not the zapped page.
		 */
		if (s < e &&
		    fn(r, t->e[i].pg + ((s - t->e[i].base) >> COWMM_PAGE_SHIFT),
		       (e - s) >> COWMM_PAGE_SHIFT) == -EAGAIN)
			ret = -EAGAIN;
		else if (s < e && reindex && !r->dying)
			while (cowmm__rtable_move(mm, r) == -ENOMEM)
				usleep(1000);
		pthread_mutex_unlock(&r->lock);
	}
	urcu_bp_read_unlock();
	return ret;
}

/*
 * A discarded page that a snapshot still shares.  The kernel zaps it as
 * soon as this event is read, and a touch right after maps a fresh zeroed
 * page in its place, write-protected like the old one: by the time this
 * runs, what is mapped there may already be that refill, and nothing in
 * pagemap tells the two apart.  So the live page is never copied: the
 * snapshots that needed it are marked broken (their reads fail with -EIO),
 * never handed zeros.  Only a clone's page never filled is kept, since its
 * content is its origin's, not live memory.  Faults wait while a discard
 * is pending (cowmm__region_read_page), so none copies a refill first.
 */
static int remove_pages(cowmm_region_t *r, size_t pg, size_t n)
{
	size_t i;

	if (r->view_of)
		return 0; /* a view refills from its snapshot */
	if (r->lazy) /* not loaded yet: zero now, not the file's */
		cowmm__lazy_discard_locked(r, pg, n);

	for (i = pg; i < pg + n; i++) {
		if (r->present && !cowmm__test_bit(r->present, i)) {
			/*
			 * A clone's page never materialised: its snapshots
			 * get the origin's bytes, and from now on it reads
			 * as zero, as a discarded page of a fork() child does.
			 */
			int ret = cowmm__cow_claim_locked(
				r, i, COWMM_COW_READ, &r->mm->cnt.detach_copies);

			if (ret == -EAGAIN ||
			    (r->origin && cowmm__clone_forget(r, i) == -EAGAIN))
				return -EAGAIN; /* the origin is busy: later */
			cowmm__set_bit(r->present, i);
		} else if (cowmm__shared_locked(r, i)) {
			cowmm__cow_claim_lost_locked(r, i,
						     "pages discarded while a "
						     "snapshot still needed them");
		}
	}
	return 0;
}

int cowmm__event_remove(cowmm_t *mm, uintptr_t start, uintptr_t end)
{
	return for_overlap(mm, start, end, remove_pages, false, NULL);
}

static int unmap_pages(cowmm_region_t *r, size_t pg, size_t n)
{
	size_t i;

	if (!r->holes) {
		/* Read without the lock too: cowmm__hole(). */
		__atomic_store_n(&r->holes,
				 calloc(1, cowmm__bitmap_bytes(r->npages)),
				 __ATOMIC_RELEASE);
		if (!r->holes) { /* cannot remember: break everything */
			for (i = pg; i < pg + n; i++)
				cowmm__break_needers(r, i, "region unmapped");
			return 0;
		}
	}
	if (r->lazy) /* never to be loaded: the range left the region */
		cowmm__lazy_discard_locked(r, pg, n);
	for (i = pg; i < pg + n; i++) {
		cowmm__cow_claim_lost_locked(r, i, "pages unmapped while a "
						   "snapshot still needed them");
		__atomic_fetch_or(&r->holes[i / 64], 1UL << (i % 64),
				  __ATOMIC_RELAXED);
	}
	return 0;
}

/*
 * @nr: the event's number among the moves and unmaps read; @since: the
 * first read after the memory it took was unmapped (manager.c,
 * unmap_since()), @nr or the move just before.  A region that entered the
 * table once that many were read came later; one that entered it with no
 * event in flight (born_quiet), once @nr were.
 */
int cowmm__event_unmap(cowmm_t *mm, uintptr_t start, uintptr_t end,
		       uint32_t nr, uint32_t since)
{
	struct cowmm_unmap_nr n = { .nr = nr, .since = since };

	/* The holes leave the index: something else may be mapped there. */
	return for_overlap(mm, start, end, unmap_pages, true, &n);
}

void (*cowmm__remap_found)(uintptr_t from, size_t len);

/*
 * [@from, @from + @len) moved to @to (mremap()).  The kernel moved the
 * pages with their registration and their protection; the regions that
 * had pages there follow them (layout.c): each page keeps its place in its
 * region, its snapshots and its clones, and only its address changes.
 * Handled in the order the events were read (manager.c), so the UNMAP
 * that mremap() sends after this for the old range finds nothing there,
 * and a range moved away and back comes back.  Nothing is copied and
 * nothing is asked of the kernel, which refuses ioctls until mremap()
 * returns.
 */
int cowmm__event_remap(cowmm_t *mm, uintptr_t from, uintptr_t to, size_t len)
{
	void (*hook)(uintptr_t, size_t);
	struct cowmm_rtable *t;
	cowmm_region_t *r, **moved;
	size_t i, n = 0, k;
	int ret = 0;

	/* Not mm->lock: see for_overlap(). */
	urcu_bp_read_lock();
	t = __atomic_load_n(&mm->rtable, __ATOMIC_ACQUIRE);
	hook = __atomic_load_n(&cowmm__remap_found, __ATOMIC_ACQUIRE);
	if (cowmm__unlikely(hook != NULL))
		hook(from, len);
	moved = calloc((t ? t->n : 0) + 1, sizeof(void *)); /* region pointers */
	if (!moved) {
		urcu_bp_read_unlock();
		return -EAGAIN; /* later: nothing was done */
	}
	/* The regions with pages in the range; locked first, all or none. */
	for (i = 0; t && i < t->n && ret == 0; i++) {
		if (t->e[i].base >= from + len ||
		    t->e[i].base + t->e[i].len <= from)
			continue;
		r = t->e[i].r;
		for (k = 0; k < n && moved[k] != r; k++)
			;
		if (k < n)
			continue;
		if (cowmm__lock(&r->lock))
			ret = -EAGAIN;
		else
			moved[n++] = r;
	}
	for (k = 0; k < n && !ret; k++) {
		int moved_pages;

		r = moved[k];
		/*
		 * Also while it is being released: until it leaves the
		 * table, its release copies pages for its snapshots where
		 * the layout puts them, and the unmap of the range they left
		 * (mremap() sends it after) must not find them there.
		 */
		while ((moved_pages = cowmm__layout_move(r, from, to, len)) ==
		       -ENOMEM)
			usleep(1000);
		while (moved_pages > 0 && cowmm__rtable_move(mm, r) == -ENOMEM)
			usleep(1000);
		cowmm__log(COWMM_LOG_INFO,
			   "region %#lx: %zu KiB moved from %#lx to %#lx%s",
			   (unsigned long)r->base, len >> 10,
			   (unsigned long)from, (unsigned long)to,
			   cowmm__in_pieces(r) ? "; it is in pieces now" : "");
	}
	/* Handled, before the regions are let go: cowmm__pend_done(). */
	if (!ret)
		cowmm__pend_done(mm);
	for (k = 0; k < n; k++)
		pthread_mutex_unlock(&moved[k]->lock);
	urcu_bp_read_unlock();
	free(moved);
	return ret;
}
