// SPDX-License-Identifier: MIT
/*
 * Where a region's pages are in memory.
 *
 * A region starts as one piece at its base.  mremap() of part of it moves
 * that part elsewhere, registered and write-protected as it was, and the
 * region follows it (DESIGN.md: "a moved range is followed to its new
 * address"): page pg stays page pg of the region, of its snapshots and of
 * its clones, only its address changes.  The layout is the list of pieces,
 * in page order; a move splits pieces at its ends, and pieces that meet
 * again (moved back) are merged, so that a region moved whole is one
 * piece again.
 *
 * A layout is never changed in place: a move publishes a new one under the
 * region's lock and frees the old one after an RCU grace period.  Readers
 * outside the lock (snapshot reads) load it once and see one consistent
 * picture, old or new.
 */
#include <errno.h>
#include <stdlib.h>

#include "cowmm_i.h"

struct cowmm_layout *cowmm__layout_one(uintptr_t base, size_t npages)
{
	struct cowmm_layout *l = malloc(sizeof(*l) + sizeof(l->p[0]));

	if (!l)
		return NULL;
	l->n = 1;
	l->p[0] = (struct cowmm_piece){ 0, npages, base };
	return l;
}

/* The piece holding page @pg of a layout of more than one piece. */
const struct cowmm_piece *cowmm__piece_of(const struct cowmm_layout *l,
					  size_t pg)
{
	size_t lo = 0, hi = l->n;

	while (hi - lo > 1) {
		size_t mid = lo + (hi - lo) / 2;

		if (l->p[mid].pg <= pg)
			lo = mid;
		else
			hi = mid;
	}
	return &l->p[lo];
}

size_t cowmm__page_span(const cowmm_region_t *r, size_t pg, size_t n)
{
	const struct cowmm_layout *l = cowmm__layout(r);
	const struct cowmm_piece *p = l->n == 1 ? l->p : cowmm__piece_of(l, pg);
	size_t left = p->pg + p->n - pg;

	return n < left ? n : left;
}

uintptr_t cowmm__page_run(const cowmm_region_t *r, size_t pg, size_t *n)
{
	const struct cowmm_layout *l = cowmm__layout(r); /* one load: both */
	const struct cowmm_piece *p = l->n == 1 ? l->p : cowmm__piece_of(l, pg);
	size_t left = p->pg + p->n - pg;

	if (*n > left)
		*n = left;
	return p->addr + ((pg - p->pg) << COWMM_PAGE_SHIFT);
}

int cowmm__page_at(const cowmm_region_t *r, uintptr_t addr, size_t *pg)
{
	const struct cowmm_layout *l = cowmm__layout(r);
	size_t i;

	for (i = 0; i < l->n; i++) {
		const struct cowmm_piece *p = &l->p[i];

		if (addr >= p->addr &&
		    (addr - p->addr) >> COWMM_PAGE_SHIFT < p->n) {
			*pg = p->pg + ((addr - p->addr) >> COWMM_PAGE_SHIFT);
			/* A hole's address may be another page's now. */
			if (!cowmm__hole(r, *pg))
				return 0;
		}
	}
	return -ENOENT;
}

size_t cowmm__next_run(const cowmm_region_t *r, size_t *pg, uintptr_t *addr)
{
	size_t first = *pg, n;

	while (first < r->npages && r->holes &&
	       cowmm__test_bit(r->holes, first))
		first++;
	if (first >= r->npages)
		return 0;
	n = cowmm__page_span(r, first, r->npages - first);
	if (r->holes) {
		size_t i;

		for (i = 1; i < n; i++)
			if (cowmm__test_bit(r->holes, first + i))
				break;
		n = i;
	}
	*pg = first;
	*addr = cowmm__page_addr(r, first);
	return n;
}

static void layout_free_rcu(struct rcu_head *head)
{
	cowmm__rcu_after_grace();
	free(caa_container_of(head, struct cowmm_layout, rcu));
}

/* Append [pg, pg + n) at @addr to @l, merged with the last piece if they
 * meet in memory. */
static void add_piece(struct cowmm_layout *l, size_t pg, size_t n,
		      uintptr_t addr)
{
	struct cowmm_piece *last = l->n ? &l->p[l->n - 1] : NULL;

	if (!n)
		return;
	if (last && last->pg + last->n == pg &&
	    last->addr + (last->n << COWMM_PAGE_SHIFT) == addr) {
		last->n += n;
		return;
	}
	l->p[l->n++] = (struct cowmm_piece){ pg, n, addr };
}

int cowmm__layout_move(cowmm_region_t *r, uintptr_t from, uintptr_t to,
		       size_t len)
{
	const struct cowmm_layout *old = r->layout;
	uintptr_t end = from + len;
	struct cowmm_layout *l;
	bool moved = false;
	size_t i;

	/* Each piece splits in three at most. */
	l = malloc(sizeof(*l) + 3 * old->n * sizeof(l->p[0]));
	if (!l)
		return -ENOMEM;
	l->n = 0;
	for (i = 0; i < old->n; i++) {
		const struct cowmm_piece *p = &old->p[i];
		uintptr_t a = p->addr, b = a + (p->n << COWMM_PAGE_SHIFT);
		uintptr_t lo = a > from ? a : from, hi = b < end ? b : end;

		if (lo >= hi) {
			add_piece(l, p->pg, p->n, a);
			continue;
		}
		add_piece(l, p->pg, (lo - a) >> COWMM_PAGE_SHIFT, a);
		add_piece(l, p->pg + ((lo - a) >> COWMM_PAGE_SHIFT),
			  (hi - lo) >> COWMM_PAGE_SHIFT, lo - from + to);
		add_piece(l, p->pg + ((hi - a) >> COWMM_PAGE_SHIFT),
			  (b - hi) >> COWMM_PAGE_SHIFT, hi);
		moved = true;
	}
	if (!moved) {
		free(l);
		return 0;
	}
	__atomic_store_n(&r->layout, l, __ATOMIC_RELEASE);
	/* Page 0's address, for cowmm_region_base(). */
	__atomic_store_n(&r->base, l->p[0].addr, __ATOMIC_RELEASE);
	urcu_bp_call_rcu(&((struct cowmm_layout *)old)->rcu, layout_free_rcu);
	return 1;
}
