// SPDX-License-Identifier: MIT
/*
 * Regions: takeover of private anonymous memory, the per-page state, and the
 * write-fault decision.
 *
 * A write fault copies if and only if a snapshot still shares the page
 * (the rule and its steps live in cow.c), publishes the copy to exactly
 * those snapshots, and clears the protection; the writer keeps its
 * physical page.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include "cow.h"
#include "uffd.h"

#define RESIDENT_BATCH 4096 /* pages per mincore() call */

int cowmm__check_region(const cowmm_region_t *r)
{
	if (!r)
		return -EINVAL;
	if (r->magic != COWMM_MAGIC_REGION)
		return -EBADF;
	if (r->mm->fork_gen != cowmm__fork_gen())
		return -ECHILD;
	return 0;
}

void *cowmm_region_base(const cowmm_region_t *r)
{
	/* Atomic: a REMAP event may move the region meanwhile (events.c). */
	return cowmm__check_region(r)
		       ? NULL
		       : (void *)__atomic_load_n(&r->base, __ATOMIC_ACQUIRE);
}

size_t cowmm_region_size(const cowmm_region_t *r)
{
	return cowmm__check_region(r) ? 0 : r->len;
}

static bool range_ok(uintptr_t addr, size_t len)
{
	return len && !(addr & (COWMM_PAGE_SIZE - 1)) &&
	       !(len & (COWMM_PAGE_SIZE - 1)) && addr + len > addr;
}

/* Names of anonymous mappings in /proc/self/maps. */
static bool anon_name(const char *path)
{
	return !*path || !strcmp(path, "[heap]") || !strcmp(path, "[stack]") ||
	       !strncmp(path, "[anon:", 6);
}

/*
 * Check that [start, start + len) is mapped, and only by private anonymous
 * memory that is not PROT_NONE: -ENOMEM for a hole, -EINVAL for anything
 * else (shared, file-backed, hugetlbfs, special).
 */
int cowmm__check_maps(pid_t pid, uintptr_t start, size_t len)
{
	uintptr_t cur = start, end = start + len;
	char path[32] = "/proc/self/maps";
	FILE *f;

	if (pid)
		snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	f = fopen(path, "re");
	char *line = NULL;
	size_t cap = 0;
	int ret = 0;

	if (!f)
		return -errno;
	while (cur < end && getline(&line, &cap, f) > 0) {
		unsigned long lo, hi, ino;
		char perms[5], path[256] = "";
		int n;

		n = sscanf(line, "%lx-%lx %4s %*x %*x:%*x %lu %255[^\n]", &lo,
			   &hi, perms, &ino, path);
		if (n < 4) {
			ret = -EIO;
			break;
		}
		if (hi <= cur)
			continue;
		if (lo > cur) {
			ret = -ENOMEM;
			break;
		}
		if (perms[3] != 'p' || ino || !anon_name(path) ||
		    !strncmp(perms, "---", 3)) {
			ret = -EINVAL;
			break;
		}
		cur = hi;
	}
	if (!ret && cur < end)
		ret = -ENOMEM;
	free(line);
	fclose(f);
	return ret;
}

/*
 * Register [base, base + len) in @mode and make it a region; call with
 * mm->lock held.  @listed: a user region (views are not).  @bitmap: keep a
 * bitmap of materialised pages (clones and views).
 */
static int region_take_locked(cowmm_t *mm, uintptr_t base, size_t len,
			      unsigned flags, bool adopted, uint64_t mode,
			      bool listed, bool bitmap, cowmm_region_t **out)
{
	uint64_t ioctls = 0;
	cowmm_region_t *r;
	size_t wlen;
	int ret;

	/* Pages that left a region (holes) may hold new memory now. */
	if (cowmm__rtable_overlaps(mm, base, len))
		return -EEXIST;
	r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->magic = COWMM_MAGIC_REGION;
	r->mm = mm;
	r->base = base;
	r->len = len;
	r->npages = len >> COWMM_PAGE_SHIFT;
	r->flags = flags;
	r->adopted = adopted;
	r->layout = cowmm__layout_one(base, r->npages);
	/* Untouched parts of the page state cost no memory. */
	wlen = r->npages * sizeof(*r->wgen);
	r->wgen = mmap(NULL, wlen, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (!r->layout || r->wgen == MAP_FAILED) {
		ret = -ENOMEM;
		goto err_free;
	}
	if (bitmap) {
		r->present = mmap(NULL, cowmm__bitmap_bytes(r->npages),
				  PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
				  -1, 0);
		if (r->present == MAP_FAILED) {
			r->present = NULL;
			ret = -ENOMEM;
			goto err_unmap;
		}
	}
	ret = cowmm__pins_init(&r->pins, r->npages);
	if (ret)
		goto err_unmap;
	ret = -pthread_mutex_init(&r->lock, NULL);
	if (ret)
		goto err_pins;
	ret = cowmm__uffd_register(mm->uffd, base, len, mode, &ioctls);
	if (ret)
		goto err_mutex;
	if ((mode & UFFDIO_REGISTER_MODE_WP) &&
	    !(ioctls & (UINT64_C(1) << _UFFDIO_WRITEPROTECT))) {
		ret = -EOPNOTSUPP;
		goto err_unregister;
	}
	/*
	 * Which UNMAP events may concern the region (manager.c,
	 * unmap_since()): not one whose unmap came before this memory was
	 * mapped.  Such an event may still be queued (another thread's
	 * munmap() of a range that took in memory mapped here now, not yet
	 * returned: the sixth outside review's munspan; or not even queued
	 * yet, behind another userfaultfd's: the thirteenth's), so count
	 * from once every event in flight, or at least every one queued so
	 * far, is read.
	 */
	r->born_quiet = cowmm__born_maps(mm, &r->born_maps);
	ret = cowmm__rtable_insert(mm, r);
	if (ret)
		goto err_unregister;
	if (listed) {
		r->next = mm->regions;
		mm->regions = r;
		cowmm__count(mm, regions_live, 1);
	}
	*out = r;
	return 0;

err_unregister:
	cowmm__uffd_unregister(mm->uffd, base, len);
err_mutex:
	pthread_mutex_destroy(&r->lock);
err_pins:
	cowmm__pins_fini(&r->pins);
err_unmap:
	if (r->present)
		munmap(r->present, cowmm__bitmap_bytes(r->npages));
err_free:
	if (r->wgen != MAP_FAILED)
		munmap(r->wgen, wlen);
	free(r->layout);
	free(r);
	return ret;
}

int cowmm_region_adopt(cowmm_t *mm, void *addr, size_t len, unsigned flags,
		       cowmm_region_t **out)
{
	int ret = cowmm__check_mm(mm);

	if (ret)
		return ret;
	if (!out || (flags & ~COWMM_REGION_HUGE_COW) ||
	    !range_ok((uintptr_t)addr, len))
		return -EINVAL;
	ret = cowmm__check_maps(0, (uintptr_t)addr, len);
	if (ret)
		return ret;
	/*
	 * An unmap or move read but not handled yet may concern memory that
	 * was here before: handled after, it would take this region's pages
	 * for the old ones.
	 */
	cowmm__wait_events(mm);
	pthread_mutex_lock(&mm->lock);
	ret = region_take_locked(mm, (uintptr_t)addr, len, flags, true,
				 UFFDIO_REGISTER_MODE_WP, true, false, out);
	pthread_mutex_unlock(&mm->lock);
	return ret;
}

static bool region_flags_ok(unsigned flags)
{
	const unsigned thp = COWMM_REGION_THP | COWMM_REGION_NOTHP;

	return !(flags & ~(thp | COWMM_REGION_HUGE_COW)) &&
	       (flags & thp) != thp;
}

/*
 * Map @len bytes (aligned to a huge page for COWMM_REGION_THP): their
 * start, or 0.
 */
static uintptr_t map_fresh(size_t len, unsigned flags, int prot)
{
	size_t maplen = len;
	uintptr_t map, base;

	if (flags & COWMM_REGION_THP) {
		/* Room to align the start to a huge page. */
		if (len > SIZE_MAX - COWMM_HPAGE_SIZE)
			return 0;
		maplen += COWMM_HPAGE_SIZE;
	}
	map = (uintptr_t)mmap(NULL, maplen, prot,
			      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
			      0);
	if ((void *)map == MAP_FAILED)
		return 0;
	base = map;
	if (flags & COWMM_REGION_THP) {
		base = (map + COWMM_HPAGE_SIZE - 1) & ~(COWMM_HPAGE_SIZE - 1);
		if (base > map)
			munmap((void *)map, base - map);
		if (map + maplen > base + len)
			munmap((void *)(base + len), map + maplen - base - len);
		madvise((void *)base, len, MADV_HUGEPAGE);
	} else if (flags & COWMM_REGION_NOTHP) {
		madvise((void *)base, len, MADV_NOHUGEPAGE);
	}
	return base;
}

/*
 * How many ranges a new region may be refused before the call gives up:
 * each is one another region's pages just left (below).
 */
#define MAP_TRIES 8

/*
 * Map @len bytes of new anonymous memory with @prot and make it a region
 * registered in @mode: a user region when it is writable, a snapshot view
 * when it is not.  Call with mm->lock held.
 */
int cowmm__region_map(cowmm_t *mm, size_t len, unsigned flags, int prot,
		      uint64_t mode, cowmm_region_t **out)
{
	bool user = prot & PROT_WRITE;
	uintptr_t base, kept[MAP_TRIES];
	unsigned n = 0, i;
	int ret;

	for (;;) {
		base = map_fresh(len, flags, prot);
		if (!base) {
			ret = -ENOMEM;
			break;
		}
		ret = region_take_locked(mm, base, len, flags, false, mode,
					 user, mode & UFFDIO_REGISTER_MODE_MISSING,
					 out);
		if (ret != -EEXIST || n == MAP_TRIES) {
			if (ret)
				munmap((void *)base, len);
			break;
		}
		/*
		 * The kernel gave us a range that another region's layout
		 * still lists: its pages moved or were unmapped, their event
		 * not handled (or not even read) yet.  Hold it, so that the
		 * next mmap() lands elsewhere, and let it go afterwards.
		 */
		kept[n++] = base;
	}
	for (i = 0; i < n; i++)
		munmap((void *)kept[i], len);
	return ret == -EEXIST ? -ENOMEM : ret;
}

int cowmm_region_alloc(cowmm_t *mm, size_t len, unsigned flags,
		       cowmm_region_t **out)
{
	int ret = cowmm__check_mm(mm);

	if (ret)
		return ret;
	if (!out || !range_ok(0, len) || !region_flags_ok(flags))
		return -EINVAL;
	cowmm__wait_events(mm); /* as in cowmm_region_adopt() */
	pthread_mutex_lock(&mm->lock);
	ret = cowmm__region_map(mm, len, flags, PROT_READ | PROT_WRITE,
				UFFDIO_REGISTER_MODE_WP, out);
	pthread_mutex_unlock(&mm->lock);
	return ret;
}

/*
 * With swap configured (or not known), a swapped-out page and a uffd-wp
 * marker of a page never populated look alike in pagemap and mincore().
 */
bool cowmm__swap_possible(void)
{
	struct sysinfo si;

	return sysinfo(&si) < 0 || si.totalswap;
}

/*
 * Which of @npages pages from @start may hold data: 1 in @vec where the
 * page must be read, 0 where it was never populated and reads as zero.
 * mincore() tells populated anonymous pages from empty ones (a uffd-wp
 * marker counts as empty); a swapped-out page would look empty too, so
 * with swap configured every page is read.
 */
int cowmm__resident(uintptr_t start, size_t npages, unsigned char *vec)
{
	size_t i;

	if (cowmm__swap_possible()) {
		memset(vec, 1, npages);
		return 0;
	}
	if (mincore((void *)start, npages * COWMM_PAGE_SIZE, vec) < 0)
		return -errno;
	for (i = 0; i < npages; i++)
		vec[i] &= 1;
	return 0;
}

/*
 * Copy a page a snapshot still shares, which is write-protected: present,
 * or never populated (a uffd-wp marker, zero without being touched when
 * @probe).  The pagemap entry is read before and after the copy; a page
 * that lost its protection or its frame meanwhile was discarded under us
 * (MADV_DONTNEED racing with this copy): -EIO, never its new bytes.
 */
/*
 * The live bytes of a page.  A worker reads them with process_vm_readv(),
 * which fails cleanly where a load would crash (the application unmapped
 * the page meanwhile) or fault into the library (a missing page).  The
 * writing thread itself, resolving its own fault in in-thread mode, may
 * simply load them: the page it is writing is as mapped for this load as
 * for its own store, and in that mode nothing is registered for missing
 * faults.
 */
static int live_copy(cowmm_region_t *r, uintptr_t addr, void *dst)
{
	if (cowmm__in_sigbus) {
		memcpy(dst, (const void *)addr, COWMM_PAGE_SIZE);
		return 0;
	}
	(void)r;
	return cowmm__live_read(addr, dst, COWMM_PAGE_SIZE);
}

/*
 * A REMOVE event read but not handled yet, as the fault path may see it:
 * workers read events and faults in order under read_lock already, so the
 * count is enough; any other thread (one resolving its own fault in
 * in-thread mode, a snapshot reader) goes through that lock first.
 */
static bool discard_pending(cowmm_t *mm)
{
	/*
	 * A REMOVE handler preserving a clone's page reads its origin: the
	 * count includes its own event, and waiting for it would wait for
	 * ever.  It relies on the pagemap check (on this kernel a zapped
	 * page and its refill carry no uffd-wp bit: docs/design.md), and
	 * for moves and other discards of the page it reads, on
	 * remove_moved() and cowmm__removes_over().
	 */
	if (cowmm__in_remove)
		return false;
	if (cowmm__stamped)
		return cowmm__removes_before(mm, cowmm__stamp);
	return cowmm__in_worker ? atomic_load(&mm->removes_pending) != 0
				: cowmm__discards_pending(mm);
}

void (*cowmm__read_checked)(uintptr_t addr);

/* A move or unmap read but not handled, as discard_pending() sees one. */
static bool maps_pending(cowmm_t *mm)
{
	if (cowmm__in_worker)
		return atomic_load(&mm->remaps_pending) ||
		       atomic_load(&mm->unmaps_pending);
	return cowmm__maps_pending(mm);
}

/*
 * A page found protected could not be copied, or lost its protection
 * while it was: moved (mremap) or unmapped meanwhile?  The kernel takes
 * the pages first and sends the event right after; once it is handled,
 * the page is read at its new address, or its loss is handled.  The
 * caller tries again then (-EAGAIN), instead of counting the page lost.
 */
static bool remove_moved(cowmm_t *mm, unsigned seq, uintptr_t page);

/*
 * @seq: for a REMOVE handler, what cowmm__moved_now() gave with @addr;
 * otherwise unused.
 */
static bool moved_meanwhile(cowmm_t *mm, unsigned seq, uintptr_t addr)
{
	uintptr_t page = addr & ~(uintptr_t)(COWMM_PAGE_SIZE - 1);

	if (cowmm__in_remove)
		return addr && remove_moved(mm, seq, page);
	if (cowmm__maps_pending(mm))
		return true;
	/*
	 * A move or unmap whose event is on its way, however slow the worker
	 * that reads it (a clone's page taken for lost with only the origin
	 * moving: the second outside review), other memory perhaps mapped
	 * there already (exact/fault-checked-moved-unread: the copy took the
	 * page for lost and broke the snapshot).  @addr 0: not asked.
	 */
	if (addr && cowmm__page_leaving(mm, page))
		return true;
	usleep(50); /* the event of a move just made */
	return cowmm__maps_pending(mm);
}

/*
 * After a copy from @addr that looked right: was it the region's page?
 * Memory another userfaultfd protects, mapped where the page was after it
 * moved, looks protected and keeps its frame across the copy (the model
 * tester's seed 622965019: restore gave its bytes to a newer snapshot;
 * exact/fault-checked-moved-foreign: a write fault's copy gave them to the
 * snapshot).  @seq is cowmm__maps_seq() from before the caller looked for
 * pending moves: a move or unmap of the page read since then counts.
 * Application threads in a call ask cowmm__still_ours(), which waits for
 * an event on its way to be read.  A worker or a SIGBUS handler cannot
 * wait (a worker may be the one to read it): it asks the kernel once, and
 * an event not read, or none of its mappings there, or a move of the page
 * read since @seq (the kernel's probe takes a mapping another
 * userfaultfd registered for one of ours:
 * exact/fault-checked-moved-read-foreign) sends the fault back to be
 * tried again after.  A REMOVE handler neither: its copies still take
 * what they read.
 */
/*
 * 0 if it was, -EAGAIN if not or not yet known (the caller tries again
 * once the move is handled), -EIO for a REMOVE handler whose page is gone.
 */
static int copied_ours(cowmm_t *mm, unsigned seq, uintptr_t addr)
{
	uintptr_t page = addr & ~(uintptr_t)(COWMM_PAGE_SIZE - 1);
	int ret;

	if (cowmm__in_remove) {
		/*
		 * One probe: asked again, an event of any thread queued in
		 * between made it say "not read yet", taken for "gone" (the
		 * seventeenth review: the clone's snapshot broke, nothing lost;
		 * exact/remove-clone-other-discards).
		 */
		ret = cowmm__uffd_range_probe(mm->uffd, page, COWMM_PAGE_SIZE);
		if (ret == -EAGAIN ||
		    cowmm__moved_since(mm, seq, page, COWMM_PAGE_SIZE))
			return -EAGAIN;
		return ret ? -EIO : 0;
	}
	if (cowmm__in_worker || cowmm__in_sigbus)
		return !cowmm__uffd_range_probe(mm->uffd, page,
						COWMM_PAGE_SIZE) &&
				       !cowmm__moved_since(mm, seq, page,
							   COWMM_PAGE_SIZE)
			       ? 0
			       : -EAGAIN;
	return cowmm__still_ours(mm, seq, page) ? 0 : -EAGAIN;
}

/*
 * A REMOVE handler reads pages of other regions: a clone's page never
 * written gets its origin's bytes, for the clone's snapshots.  The moves
 * read after its event wait for it, so it cannot wait for them: it reads
 * the origin's page where they put it (cowmm__moved_now(), which gives
 * @seq), and the copy counts only if no move was read since and none is
 * on its way (the kernel refuses its probe while one is not read).  Else
 * the handler is tried again once it is read, not handled.  Read where
 * the layout put it, the copy took the bytes of memory another manager
 * protects, mapped there after the move (the model tester's seed
 * 646303950; exact/remove-clone-origin-moved), and waiting for the move
 * to be handled waited for ever (the sixteenth review: the move waits for
 * the discard; exact/remove-clone-then-move).
 */
static bool remove_moved(cowmm_t *mm, unsigned seq, uintptr_t page)
{
	return cowmm__uffd_range_probe(mm->uffd, page, COWMM_PAGE_SIZE) ==
		       -EAGAIN ||
	       cowmm__moved_since(mm, seq, page, COWMM_PAGE_SIZE);
}

/* @rseq: for a REMOVE handler, from cowmm__moved_now() with @addr. */
static int read_verified(cowmm_region_t *r, uintptr_t addr, void *dst,
			 bool probe, unsigned rseq)
{
	void (*hook)(uintptr_t);
	uint64_t e1, e2;
	uint32_t before;
	unsigned seq;
	int tries;

	/*
	 * A discard read but not handled yet: the page here may be the
	 * kernel's zeroed refill of a zapped one (events.c).  This copy waits
	 * until the discard has broken the snapshots that needed the page.
	 */
	if (discard_pending(r->mm))
		return -EAGAIN;
	/* Before the look for pending moves: copied_ours(). */
	seq = cowmm__in_remove ? rseq : cowmm__maps_seq(r->mm);
	/*
	 * A move read but not handled: the layout may put the page where
	 * another one is now (the range it left, taken by another range
	 * moved there since), protected too, whose bytes would pass for its.
	 * A REMOVE handler checks after the copy instead: remove_moved().
	 */
	if (!cowmm__in_remove && maps_pending(r->mm))
		return -EAGAIN;
	before = cowmm__removes_stamp(r->mm);
	if (cowmm__pagemap_read(r->mm->pagemap, addr, 1, &e1))
		return cowmm__live_read(addr, dst, COWMM_PAGE_SIZE);
	if (!(e1 & PM_UFFD_WP)) {
		/*
		 * Shared, yet not protected.  Zapped by a discard read since,
		 * or unmapped (the snapshots that shared it break when its
		 * event is handled): try again then.  A REMOVE handler cannot
		 * tell its own zap from another's: -EIO, unless the page
		 * moved.  Otherwise no event came, and the kernel dropped a
		 * page MADV_FREE left: it reads as the zero the application
		 * allowed (what was written since did not fault).
		 */
		if (cowmm__in_remove)
			return remove_moved(r->mm, seq, addr) ? -EAGAIN : -EIO;
		if (cowmm__dropped_quietly(r->mm, addr, before) != 1)
			return -EAGAIN;
		memset(dst, 0, COWMM_PAGE_SIZE);
		return 0;
	}

	/* With swap, only what is a marker for sure (probe_marker()). */
	if (!(e1 & PM_PRESENT) && probe &&
	    (!cowmm__swap_possible() || cowmm__pm_is_marker(r->mm, e1))) {
		memset(dst, 0, COWMM_PAGE_SIZE); /* never populated */
		return 0;
	}
	hook = __atomic_load_n(&cowmm__read_checked, __ATOMIC_ACQUIRE);
	if (cowmm__unlikely(hook != NULL))
		hook(addr);
	for (tries = 0; tries < 3; tries++) {
		if (live_copy(r, addr, dst) ||
		    cowmm__pagemap_read(r->mm->pagemap, addr, 1, &e2))
			return moved_meanwhile(r->mm, seq, addr) ? -EAGAIN : -EIO;
		if (!(e2 & PM_UFFD_WP) ||
		    ((e1 & PM_PRESENT) && !(e2 & PM_PRESENT)))
			return moved_meanwhile(r->mm, seq, addr) ? -EAGAIN : -EIO;
		if (!(e1 & PM_PRESENT) ||
		    (e1 & PM_PFN_MASK) == (e2 & PM_PFN_MASK))
			return copied_ours(r->mm, seq, addr);
		/* Another frame, still protected: a discard, or migrated. */
		if (discard_pending(r->mm))
			return -EAGAIN;
		e1 = e2; /* migrated: copy again */
	}
	return -EIO;
}

/*
 * The current content of page @pg of @r, into @dst, without ever touching
 * memory that would fault into the library: a clone's page not yet
 * materialised is read from its origin, and one discarded since reads as
 * zero.  @probe: a page never populated reads as zero without being
 * populated (one mincore() call); the fault path, whose writer is about to
 * populate the page anyway, does not ask.  Call with r->lock held.
 * Returns 0, -EIO when a broken origin cannot supply it, or -EAGAIN while
 * a discard, or a move or unmap of the page, is read but not handled (or,
 * in a worker, a lock is busy).
 */
int cowmm__region_read_page(cowmm_region_t *r, size_t pg, void *dst,
			    bool probe)
{
	uintptr_t addr = cowmm__page_addr(r, pg);
	void (*hook)(uintptr_t);
	unsigned char vec;
	uint32_t before;
	unsigned seq, rseq = 0;

	if (r->holes && cowmm__test_bit(r->holes, pg)) {
		memset(dst, 0, COWMM_PAGE_SIZE); /* unmapped: left the region */
		return 0;
	}
	if (r->origin && !cowmm__test_bit(r->present, pg))
		return cowmm__snap_page(r->origin, pg, dst);
	/* A REMOVE handler: where the moves read after it put the page. */
	if (cowmm__in_remove) {
		addr = cowmm__moved_now(r->mm, addr, &rseq);
		if (!addr)
			return -EIO; /* unmapped: its snapshots break */
	}
	if (r->present) {
		/*
		 * Materialised.  A discard read but not handled: what is
		 * there may be the zeroed refill, which the discard's handler
		 * must see first (it breaks the snapshots that shared it).
		 */
		if (discard_pending(r->mm))
			return -EAGAIN;
		/* A move pending: see read_verified(). */
		seq = cowmm__in_remove ? rseq : cowmm__maps_seq(r->mm);
		if (!cowmm__in_remove && maps_pending(r->mm))
			return -EAGAIN;
		before = cowmm__removes_stamp(r->mm);
		hook = __atomic_load_n(&cowmm__read_checked,
				       __ATOMIC_ACQUIRE);
		if (cowmm__unlikely(hook != NULL))
			hook(addr);
		/*
		 * Read, then make sure it was the page: other memory may be
		 * mapped where a moved page was before its event is read
		 * (the model tester's seed 888 gave its bytes to a clone).
		 */
		if (!cowmm__live_read(addr, dst, COWMM_PAGE_SIZE))
			return copied_ours(r->mm, seq, addr);
		/*
		 * Not there, and the read did not wait for it (see
		 * cowmm__live_read()): discarded, so zero; unless the range
		 * is no longer mapped at all (mincore() fails), a move or an
		 * unmap whose event is still to come.  Discarded just now,
		 * its REMOVE read since the read began (the kernel zaps only
		 * then): that discard's handler decides first, and breaks the
		 * snapshots that still needed the page; zeros would pass for
		 * its bytes.  A REMOVE handler does not wait for another: a
		 * discard of this page pending breaks the snapshots that
		 * needed it, and so does this copy (-EIO), rather than give
		 * its zeros to a clone's snapshot
		 * (exact/remove-clone-origin-discarded).
		 */
		if (mincore((void *)addr, COWMM_PAGE_SIZE, &vec))
			return moved_meanwhile(r->mm, seq, addr) ? -EAGAIN : -EIO;
		if (cowmm__in_remove) {
			if (cowmm__removes_over(r->mm, addr))
				return -EIO;
		} else if (cowmm__dropped_quietly(r->mm, addr, before) != 1) {
			return -EAGAIN;
		}
		memset(dst, 0, COWMM_PAGE_SIZE);
		return 0;
	}
	return read_verified(r, addr, dst, probe, rseq);
}

/*
 * Fault-around.  A writer that faults on the page right after the run the
 * previous fault unprotected is taken for a sequential one: its window
 * doubles, up to mm->fault_around pages, and the pages ahead of the fault
 * are preserved now and unprotected together with it, in one ioctl (one
 * TLB flush for 34 pages or more, where page by page costs one each).  Any
 * other fault starts again at one page, so random writers copy only what
 * they write.  The bytes are read in one process_vm_readv() per batch,
 * between two pagemap reads; a page that changed frame or lost its
 * protection meanwhile (a discard racing with the copy) ends the run
 * before it, and is left to its own fault.
 */
#define AHEAD_BATCH 64

/* Bounded mode: the fault path holds as many frames as it may. */
static bool over_cap(cowmm_t *mm)
{
	return mm->max_frames &&
	       atomic_load_explicit(&mm->cnt.frames_live,
				    memory_order_relaxed) >= mm->max_frames;
}

static size_t ahead_window(cowmm_region_t *r, size_t pg)
{
	size_t max = r->mm->fault_around;

	/* Clones, views, lazy loads, regions in pieces: one page at a time. */
	if (max <= 1 || r->present || r->lazy || cowmm__in_pieces(r))
		return 1;
	if (pg != r->fa_next || !r->fa_win)
		return 1;
	return r->fa_win * 2 < max ? r->fa_win * 2 : max;
}

/* Release frames @f[@from..@n) that were never published. */
static void ahead_drop(struct cowmm_frame **f, size_t from, size_t n)
{
	for (; from < n; from++)
		if (cowmm__frame_real(f[from]))
			cowmm__frame_free_now(f[from]);
}

/*
 * Preserve up to @n pages from @first for a sequential writer and mark them
 * writable in this epoch; the caller clears their protection.  Returns how
 * many pages from @first are done.  Call with r->lock held.
 */
static size_t preserve_ahead(cowmm_region_t *r, size_t first, size_t n)
{
	uintptr_t base = cowmm__page_addr(r, first);
	struct cowmm_frame *f[AHEAD_BATCH];
	struct iovec lv[AHEAD_BATCH], rv[AHEAD_BATCH];
	uint64_t e1[AHEAD_BATCH], e2[AHEAD_BATCH];
	cowmm_t *mm = r->mm;
	size_t k, j, nio = 0;
	int swap = -1; /* not asked yet */
	unsigned seq;

	if (n > AHEAD_BATCH)
		n = AHEAD_BATCH;
	if (n > r->npages - first)
		n = r->npages - first;
	n = cowmm__page_span(r, first, n); /* one piece: ahead_window() */
	/* A move pending: the pages ahead may be others (read_verified()). */
	seq = cowmm__maps_seq(mm);
	if (!n || discard_pending(mm) || maps_pending(mm) ||
	    cowmm__pagemap_read(mm->pagemap, base, n, e1))
		return 0;
	for (k = 0; k < n; k++) {
		size_t pg = first + k;

		f[k] = NULL;
		if (r->holes && cowmm__test_bit(r->holes, pg))
			break;
		if (r->wgen[pg] == r->epoch || !cowmm__shared_locked(r, pg))
			continue; /* nothing to keep: only unprotected */
		if (!(e1[k] & PM_UFFD_WP))
			break; /* discarded under us: its own fault decides */
		if (!(e1[k] & PM_PRESENT)) {
			/*
			 * Never populated, unless swap makes it ambiguous
			 * and the entry is not a marker for sure.
			 */
			if (swap < 0)
				swap = cowmm__swap_possible();
			if (swap && !cowmm__pm_is_marker(mm, e1[k]))
				break;
			f[k] = &cowmm__zero_frame;
			continue;
		}
		f[k] = over_cap(mm) ? NULL : cowmm__frame_alloc(&mm->pool);
		if (!f[k])
			break;
		lv[nio] = (struct iovec){ cowmm__frame_data(f[k]),
					  COWMM_PAGE_SIZE };
		rv[nio] = (struct iovec){ (void *)(base + (k << COWMM_PAGE_SHIFT)),
					  COWMM_PAGE_SIZE };
		nio++;
	}
	if (nio) {
		/*
		 * Not loads, even in the writer's own handler: another thread
		 * may unmap a neighbour meanwhile, and process_vm_readv()
		 * fails where a load would crash.  Then the checks of
		 * copied_ours(), for other memory mapped where the pages
		 * were: no mapping registered there, an event unread, or a
		 * move read since.  The pages fault on their own then.
		 */
		if (cowmm__live_readv(lv, rv, nio) ||
		    cowmm__pagemap_read(mm->pagemap, base, k, e2) ||
		    cowmm__uffd_range_probe(mm->uffd, base,
					    k << COWMM_PAGE_SHIFT) ||
		    cowmm__moved_since(mm, seq, base,
				       k << COWMM_PAGE_SHIFT)) {
			ahead_drop(f, 0, k);
			return 0;
		}
		for (j = 0; j < k; j++)
			if (cowmm__frame_real(f[j]) &&
			    (!(e2[j] & PM_UFFD_WP) || !(e2[j] & PM_PRESENT) ||
			     (e1[j] & PM_PFN_MASK) != (e2[j] & PM_PFN_MASK)))
				break;
		ahead_drop(f, j, k);
		k = j;
	}
	for (j = 0; j < k; j++) {
		size_t pg = first + j;

		if (f[j]) {
			if (f[j] == &cowmm__zero_frame) {
				/* a marker: nothing was read */
			} else if (cowmm__page_is_zero(cowmm__frame_data(f[j]))) {
				cowmm__frame_free_now(f[j]); /* never published */
				f[j] = &cowmm__zero_frame;
			} else {
				cowmm__count(mm, bytes_preserved,
					     COWMM_PAGE_SIZE);
			}
			cowmm__cow_claim_frame_locked(r, pg, f[j]);
			cowmm__count(mm, ahead_copies, 1);
		} else {
			cowmm__cow_claim_unshared(r, pg);
		}
	}
	return k;
}

#define HPAGE_PAGES (COWMM_HPAGE_SIZE >> COWMM_PAGE_SHIFT)

/* Preserve [@first, @first + @n) for a huge block; false if one was not. */
static bool preserve_all(cowmm_region_t *r, size_t first, size_t n)
{
	while (n) {
		size_t want = n < AHEAD_BATCH ? n : AHEAD_BATCH;

		if (preserve_ahead(r, first, want) < want)
			return false;
		first += want;
		n -= want;
	}
	return true;
}

/*
 * COWMM_REGION_HUGE_COW: when one huge page, present and protected, maps
 * the whole 2 MiB block around @pg, preserve every page of it that a
 * snapshot needs and return its first page: the caller unprotects the
 * block in one piece, which keeps the huge mapping.  @pg itself is done
 * already.  Returns SIZE_MAX when the block is not such a page or a copy
 * failed (whatever was preserved stays, and is merely still protected).
 * Call with r->lock held.
 */
static size_t huge_block(cowmm_region_t *r, size_t pg)
{
	uintptr_t start = (r->base + (pg << COWMM_PAGE_SHIFT)) &
			  ~(COWMM_HPAGE_SIZE - 1);
	size_t first, i;

	if (!(r->flags & COWMM_REGION_HUGE_COW) || r->present || r->lazy ||
	    cowmm__in_pieces(r) || start < r->base ||
	    start + COWMM_HPAGE_SIZE > r->base + r->len)
		return SIZE_MAX;
	first = (start - r->base) >> COWMM_PAGE_SHIFT;
	if (cowmm__pagemap_huge(r->mm->pagemap, start) != COWMM_HUGE_PROTECTED)
		return SIZE_MAX;
	for (i = 0; r->holes && i < HPAGE_PAGES; i++)
		if (cowmm__test_bit(r->holes, first + i))
			return SIZE_MAX;
	if (!preserve_all(r, first, pg - first) ||
	    !preserve_all(r, pg + 1, first + HPAGE_PAGES - pg - 1))
		return SIZE_MAX;
	return first;
}

/*
 * Resolve a write-protect fault at @addr (page aligned, inside @r).
 * Returns 0 when resolved and woken, 1 when resolved and the caller must
 * wake the address, or a negative errno when the fault is not ours to
 * resolve (the region is being released, and its unregister will wake).
 */
int cowmm__region_fault_wp(cowmm_region_t *r, uintptr_t addr, bool wake)
{
	cowmm_t *mm = r->mm;
	size_t pg, first, win, end;
	unsigned seq;
	int ret;

	/*
	 * The kernel's write-protect ioctl acts on any mapping registered
	 * for write-protect faults at the address, another manager's memory
	 * moved in after the page left too: cowmm__unprotect() clears it
	 * only if no move or unmap was read since @seq.  (Deferring every
	 * fault while any move is read but not handled, as tried once, can
	 * hold all faults back behind one slow move: a model-tester hang.)
	 * Counted from the moves followed, not read: one read but not
	 * followed yet is not in the layout looked at below.
	 */
	seq = cowmm__maps_handled(mm);
	if (cowmm__lock(&r->lock))
		return -EAGAIN;
	if (r->dying) {
		pthread_mutex_unlock(&r->lock);
		return -ENOENT;
	}
	if (cowmm__page_at(r, addr, &pg)) {
		/* Found at its old address: the region moved meanwhile. */
		pthread_mutex_unlock(&r->lock);
		return 1;
	}
	if (r->wgen[pg] == r->epoch) {
		/*
		 * Nothing to preserve: another thread's fault on this page
		 * was resolved first, or the page is write-pinned and its
		 * copy was taken eagerly.
		 */
		cowmm__count(mm, reuses, 1);
	} else {
		if (cowmm__unlikely(over_cap(mm)) && cowmm__shared_locked(r, pg)) {
			/* Bounded mode: wait for a snapshot to free frames. */
			pthread_mutex_unlock(&r->lock);
			cowmm__count(mm, throttled, 1);
			return -ENOSPC;
		}
		ret = cowmm__cow_claim_locked(r, pg, COWMM_COW_READ,
					      &mm->cnt.copies);
		if (ret == -EAGAIN) { /* a discard pending, an origin busy */
			pthread_mutex_unlock(&r->lock);
			return ret;
		}
		if (ret > 0 && cowmm__unlikely(mm->naive))
			cowmm__naive_replace(r, pg);
		else if (ret <= 0) /* not needed, or the needers are broken */
			cowmm__count(mm, reuses, 1);
	}
	cowmm__count(mm, wp_faults, 1);
	first = huge_block(r, pg);
	if (first != SIZE_MAX) {
		end = first + HPAGE_PAGES;
		win = mm->fault_around;
	} else {
		first = pg;
		win = ahead_window(r, pg);
		for (end = pg + 1; end < pg + win;) {
			size_t done = preserve_ahead(r, end, pg + win - end);

			end += done;
			if (done < AHEAD_BATCH)
				break;
		}
	}
	r->fa_next = end;
	r->fa_win = win;
	ret = cowmm__unprotect(mm, seq, cowmm__page_addr(r, first),
			       (end - first) << COWMM_PAGE_SHIFT, wake);
	if (ret && ret != -EAGAIN && end - first > 1) {
		/*
		 * The window met a range the kernel no longer has registered
		 * (unmapped and mapped again, its UNMAP event not handled
		 * yet): the pages ahead stay protected and fault on their
		 * own; the page written is unprotected alone.
		 */
		r->fa_win = 0;
		ret = cowmm__unprotect(mm, seq, addr, COWMM_PAGE_SIZE, wake);
	}
	pthread_mutex_unlock(&r->lock);
	if (ret == -EAGAIN) /* retried later: the page is no longer needed */
		return ret;
	if (ret) {
		cowmm__log(COWMM_LOG_ERR, "clearing write protection at %#lx: %s",
			   (unsigned long)addr, strerror(-ret));
		return ret;
	}
	return wake ? 0 : 1;
}

/*
 * Resolve a missing fault at @addr: a clone's page read for the first time
 * (from its origin), or a view's page (from its snapshot).  A clone's page
 * that was materialised (or discarded before that) and then discarded
 * reads as zero; a view's always reads as its snapshot.  Returns
 * as cowmm__region_fault_wp() does.
 */
int cowmm__region_fault_missing(cowmm_region_t *r, uintptr_t addr, bool wake)
{
	size_t pg;
	int ret;

	if (cowmm__lock(&r->lock))
		return -EAGAIN;
	if (r->dying) {
		pthread_mutex_unlock(&r->lock);
		return -ENOENT;
	}
	if (cowmm__page_at(r, addr, &pg)) {
		pthread_mutex_unlock(&r->lock);
		return 1; /* the region moved meanwhile */
	}
	cowmm__count(r->mm, missing_faults, 1);
	if ((r->origin || r->lazy) && discard_pending(r->mm)) {
		/*
		 * Perhaps this very page: its discard decides first.  Also
		 * for a page filled before: the zero that refills it would
		 * go in protected, and a snapshot that shared the old page
		 * would read that zero until the discard breaks it.  And a
		 * lazy load's page not loaded yet reads zero once discarded,
		 * not the file's bytes.
		 */
		pthread_mutex_unlock(&r->lock);
		return -EAGAIN;
	}
	if (r->lazy)
		ret = cowmm__lazy_fault_locked(r, pg, wake);
	else if (r->view_of)
		/* A view shows its snapshot, also where it was discarded. */
		ret = cowmm__view_fill(r, pg, wake);
	else if (!r->present || cowmm__test_bit(r->present, pg))
		/*
		 * Discarded after it was filled: zero, protected if shared.
		 * (A region neither clone, view nor loading takes no missing
		 * faults, unless a race left a range of it registered for
		 * them: its page is empty, and reads as zero, as it would
		 * without.  Resolved, never left to fault again for ever.)
		 */
		ret = cowmm__shared_locked(r, pg)
			      ? cowmm__uffd_copy(r->mm->uffd, addr,
						 cowmm__frame_data(
							 &cowmm__zero_frame),
						 COWMM_PAGE_SIZE, true, wake)
			      : cowmm__uffd_zeropage(r->mm->uffd, addr,
						     COWMM_PAGE_SIZE, wake);
	else
		ret = cowmm__clone_fill(r, pg, wake);
	if ((!ret || ret == -EEXIST) && r->present)
		cowmm__set_bit(r->present, pg);
	if (ret == -EHWPOISON)
		ret = 0; /* resolved with SIGBUS to come; not materialised */
	pthread_mutex_unlock(&r->lock);
	if (ret == -EAGAIN)
		return ret;
	if (ret == -EEXIST) /* another fault on this page filled it */
		return 1;
	if (ret) {
		cowmm__log(COWMM_LOG_ERR, "resolving a missing fault at %#lx: %s",
			   (unsigned long)addr, strerror(-ret));
		return ret;
	}
	return wake ? 0 : 1;
}

/*
 * The policy libcowmm exists to avoid, for tests and benchmarks only: the
 * writer is moved to a fresh page holding the old bytes, as page_count-based
 * COW did in the kernel.  Whoever holds the old physical page (a DMA pin,
 * a pipe) is left behind.  Call with r->lock held, the page preserved.
 */
void cowmm__naive_replace(cowmm_region_t *r, size_t pg)
{
	uintptr_t addr = cowmm__page_addr(r, pg);
	struct cowmm_frame *f = cowmm__fmap_get(&r->snaps->frames, pg);

	if (!f || madvise((void *)addr, COWMM_PAGE_SIZE, MADV_DONTNEED))
		return;
	cowmm__uffd_copy(r->mm->uffd, addr, cowmm__frame_data(f),
			 COWMM_PAGE_SIZE, false, false);
}

/* Is a span of pages still ours (cowmm__still_ours_span())?  -1: not asked. */
struct span_ours {
	uintptr_t addr;
	size_t n;
	int ours;
};

/*
 * A page whose pagemap entry (@e) is a uffd-wp marker (probe_marker() in
 * manager.c) where its layout put it was never populated, and its
 * snapshots get zero, only if no move or unmap of it was read since @seq
 * or is on its way: the range a move left (MREMAP_DONTUNMAP) is empty
 * too, and so is other memory mapped where a page was, until the move's
 * event is handled (the twenty-first outside review: a release while a
 * page moved gave the snapshot zeros for it).  Otherwise it is read, and
 * the read follows the move.
 */
static bool never_populated(cowmm_region_t *r, size_t pg, uint64_t e,
			    unsigned seq, struct span_ours *sp)
{
	if (!cowmm__pm_is_marker(r->mm, e))
		return false;
	/*
	 * Asked once for the whole span (one ioctl, not one per page: a
	 * sparse 1 GiB region took seconds to release); each page on its
	 * own only when the span is not all ours.  Its pagemap entries were
	 * read before: a move after the question came after them too.
	 */
	if (sp->ours < 0)
		sp->ours = cowmm__still_ours_span(r->mm, seq, sp->addr, sp->n);
	return sp->ours ||
	       cowmm__still_ours(r->mm, seq, cowmm__page_addr(r, pg));
}

/*
 * Preserve every page that some snapshot still shares with the region and
 * cut the snapshots loose from it.  Pages never populated become zero
 * frames without being read.  Call with r->lock held.
 */
static int detach_snapshots(cowmm_region_t *r)
{
	unsigned char vec[RESIDENT_BATCH];
	struct cowmm_snap *s, *next;
	struct span_ours sp;
	uint64_t *e;
	size_t pg, i, n;
	unsigned seq;
	int ret = 0, err;
	bool known;

	if (!r->snaps)
		return 0;
	e = malloc(RESIDENT_BATCH * sizeof(*e));
	for (pg = 0; pg < r->npages; pg += n) {
		uintptr_t addr;

		n = r->npages - pg < RESIDENT_BATCH ? r->npages - pg
						    : RESIDENT_BATCH;
		/* The layout holds every move followed (r->lock is held). */
		seq = cowmm__maps_handled(r->mm);
		n = cowmm__page_span(r, pg, n);
		addr = cowmm__page_addr(r, pg);
		err = cowmm__resident(addr, n, vec);
		/*
		 * Without pagemap, every page is read.  A page never
		 * populated shows a marker there (never_populated()), with
		 * swap too, where mincore() cannot tell it from a page
		 * swapped out.
		 */
		known = !err && e &&
			!cowmm__pagemap_read(r->mm->pagemap, addr, n, e);
		sp = (struct span_ours){ addr, n, -1 };
		for (i = 0; i < n; i++) {
			/* A clone's page not materialised is its origin's. */
			bool zero = known &&
				    (!r->origin ||
				     cowmm__test_bit(r->present, pg + i)) &&
				    cowmm__shared_locked(r, pg + i) &&
				    never_populated(r, pg + i, e[i], seq, &sp);

			err = cowmm__cow_claim(r, pg + i,
					       zero ? COWMM_COW_ZERO
						    : COWMM_COW_READ,
					       &r->mm->cnt.detach_copies);
			/*
			 * -EIO: the page was lost before the release (a
			 * discard): its snapshots are broken, as the discard
			 * meant, and the release itself lost nothing.
			 */
			if (err == -ENOMEM)
				ret = err;
		}
	}
	free(e);
	for (s = r->snaps; s; s = next) {
		next = s->next;
		s->next = NULL;
		__atomic_store_n(&s->region, NULL, __ATOMIC_RELEASE);
	}
	r->snaps = NULL;
	return ret;
}

/*
 * Call @fn on each run of the region's pages that the application has not
 * unmapped (something else may live in a hole now), one piece at a time
 * (layout.c): @pg, the run's first page, is at @start.  Returns the first
 * error.
 */
int cowmm__for_runs(cowmm_region_t *r, cowmm_run_fn *fn, void *arg)
{
	size_t pg = 0, run;
	uintptr_t start;
	int ret = 0, err;

	for (; (run = cowmm__next_run(r, &pg, &start)); pg += run) {
		err = fn(r, pg, start, run << COWMM_PAGE_SHIFT, arg);
		if (err && !ret)
			ret = err;
	}
	return ret;
}

static int run_unmap(cowmm_region_t *r, size_t pg, uintptr_t start,
		     size_t len, void *a)
{
	(void)r;
	(void)pg;
	(void)a;
	return munmap((void *)start, len) ? -errno : 0;
}

static int run_unregister(cowmm_region_t *r, size_t pg, uintptr_t start,
			  size_t len, void *a)
{
	(void)pg;
	(void)a;
	return cowmm__uffd_unregister(r->mm->uffd, start, len);
}

static int run_wake(cowmm_region_t *r, size_t pg, uintptr_t start,
		    size_t len, void *a)
{
	(void)pg;
	(void)a;
	cowmm__uffd_wake(r->mm->uffd, start, len);
	return 0;
}

/*
 * Stay armed, cheaply: a page still protected since an earlier snapshot
 * needs nothing, yet a whole-range UFFDIO_WRITEPROTECT rewrites its entry
 * all the same (about 150 ns a page here).  One read-only PAGEMAP_SCAN
 * (about 5 ns a page) finds the pages that are not protected: written
 * (present or swapped without the uffd-wp bit) or empty (neither present
 * nor swapped: no marker yet).  Runs of them closer than PROTECT_GAP pages
 * are merged, so that runs stay long enough for one TLB flush each, and
 * only the runs are protected; too many runs, and one ioctl over the whole
 * range is what happens.
 *
 * The scan pays off only when many populated pages are still protected.
 * A writer spread over the whole heap leaves few, and a heap reserved far
 * ahead of its use makes the scan walk much that the ioctl skips cheaply
 * (uffd-wp markers cost it almost nothing): when a scan saved less than
 * twice what it cost, the next PROTECT_SKIP snapshots protect the whole
 * range without one.  Returns 1 when the caller is to protect the whole
 * range.
 */
#define PROTECT_GAP 64
#define PROTECT_VEC 256
#define PROTECT_SKIP 8
#define REWRITE_NS 150 /* a present entry rewritten, per page */
#define SCAN_NS 5      /* an entry scanned, per page */

struct prot_runs {
	uintptr_t (*run)[2];
	size_t n, cap, bytes;
};

static int prot_runs_add(struct prot_runs *p, uintptr_t start, uintptr_t end)
{
	if (p->n && start - p->run[p->n - 1][1] <=
			    PROTECT_GAP * COWMM_PAGE_SIZE) {
		p->bytes += end - p->run[p->n - 1][1];
		p->run[p->n - 1][1] = end;
		return 0;
	}
	if (p->n == p->cap) {
		size_t cap = p->cap ? 2 * p->cap : 64;
		void *run = realloc(p->run, cap * sizeof(*p->run));

		if (!run)
			return -ENOMEM;
		p->run = run;
		p->cap = cap;
	}
	p->run[p->n][0] = start;
	p->run[p->n][1] = end;
	p->n++;
	p->bytes += end - start;
	return 0;
}

/*
 * One read-only PAGEMAP_SCAN walk of [@start, @start + @len): @fn gets
 * each batch of runs whose categories match @mask (0: all), with the
 * categories @want.  Returns 1 when the kernel cannot scan (older than
 * 6.7), @fn's first non-zero answer, or 0 once the walk is done.
 */
static int pagemap_walk(cowmm_region_t *r, uintptr_t start, size_t len,
			uint64_t mask, uint64_t want,
			int (*fn)(cowmm_region_t *r, const struct page_region *v,
				  size_t n, void *arg),
			void *arg)
{
	struct page_region v[PROTECT_VEC];
	struct pm_scan_arg a = {
		.size = sizeof(a),
		.start = start,
		.end = start + len,
		.vec = (uintptr_t)v,
		.vec_len = PROTECT_VEC,
		.category_mask = mask,
		.return_mask = want,
	};
	int ret;

	for (;;) {
		long n = ioctl(r->mm->pagemap, PAGEMAP_SCAN, &a);

		if (n < 0)
			return 1;
		ret = fn(r, v, (size_t)n, arg);
		if (ret)
			return ret;
		/* A short answer means the walk is done (MACHINE.md). */
		if ((size_t)n < PROTECT_VEC)
			return 0;
		a.start = v[n - 1].end;
	}
}

struct unprot_scan {
	struct prot_runs p;
	size_t most;
	size_t unprot, kept; /* bytes */
};

static int add_unprotected(cowmm_region_t *r, const struct page_region *v,
			   size_t n, void *arg)
{
	struct unprot_scan *u = arg;
	size_t i;

	(void)r;
	for (i = 0; i < n; i++) {
		uint64_t c = v[i].categories;

		if (!(c & PAGE_IS_WRITTEN) &&
		    (c & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED))) {
			if (c & PAGE_IS_PRESENT)
				u->kept += v[i].end - v[i].start;
			continue; /* protected already */
		}
		u->unprot += v[i].end - v[i].start;
		if (prot_runs_add(&u->p, v[i].start, v[i].end) ||
		    u->p.n > u->most)
			return 1; /* too many runs: the whole range */
	}
	return 0;
}

static int protect_unprotected(cowmm_region_t *r, uintptr_t start, size_t len)
{
	struct unprot_scan u = { .most = len / COWMM_PAGE_SIZE / 256 + 1 };
	struct prot_runs *p = &u.p;
	size_t i, unprot, kept;
	int ret;

	if (!r->epoch)
		return 1; /* never protected: all of it */
	if (r->scan_skip) {
		r->scan_skip--;
		return 1;
	}
	/* 1: an older kernel, or too many runs: the whole range. */
	ret = pagemap_walk(r, start, len, 0,
			   PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
			   add_unprotected, &u);
	if (ret)
		goto out;
	unprot = u.unprot;
	kept = u.kept;
	/* Present pages left alone: those outside every run. */
	kept -= p->bytes - unprot < kept ? p->bytes - unprot : kept;
	if (kept / COWMM_PAGE_SIZE * REWRITE_NS <
	    2 * (len / COWMM_PAGE_SIZE) * SCAN_NS)
		r->scan_skip = PROTECT_SKIP;
	for (i = 0; i < p->n && !ret; i++)
		ret = cowmm__uffd_wp(r->mm->uffd, p->run[i][0],
				     p->run[i][1] - p->run[i][0], true, false);
out:
	free(p->run);
	return ret;
}

/*
 * A page an older snapshot still shares is write-protected, or its change
 * went through cowmm__cow_claim*().  One that is not changed without a
 * fault, and without an event: the kernel may drop a page MADV_FREE left
 * (reclaim, MADV_PAGEOUT), and a write then lands on a fresh one unseen.
 * Before protecting again, the snapshots that shared such a page get it as
 * the kernel left it, zero (protected again, it would read the new bytes
 * silently).  One read-only PAGEMAP_SCAN of the run.
 */
struct unseen {
	uint32_t before; /* the last discard read when the walk began */
	size_t pg;       /* the run's first page, */
	uintptr_t start; /* at this address */
	int moving;      /* -1: not asked yet; else moved_meanwhile() */
	bool undecided;  /* a shared page left for after the move */
};

/*
 * Pages found unprotected in a range the region's layout still puts
 * them, while a move (or an unmap) is read but not handled: what is there
 * is not theirs (a placeholder, other memory), and nothing was lost; the
 * caller sees the move pending and starts again once it is handled.  An
 * unmap's handler counts its own losses.  Asked once a walk.
 */
static bool walk_moving(cowmm_t *mm, struct unseen *u)
{
	if (u->moving < 0)
		u->moving = moved_meanwhile(mm, 0, 0);
	return u->moving;
}

static int claim_unseen(cowmm_region_t *r, const struct page_region *v,
			size_t n, void *arg)
{
	struct unseen *u = arg;
	uintptr_t addr;
	size_t i;

	for (i = 0; i < n; i++)
		for (addr = v[i].start; addr < v[i].end;
		     addr += COWMM_PAGE_SIZE) {
			size_t pg = u->pg +
				    ((addr - u->start) >> COWMM_PAGE_SHIFT);

			/* A clone's page not materialised: empty, its
			 * bytes are its origin's. */
			if (r->present && !cowmm__test_bit(r->present, pg))
				continue;
			/* No discard or unmap read since the walk
			 * began: the kernel dropped it. */
			int dropped = cowmm__dropped_quietly(r->mm, addr,
							     u->before);

			if (dropped == 1)
				cowmm__cow_claim_locked(
					r, pg, COWMM_COW_ZERO,
					&r->mm->cnt.detach_copies);
			else if (!cowmm__shared_locked(r, pg))
				continue;
			else if (dropped < 0 || walk_moving(r->mm, u))
				u->undecided = true;
			else
				cowmm__cow_claim_lost_locked(
					r, pg, "page discarded while a "
					       "snapshot was taken");
		}
	return 0;
}

void (*cowmm__walk_unseen)(cowmm_region_t *r);

/*
 * Returns -EAGAIN when a shared page was found changed while a move is
 * pending: perhaps a placeholder's page, perhaps the region's own, dropped
 * and written.  The run must stay unprotected until the move is handled,
 * or protecting it would make the snapshots share the new bytes (the
 * model tester's seed 1006888: restore left them in place).
 */
static int break_unseen(cowmm_region_t *r, size_t pg, uintptr_t start,
			size_t len)
{
	struct unseen u = { 0, pg, start, -1, false };
	void (*hook)(cowmm_region_t *);

	if (!r->snaps)
		return 0;
	hook = __atomic_load_n(&cowmm__walk_unseen, __ATOMIC_ACQUIRE);
	if (cowmm__unlikely(hook != NULL))
		hook(r);
	u.before = cowmm__removes_stamp(r->mm);
	/* An older kernel cannot scan: reads still fail loudly. */
	pagemap_walk(r, start, len, PAGE_IS_WRITTEN, PAGE_IS_WRITTEN,
		     claim_unseen, &u);
	return u.undecided ? -EAGAIN : 0;
}

static int run_wp(cowmm_region_t *r, size_t pg, uintptr_t start, size_t len,
		  void *arg)
{
	bool wp = *(bool *)arg;

	if (wp) {
		int ret = break_unseen(r, pg, start, len);

		if (ret)
			return ret;
		ret = protect_unprotected(r, start, len);
		if (ret <= 0)
			return ret;
	}
	return cowmm__uffd_wp(r->mm->uffd, start, len, wp, false);
}

/*
 * Protect (or unprotect) every page of @r that is still mapped.  -EAGAIN
 * while protecting: a move is pending, and protecting could not yet tell
 * what a changed page is (break_unseen()); try again once it is handled.
 */
int cowmm__region_wp(cowmm_region_t *r, bool protect)
{
	return cowmm__for_runs(r, run_wp, &protect);
}

static int run_mapped(cowmm_region_t *r, size_t pg, uintptr_t start,
		      size_t len, void *a)
{
	(void)pg;
	(void)a;
	/* No-op on anonymous memory, but it checks the range is mapped. */
	if (msync((void *)start, len, MS_ASYNC))
		return -errno;
	/*
	 * Mapped, but perhaps by other memory: mremap() and munmap() take
	 * the pages first and send their event after, and until a worker
	 * reads it another thread may map memory where they were (the
	 * model tester's seed 8030608: protecting found nothing there, a
	 * snapshot took the moved pages for protected and read zero).
	 * The kernel is asked at the run's first page, after an event not
	 * read yet is (cowmm__still_ours_wait()).
	 */
	return cowmm__still_ours_wait(r->mm, cowmm__maps_seq(r->mm), start)
		       ? 0
		       : -ENOENT;
}

/*
 * Is every run of @r mapped where its layout says, by the region's own
 * memory?  Not while a move or an unmap of its pages is not handled yet,
 * nor while one is not read.  Call with r->lock held.
 */
bool cowmm__region_mapped(cowmm_region_t *r)
{
	return cowmm__for_runs(r, run_mapped, NULL) == 0;
}

/* Wake whoever waits on a page of @r (not in the holes). */
void cowmm__region_wake(cowmm_region_t *r)
{
	cowmm__for_runs(r, run_wake, NULL);
}

/* Unmap memory the library mapped, but not the application's holes. */
static void unmap_own(cowmm_region_t *r)
{
	cowmm__for_runs(r, run_unmap, NULL);
}

/* The region's own memory: page state, bitmap, pins, lock. */
static void region_free(cowmm_region_t *r)
{
	munmap(r->wgen, r->npages * sizeof(*r->wgen));
	if (r->present)
		munmap(r->present, cowmm__bitmap_bytes(r->npages));
	free(r->holes);
	free(r->layout); /* after the grace period: no reader is left */
	cowmm__lazy_free(r);
	cowmm__pins_fini(&r->pins);
	pthread_mutex_destroy(&r->lock);
}

/* Release @r; call with mm->lock held.  @force: even with pins (close). */
static int region_release_locked(cowmm_region_t *r, bool force)
{
	cowmm_t *mm = r->mm;
	cowmm_region_t **pp;
	int ret;

	pthread_mutex_lock(&r->lock);
	if (r->pins.nrec && !force) {
		pthread_mutex_unlock(&r->lock);
		return -EBUSY;
	}
	/*
	 * Adopted memory stays the application's: it gets all its bytes,
	 * those of pages moving meanwhile too (where the moves put them).
	 * A file that cannot give some page leaves it poisoned, as a touch
	 * would have.  They never settled: nothing is released, but by
	 * cowmm_close(), which must end (the pages left read zero).
	 */
	if (r->adopted && cowmm__lazy_finish_moving(r) == -ENOENT) {
		cowmm__log(COWMM_LOG_ERR,
			   "region %#lx: release while its pages kept moving "
			   "before it was loaded%s",
			   (unsigned long)r->base,
			   force ? "; pages not loaded read zero" : "");
		if (!force) {
			pthread_mutex_unlock(&r->lock);
			return -EAGAIN;
		}
	}
	r->dying = true;
	ret = detach_snapshots(r);
	pthread_mutex_unlock(&r->lock);

	/* In-thread mode: a write that faults meanwhile is retried. */
	atomic_fetch_add(&cowmm__releasing, 1);
	cowmm__rtable_remove(mm, r);
	for (pp = &mm->regions; *pp != r; pp = &(*pp)->next)
		;
	*pp = r->next;
	/* No worker and no snapshot reader is still inside the region. */
	urcu_bp_synchronize_rcu();

	/*
	 * Unprotect, unregister, and wake whoever blocked meanwhile; not in
	 * the holes, where another region may live now.
	 */
	cowmm__region_wp(r, false);
	cowmm__for_runs(r, run_unregister, NULL);
	cowmm__region_wake(r);
	atomic_fetch_sub(&cowmm__releasing, 1);
	if (!r->adopted)
		unmap_own(r);
	region_free(r);
	atomic_fetch_sub_explicit(&mm->cnt.regions_live, 1,
				  memory_order_relaxed);
	/* A clone lets go of its source only now: detach read from it. */
	if (r->origin)
		cowmm__snap_release_locked(r->origin);
	r->magic = COWMM_MAGIC_DEAD;
	cowmm__bury(mm, r);
	return ret;
}

/* A snapshot view's region goes with its snapshot; mm->lock held. */
void cowmm__region_unmap(cowmm_region_t *r)
{
	cowmm_t *mm = r->mm;

	pthread_mutex_lock(&r->lock);
	r->dying = true;
	pthread_mutex_unlock(&r->lock);
	cowmm__rtable_remove(mm, r);
	urcu_bp_synchronize_rcu();
	cowmm__for_runs(r, run_unregister, NULL);
	cowmm__region_wake(r);
	unmap_own(r);
	region_free(r);
	free(r);
}

int cowmm_region_release(cowmm_region_t *r)
{
	int ret = cowmm__check_region(r);
	cowmm_t *mm;

	if (ret)
		return ret;
	mm = r->mm;
	/*
	 * Discards read so far first: a lazy load's pages discarded before
	 * the call read zero, and the release must not load them from the
	 * file before their discard is handled.
	 */
	cowmm__wait_events(mm);
	pthread_mutex_lock(&mm->lock);
	/* Checked again under the lock: a racing release wins once. */
	ret = r->magic == COWMM_MAGIC_REGION ? region_release_locked(r, false)
					     : -EBADF;
	pthread_mutex_unlock(&mm->lock);
	return ret;
}

/* For cowmm_close(): snapshots first, so that nothing is preserved. */
void cowmm__region_release_all(cowmm_t *mm)
{
	pthread_mutex_lock(&mm->lock);
	while (mm->snaps)
		cowmm__snap_release_locked(mm->snaps);
	while (mm->regions)
		region_release_locked(mm->regions, true);
	pthread_mutex_unlock(&mm->lock);
}
