// SPDX-License-Identifier: MIT
/*
 * Lazy loading of a snapshot file (cowmm_region_load(COWMM_LOAD_LAZY)).
 *
 * The file is checked whole first (format.c), which also yields where each
 * page lies in it.  The region's pages are then dropped and the range is
 * registered for missing faults as well: each page comes in from the file
 * on its first touch, read or write, through UFFDIO_COPY.  A snapshot,
 * clone or release of the region first loads what is left, so that none of
 * them ever sees a page that is neither in memory nor known to be zero; once
 * all is in, the region is handled as a clone whose pages are all
 * materialised (cowmm__lazy_finish_locked()).
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cow.h"
#include "uffd.h"

static void lazy_free(struct cowmm_lazy *l)
{
	if (!l)
		return;
	if (l->fd >= 0)
		close(l->fd);
	free(l->off);
	free(l->loaded);
	free(l);
}

/* Every page is in: the file and the index go; the bitmap stays (all 1). */
static void lazy_done(struct cowmm_lazy *l)
{
	if (l->fd >= 0)
		close(l->fd);
	l->fd = -1;
	free(l->off);
	l->off = NULL;
}

/* The page's bytes from the file (or zeros); -EIO when it cannot be read. */
static int lazy_read(const struct cowmm_lazy *l, size_t pg, void *dst)
{
	if (!l->off[pg]) {
		memset(dst, 0, COWMM_PAGE_SIZE);
		return 0;
	}
	return cowmm__read_at(l->fd, dst, COWMM_PAGE_SIZE, (off_t)l->off[pg])
		       ? -EIO
		       : 0;
}

/*
 * Fill page @pg from the file and mark it loaded.  A page that cannot be
 * read any more (the disk failed, the file was truncated behind our back)
 * is poisoned: the thread touching it gets SIGBUS rather than wrong bytes.
 * Call with r->lock held.
 */
void (*cowmm__lazy_filling)(uintptr_t addr);

static int lazy_fill_locked(cowmm_region_t *r, struct cowmm_lazy *l,
			    size_t pg, bool wake)
{
	void (*hook)(uintptr_t);
	unsigned char page[COWMM_PAGE_SIZE]
		__attribute__((aligned(COWMM_PAGE_SIZE)));
	uintptr_t addr = cowmm__page_addr(r, pg);
	/* The layout holds every move followed: r->lock is held. */
	unsigned seq = cowmm__maps_handled(r->mm);
	int ret;

	/*
	 * A move of the page read and not followed yet: @addr may be where
	 * it was.  MREMAP_DONTUNMAP leaves that range mapped, empty and
	 * registered: the copy went there, the page was marked loaded, and
	 * at its new address it read zero (the model tester's seed 396,
	 * a snapshot ending the load while the page moved).
	 */
	if (cowmm__moved_since(r->mm, seq, addr, COWMM_PAGE_SIZE))
		return -EAGAIN;
	hook = __atomic_load_n(&cowmm__lazy_filling, __ATOMIC_ACQUIRE);
	if (cowmm__unlikely(hook != NULL))
		hook(addr);
	/* Filled only where no move landed meanwhile (manager.c). */
	if (!l->off[pg]) { /* not stored: the shared zero page, no memory */
		ret = cowmm__fill_unmoved(r->mm, seq, addr, NULL, false, wake);
	} else if (lazy_read(l, pg, page)) {
		cowmm__log(COWMM_LOG_ERR,
			   "lazy load: page %zu cannot be read from the file; "
			   "poisoned",
			   pg);
		ret = cowmm__fill_unmoved(r->mm, seq, addr, NULL, true, wake);
		if (!ret)
			l->poisoned++;
	} else {
		ret = cowmm__fill_unmoved(r->mm, seq, addr, page, false, wake);
	}
	/*
	 * -EEXIST: a page is there already.  With a move of the region's
	 * read but not handled (it waits for r->lock), perhaps another page
	 * of it, moved there: this one is not loaded yet (-EAGAIN).
	 */
	if (ret == -EEXIST && cowmm__maps_pending(r->mm))
		return -EAGAIN;
	/*
	 * One read while it copied (the ioctl waits for an unread one to be
	 * read): perhaps filled where the page was.  Not loaded: filled
	 * again where the move put it (-EEXIST there if it took the bytes).
	 */
	if ((!ret || ret == -EEXIST) &&
	    cowmm__moved_since(r->mm, seq, addr, COWMM_PAGE_SIZE))
		return -EAGAIN;
	if (!ret || ret == -EEXIST) {
		cowmm__set_bit(l->loaded, pg);
		if (!--l->left)
			lazy_done(l);
	}
	return ret;
}

/*
 * A missing fault on a region being loaded: its page from the file, or,
 * for a page loaded and then discarded (MADV_DONTNEED), zeros.
 * Call with r->lock held.
 */
int cowmm__lazy_fault_locked(cowmm_region_t *r, size_t pg, bool wake)
{
	uintptr_t addr = cowmm__page_addr(r, pg);

	if (!cowmm__test_bit(r->lazy->loaded, pg))
		return lazy_fill_locked(r, r->lazy, pg, wake);
	/*
	 * Loaded, then discarded: zero.  If a snapshot still shares the page
	 * (its discard preserved it, or it was never written since), the
	 * zeros go in write-protected, as a clone's do (region.c).
	 */
	if (cowmm__shared_locked(r, pg))
		return cowmm__uffd_copy(r->mm->uffd, addr,
					cowmm__frame_data(&cowmm__zero_frame),
					COWMM_PAGE_SIZE, true, wake);
	return cowmm__uffd_zeropage(r->mm->uffd, addr, COWMM_PAGE_SIZE, wake);
}

/*
 * Load every page not loaded yet.  -EIO if the file could not give some
 * page (poisoned): nothing may then copy the region as if it were whole;
 * -EAGAIN while pages of the region move (try again once that move is
 * handled, without r->lock).  Call with r->lock held.
 *
 * The range stays registered for missing faults too, for good: the region
 * is then a clone with every page materialised (r->present all set), whose
 * discarded pages read as zero through a missing fault.  Going back to a
 * plain write-protect registration took an unregister and a register of
 * each run, and pages the application moved in between left with no
 * userfaultfd on them: no event told the library, which lost them (every
 * snapshot after that failed with -ENOENT, and writes there copied for
 * none).
 */
int cowmm__lazy_finish_locked(cowmm_region_t *r)
{
	struct cowmm_lazy *l = r->lazy;
	bool again = false;
	size_t pg;
	int ret = 0;

	if (!l)
		return 0;
	for (pg = 0; l->left && pg < r->npages; pg++) {
		if (cowmm__test_bit(l->loaded, pg))
			continue;
		if (r->holes && cowmm__test_bit(r->holes, pg)) {
			cowmm__lazy_discard_locked(r, pg, 1); /* unmapped */
			continue;
		}
		ret = lazy_fill_locked(r, l, pg, true);
		if (ret == -EAGAIN) /* moving: the others meanwhile */
			again = true;
		else if (ret && ret != -EEXIST)
			return ret;
	}
	if (again)
		return -EAGAIN;
	if (l->poisoned)
		return -EIO;
	if (!r->present) {
		size_t len = cowmm__bitmap_bytes(r->npages);
		void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED)
			return -ENOMEM;
		memset(p, 0xff, len);
		r->present = p;
	}
	lazy_free(l);
	r->lazy = NULL;
	return 0;
}

/*
 * cowmm__lazy_finish_locked(), again while pages of the region move under
 * it: r->lock is let go between two rounds, so that the moves are followed,
 * and each round loads what does not move.  -ENOENT when they never settle
 * (cowmm__moved_again()).  Call with r->lock held; returns with it held.
 */
int cowmm__lazy_finish_moving(cowmm_region_t *r)
{
	uint64_t since = 0;
	int ret, rounds = 0;

	for (;;) {
		/* The lock is let go below. */
		cowmm__uffd_patience(&r->mm->maps_behind);
		ret = cowmm__lazy_finish_locked(r);
		cowmm__uffd_patience(NULL);
		if (ret != -EAGAIN)
			break;
		pthread_mutex_unlock(&r->lock);
		cowmm__wait_events(r->mm);
		if (!cowmm__moved_again(r->mm, &rounds, &since))
			ret = -ENOENT;
		pthread_mutex_lock(&r->lock);
		if (ret == -ENOENT)
			break;
	}
	return ret;
}

/*
 * The application discarded pages of a region being loaded: they read as
 * zero from now on, not as the file's.  Call with r->lock held.
 */
void cowmm__lazy_discard_locked(cowmm_region_t *r, size_t pg, size_t n)
{
	struct cowmm_lazy *l = r->lazy;
	size_t i;

	for (i = pg; l && i < pg + n && i < r->npages; i++)
		if (!cowmm__test_bit(l->loaded, i)) {
			cowmm__set_bit(l->loaded, i);
			if (!--l->left)
				lazy_done(l);
		}
}

void cowmm__lazy_free(cowmm_region_t *r)
{
	lazy_free(r->lazy);
	r->lazy = NULL;
}

/*
 * Make @r load from @fd (checked already; @off as above, taken over) on
 * demand.  The region must have nothing that shares its pages.
 */
int cowmm__lazy_start(cowmm_region_t *r, int fd, uint64_t *off)
{
	struct cowmm_lazy *l = calloc(1, sizeof(*l));
	int ret, err;

	if (!l) {
		free(off);
		return -ENOMEM;
	}
	l->off = off;
	l->left = r->npages;
	l->loaded = calloc(1, cowmm__bitmap_bytes(r->npages));
	l->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (!l->loaded || l->fd < 0) {
		ret = l->fd < 0 ? -errno : -ENOMEM;
		lazy_free(l);
		return ret;
	}

	/*
	 * Discards read so far are the old content's: handled once the load
	 * is under way, they would take its pages for discarded ones, zero
	 * instead of the file's (session 10's outside review).
	 */
	cowmm__wait_events(r->mm);
	pthread_mutex_lock(&r->mm->lock);
	pthread_mutex_lock(&r->lock);
	if (r->lazy && !r->lazy->left && !r->lazy->poisoned) {
		lazy_free(r->lazy); /* a finished load: start afresh */
		r->lazy = NULL;
	}
	ret = r->magic != COWMM_MAGIC_REGION ? -EBADF
	      : r->lazy ? -EBUSY
	      /* partly unmapped (cannot be emptied) or moved */
	      : r->holes || cowmm__in_pieces(r) ? -EINVAL
	      : r->snaps || r->pins.nrec ? -EBUSY
	      : r->origin || r->view_of ? -EINVAL
	      : r->mm->flags & COWMM_OPEN_IN_THREAD ? -EOPNOTSUPP
	      : !(r->mm->features & UFFD_FEATURE_POISON)
		      ? -EOPNOTSUPP
		      : 0;
	/*
	 * Drop the old content (nothing shares it) while the range is not
	 * registered, so that no REMOVE event comes back to us, then
	 * register it for missing faults too: from here on every touch of
	 * a page not loaded comes to us.
	 */
	if (!ret)
		ret = cowmm__uffd_unregister(r->mm->uffd, r->base, r->len);
	if (!ret) {
		if (madvise((void *)r->base, r->len, MADV_DONTNEED) < 0)
			ret = -errno;
		/* Missing faults only with the lazy state in place. */
		err = cowmm__uffd_register(r->mm->uffd, r->base, r->len,
					   ret ? UFFDIO_REGISTER_MODE_WP
					       : UFFDIO_REGISTER_MODE_MISSING |
							 UFFDIO_REGISTER_MODE_WP,
					   NULL);
		if (err && !ret) /* keep the region managed, as it was */
			cowmm__uffd_register(r->mm->uffd, r->base, r->len,
					     UFFDIO_REGISTER_MODE_WP, NULL);
		ret = ret ? ret : err;
	}
	if (!ret)
		r->lazy = l;
	pthread_mutex_unlock(&r->lock);
	pthread_mutex_unlock(&r->mm->lock);
	if (ret)
		lazy_free(l);
	return ret;
}
