/* SPDX-License-Identifier: MIT */
/*
 * The kernel's userfaultfd and pagemap ABI: constants and structs.
 *
 * This is the only file that includes <linux/userfaultfd.h>.  The build
 * machines have Linux 6.1 headers and run a newer kernel, so every constant
 * and struct that arrived later is defined here, with the release that
 * brought it.  A defined macro says nothing about the running kernel: what
 * it supports comes only from the UFFDIO_API reply (cowmm__uffd_probe()).
 *
 * The library (uffd.h) and cowmmd (cowmm_daemon.h) both speak it.
 */
#ifndef COWMM_UFFD_ABI_H
#define COWMM_UFFD_ABI_H

#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>

#include "config.h"

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1 /* 5.11 */
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC 0xAA /* 6.1 */
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13) /* 6.4 */
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14) /* 6.6 */
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15) /* 6.7 */
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16) /* 6.8 */
#endif

#if !HAVE_STRUCT_UFFDIO_MOVE /* a struct cannot be #ifndef'd */
struct uffdio_move {
	__u64 dst;
	__u64 src;
	__u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1 << 1)
	__u64 mode;
	__s64 move; /* written by the kernel: bytes moved, or -errno */
};
#define _UFFDIO_MOVE (0x05) /* 6.8 */
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif
_Static_assert(sizeof(struct uffdio_move) == 40, "uffdio_move ABI");

#ifndef UFFDIO_POISON /* 6.6 */
struct uffdio_poison {
	struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
	__u64 mode;
	__s64 updated;
};
#define _UFFDIO_POISON (0x08)
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

#if !HAVE_STRUCT_PM_SCAN_ARG /* 6.7 */
struct page_region {
	__u64 start;
	__u64 end;
	__u64 categories;
};
struct pm_scan_arg {
	__u64 size;
	__u64 flags;
	__u64 start;
	__u64 end;
	__u64 walk_end;
	__u64 vec;
	__u64 vec_len;
	__u64 max_pages;
	__u64 category_inverted;
	__u64 category_mask;
	__u64 category_anyof_mask;
	__u64 return_mask;
};
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif
_Static_assert(sizeof(struct pm_scan_arg) == 96, "pm_scan_arg ABI");
_Static_assert(sizeof(struct page_region) == 24, "page_region ABI");

/* /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst) */
#define PM_PFN_MASK ((UINT64_C(1) << 55) - 1)
#define PM_UFFD_WP (UINT64_C(1) << 57)
#define PM_SWAP (UINT64_C(1) << 62)
#define PM_PRESENT (UINT64_C(1) << 63)

#endif /* COWMM_UFFD_ABI_H */
