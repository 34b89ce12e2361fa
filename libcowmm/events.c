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
 * REMAP of a whole region moves it: snapshots follow it to its new base.
 * A move of part of a region takes that part out of the region, but first
 * every snapshot that still shares a moved page gets its bytes (read at
 * the new address, where the kernel keeps them protected until this event
 * is handled), and a clone's pages not materialised yet are filled there;
 * then the moved pages are unregistered at their new address.
 *
 * Workers run these: locks are only tried (-EAGAIN: deferred), and every
 * handler is idempotent, since a deferred event runs again from the start.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cow.h"
#include "uffd.h"

/* Run @fn on the part of every region that overlaps [start, end). */
static int for_overlap(cowmm_t *mm, uintptr_t start, uintptr_t end,
		       int (*fn)(cowmm_region_t *, size_t, size_t))
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
		    fn(r, (s - r->base) >> COWMM_PAGE_SHIFT,
		       (e - s) >> COWMM_PAGE_SHIFT) == -EAGAIN)
			ret = -EAGAIN;
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
	return for_overlap(mm, start, end, remove_pages);
}

static int unmap_pages(cowmm_region_t *r, size_t pg, size_t n)
{
	size_t i;

	if (!r->holes) {
		r->holes = calloc(1, cowmm__bitmap_bytes(r->npages));
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
		cowmm__set_bit(r->holes, i);
	}
	return 0;
}

/* Index again the regions whose pages in [start, end) left them. */
static void reindex(cowmm_t *mm, uintptr_t start, uintptr_t end)
{
	cowmm_region_t *r;

	for (r = mm->regions; r; r = r->next)
		if (r->holes && start < r->base + r->len && r->base < end)
			while (cowmm__rtable_move(mm, r) == -ENOMEM)
				;
}

int cowmm__event_unmap(cowmm_t *mm, uintptr_t start, uintptr_t end)
{
	int ret;

	if (cowmm__lock(&mm->lock)) /* the table changes under it */
		return -EAGAIN;
	ret = for_overlap(mm, start, end, unmap_pages);
	if (ret != -EAGAIN)
		reindex(mm, start, end);
	pthread_mutex_unlock(&mm->lock);
	return ret;
}

/*
 * The old bytes of page @p of @r, moved to @addr: into a frame for the
 * snapshots that share it.  The copy is verified as a fault's is
 * (read_verified() in region.c): still protected, and on the same frame
 * afterwards, or the page was discarded meanwhile and they are broken.
 */
static void remap_preserve(cowmm_region_t *r, size_t p, uintptr_t addr)
{
	struct cowmm_frame *f;
	uint64_t e1, e2;

	if (cowmm__pagemap_read(r->mm->pagemap, addr, 1, &e1) ||
	    !(e1 & PM_UFFD_WP)) {
		cowmm__cow_claim_lost_locked(r, p, "pages discarded while "
						   "moved by mremap");
		return;
	}
	if (!(e1 & (PM_PRESENT | PM_SWAP))) { /* a marker: never populated */
		cowmm__cow_claim_frame_locked(r, p, &cowmm__zero_frame);
		return;
	}
	f = cowmm__frame_alloc(&r->mm->pool);
	if (!f) {
		cowmm__cow_claim_lost_locked(r, p, "out of memory for a frame");
		return;
	}
	if (cowmm__live_read(addr, cowmm__frame_data(f), COWMM_PAGE_SIZE) ||
	    cowmm__pagemap_read(r->mm->pagemap, addr, 1, &e2) ||
	    !(e2 & PM_UFFD_WP) ||
	    ((e1 & PM_PRESENT) && (e1 & PM_PFN_MASK) != (e2 & PM_PFN_MASK))) {
		cowmm__frame_free_now(f);
		cowmm__cow_claim_lost_locked(r, p, "pages discarded while "
						   "moved by mremap");
		return;
	}
	cowmm__count(r->mm, detach_copies, 1);
	cowmm__count(r->mm, bytes_preserved, COWMM_PAGE_SIZE);
	cowmm__cow_claim_frame_locked(r, p, f);
}

/*
 * Page @p of clone @r, never materialised, moved to @addr: fill it there
 * from the origin (poison it where the origin lost it), and give its
 * bytes to the clone's snapshots that share it.  -EAGAIN: nothing done
 * (the kernel answers -EAGAIN until the mremap() has returned).
 */
static int remap_fill(cowmm_region_t *r, size_t p, uintptr_t addr)
{
	unsigned char page[COWMM_PAGE_SIZE]
		__attribute__((aligned(COWMM_PAGE_SIZE)));
	struct cowmm_frame *f = &cowmm__zero_frame;
	int ret = cowmm__snap_page(r->origin, p, page);
	if (ret == -EAGAIN)
		return ret;
	if (ret) {
		if (r->mm->features & UFFD_FEATURE_POISON) {
			ret = cowmm__uffd_poison(r->mm->uffd, addr,
						 COWMM_PAGE_SIZE, false);
			if (ret == -EAGAIN)
				return ret;
		}
		cowmm__cow_claim_lost_locked(r, p, "the origin lost a page "
						   "moved by mremap");
		return 0;
	}
	ret = cowmm__uffd_copy(r->mm->uffd, addr, page, COWMM_PAGE_SIZE,
			       false, false);
	if (ret == -EAGAIN)
		return ret;
	if (ret && ret != -EEXIST)
		cowmm__log(COWMM_LOG_ERR, "filling a moved clone page at %#lx: %s",
			   (unsigned long)addr, strerror(-ret));
	if (cowmm__shared_locked(r, p) && !cowmm__page_is_zero(page)) {
		f = cowmm__frame_alloc(&r->mm->pool);
		if (!f) {
			cowmm__cow_claim_lost_locked(r, p, "out of memory for "
							   "a frame");
			return 0;
		}
		memcpy(cowmm__frame_data(f), page, COWMM_PAGE_SIZE);
	}
	cowmm__cow_claim_frame_locked(r, p, f);
	return 0;
}

/*
 * Pages [@pg, @pg + @n) of @r now live at @to, moved there by mremap().
 * The kernel moved them with their registration and their protection,
 * and a write there waits until this event is handled (a fault at an
 * address no region holds waits while a REMAP is pending: manager.c), so
 * what is at @to is still what the snapshots share.  Each snapshot that
 * shares a page gets its copy from there; a clone's page not materialised
 * yet is filled there from its origin, as plain memory; then the range
 * leaves the region.  Idempotent: after -EAGAIN, the pages done are no
 * longer shared, and a filled page answers -EEXIST.
 */
static int remap_part(cowmm_region_t *r, size_t pg, size_t n, uintptr_t to)
{
	size_t i;
	int ret;

	for (i = 0; i < n; i++) {
		size_t p = pg + i;
		uintptr_t addr = to + (i << COWMM_PAGE_SHIFT);

		if (r->holes && cowmm__test_bit(r->holes, p))
			continue;
		if (r->origin && !cowmm__test_bit(r->present, p)) {
			ret = remap_fill(r, p, addr);
			if (ret == -EAGAIN || cowmm__clone_forget(r, p) == -EAGAIN)
				return -EAGAIN;
			cowmm__set_bit(r->present, p);
			continue;
		}
		if (cowmm__shared_locked(r, p))
			remap_preserve(r, p, addr);
	}
	return unmap_pages(r, pg, n);
}

int cowmm__event_remap(cowmm_t *mm, uintptr_t from, uintptr_t to, size_t len)
{
	cowmm_region_t *r;
	struct cowmm_snap *s;
	int ret = 0;

	if (cowmm__lock(&mm->lock))
		return -EAGAIN;
	for (r = mm->regions; r; r = r->next)
		if (from >= r->base && from < r->base + r->len)
			break;
	if (!r)
		goto out;
	if (from == r->base && len == r->len) {
		/* The whole region moved: follow it. */
		if (cowmm__lock(&r->lock)) {
			ret = -EAGAIN;
			goto out;
		}
		__atomic_store_n(&r->base, to, __ATOMIC_RELEASE);
		for (s = r->snaps; s; s = s->next)
			__atomic_store_n(&s->base, to, __ATOMIC_RELEASE);
		while (cowmm__rtable_move(mm, r) == -ENOMEM)
			;
		pthread_mutex_unlock(&r->lock);
		cowmm__log(COWMM_LOG_INFO, "region moved from %#lx to %#lx",
			   (unsigned long)from, (unsigned long)to);
		goto out;
	}
	/* Part of it moved: that part leaves the region. */
	if (cowmm__lock(&r->lock)) {
		ret = -EAGAIN;
		goto out;
	}
	if (!r->dying &&
	    remap_part(r, (from - r->base) >> COWMM_PAGE_SHIFT,
		       ((from + len < r->base + r->len ? from + len
						       : r->base + r->len) -
			from) >> COWMM_PAGE_SHIFT,
		       to) == -EAGAIN) {
		pthread_mutex_unlock(&r->lock);
		ret = -EAGAIN;
		goto out;
	}
	pthread_mutex_unlock(&r->lock);
	reindex(mm, from, from + len);
	ret = cowmm__uffd_wp(mm->uffd, to, len, false, true);
	if (!ret || ret == -ENOENT)
		ret = cowmm__uffd_unregister(mm->uffd, to, len);
	if (ret == -ENOENT || ret == -EINVAL)
		ret = 0;
	cowmm__log(COWMM_LOG_WARNING, "part of region %#lx moved away by "
				      "mremap; it left the region",
		   (unsigned long)r->base);
out:
	pthread_mutex_unlock(&mm->lock);
	return ret;
}
