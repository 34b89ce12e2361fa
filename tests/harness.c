// SPDX-License-Identifier: MIT
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "cowmm_i.h"
#include "uffd.h"

static char log_buf[8192];
static size_t log_len;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static void t_log(enum cowmm_log_level level, const char *msg, void *data)
{
	(void)data;
	pthread_mutex_lock(&log_lock);
	log_len += snprintf(log_buf + log_len, sizeof(log_buf) - log_len,
			    "%d: %s\n", level, msg);
	if (log_len >= sizeof(log_buf))
		log_len = sizeof(log_buf) - 1;
	pthread_mutex_unlock(&log_lock);
	if (getenv("COWMM_TEST_VERBOSE"))
		fprintf(stderr, "cowmm[%d]: %s\n", level, msg);
}

const char *t_log_text(void)
{
	return log_buf;
}

bool t_log_has(const char *needle)
{
	bool found;

	pthread_mutex_lock(&log_lock);
	found = strstr(log_buf, needle) != NULL;
	pthread_mutex_unlock(&log_lock);
	return found;
}

void t_log_clear(void)
{
	pthread_mutex_lock(&log_lock);
	log_len = 0;
	log_buf[0] = 0;
	pthread_mutex_unlock(&log_lock);
}

static const char *feature_name(uint64_t bit)
{
	switch (bit) {
	case UFFD_FEATURE_PAGEFAULT_FLAG_WP:
		return "UFFD_FEATURE_PAGEFAULT_FLAG_WP";
	case UFFD_FEATURE_WP_UNPOPULATED:
		return "UFFD_FEATURE_WP_UNPOPULATED";
	case UFFD_FEATURE_WP_ASYNC:
		return "UFFD_FEATURE_WP_ASYNC";
	case UFFD_FEATURE_MOVE:
		return "UFFD_FEATURE_MOVE";
	case UFFD_FEATURE_THREAD_ID:
		return "UFFD_FEATURE_THREAD_ID";
	default:
		return "a userfaultfd feature";
	}
}

int t_run(const char *suite_name, const struct t_case *cases, size_t n)
{
	bool strict = getenv("COWMM_TEST_STRICT") &&
		      !strcmp(getenv("COWMM_TEST_STRICT"), "1");
	const struct t_case **run = calloc(n ? n : 1, sizeof(*run));
	uint64_t features = 0;
	size_t i, nrun = 0, skipped = 0;
	int probe, failed;
	SRunner *sr;
	Suite *s;

	if (!run) {
		printf("FAIL %s: out of memory\n", suite_name);
		return 1;
	}
	/* Decide before building the Suite: nothing to leak on skip. */
	probe = cowmm__uffd_probe(&features);
	for (i = 0; i < n; i++) {
		const struct t_case *c = &cases[i];
		uint64_t missing = c->features & ~features;

		if (probe < 0 && c->features) {
			printf("SKIP %s/%s: userfaultfd unavailable (%s)\n",
			       suite_name, c->name, strerror(-probe));
		} else if (missing) {
			printf("SKIP %s/%s: kernel lacks %s\n", suite_name,
			       c->name, feature_name(missing & -missing));
		} else if ((c->needs & T_NEEDS_ROOT) && geteuid() != 0) {
			printf("SKIP %s/%s: needs root\n", suite_name, c->name);
		} else {
			run[nrun++] = c;
			continue;
		}
		skipped++;
	}
	fflush(stdout);
	if (strict && skipped) {
		printf("FAIL %s: %zu case(s) skipped under COWMM_TEST_STRICT=1\n",
		       suite_name, skipped);
		free(run);
		return 1;
	}
	if (!nrun) {
		free(run);
		return T_EXIT_SKIP;
	}

	cowmm_set_log(t_log, NULL);
	s = suite_create(suite_name);
	for (i = 0; i < nrun; i++) {
		TCase *tc = tcase_create(run[i]->name);

		tcase_add_test(tc, run[i]->fn);
		tcase_set_timeout(tc, run[i]->timeout ? run[i]->timeout : 60);
		suite_add_tcase(s, tc);
	}
	sr = srunner_create(s);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	free(run);
	return failed ? 1 : 0;
}

cowmm_t *t_open_fa(unsigned workers, size_t fault_around)
{
	struct cowmm_config cfg = COWMM_CONFIG_INIT;
	cowmm_t *mm = NULL;
	int ret;

	cfg.workers = workers;
	cfg.fault_around = fault_around;
	ret = cowmm_open(&cfg, &mm);
	ck_assert_msg(ret == 0, "cowmm_open: %s", cowmm_strerror(ret));
	return mm;
}

cowmm_t *t_open(unsigned workers)
{
	return t_open_fa(workers, 0);
}

struct cowmm_stats t_stats(cowmm_t *mm)
{
	struct cowmm_stats st;

	cowmm__quiesce(mm); /* stale duplicate messages settle first */
	ck_assert_int_eq(cowmm_stats(mm, &st, sizeof(st)), 0);
	return st;
}

void t_rcu_barrier(void)
{
	urcu_bp_barrier();
}

uint64_t t_pfn(const void *addr)
{
	uint64_t e = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(cowmm__pagemap_read(fd, (uintptr_t)addr, 1, &e), 0);
	close(fd);
	return (e & PM_PRESENT) ? (e & PM_PFN_MASK) : 0;
}

_Static_assert((int)T_HUGE_NO == (int)COWMM_HUGE_NO &&
		       (int)T_HUGE_PROTECTED == (int)COWMM_HUGE_PROTECTED &&
		       (int)T_HUGE_WRITABLE == (int)COWMM_HUGE_WRITABLE,
	       "t_huge() answers as cowmm__pagemap_huge()");

int t_huge(const void *addr)
{
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC), ret;

	ck_assert_int_ge(fd, 0);
	ret = cowmm__pagemap_huge(fd, (uintptr_t)addr);
	close(fd);
	return ret;
}

long t_rss_kb(void)
{
	FILE *f = fopen("/proc/self/status", "r");
	char line[256];
	long kb = -1;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

uint64_t t_rand(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

uint64_t t_page_sum(const void *page)
{
	const unsigned char *p = page;
	uint64_t h = 0xcbf29ce484222325ULL;
	size_t i;

	for (i = 0; i < T_PAGE; i += 8) {
		uint64_t w;

		memcpy(&w, p + i, 8);
		h = (h ^ w) * 0x100000001b3ULL;
	}
	return h;
}

void t_fill_page(void *page, uint64_t seed)
{
	uint64_t *w = page, x = seed | 1;
	size_t i;

	for (i = 0; i < T_PAGE / 8; i++)
		w[i] = t_rand(&x);
}

unsigned char *t_filled_region(cowmm_t *mm, size_t npages, cowmm_region_t **r)
{
	unsigned char *p;
	size_t pg;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE,
					    COWMM_REGION_NOTHP, r),
			 0);
	p = cowmm_region_base(*r);
	for (pg = 0; pg < npages; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	return p;
}

void t_assert_snap_filled(cowmm_snap_t *s, size_t npages)
{
	unsigned char want[T_PAGE], buf[T_PAGE];
	size_t pg;

	for (pg = 0; pg < npages; pg++) {
		t_fill_page(want, pg + 1);
		ck_assert_int_eq(cowmm_snap_read(s, pg * T_PAGE, buf, T_PAGE),
				 T_PAGE);
		ck_assert_msg(!memcmp(buf, want, T_PAGE),
			      "snapshot page %zu changed", pg);
	}
}

void t_assert_live_filled(const unsigned char *p, size_t first, size_t n,
			  size_t off, unsigned char x)
{
	unsigned char want[T_PAGE];
	size_t pg;

	for (pg = first; pg < first + n; pg++) {
		t_fill_page(want, pg + 1);
		want[off] ^= x;
		ck_assert_msg(!memcmp(p + pg * T_PAGE, want, T_PAGE),
			      "write to page %zu lost", pg);
	}
}

/* Bounded mode: see harness.h. */
struct bwriter {
	unsigned char *p;
	size_t n;
	atomic_size_t done;
};

static void *bwriter_main(void *arg)
{
	struct bwriter *w = arg;
	size_t pg;

	for (pg = 0; pg < w->n; pg++) {
		w->p[pg * T_PAGE + 3] ^= 0x77;
		atomic_store(&w->done, pg + 1);
	}
	return NULL;
}

static struct cowmm_stats stats_now(cowmm_t *mm)
{
	struct cowmm_stats st;

	ck_assert_int_eq(cowmm_stats(mm, &st, sizeof(st)), 0);
	return st;
}

void t_check_bounded(unsigned flags, size_t cap)
{
	struct cowmm_config cfg = COWMM_CONFIG_INIT;
	const size_t npages = 4 * cap;
	struct bwriter w = { .n = 2 * cap };
	struct cowmm_stats st;
	cowmm_region_t *r;
	cowmm_t *mm = NULL;
	cowmm_snap_t *s;
	unsigned char *p;
	pthread_t th;
	int i;

	cfg.flags = flags;
	cfg.max_preserved = cap * T_PAGE;
	ck_assert_int_eq(cowmm_open(&cfg, &mm), 0);
	p = w.p = t_filled_region(mm, npages, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	pthread_create(&th, NULL, bwriter_main, &w);

	/* The writer stops at the cap and stays there. */
	for (i = 0; i < 500; i++) {
		usleep(10000);
		if (atomic_load(&w.done) >= cap && stats_now(mm).throttled)
			break;
	}
	usleep(100000);
	st = stats_now(mm);
	ck_assert_uint_eq(atomic_load(&w.done), cap);
	ck_assert_uint_eq(st.frames_live, cap);
	ck_assert_uint_gt(st.throttled, 0);
	t_assert_snap_filled(s, npages);

	/* Released: the frames go, the writer goes on. */
	cowmm_snap_release(s);
	pthread_join(th, NULL);
	ck_assert_uint_eq(atomic_load(&w.done), 2 * cap);
	t_assert_live_filled(p, 0, 2 * cap, 3, 0x77);
	t_assert_live_filled(p, 2 * cap, npages - 2 * cap, 0, 0);
	t_rcu_barrier();
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}

/*
 * The VmFlags of the mapping that holds @addr in /proc/self/smaps contain
 * @flag.
 */
bool t_vma_has_flag(const void *addr, const char *flag)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	bool inside = false, found = false;

	ck_assert_ptr_nonnull(f);
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;

		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2) {
			inside = (uintptr_t)addr >= lo && (uintptr_t)addr < hi;
			continue;
		}
		if (inside && !strncmp(line, "VmFlags:", 8)) {
			char want[8];

			snprintf(want, sizeof(want), " %s", flag);
			found = strstr(line, want) != NULL;
			break;
		}
	}
	fclose(f);
	return found;
}

void *t_store_loop_main(void *arg)
{
	struct t_store_loop *w = arg;
	long n = 0;

	while (!__atomic_load_n(&w->stop, __ATOMIC_RELAXED))
		*w->at = ++n;
	return NULL;
}
