// SPDX-License-Identifier: MIT
/*
 * The snapshot file format: a round trip while writers run, sparseness,
 * and every kind of bad file refused with the target region untouched.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
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

/*
 * Writers run while a snapshot is taken and streamed; the file holds the
 * instant.  With @flags COWMM_STREAM_RELEASE the writers race the pages
 * the stream unprotects behind it.
 */
static void round_trip(unsigned flags)
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

	ck_assert_int_eq(cowmm_snap_stream(s, fd, flags, on_progress, NULL), 0);
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
	if (!flags)
		cowmm_snap_release(s);
	ck_assert_uint_eq(t_stats(mm).frames_live, 0);
	free(sums);
	close(fd);
	cowmm_close(mm);
}

START_TEST(test_round_trip)
{
	round_trip(0);
}
END_TEST

START_TEST(test_round_trip_release)
{
	round_trip(COWMM_STREAM_RELEASE);
}
END_TEST

/*
 * Stream and release: once a chunk is read for the file, writes to it stop
 * faulting and keep their physical page; writes ahead of the stream still
 * copy; the file holds the instant; afterwards nothing is held or
 * protected.
 */
#define SR_PAGES 4096 /* 8 chunks of 512 */

static struct {
	cowmm_t *mm;
	unsigned char *p;
	unsigned calls;
	bool checked;
} sr;

static void sr_progress(uint64_t done, uint64_t total, void *data)
{
	struct cowmm_stats a, b;
	uint64_t pfn;

	(void)total;
	(void)data;
	sr.calls++;
	if (done != 4 * 512 * T_PAGE)
		return;
	/* Chunks 0-3 are in the file, 4-7 are not. */
	a = t_stats(sr.mm);
	ck_assert_uint_eq(a.frames_live, 0); /* page 0's copy let go */
	pfn = t_pfn(sr.p + 600 * T_PAGE);
	sr.p[600 * T_PAGE] ^= 1; /* behind the stream */
	b = t_stats(sr.mm);
	ck_assert_uint_eq(b.wp_faults, a.wp_faults);
	ck_assert_uint_eq(t_pfn(sr.p + 600 * T_PAGE), pfn);
	sr.p[3100 * T_PAGE] ^= 1; /* ahead of it */
	b = t_stats(sr.mm);
	ck_assert_uint_eq(b.wp_faults, a.wp_faults + 1);
	ck_assert_uint_eq(b.copies, a.copies + 1);
	ck_assert_uint_eq(b.frames_live, 1);
	sr.checked = true;
}

START_TEST(test_stream_release)
{
	struct cowmm_stats a, b;
	cowmm_region_t *r, *dst;
	cowmm_snap_t *s;
	size_t pg;
	int fd = tmpfile_fd();

	sr.mm = t_open_fa(1, 1);
	sr.p = t_filled_region(sr.mm, SR_PAGES, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	sr.p[0] ^= 1;
	ck_assert_uint_eq(t_stats(sr.mm).copies, 1);

	ck_assert_int_eq(cowmm_snap_stream(s, fd, COWMM_STREAM_RELEASE,
					   sr_progress, NULL),
			 0);
	ck_assert(sr.checked);
	ck_assert_uint_eq(sr.calls, SR_PAGES / 512);
	a = t_stats(sr.mm);
	ck_assert_uint_eq(a.snapshots_live, 0); /* consumed */
	ck_assert_uint_eq(a.frames_live, 0);
	ck_assert_uint_eq(cowmm_snap_size(s), 0);
	ck_assert_int_eq(cowmm_snap_read(s, 0, sr.p, 1), -EBADF);

	/* Nothing is protected any more: no write faults. */
	for (pg = 0; pg < SR_PAGES; pg++)
		sr.p[pg * T_PAGE + 1] ^= 2;
	b = t_stats(sr.mm);
	ck_assert_uint_eq(b.wp_faults, a.wp_faults);

	/* The file holds the instant, none of the writes. */
	ck_assert_int_eq(cowmm_region_alloc(sr.mm, SR_PAGES * T_PAGE, 0, &dst),
			 0);
	ck_assert_int_eq(cowmm_region_load(dst, fd, 0), 0);
	t_assert_live_filled(cowmm_region_base(dst), 0, SR_PAGES, 0, 0);
	close(fd);
	cowmm_close(sr.mm);
}
END_TEST

/*
 * Stream and release with another snapshot alive: pages that one still
 * shares stay protected and are copied for it on their first write.
 */
START_TEST(test_stream_release_shared)
{
	const size_t half = SR_PAGES / 2;
	cowmm_t *mm = t_open_fa(1, 1);
	struct cowmm_stats a, b;
	cowmm_region_t *r, *dst;
	cowmm_snap_t *old, *s;
	unsigned char *p = t_filled_region(mm, SR_PAGES, &r);
	size_t pg;
	int fd = tmpfile_fd();

	ck_assert_int_eq(cowmm_snapshot(r, &old), 0);
	for (pg = 0; pg < half; pg++)
		p[pg * T_PAGE + 7] ^= 4; /* copied for old */
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_stream(s, fd, COWMM_STREAM_RELEASE, NULL,
					   NULL),
			 0);
	a = t_stats(mm);
	ck_assert_uint_eq(a.snapshots_live, 1);
	ck_assert_uint_eq(a.frames_live, half); /* old's, and only those */

	/* The first half no snapshot needs; old still shares the second. */
	for (pg = 0; pg < half; pg++)
		p[pg * T_PAGE + 7] ^= 4;
	b = t_stats(mm);
	ck_assert_uint_eq(b.wp_faults, a.wp_faults);
	for (pg = half; pg < SR_PAGES; pg++)
		p[pg * T_PAGE + 7] ^= 4;
	b = t_stats(mm);
	ck_assert_uint_eq(b.wp_faults, a.wp_faults + half);
	ck_assert_uint_eq(b.copies, a.copies + half);
	t_assert_snap_filled(old, SR_PAGES);

	ck_assert_int_eq(cowmm_region_alloc(mm, SR_PAGES * T_PAGE, 0, &dst), 0);
	ck_assert_int_eq(cowmm_region_load(dst, fd, 0), 0);
	t_assert_live_filled(cowmm_region_base(dst), 0, half, 7, 4);
	t_assert_live_filled(cowmm_region_base(dst), half, half, 0, 0);
	cowmm_snap_release(old);
	close(fd);
	cowmm_close(mm);
}
END_TEST

/*
 * Never-populated pages keep their protection after a stream that
 * releases: the next snapshot need not protect them again.  Their first
 * write faults once and copies nothing.
 */
START_TEST(test_stream_release_unpopulated)
{
	cowmm_t *mm = t_open_fa(1, 1);
	struct cowmm_stats a, b;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	size_t pg;
	int fd = tmpfile_fd();

	ck_assert_int_eq(cowmm_region_alloc(mm, 2048 * T_PAGE,
					    COWMM_REGION_NOTHP, &r),
			 0);
	p = cowmm_region_base(r);
	for (pg = 0; pg < 1024; pg++)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_stream(s, fd, COWMM_STREAM_RELEASE, NULL,
					   NULL),
			 0);
	a = t_stats(mm);
	for (pg = 0; pg < 1024; pg++)
		p[pg * T_PAGE] ^= 1;
	b = t_stats(mm);
	ck_assert_uint_eq(b.wp_faults, a.wp_faults);
	p[1500 * T_PAGE] = 1;
	b = t_stats(mm);
	ck_assert_uint_eq(b.wp_faults, a.wp_faults + 1);
	ck_assert_uint_eq(b.copies, a.copies);
	ck_assert_int_eq(fsize(fd), 64 + 2 * 88 + 1024 * T_PAGE + 32);
	close(fd);
	cowmm_close(mm);
}
END_TEST

/* A mapped snapshot is not consumed; a failed stream still is. */
START_TEST(test_stream_release_refused)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	const void *view;
	int full = open("/dev/full", O_WRONLY | O_CLOEXEC);

	t_filled_region(mm, 1024, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_map(s, &view), 0);
	ck_assert_int_eq(cowmm_snap_stream(s, full, COWMM_STREAM_RELEASE,
					   NULL, NULL),
			 -EBUSY);
	ck_assert_uint_eq(cowmm_snap_size(s), 1024 * T_PAGE);
	cowmm_snap_release(s);

	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_stream(s, full, COWMM_STREAM_RELEASE,
					   NULL, NULL),
			 -ENOSPC);
	ck_assert_uint_eq(t_stats(mm).snapshots_live, 0);
	close(full);
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
	ck_assert_int_eq(cowmm_region_load(e.dst, fd, 2), -EINVAL);
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

/* ------------------------------------------------------------------------ */
/* Crafted files: valid checksums, fields that lie */

/* CRC32C bit by bit: the format's checksum, computed apart from the library. */
static uint32_t t_crc32c(uint32_t crc, const void *buf, size_t n)
{
	const unsigned char *p = buf;

	crc = ~crc;
	while (n--) {
		crc ^= *p++;
		for (int b = 0; b < 8; b++)
			crc = crc & 1 ? (crc >> 1) ^ 0x82f63b78u : crc >> 1;
	}
	return ~crc;
}

static void put32(unsigned char *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static void put64(unsigned char *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

/*
 * A snapshot file whose every checksum and count matches, whatever its
 * header claims: @npages and @region_size as given, then (if @n) one chunk
 * at page @first storing its first @n pages, each all 0xc5, then the
 * trailer.  Returns its fd.
 */
static int crafted_file(uint64_t npages, uint64_t region_size, uint64_t first,
			unsigned n)
{
	size_t len = 64 + (n ? 88 + n * T_PAGE : 0) + 32;
	unsigned char *f = calloc(1, len), *c = f + 64, *t = f + len - 32;
	uint32_t crc = 0, chunks_crc = 0;
	int fd = tmpfile_fd();

	memcpy(f, "COWMMSNP", 8);
	put32(f + 8, 1);
	put32(f + 12, T_PAGE);
	put64(f + 16, region_size);
	put64(f + 24, npages);
	put32(f + 32, 512);
	put32(f + 60, t_crc32c(0, f, 60));
	if (n) {
		put32(c, 0x4b4e4843); /* "CHNK" */
		put32(c + 4, 0);
		put64(c + 8, first);
		put32(c + 16, n);
		for (unsigned i = 0; i < n; i++)
			c[24 + i / 8] |= 1u << (i % 8);
		memset(c + 88, 0xc5, n * T_PAGE);
		crc = t_crc32c(0, c + 24, 64 + n * T_PAGE);
		put32(c + 20, crc);
		chunks_crc = t_crc32c(0, c + 20, 4);
	}
	memcpy(t, "COWMMEND", 8);
	put64(t + 8, n ? 1 : 0);
	put64(t + 16, n);
	put32(t + 24, chunks_crc);
	put32(t + 28, t_crc32c(0, t, 28));
	ck_assert_int_eq(write(fd, f, len), (ssize_t)len);
	free(f);
	return fd;
}

/*
 * An 8-page region adopted in the middle of a larger mapping: 16 guard
 * pages before it, 1024 after (a chunk at page 512 of the region lands
 * there), then one resident PROT_NONE page that stops a runaway loader
 * with SIGSEGV before it reaches memory the test does not own.
 */
#define G_BEFORE 16
#define G_PAGES 8
#define G_AFTER 1024
#define G_MAP (G_BEFORE + G_PAGES + G_AFTER + 1)
#define G_GUARD 0xa5
#define G_OLD 0x3c

struct guarded {
	unsigned char *map, *base;
	cowmm_region_t *r;
};

static void guarded_setup(cowmm_t *mm, struct guarded *g)
{
	g->map = mmap(NULL, G_MAP * T_PAGE, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ck_assert(g->map != MAP_FAILED);
	ck_assert_int_eq(madvise(g->map, G_MAP * T_PAGE, MADV_NOHUGEPAGE), 0);
	memset(g->map, G_GUARD, G_MAP * T_PAGE);
	ck_assert_int_eq(mprotect(g->map + (G_MAP - 1) * T_PAGE, T_PAGE,
				  PROT_NONE),
			 0);
	g->base = g->map + G_BEFORE * T_PAGE;
	memset(g->base, G_OLD, G_PAGES * T_PAGE);
	ck_assert_int_eq(cowmm_region_adopt(mm, g->base, G_PAGES * T_PAGE, 0,
					    &g->r),
			 0);
}

/* Bytes changed outside the region (guards) and inside it. */
static void guarded_changes(const struct guarded *g, size_t *out, size_t *in)
{
	size_t i;

	*out = *in = 0;
	for (i = 0; i < (G_MAP - 1) * T_PAGE; i++) {
		bool inside = i >= G_BEFORE * T_PAGE &&
			      i < (G_BEFORE + G_PAGES) * T_PAGE;

		if (inside)
			*in += g->map[i] != G_OLD;
		else
			*out += g->map[i] != G_GUARD;
	}
}

static sigjmp_buf runaway_jmp;

static void on_runaway(int sig)
{
	siglongjmp(runaway_jmp, sig);
}

static char last_log[512];

static void keep_log(enum cowmm_log_level level, const char *msg, void *data)
{
	(void)level;
	(void)data;
	snprintf(last_log, sizeof(last_log), "%s", msg);
}

/*
 * npages = 2^52 + 8 wraps npages * 4096 to the 8-page region's size.  The
 * chunk at page 512 (or none at all, or one at page 2^52, which wraps to
 * page 0) must not take the loader out of the region, nor the lazy one
 * out of its per-page index: refused with -EBADMSG, the region and every
 * byte around it as they were.
 */
static void crafted_npages(unsigned flags)
{
	const uint64_t wrap = (1ULL << 52) + G_PAGES;
	const struct {
		uint64_t first;
		unsigned n;
	} cases[] = { { 512, 1 }, { 0, 0 }, { 1ULL << 52, 1 } };
	struct sigaction sa = { .sa_handler = on_runaway }, old_segv, old_bus;
	cowmm_t *mm = t_open(0);
	struct guarded g;
	size_t i, out, in;

	guarded_setup(mm, &g);
	cowmm_set_log(keep_log, NULL);
	sigaction(SIGSEGV, &sa, &old_segv);
	sigaction(SIGBUS, &sa, &old_bus);
	for (i = 0; i < ARRAY_SIZE(cases); i++) {
		int fd = crafted_file(wrap, G_PAGES * T_PAGE, cases[i].first,
				      cases[i].n);
		volatile int ret = 1;
		int sig;

		last_log[0] = '\0';
		sig = sigsetjmp(runaway_jmp, 1);
		if (!sig)
			ret = cowmm_region_load(g.r, fd, flags);
		close(fd);
		guarded_changes(&g, &out, &in);
		ck_assert_msg(!sig && ret == -EBADMSG && !out && !in,
			      "%s load, chunk at %" PRIu64 " (%u pages): %s "
			      "%d, %zu bytes changed around the region, %zu "
			      "in it",
			      flags ? "lazy" : "eager", cases[i].first,
			      cases[i].n, sig ? "signal" : "returned",
			      sig ? sig : ret, out, in);
		ck_assert_msg(strstr(last_log, "4503599627370504"),
			      "the log does not name the page count: \"%s\"",
			      last_log);
	}
	sigaction(SIGSEGV, &old_segv, NULL);
	sigaction(SIGBUS, &old_bus, NULL);
	cowmm_set_log(NULL, NULL);
	/* The region still works: a good file of its size loads. */
	{
		int fd = crafted_file(G_PAGES, G_PAGES * T_PAGE, 0, 2);

		ck_assert_int_eq(cowmm_region_load(g.r, fd, flags), 0);
		/* Lazily, this read is a missing fault. */
		ck_assert_int_eq(g.base[T_PAGE + 5], 0xc5);
		ck_assert_int_eq(g.base[2 * T_PAGE + 5], 0);
		ck_assert_int_eq(g.base[-1], G_GUARD);
		ck_assert_int_eq(g.base[G_PAGES * T_PAGE], G_GUARD);
		close(fd);
	}
	cowmm_close(mm);
	munmap(g.map, G_MAP * T_PAGE);
}

START_TEST(test_crafted_npages_eager)
{
	crafted_npages(0);
}
END_TEST

START_TEST(test_crafted_npages_lazy)
{
	crafted_npages(COWMM_LOAD_LAZY);
}
END_TEST


/* ------------------------------------------------------------------------ */
/* Lazy loading */

#define LAZY_PAGES 4096 /* 16 MiB, 8 chunks */

static uint64_t lazy_want(size_t pg)
{
	unsigned char page[T_PAGE];

	if (pg % 2)
		return t_page_sum(memset(page, 0, T_PAGE));
	t_fill_page(page, pg + 1);
	return t_page_sum(page);
}

/* A file of LAZY_PAGES pages: even pages t_fill_page(pg + 1), odd zero. */
static int lazy_file(cowmm_t *mm)
{
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	int fd = tmpfile_fd();
	size_t pg;

	ck_assert_int_eq(cowmm_region_alloc(mm, LAZY_PAGES * T_PAGE, 0, &r),
			 0);
	p = cowmm_region_base(r);
	for (pg = 0; pg < LAZY_PAGES; pg += 2)
		t_fill_page(p + pg * T_PAGE, pg + 1);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	ck_assert_int_eq(cowmm_snap_write(s, fd), 0);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	return fd;
}

static size_t resident_pages(const void *p, size_t npages)
{
	unsigned char *vec = malloc(npages);
	size_t i, n = 0;

	ck_assert_int_eq(mincore((void *)p, npages * T_PAGE, vec), 0);
	for (i = 0; i < npages; i++)
		n += vec[i] & 1;
	free(vec);
	return n;
}

START_TEST(test_lazy)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *dst;
	cowmm_snap_t *s;
	struct cowmm_stats st0, st1;
	unsigned char *p, page[T_PAGE];
	int fd = lazy_file(mm);
	size_t pg;

	ck_assert_int_eq(cowmm_region_alloc(mm, LAZY_PAGES * T_PAGE, 0, &dst),
			 0);
	p = cowmm_region_base(dst);
	memset(p, 0xee, LAZY_PAGES * T_PAGE); /* old content to drop */
	st0 = t_stats(mm);
	ck_assert_int_eq(cowmm_region_load(dst, fd, COWMM_LOAD_LAZY), 0);
	/* Nothing came in yet: loading costs no memory until touched. */
	ck_assert_uint_eq(resident_pages(p, LAZY_PAGES), 0);

	ck_assert_uint_eq(t_page_sum(p + 100 * T_PAGE), lazy_want(100));
	ck_assert_uint_eq(t_page_sum(p + 101 * T_PAGE), lazy_want(101));
	ck_assert_uint_le(resident_pages(p, LAZY_PAGES), 2);
	/* A first write sees the file's bytes around it. */
	p[102 * T_PAGE + 9] ^= 0xff;
	p[102 * T_PAGE + 9] ^= 0xff;
	ck_assert_uint_eq(t_page_sum(p + 102 * T_PAGE), lazy_want(102));
	st1 = t_stats(mm);
	ck_assert_uint_eq(st1.missing_faults - st0.missing_faults, 3);
	/* Discarded before it was loaded: zero, as after any discard. */
	ck_assert_int_eq(madvise(p + 200 * T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	ck_assert_uint_eq(t_page_sum(p + 200 * T_PAGE),
			  t_page_sum(memset(page, 0, T_PAGE)));

	/* A snapshot loads the rest first; both read the file's bytes. */
	ck_assert_int_eq(cowmm_snapshot(dst, &s), 0);
	ck_assert_uint_eq(resident_pages(p, LAZY_PAGES), LAZY_PAGES);
	for (pg = 0; pg < LAZY_PAGES; pg++) {
		uint64_t want = pg == 200 ? t_page_sum(memset(page, 0, T_PAGE))
					  : lazy_want(pg);

		if (t_page_sum(p + pg * T_PAGE) != want)
			ck_abort_msg("live page %zu", pg);
		ck_assert_int_eq(cowmm_snap_read(s, pg * T_PAGE, page, T_PAGE),
				 T_PAGE);
		if (t_page_sum(page) != want)
			ck_abort_msg("snapshot page %zu", pg);
	}
	cowmm_snap_release(s);
	close(fd);
	cowmm_close(mm);
}
END_TEST

/*
 * A page loaded, discarded, then shared by a newer snapshot, then written:
 * neither snapshot may read the write or zeros it did not hold.  Found by
 * review (the page came back writable) and by this test (a worker copying
 * the discarded page faulted into itself; a discard's zeroed refill was
 * preserved as the old bytes).
 */
START_TEST(test_lazy_discard_then_snapshot)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *dst;
	cowmm_snap_t *s1, *s2;
	unsigned char *p, page[T_PAGE], zero[T_PAGE] = { 0 };
	int fd = lazy_file(mm);

	ck_assert_int_eq(cowmm_region_alloc(mm, LAZY_PAGES * T_PAGE, 0, &dst),
			 0);
	ck_assert_int_eq(cowmm_region_load(dst, fd, COWMM_LOAD_LAZY), 0);
	p = cowmm_region_base(dst);
	ck_assert_int_eq(cowmm_snapshot(dst, &s1), 0); /* loads the rest */
	ck_assert_int_eq(madvise(p + 10 * T_PAGE, T_PAGE, MADV_DONTNEED), 0);
	ck_assert_int_eq(cowmm_snapshot(dst, &s2), 0);
	p[10 * T_PAGE + 1] = 0x77;
	/* s2 holds the discarded page's zeros, or reads -EIO when the
	 * discard was handled after s2 was taken; never the write. */
	if (cowmm_snap_read(s2, 10 * T_PAGE, page, T_PAGE) == T_PAGE)
		ck_assert_mem_eq(page, zero, T_PAGE);
	/* s1 shared the discarded page: it keeps its bytes or reads -EIO
	 * (docs/design.md: a discard usually wins the race with the copy). */
	if (cowmm_snap_read(s1, 10 * T_PAGE, page, T_PAGE) == T_PAGE)
		ck_assert_uint_eq(t_page_sum(page), lazy_want(10));
	cowmm_snap_release(s2);
	cowmm_snap_release(s1);
	close(fd);
	cowmm_close(mm);
}
END_TEST

struct lazy_reader {
	const unsigned char *p;
	uint64_t seed;
	unsigned bad;
};

static void *lazy_reader_main(void *arg)
{
	struct lazy_reader *lr = arg;
	int i;

	for (i = 0; i < 3000; i++) {
		size_t pg = t_rand(&lr->seed) % LAZY_PAGES;

		lr->bad += t_page_sum(lr->p + pg * T_PAGE) != lazy_want(pg);
	}
	return NULL;
}

/* Many threads touching pages not loaded yet, the same ones at times. */
START_TEST(test_lazy_concurrent)
{
	cowmm_t *mm = t_open(2);
	struct lazy_reader lr[6];
	pthread_t th[6];
	cowmm_region_t *dst;
	int fd = lazy_file(mm);
	unsigned i;

	ck_assert_int_eq(cowmm_region_alloc(mm, LAZY_PAGES * T_PAGE, 0, &dst),
			 0);
	ck_assert_int_eq(cowmm_region_load(dst, fd, COWMM_LOAD_LAZY), 0);
	for (i = 0; i < 6; i++) {
		lr[i] = (struct lazy_reader){ cowmm_region_base(dst), i + 1, 0 };
		pthread_create(&th[i], NULL, lazy_reader_main, &lr[i]);
	}
	for (i = 0; i < 6; i++) {
		pthread_join(th[i], NULL);
		ck_assert_uint_eq(lr[i].bad, 0);
	}
	close(fd);
	cowmm_close(mm);
}
END_TEST

/* Refused lazy loads change nothing. */
START_TEST(test_lazy_refused)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *dst, *c;
	cowmm_snap_t *s;
	unsigned char *p;
	int fd = lazy_file(mm), bad = tmpfile_fd();
	unsigned char junk[8192];

	ck_assert_int_eq(cowmm_region_alloc(mm, LAZY_PAGES * T_PAGE, 0, &dst),
			 0);
	p = cowmm_region_base(dst);
	memset(p, 0x5a, LAZY_PAGES * T_PAGE);

	ck_assert_int_eq(cowmm_region_load(dst, fd, 2), -EINVAL);
	ck_assert_int_eq(cowmm_snapshot(dst, &s), 0);
	ck_assert_int_eq(cowmm_region_load(dst, fd, COWMM_LOAD_LAZY), -EBUSY);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_pin(dst, p, T_PAGE, COWMM_PIN_READ), 0);
	ck_assert_int_eq(cowmm_region_load(dst, fd, COWMM_LOAD_LAZY), -EBUSY);
	ck_assert_int_eq(cowmm_unpin(dst, p, T_PAGE), 0);
	memset(junk, 0x33, sizeof(junk));
	ck_assert_int_eq(write(bad, junk, sizeof(junk)), (ssize_t)sizeof(junk));
	ck_assert_int_eq(cowmm_region_load(dst, bad, COWMM_LOAD_LAZY),
			 -EBADMSG);
	ck_assert_int_eq(cowmm_clone(dst, 0, &c), 0);
	ck_assert_int_eq(cowmm_region_load(c, fd, COWMM_LOAD_LAZY), -EINVAL);
	ck_assert_int_eq(cowmm_region_release(c), 0);
	ck_assert_uint_eq(resident_pages(p, LAZY_PAGES), LAZY_PAGES);
	for (size_t i = 0; i < LAZY_PAGES * T_PAGE; i += 997)
		if (p[i] != 0x5a)
			ck_abort_msg("byte %zu changed", i);

	/* A second lazy load while the first is under way. */
	ck_assert_int_eq(cowmm_region_load(dst, fd, COWMM_LOAD_LAZY), 0);
	ck_assert_int_eq(cowmm_region_load(dst, fd, COWMM_LOAD_LAZY), -EBUSY);
	close(bad);
	close(fd);
	cowmm_close(mm);
}
END_TEST

static void exit_on_sigbus(int sig)
{
	(void)sig;
	_exit(99); /* the sanitizers' own SIGBUS reports would abort */
}

/* A page the file can no longer give raises SIGBUS, never wrong bytes. */
START_TEST(test_lazy_poison)
{
	pid_t pid = fork();
	int st;

	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		cowmm_t *mm;
		cowmm_region_t *dst;
		volatile unsigned char *p;
		int fd;

		if (cowmm_open(NULL, &mm))
			_exit(2);
		fd = lazy_file(mm);
		if (cowmm_region_alloc(mm, LAZY_PAGES * T_PAGE, 0, &dst) ||
		    cowmm_region_load(dst, fd, COWMM_LOAD_LAZY))
			_exit(3);
		p = cowmm_region_base(dst);
		if (p[0] != 1 && t_page_sum((const void *)p) != lazy_want(0))
			_exit(4);
		if (ftruncate(fd, 4096)) /* the file shrinks behind our back */
			_exit(5);
		signal(SIGBUS, exit_on_sigbus);
		(void)p[(LAZY_PAGES - 2) * T_PAGE]; /* stored past 4096 */
		_exit(0);
	}
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 99,
		      "child status %#x, not SIGBUS", st);
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "round-trip", test_round_trip, T_WP_UNPOPULATED },
		{ "round-trip-release", test_round_trip_release,
		  T_WP_UNPOPULATED },
		{ "sparse", test_sparse, T_WP_UNPOPULATED },
		{ "stream-release", test_stream_release, T_WP_UNPOPULATED,
		  T_NEEDS_ROOT },
		{ "stream-release-shared", test_stream_release_shared,
		  T_WP_UNPOPULATED },
		{ "stream-release-unpopulated", test_stream_release_unpopulated,
		  T_WP_UNPOPULATED },
		{ "stream-release-refused", test_stream_release_refused,
		  T_WP_UNPOPULATED },
		{ "bad-files", test_bad_files, T_WP_UNPOPULATED, 0, 120 },
		{ "bad-args", test_bad_args, T_WP_UNPOPULATED },
		{ "crafted-npages-eager", test_crafted_npages_eager,
		  T_WP_UNPOPULATED },
		{ "crafted-npages-lazy", test_crafted_npages_lazy,
		  T_WP_UNPOPULATED | T_POISON },
		{ "lazy", test_lazy, T_WP_UNPOPULATED | T_POISON },
		{ "lazy-discard-then-snapshot", test_lazy_discard_then_snapshot,
		  T_WP_UNPOPULATED | T_POISON },
		{ "lazy-concurrent", test_lazy_concurrent,
		  T_WP_UNPOPULATED | T_POISON },
		{ "lazy-refused", test_lazy_refused, T_WP_UNPOPULATED | T_POISON },
		{ "lazy-poison", test_lazy_poison, T_WP_UNPOPULATED | T_POISON },
	};

	return t_run("format", cases, ARRAY_SIZE(cases));
}
