/* SPDX-License-Identifier: MIT */
/*
 * The kernel interface: userfaultfd and pagemap.
 *
 * This is the only file that includes <linux/userfaultfd.h>.  The build
 * machines have Linux 6.1 headers and run a newer kernel, so every constant
 * and struct that arrived later is defined here, with the release that
 * brought it.  A defined macro says nothing about the running kernel: what
 * it supports comes only from the UFFDIO_API reply (cowmm__uffd_probe()).
 */
#ifndef COWMM_UFFD_H
#define COWMM_UFFD_H

#include <stdbool.h>
#include <stddef.h>
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

/* The features a manager asks for when the kernel has them. */
#define COWMM_UFFD_WANTED                                                      \
	(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED |        \
	 UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MOVE |                          \
	 UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP |                \
	 UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_POISON)
/* Without these a manager cannot work at all. */
#define COWMM_UFFD_REQUIRED UFFD_FEATURE_PAGEFAULT_FLAG_WP

int cowmm__uffd_open(bool user_mode_only);
int cowmm__uffd_probe(uint64_t *features);
int cowmm__uffd_api(int fd, uint64_t features, uint64_t *ioctls);
int cowmm__uffd_register(int fd, uintptr_t start, size_t len, uint64_t mode,
			 uint64_t *ioctls);
int cowmm__uffd_unregister(int fd, uintptr_t start, size_t len);
int cowmm__uffd_wp(int fd, uintptr_t start, size_t len, bool protect,
		   bool wake);
int cowmm__uffd_wake(int fd, uintptr_t start, size_t len);
int cowmm__uffd_copy(int fd, uintptr_t dst, const void *src, size_t len,
		     bool wp, bool wake);
int cowmm__uffd_zeropage(int fd, uintptr_t dst, size_t len, bool wake);
int cowmm__uffd_poison(int fd, uintptr_t dst, size_t len, bool wake);
int cowmm__uffd_move(int fd, uintptr_t dst, const void *src, size_t len,
		     bool wake);
int cowmm__pagemap_read(int fd, uintptr_t start, size_t npages, uint64_t *out);
enum { COWMM_HUGE_NO, COWMM_HUGE_PROTECTED, COWMM_HUGE_WRITABLE };
int cowmm__pagemap_huge(int fd, uintptr_t start);

#endif /* COWMM_UFFD_H */
