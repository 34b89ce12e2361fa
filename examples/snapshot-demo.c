// SPDX-License-Identifier: MIT
/*
 * snapshot-demo: a point-in-time snapshot while threads keep writing.
 *
 * Fills a region, records a checksum of every page, takes a snapshot and
 * lets writer threads rewrite random pages at full speed while the snapshot
 * is read back and checked page by page against the checksums.  Prints what
 * the library did: pages, copies, reuses, and how long cowmm_snapshot() took
 * next to a fork() of the same process.
 *
 * Build out of tree:
 *   cc -O2 snapshot-demo.c $(pkg-config --cflags --libs cowmm) -lpthread
 *
 * Usage: snapshot-demo [--size MiB] [--writers N] [--seconds S] [--thp]
 */
#include <err.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cowmm.h>

#define PAGE 4096UL

struct demo {
	unsigned char *mem;
	size_t npages;
	pthread_rwlock_t pause; /* writers hold it shared while they write */
	atomic_bool stop;
	atomic_uint_fast64_t writes;
};

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* FNV-1a, 64 bits: enough to tell one page's content from another. */
static uint64_t page_sum(const unsigned char *p)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	size_t i;

	for (i = 0; i < PAGE; i += 8) {
		uint64_t w;

		memcpy(&w, p + i, 8);
		h = (h ^ w) * 0x100000001b3ULL;
	}
	return h;
}

static void *writer(void *arg)
{
	struct demo *d = arg;
	uint64_t x = (uintptr_t)&x ^ (uint64_t)time(NULL);

	while (!atomic_load(&d->stop)) {
		int i;

		pthread_rwlock_rdlock(&d->pause);
		for (i = 0; i < 64; i++) {
			size_t pg, off;

			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			pg = x % d->npages;
			off = (x >> 32) % (PAGE / 8);
			/* Writers may hit the same word: store it atomically. */
			__atomic_store_n((uint64_t *)(d->mem + pg * PAGE) + off, x,
					 __ATOMIC_RELAXED);
		}
		pthread_rwlock_unlock(&d->pause);
		atomic_fetch_add(&d->writes, 64);
	}
	return NULL;
}

static void log_stderr(enum cowmm_log_level level, const char *msg, void *data)
{
	(void)data;
	fprintf(stderr, "cowmm[%d]: %s\n", level, msg);
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s [--size MiB] [--writers N] [--seconds S] [--thp]\n",
		argv0);
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "size", required_argument, NULL, 's' },
		{ "writers", required_argument, NULL, 'w' },
		{ "seconds", required_argument, NULL, 't' },
		{ "thp", no_argument, NULL, 'H' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	unsigned long mib = 256, nwriters = 2;
	double seconds = 2, t0, t_snap, t_fork, t_read;
	struct cowmm_stats st0, st;
	unsigned flags = 0;
	struct demo d = { 0 };
	cowmm_region_t *r;
	cowmm_snap_t *snap;
	pthread_t *th;
	uint64_t *sums, bad = 0;
	unsigned char *buf;
	cowmm_t *mm;
	size_t pg, i;
	pid_t pid;
	int c, ret;

	while ((c = getopt_long(argc, argv, "s:w:t:Hh", opts, NULL)) != -1) {
		switch (c) {
		case 's':
			mib = strtoul(optarg, NULL, 0);
			break;
		case 'w':
			nwriters = strtoul(optarg, NULL, 0);
			break;
		case 't':
			seconds = strtod(optarg, NULL);
			break;
		case 'H':
			flags |= COWMM_REGION_THP;
			break;
		default:
			usage(argv[0]);
		}
	}
	if (!mib || !nwriters || nwriters > 64 || seconds <= 0)
		usage(argv[0]);

	cowmm_set_log(log_stderr, NULL);
	ret = cowmm_open(NULL, &mm);
	if (ret < 0)
		errx(1, "cowmm_open: %s", cowmm_strerror(ret));
	ret = cowmm_region_alloc(mm, mib << 20, flags, &r);
	if (ret < 0)
		errx(1, "cowmm_region_alloc: %s", cowmm_strerror(ret));
	d.mem = cowmm_region_base(r);
	d.npages = cowmm_region_size(r) / PAGE;
	pthread_rwlock_init(&d.pause, NULL);

	printf("region: %lu MiB (%zu pages%s) at %p\n", mib, d.npages,
	       flags & COWMM_REGION_THP ? ", THP" : "", (void *)d.mem);
	t0 = now_ms();
	for (pg = 0; pg < d.npages; pg++)
		for (i = 0; i < PAGE; i += 8)
			memcpy(d.mem + pg * PAGE + i, &(uint64_t){ pg * PAGE + i },
			       8);
	printf("filled in %.1f ms\n", now_ms() - t0);

	th = calloc(nwriters, sizeof(*th));
	sums = calloc(d.npages, sizeof(*sums));
	buf = malloc(1 << 20);
	if (!th || !sums || !buf)
		err(1, "calloc");
	for (i = 0; i < nwriters; i++)
		pthread_create(&th[i], NULL, writer, &d);
	usleep(100 * 1000);

	/* The instant: writers pause for the checksums, not the snapshot. */
	pthread_rwlock_wrlock(&d.pause);
	for (pg = 0; pg < d.npages; pg++)
		sums[pg] = page_sum(d.mem + pg * PAGE);
	cowmm_stats(mm, &st0, sizeof(st0));
	t0 = now_ms();
	ret = cowmm_snapshot(r, &snap);
	t_snap = now_ms() - t0;
	pthread_rwlock_unlock(&d.pause);
	if (ret < 0)
		errx(1, "cowmm_snapshot: %s", cowmm_strerror(ret));

	/* For scale: fork() of this same process, child exits at once. */
	t0 = now_ms();
	pid = fork();
	if (pid == 0)
		_exit(0);
	t_fork = now_ms() - t0;
	if (pid > 0)
		waitpid(pid, NULL, 0);

	printf("snapshot taken in %.3f ms (fork() of this process: %.3f ms); "
	       "%lu writers keep writing for %.1f s\n",
	       t_snap, t_fork, nwriters, seconds);
	usleep((useconds_t)(seconds * 1e6));

	t0 = now_ms();
	for (pg = 0; pg < d.npages; pg += (1 << 20) / PAGE) {
		size_t n = d.npages - pg < (1 << 20) / PAGE ? d.npages - pg
							    : (1 << 20) / PAGE;
		ssize_t got = cowmm_snap_read(snap, pg * PAGE, buf, n * PAGE);

		if (got != (ssize_t)(n * PAGE))
			errx(1, "cowmm_snap_read: %s",
			     got < 0 ? cowmm_strerror(got) : "short read");
		for (i = 0; i < n; i++)
			bad += page_sum(buf + i * PAGE) != sums[pg + i];
	}
	t_read = now_ms() - t0;
	atomic_store(&d.stop, true);
	for (i = 0; i < nwriters; i++)
		pthread_join(th[i], NULL);
	cowmm_stats(mm, &st, sizeof(st));

	printf("snapshot read back in %.1f ms while writers ran: "
	       "%zu pages, %" PRIu64 " differ from the instant\n",
	       t_read, d.npages, bad);
	printf("writes: %" PRIu64 "; write faults %" PRIu64 ": copies %" PRIu64
	       ", reuses %" PRIu64 "; frames live %" PRIu64 " (%.1f MiB)\n",
	       (uint64_t)atomic_load(&d.writes), st.wp_faults - st0.wp_faults,
	       st.copies - st0.copies, st.reuses - st0.reuses, st.frames_live,
	       st.frames_live * PAGE / 1048576.0);

	cowmm_snap_release(snap);
	cowmm_stats(mm, &st, sizeof(st));
	printf("after release: frames live %" PRIu64 "\n", st.frames_live);
	cowmm_region_release(r);
	cowmm_close(mm);
	free(th);
	free(sums);
	free(buf);
	if (bad) {
		printf("FAILED: the snapshot changed\n");
		return 1;
	}
	printf("OK: the snapshot held exactly the bytes of its instant\n");
	return 0;
}
