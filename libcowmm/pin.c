// SPDX-License-Identifier: MIT
/*
 * The pin registry.
 *
 * The application registers the pages a device or a kernel subsystem holds
 * (O_DIRECT, io_uring fixed buffers, RDMA, vmsplice).  A READ pin says the
 * device reads the memory: it must see every CPU write, so the page must
 * never be replaced.  A WRITE pin says the device writes it without any CPU
 * fault, invisible to write protection: such a page is copied eagerly into
 * every snapshot that still shares it, when the pin is registered and when a
 * snapshot is taken, never lazily on a fault.
 *
 * Each cowmm_pin() call is a record; cowmm_unpin() drops the newest record
 * with exactly the same range, so pins nest and overlap freely.  Per page the
 * registry keeps a count of read and of write pins, in a sparse two-level
 * table (4 KiB granular, also inside transparent huge pages).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cow.h"

#define COUNT_MAX 0xffff

static uint32_t *pin_slot(struct cowmm_pins *p, size_t pg, bool alloc)
{
	uint32_t **leaf = &p->dir[pg >> COWMM_LEAF_SHIFT];

	if (!*leaf && alloc)
		*leaf = calloc(COWMM_LEAF_SIZE, sizeof(**leaf));
	return *leaf ? &(*leaf)[pg & (COWMM_LEAF_SIZE - 1)] : NULL;
}

int cowmm__pins_init(struct cowmm_pins *p, size_t npages)
{
	memset(p, 0, sizeof(*p));
	p->npages = npages;
	p->dir = calloc((npages + COWMM_LEAF_SIZE - 1) >> COWMM_LEAF_SHIFT,
			sizeof(*p->dir));
	return p->dir ? 0 : -ENOMEM;
}

void cowmm__pins_fini(struct cowmm_pins *p)
{
	size_t d, ndir = (p->npages + COWMM_LEAF_SIZE - 1) >> COWMM_LEAF_SHIFT;

	if (p->dir)
		for (d = 0; d < ndir; d++)
			free(p->dir[d]);
	free(p->dir);
	free(p->rec);
	memset(p, 0, sizeof(*p));
}

unsigned cowmm__pin_flags(const struct cowmm_pins *p, size_t pg)
{
	const uint32_t *leaf = p->dir[pg >> COWMM_LEAF_SHIFT];
	uint32_t v;

	if (!leaf)
		return 0;
	v = leaf[pg & (COWMM_LEAF_SIZE - 1)];
	return ((v & COUNT_MAX) ? COWMM_PIN_READ : 0) |
	       ((v >> 16) ? COWMM_PIN_WRITE : 0);
}

size_t cowmm__pins_next_write(const struct cowmm_pins *p, size_t pg)
{
	for (; pg < p->npages; pg++) {
		const uint32_t *leaf = p->dir[pg >> COWMM_LEAF_SHIFT];

		if (!leaf) {
			pg |= COWMM_LEAF_SIZE - 1; /* skip the empty leaf */
			continue;
		}
		if (leaf[pg & (COWMM_LEAF_SIZE - 1)] >> 16)
			break;
	}
	return pg;
}

/* Add (@delta 1) or remove (-1) one pin of @flags on [pg, pg + n). */
static int pins_count(struct cowmm_pins *p, size_t pg, size_t n,
		      unsigned flags, int delta)
{
	size_t i;

	/* Allocate and check first, so that failure changes nothing. */
	for (i = 0; i < n; i++) {
		uint32_t *v = pin_slot(p, pg + i, delta > 0);

		if (!v)
			return delta > 0 ? -ENOMEM : -EINVAL;
		if (delta > 0 && (((flags & COWMM_PIN_READ) &&
				   (*v & COUNT_MAX) == COUNT_MAX) ||
				  ((flags & COWMM_PIN_WRITE) &&
				   (*v >> 16) == COUNT_MAX)))
			return -EOVERFLOW;
	}
	for (i = 0; i < n; i++) {
		uint32_t *v = pin_slot(p, pg + i, false);
		uint32_t w = *v >> 16;

		if (flags & COWMM_PIN_READ)
			*v += (uint32_t)delta;
		if (flags & COWMM_PIN_WRITE) {
			*v += (uint32_t)delta << 16;
			if (w == 0) /* 0 -> 1 */
				p->wpages++;
			else if (w == 1 && delta < 0) /* 1 -> 0 */
				p->wpages--;
		}
	}
	return 0;
}

/* Check the arguments common to cowmm_pin() and cowmm_unpin(). */
static int pin_range(cowmm_region_t *r, void *addr, size_t len, size_t *pg,
		     size_t *n)
{
	uintptr_t a = (uintptr_t)addr;
	int ret = cowmm__check_region(r), tries;
	unsigned seq;
	bool settled;

	if (ret)
		return ret;
	if (!len || (a | len) & (COWMM_PAGE_SIZE - 1))
		return -EINVAL;
	*n = len >> COWMM_PAGE_SHIFT;
	/*
	 * Where the pages are now: part of @r may have moved (layout.c).  A
	 * move or unmap read before this call (mremap() has returned) and
	 * not handled yet is waited for, up to 2 s: the address the caller
	 * has is the new one, and the old layout may take a range that is
	 * in pieces now (exact/pin-across-move-unhandled).  Moves read after
	 * are another thread's, as racy as the call itself.
	 */
	seq = cowmm__maps_seq(r->mm);
	for (tries = 0;; tries++) {
		settled = cowmm__maps_done(r->mm, seq);
		urcu_bp_read_lock();
		ret = cowmm__page_at(r, a, pg) ||
				      cowmm__page_span(r, *pg,
						       r->npages - *pg) < *n
			      ? -EINVAL
			      : 0;
		urcu_bp_read_unlock();
		if (settled || tries == 20000)
			return ret;
		usleep(100);
	}
}

/*
 * Take the locks a pin change needs: the manager's (so that the region is
 * not released meanwhile), then the region's.  -EBADF if it was released.
 */
static int pins_lock(cowmm_region_t *r)
{
	pthread_mutex_lock(&r->mm->lock);
	if (r->magic != COWMM_MAGIC_REGION) {
		pthread_mutex_unlock(&r->mm->lock);
		return -EBADF;
	}
	pthread_mutex_lock(&r->lock);
	return 0;
}

static void pins_unlock(cowmm_region_t *r)
{
	pthread_mutex_unlock(&r->lock);
	pthread_mutex_unlock(&r->mm->lock);
}

int cowmm_pin(cowmm_region_t *r, void *addr, size_t len, unsigned flags)
{
	struct cowmm_pin_rec *rec;
	size_t pg, n, i;
	cowmm_t *mm;
	int ret = pin_range(r, addr, len, &pg, &n);

	if (ret)
		return ret;
	if (!flags || (flags & ~(COWMM_PIN_READ | COWMM_PIN_WRITE)))
		return -EINVAL;
	mm = r->mm;
	ret = pins_lock(r);
	if (ret)
		return ret;
	if (r->pins.nrec == r->pins.caprec) {
		size_t cap = r->pins.caprec ? 2 * r->pins.caprec : 8;

		rec = realloc(r->pins.rec, cap * sizeof(*rec));
		if (!rec) {
			ret = -ENOMEM;
			goto out;
		}
		r->pins.rec = rec;
		r->pins.caprec = cap;
	}
	ret = pins_count(&r->pins, pg, n, flags, 1);
	if (ret)
		goto out;
	r->pins.rec[r->pins.nrec++] = (struct cowmm_pin_rec){ pg, n, flags };

	/*
	 * From now on the device may write without a fault: every snapshot
	 * that still shares one of these pages gets its copy now.
	 */
	if (flags & COWMM_PIN_WRITE) {
		for (i = pg; i < pg + n; i++)
			cowmm__cow_claim(r, i, COWMM_COW_READ,
					 &mm->cnt.pin_copies);
		ret = 0; /* a failure broke the snapshots that needed it */
	}
out:
	pins_unlock(r);
	return ret;
}

int cowmm_unpin(cowmm_region_t *r, void *addr, size_t len)
{
	size_t pg, n, i;
	int ret = pin_range(r, addr, len, &pg, &n);

	if (ret)
		return ret;
	ret = pins_lock(r);
	if (ret)
		return ret;
	ret = -ENOENT;
	for (i = r->pins.nrec; i-- > 0;) {
		struct cowmm_pin_rec *rec = &r->pins.rec[i];

		if (rec->pg != pg || rec->n != n)
			continue;
		ret = pins_count(&r->pins, pg, n, rec->flags, -1);
		memmove(rec, rec + 1,
			(r->pins.nrec - i - 1) * sizeof(*rec));
		r->pins.nrec--;
		break;
	}
	pins_unlock(r);
	return ret;
}
