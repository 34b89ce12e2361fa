// SPDX-License-Identifier: MIT
/*
 * The public structs' layout is ABI: pin sizeof and offsetof of every
 * field, as libfuse's test/test_abi.c does.  A change here is a new ABI.
 */
#include <errno.h>
#include <stddef.h>
#include <string.h>

#include "harness.h"

START_TEST(test_config_layout)
{
	struct cowmm_config cfg = COWMM_CONFIG_INIT;

	ck_assert_uint_eq(sizeof(struct cowmm_config), 32);
	ck_assert_uint_eq(offsetof(struct cowmm_config, size), 0);
	ck_assert_uint_eq(offsetof(struct cowmm_config, workers), 8);
	ck_assert_uint_eq(offsetof(struct cowmm_config, flags), 12);
	ck_assert_uint_eq(offsetof(struct cowmm_config, fault_around), 16);
	ck_assert_uint_eq(offsetof(struct cowmm_config, max_preserved), 24);
	ck_assert_uint_eq(cfg.size, sizeof(cfg));
	ck_assert_uint_eq(cfg.workers, 0);
}
END_TEST

START_TEST(test_stats_layout)
{
	ck_assert_uint_eq(sizeof(struct cowmm_stats), 14 * 8);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, wp_faults), 0);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, missing_faults), 8);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, copies), 16);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, reuses), 24);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, moves), 32);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, pin_copies), 40);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, ahead_copies), 48);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, bytes_preserved), 56);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, frames_live), 64);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, snapshots_live), 72);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, regions_live), 80);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, detach_copies), 88);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, broken), 96);
	ck_assert_uint_eq(offsetof(struct cowmm_stats, throttled), 104);
}
END_TEST

START_TEST(test_version)
{
	ck_assert_int_eq(cowmm_version(), COWMM_VERSION_MAJOR * 10000 +
						  COWMM_VERSION_MINOR * 100 +
						  COWMM_VERSION_PATCH);
	ck_assert(COWMM_VERSION_AT_LEAST(0, 1));
	ck_assert(!COWMM_VERSION_AT_LEAST(COWMM_VERSION_MAJOR + 1, 0));
	ck_assert(COWMM_REGION_THP != COWMM_REGION_NOTHP);
}
END_TEST

START_TEST(test_strerror)
{
	static const int codes[] = { 0, -EPERM, -EINVAL, -E2BIG, -EBADF,
				     -ECHILD, -EEXIST, -EBUSY, -ENOMEM, -EIO,
				     -EOPNOTSUPP, -ENOSYS, -EOVERFLOW, -ENOENT,
				     -EAGAIN, 5 };
	size_t i;

	for (i = 0; i < ARRAY_SIZE(codes); i++) {
		const char *s = cowmm_strerror(codes[i]);

		ck_assert_ptr_nonnull(s);
		ck_assert_uint_gt(strlen(s), 0);
	}
	ck_assert_str_eq(cowmm_strerror(-EBADF), "handle already released");
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "config-layout", test_config_layout },
		{ "stats-layout", test_stats_layout },
		{ "version", test_version },
		{ "strerror", test_strerror },
	};

	return t_run("abi", cases, ARRAY_SIZE(cases));
}
