/* SPDX-License-Identifier: MIT */
/*
 * The kernel interface: each userfaultfd ioctl wrapped once, feature
 * probing, pagemap reads.  The constants and structs are uffd_abi.h's,
 * the only file that includes <linux/userfaultfd.h>; the four wrappers
 * cowmmd calls too are declared in cowmm_daemon.h.
 */
#ifndef COWMM_UFFD_H
#define COWMM_UFFD_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cowmm_daemon.h" /* cowmm__uffd_register, _wp, _wake, _zeropage */
#include "uffd_abi.h"

/* The features a manager asks for when the kernel has them. */
#define COWMM_UFFD_WANTED                                                      \
	(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED |        \
	 UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MOVE |                          \
	 UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP |                \
	 UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_POISON)
/* Without these a manager cannot work at all. */
#define COWMM_UFFD_REQUIRED UFFD_FEATURE_PAGEFAULT_FLAG_WP

/*
 * Set by a thread around an ioctl it makes while holding read_lock (the
 * lock workers read events under): the ioctl is tried once and returns
 * -EAGAIN while an event is not read, where it would wait for a worker
 * to read it, which cannot while the lock is held.
 */
extern __thread bool cowmm__uffd_once;

/*
 * Set by an application thread that holds a region's lock, in a call that
 * can let go and try again (cowmm__uffd_patience()): an ioctl refused for
 * an event not read returns -EAGAIN once this CLOCK_MONOTONIC time is past
 * while *cowmm__uffd_held says moves or unmaps are read and not followed.
 * Those wait for the lock held here, and past 1,024 of them the workers
 * read no more (manager.c, may_read()): the event may never be read before
 * the lock is let go.  With none, the event is about to be read and the
 * ioctl waits as long as it takes: a thread that discards without pause
 * leaves few moments with none unread, at times none for 300 ms, and a
 * restore that let go after 5 ms each time returned -ENOENT with no page
 * moved (exact/restore-discard-storm).  0: wait as long as it takes.
 */
extern __thread uint64_t cowmm__uffd_deadline;
extern __thread const atomic_bool *cowmm__uffd_held;
#define COWMM_UFFD_PATIENCE_NS (5 * 1000 * 1000ull)

/* From now, with *@held a manager's maps_behind; NULL: off. */
static inline void cowmm__uffd_patience(const atomic_bool *held)
{
	cowmm__uffd_held = held;
	cowmm__uffd_deadline =
		held ? cowmm__now_ns() + COWMM_UFFD_PATIENCE_NS : 0;
}

/* Give up on an ioctl refused again (cowmm__uffd_deadline)? */
static inline bool cowmm__uffd_impatient(void)
{
	return cowmm__uffd_deadline && atomic_load(cowmm__uffd_held) &&
	       cowmm__now_ns() > cowmm__uffd_deadline;
}

bool cowmm__uffd_again(int fd, unsigned *tries, bool bounded);
int cowmm__uffd_open(bool user_mode_only);
int cowmm__uffd_probe(uint64_t *features);
int cowmm__uffd_api(int fd, uint64_t features, uint64_t *ioctls);
int cowmm__uffd_unregister(int fd, uintptr_t start, size_t len);
int cowmm__uffd_range_probe(int fd, uintptr_t start, size_t len);
int cowmm__uffd_copy(int fd, uintptr_t dst, const void *src, size_t len,
		     bool wp, bool wake);
int cowmm__uffd_poison(int fd, uintptr_t dst, size_t len, bool wake);
int cowmm__uffd_move(int fd, uintptr_t dst, const void *src, size_t len,
		     bool wake);
int cowmm__pagemap_read(int fd, uintptr_t start, size_t npages, uint64_t *out);
enum { COWMM_HUGE_NO, COWMM_HUGE_PROTECTED, COWMM_HUGE_WRITABLE };
int cowmm__pagemap_huge(int fd, uintptr_t start);

#endif /* COWMM_UFFD_H */
