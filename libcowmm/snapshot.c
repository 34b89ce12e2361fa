// SPDX-License-Identifier: MIT
/*
 * Snapshots: creation, lock-free reads, release.
 *
 * A snapshot holds a frame for every page written since it was taken; every
 * other page it still shares with its region.  A reader copies the shared
 * live page and then checks whether a frame was published meanwhile: the
 * fault path publishes the frame before it clears the page's protection, so
 * a reader that finds no frame after its copy has copied bytes nobody had
 * changed yet (a seqlock-style protocol with the frame slot as sequence).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cow.h"
#include "uffd.h"

#define READ_BATCH 512 /* pages whose residency one mincore() call asks */

int cowmm__check_snap(const cowmm_snap_t *s)
{
	if (!s)
		return -EINVAL;
	if (s->magic != COWMM_MAGIC_SNAP)
		return -EBADF;
	if (s->mm->fork_gen != cowmm__fork_gen())
		return -ECHILD;
	return 0;
}

void (*cowmm__after_protect)(cowmm_region_t *r);

/* The test hook, set by another thread: read atomically. */
static inline void after_protect(cowmm_region_t *r)
{
	void (*fn)(cowmm_region_t *) =
		__atomic_load_n(&cowmm__after_protect, __ATOMIC_ACQUIRE);

	if (cowmm__unlikely(fn != NULL))
		fn(r);
}

void (*cowmm__restore_copying)(cowmm_region_t *r, int stage, uintptr_t addr,
			       size_t len);

static inline void restore_copying(cowmm_region_t *r, int stage,
				   uintptr_t addr, size_t len)
{
	void (*fn)(cowmm_region_t *, int, uintptr_t, size_t) =
		__atomic_load_n(&cowmm__restore_copying, __ATOMIC_ACQUIRE);

	if (cowmm__unlikely(fn != NULL))
		fn(r, stage, addr, len);
}

void (*cowmm__read_sampled)(uintptr_t addr);

static inline void read_sampled(uintptr_t addr)
{
	void (*fn)(uintptr_t) =
		__atomic_load_n(&cowmm__read_sampled, __ATOMIC_ACQUIRE);

	if (cowmm__unlikely(fn != NULL))
		fn(addr);
}

/* Mark @s broken: its reads fail with -EIO from now on. */
void cowmm__snap_break(cowmm_snap_t *s, const char *why)
{
	if (__atomic_exchange_n(&s->broken, true, __ATOMIC_RELEASE))
		return;
	cowmm__count(s->mm, broken, 1);
	cowmm__log(COWMM_LOG_ERR, "snapshot %p of %#lx is broken: %s",
		   (void *)s, (unsigned long)s->base, why);
}

/*
 * A write-pinned page changes without faults: the new snapshot gets its copy
 * now, as the kernel copies pinned pages at fork().  Faults on it later find
 * nothing to preserve.  Call with r->lock held, the snapshot linked; the
 * lock is dropped while a pending discard is waited for (cow.c).
 */
static int copy_write_pinned(cowmm_region_t *r)
{
	size_t pg;
	int ret = 0;

	if (!r->pins.wpages)
		return 0;
	for (pg = cowmm__pins_next_write(&r->pins, 0); pg < r->npages;
	     pg = cowmm__pins_next_write(&r->pins, pg + 1))
		/*
		 * -EIO: the page's content was lost already (a clone's
		 * origin lost it): the new snapshot is broken there, as
		 * the page itself is, and is handed out all the same.
		 */
		if (cowmm__cow_claim(r, pg, COWMM_COW_READ,
				     &r->mm->cnt.pin_copies) == -ENOMEM)
			ret = -ENOMEM;
	return ret;
}

/*
 * Take a snapshot of @r: a user's, or (@internal) a clone's origin.
 * Call with mm->lock held.
 */
int cowmm__snap_create_locked(cowmm_region_t *r, bool internal,
			      cowmm_snap_t **out)
{
	cowmm_t *mm = r->mm;
	cowmm_snap_t *s;
	int ret;

	if (r->magic != COWMM_MAGIC_REGION)
		return -EBADF;
	if (!(mm->features & UFFD_FEATURE_WP_UNPOPULATED))
		return -EOPNOTSUPP;
	if (atomic_load(&mm->uffd_lost))
		return -EIO; /* nothing could protect it */
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->magic = COWMM_MAGIC_SNAP;
	s->mm = mm;
	s->base = __atomic_load_n(&r->base, __ATOMIC_ACQUIRE); /* a REMAP */
	s->len = r->len;
	s->npages = r->npages;
	s->internal = internal;
	ret = cowmm__fmap_init(&s->frames, s->npages);
	if (ret)
		goto err_free;

	pthread_mutex_lock(&r->lock);
	if (r->epoch == UINT32_MAX) {
		ret = -EOVERFLOW;
		goto err_unlock;
	}
	/*
	 * A region still loading lazily loads the rest first.  Neither
	 * waits long for an event to be read while moves wait for the lock
	 * (-EAGAIN: the caller lets go of it, waits for the moves and comes
	 * back; cowmm__uffd_patience()).
	 */
	cowmm__uffd_patience(&mm->maps_behind);
	ret = cowmm__lazy_finish_locked(r);
	if (ret) {
		cowmm__uffd_patience(NULL);
		goto err_unlock;
	}
	/*
	 * Protect every page, unpopulated ones included.  Faults wait on
	 * r->lock meanwhile; once it is dropped, each sees this snapshot.
	 */
	ret = cowmm__region_wp(r, true);
	after_protect(r);
	/*
	 * The kernel protects what is mapped in a range and skips the rest:
	 * pages moved away (a REMAP read or not, but not handled: it waits
	 * for r->lock) are not protected at their new address.  Then the
	 * caller waits for the move and takes the snapshot again.  Every
	 * piece mapped is not enough: the range pages left may be taken at
	 * once by other memory (a program that moves pages away and back
	 * keeps the ranges held), so a move read but not handled counts
	 * too; checked after, since that memory comes only once mremap()
	 * returned, when its event was read.
	 */
	if (!ret && (!cowmm__region_mapped(r) || cowmm__maps_pending(mm)))
		ret = -EAGAIN;
	cowmm__uffd_patience(NULL);
	if (ret)
		goto err_unlock;
	s->epoch = ++r->epoch;
	s->region = r;
	s->next = r->snaps;
	r->snaps = s;
	ret = copy_write_pinned(r);
	if (ret) {
		/* A snapshot without its pinned pages is never handed out. */
		r->snaps = s->next;
		goto err_unlock;
	}
	pthread_mutex_unlock(&r->lock);
	if (!internal) {
		s->mm_next = mm->snaps;
		if (s->mm_next)
			s->mm_next->mm_prev = s;
		mm->snaps = s;
		cowmm__count(mm, snapshots_live, 1);
	}
	*out = s;
	return 0;

err_unlock:
	pthread_mutex_unlock(&r->lock);
	cowmm__fmap_fini(&s->frames);
err_free:
	free(s);
	return ret;
}

/*
 * cowmm__snap_create_locked() once the unmaps and moves read so far are
 * handled, and again while pages of @r move or leave it under the call.
 * Returns with mm->lock held.
 */
int cowmm__snap_create(cowmm_region_t *r, bool internal, cowmm_snap_t **out)
{
	uint64_t since = 0;
	int ret, rounds = 0;

	for (;;) {
		cowmm__wait_events(r->mm);
		pthread_mutex_lock(&r->mm->lock);
		ret = cowmm__snap_create_locked(r, internal, out);
		if (ret != -EAGAIN && ret != -ENOENT)
			return ret;
		pthread_mutex_unlock(&r->mm->lock);
		if (!cowmm__moved_again(r->mm, &rounds, &since)) {
			/* never settled: as if unmapped */
			pthread_mutex_lock(&r->mm->lock);
			return -ENOENT;
		}
	}
}

int cowmm_snapshot(cowmm_region_t *r, cowmm_snap_t **out)
{
	int ret = cowmm__check_region(r);

	if (ret)
		return ret;
	if (!out)
		return -EINVAL;
	ret = cowmm__snap_create(r, false, out);
	pthread_mutex_unlock(&r->mm->lock);
	return ret;
}

/*
 * The content of page @pg of @s into @dst, under the lock of the region it
 * was taken of: the slow path that never touches memory faulting into the
 * library.  Call with no lock of an ancestor of that region held.
 * Returns 0, -EIO when the content is lost (a broken snapshot), or
 * -EAGAIN while a discard is pending, or in a worker when a lock is busy.
 */
int cowmm__snap_page(cowmm_snap_t *s, size_t pg, void *dst)
{
	struct cowmm_frame *f;
	cowmm_region_t *r;
	int ret = 0;

	urcu_bp_read_lock();
	r = __atomic_load_n(&s->region, __ATOMIC_ACQUIRE);
	if (r) {
		if (cowmm__lock(&r->lock)) {
			urcu_bp_read_unlock();
			return -EAGAIN; /* a worker: retried later */
		}
		if (__atomic_load_n(&s->region, __ATOMIC_ACQUIRE) != r) {
			pthread_mutex_unlock(&r->lock); /* detached meanwhile */
			r = NULL;
		}
	}
	f = cowmm__fmap_get(&s->frames, pg);
	if (f == &cowmm__zero_frame || cowmm__frame_real(f))
		memcpy(dst, cowmm__frame_data(f), COWMM_PAGE_SIZE);
	else if (!f && r && s->epoch > r->wgen[pg])
		ret = cowmm__region_read_page(r, pg, dst, true);
	else
		ret = -EIO; /* changed without a frame for @s: lost */
	if (r)
		pthread_mutex_unlock(&r->lock);
	urcu_bp_read_unlock();
	return ret;
}

size_t cowmm_snap_size(const cowmm_snap_t *s)
{
	return cowmm__check_snap(s) ? 0 : s->len;
}

/*
 * Page @pg of @s changed behind the library's back while @s still shared it
 * (discarded by MADV_DONTNEED, say): the REMOVE event is being handled.
 * Wait until it has preserved the page or broken the snapshot.  Called in
 * an RCU read section, which it leaves while it sleeps.
 */
/*
 * How long a read waits for an event already read to be handled: a bound
 * of time, not of rounds (20,000 sleeps of 100 us ran out under load, a
 * read then said -EIO while a move was still being handled: the ASan
 * build of exact/read-during-move in a loaded test run).
 */
#define EVENT_WAIT_NS (10 * 1000 * 1000 * 1000ull)

static struct cowmm_frame *wait_event(cowmm_snap_t *s, size_t pg)
{
	uint64_t start = cowmm__now_ns();
	struct cowmm_frame *f;

	do { /* the event is already read */
		f = cowmm__fmap_get(&s->frames, pg);
		if (f || __atomic_load_n(&s->broken, __ATOMIC_ACQUIRE))
			return f;
		urcu_bp_read_unlock();
		usleep(100);
		urcu_bp_read_lock();
	} while (cowmm__now_ns() - start < EVENT_WAIT_NS);
	return NULL;
}

/*
 * Is the page that was at @addr being moved or unmapped?  A REMAP read and
 * not handled, nothing mapped there any more (mremap() and munmap() take
 * the pages first and send their event after), or a move or unmap read
 * since the layout was taken (@maps: cowmm__maps_seq() then; other memory
 * may be there now, a placeholder).  The region follows (or the page
 * leaves it) once the event is handled: reading again settles it.
 */
void (*cowmm__snap_read_checked)(uintptr_t addr);

static bool moving(cowmm_t *mm, uintptr_t addr, unsigned maps)
{
	/*
	 * Other memory may already be mapped where the page was, unprotected
	 * (exact/read-checked-moved-unread: the read waited 10 s for a copy
	 * no discard would make, and said -EIO).
	 */
	return atomic_load(&mm->remaps_pending) ||
	       cowmm__maps_seq(mm) != maps ||
	       cowmm__page_leaving(mm,
				   addr & ~(uintptr_t)(COWMM_PAGE_SIZE - 1));
}

/*
 * Copy @n bytes at @in of page @pg of @s into @dst.  @e is the page's
 * pagemap entry, read before at @addr (where the region's layout put the
 * page then; it may have moved since, see moving()): a page the snapshot
 * still shares is always write-protected, present or never populated (a
 * uffd-wp marker, which reads as zero without being touched).  A page
 * without the uffd-wp bit, or one that lost it while it was copied, was
 * discarded under the snapshot (@before: the last discard read before @e
 * was).
 * Call inside an RCU read section.
 */
static int read_page(cowmm_snap_t *s, size_t pg, size_t in, size_t n,
		     uint64_t e, uintptr_t addr, uint32_t before, unsigned maps,
		     bool swap, char *dst)
{
	/*
	 * The region first, then the frame slot: a release publishes every
	 * frame before it detaches (release order), so a snapshot found
	 * detached has all it will ever have.
	 */
	cowmm_region_t *r = __atomic_load_n(&s->region, __ATOMIC_ACQUIRE);
	struct cowmm_frame *f = cowmm__fmap_get(&s->frames, pg);

	if (!f && r && r->origin && !(e & PM_PRESENT)) {
		/* A clone's page may still be its origin's. */
		unsigned char page[COWMM_PAGE_SIZE];
		int ret;

		while ((ret = cowmm__snap_page(s, pg, page)) == -EAGAIN) {
			/* A discard pending: let it be handled first. */
			urcu_bp_read_unlock();
			cowmm__wait_discards(s->mm);
			usleep(100);
			urcu_bp_read_lock();
		}
		memcpy(dst, page + in, n);
		return ret;
	}
	if (!f && r) {
		uint64_t e2;

		if ((r->holes && cowmm__test_bit(r->holes, pg)) ||
		    ((e & PM_UFFD_WP) && !(e & PM_PRESENT) && !swap) ||
		    cowmm__pm_is_marker(s->mm, e)) {
			/*
			 * Unmapped (left the region), or never populated:
			 * with swap, only an entry that is a marker for sure
			 * (a read of it faults in a range registered for
			 * missing faults too, and cannot be made).
			 */
			memset(dst, 0, n);
		} else if (!(e & PM_UFFD_WP)) {
			/*
			 * Lost its protection: a discard or an unmap whose
			 * event is being handled (wait for it), or a page
			 * MADV_FREE left that the kernel dropped, with no
			 * event: zero, as it was allowed to read (region.c,
			 * read_verified()).
			 */
			int dropped = cowmm__dropped_quietly(s->mm, addr,
							     before);

			if (dropped == 1) {
				f = cowmm__fmap_get(&s->frames, pg);
				if (!f) {
					memset(dst, 0, n);
					return 0;
				}
			} else if (dropped < 0 || moving(s->mm, addr, maps)) {
				/* @e was read where the page no longer is. */
				return -EAGAIN;
			} else {
				f = wait_event(s, pg);
				if (!f)
					return -EIO;
			}
		} else {
			void (*hook)(uintptr_t) = __atomic_load_n(
				&cowmm__snap_read_checked, __ATOMIC_ACQUIRE);
			int tries;

			if (cowmm__unlikely(hook != NULL))
				hook(addr);
			for (tries = 0; tries < 3; tries++) {
				if (cowmm__live_read(addr + in, dst, n))
					e2 = 0; /* unmapped behind our back */
				else if (cowmm__pagemap_read(s->mm->pagemap,
							     addr, 1, &e2))
					e2 = e;
				/* Our loads of the live page come first. */
				atomic_thread_fence(memory_order_acquire);
				f = cowmm__fmap_get(&s->frames, pg);
				if (f || !(e2 & PM_UFFD_WP) ||
				    (e & PM_PFN_MASK) == (e2 & PM_PFN_MASK))
					break;
				e = e2; /* protected but migrated: again */
			}
			if (!f && (!(e2 & PM_UFFD_WP) ||
				   (e & PM_PFN_MASK) != (e2 & PM_PFN_MASK))) {
				if (moving(s->mm, addr, maps))
					return -EAGAIN; /* maybe another page */
				f = wait_event(s, pg);
				if (!f)
					return -EIO;
			}
		}
		if (!f)
			f = cowmm__fmap_get(&s->frames, pg);
		if (!f)
			return 0; /* unchanged since taken */
	}
	if (!f)
		return -EIO; /* detached without it: broken */
	memcpy(dst, (const char *)cowmm__frame_data(f) + in, n);
	return 0;
}

/* How many of pages [@pg0, @pg0 + @np) of @r have left it. */
static size_t count_holes(cowmm_region_t *r, size_t pg0, size_t np)
{
	size_t i, n = 0;

	for (i = 0; i < np; i++)
		n += cowmm__hole(r, pg0 + i);
	return n;
}

/*
 * A batch read while moves or unmaps were read or on their way: of any
 * region of the manager (the second review of session 11: a thread that
 * keeps moving pages of another region made reads of this one start over
 * until they said -EIO).  It stands if those read are handled, the region
 * still has the layout the batch was read by (a move of its pages
 * publishes a new one), none of its pages left it, and no event is on its
 * way now.  Call inside an RCU read section (@lay0 is not reused).
 */
static bool batch_settled(cowmm_t *mm, cowmm_region_t *r,
			  const struct cowmm_layout *lay0, size_t holes0,
			  size_t pg0, size_t np, uintptr_t addr)
{
	return !cowmm__maps_pending(mm) &&
	       __atomic_load_n(&r->layout, __ATOMIC_ACQUIRE) == lay0 &&
	       count_holes(r, pg0, np) == holes0 &&
	       cowmm__uffd_range_probe(mm->uffd, addr, COWMM_PAGE_SIZE) == 0;
}

ssize_t cowmm_snap_read(cowmm_snap_t *s, size_t off, void *buf, size_t len)
{
	uint64_t entry[READ_BATCH];
	cowmm_region_t *r;
	size_t done = 0, done0;
	const struct cowmm_layout *lay0;
	size_t holes0, np0;
	uint64_t waited = 0;
	uint32_t before;
	unsigned maps;
	bool swap, stamped;
	int ret = cowmm__check_snap(s);

	if (ret)
		return ret;
	if (!buf && len)
		return -EINVAL;
	if (__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE))
		return -EIO;
	if (off >= s->len)
		return 0;
	if (len > s->len - off)
		len = s->len - off;
	swap = cowmm__swap_possible();
	/* Wait only for discards read before the call (manager.c). */
	stamped = cowmm__stamped;
	if (!stamped) {
		cowmm__stamp = cowmm__removes_stamp(s->mm);
		cowmm__stamped = true;
	}

	urcu_bp_read_lock();
	while (done < len && !ret) {
		size_t pg0 = (off + done) >> COWMM_PAGE_SHIFT, np, i;
		uintptr_t base = 0;

		np = ((off + len - 1) >> COWMM_PAGE_SHIFT) - pg0 + 1;
		if (np > READ_BATCH)
			np = READ_BATCH;
		before = cowmm__removes_stamp(s->mm); /* before pagemap */
		maps = cowmm__maps_seq(s->mm);
		/*
		 * A move or unmap read, not handled: the layout may still put
		 * pages where they no longer are, and once it is handled, what
		 * is mapped there then (an unprotected page, no event since
		 * the stamp) would pass for a page the kernel dropped after
		 * MADV_FREE.  Wait for it; one read from now on changes the
		 * stamp (count_event()).
		 */
		if (atomic_load(&s->mm->remaps_pending) ||
		    atomic_load(&s->mm->unmaps_pending)) {
			ret = -EAGAIN;
			np = 0;
		}
		r = __atomic_load_n(&s->region, __ATOMIC_ACQUIRE);
		/* Before the run is found in it: batch_settled(). */
		lay0 = r ? __atomic_load_n(&r->layout, __ATOMIC_ACQUIRE) : NULL;
		np0 = np; /* the holes of all of it, before it is cut */
		holes0 = r && np ? count_holes(r, pg0, np) : 0;
		if (r && np) /* one piece, as the layout is now */
			base = cowmm__page_run(r, pg0, &np);
		if (r && np)
			read_sampled(base);
		if (np && (!r || cowmm__pagemap_read(s->mm->pagemap, base, np,
						     entry)))
			for (i = 0; i < np; i++)
				entry[i] = PM_PRESENT | PM_UFFD_WP;
		done0 = done;
		for (i = 0; i < np && done < len && !ret; i++) {
			size_t in = (off + done) & (COWMM_PAGE_SIZE - 1);
			size_t n = COWMM_PAGE_SIZE - in;

			if (n > len - done)
				n = len - done;
			ret = read_page(s, pg0 + i, in, n, entry[i],
					base + (i << COWMM_PAGE_SHIFT), before,
					maps, swap, (char *)buf + done);
			if (ret != -EAGAIN)
				done += n;
		}
		/*
		 * A page protected that kept its frame across the copy may
		 * still be other memory: pages moved away after the layout was
		 * taken, and memory another userfaultfd protects mapped where
		 * they were (the third outside review: 49-55 reads in 300 gave
		 * its bytes).  The batch stands only if no move or unmap was
		 * read since nor is on its way (one question to the kernel
		 * per batch, cowmm__still_ours()); else it is read again.
		 */
		for (i = 0; !ret && r && i < np && cowmm__hole(r, pg0 + i);
		     i++)
			; /* a hole is nobody's to ask about */
		if (!ret && r && i < np &&
		    !cowmm__still_ours(s->mm, maps,
				       base + (i << COWMM_PAGE_SHIFT)) &&
		    !batch_settled(s->mm, r, lay0, holes0, pg0, np0,
				   base + (i << COWMM_PAGE_SHIFT))) {
			done = done0;
			ret = -EAGAIN;
		}
		if (!ret)
			waited = 0; /* the 10 s below are per batch */
		if (ret == -EAGAIN) {
			/* Moved or unmapped under us: look again, up to
			 * EVENT_WAIT_NS. */
			urcu_bp_read_unlock();
			if (!waited)
				waited = cowmm__now_ns();
			if (cowmm__now_ns() - waited > EVENT_WAIT_NS)
				ret = -EIO;
			else
				ret = 0;
			usleep(100);
			urcu_bp_read_lock();
		}
	}
	urcu_bp_read_unlock();
	cowmm__stamped = stamped;
	if (ret || __atomic_load_n(&s->broken, __ATOMIC_ACQUIRE))
		return -EIO;
	return (ssize_t)done;
}

#define DRAIN_BATCH 512

/*
 * Unprotect the pages of [@pg, @pg + @n) of @r, which no snapshot needs
 * any more, in one ioctl (one TLB flush).  @e: their pagemap entries.
 * Never-populated pages at either end are left out: their uffd-wp markers
 * stay, and the next snapshot need not install them again (a region mostly
 * never written, a database's heap reserved ahead, costs nothing to keep).
 * A failed ioctl (an event pending, say) only costs the faults it would
 * have saved: they find the pages writable in this epoch and reuse them.
 * Call with r->lock held.
 */
static void drain_run(cowmm_region_t *r, size_t pg, size_t n,
		      const uint64_t *e)
{
	while (n && !(e[0] & PM_PRESENT)) {
		pg++;
		e++;
		n--;
	}
	while (n && !(e[n - 1] & PM_PRESENT))
		n--;
	if (n)
		(void)cowmm__uffd_wp(r->mm->uffd, cowmm__page_addr(r, pg),
				     n << COWMM_PAGE_SHIFT, false, false);
}

/*
 * Runs of [@first, @first + @n), pages of one piece of @r, that no
 * snapshot needs become writable in the current epoch and are unprotected.
 * Call with r->lock held.
 */
static void drain_piece(cowmm_region_t *r, size_t first, size_t n)
{
	uint64_t e[DRAIN_BATCH];
	size_t i, run = 0;

	if (cowmm__pagemap_read(r->mm->pagemap, cowmm__page_addr(r, first), n,
				e))
		for (i = 0; i < n; i++)
			e[i] = PM_PRESENT; /* unknown: clear them all */
	for (i = 0; i <= n; i++) {
		size_t pg = first + i;

		if (i < n && !(r->holes && cowmm__test_bit(r->holes, pg)) &&
		    cowmm__cow_claim_unshared(r, pg)) {
			run++;
			continue;
		}
		if (run)
			drain_run(r, pg - run, run, e + i - run);
		run = 0;
	}
}

static void drain_batch(cowmm_region_t *r, size_t first, size_t n)
{
	while (n) {
		size_t k = cowmm__page_span(r, first, n);

		drain_piece(r, first, k);
		first += k;
		n -= k;
	}
}

/*
 * A stream that releases as it goes (cowmm_snap_stream()) has read every
 * page of @s below @upto: @s lets go of them.  The frames it held for them
 * are dropped, and each run of them no other snapshot shares is
 * unprotected in one ioctl, so the application's writes behind the stream
 * stop faulting.  Under the region's lock, as a fault is, so that no
 * snapshot is taken between the decision and the ioctl.
 */
void cowmm__snap_drain(cowmm_snap_t *s, size_t upto)
{
	cowmm_region_t *r;
	size_t pg, n, from = s->drained;

	if (upto > s->npages)
		upto = s->npages;
	if (upto <= from)
		return;
	urcu_bp_read_lock();
	r = __atomic_load_n(&s->region, __ATOMIC_ACQUIRE);
	if (r) {
		pthread_mutex_lock(&r->lock);
		if (__atomic_load_n(&s->region, __ATOMIC_ACQUIRE) != r) {
			pthread_mutex_unlock(&r->lock); /* detached meanwhile */
			r = NULL;
		}
	}
	s->drained = upto;
	for (pg = from; pg < upto; pg++) {
		struct cowmm_frame *f = cowmm__fmap_get(&s->frames, pg);

		if (f) {
			cowmm__fmap_set(&s->frames, pg, NULL); /* has a leaf */
			cowmm__frame_put(f);
		}
	}
	if (r && !r->dying)
		for (pg = from; pg < upto; pg += n) {
			n = upto - pg < DRAIN_BATCH ? upto - pg : DRAIN_BATCH;
			drain_batch(r, pg, n);
		}
	if (r)
		pthread_mutex_unlock(&r->lock);
	urcu_bp_read_unlock();
}

/* Call with mm->lock held. */
void cowmm__snap_release_locked(cowmm_snap_t *s)
{
	cowmm_region_t *r = s->region;
	cowmm_t *mm = s->mm;

	if (s->view)
		cowmm__region_unmap(s->view);
	if (r) {
		cowmm_snap_t **pp;

		pthread_mutex_lock(&r->lock);
		for (pp = &r->snaps; *pp != s; pp = &(*pp)->next)
			;
		*pp = s->next;
		pthread_mutex_unlock(&r->lock);
	}
	cowmm__fmap_fini(&s->frames);
	if (s->internal) {
		free(s); /* never a user handle */
		return;
	}
	if (s->mm_prev)
		s->mm_prev->mm_next = s->mm_next;
	else
		mm->snaps = s->mm_next;
	if (s->mm_next)
		s->mm_next->mm_prev = s->mm_prev;
	atomic_fetch_sub_explicit(&mm->cnt.snapshots_live, 1,
				  memory_order_relaxed);
	s->magic = COWMM_MAGIC_DEAD;
	cowmm__bury(mm, s);
}

void cowmm_snap_release(cowmm_snap_t *s)
{
	cowmm_t *mm;
	int ret;

	if (!s)
		return;
	ret = cowmm__check_snap(s);
	if (ret) {
		if (ret == -EBADF)
			cowmm__log(COWMM_LOG_WARNING,
				   "cowmm_snap_release: snapshot %p was "
				   "already released", (void *)s);
		return;
	}
	mm = s->mm;
	pthread_mutex_lock(&mm->lock);
	if (s->magic == COWMM_MAGIC_SNAP)
		cowmm__snap_release_locked(s);
	pthread_mutex_unlock(&mm->lock);
}

/* ------------------------------------------------------------------------ */
/* Views */

int cowmm_snap_map(cowmm_snap_t *s, const void **view)
{
	cowmm_region_t *v;
	cowmm_t *mm;
	int ret = cowmm__check_snap(s);

	if (ret)
		return ret;
	if (!view)
		return -EINVAL;
	if (__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE))
		return -EIO;
	mm = s->mm;
	if (mm->flags & COWMM_OPEN_IN_THREAD)
		return -EOPNOTSUPP; /* a view fills by missing faults */
	/*
	 * The view may be mapped where memory was just unmapped or moved
	 * away: those events first, or their handling would take the view's
	 * pages for the ones that left (as cowmm_region_alloc() does).
	 */
	cowmm__wait_events(mm);
	pthread_mutex_lock(&mm->lock);
	if (!s->view) {
		ret = cowmm__region_map(mm, s->len, COWMM_REGION_NOTHP,
					PROT_READ, UFFDIO_REGISTER_MODE_MISSING,
					&v);
		if (!ret) {
			pthread_mutex_lock(&v->lock);
			v->view_of = s;
			pthread_mutex_unlock(&v->lock);
			s->view = v;
		}
	}
	if (!ret)
		*view = (const void *)s->view->base;
	pthread_mutex_unlock(&mm->lock);
	return ret;
}

/*
 * Fill page @pg of view @v from its snapshot.  The page keeps its physical
 * frame until the snapshot is released.  Call with v->lock held.
 */
int cowmm__view_fill(cowmm_region_t *v, size_t pg, bool wake)
{
	unsigned char page[COWMM_PAGE_SIZE]
		__attribute__((aligned(COWMM_PAGE_SIZE)));

	int ret = cowmm__snap_page(v->view_of, pg, page);

	if (ret == -EAGAIN)
		return ret;
	if (ret && (v->mm->features & UFFD_FEATURE_POISON)) {
		/*
		 * The snapshot lost this page (it is broken): a touch raises
		 * SIGBUS, as a clone's lost page does, never zeros.
		 */
		ret = cowmm__uffd_poison(v->mm->uffd,
					 cowmm__page_addr(v, pg),
					 COWMM_PAGE_SIZE, wake);
		return ret ? ret : -EHWPOISON;
	}
	if (ret)
		memset(page, 0, sizeof(page)); /* no poison: reads say -EIO */
	return cowmm__uffd_copy(v->mm->uffd,
				cowmm__page_addr(v, pg), page,
				COWMM_PAGE_SIZE, false, wake);
}

/* ------------------------------------------------------------------------ */
/* Restore */

/*
 * Copy the snapshot's bytes of pages @pg..@pg + @n - 1 (one piece of the
 * region, unprotected) into place.  Not with stores: a page the
 * application moved there meanwhile, still protected, would fault to a
 * worker that waits for the region's lock we hold (a hang), and nothing
 * mapped there any more would crash us: -EFAULT for those.  -ENOENT when
 * a move or unmap was read since @seq: what is there may not be ours.
 */
static int restore_run(cowmm_snap_t *s, cowmm_region_t *r, size_t pg,
		       size_t n, unsigned seq)
{
	struct iovec iov[64];
	size_t i, done;
	int ret = 0;

	for (done = 0; done < n && !ret; done += i) {
		for (i = 0; i < 64 && done + i < n; i++) {
			struct cowmm_frame *f =
				cowmm__fmap_get(&s->frames, pg + done + i);

			iov[i].iov_base = cowmm__frame_data(f);
			iov[i].iov_len = COWMM_PAGE_SIZE;
		}
		ret = cowmm__live_write_unmoved(r->mm, seq,
						cowmm__page_addr(r, pg + done),
						iov, i);
	}
	if (ret != -EBADF)
		return ret;
	/* This system refuses writes through /proc/self/mem: stores. */
	for (i = 0; i < n; i++)
		memcpy((void *)cowmm__page_addr(r, pg + i),
		       cowmm__frame_data(cowmm__fmap_get(&s->frames, pg + i)),
		       COWMM_PAGE_SIZE);
	return 0;
}

/*
 * Make the region's content @s's again, page by page where it differs: a
 * page differs exactly when @s holds a frame for it.  The region is
 * write-protected first, so that writers wait while their pages change.
 * Each page to restore is first preserved for newer snapshots that still
 * share it; then each run of them is unprotected in one ioctl and copied
 * into, in place: the physical page stays the same, pinned or not.  @s
 * keeps its frames and stays valid.
 *
 * Frames are not moved back with UFFDIO_MOVE: the kernel installs a moved
 * page writable, with no way to protect it in the same step, so a snapshot
 * left sharing it could be changed by a racing write.
 */
int cowmm_snap_restore(cowmm_snap_t *s)
{
	unsigned long *todo = NULL;
	struct cowmm_frame *f;
	cowmm_region_t *r;
	cowmm_t *mm;
	uint64_t since = 0;
	unsigned seq;
	size_t pg;
	int ret = cowmm__check_snap(s), rounds = 0;

	if (ret)
		return ret;
	mm = s->mm;
again:
	/* Unmaps and moves read so far first: it writes into the pages. */
	cowmm__wait_events(mm);
	pthread_mutex_lock(&mm->lock);
	r = s->region;
	if (!r) {
		ret = -ENOENT; /* its region was released */
		goto out_mm;
	}
	if (__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE)) {
		ret = -EIO;
		goto out_mm;
	}
	todo = calloc(1, cowmm__bitmap_bytes(r->npages));
	if (!todo) {
		ret = -ENOMEM;
		goto out_mm;
	}
	pthread_mutex_lock(&r->lock);
	seq = cowmm__maps_seq(mm);
	/* As a snapshot protects: let go when the kernel keeps refusing. */
	cowmm__uffd_patience(&mm->maps_behind);
	ret = cowmm__region_wp(r, true);
	after_protect(r);
	if (ret == -ENOENT || ret == -EAGAIN ||
	    (!ret && (!cowmm__region_mapped(r) || cowmm__maps_pending(mm))))
		ret = -EAGAIN;
	cowmm__uffd_patience(NULL);
	if (ret == -EAGAIN)
		/* Pages moved or unmapped under it, their event not handled
		 * (cowmm__snap_create_locked()); -ENOENT: protecting met
		 * other memory where they were, or nothing; -EAGAIN: it
		 * found a changed page it cannot judge until then. */
		goto moved;
	if (ret)
		goto out;
	/* Protecting again may have found it had lost a page (region.c). */
	if (__atomic_load_n(&s->broken, __ATOMIC_ACQUIRE)) {
		ret = -EIO;
		goto out;
	}
	/* The pages to write back: newer snapshots get them first. */
	for (pg = 0; pg < r->npages; pg++) {
		uintptr_t addr;
		unsigned char vec = 1;

		f = cowmm__fmap_get(&s->frames, pg);
		if (!f || (r->holes && cowmm__test_bit(r->holes, pg)))
			continue; /* unchanged, or it left the region */
		/*
		 * The lock may be dropped meanwhile (a discard pending, or a
		 * page moving): the layout protected may be stale then.
		 */
		restore_copying(r, 3, cowmm__page_addr(r, pg), COWMM_PAGE_SIZE);
		cowmm__cow_claim(r, pg, COWMM_COW_READ,
				 &mm->cnt.detach_copies);
		if (cowmm__maps_seq(mm) != seq)
			goto moved;
		addr = cowmm__page_addr(r, pg);
		if (r->present && mincore((void *)addr, COWMM_PAGE_SIZE, &vec))
			vec = 1;
		if (r->present && !(vec & 1)) {
			/* Not populated in a clone or view: fill, never fault. */
			ret = cowmm__uffd_copy(mm->uffd, addr,
					       cowmm__frame_data(f),
					       COWMM_PAGE_SIZE, false, false);
			if (ret == -ENOENT)
				goto moved; /* nothing mapped there now */
			if (ret && ret != -EEXIST)
				goto wake;
			cowmm__set_bit(r->present, pg);
			/* Its bytes are @s's now, not the origin's. */
			if (!ret && r->origin)
				(void)cowmm__clone_forget(r, pg);
			if (!ret)
				continue;
		}
		cowmm__set_bit(todo, pg);
	}
	/*
	 * Unprotect each run of them in one ioctl, then copy into them in
	 * place.  One ioctl a run, not a page: each must find a moment when
	 * no discard is in flight, and a thread that discards without pause
	 * leaves few (the review's restore under discards never returned).
	 */
	ret = 0;
	for (pg = 0; pg < r->npages && !ret;) {
		size_t n = 0, len;
		uintptr_t addr;

		while (pg + n < r->npages && cowmm__test_bit(todo, pg + n))
			n++;
		if (!n) {
			pg++;
			continue;
		}
		n = cowmm__page_span(r, pg, n);
		addr = cowmm__page_addr(r, pg);
		len = n << COWMM_PAGE_SHIFT;
		restore_copying(r, 0, addr, len);
		/* Lets go while moves wait for the lock, as the protect. */
		cowmm__uffd_patience(&mm->maps_behind);
		ret = cowmm__uffd_wp(mm->uffd, addr, len, false, false);
		cowmm__uffd_patience(NULL);
		if (ret)
			break;
		restore_copying(r, 1, addr, len);
		/*
		 * A move landed before that: another page may be there now,
		 * one that must stay as it is, protected.  (One from here on
		 * is seen before each write, cowmm__live_write_unmoved(),
		 * except memory moved or mapped over the pages: cowmm.h.)
		 * Protecting again may give up too: the restore starts over
		 * from its protect then.
		 */
		if (cowmm__maps_seq(mm) != seq) {
			cowmm__uffd_patience(&mm->maps_behind);
			cowmm__uffd_wp(mm->uffd, addr, len, true, false);
			cowmm__uffd_patience(NULL);
			ret = -ENOENT;
			break;
		}
		restore_copying(r, 2, addr, len);
		ret = restore_run(s, r, pg, n, seq);
		pg += n;
	}
	/*
	 * Pages moved or unmapped under the copy (the application's mremap()
	 * or munmap() of them, racing this call): a run found nothing mapped,
	 * or a page still protected, or a move or unmap was read meanwhile
	 * and a page may have been written where another one is now; or an
	 * unprotect gave up while moves waited for the lock (-EAGAIN).  Wait
	 * for the events and do it again where the pages are now.
	 */
	if (ret == -ENOENT || ret == -EFAULT || ret == -EAGAIN ||
	    (!ret && cowmm__maps_seq(mm) != seq))
		goto moved;
wake:
	/* Writers that faulted meanwhile find their pages resolved. */
	cowmm__region_wake(r);
out:
	pthread_mutex_unlock(&r->lock);
out_mm:
	pthread_mutex_unlock(&mm->lock);
	free(todo);
	return ret;

moved:
	cowmm__region_wake(r);
	pthread_mutex_unlock(&r->lock);
	pthread_mutex_unlock(&mm->lock);
	free(todo);
	todo = NULL;
	if (cowmm__moved_again(mm, &rounds, &since))
		goto again;
	return -ENOENT;
}
