// SPDX-License-Identifier: MIT
/*
 * The snapshot file format: a round trip while writers run, sparseness,
 * and every kind of bad file refused with the target region untouched.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"

static int tmpfile_fd(void)
{
	char path[] = "cowmm-format-XXXXXX";
	int fd = mkstemp(path);

	ck_assert_int_ge(fd, 0);
	unlink(path);
	return fd;
}

static off_t fsize(int fd)
{
	struct stat st;

	ck_assert_int_eq(fstat(fd, &st), 0);
	return st.st_size;
}

struct writer {
	unsigned char *mem;
	size_t npages;
	pthread_rwlock_t pause;
	atomic_bool stop;
};

static void *writer_main(void *arg)
{
	struct writer *w = arg;
	uint64_t x = 3;

	while (!atomic_load(&w->stop)) {
		pthread_rwlock_rdlock(&w->pause);
		for (int i = 0; i < 16; i++) {
			uint64_t v = t_rand(&x);

			__atomic_store_n((uint64_t *)(w->mem +
						      (v % w->npages) * T_PAGE) +
						 (v >> 50) % (T_PAGE / 8),
					 v, __ATOMIC_RELAXED);
		}
		pthread_rwlock_unlock(&w->pause);
	}
	return NULL;
}

static uint64_t progress_calls, progress_last;

static void on_progress(uint64_t done, uint64_t total, void *data)
{
	(void)data;
	ck_assert_uint_le(done, total);
	ck_assert_uint_ge(done, progress_last);
	progress_last = done;
	progress_calls++;
}

START_TEST(test_round_trip)
{
	const size_t npages = 8192; /* 32 MiB */
	cowmm_t *mm = t_open(0);
	struct writer w = { .npages = npages };
	cowmm_region_t *r, *dst;
	uint64_t *sums = calloc(npages, sizeof(*sums));
	unsigned char *q;
	cowmm_snap_t *s;
	pthread_t th[2];
	size_t pg;
	int fd = tmpfile_fd(), i;

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE, 0, &r), 0);
	w.mem = cowmm_region_base(r);
	for (pg = 0; pg < npages; pg += 3)
		t_fill_page(w.mem + pg * T_PAGE, pg);
	pthread_rwlock_init(&w.pause, NULL);
	atomic_init(&w.stop, false);
	for (i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, writer_main, &w);
	usleep(10000);
	pthread_rwlock_wrlock(&w.pause);
	for (pg = 0; pg < npages; pg++)
		sums[pg] = t_page_sum(w.mem + pg * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	pthread_rwlock_unlock(&w.pause);

	ck_assert_int_eq(cowmm_snap_write_progress(s, fd, on_progress, NULL),
			 0);
	ck_assert_uint_eq(progress_last, npages * T_PAGE);
	ck_assert_uint_eq(progress_calls, npages / 512);
	atomic_store(&w.stop, true);
	for (i = 0; i < 2; i++)
		pthread_join(th[i], NULL);

	ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE, 0, &dst), 0);
	q = cowmm_region_base(dst);
	memset(q, 0x5a, npages * T_PAGE); /* load must overwrite all of it */
	ck_assert_int_eq(cowmm_region_load(dst, fd, 0), 0);
	for (pg = 0; pg < npages; pg++)
		ck_assert_msg(t_page_sum(q + pg * T_PAGE) == sums[pg],
			      "page %zu differs from the instant", pg);
	cowmm_snap_release(s);
	free(sums);
	close(fd);
	cowmm_close(mm);
}
END_TEST

/* Pages that read as zero are not stored. */
START_TEST(test_sparse)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r, *dst;
	cowmm_snap_t *s;
	unsigned char *p;
	int fd = tmpfile_fd();

	ck_assert_int_eq(cowmm_region_alloc(mm, 1UL << 30, 0, &r), 0);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	ck_assert_int_eq(fsize(fd), 64 + 32);
	cowmm_snap_release(s);

	p = cowmm_region_base(r);
	p[(1UL << 29) + 5] = 7;
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(ftruncate(fd, 0), 0);
	ck_assert_int_eq(lseek(fd, 0, SEEK_SET), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	ck_assert_int_eq(fsize(fd), 64 + 88 + 4096 + 32);

	ck_assert_int_eq(cowmm_region_alloc(mm, 1UL << 30, 0, &dst), 0);
	ck_assert_int_eq(cowmm_region_load(dst, fd, 0), 0);
	p = cowmm_region_base(dst);
	ck_assert_int_eq(p[(1UL << 29) + 5], 7);
	ck_assert_int_eq(p[(1UL << 29) + 6], 0);
	cowmm_snap_release(s);
	close(fd);
	cowmm_close(mm);
}
END_TEST

/* ------------------------------------------------------------------------ */
/* Bad files */

#define SMALL 2048 /* pages: 4 chunks */

struct bad_env {
	cowmm_t *mm;
	cowmm_region_t *dst;
	unsigned char *file;
	size_t len;
	uint64_t before;
};

static uint64_t region_sum(cowmm_region_t *r)
{
	const unsigned char *p = cowmm_region_base(r);
	uint64_t h = 0;
	size_t pg;

	for (pg = 0; pg < cowmm_region_size(r) / T_PAGE; pg++)
		h = h * 31 + t_page_sum(p + pg * T_PAGE);
	return h;
}

static void bad_setup(struct bad_env *e)
{
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	size_t pg;
	int fd = tmpfile_fd();

	e->mm = t_open(0);
	ck_assert_int_eq(cowmm_region_alloc(e->mm, SMALL * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	for (pg = 0; pg < SMALL; pg += 5)
		t_fill_page(p + pg * T_PAGE, pg);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	e->len = fsize(fd);
	e->file = malloc(e->len);
	ck_assert_int_eq(pread(fd, e->file, e->len, 0), (ssize_t)e->len);
	close(fd);
	ck_assert_int_eq(cowmm_region_alloc(e->mm, SMALL * T_PAGE, 0, &e->dst),
			 0);
	p = cowmm_region_base(e->dst);
	memset(p, 0x3c, SMALL * T_PAGE);
	e->before = region_sum(e->dst);
}

/* Load @len bytes of @buf; the region must be untouched on failure. */
static int try_load(struct bad_env *e, const void *buf, size_t len)
{
	int fd = tmpfile_fd(), ret;

	ck_assert_int_eq(write(fd, buf, len), (ssize_t)len);
	ret = cowmm_region_load(e->dst, fd, 0);
	close(fd);
	if (ret)
		ck_assert_msg(region_sum(e->dst) == e->before,
			      "a refused load changed the region");
	return ret;
}

START_TEST(test_bad_files)
{
	struct bad_env e;
	unsigned char *f;
	size_t cuts[] = { 0, 1, 63, 64, 100, 64 + 88, 64 + 88 + 4095, 0, 0 };
	size_t i;

	bad_setup(&e);
	f = malloc(e.len);
	cuts[7] = e.len - 32;
	cuts[8] = e.len - 1;
	for (i = 0; i < ARRAY_SIZE(cuts); i++)
		ck_assert_msg(try_load(&e, e.file, cuts[i]) == -EBADMSG,
			      "truncated at %zu", cuts[i]);

	/* Wrong version, with a header checksum that matches it. */
	memcpy(f, e.file, e.len);
	f[8] = 2;
	{
		/* CRC32C of the first 60 bytes, bit by bit. */
		uint32_t c = ~0u;

		for (i = 0; i < 60; i++) {
			c ^= f[i];
			for (int b = 0; b < 8; b++)
				c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
		}
		c = ~c;
		memcpy(f + 60, &c, 4);
	}
	ck_assert_int_eq(try_load(&e, f, e.len), -EPROTONOSUPPORT);

	/* A flipped bit anywhere is caught by some checksum. */
	for (i = 0; i < e.len; i += e.len / 257 + 1) {
		memcpy(f, e.file, e.len);
		f[i] ^= 0x10;
		ck_assert_msg(try_load(&e, f, e.len) == -EBADMSG,
			      "bit flip at byte %zu of %zu accepted", i, e.len);
	}
	/* Garbage appended. */
	memcpy(f, e.file, e.len);
	{
		unsigned char *g = malloc(e.len + 4096);

		memcpy(g, e.file, e.len);
		memset(g + e.len, 0, 4096);
		ck_assert_int_eq(try_load(&e, g, e.len + 4096), -EBADMSG);
		free(g);
	}
	/* The good file loads. */
	ck_assert_int_eq(try_load(&e, e.file, e.len), 0);
	ck_assert(region_sum(e.dst) != e.before);
	free(f);
	free(e.file);
	cowmm_close(e.mm);
}
END_TEST

START_TEST(test_bad_args)
{
	struct bad_env e;
	cowmm_region_t *big, *small;
	cowmm_snap_t *s;
	int fd, pipefd[2], full;

	bad_setup(&e);
	fd = tmpfile_fd();
	ck_assert_int_eq(write(fd, e.file, e.len), (ssize_t)e.len);
	ck_assert_int_eq(cowmm_region_alloc(e.mm, 2 * SMALL * T_PAGE, 0, &big),
			 0);
	ck_assert_int_eq(cowmm_region_alloc(e.mm, SMALL / 2 * T_PAGE, 0,
					    &small),
			 0);
	ck_assert_int_eq(cowmm_region_load(big, fd, 0), -EINVAL);
	ck_assert_int_eq(cowmm_region_load(small, fd, 0), -EFBIG);
	ck_assert_int_eq(cowmm_region_load(e.dst, fd, 1), -EINVAL);
	ck_assert_int_eq(cowmm_region_load(e.dst, -1, 0), -EBADF);
	ck_assert_int_eq(cowmm_region_load(NULL, fd, 0), -EINVAL);
	ck_assert_int_eq(pipe(pipefd), 0);
	ck_assert_int_eq(cowmm_region_load(e.dst, pipefd[0], 0), -ESPIPE);
	ck_assert(region_sum(e.dst) == e.before);

	ck_assert_int_eq(cowmm_snapshot(e.dst, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, -1), -EBADF);
	ck_assert_int_eq(cowmm_snap_write(NULL, fd), -EINVAL);
	full = open("/dev/full", O_WRONLY);
	ck_assert_int_ge(full, 0);
	ck_assert_int_eq(cowmm_snap_write(s, full), -ENOSPC);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_snap_write(s, fd), -EBADF);
	close(full);
	close(pipefd[0]);
	close(pipefd[1]);
	close(fd);
	free(e.file);
	cowmm_close(e.mm);
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "round-trip", test_round_trip, T_WP_UNPOPULATED },
		{ "sparse", test_sparse, T_WP_UNPOPULATED },
		{ "bad-files", test_bad_files, T_WP_UNPOPULATED, 0, 120 },
		{ "bad-args", test_bad_args, T_WP_UNPOPULATED },
	};

	return t_run("format", cases, ARRAY_SIZE(cases));
}
