// SPDX-License-Identifier: MIT
/*
 * Every public function with every kind of bad argument, from one table:
 * NULL, unaligned, zero, huge, overflowing addr + len, another region's
 * memory, a released handle, a double release, memory of another manager,
 * file-backed and shared memory, bad descriptors and flags.  Each call must
 * return the negative errno its documentation names, and change nothing:
 * after the whole table the fixture's region holds the same bytes, no page
 * was copied, and the manager holds the same regions and snapshots.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "harness.h"

#define NPAGES 64
#define LEN (NPAGES * T_PAGE)
#define HUGE_LEN ((size_t)1 << 62)

static struct fixture {
	cowmm_t *mm, *other;
	cowmm_region_t *r, *dead_r, *foreign;
	cowmm_snap_t *s, *dead_s;
	unsigned char *p, *shared, *filemap;
	int file, pipe_r, pipe_w;
	int snapfile, small; /* snapshot files: of F.r, of a smaller region */
} F;

static int read_zero(void *data, size_t off, void *buf, size_t len)
{
	(void)data;
	(void)off;
	memset(buf, 0, len);
	return 0;
}

static void fixture_setup(void)
{
	char path[] = "cowmm-badargs-XXXXXX";
	int fds[2];
	size_t pg;

	F.mm = t_open(0);
	F.other = t_open(0);
	ck_assert_int_eq(cowmm_region_alloc(F.mm, LEN, 0, &F.r), 0);
	ck_assert_int_eq(cowmm_region_alloc(F.other, LEN, 0, &F.foreign), 0);
	F.p = cowmm_region_base(F.r);
	for (pg = 0; pg < NPAGES; pg++)
		t_fill_page(F.p + pg * T_PAGE, pg + 7);
	ck_assert_int_eq(cowmm_snapshot(F.r, &F.s), 0);

	ck_assert_int_eq(cowmm_region_alloc(F.mm, LEN, 0, &F.dead_r), 0);
	ck_assert_int_eq(cowmm_snapshot(F.r, &F.dead_s), 0);
	cowmm_snap_release(F.dead_s);
	ck_assert_int_eq(cowmm_region_release(F.dead_r), 0);

	F.shared = mmap(NULL, LEN, PROT_READ | PROT_WRITE,
			MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	F.file = mkstemp(path);
	ck_assert_int_ge(F.file, 0);
	unlink(path);
	ck_assert_int_eq(ftruncate(F.file, LEN), 0);
	F.filemap = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE,
			 F.file, 0);
	ck_assert_ptr_ne(F.shared, MAP_FAILED);
	ck_assert_ptr_ne(F.filemap, MAP_FAILED);
	ck_assert_int_eq(pipe(fds), 0);
	F.pipe_r = fds[0];
	F.pipe_w = fds[1];
	F.snapfile = memfd_create("snap", MFD_CLOEXEC);
	ck_assert_int_eq(cowmm_snap_write(F.s, F.snapfile), 0);
	F.small = memfd_create("small", MFD_CLOEXEC);
	ck_assert_int_eq(cowmm_format_write(F.small, LEN / 2, read_zero, NULL,
					    NULL, NULL),
			 0);
}

struct bad {
	const char *what;
	long want;
	long got;
};

/*
 * One line each: the call and the errno it must return.  The calls run as
 * the table is built (in an unspecified order: none depends on another).
 */
#define BAD(w, e, expr) { w, e, (long)(expr) }

static cowmm_region_t *out_r;
static cowmm_snap_t *out_s;
static cowmm_client_t *out_c;
static const void *view;
static struct cowmm_stats st;
static unsigned char buf[2 * T_PAGE];

static struct cowmm_config cfg_with(size_t size, unsigned workers,
				    unsigned flags, size_t fa)
{
	struct cowmm_config c = COWMM_CONFIG_INIT;

	c.size = size;
	c.workers = workers;
	c.flags = flags;
	c.fault_around = fa;
	return c;
}

static long open_with(struct cowmm_config c);

static long open_bounded(size_t max)
{
	struct cowmm_config c = COWMM_CONFIG_INIT;

	c.max_preserved = max;
	return open_with(c);
}

static long open_with(struct cowmm_config c)
{
	cowmm_t *mm = NULL;
	long ret = cowmm_open(&c, &mm);

	if (!ret)
		cowmm_close(mm);
	return ret;
}

static long open_long_cfg(void)
{
	unsigned char big[sizeof(struct cowmm_config) + 8] = { 0 };
	struct cowmm_config c = COWMM_CONFIG_INIT;
	cowmm_t *mm = NULL;

	c.size = sizeof(big);
	memcpy(big, &c, sizeof(c));
	big[sizeof(c) + 3] = 1; /* a field this library does not know */
	return cowmm_open((struct cowmm_config *)big, &mm);
}

/* Below vm.mmap_min_addr (64 KiB): never mapped, whatever else happens. */
#define HOLE ((void *)0x2000)

static long attach(const struct iovec *v, unsigned n, const char *path)
{
	return cowmm_attach_daemon(path, "bad", v, n, &out_c);
}

START_TEST(test_table)
{
	struct iovec one = { NULL, T_PAGE };
	struct iovec two[2];
	struct cowmm_stats before, after;
	uint64_t sum_before, sum_after;
	size_t pg, i;
	int fails = 0;

	fixture_setup();
	sum_before = 0;
	for (pg = 0; pg < NPAGES; pg++)
		sum_before = sum_before * 31 + t_page_sum(F.p + pg * T_PAGE);
	before = t_stats(F.mm);
	out_r = NULL;
	out_s = NULL;
	out_c = NULL;
	{
		const struct bad table[] = {
			/* managers */
			BAD("open: NULL out", -EINVAL, cowmm_open(NULL, NULL)),
			BAD("open: size 0", -EINVAL,
			    open_with(cfg_with(0, 0, 0, 0))),
			BAD("open: unknown flag", -EINVAL,
			    open_with(cfg_with(sizeof(struct cowmm_config), 0,
					       1u << 9, 0))),
			BAD("open: too many workers", -EINVAL,
			    open_with(cfg_with(sizeof(struct cowmm_config),
					       COWMM_WORKERS_MAX + 1, 0, 0))),
			BAD("open: fault_around over the most", -EINVAL,
			    open_with(cfg_with(sizeof(struct cowmm_config), 0,
					       0, COWMM_FAULT_AROUND_MAX + 1))),
			BAD("open: max_preserved below a page", -EINVAL,
			    open_bounded(T_PAGE - 1)),
			BAD("open: longer config, unknown field set", -E2BIG,
			    open_long_cfg()),
			BAD("stats: NULL manager", -EINVAL,
			    cowmm_stats(NULL, &st, sizeof(st))),
			BAD("stats: NULL out", -EINVAL,
			    cowmm_stats(F.mm, NULL, sizeof(st))),
			BAD("features: NULL", 0, cowmm_features(NULL)),
			/* regions */
			BAD("alloc: NULL manager", -EINVAL,
			    cowmm_region_alloc(NULL, LEN, 0, &out_r)),
			BAD("alloc: length 0", -EINVAL,
			    cowmm_region_alloc(F.mm, 0, 0, &out_r)),
			BAD("alloc: unaligned length", -EINVAL,
			    cowmm_region_alloc(F.mm, LEN + 1, 0, &out_r)),
			BAD("alloc: THP and NOTHP", -EINVAL,
			    cowmm_region_alloc(F.mm, LEN,
					       COWMM_REGION_THP |
						       COWMM_REGION_NOTHP,
					       &out_r)),
			BAD("alloc: unknown flag", -EINVAL,
			    cowmm_region_alloc(F.mm, LEN, 1u << 7, &out_r)),
			BAD("alloc: huge", -ENOMEM,
			    cowmm_region_alloc(F.mm, HUGE_LEN, 0, &out_r)),
			BAD("alloc: NULL out", -EINVAL,
			    cowmm_region_alloc(F.mm, LEN, 0, NULL)),
			BAD("adopt: NULL address (not mapped)", -ENOMEM,
			    cowmm_region_adopt(F.mm, NULL, LEN, 0, &out_r)),
			BAD("adopt: unaligned address", -EINVAL,
			    cowmm_region_adopt(F.mm, F.shared + 1, T_PAGE, 0,
					       &out_r)),
			BAD("adopt: length 0", -EINVAL,
			    cowmm_region_adopt(F.mm, F.shared, 0, 0, &out_r)),
			BAD("adopt: addr + len overflows", -EINVAL,
			    cowmm_region_adopt(F.mm, (void *)-(long)T_PAGE,
					       2 * T_PAGE, 0, &out_r)),
			BAD("adopt: shared memory", -EINVAL,
			    cowmm_region_adopt(F.mm, F.shared, LEN, 0,
					       &out_r)),
			BAD("adopt: file-backed memory", -EINVAL,
			    cowmm_region_adopt(F.mm, F.filemap, LEN, 0,
					       &out_r)),
			BAD("adopt: unmapped memory", -ENOMEM,
			    cowmm_region_adopt(F.mm, HOLE, T_PAGE, 0,
					       &out_r)),
			BAD("adopt: a region of this manager", -EEXIST,
			    cowmm_region_adopt(F.mm, F.p + T_PAGE, T_PAGE, 0,
					       &out_r)),
			BAD("adopt: another manager's region", -EBUSY,
			    cowmm_region_adopt(F.mm,
					       cowmm_region_base(F.foreign),
					       LEN, 0, &out_r)),
			BAD("adopt: a flag", -EINVAL,
			    cowmm_region_adopt(F.mm, F.shared, LEN, 1,
					       &out_r)),
			BAD("base: NULL", 0, cowmm_region_base(NULL)),
			BAD("base: released", 0, cowmm_region_base(F.dead_r)),
			BAD("size: NULL", 0, cowmm_region_size(NULL)),
			BAD("size: released", 0, cowmm_region_size(F.dead_r)),
			BAD("release: NULL", -EINVAL,
			    cowmm_region_release(NULL)),
			BAD("release: twice", -EBADF,
			    cowmm_region_release(F.dead_r)),
			/* pins */
			BAD("pin: NULL region", -EINVAL,
			    cowmm_pin(NULL, F.p, T_PAGE, COWMM_PIN_READ)),
			BAD("pin: released region", -EBADF,
			    cowmm_pin(F.dead_r, F.p, T_PAGE, COWMM_PIN_READ)),
			BAD("pin: unaligned", -EINVAL,
			    cowmm_pin(F.r, F.p + 1, T_PAGE, COWMM_PIN_READ)),
			BAD("pin: length 0", -EINVAL,
			    cowmm_pin(F.r, F.p, 0, COWMM_PIN_READ)),
			BAD("pin: past the end", -EINVAL,
			    cowmm_pin(F.r, F.p, LEN + T_PAGE, COWMM_PIN_READ)),
			BAD("pin: overflowing", -EINVAL,
			    cowmm_pin(F.r, F.p, (size_t)-(long)T_PAGE,
				      COWMM_PIN_READ)),
			BAD("pin: other memory", -EINVAL,
			    cowmm_pin(F.r, F.shared, T_PAGE, COWMM_PIN_READ)),
			BAD("pin: no flag", -EINVAL,
			    cowmm_pin(F.r, F.p, T_PAGE, 0)),
			BAD("pin: unknown flag", -EINVAL,
			    cowmm_pin(F.r, F.p, T_PAGE, 1u << 8)),
			BAD("unpin: never pinned", -ENOENT,
			    cowmm_unpin(F.r, F.p, T_PAGE)),
			BAD("unpin: NULL region", -EINVAL,
			    cowmm_unpin(NULL, F.p, T_PAGE)),
			BAD("unpin: unaligned", -EINVAL,
			    cowmm_unpin(F.r, F.p + 1, T_PAGE)),
			/* snapshots */
			BAD("snapshot: NULL region", -EINVAL,
			    cowmm_snapshot(NULL, &out_s)),
			BAD("snapshot: NULL out", -EINVAL,
			    cowmm_snapshot(F.r, NULL)),
			BAD("snapshot: released region", -EBADF,
			    cowmm_snapshot(F.dead_r, &out_s)),
			BAD("read: NULL snapshot", -EINVAL,
			    cowmm_snap_read(NULL, 0, buf, 1)),
			BAD("read: NULL buffer", -EINVAL,
			    cowmm_snap_read(F.s, 0, NULL, 1)),
			BAD("read: released snapshot", -EBADF,
			    cowmm_snap_read(F.dead_s, 0, buf, 1)),
			BAD("read: at the end", 0,
			    cowmm_snap_read(F.s, LEN, buf, 1)),
			BAD("read: huge offset", 0,
			    cowmm_snap_read(F.s, (size_t)-1, buf, 1)),
			BAD("size: released snapshot", 0,
			    cowmm_snap_size(F.dead_s)),
			BAD("map: NULL view", -EINVAL,
			    cowmm_snap_map(F.s, NULL)),
			BAD("map: released", -EBADF,
			    cowmm_snap_map(F.dead_s, &view)),
			BAD("restore: NULL", -EINVAL, cowmm_snap_restore(NULL)),
			BAD("restore: released", -EBADF,
			    cowmm_snap_restore(F.dead_s)),
			BAD("write: NULL", -EINVAL, cowmm_snap_write(NULL, 1)),
			BAD("write: fd -1", -EBADF, cowmm_snap_write(F.s, -1)),
			BAD("write: released", -EBADF,
			    cowmm_snap_write(F.dead_s, F.pipe_w)),
			BAD("stream: NULL", -EINVAL,
			    cowmm_snap_stream(NULL, 1, 0, NULL, NULL)),
			BAD("stream: unknown flag", -EINVAL,
			    cowmm_snap_stream(F.s, F.pipe_w, 1u << 3, NULL,
					      NULL)),
			BAD("stream and release: fd -1 keeps it", -EBADF,
			    cowmm_snap_stream(F.s, -1, COWMM_STREAM_RELEASE,
					      NULL, NULL)),
			BAD("stream: released", -EBADF,
			    cowmm_snap_stream(F.dead_s, F.pipe_w,
					      COWMM_STREAM_RELEASE, NULL,
					      NULL)),
			BAD("format_write: NULL reader", -EINVAL,
			    cowmm_format_write(F.pipe_w, LEN, NULL, NULL, NULL,
					       NULL)),
			BAD("format_write: length 0", -EINVAL,
			    cowmm_format_write(F.pipe_w, 0, read_zero, NULL,
					       NULL, NULL)),
			BAD("format_write: unaligned length", -EINVAL,
			    cowmm_format_write(F.pipe_w, 100, read_zero, NULL,
					       NULL, NULL)),
			BAD("format_write: fd -1", -EBADF,
			    cowmm_format_write(-1, LEN, read_zero, NULL, NULL,
					       NULL)),
			BAD("load: NULL region", -EINVAL,
			    cowmm_region_load(NULL, F.file, 0)),
			BAD("load: released region", -EBADF,
			    cowmm_region_load(F.dead_r, F.file, 0)),
			BAD("load: fd -1", -EBADF,
			    cowmm_region_load(F.r, -1, 0)),
			BAD("load: unknown flag", -EINVAL,
			    cowmm_region_load(F.r, F.file, 1u << 5)),
			BAD("load: a pipe", -ESPIPE,
			    cowmm_region_load(F.r, F.pipe_r, 0)),
			BAD("load: not a snapshot file", -EBADMSG,
			    cowmm_region_load(F.r, F.file, 0)),
			BAD("load lazily: not a snapshot file", -EBADMSG,
			    cowmm_region_load(F.r, F.file, COWMM_LOAD_LAZY)),
			BAD("load lazily: live snapshots", -EBUSY,
			    cowmm_region_load(F.r, F.snapfile, COWMM_LOAD_LAZY)),
			BAD("load: file for another size", -EINVAL,
			    cowmm_region_load(F.foreign,
					      F.small, 0)),
			/* clones */
			BAD("clone: NULL", -EINVAL, cowmm_clone(NULL, 0, &out_r)),
			BAD("clone: NULL out", -EINVAL, cowmm_clone(F.r, 0, NULL)),
			BAD("clone: bad flags", -EINVAL,
			    cowmm_clone(F.r, COWMM_REGION_THP |
						     COWMM_REGION_NOTHP,
					&out_r)),
			BAD("clone: released", -EBADF,
			    cowmm_clone(F.dead_r, 0, &out_r)),
			/* the daemon's client side */
			BAD("attach: NULL out", -EINVAL,
			    cowmm_attach_daemon(NULL, "x", &one, 1, NULL)),
			BAD("attach: NULL ranges", -EINVAL, attach(NULL, 1, "/x")),
			BAD("attach: no ranges", -EINVAL, attach(&one, 0, "/x")),
			BAD("attach: 17 ranges", -EINVAL,
			    attach(&one, 17, "/x")),
			BAD("attach: unaligned", -EINVAL,
			    ({
				    one.iov_base = F.shared + 1;
				    attach(&one, 1, "/x");
			    })),
			BAD("attach: overlapping", -EEXIST,
			    ({
				    two[0] = (struct iovec){ F.shared, LEN };
				    two[1] = (struct iovec){ F.shared + T_PAGE,
							     T_PAGE };
				    attach(two, 2, "/x");
			    })),
			BAD("attach: shared memory", -EINVAL,
			    ({
				    one = (struct iovec){ F.shared, LEN };
				    attach(&one, 1, "/x");
			    })),
			BAD("attach: file-backed", -EINVAL,
			    ({
				    one = (struct iovec){ F.filemap, LEN };
				    attach(&one, 1, "/x");
			    })),
			BAD("attach: unmapped", -ENOMEM,
			    ({
				    one = (struct iovec){ HOLE, T_PAGE };
				    attach(&one, 1, "/x");
			    })),
			BAD("attach: no daemon there", -ENOENT,
			    ({
				    void *m = mmap(NULL, T_PAGE,
						   PROT_READ | PROT_WRITE,
						   MAP_PRIVATE | MAP_ANONYMOUS,
						   -1, 0);
				    long ret;

				    one = (struct iovec){ m, T_PAGE };
				    ret = attach(&one, 1,
						 "/nonexistent/cowmmd.sock");
				    munmap(m, T_PAGE);
				    ret;
			    })),
			BAD("detach: NULL", -EINVAL, cowmm_detach_daemon(NULL)),
			BAD("client_id: NULL", 0, cowmm_client_id(NULL)),
		};

		for (i = 0; i < ARRAY_SIZE(table); i++) {
			if (table[i].got == table[i].want)
				continue;
			fprintf(stderr, "FAIL %s: %ld (%s), want %ld\n",
				table[i].what, table[i].got,
				cowmm_strerror((int)table[i].got),
				table[i].want);
			fails++;
		}
		printf("%zu bad calls, %d wrong\n", ARRAY_SIZE(table), fails);
	}
	/* Nothing handed out by a call that failed. */
	ck_assert_ptr_null(out_r);
	ck_assert_ptr_null(out_s);
	ck_assert_ptr_null(out_c);
	ck_assert_int_eq(fails, 0);
	/* Nothing changed: the bytes, the copies, the handles. */
	sum_after = 0;
	for (pg = 0; pg < NPAGES; pg++)
		sum_after = sum_after * 31 + t_page_sum(F.p + pg * T_PAGE);
	ck_assert_uint_eq(sum_after, sum_before);
	after = t_stats(F.mm);
	ck_assert_uint_eq(after.copies, before.copies);
	ck_assert_uint_eq(after.regions_live, before.regions_live);
	ck_assert_uint_eq(after.snapshots_live, before.snapshots_live);
	ck_assert_uint_eq(after.frames_live, before.frames_live);
	/* Double release of a snapshot is ignored (and logged). */
	cowmm_snap_release(F.dead_s);
	cowmm_snap_release(NULL);
	cowmm_snap_release(F.s);
	cowmm_close(F.other);
	cowmm_close(F.mm);
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "table", test_table, T_WP_UNPOPULATED },
	};

	return t_run("badargs", cases, ARRAY_SIZE(cases));
}
