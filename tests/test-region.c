// SPDX-License-Identifier: MIT
/* Regions: alloc, adopt, release, and every bad argument. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "harness.h"
#include "cowmm_i.h"

#define NPAGES 64

START_TEST(test_alloc_release)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r = NULL, *t;
	unsigned char *p;

	ck_assert_int_eq(cowmm_region_alloc(mm, NPAGES * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	ck_assert_ptr_nonnull(p);
	ck_assert_uint_eq(cowmm_region_size(r), NPAGES * T_PAGE);
	ck_assert_int_eq(p[123], 0);
	memset(p, 7, NPAGES * T_PAGE);
	ck_assert_uint_eq(t_stats(mm).regions_live, 1);
	ck_assert_uint_eq(t_stats(mm).wp_faults, 0);

	ck_assert_int_eq(cowmm_region_alloc(mm, 512 * T_PAGE, COWMM_REGION_THP,
					    &t), 0);
	ck_assert_uint_eq((uintptr_t)cowmm_region_base(t) % (2 << 20), 0);
	ck_assert_int_eq(cowmm_region_release(t), 0);

	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_uint_eq(t_stats(mm).regions_live, 0);
	cowmm_close(mm);
}
END_TEST

/*
 * Adopted memory keeps its content, stays usable while managed, and after
 * release is mapped, writable and unprotected: writes cause no fault.
 */
START_TEST(test_adopt_release)
{
	cowmm_t *mm = t_open_fa(0, 1); /* counts page by page */
	size_t len = NPAGES * T_PAGE, i;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	uint64_t faults;

	p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	memset(p, 0x5a, len);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len, 0, &r), 0);
	ck_assert_ptr_eq(cowmm_region_base(r), p);
	ck_assert_int_eq(p[len - 1], 0x5a);

	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	for (i = 0; i < NPAGES; i++)
		p[i * T_PAGE] = 1;
	faults = t_stats(mm).wp_faults;
	ck_assert_uint_eq(faults, NPAGES);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0); /* a second one */
	ck_assert_int_eq(cowmm_region_release(r), 0);

	/* Unprotected: a write costs no fault, and the content is ours. */
	memset(p, 0x66, len);
	ck_assert_uint_eq(t_stats(mm).wp_faults, faults);
	ck_assert_int_eq(p[len / 2], 0x66);
	/* Adopting it again works: it is no longer registered. */
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len, 0, &r), 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
	/* Closing the manager leaves adopted memory alone. */
	memset(p, 0x77, len);
	munmap(p, len);
}
END_TEST

struct bad_case {
	const char *what;
	int ret;
};

/* Every bad argument gives its errno, and changes nothing. */
START_TEST(test_bad_input)
{
	cowmm_t *mm = t_open(0), *mm2 = t_open(0);
	size_t len = NPAGES * T_PAGE;
	cowmm_region_t *r, *keep = (cowmm_region_t *)&len, *out = keep;
	char path[] = "/tmp/cowmm-test-XXXXXX";
	unsigned char *p, *file, *shared, *none;
	int fd;

	p = mmap(NULL, 3 * len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	memset(p, 0x42, 2 * len);
	fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	unlink(path);
	ck_assert_int_eq(ftruncate(fd, len), 0);
	file = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
	shared = mmap(NULL, len, PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	none = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert(file != MAP_FAILED && shared != MAP_FAILED &&
		  none != MAP_FAILED);
	munmap(p + 2 * len, len); /* a hole after two regions' worth */

	/* alloc */
	ck_assert_int_eq(cowmm_region_alloc(NULL, len, 0, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_alloc(mm, 0, 0, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_alloc(mm, len + 1, 0, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_alloc(mm, len, 1u << 20, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_alloc(mm, len,
					    COWMM_REGION_THP |
						    COWMM_REGION_NOTHP,
					    &out),
			 -EINVAL);
	ck_assert_int_eq(cowmm_region_alloc(mm, len, 0, NULL), -EINVAL);
	ck_assert_int_eq(cowmm_region_alloc(mm, SIZE_MAX & ~(T_PAGE - 1), 0,
					    &out),
			 -ENOMEM);

	/* adopt */
	ck_assert_int_eq(cowmm_region_adopt(NULL, p, len, 0, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_adopt(mm, p + 1, len, 0, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len - 1, 0, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, 0, 0, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len, 1, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len, 0, NULL), -EINVAL);
	ck_assert_int_eq(cowmm_region_adopt(mm, (void *)-T_PAGE, 2 * T_PAGE, 0,
					    &out),
			 -EINVAL); /* addr + len overflows */
	ck_assert_int_eq(cowmm_region_adopt(mm, file, len, 0, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_adopt(mm, shared, len, 0, &out),
			 -EINVAL);
	ck_assert_int_eq(cowmm_region_adopt(mm, none, len, 0, &out), -EINVAL);
	ck_assert_int_eq(cowmm_region_adopt(mm, p + len, 2 * len, 0, &out),
			 -ENOMEM); /* runs into the hole */
	ck_assert_int_eq(cowmm_region_adopt(mm, (void *)((uintptr_t)&len | 1),
					    T_PAGE, 0, &out),
			 -EINVAL); /* unaligned stack address */
	ck_assert_ptr_eq(out, keep);

	/* overlap, and a range another userfaultfd holds */
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len, 0, &r), 0);
	ck_assert_int_eq(cowmm_region_adopt(mm, p + T_PAGE, T_PAGE, 0, &out),
			 -EEXIST);
	ck_assert_int_eq(cowmm_region_adopt(mm, p + len - T_PAGE, 2 * T_PAGE, 0,
					    &out),
			 -EEXIST);
	ck_assert_int_eq(cowmm_region_adopt(mm2, p, len, 0, &out), -EBUSY);
	ck_assert_ptr_eq(out, keep);
	ck_assert_uint_eq(t_stats(mm).regions_live, 1);
	ck_assert_uint_eq(t_stats(mm2).regions_live, 0);
	ck_assert_int_eq(p[len - 1], 0x42);

	/* released handles */
	ck_assert_int_eq(cowmm_region_release(r), 0);
	ck_assert_int_eq(cowmm_region_release(r), -EBADF);
	ck_assert_ptr_null(cowmm_region_base(r));
	ck_assert_uint_eq(cowmm_region_size(r), 0);
	ck_assert_int_eq(cowmm_region_release(NULL), -EINVAL);
	ck_assert_ptr_null(cowmm_region_base(NULL));
	ck_assert_int_eq(p[0], 0x42);

	cowmm_close(mm2);
	cowmm_close(mm);
	munmap(p, 2 * len);
	munmap(file, len);
	munmap(shared, len);
	munmap(none, len);
	close(fd);
}
END_TEST

/* Adopt a range that spans several VMAs (split by mprotect). */
START_TEST(test_adopt_split_vmas)
{
	cowmm_t *mm = t_open(0);
	size_t len = NPAGES * T_PAGE;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p, buf[T_PAGE];

	p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert_ptr_ne(p, MAP_FAILED);
	memset(p, 1, len);
	ck_assert_int_eq(mprotect(p + 8 * T_PAGE, 8 * T_PAGE, PROT_READ), 0);
	ck_assert_int_eq(cowmm_region_adopt(mm, p, len, 0, &r), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	memset(p + 20 * T_PAGE, 2, T_PAGE);
	ck_assert_int_eq(cowmm_snap_read(s, 20 * T_PAGE, buf, T_PAGE), T_PAGE);
	ck_assert_int_eq(buf[0], 1);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
	munmap(p, len);
}
END_TEST

/*
 * Frames live in 2 MiB chunks, huge-page aligned on recent kernels: with
 * THP "always" a populate in the fault path would take a whole huge page.
 * The chunk is marked MADV_NOHUGEPAGE whatever the system's setting.
 */
START_TEST(test_frame_chunk_no_thp)
{
	struct cowmm_frame_pool pool;
	atomic_uint_fast64_t live = 0;
	struct cowmm_frame *f;

	ck_assert_int_eq(cowmm__frame_pool_init(&pool, &live), 0);
	f = cowmm__frame_alloc(&pool);
	ck_assert_ptr_nonnull(f);
	memset(cowmm__frame_data(f), 7, T_PAGE);
	/* Without THP in the kernel there is nothing to mark. */
	if (access("/sys/kernel/mm/transparent_hugepage", F_OK) == 0)
		ck_assert_msg(t_vma_has_flag(cowmm__frame_data(f), "nh"),
			      "a frame chunk may be backed by huge pages");
	cowmm__frame_free_now(f);
	ck_assert_uint_eq(live, 0);
	cowmm__frame_pool_fini(&pool);
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "alloc-release", test_alloc_release, T_WP },
		{ "adopt-release", test_adopt_release, T_WP_UNPOPULATED },
		{ "bad-input", test_bad_input, T_WP },
		{ "adopt-split-vmas", test_adopt_split_vmas, T_WP_UNPOPULATED },
		{ "frame-chunk-no-thp", test_frame_chunk_no_thp, 0 },
	};

	return t_run("region", cases, ARRAY_SIZE(cases));
}
