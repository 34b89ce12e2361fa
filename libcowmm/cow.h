/* SPDX-License-Identifier: MIT */
/*
 * The sharing rule, in one place (cow.c).
 *
 * Page pg of region r is shared while a live snapshot newer than wgen[pg]
 * still needs it (cowmm__snap_needs()).  Before the page may change, every
 * such snapshot gets its old bytes (one copy, published to all of them) or,
 * where that is impossible, is marked broken; then the page is marked
 * written in the current epoch.  Only the functions below do that.
 */
#ifndef COWMM_COW_H
#define COWMM_COW_H

#include "cowmm_i.h"

/* Does a snapshot of @r still share page @pg?  r->lock held. */
bool cowmm__shared_locked(cowmm_region_t *r, size_t pg);

/* Mark broken every live snapshot that still shares page @pg of @r. */
void cowmm__break_needers(cowmm_region_t *r, size_t pg, const char *why);

/* Where the old bytes of a page come from when it is claimed. */
enum cowmm_cow_src {
	COWMM_COW_READ, /* the region's current content of the page */
	COWMM_COW_ZERO, /* known never populated: zeros, nothing read */
};

/*
 * Claim page @pg of @r for a change: preserve it for every snapshot that
 * shares it, then mark it written in this epoch.  Counts one in @counter
 * when a copy was made.  Call with r->lock held.
 *
 * Returns 1 (preserved), 0 (nobody shared it), -EAGAIN when a discard is
 * read but not handled yet or a lock a worker only tries is busy: nothing
 * changed, the caller retries (application threads: cowmm__cow_claim()).
 * -ENOMEM or -EIO: it could not be preserved; the snapshots that needed it
 * are broken and the page is marked all the same.
 */
int cowmm__cow_claim_locked(cowmm_region_t *r, size_t pg,
			    enum cowmm_cow_src src,
			    atomic_uint_fast64_t *counter);

/*
 * cowmm__cow_claim_locked() for an application thread: a pending discard
 * is waited for (r->lock is dropped meanwhile and taken again), so the
 * answer is never -EAGAIN.  Call with r->lock held, never in a worker.
 */
int cowmm__cow_claim(cowmm_region_t *r, size_t pg, enum cowmm_cow_src src,
		     atomic_uint_fast64_t *counter);

/*
 * Claim page @pg whose old bytes the caller copied into @f already (a
 * fresh frame, or &cowmm__zero_frame): publish it to every snapshot that
 * shares the page, drop the allocation's reference, mark the page.
 */
void cowmm__cow_claim_frame_locked(cowmm_region_t *r, size_t pg,
				   struct cowmm_frame *f);

/*
 * Page @pg lost its content behind the library's back (discarded,
 * unmapped): the snapshots that still shared it are broken (@why is
 * logged), and the page is marked.
 */
void cowmm__cow_claim_lost_locked(cowmm_region_t *r, size_t pg,
				  const char *why);

/* Mark page @pg written if no snapshot shares it; false otherwise. */
bool cowmm__cow_claim_unshared(cowmm_region_t *r, size_t pg);

#endif
