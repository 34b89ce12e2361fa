// SPDX-License-Identifier: MIT
/*
 * Fork-like writable clones.
 *
 * A clone is a new region, registered for missing and write-protect faults,
 * whose content is its *origin*: a snapshot of the source taken at clone
 * time.  Nothing is copied up front.  A first touch in the clone
 * materialises the page from the origin: the origin's frame when the source
 * was written since (handed over with UFFDIO_MOVE when nobody else holds
 * it), the source's live page otherwise.  From then on the origin no longer
 * needs that page, so a later write in the source reuses it.  A first write
 * in the source preserves the old bytes into the origin first, as for any
 * snapshot: the source keeps its physical page.
 *
 * Clones chain (a clone of a clone reads through both origins), can be
 * snapshotted, pinned and released before or after their source.
 */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "cow.h"
#include "uffd.h"

int cowmm_clone(cowmm_region_t *src, unsigned flags, cowmm_region_t **out)
{
	cowmm_region_t *c;
	cowmm_snap_t *origin;
	cowmm_t *mm;
	int ret = cowmm__check_region(src);

	if (ret)
		return ret;
	if (!out ||
	    (flags & ~(COWMM_REGION_THP | COWMM_REGION_NOTHP)) ||
	    (flags & COWMM_REGION_THP && flags & COWMM_REGION_NOTHP))
		return -EINVAL;
	mm = src->mm;
	if (mm->flags & COWMM_OPEN_IN_THREAD)
		return -EOPNOTSUPP; /* a clone fills by missing faults */
	if (atomic_load(&mm->uffd_lost))
		return -EIO; /* nothing could register it */
	ret = cowmm__snap_create(src, true, &origin); /* takes mm->lock */
	if (ret)
		goto out;
	ret = cowmm__region_map(mm, src->len, flags, PROT_READ | PROT_WRITE,
				UFFDIO_REGISTER_MODE_MISSING |
					UFFDIO_REGISTER_MODE_WP,
				&c);
	if (ret) {
		cowmm__snap_release_locked(origin);
		goto out;
	}
	pthread_mutex_lock(&c->lock); /* workers read it under the lock */
	c->origin = origin;
	pthread_mutex_unlock(&c->lock);
	*out = c;
out:
	pthread_mutex_unlock(&mm->lock);
	return ret;
}

/*
 * Enter an RCU read section and lock the region origin @o was taken of,
 * into @src (NULL once @o is detached from it).  Returns 0, or -EAGAIN in
 * a worker when that lock is busy (nothing held then).  origin_unlock()
 * undoes it.
 */
static int origin_lock(cowmm_snap_t *o, cowmm_region_t **src)
{
	cowmm_region_t *r;

	urcu_bp_read_lock();
	r = __atomic_load_n(&o->region, __ATOMIC_ACQUIRE);
	if (r) {
		if (cowmm__lock(&r->lock)) {
			urcu_bp_read_unlock();
			return -EAGAIN;
		}
		if (__atomic_load_n(&o->region, __ATOMIC_ACQUIRE) != r) {
			pthread_mutex_unlock(&r->lock); /* detached meanwhile */
			r = NULL;
		}
	}
	*src = r;
	return 0;
}

static void origin_unlock(cowmm_region_t *src)
{
	if (src)
		pthread_mutex_unlock(&src->lock);
	urcu_bp_read_unlock();
}

/*
 * Clone @c no longer reads page @pg from its origin (it discarded the page
 * before its first touch, or the page moved away): the origin lets go of
 * it, so that the source neither copies it on a write nor breaks the
 * origin when it discards it.  Call with c->lock held; takes the source's
 * lock.  Returns 0, or -EAGAIN in a worker when that lock is busy.
 */
int cowmm__clone_forget(cowmm_region_t *c, size_t pg)
{
	cowmm_snap_t *o = c->origin;
	struct cowmm_frame *f;
	cowmm_region_t *src;

	if (origin_lock(o, &src))
		return -EAGAIN;
	f = cowmm__fmap_get(&o->frames, pg);
	if (f != &cowmm__gone_frame &&
	    cowmm__fmap_set(&o->frames, pg, &cowmm__gone_frame) == 0 &&
	    cowmm__frame_real(f))
		cowmm__frame_put(f);
	origin_unlock(src);
	return 0;
}

/*
 * Materialise page @pg of clone @c from its origin.  Call with c->lock
 * held; takes the source's lock (a clone's lock always comes first).
 * Returns 0, -EHWPOISON when the origin lost the page and it was poisoned
 * instead, or a negative errno.
 */
int cowmm__clone_fill(cowmm_region_t *c, size_t pg, bool wake)
{
	unsigned char page[COWMM_PAGE_SIZE]
		__attribute__((aligned(COWMM_PAGE_SIZE)));
	uintptr_t addr = cowmm__page_addr(c, pg);
	cowmm_snap_t *o = c->origin;
	cowmm_t *mm = c->mm;
	bool wp = cowmm__shared_locked(c, pg);
	const void *data = page;
	struct cowmm_frame *f;
	cowmm_region_t *src;
	int ret;

	if (origin_lock(o, &src))
		return -EAGAIN;
	f = cowmm__fmap_get(&o->frames, pg);

	/* Held by the origin alone: hand the frame's page over. */
	if (cowmm__frame_real(f) &&
	    atomic_load_explicit(&f->refs, memory_order_acquire) == 1 && !wp &&
	    (mm->features & UFFD_FEATURE_MOVE) &&
	    !cowmm__pin_flags(&c->pins, pg) &&
	    cowmm__uffd_move(mm->uffd, addr, cowmm__frame_data(f),
			     COWMM_PAGE_SIZE, wake) == 0) {
		cowmm__count(mm, moves, 1);
		ret = 0;
		goto served;
	}

	if (f == &cowmm__zero_frame || cowmm__frame_real(f)) {
		data = cowmm__frame_data(f);
	} else if (!f && src && o->epoch > src->wgen[pg]) {
		/* Still shared with the source: its live bytes. */
		ret = cowmm__region_read_page(src, pg, page, true);
		if (ret == -EAGAIN)
			goto out;
		if (ret)
			data = NULL;
	} else {
		data = NULL; /* changed without a frame for the origin */
	}
	if (!data) {
		/*
		 * The origin lost this page (discarded in the source, or no
		 * frame for its copy): a touch raises SIGBUS, as a lazy load's
		 * unreadable page does, never zeros that were not there.
		 */
		cowmm__log(COWMM_LOG_ERR, "clone %#lx: page %zu of its origin "
					  "is lost; %s",
			   (unsigned long)c->base, pg,
			   mm->features & UFFD_FEATURE_POISON
				   ? "poisoned (SIGBUS on access)"
				   : "it reads as zero (no UFFDIO_POISON)");
		if (mm->features & UFFD_FEATURE_POISON) {
			/*
			 * UFFDIO_POISON refuses any PTE, a uffd-wp marker
			 * (a snapshot of the clone protected the page) too;
			 * resolving the protection clears the marker.
			 */
			(void)cowmm__uffd_wp(mm->uffd, addr, COWMM_PAGE_SIZE,
					     false, false);
			ret = cowmm__uffd_poison(mm->uffd, addr,
						 COWMM_PAGE_SIZE, wake);
			if (!ret)
				ret = -EHWPOISON; /* resolved, not filled */
			goto out; /* the origin keeps its (lost) slot */
		}
		memset(page, 0, sizeof(page));
		data = page;
	}
	if (f == &cowmm__zero_frame && !wp)
		ret = cowmm__uffd_zeropage(mm->uffd, addr, COWMM_PAGE_SIZE,
					   wake);
	else
		ret = cowmm__uffd_copy(mm->uffd, addr, data, COWMM_PAGE_SIZE,
				       wp, wake);
	if (ret)
		goto out;
served:
	/* The origin no longer needs this page: the source reuses it. */
	if (cowmm__fmap_set(&o->frames, pg, &cowmm__gone_frame) == 0)
		cowmm__frame_put(f);
out:
	origin_unlock(src);
	return ret;
}
