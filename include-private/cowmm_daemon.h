/* SPDX-License-Identifier: MIT */
/*
 * What cowmmd uses of libcowmm beyond cowmm.h, and nothing more: four
 * userfaultfd ioctl wrappers, applied to a client's userfaultfd, the maps
 * check of a client's ranges, and the flag that bounds the wrappers'
 * retries.  The library declares them here too (cowmm_i.h, uffd.h
 * include this file), so each has one home.
 *
 * The daemon's include path is include/ and include-private/, never
 * libcowmm/: cowmm_i.h does not compile there (daemon/meson.build), and
 * scripts/lint.sh refuses a path that reaches into libcowmm/.
 */
#ifndef COWMM_DAEMON_H
#define COWMM_DAEMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "uffd_abi.h" /* the kernel's constants and structs */

/* uffd.c: each returns 0 or -errno; -EAGAIN only on a worker, below. */
int cowmm__uffd_register(int fd, uintptr_t start, size_t len, uint64_t mode,
			 uint64_t *ioctls);
int cowmm__uffd_wp(int fd, uintptr_t start, size_t len, bool protect,
		   bool wake);
int cowmm__uffd_wake(int fd, uintptr_t start, size_t len);
int cowmm__uffd_zeropage(int fd, uintptr_t dst, size_t len, bool wake);

/* region.c: [start, start + len) is private anonymous memory of @pid
 * (0: this process); -EINVAL, -ENOMEM (a hole) or -errno of the read. */
int cowmm__check_maps(pid_t pid, uintptr_t start, size_t len);

/*
 * Set on a thread that resolves faults (the library's workers; cowmmd's
 * loop and helper threads).  A userfaultfd ioctl the kernel refuses with
 * EAGAIN while an event is pending then comes back as -EAGAIN, after a
 * bounded number of retries, for the caller to read the event first; any
 * other thread retries until it goes through (uffd.c).
 */
extern __thread bool cowmm__in_worker;

#endif /* COWMM_DAEMON_H */
