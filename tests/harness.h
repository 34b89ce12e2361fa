/* SPDX-License-Identifier: MIT */
/*
 * Test harness: feature-gated Check cases (like the kernel's
 * uffd-unit-tests.c) and small helpers, prefixed t_ as in liburing's
 * test/helpers.h.
 */
#ifndef COWMM_TEST_HARNESS_H
#define COWMM_TEST_HARNESS_H

#include <check.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <cowmm.h>

#define T_EXIT_SKIP 77
#define T_PAGE 4096UL
/* What every case that opens a manager needs. */
#define T_WP (1 << 0) /* UFFD_FEATURE_PAGEFAULT_FLAG_WP */
#define T_WP_UNPOPULATED ((1 << 0) | (1 << 13))
#define T_POISON (1 << 14) /* UFFD_FEATURE_POISON, 6.6: lazy loads */

#ifndef ARRAY_SIZE
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#endif

/*
 * Under a sanitizer the allocator keeps freed memory (ASan's quarantine,
 * TSan's own allocator): RSS says nothing there, frames_live still does.
 */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define T_SANITIZED 1
#else
#define T_SANITIZED 0
#endif

enum t_needs {
	T_NEEDS_ROOT = 1u << 0, /* physical frame numbers, setuid */
};

struct t_case {
	const char *name;
	const TTest *fn;      /* from START_TEST(fn) */
	uint64_t features;    /* UFFD_FEATURE_* the case needs; 0: none,
				 not even userfaultfd */
	unsigned needs;       /* T_NEEDS_* */
	int timeout;          /* seconds; 0: 60 */
};

/*
 * Run the cases whose needs are met; print SKIP for the others.  Returns the
 * exit status: 0, 1 on failure, 77 when nothing could run.  With
 * COWMM_TEST_STRICT=1 in the environment a skip is a failure.
 */
int t_run(const char *suite, const struct t_case *cases, size_t n);

cowmm_t *t_open(unsigned workers);
/* With a fault-around window (1: off, for tests that count faults and
 * copies page by page). */
cowmm_t *t_open_fa(unsigned workers, size_t fault_around);
/* A region of @npages small pages, page pg filled with t_fill_page(pg + 1). */
unsigned char *t_filled_region(cowmm_t *mm, size_t npages, cowmm_region_t **r);
/* Every page pg of @s holds t_fill_page(pg + 1). */
void t_assert_snap_filled(cowmm_snap_t *s, size_t npages);
/* Pages @first.. @first + @n - 1 at @p hold t_fill_page(pg + 1), with byte
 * @off xored with @x (the one write a test made to each). */
void t_assert_live_filled(const unsigned char *p, size_t first, size_t n,
			  size_t off, unsigned char x);
/*
 * Bounded mode on a manager opened with @flags and max_preserved = @cap
 * pages: a writer of 2 × @cap pages under a snapshot stops at @cap,
 * nothing slips past, and it finishes once the snapshot is released.
 */
void t_check_bounded(unsigned flags, size_t cap);

/* A thread that stores a count to @at, without pause, until @stop. */
struct t_store_loop {
	volatile long *at;
	bool stop; /* __atomic_store_n() */
};
void *t_store_loop_main(void *arg);
/* Counters once every queued fault message is resolved. */
struct cowmm_stats t_stats(cowmm_t *mm);
void t_rcu_barrier(void);
uint64_t t_pfn(const void *addr);      /* 0 if not present; needs root */
/* The 2 MiB at @addr: one huge page, write-protected or not, or not huge. */
enum { T_HUGE_NO, T_HUGE_PROTECTED, T_HUGE_WRITABLE };
int t_huge(const void *addr);
long t_rss_kb(void);
uint64_t t_rand(uint64_t *state);      /* xorshift64 */
uint64_t t_page_sum(const void *page); /* FNV-1a over one page */
void t_fill_page(void *page, uint64_t seed);

/* Messages logged by the library during the current test. */
const char *t_log_text(void); /* only once the logging threads are done */
bool t_log_has(const char *needle); /* while they may still log */
void t_log_clear(void);

/* The VmFlags of the mapping holding @addr (/proc/self/smaps) have @flag. */
bool t_vma_has_flag(const void *addr, const char *flag);

#endif
