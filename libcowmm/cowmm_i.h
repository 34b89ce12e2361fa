/* SPDX-License-Identifier: MIT */
/*
 * Private declarations shared between the library's files.  Nothing here is
 * part of the API; tests may include it, as liburing's do with its own.
 */
#ifndef COWMM_I_H
#define COWMM_I_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "cowmm.h"
#include "cowmm_daemon.h" /* cowmm__in_worker, cowmm__check_maps() */
#include "rcu.h"

#define COWMM_PAGE_SHIFT 12
#define COWMM_PAGE_SIZE (1UL << COWMM_PAGE_SHIFT)
#define COWMM_HPAGE_SIZE (2UL << 20)
#define COWMM_LEAF_SHIFT 9 /* 512 frame slots per leaf: one 4 KiB block */
#define COWMM_LEAF_SIZE (1UL << COWMM_LEAF_SHIFT)
#define COWMM_GRAVEYARD 256 /* released handles remembered for -EBADF */
#define COWMM_MOVED_RING 64 /* moves remembered, and where: moved_since() */

#ifndef ARRAY_SIZE
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#endif
#define cowmm__unlikely(x) __builtin_expect(!!(x), 0)

enum cowmm_magic {
	COWMM_MAGIC_MM = 0x6d6d6f63,     /* "comm" */
	COWMM_MAGIC_REGION = 0x6e67726f, /* "orgn" */
	COWMM_MAGIC_SNAP = 0x70616e73,   /* "snap" */
	COWMM_MAGIC_DEAD = 0x64616564,   /* "dead" */
};

/* ------------------------------------------------------------------------ */
/* frames.c: preserved 4 KiB pages, refcounted, freed after a grace period */

struct cowmm_frame_chunk;

struct cowmm_frame {
	atomic_uint refs; /* snapshots that hold it */
	uint32_t slot; /* index in its chunk */
	struct cowmm_frame_chunk *chunk;
	struct cowmm_frame *next_free;
	struct rcu_head rcu;
};

struct cowmm_frame_pool {
	pthread_mutex_t lock;
	atomic_uint fail_next; /* tests: make the next allocations fail */
	struct cowmm_frame_chunk *partial; /* chunks with free slots */
	atomic_uint_fast64_t *live;        /* the manager's frames_live */
};

/* Content of a page never written: readers see zeros, nothing is held. */
extern struct cowmm_frame cowmm__zero_frame;
/* In a clone's origin: the clone has its own copy, the page is not needed. */
extern struct cowmm_frame cowmm__gone_frame;

static inline bool cowmm__frame_real(const struct cowmm_frame *f)
{
	return f && f != &cowmm__zero_frame && f != &cowmm__gone_frame;
}

int cowmm__frame_pool_init(struct cowmm_frame_pool *pool,
			   atomic_uint_fast64_t *live);
void cowmm__frame_pool_fini(struct cowmm_frame_pool *pool);
struct cowmm_frame *cowmm__frame_alloc(struct cowmm_frame_pool *pool);
void cowmm__frame_free_now(struct cowmm_frame *f);
void *cowmm__frame_data(const struct cowmm_frame *f);
void cowmm__frame_get(struct cowmm_frame *f);
void cowmm__frame_put(struct cowmm_frame *f);

/* A sparse map from page index to frame, two levels of 512 slots. */
struct cowmm_frame_map {
	size_t npages;
	struct cowmm_frame ***dir; /* dir[pg >> 9][pg & 511]; atomic slots */
};

int cowmm__fmap_init(struct cowmm_frame_map *m, size_t npages);
void cowmm__fmap_fini(struct cowmm_frame_map *m); /* puts every frame */
struct cowmm_frame *cowmm__fmap_get(const struct cowmm_frame_map *m,
				    size_t pg);
int cowmm__fmap_set(struct cowmm_frame_map *m, size_t pg,
		    struct cowmm_frame *f);

/* ------------------------------------------------------------------------ */
/* manager.c */

/* Counters, updated with relaxed atomics; see struct cowmm_stats. */
struct cowmm_counters {
	atomic_uint_fast64_t wp_faults, missing_faults, copies, reuses, moves,
		pin_copies, ahead_copies, bytes_preserved, frames_live,
		snapshots_live, regions_live, detach_copies, broken, throttled,
		follows;
};

#define cowmm__count(mm, field, n)                                             \
	atomic_fetch_add_explicit(&(mm)->cnt.field, (n), memory_order_relaxed)

/* The regions of a manager by address, replaced whole under RCU. */
struct cowmm_rtable {
	struct rcu_head rcu;
	size_t n;
	struct cowmm_rtable_ent {
		uintptr_t base; /* a copy: the region may move (mremap) */
		size_t len;
		struct cowmm_region *r;
		size_t pg; /* the region's page at base */
	} e[];
};

struct cowmm {
	uint32_t magic;
	int uffd;
	int stopfd; /* eventfd: workers exit when it is readable */
	int pagemap; /* /proc/self/pagemap, to verify discarded pages */
	/*
	 * A uffd-wp marker's pagemap entry, its PM_SWAP and frame bits
	 * (probe_marker()); UINT64_MAX when it cannot be told from a page
	 * swapped out.
	 */
	uint64_t pm_marker;
	uint64_t features;        /* negotiated with UFFDIO_API */
	uint64_t kernel_features; /* offered by the running kernel */
	unsigned long fork_gen;   /* cowmm__fork_gen() at open */
	unsigned flags;
	size_t fault_around;
	uint64_t max_frames; /* bounded mode: frames the fault path may hold */
	bool naive; /* test switch: the writer gets the copy; region.c */

	pthread_mutex_t lock; /* regions, graveyard, handle lifetimes */
	struct cowmm_rtable *rtable; /* RCU */
	/*
	 * Serialises the rtable's writers; taken last, never held across a
	 * wait.  Event handlers change the table without mm->lock, which an
	 * application thread may hold while it waits for them.
	 */
	pthread_mutex_t table_lock;
	struct cowmm_region *regions; /* list, newest first */
	struct cowmm_snap *snaps;     /* every live snapshot, attached or not */
	struct cowmm_frame_pool pool;
	struct cowmm_counters cnt;

	void *graveyard[COWMM_GRAVEYARD];
	unsigned grave_next;

	unsigned nworkers;
	pthread_t *workers;
	/*
	 * Guards the workers[] slots: a worker that stops on an error
	 * starts its replacement in its own slot unless stopping is set
	 * (cowmm_close() joins whoever is in the slots then).
	 */
	pthread_mutex_t workers_lock;
	bool stopping;
	atomic_uint fail_worker; /* test hook: a worker stops as on an error */
	atomic_uint_fast64_t pause_until; /* test hook: no reads till then */
	atomic_bool uffd_lost;   /* the fd was closed under the library */
	atomic_uint busy;     /* workers between poll() and the end of a batch */
	atomic_uint deferred; /* messages workers hold for a busy lock */
	atomic_uint remaps_pending; /* REMAP events read, not yet handled */
	atomic_uint removes_pending; /* REMOVE events read, not yet handled */
	/* Their sequence numbers (manager.c); removes_read under read_lock. */
	pthread_mutex_t removes_lock;
	uint32_t removes_read;
	struct cowmm_removing {
		uint32_t seq;
		uintptr_t start, end;
	} *removes_q;
	size_t removes_n, removes_cap;
	atomic_uint unmaps_pending;  /* UNMAP events read, not yet handled */
	/*
	 * REMAP and UNMAP events are handled in the order they were read,
	 * and a REMOVE after those read before it (manager.c): numbered as
	 * read (maps_read, under read_lock), counted as handled.
	 */
	uint16_t maps_read;
	/* Some read, not handled: pend_n != 0 (cowmm__uffd_patience()). */
	atomic_bool maps_behind;
	atomic_uint maps_done;
	/* Moves and unmaps read, all of them (under read_lock): born_maps. */
	uint32_t maps_all;
	/*
	 * The ranges the last COWMM_MOVED_RING moves and unmaps read took
	 * from and moved to, by maps_read (under read_lock): a check that
	 * the layout it used still holds asks only about its pages
	 * (manager.c, moved_since()).
	 */
	struct cowmm_moved {
		uintptr_t from, from_end, to, to_end;
	} moved[COWMM_MOVED_RING];
	/*
	 * The moves and unmaps read and not handled yet, in the order read
	 * (under read_lock): where a REMOVE handler finds a page that moved
	 * after its event (cowmm__moved_now()).
	 */
	struct cowmm_moved *pend; /* a ring: pend_n from pend_head */
	size_t pend_head, pend_n, pend_cap;
	/* A page of no region, registered: cowmm__born_maps(). */
	void *barrier;
	/*
	 * The last move handled: its number (maps_done + 1 when handled)
	 * and old range (manager.c, unmap_since()).  Handlers of moves and
	 * unmaps run one at a time, in order.
	 */
	struct {
		uint32_t nr;
		uintptr_t start, end;
	} last_remap;
	pthread_mutex_t read_lock;  /* one worker reads the fd at a time */
};

unsigned long cowmm__fork_gen(void);

/* This thread is resolving its own fault (inthread.c). */
extern __thread bool cowmm__in_sigbus;
/* This worker is handling a REMOVE event (manager.c). */
extern __thread bool cowmm__in_remove;
/*
 * This thread waits only for discards read at or before cowmm__stamp
 * (manager.c): a worker's fault, an application call in progress.
 */
extern __thread bool cowmm__stamped;
extern __thread uint32_t cowmm__stamp;
bool cowmm__removes_before(cowmm_t *mm, uint32_t stamp);
uint32_t cowmm__removes_stamp(cowmm_t *mm);
int cowmm__dropped_quietly(cowmm_t *mm, uintptr_t addr, uint32_t stamp);
bool cowmm__still_ours(cowmm_t *mm, unsigned seq, uintptr_t addr);
bool cowmm__pm_is_marker(const cowmm_t *mm, uint64_t e);
int cowmm__fill_unmoved(cowmm_t *mm, unsigned seq, uintptr_t addr,
			const void *src, bool poison, bool wake);
bool cowmm__still_ours_span(cowmm_t *mm, unsigned seq, uintptr_t addr,
			    size_t n);
bool cowmm__still_ours_wait(cowmm_t *mm, unsigned seq, uintptr_t addr);
bool cowmm__page_leaving(cowmm_t *mm, uintptr_t page);
int cowmm__unprotect(cowmm_t *mm, unsigned seq, uintptr_t start, size_t len,
		     bool wake);

/*
 * Worker threads never block on a lock another thread may hold across a
 * userfaultfd ioctl: while an event is pending every such ioctl fails with
 * EAGAIN until a worker reads the event, so a blocked worker could wait
 * forever.  A worker takes locks with cowmm__lock() and, on -EAGAIN, defers
 * the message and goes on reading.  Other threads block as usual.
 * (cowmm__in_worker: cowmm_daemon.h, as cowmmd sets it too.)
 */
static inline int cowmm__lock(pthread_mutex_t *m)
{
	if (cowmm__in_worker)
		return pthread_mutex_trylock(m) ? -EAGAIN : 0;
	pthread_mutex_lock(m);
	return 0;
}
void cowmm__quiesce(cowmm_t *mm); /* tests: wait for every queued fault */
void cowmm__inject_frame_failures(cowmm_t *mm, unsigned n); /* tests */
int cowmm__check_mm(const cowmm_t *mm);
void cowmm__bury(cowmm_t *mm, void *handle); /* mm->lock held */
int cowmm__rtable_insert(cowmm_t *mm, struct cowmm_region *r);
int cowmm__rtable_move(cowmm_t *mm, struct cowmm_region *r);
bool cowmm__rtable_overlaps(cowmm_t *mm, uintptr_t start, size_t len);
void cowmm__rtable_remove(cowmm_t *mm, struct cowmm_region *r);
struct cowmm_region *cowmm__region_lookup(cowmm_t *mm, uintptr_t addr);

/* ------------------------------------------------------------------------ */
/* pin.c */

struct cowmm_pin_rec {
	size_t pg, n;
	unsigned flags;
};

struct cowmm_pins {
	size_t npages;
	uint32_t **dir; /* per page: write count << 16 | read count */
	size_t wpages;  /* pages with at least one write pin */
	struct cowmm_pin_rec *rec; /* one per cowmm_pin() call */
	size_t nrec, caprec;
};

int cowmm__pins_init(struct cowmm_pins *p, size_t npages);
void cowmm__pins_fini(struct cowmm_pins *p);
unsigned cowmm__pin_flags(const struct cowmm_pins *p, size_t pg);
size_t cowmm__pins_next_write(const struct cowmm_pins *p, size_t pg);

/* ------------------------------------------------------------------------ */
/* region.c */

/*
 * Where a region's pages are: pieces in page order (layout.c).  Replaced
 * whole under the region's lock, freed after an RCU grace period.
 */
struct cowmm_piece {
	size_t pg, n;   /* pages [pg, pg + n) of the region */
	uintptr_t addr; /* where page pg is */
};

struct cowmm_layout {
	struct rcu_head rcu;
	size_t n;
	struct cowmm_piece p[];
};

struct cowmm_region {
	uint32_t magic;
	bool adopted;
	bool dying; /* being released: faults are left to the unregister */
	/* No event was in flight when born_maps was taken (manager.c). */
	bool born_quiet;
	/* mm->maps_all when it entered the table: no UNMAP read later, nor
	 * the one of a move read before (unless born_quiet), concerns it. */
	uint32_t born_maps;
	cowmm_t *mm;
	uintptr_t base; /* where page 0 is (cowmm_region_base()) */
	struct cowmm_layout *layout; /* RCU: where every page is */
	size_t len, npages;
	unsigned flags;

	/*
	 * Serialises the per-page decisions with snapshot creation.  Held
	 * from the mapcount decision until the page's protection is cleared,
	 * so that no snapshot can be taken between the two.
	 */
	pthread_mutex_t lock;
	uint32_t epoch;  /* epoch of the newest snapshot ever taken */
	uint32_t *wgen;  /* per page: epoch when last made writable */
	struct cowmm_pins pins;
	struct cowmm_snap *snaps; /* live snapshots, newest first */
	struct cowmm_region *next; /* in mm->regions */
	/* Fault-around: the page after the last run unprotected, its size. */
	size_t fa_next, fa_win;
	/* Snapshots left to protect whole before scanning again (region.c). */
	unsigned scan_skip;

	/*
	 * A clone reads as its origin (a snapshot of its source taken at
	 * clone time) until a page is materialised by a missing fault.
	 * A view (cowmm_snap_map()) is filled from the snapshot it shows.
	 */
	struct cowmm_snap *origin;
	struct cowmm_snap *view_of;
	unsigned long *present; /* clones and views: pages materialised */
	struct cowmm_lazy *lazy; /* loading from a snapshot file on demand */
	unsigned long *holes;   /* pages the application unmapped */
};

/* layout.c */
struct cowmm_layout *cowmm__layout_one(uintptr_t base, size_t npages);
const struct cowmm_piece *cowmm__piece_of(const struct cowmm_layout *l,
					  size_t pg);
/* Follow [@from, @from + @len) moved to @to: 1 if pages of @r were there,
 * 0 if none, -ENOMEM.  Call with r->lock held. */
int cowmm__layout_move(cowmm_region_t *r, uintptr_t from, uintptr_t to,
		       size_t len);
/* Of the @n pages from @pg, how many lie one after another in memory. */
size_t cowmm__page_span(const cowmm_region_t *r, size_t pg, size_t n);
/*
 * Where page @pg of @r is, and *@n cut to the pages from it in the same
 * piece, from one layout: for readers outside r->lock, which a move may
 * change under them.
 */
uintptr_t cowmm__page_run(const cowmm_region_t *r, size_t pg, size_t *n);
/* The page of @r at @addr: 0, or -ENOENT (not one, or it left @r). */
int cowmm__page_at(const cowmm_region_t *r, uintptr_t addr, size_t *pg);
/*
 * The next run from *@pg: pages that have not left @r (holes) and lie one
 * after another in memory.  Sets *@pg to its first page and *@addr to its
 * address, returns its length in pages; 0 when none is left.
 */
size_t cowmm__next_run(const cowmm_region_t *r, size_t *pg, uintptr_t *addr);

static inline const struct cowmm_layout *
cowmm__layout(const cowmm_region_t *r)
{
	return __atomic_load_n(&r->layout, __ATOMIC_ACQUIRE);
}

/* Has part of @r been moved away from the rest? */
static inline bool cowmm__in_pieces(const cowmm_region_t *r)
{
	return cowmm__layout(r)->n > 1;
}

/* Where page @pg of @r is now. */
static inline uintptr_t cowmm__page_addr(const cowmm_region_t *r, size_t pg)
{
	const struct cowmm_layout *l = cowmm__layout(r);
	const struct cowmm_piece *p = l->n == 1 ? l->p : cowmm__piece_of(l, pg);

	return p->addr + ((pg - p->pg) << COWMM_PAGE_SHIFT);
}

/* Bytes of a bitmap of one bit per page, in whole unsigned longs. */
static inline size_t cowmm__bitmap_bytes(size_t npages)
{
	return (npages + 63) / 64 * sizeof(unsigned long);
}

static inline bool cowmm__test_bit(const unsigned long *map, size_t i)
{
	return (map[i / 64] >> (i % 64)) & 1;
}

static inline void cowmm__set_bit(unsigned long *map, size_t i)
{
	map[i / 64] |= 1UL << (i % 64);
}

/*
 * Has page @pg left @r (unmapped)?  Also without r->lock (cowmm_pin()
 * finds its pages so): the bitmap is published and its bits set with
 * atomics (events.c).
 */
static inline bool cowmm__hole(const cowmm_region_t *r, size_t pg)
{
	const unsigned long *h = __atomic_load_n(&r->holes, __ATOMIC_ACQUIRE);

	return h && (__atomic_load_n(&h[pg / 64], __ATOMIC_RELAXED) >>
		     (pg % 64)) & 1;
}

/*
 * A snapshot file loaded lazily (cowmm_region_load(COWMM_LOAD_LAZY)): each
 * page comes in on its first missing fault, from off[pg] in the file (0:
 * a page the file does not store, zero).  loaded: pages filled (or
 * discarded) since; left: how many are not.
 */
struct cowmm_lazy {
	int fd;
	uint64_t *off;
	unsigned long *loaded;
	size_t left;
	size_t poisoned; /* pages the file could no longer give */
};

/* inthread.c: the SIGBUS handler of COWMM_OPEN_IN_THREAD managers */
int cowmm__inthread_add(cowmm_t *mm);
void cowmm__inthread_remove(cowmm_t *mm);
extern atomic_uint cowmm__releasing;
extern atomic_uint cowmm__inthread_managers;

int cowmm__check_region(const cowmm_region_t *r);
int cowmm__read_at(int fd, void *buf, size_t n, off_t off); /* format.c */
int cowmm__lazy_start(cowmm_region_t *r, int fd, uint64_t *off);
int cowmm__lazy_finish_locked(cowmm_region_t *r);
int cowmm__lazy_finish_moving(cowmm_region_t *r);
void cowmm__lazy_discard_locked(cowmm_region_t *r, size_t pg, size_t n);
int cowmm__lazy_fault_locked(cowmm_region_t *r, size_t pg, bool wake);
void cowmm__lazy_free(cowmm_region_t *r);
int cowmm__region_fault_wp(cowmm_region_t *r, uintptr_t addr, bool wake);
int cowmm__region_fault_missing(cowmm_region_t *r, uintptr_t addr, bool wake);
int cowmm__region_wp(cowmm_region_t *r, bool protect);
/*
 * @fn on each run of @r (cowmm__next_run()): @pg, its first page, is at
 * @start.  Returns @fn's first error; every run is visited.
 */
typedef int cowmm_run_fn(cowmm_region_t *r, size_t pg, uintptr_t start,
			 size_t len, void *arg);
int cowmm__for_runs(cowmm_region_t *r, cowmm_run_fn *fn, void *arg);
void cowmm__region_wake(cowmm_region_t *r);
bool cowmm__region_mapped(cowmm_region_t *r);
int cowmm__region_read_page(cowmm_region_t *r, size_t pg, void *dst,
			    bool probe);
int cowmm__region_map(cowmm_t *mm, size_t len, unsigned flags, int prot,
		      uint64_t mode, cowmm_region_t **out);
void cowmm__region_unmap(cowmm_region_t *r); /* views; mm->lock held */
int cowmm__clone_fill(cowmm_region_t *r, size_t pg, bool wake);
int cowmm__clone_forget(cowmm_region_t *c, size_t pg);
int cowmm__view_fill(cowmm_region_t *r, size_t pg, bool wake);
bool cowmm__page_is_zero(const void *p); /* cow.c */
int cowmm__resident(uintptr_t start, size_t npages, unsigned char *vec);
bool cowmm__swap_possible(void);
void cowmm__naive_replace(cowmm_region_t *r, size_t pg);
void cowmm__set_naive(cowmm_t *mm, bool on); /* tests and benchmarks */
void cowmm__fail_worker(cowmm_t *mm); /* tests: a worker stops on an error */
/* Tests: called by snapshot creation and restore right after protecting,
 * with the region's lock held (a move can land there).  Set it with
 * __atomic_store_n(). */
extern void (*cowmm__after_protect)(cowmm_region_t *r);
/* Tests: called by restore with both locks held for a run of pages at
 * @addr it is about to unprotect (@stage 0), has unprotected (1), is about
 * to copy into (2); and for each page it is about to claim (3). */
extern void (*cowmm__restore_copying)(cowmm_region_t *r, int stage,
				      uintptr_t addr, size_t len);
/* Tests: called by cowmm_snap_read() when it found where the pages it
 * reads are (@addr), before it reads their pagemap entries. */
extern void (*cowmm__read_sampled)(uintptr_t addr);
/* Tests: called when a live page at @addr was found protected, right
 * before it is copied (region.c). */
extern void (*cowmm__read_checked)(uintptr_t addr);
/* Tests: the same for a snapshot read's live page (snapshot.c). */
extern void (*cowmm__snap_read_checked)(uintptr_t addr);
/* Tests: called with the region's lock held right before protecting
 * again looks for pages of @r changed without a fault (region.c). */
extern void (*cowmm__walk_unseen)(cowmm_region_t *r);
/* Tests: called in the worker right after it followed a move of
 * [@from, @from + @len) (manager.c), before it reads another event. */
extern void (*cowmm__remap_handled)(uintptr_t from, size_t len);
/* Tests: called by a lazy load right before it fills the page at @addr,
 * the region's lock held (lazy.c). */
extern void (*cowmm__lazy_filling)(uintptr_t addr);
/* Tests: called in the worker as it starts to follow a move of
 * [@from, @from + @len), the region table loaded, no region locked yet
 * (events.c). */
extern void (*cowmm__remap_found)(uintptr_t from, size_t len);
/* Tests: called right after the library unregistered [@start, @start +
 * @len) from its userfaultfd (uffd.c), before anything else. */
extern void (*cowmm__unregistered)(uintptr_t start, size_t len);
void cowmm__wait_discards(cowmm_t *mm);
void cowmm__wait_events(cowmm_t *mm);
bool cowmm__discards_pending(cowmm_t *mm);
bool cowmm__maps_pending(cowmm_t *mm);
unsigned cowmm__maps_seq(cowmm_t *mm);
unsigned cowmm__maps_handled(cowmm_t *mm);
bool cowmm__removes_over(cowmm_t *mm, uintptr_t addr);
uintptr_t cowmm__moved_now(cowmm_t *mm, uintptr_t page, unsigned *seq);
void cowmm__pend_done(cowmm_t *mm);
bool cowmm__maps_done(cowmm_t *mm, unsigned seq);
bool cowmm__born_maps(cowmm_t *mm, uint32_t *maps);
bool cowmm__moved_since(cowmm_t *mm, unsigned seq, uintptr_t start,
			size_t len);
bool cowmm__moved_again(cowmm_t *mm, int *rounds, uint64_t *since);
void cowmm__pause_reads(cowmm_t *mm, unsigned ms); /* tests */
uint64_t cowmm__now_ns(void); /* CLOCK_MONOTONIC */
int cowmm__event_remove(cowmm_t *mm, uintptr_t start, uintptr_t end);
/* An UNMAP's number, and the first that may concern it (events.c). */
struct cowmm_unmap_nr {
	uint32_t nr, since;
};
int cowmm__event_unmap(cowmm_t *mm, uintptr_t start, uintptr_t end,
		       uint32_t nr, uint32_t since);
int cowmm__event_remap(cowmm_t *mm, uintptr_t from, uintptr_t to,
		       size_t len);
int cowmm__live_read(uintptr_t addr, void *dst, size_t len);
int cowmm__live_write(uintptr_t addr, const struct iovec *src, size_t n);
int cowmm__live_write_unmoved(cowmm_t *mm, unsigned seq, uintptr_t addr,
			      const struct iovec *src, size_t n);
int cowmm__live_readv(const struct iovec *local, const struct iovec *remote,
		      size_t n);
void cowmm__region_release_all(cowmm_t *mm);

/* ------------------------------------------------------------------------ */
/* snapshot.c */

struct cowmm_snap {
	uint32_t magic;
	bool broken; /* atomic */
	uint32_t epoch;
	cowmm_t *mm;
	cowmm_region_t *region; /* RCU; NULL once detached from it */
	uintptr_t base;         /* of the region when taken */
	size_t len, npages;
	struct cowmm_frame_map frames;
	struct cowmm_snap *next; /* in region->snaps */
	struct cowmm_snap *mm_prev, *mm_next; /* in mm->snaps */
	bool internal;          /* a clone's origin, not a user handle */
	cowmm_region_t *view;   /* cowmm_snap_map(), or NULL */
	/*
	 * Pages below are no longer needed: a stream that releases as it goes
	 * (cowmm_snap_stream()) has read them.  Written under the region's
	 * lock, as the frames are.
	 */
	size_t drained;
};

/* Does @s still need page @pg from its region?  Call with r->lock held. */
static inline bool cowmm__snap_needs(const struct cowmm_snap *s, size_t pg)
{
	return pg >= s->drained && !cowmm__fmap_get(&s->frames, pg);
}

int cowmm__check_snap(const cowmm_snap_t *s);
int cowmm__snap_create_locked(cowmm_region_t *r, bool internal,
			      cowmm_snap_t **out); /* mm->lock held */
int cowmm__snap_create(cowmm_region_t *r, bool internal,
		       cowmm_snap_t **out); /* returns with mm->lock held */
int cowmm__snap_page(cowmm_snap_t *s, size_t pg, void *dst);
void cowmm__snap_break(cowmm_snap_t *s, const char *why);
void cowmm__snap_release_locked(cowmm_snap_t *s); /* mm->lock held */
void cowmm__snap_drain(cowmm_snap_t *s, size_t upto);

/* ------------------------------------------------------------------------ */
/* log.c */

void cowmm__log(enum cowmm_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

#endif /* COWMM_I_H */
