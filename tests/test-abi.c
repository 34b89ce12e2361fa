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
	ck_assert_uint_eq(sizeof(struct cowmm_stats), 15 * 8);
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
	/* 0.2: grown at its end; cowmm_stats() copies what the caller has */
	ck_assert_uint_eq(offsetof(struct cowmm_stats, follows), 112);
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
}
END_TEST

/*
 * A value with several meanings says the general one: the caller knows
 * which call failed, the text must not guess.  Each row: the value, words
 * its text must hold, and a text it must not be (what it said before, right
 * for one call and wrong for the others).
 */
START_TEST(test_strerror_general)
{
	static const struct {
		int err;
		const char *must[3];
		const char *not;
	} table[] = {
		/* open(2) of a dump, no daemon at a socket, no such pin,
		 * released region, memory unmapped */
		{ -ENOENT, { "no such file", "socket", "pin" },
		  "memory unmapped behind the library's back" },
		/* a bad fd to cowmm_snap_write(), a released handle */
		{ -EBADF, { "bad file descriptor", "released" },
		  "handle already released" },
		/* write(2) failing, a broken snapshot */
		{ -EIO, { "I/O error", "broken snapshot" },
		  "snapshot is broken: its content could not be kept" },
		/* write(2) past RLIMIT_FSIZE, a file for a larger region */
		{ -EFBIG, { "file too large", "larger region" },
		  "snapshot file for a larger region" },
		/* a region overlapping a region, attach ranges overlapping */
		{ -EEXIST, { "overlapping ranges", "another range" },
		  "range overlaps a region of this manager" },
		/* too many snapshots, too many pins on a page */
		{ -EOVERFLOW, { "snapshots", "pins" },
		  "too many snapshots of one region" },
		/* the kernel, or an in-thread manager */
		{ -EOPNOTSUPP, { "not supported", "kernel", "mode" },
		  "not supported by the running kernel" },
		/* open(2) limits, 16 in-thread managers */
		{ -EMFILE, { "too many open files", "in-thread" }, NULL },
		/* uffd permission, another user's daemon, fs permissions */
		{ -EPERM, { "not permitted", "userfaultfd" },
		  "no permission to use userfaultfd (see the log for how to "
		  "grant it)" },
		/* not a regular file */
		{ -ESPIPE, { "not a regular file" }, NULL },
		{ -ENOSPC, { "No space left on device" }, NULL },
	};
	size_t i, j;

	for (i = 0; i < ARRAY_SIZE(table); i++) {
		const char *s = cowmm_strerror(table[i].err);

		for (j = 0; j < ARRAY_SIZE(table[i].must) && table[i].must[j];
		     j++)
			ck_assert_msg(strstr(s, table[i].must[j]),
				      "cowmm_strerror(-%s) = \"%s\": no \"%s\"",
				      strerrorname_np(-table[i].err), s,
				      table[i].must[j]);
		if (table[i].not)
			ck_assert_msg(strcmp(s, table[i].not) != 0,
				      "cowmm_strerror(-%s) = \"%s\"",
				      strerrorname_np(-table[i].err), s);
	}
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "config-layout", test_config_layout },
		{ "stats-layout", test_stats_layout },
		{ "version", test_version },
		{ "strerror", test_strerror },
		{ "strerror-general", test_strerror_general },
	};

	return t_run("abi", cases, ARRAY_SIZE(cases));
}
