/* SPDX-License-Identifier: MIT */
/**
 * @file cowmm.h
 * libcowmm: snapshots and copy-on-write for anonymous memory, in userspace.
 *
 * libcowmm takes over private anonymous memory regions with userfaultfd in
 * write-protect mode.  A snapshot is a point-in-time view of a region: the
 * application keeps writing, and a page is copied only when it is written
 * while some snapshot still needs its old bytes.  The writer always keeps its
 * physical page; the snapshot receives the copy.
 *
 * Conventions, for every function below:
 *  - 0 (or a count) on success, a negative errno value on failure; errno
 *    after a call means nothing.  cowmm_strerror() names each value.
 *  - Objects come back through an out-parameter that is left untouched on
 *    failure.
 *  - Handles are opaque.  A handle used after it was released gives -EBADF
 *    while the library still remembers it (the last 256 released handles of
 *    each manager); older ones are plain use-after-free, as with any C API.
 *  - In the child of fork(), every call on an inherited handle gives -ECHILD
 *    and the child's memory is ordinary, unmanaged memory.
 *  - No function is async-signal-safe.  A signal handler must not call
 *    them, nor munmap() or mremap() a region's memory: the thread it
 *    interrupts may hold a lock that the library needs to handle that
 *    unmap or move, which the kernel waits for (a deadlock).
 *  - The kernel refuses to change write protection, or to fill a page,
 *    while an mremap(), munmap() or discard (MADV_DONTNEED, MADV_FREE,
 *    MADV_REMOVE) of the manager's memory has not been read by a worker.
 *    While threads keep doing these without pause, calls that protect or
 *    unprotect (cowmm_snapshot(), cowmm_clone(), cowmm_snap_restore(),
 *    cowmm_region_release()), writes that need a copy and first touches
 *    of a region still loading lazily, in any region of the manager, wait
 *    for a moment between two such calls: often seconds, and with two or
 *    more threads at it, until they pause.  Moves and unmaps that never
 *    pause make those calls give up (-ENOENT) instead; discards only make
 *    them wait.
 */
#ifndef COWMM_H
#define COWMM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "cowmm_version.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define COWMM_EXPORT __attribute__((visibility("default")))
#else
#define COWMM_EXPORT
#endif

/** A manager: one userfaultfd and the threads that resolve its faults. */
typedef struct cowmm cowmm_t;
/** A region of private anonymous memory taken over by a manager. */
typedef struct cowmm_region cowmm_region_t;
/** A point-in-time snapshot of a region. */
typedef struct cowmm_snap cowmm_snap_t;
/** A connection to cowmmd, which snapshots this process's memory. */
typedef struct cowmm_client cowmm_client_t;

/**
 * Configuration for cowmm_open().  Initialise with COWMM_CONFIG_INIT so that
 * @c size is set; fields are only ever appended.  A shorter struct (from an
 * older caller) is zero-extended; a longer one is accepted only if every
 * field this library does not know is zero.
 */
struct cowmm_config {
	size_t size;         /**< sizeof(struct cowmm_config); always first */
	unsigned workers;    /**< fault-resolving threads; 0: default (1) */
	unsigned flags;      /**< COWMM_OPEN_*; unknown bits give -EINVAL */
	/**
	 * Fault-around: the most pages one write fault preserves and
	 * unprotects, itself and the pages after it, for a writer that
	 * writes sequentially (its window doubles from 1 with each fault
	 * that continues the previous run; any other fault goes back to 1).
	 * 0 (the default) and 1: off, every page faults alone, so that a
	 * snapshot followed by writes to K distinct pages counts
	 * copies == K.  A sequential writer (a database's save, a bulk
	 * load) gains from #COWMM_FAULT_AROUND_SEQUENTIAL, the measured
	 * recommendation.  At most #COWMM_FAULT_AROUND_MAX.  (Before 0.2,
	 * 0 meant a 64-page window.)
	 * Costs up to that many pages preserved that the writer may never
	 * write; the snapshot still needed them.  Counted in
	 * cowmm_stats.ahead_copies.  Not done for clones, views and lazy
	 * loads.
	 */
	size_t fault_around;
	/**
	 * Bounded mode: the most bytes of preserved pages (frames) the
	 * manager holds for its snapshots; 0: no limit.  A write that would
	 * need a copy beyond it waits (backpressure) until a snapshot is
	 * released and frees frames: a worker puts the fault back and
	 * retries it every millisecond, an in-thread writer sleeps 200 µs
	 * between tries.  Eager copies (write-pinned pages at snapshot
	 * time, a region released under a snapshot) are not held back, so
	 * they may go beyond it.  The thread that would release the
	 * snapshot must not be the one that waits.  Counted in
	 * cowmm_stats.throttled.  At least one page when set.
	 */
	size_t max_preserved;
};

/**
 * Recommended fault-around window for sequential writers, in pages
 * (256 KiB): from about 34 pages on, one unprotect costs one TLB flush
 * (bench/README figures).  Opt-in: the default is one page.
 * @since 0.2
 */
#define COWMM_FAULT_AROUND_SEQUENTIAL 64
/**
 * The 0.1 name of #COWMM_FAULT_AROUND_SEQUENTIAL, from when it was the
 * default.  Kept for source compatibility; 0 no longer means it.
 */
#define COWMM_FAULT_AROUND_DEFAULT COWMM_FAULT_AROUND_SEQUENTIAL
/** Largest fault-around window accepted, in pages (2 MiB). */
#define COWMM_FAULT_AROUND_MAX 512

/** Initialiser for struct cowmm_config. */
#define COWMM_CONFIG_INIT { .size = sizeof(struct cowmm_config) }

/** Flags of struct cowmm_config. */
enum {
	/**
	 * In-thread fault mode: a write to a page a snapshot still needs is
	 * resolved by the writing thread itself, in a SIGBUS handler the
	 * library installs (UFFD_FEATURE_SIGBUS), instead of by a worker.
	 * No hand-off between threads: the first write after a snapshot costs
	 * about what the kernel's own COW fault costs (bench/README.md).
	 * Limits: a system call that writes into such a page (read(2) into
	 * it, say) fails with EFAULT instead of waiting; clones, snapshot
	 * views and lazy loads need missing faults and return -EOPNOTSUPP;
	 * regions must not be written from the application's own signal
	 * handlers nor hold the C library's heap, nor a thread's stack or
	 * alternate signal stack: the kernel cannot push the SIGBUS frame
	 * onto a protected stack, and the process dies of SIGSEGV at the
	 * first write there after a snapshot.  A SIGBUS that is not a
	 * region's goes to the handler installed before the first such
	 * manager was opened: install yours first, not after.
	 */
	COWMM_OPEN_IN_THREAD = 1u << 0,
#define COWMM_OPEN_IN_THREAD COWMM_OPEN_IN_THREAD
	/**
	 * One worker per CPU the process may run on, each bound to its
	 * CPU (at least cowmm_config.workers in all): a faulting thread
	 * leaves its CPU idle, and the worker bound there can resolve the
	 * fault without a cross-CPU wake-up (bench/README.md, for what
	 * it measured).
	 */
	COWMM_OPEN_PER_CPU = 1u << 1,
#define COWMM_OPEN_PER_CPU COWMM_OPEN_PER_CPU
	/**
	 * Each worker binds itself to the CPU of the thread whose write
	 * faults it resolves (looked up on the first fault after a pause of
	 * 10 ms and every 64 faults), and wakes it as a SCHED_IDLE thread so
	 * that the scheduler keeps the writer there, where that is allowed
	 * (CAP_SYS_NICE, or an RLIMIT_NICE that lets it switch back): no
	 * cross-CPU wake-up per fault.  On the host measured it cut the
	 * first write under a snapshot from 24x the kernel's COW fault to 8x
	 * (bench/README.md).  Opt-in, for a process whose writers have their
	 * CPUs mostly to themselves: as SCHED_IDLE a worker runs again only
	 * when nothing else wants its CPU, so where other threads keep that
	 * CPU busy a fault can wait for seconds (after a wait over 1 ms the
	 * worker wakes normally for 1 s, doubling up to 64 s); a process
	 * that drops CAP_SYS_NICE after cowmm_open() (setuid to a user) may
	 * leave a worker in SCHED_IDLE for good; a worker whose CPUs the
	 * application sets stops following.  Ignored with
	 * #COWMM_OPEN_PER_CPU.  Counted in cowmm_stats.follows.
	 * @since 0.2
	 */
	COWMM_OPEN_FOLLOW = 1u << 2,
#define COWMM_OPEN_FOLLOW COWMM_OPEN_FOLLOW
};

/** Most worker threads a manager accepts. */
#define COWMM_WORKERS_MAX 64

/** Flags of cowmm_region_alloc(). */
enum {
	/** Back the region with transparent huge pages (MADV_HUGEPAGE). */
	COWMM_REGION_THP = 1u << 0,
#define COWMM_REGION_THP COWMM_REGION_THP
	/** Never back the region with huge pages (MADV_NOHUGEPAGE). */
	COWMM_REGION_NOTHP = 1u << 1,
#define COWMM_REGION_NOTHP COWMM_REGION_NOTHP
	/**
	 * Copy on write at 2 MiB: a write fault in a 2 MiB block that one
	 * transparent huge page maps preserves every page of the block a
	 * snapshot still needs and unprotects the block in one piece, so the
	 * huge mapping survives (a 4 KiB unprotect would split it).  Later
	 * writes to the block do not fault, and the next snapshot protects
	 * it as one entry again.  Costs up to 2 MiB of preserved memory for
	 * one 4 KiB write: for dense writers of huge-page memory (a
	 * database's heap), not sparse ones (bench/README.md).  Blocks
	 * not mapped by a huge page are handled 4 KiB at a time.
	 */
	COWMM_REGION_HUGE_COW = 1u << 2,
#define COWMM_REGION_HUGE_COW COWMM_REGION_HUGE_COW
};

/**
 * Counters of a manager, filled by cowmm_stats().  All are totals since
 * cowmm_open() except those ending in _live, which are current values.
 * Fields are only ever appended.
 */
struct cowmm_stats {
	uint64_t wp_faults;      /**< write-protect faults resolved */
	uint64_t missing_faults; /**< missing faults resolved */
	uint64_t copies;         /**< pages preserved because a write faulted
				      on content a snapshot still needed */
	uint64_t reuses;         /**< write faults resolved without a copy;
				      wp_faults == copies + reuses */
	uint64_t moves;          /**< frames handed over with UFFDIO_MOVE */
	uint64_t pin_copies;     /**< eager copies of write-pinned pages */
	uint64_t ahead_copies;   /**< shared neighbours preserved by
				      fault-around */
	uint64_t bytes_preserved; /**< bytes copied into frames, in total */
	uint64_t frames_live;    /**< frames (preserved 4 KiB pages) held now */
	uint64_t snapshots_live; /**< snapshots not yet released */
	uint64_t regions_live;   /**< regions not yet released */
	uint64_t detach_copies;  /**< pages preserved outside a write fault
				      while a snapshot needed them: their
				      region released or restored, or (a
				      clone's page never touched)
				      discarded */
	uint64_t broken;         /**< snapshots marked broken (reads: -EIO) */
	uint64_t throttled;      /**< write faults put back because preserved
				      memory was at cowmm_config.max_preserved
				      (once per try) */
	uint64_t follows;        /**< times a worker moved to the CPU of the
				      thread whose fault it resolved
				      (#COWMM_OPEN_FOLLOW); @since 0.2 */
};

/* ------------------------------------------------------------------------ */
/* Managers                                                                  */

/**
 * Open a manager: one userfaultfd, with the features libcowmm uses
 * negotiated, and its worker threads.
 *
 * The features of the running kernel are probed on a throwaway
 * userfaultfd; the manager's own fd asks for exactly what it uses.  The fd
 * is opened with the userfaultfd(2) system call, or through
 * /dev/userfaultfd when the system call is not allowed.
 * Context: any thread.
 *
 * @param cfg  configuration, or NULL for the defaults
 * @param out  receives the manager; untouched on failure
 * @return 0; -EINVAL (unknown flag, workers > COWMM_WORKERS_MAX,
 *         fault_around > COWMM_FAULT_AROUND_MAX, max_preserved below
 *         one page),
 *         -E2BIG (@p cfg longer than known, with a non-zero tail),
 *         -EPERM (no permission to use userfaultfd; the log says how to
 *         grant it), -ENOSYS (kernel without userfaultfd),
 *         -EOPNOTSUPP (kernel without write-protect support), -ENOMEM,
 *         -EMFILE (also: more than 16 #COWMM_OPEN_IN_THREAD managers),
 *         -EAGAIN (no thread could be started), -EACCES
 *         (/proc/self/pagemap cannot be opened, which the library needs:
 *         a process that is not dumpable, after setuid() for instance;
 *         the log says so)
 * @since 0.1
 */
COWMM_EXPORT int cowmm_open(const struct cowmm_config *cfg, cowmm_t **out);

/**
 * Close a manager: release every snapshot and region it holds, stop its
 * threads and close its userfaultfd.  Memory of adopted regions stays
 * mapped and writable; memory from cowmm_region_alloc() is unmapped, where
 * it is after every mremap(), munmap() and discard that returned before
 * the call.  An adopted region still loading lazily loads the rest first,
 * as cowmm_region_release() does; where threads keep moving its pages
 * while this runs (the application's race: see Context), the pages not
 * loaded when it gives up read zero, and the log says so.
 * Threads blocked on a fault in one of its regions are woken.
 * Context: any thread but the manager's own; not concurrently with any
 * other call on this manager or its handles.  In the child of fork() it
 * does nothing.
 *
 * @param mm  a manager, or NULL (nothing happens)
 * @since 0.1
 */
COWMM_EXPORT void cowmm_close(cowmm_t *mm);

/**
 * Read the manager's counters.
 *
 * Writes min(@p size, sizeof(struct cowmm_stats)) bytes, so that callers
 * built against an older or newer header work unchanged.
 * Context: any thread.
 *
 * @param mm    a manager
 * @param st    receives the counters
 * @param size  sizeof(*st) as the caller knows it
 * @return 0; -EINVAL (NULL argument), -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_stats(cowmm_t *mm, struct cowmm_stats *st,
			     size_t size);

/**
 * The userfaultfd features this manager negotiated with the kernel, as
 * UFFD_FEATURE_* bits of <linux/userfaultfd.h>.
 * Context: any thread.
 *
 * @param mm  a manager
 * @return the feature bits, or 0 for NULL
 * @since 0.1
 */
COWMM_EXPORT uint64_t cowmm_features(const cowmm_t *mm);

/* ------------------------------------------------------------------------ */
/* Regions                                                                   */

/**
 * Map a new private anonymous region of @p len bytes and take it over.
 * The memory reads as zero and is not populated.
 * Creating a region (this call, cowmm_region_adopt(), cowmm_region_load(),
 * cowmm_clone(), a view of cowmm_snap_map()) waits, at most 1 s, until
 * the manager's unmap and move events in flight are read: an munmap()
 * that another thread has not seen return must not take the new region's
 * pages.  After 1 s (threads that unmap or move the manager's memory
 * without pause) it waits only for the events already queued; an munmap()
 * that spans memory of another userfaultfd queues its event for this
 * manager only once that one's is read, so memory it freed that becomes
 * a region while that reader is slower than 1 s may lose its pages when
 * the event arrives.
 * Context: any thread.
 *
 * @param mm     a manager
 * @param len    length in bytes, a non-zero multiple of the page size
 * @param flags  COWMM_REGION_THP or COWMM_REGION_NOTHP (not both), and
 *               COWMM_REGION_HUGE_COW
 * @param out    receives the region; untouched on failure
 * @return 0; -EINVAL (bad length or flags), -ENOMEM, -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_region_alloc(cowmm_t *mm, size_t len, unsigned flags,
				    cowmm_region_t **out);

/**
 * Take over existing memory, for example a heap allocated before the
 * manager was opened.  The memory keeps its content and stays usable
 * throughout.
 * Context: any thread.
 *
 * @param mm     a manager
 * @param addr   start, page aligned
 * @param len    length, a non-zero multiple of the page size
 * @param flags  0 or COWMM_REGION_HUGE_COW
 * @param out    receives the region; untouched on failure
 * @return 0; -EINVAL (unaligned, zero or overflowing range, unknown flag,
 *         memory that is not private anonymous: shared, file-backed,
 *         hugetlbfs or PROT_NONE), -ENOMEM (part of the range is not
 *         mapped), -EEXIST (overlaps a region of this manager),
 *         -EBUSY (registered with another userfaultfd), -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_region_adopt(cowmm_t *mm, void *addr, size_t len,
				    unsigned flags, cowmm_region_t **out);

/**
 * Start address of a region: where its first page is now.  A region
 * follows its pages when the application moves them with mremap(), whole
 * or in part; after a move of part of it, its pages are no longer all in
 * one range, and each keeps its offset in the region, its snapshots and
 * its clones.  A move leaves the old range free, and the library (or
 * anything else) may map memory there at once: moving pages back into it
 * with MREMAP_FIXED replaces that memory, as any MAP_FIXED does, unless
 * the application held the range (mapped something there) meanwhile.
 * Moving pages of a region into a range that other pages of it are
 * leaving, before the mremap() that moves them returned (two threads
 * moving at once), is not followed: the kernel may report the two moves
 * in the other order, and the region then loses track of those pages
 * (its snapshots read -EIO, and a release leaves them mapped).
 * An mremap() or munmap() of a manager's memory returns once a worker has
 * read its event; with a thousand of them read and not yet followed, the
 * next one waits until the workers catch up.
 * Context: any thread.
 *
 * @param r  a region
 * @return the address, or NULL for NULL or a released region
 * @since 0.1
 */
COWMM_EXPORT void *cowmm_region_base(const cowmm_region_t *r);

/**
 * Length of a region in bytes.
 * Context: any thread.
 *
 * @param r  a region
 * @return the length, or 0 for NULL or a released region
 * @since 0.1
 */
COWMM_EXPORT size_t cowmm_region_size(const cowmm_region_t *r);

/**
 * Give a region back.  A region with pins is refused and left unchanged.
 * Snapshots of it stay valid: the pages they still
 * share with the region are preserved first (counted as detach_copies;
 * pages never populated cost nothing).  Adopted memory stays mapped,
 * writable and unprotected; memory from cowmm_region_alloc() is unmapped.
 * An adopted region still loading lazily (cowmm_region_load()) loads the
 * rest first, pages moved meanwhile where they went.
 * Context: any thread; not concurrently with other calls on @p r.
 *
 * @param r  a region
 * @return 0; -EINVAL (NULL), -EBADF (already released), -ECHILD,
 *         -EBUSY (pages of the region are pinned: cowmm_unpin() first),
 *         -EAGAIN (an adopted region loading lazily whose pages kept
 *         being moved under the call, so that the rest could not be
 *         loaded: nothing released; call again),
 *         -ENOMEM (a snapshot could not be preserved: the region is
 *         released and that snapshot is marked broken)
 * @since 0.1
 */
COWMM_EXPORT int cowmm_region_release(cowmm_region_t *r);

/**
 * Clone a region: a new region, at another address, that reads as a copy of
 * @p src at the instant of the call and is writable.  Both sides diverge by
 * copy-on-write, and nothing is copied up front: a page materialises in the
 * clone on its first touch (a missing fault), from the source's page or from
 * the copy the source's first write after the clone preserved (handed over
 * with UFFDIO_MOVE when nothing else holds it; counted as moves).  Pages the
 * source never populated read as zero and cost nothing until touched.
 *
 * The clone is a region like any other: it can be snapshotted, pinned,
 * cloned again and released, before or after its source (released first,
 * the source preserves what the clone has not yet read, as for a snapshot).
 * Write-pinned pages of the source are copied at once (pin_copies).
 * A page of the clone discarded (MADV_DONTNEED) reads zero afterwards, as
 * in a fork() child, touched before or not.  Where the clone's content is
 * lost before its first touch (the source discarded, unmapped or mapped
 * over the page, mremap() with MREMAP_FIXED included, before it was copied
 * for the clone, or no memory was left for that copy), the page is
 * poisoned: touching it raises SIGBUS, never gives other bytes.
 * Context: any thread.
 *
 * @param src    a region
 * @param flags  COWMM_REGION_THP or COWMM_REGION_NOTHP, for the clone
 * @param out    receives the clone; untouched on failure
 * @return 0; -EINVAL (NULL, bad flags), -EBADF (released region), -ENOMEM,
 *         -EOPNOTSUPP (kernel lacks UFFD_FEATURE_WP_UNPOPULATED, or a
 *         #COWMM_OPEN_IN_THREAD manager), -EOVERFLOW, -ENOENT (as for
 *         cowmm_snapshot(): @p src unmapped, or pages kept being moved
 *         under the call; no clone is made), -EIO (the manager's
 *         userfaultfd was closed behind its back), -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_clone(cowmm_region_t *src, unsigned flags,
			     cowmm_region_t **out);

/* ------------------------------------------------------------------------ */
/* Pins                                                                      */

/** Flags of cowmm_pin(). */
enum {
	/** A device reads the pages: they must never be replaced. */
	COWMM_PIN_READ = 1u << 0,
#define COWMM_PIN_READ COWMM_PIN_READ
	/** A device writes the pages without CPU faults. */
	COWMM_PIN_WRITE = 1u << 1,
#define COWMM_PIN_WRITE COWMM_PIN_WRITE
};

/**
 * Register a DMA pin: the pages of [@p addr, @p addr + @p len) are held by
 * a device or a kernel subsystem (O_DIRECT, io_uring fixed buffers, RDMA,
 * vmsplice).  Register before the device takes the pages.
 *
 * A pinned page is never replaced, moved or discarded by the library.  A
 * write-pinned page changes without faults, so it is copied eagerly
 * (counted as pin_copies): now, into every live snapshot that still shares
 * it, and into every new snapshot when it is taken.  Pins are counted per
 * 4 KiB page, inside huge pages too; each call is one pin, dropped by one
 * cowmm_unpin() of exactly the same range, and pins may overlap.
 * Context: any thread.
 *
 * @param r      a region
 * @param addr   start, page aligned, inside @p r
 * @param len    length, a non-zero multiple of the page size, inside @p r
 * @param flags  COWMM_PIN_READ and/or COWMM_PIN_WRITE
 * @return 0; -EINVAL (NULL, range not page aligned or not inside @p r,
 *         no or unknown flags), -EBADF (released region), -ENOMEM,
 *         -EOVERFLOW (65535 pins of one kind on a page), -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_pin(cowmm_region_t *r, void *addr, size_t len,
			   unsigned flags);

/**
 * Drop the newest pin registered with exactly this range.
 * Context: any thread.
 *
 * @param r     a region
 * @param addr  start, as given to cowmm_pin()
 * @param len   length, as given to cowmm_pin()
 * @return 0; -EINVAL (NULL, bad range), -ENOENT (no pin with this range),
 *         -EBADF (released region), -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_unpin(cowmm_region_t *r, void *addr, size_t len);

/* ------------------------------------------------------------------------ */
/* Snapshots                                                                 */

/**
 * Take a point-in-time snapshot of @p r.
 *
 * Write-protects the region, unpopulated pages included; a page is copied
 * only when written while some snapshot still needs its old bytes, and the
 * copy goes to the snapshot, never to the writer.  Write-pinned pages are
 * copied now (see cowmm_pin()).  Any number of snapshots
 * of one region may be alive, and released in any order.
 * A snapshot is broken when the application discards (MADV_DONTNEED,
 * MADV_FREE, MADV_REMOVE) or unmaps a page it still shares, and when the
 * kernel drops a page left by MADV_FREE: the kernel takes the bytes
 * before the library can copy them, so every read of that snapshot fails
 * with -EIO from then on, rather than return other bytes.
 * Context: any thread.
 *
 * @param r    a region from cowmm_region_alloc() or cowmm_region_adopt()
 * @param out  receives the snapshot; untouched on failure
 * @return 0; -EINVAL (NULL), -EBADF (released region), -ENOMEM (also when
 *         a write-pinned page could not be copied: no snapshot is made),
 *         -EOVERFLOW (2^32 - 1 snapshots of this region taken),
 *         -EOPNOTSUPP (kernel lacks UFFD_FEATURE_WP_UNPOPULATED),
 *         -ENOENT (the region's memory was unmapped behind the library's
 *         back, or pages of the manager kept being moved or unmapped
 *         under the call, 100 rounds: no snapshot is made; call again),
 *         -EIO (the manager's userfaultfd was closed behind its back: its
 *         snapshots are broken, none can be taken), -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_snapshot(cowmm_region_t *r, cowmm_snap_t **out);

/**
 * Read bytes of a snapshot.  Byte granular: a read that runs past the end
 * is short, and a read at or past the end returns 0.  Takes no lock: any
 * number of threads may read while the application writes.
 * Context: any thread.
 *
 * @param s    a snapshot
 * @param off  offset from the start of the region
 * @param buf  receives the bytes
 * @param len  bytes wanted
 * @return bytes read; -EINVAL (NULL), -EBADF (released snapshot),
 *         -EIO (the snapshot is broken), -ECHILD
 * @since 0.1
 */
COWMM_EXPORT ssize_t cowmm_snap_read(cowmm_snap_t *s, size_t off, void *buf,
				     size_t len);

/**
 * Size of a snapshot in bytes (the size of its region when it was taken).
 * Context: any thread.
 *
 * @param s  a snapshot
 * @return the size, or 0 for NULL or a released snapshot
 * @since 0.1
 */
COWMM_EXPORT size_t cowmm_snap_size(const cowmm_snap_t *s);

/**
 * Map a snapshot read-only at another address.  Pages are filled on first
 * touch; once filled, a page keeps its physical frame until the snapshot is
 * released, so devices may read it.  Pointers inside the snapshot are
 * followed by offset: @c view + (p - cowmm_region_base(r)).  A write to the
 * view is a SIGSEGV, as for any read-only memory.  Mapping twice returns
 * the same view; it is unmapped with the snapshot.
 * Context: any thread.
 *
 * @param s     a snapshot
 * @param view  receives the address of the view
 * @return 0; -EINVAL (NULL), -EBADF (released snapshot), -EIO (broken),
 *         -EOPNOTSUPP (a #COWMM_OPEN_IN_THREAD manager), -ENOMEM, -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_snap_map(cowmm_snap_t *s, const void **view);

/**
 * Roll the region back to @p s: its content becomes the snapshot's again,
 * and @p s stays valid.  Only the pages written since @p s are touched, and
 * each is copied into in place, so its physical page (pinned or not) stays
 * the same; newer snapshots that still shared a page get their copy first.
 * Writers of the region wait while it runs.  Pages another thread moves
 * (mremap) or unmaps while it runs are followed: it rolls them back where
 * they are when it returns, or returns -ENOENT; memory mapped where they
 * were once that mremap or munmap has returned is never written.  Memory
 * another thread maps there before it returned (the pages are gone from
 * the range before the call returns) may receive the snapshot's bytes of
 * the page that was there: until the kernel reports the move, nothing
 * tells that memory from the region's page.  Mapping or moving other
 * memory over a page of the region while it runs (MAP_FIXED,
 * MREMAP_FIXED) is a race in the application, as with any store into that
 * page: the memory put there may receive the snapshot's bytes of the page
 * it replaced.
 * Context: any thread; not concurrently with cowmm_snap_release() of @p s.
 *
 * @param s  a snapshot
 * @return 0; -EINVAL (NULL), -EBADF (released snapshot), -ENOENT (its
 *         region was released, or pages of the manager kept being moved
 *         or unmapped under the call: the region may be partly restored;
 *         call again), -EIO (broken snapshot; broken while the call ran,
 *         the region may be partly restored), -ENOMEM, -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_snap_restore(cowmm_snap_t *s);

/** cowmm_region_load(): bring pages in from the file on first touch. */
#define COWMM_LOAD_LAZY (1u << 0)

/** Progress of a long operation: @p done of @p total bytes. */
typedef void (*cowmm_progress_fn)(uint64_t done, uint64_t total, void *data);

/**
 * Stream a snapshot to @p fd in the snapshot file format (docs/format.md,
 * cowmm-snapshot(5)): versioned, CRC32C-checksummed per chunk of 512
 * pages, sparse (pages that read as zero are not stored), written in large
 * sequential writev() calls.  The application may keep writing the region
 * meanwhile.  On failure the file holds a prefix without a valid trailer,
 * which cowmm_region_load() refuses.
 * Context: any thread.
 *
 * @param s   a snapshot
 * @param fd  a file descriptor open for writing, at the position to write
 * @return 0; -EINVAL (NULL), -EBADF (bad @p fd or released snapshot),
 *         -EIO (broken snapshot), -ENOMEM, -ENOSPC and other write(2)
 *         errors, -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_snap_write(cowmm_snap_t *s, int fd);

/**
 * cowmm_snap_write() with a progress callback, called after each 2 MiB of
 * the region with the bytes done so far.
 * Context: any thread; @p progress runs on the calling thread.
 *
 * @param s         a snapshot
 * @param fd        a file descriptor open for writing
 * @param progress  called after each 2 MiB, or NULL
 * @param data      passed to @p progress
 * @return as cowmm_snap_write()
 * @since 0.1
 */
COWMM_EXPORT int cowmm_snap_write_progress(cowmm_snap_t *s, int fd,
					   cowmm_progress_fn progress,
					   void *data);

/** cowmm_snap_stream(): the snapshot lets go of what is written. */
#define COWMM_STREAM_RELEASE (1u << 0)

/**
 * cowmm_snap_write_progress() with flags.
 *
 * With #COWMM_STREAM_RELEASE the stream consumes the snapshot, as a
 * database's background save does: each 2 MiB, once read for the file, is
 * let go.  The frames the snapshot held for it are freed, and the pages no
 * other snapshot shares are unprotected (one ioctl per run), so the
 * application's writes behind the stream stop faulting at all and memory
 * shrinks as the stream advances.  The snapshot is released when the call
 * returns, whatever it returns, except on -EINVAL, -EBADF and -EBUSY,
 * which leave it as it was; after any other error the file is incomplete
 * and a new snapshot is needed to try again.  No other thread may use the
 * snapshot meanwhile.  The next snapshot of the region has every page to
 * protect again, where one released unread would have left the pages not
 * written since still protected.
 * Context: any thread.
 *
 * @param s         a snapshot
 * @param fd        a file descriptor open for writing
 * @param flags     0 or #COWMM_STREAM_RELEASE
 * @param progress  called after each 2 MiB, or NULL
 * @param data      passed to @p progress
 * @return as cowmm_snap_write(); -EINVAL also for unknown @p flags;
 *         -EBUSY (#COWMM_STREAM_RELEASE on a mapped snapshot)
 * @since 0.1
 */
COWMM_EXPORT int cowmm_snap_stream(cowmm_snap_t *s, int fd, unsigned flags,
				   cowmm_progress_fn progress, void *data);

/**
 * Source of the bytes cowmm_format_write() stores: fill @p buf with the
 * @p len bytes at offset @p off (both page-aligned; at most 2 MiB per call,
 * in increasing order of @p off).
 * @return 0, or a negative errno that stops the write and is returned
 */
typedef int (*cowmm_read_fn)(void *data, size_t off, void *buf, size_t len);

/**
 * Write @p len bytes obtained from @p read to @p fd in the snapshot file
 * format, exactly as cowmm_snap_write() does for a snapshot.  For memory
 * that is not a cowmm snapshot: another process's (cowmmd uses it with
 * process_vm_readv()), a checkpoint tool's own buffers.  The file can be
 * loaded with cowmm_region_load().
 * Context: any thread.
 *
 * @param fd        a file descriptor open for writing
 * @param len       bytes to store; a non-zero multiple of 4096
 * @param read      where the bytes come from
 * @param rdata     passed to @p read
 * @param progress  called after each 2 MiB, or NULL
 * @param pdata     passed to @p progress
 * @return 0; -EINVAL (NULL @p read, @p len zero or unaligned), -EBADF,
 *         -ENOMEM, write(2) errors, or what @p read returned
 * @since 0.1
 */
COWMM_EXPORT int cowmm_format_write(int fd, size_t len, cowmm_read_fn read,
				    void *rdata, cowmm_progress_fn progress,
				    void *pdata);

/**
 * Load a snapshot file into a region of the same size.  The whole file is
 * checked first (header, every chunk's checksum and counts, the trailer);
 * a file that fails any check leaves the region untouched.
 *
 * Eagerly (@p flags 0): pages are written through the normal write path,
 * so live snapshots of @p r keep their bytes; pages the file does not store
 * become zero.
 *
 * Lazily (#COWMM_LOAD_LAZY): the region's old content is dropped and it is
 * usable as soon as this returns; each page comes in from the file on its
 * first touch (a missing fault, about one pread() and one UFFDIO_COPY).
 * The library keeps a duplicate of @p fd until every page is in; the file
 * must not change meanwhile (a page that can no longer be read raises
 * SIGBUS where it is touched, never wrong bytes).  Nothing may share the
 * region's pages (no snapshot, clone or pin: -EBUSY), and it must not be a
 * clone or a view (-EINVAL).  cowmm_snapshot(), cowmm_clone() and the
 * release of an adopted region load the rest first.  Needs
 * UFFD_FEATURE_POISON (Linux 6.6).  Either way, do not touch the region
 * while this call runs, nor move or unmap its pages (the application's
 * race): an eager load writes each page where it finds it, so a page
 * moved meanwhile may keep its old bytes, another page moved to where it
 * was may get its bytes, and a write where nothing writable is mapped any
 * more raises SIGSEGV in the calling thread; a lazy load takes the range
 * off the library's userfaultfd for a moment, and pages moved then leave
 * the region unmanaged.  Once every page is in,
 * the region stays registered for missing faults and is handled as a
 * clone whose pages are all filled: moves are followed as anywhere.
 * Context: any thread.
 *
 * @param r      a region of exactly the file's region size
 * @param fd     a regular file open for reading (read with pread())
 * @param flags  0 or #COWMM_LOAD_LAZY
 * @return 0; -EINVAL (NULL, flags, file for a smaller region; lazily: a
 *         clone or view, or a region part of which was unmapped or moved
 *         away by mremap), -EFBIG (file for a larger region),
 *         -EBADMSG (not a snapshot file, corrupted or truncated),
 *         -EPROTONOSUPPORT (another format version), -ESPIPE (not a
 *         regular file), -EBADF (bad @p fd or released region), -EBUSY
 *         (lazily, with snapshots, clones or pins of @p r, or a lazy load
 *         under way), -EOPNOTSUPP (lazily: kernel older than 6.6, or a
 *         #COWMM_OPEN_IN_THREAD manager), -ENOENT (eagerly over a
 *         lazy load under way, while its pages kept being moved under
 *         the call: nothing written; call again),
 *         -ENOMEM, read(2) errors, -ECHILD
 * @since 0.1
 */
COWMM_EXPORT int cowmm_region_load(cowmm_region_t *r, int fd, unsigned flags);

/**
 * Release a snapshot and the frames only it held.
 * Context: any thread; not concurrently with other calls on @p s.
 * A second release of the same snapshot is ignored (and logged).
 *
 * @param s  a snapshot, or NULL (nothing happens)
 * @since 0.1
 */
COWMM_EXPORT void cowmm_snap_release(cowmm_snap_t *s);

/* ------------------------------------------------------------------------ */
/* cowmmd: snapshots of this process taken by the daemon                     */

/**
 * Hand memory of this process over to cowmmd, which then takes snapshots of
 * it to files (on cowmmctl's command or on a schedule) while the process
 * keeps running.  The ranges are registered with a new userfaultfd in
 * write-protect mode, which goes to the daemon with a pidfd (SCM_RIGHTS);
 * the daemon handles this process's write faults during a snapshot and
 * reads memory with process_vm_readv().  For the instant a snapshot is
 * armed the daemon stops this process's threads with ptrace (this call
 * allows it under Yama with PR_SET_PTRACER; a debugger attached to the
 * process prevents snapshots).
 *
 * The ranges must be private anonymous memory and must not belong to a
 * cowmm manager's region (the kernel allows one userfaultfd per range).
 * If the daemon dies, the kernel unregisters the ranges and the process
 * runs on unaffected; while the daemon is stopped, a write to a range
 * during a snapshot waits.
 * Context: any thread.
 *
 * @param path     the daemon's socket, or NULL for the default
 *                 ($COWMMD_SOCKET, /run/cowmmd.sock for root, else
 *                 $XDG_RUNTIME_DIR/cowmmd.sock, else $HOME/.cowmmd.sock)
 * @param name     a name for cowmmctl and snapshot files, or NULL
 * @param ranges   page-aligned, non-overlapping ranges
 * @param nranges  1 to 16
 * @param out      receives the connection
 * @return 0; -EINVAL (NULL, unaligned, empty or too many ranges, memory
 *         that is not private anonymous), -ENOMEM (a range not mapped, or
 *         out of memory), -EEXIST (overlapping ranges), -EBUSY (a range
 *         already registered with a userfaultfd), -ENOENT or -ECONNREFUSED
 *         (no daemon at @p path), -EOPNOTSUPP (kernel older than 6.4),
 *         -EPERM (no userfaultfd permission, or refused by the daemon:
 *         another user), -EACCES (the socket's listener is neither root
 *         nor this user: not a daemon to trust), -ETIMEDOUT, -EPROTO, or
 *         the daemon's error
 * @since 0.1
 */
COWMM_EXPORT int cowmm_attach_daemon(const char *path, const char *name,
				     const struct iovec *ranges,
				     unsigned nranges, cowmm_client_t **out);

/**
 * The id cowmmd gave this client (cowmmctl names clients by it).
 * @return the id, or 0 for NULL
 * @since 0.1
 */
COWMM_EXPORT unsigned cowmm_client_id(const cowmm_client_t *c);

/**
 * Take the memory back from cowmmd and free @p c.  A snapshot of this
 * client still being written is abandoned and its files removed.  When
 * this returns, the daemon has closed the userfaultfd: the ranges are
 * unregistered and no longer write-protected.
 * Context: any thread; not concurrently with other calls on @p c.
 *
 * @return 0 (also when the daemon is already gone); -EINVAL (NULL),
 *         -ETIMEDOUT (no answer in 10 s; @p c is freed all the same)
 * @since 0.1
 */
COWMM_EXPORT int cowmm_detach_daemon(cowmm_client_t *c);

/* ------------------------------------------------------------------------ */
/* Errors, logging, version                                                  */

/**
 * Describe a return value of this library.  A value that several calls
 * return for different reasons, or that comes from a system call the
 * library made (open(2), write(2), connect(2): -ENOENT, -EBADF, -EIO,
 * -EFBIG, ...), is described by its general meaning followed by the
 * library's cases, never by one call's case: the caller knows which call
 * failed and on what (a path, a descriptor, a size) and should say so
 * beside this text.  Values the library does not name here get strerror()'s
 * text.
 * Context: any thread.
 *
 * @param err  a negative errno value returned by a cowmm function
 * @return a static string; never NULL
 * @since 0.1
 */
COWMM_EXPORT const char *cowmm_strerror(int err);

/** Levels of cowmm_log_fn, as syslog's. */
enum cowmm_log_level {
	COWMM_LOG_ERR = 3,
	COWMM_LOG_WARNING = 4,
	COWMM_LOG_INFO = 6,
	COWMM_LOG_DEBUG = 7,
};

/** A log callback: @p msg has no trailing newline. */
typedef void (*cowmm_log_fn)(enum cowmm_log_level level, const char *msg,
			     void *data);

/**
 * Send the library's messages (for example how to grant userfaultfd
 * permission) to @p fn.  The library prints nothing by itself: without a
 * callback, messages are dropped.
 * Context: any thread; the callback may run on any thread, worker threads
 * included, and must not call back into libcowmm.
 *
 * @param fn    the callback, or NULL to drop messages
 * @param data  passed to @p fn
 * @since 0.1
 */
COWMM_EXPORT void cowmm_set_log(cowmm_log_fn fn, void *data);

/**
 * The run-time version of the library, as
 * COWMM_VERSION_MAJOR * 10000 + COWMM_VERSION_MINOR * 100 +
 * COWMM_VERSION_PATCH.
 * Context: any thread.
 *
 * @return the version: 100 for 0.1.0
 * @since 0.1
 */
COWMM_EXPORT int cowmm_version(void);

#ifdef __cplusplus
}
#endif

#endif /* COWMM_H */
