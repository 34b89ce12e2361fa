// SPDX-License-Identifier: MIT
/*
 * bench-cow: libcowmm snapshots against fork() and the kernel's own COW,
 * side by side in one run.
 *
 * For each region size and page kind (4k: 4 KiB pages; thp: transparent
 * huge pages; thp2m: huge pages with COWMM_REGION_HUGE_COW, which copies
 * and unprotects 2 MiB at a time, fork() and plain writes as for thp):
 *  1. pause: cowmm_snapshot() call to return, against fork() call to return
 *     in the parent (the child exits at once), on a freshly populated region;
 *  2. first-write cost while a snapshot (or a fork child) is alive: ns per
 *     first write to a page, sequential and random order, p50/p99/p99.9,
 *     with a worker thread resolving the faults (cowmm) and with the
 *     writing thread resolving its own (cowmm-inthread,
 *     COWMM_OPEN_IN_THREAD), against plain writes with no snapshot;
 *  3. memory: extra memory while the snapshot (or child) is alive and K% of
 *     the pages are rewritten: the growth of the proportional set size
 *     (Pss) of this process, plus the child's for fork().
 *
 * Each figure is the median over --runs runs, with min and max; latency
 * percentiles are pooled over the runs.  Output: CSV on stdout, one row per
 * figure (bench,metric,size_mib,pages,method,order,median,min,max,unit,n).
 *
 * Usage: bench-cow [--sizes 256,1024] [--runs N] [--sample PAGES]
 *                  [--kinds 4k,thp,thp2m] [--quick] [--dump DIR]
 *                  [--fault-around PAGES] [--per-cpu] [--follow]
 * --per-cpu: the worker-mode manager binds one worker to each CPU
 * (COWMM_OPEN_PER_CPU).
 * --follow: its worker follows the writer's CPU (COWMM_OPEN_FOLLOW).
 * --pause-only: only the pause figures (pause_ms, pause_repeat_ms).
 * --other MiB: the process also holds that much populated memory outside
 * the region (a database's other heaps): fork() pays for it, a snapshot
 * of the region does not.
 * pause_repeat_ms: a second snapshot of the same region after the first
 * was released and the sampled pages written (the rest stays protected).
 * Sequential order writes the first PAGES pages one after another (a
 * sequential writer, where fault-around applies); random order writes
 * pages spread over the whole region in a shuffled order.  The mean of a
 * pass is its cost per page: the inverse of its throughput.
 * --dump DIR: every first-write latency of the random order, sorted, one
 * file per method, size and kind (DIR/lat-<kind>-<MiB>-<method>.dat: µs
 * and the fraction of writes at most that long), for the chart.
 */
#include <err.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cowmm.h>

#include "bench.h"

#define MAX_RUNS 64

/*
 * Proportional set size of a process, in kB: shared pages count once in
 * total across the processes that share them, so parent + child after a
 * fork() is the memory the two really use.
 */
static long pss_kb(pid_t pid)
{
	char path[64], line[128];
	long kb = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/smaps_rollup", (int)pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Pss: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

struct cfg {
	unsigned long size_mib;
	bool thp;
	bool huge_cow; /* thp2m: COWMM_REGION_HUGE_COW */
	unsigned runs;
	size_t sample;
	const char *dump;
	size_t fault_around; /* struct cowmm_config's; --fault-around */
	bool per_cpu;        /* the worker-mode manager: COWMM_OPEN_PER_CPU */
	bool follow;         /* and COWMM_OPEN_FOLLOW */
	unsigned long other_mib; /* memory of the process outside the region */
	bool pause_only;         /* --pause-only */
};

static const char *kind_name(const struct cfg *c)
{
	return c->huge_cow ? "thp2m" : c->thp ? "thp" : "4k";
}

static void dump_lat(const struct cfg *c, const char *method, double *lat,
		     size_t n)
{
	char path[512];
	size_t i, step = n > 2000 ? n / 2000 : 1;
	FILE *f;

	if (!c->dump)
		return;
	snprintf(path, sizeof(path), "%s/lat-%s-%lu-%s.dat", c->dump,
		 kind_name(c), c->size_mib, method);
	f = fopen(path, "w");
	if (!f)
		err(1, "%s", path);
	qsort(lat, n, sizeof(*lat), cmp_double);
	for (i = 0; i < n; i += step)
		fprintf(f, "%.3f %.5f\n", lat[i] / 1e3, (double)(i + 1) / n);
	fprintf(f, "%.3f 1\n", lat[n - 1] / 1e3);
	fclose(f);
}

static void row(const struct cfg *c, const char *metric, const char *method,
		const char *order, double *v, unsigned n, const char *unit)
{
	qsort(v, n, sizeof(*v), cmp_double);
	printf("cow,%s,%lu,%s,%s,%s,%.3f,%.3f,%.3f,%s,%u\n", metric,
	       c->size_mib, kind_name(c), method, order, v[n / 2],
	       v[0], v[n - 1], unit, n);
	fflush(stdout);
}

static void pct_rows(const struct cfg *c, const char *method,
		     const char *order, double *lat, size_t n)
{
	double p[4], sum = 0;
	size_t j;
	int i;

	/* The mean is the cost per page of the whole pass: throughput. */
	for (j = 0; j < n; j++)
		sum += lat[j];
	printf("cow,write_mean,%lu,%s,%s,%s,%.0f,,,ns,%zu\n", c->size_mib,
	       kind_name(c), method, order, sum / n, n);
	qsort(lat, n, sizeof(*lat), cmp_double);
	p[0] = pct(lat, n, 50);
	p[1] = pct(lat, n, 99);
	p[2] = pct(lat, n, 99.9);
	p[3] = lat[n - 1];
	for (i = 0; i < 4; i++) {
		static const char *names[] = { "write_p50", "write_p99",
					       "write_p999", "write_max" };

		printf("cow,%s,%lu,%s,%s,%s,%.0f,,,ns,%zu\n", names[i],
		       c->size_mib, kind_name(c), method, order, p[i],
		       n);
	}
	fflush(stdout);
}

/*
 * The time, once the process has been quiet for 100 ms: a pause is timed
 * apart from the deferred work of the step before (frames freed after an
 * RCU grace period, their chunks unmapped, a child reaped), which takes
 * the same mmap lock.  Both methods are timed the same way.
 */
static double settled_now(void)
{
	usleep(100000);
	return now_ns();
}

/* Time the first write to each sampled page; ns into @lat. */
static void timed_writes(char *p, const size_t *o, size_t n, double *lat)
{
	size_t i;

	for (i = 0; i < n; i++) {
		double t0 = now_ns();

		p[o[i] * PAGE + 64] = 1;
		lat[i] = now_ns() - t0;
	}
}

/* A region of @len bytes of @c's page kind, every page populated. */
static char *populated_region(cowmm_t *mm, const struct cfg *c, size_t len,
			      cowmm_region_t **r)
{
	int ret = cowmm_region_alloc(mm, len,
				     c->huge_cow ? COWMM_REGION_THP |
							   COWMM_REGION_HUGE_COW
				     : c->thp    ? COWMM_REGION_THP
						 : COWMM_REGION_NOTHP,
				     r);
	char *p;

	if (ret)
		errx(1, "cowmm_region_alloc: %s", cowmm_strerror(ret));
	p = cowmm_region_base(*r);
	populate(p, len);
	return p;
}

static char *map_plain(const struct cfg *c, size_t len)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	if (p == MAP_FAILED)
		err(1, "mmap %zu", len);
	madvise(p, len, c->thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	return p;
}

static void bench_size(cowmm_t *mm, cowmm_t *mm_it, const struct cfg *c)
{
	size_t len = c->size_mib << 20, npages = len / PAGE;
	size_t sample = c->sample < npages ? c->sample : npages;
	double pause_c[MAX_RUNS], pause_f[MAX_RUNS], pause_r[MAX_RUNS];
	double *lat[4][2];
	static const char *methods[] = { "cowmm", "fork", "plain",
					 "cowmm-inthread" };
	static const int kpct[] = { 1, 10, 50, 100 };
	int m, ord;
	unsigned run, k;

	for (m = 0; m < 4; m++)
		for (ord = 0; ord < 2; ord++) {
			lat[m][ord] = malloc(c->runs * sample * sizeof(double));
			if (!lat[m][ord])
				err(1, "malloc");
		}

	for (run = 0; run < c->runs; run++) {
		for (ord = 0; ord < 2; ord++) {
			size_t *o = order_of(npages, sample, ord);
			double *dst;
			cowmm_region_t *r;
			cowmm_snap_t *s;
			char *p;
			pid_t pid;
			int ret;

			/* libcowmm: snapshot a freshly populated region. */
			p = populated_region(mm, c, len, &r);
			{
				double t0 = settled_now();

				ret = cowmm_snapshot(r, &s);
				if (!ord)
					pause_c[run] = (now_ns() - t0) / 1e6;
			}
			if (ret)
				errx(1, "cowmm_snapshot: %s",
				     cowmm_strerror(ret));
			dst = lat[0][ord] + run * sample;
			timed_writes(p, o, sample, dst);
			cowmm_snap_release(s);
			if (!ord) {
				/* Stay armed: only the pages written since are
				 * protected again. */
				double t0 = settled_now();

				if (cowmm_snapshot(r, &s))
					errx(1, "cowmm_snapshot");
				pause_r[run] = (now_ns() - t0) / 1e6;
				cowmm_snap_release(s);
			}
			cowmm_region_release(r);

			/* The same, each writer resolving its own faults. */
			p = populated_region(mm_it, c, len, &r);
			if (cowmm_snapshot(r, &s))
				errx(1, "cowmm_snapshot");
			timed_writes(p, o, sample, lat[3][ord] + run * sample);
			cowmm_snap_release(s);
			cowmm_region_release(r);

			/* fork(): the child holds the old pages. */
			p = map_plain(c, len);
			populate(p, len);
			{
				double t0 = settled_now();

				pid = fork();
				if (pid == 0) {
					pause();
					_exit(0);
				}
				if (!ord)
					pause_f[run] = (now_ns() - t0) / 1e6;
			}
			if (pid < 0)
				err(1, "fork");
			timed_writes(p, o, sample, lat[1][ord] + run * sample);
			kill(pid, SIGKILL);
			waitpid(pid, NULL, 0);

			/* Plain writes: no snapshot, writable PTEs. */
			populate(p, len);
			timed_writes(p, o, sample, lat[2][ord] + run * sample);
			munmap(p, len);
			free(o);
		}
	}
	row(c, "pause_ms", "cowmm", "-", pause_c, c->runs, "ms");
	row(c, "pause_ms", "fork", "-", pause_f, c->runs, "ms");
	row(c, "pause_repeat_ms", "cowmm", "-", pause_r, c->runs, "ms");
	for (m = 0; m < 4; m++) {
		for (ord = 0; ord < 2; ord++)
			pct_rows(c, methods[m], ord ? "random" : "seq",
				 lat[m][ord], c->runs * sample);
		dump_lat(c, methods[m], lat[m][1], c->runs * sample);
	}

	/* Memory while a snapshot (child) lives and K% are rewritten. */
	for (k = 0; k < sizeof(kpct) / sizeof(kpct[0]); k++) {
		double extra_c[MAX_RUNS], extra_f[MAX_RUNS];
		size_t every = 100 / kpct[k], pg;

		for (run = 0; run < c->runs; run++) {
			cowmm_region_t *r;
			cowmm_snap_t *s;
			long before;
			char *p;
			pid_t pid;

			p = populated_region(mm, c, len, &r);
			before = pss_kb(getpid());
			if (cowmm_snapshot(r, &s))
				errx(1, "cowmm_snapshot");
			for (pg = 0; pg < npages; pg += every)
				p[pg * PAGE + 8] = 2;
			extra_c[run] = (pss_kb(getpid()) - before) / 1024.0;
			cowmm_snap_release(s);
			cowmm_region_release(r);

			p = map_plain(c, len);
			populate(p, len);
			before = pss_kb(getpid());
			pid = fork();
			if (pid == 0) {
				pause();
				_exit(0);
			}
			for (pg = 0; pg < npages; pg += every)
				p[pg * PAGE + 8] = 2;
			extra_f[run] = (pss_kb(getpid()) + pss_kb(pid) - before) /
				       1024.0;
			kill(pid, SIGKILL);
			waitpid(pid, NULL, 0);
			munmap(p, len);
		}
		{
			char metric[32];

			snprintf(metric, sizeof(metric), "extra_mem_%dpct",
				 kpct[k]);
			row(c, metric, "cowmm", "-", extra_c, c->runs, "MiB");
			row(c, metric, "fork", "-", extra_f, c->runs, "MiB");
		}
	}
	for (m = 0; m < 4; m++)
		for (ord = 0; ord < 2; ord++)
			free(lat[m][ord]);
}

/* --pause-only: the pause figures alone, as bench_size() takes them. */
static void bench_pause(cowmm_t *mm, const struct cfg *c)
{
	size_t len = c->size_mib << 20, npages = len / PAGE, pg;
	size_t sample = c->sample < npages ? c->sample : npages;
	double pause_c[MAX_RUNS], pause_f[MAX_RUNS], pause_r[MAX_RUNS], t0;
	unsigned run;

	for (run = 0; run < c->runs; run++) {
		cowmm_region_t *r;
		cowmm_snap_t *s;
		char *p = populated_region(mm, c, len, &r);
		pid_t pid;

		t0 = settled_now();
		if (cowmm_snapshot(r, &s))
			errx(1, "cowmm_snapshot");
		pause_c[run] = (now_ns() - t0) / 1e6;
		for (pg = 0; pg < sample; pg++)
			p[pg * PAGE + 64] = 1;
		cowmm_snap_release(s);
		t0 = settled_now();
		if (cowmm_snapshot(r, &s))
			errx(1, "cowmm_snapshot");
		pause_r[run] = (now_ns() - t0) / 1e6;
		cowmm_snap_release(s);
		cowmm_region_release(r);

		p = map_plain(c, len);
		populate(p, len);
		t0 = settled_now();
		pid = fork();
		if (pid == 0) {
			pause();
			_exit(0);
		}
		pause_f[run] = (now_ns() - t0) / 1e6;
		if (pid < 0)
			err(1, "fork");
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		munmap(p, len);
	}
	row(c, "pause_ms", "cowmm", "-", pause_c, c->runs, "ms");
	row(c, "pause_ms", "fork", "-", pause_f, c->runs, "ms");
	row(c, "pause_repeat_ms", "cowmm", "-", pause_r, c->runs, "ms");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "sizes", required_argument, NULL, 's' },
		{ "runs", required_argument, NULL, 'n' },
		{ "sample", required_argument, NULL, 'p' },
		{ "kinds", required_argument, NULL, 'k' },
		{ "quick", no_argument, NULL, 'q' },
		{ "dump", required_argument, NULL, 'd' },
		{ "fault-around", required_argument, NULL, 'f' },
		{ "per-cpu", no_argument, NULL, 'c' },
		{ "follow", no_argument, NULL, 'F' },
		{ "other", required_argument, NULL, 'o' },
		{ "pause-only", no_argument, NULL, 'P' },
		{ 0 },
	};
	char sizes[256] = "256,1024", kinds[32] = "4k,thp", *tok, *save;
	struct cfg c = { .runs = 5, .sample = 16384,
			 .fault_around = COWMM_FAULT_AROUND_SEQUENTIAL };
	cowmm_t *mm, *mm_it;
	int opt, ret;

	while ((opt = getopt_long(argc, argv, "s:n:p:k:qd:f:cFo:P", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			snprintf(sizes, sizeof(sizes), "%s", optarg);
			break;
		case 'n':
			c.runs = strtoul(optarg, NULL, 0);
			break;
		case 'p':
			c.sample = strtoul(optarg, NULL, 0);
			break;
		case 'k':
			snprintf(kinds, sizeof(kinds), "%s", optarg);
			break;
		case 'd':
			c.dump = optarg;
			break;
		case 'f':
			c.fault_around = strtoul(optarg, NULL, 0);
			break;
		case 'c':
			c.per_cpu = true;
			break;
		case 'F':
			c.follow = true;
			break;
		case 'o':
			c.other_mib = strtoul(optarg, NULL, 0);
			break;
		case 'P':
			c.pause_only = true;
			break;
		case 'q':
			snprintf(sizes, sizeof(sizes), "16");
			c.runs = 1;
			c.sample = 512;
			break;
		default:
			fprintf(stderr, "usage: %s [--sizes MiB,...] [--runs N] "
					"[--sample PAGES] [--kinds 4k,thp,thp2m] "
					"[--quick] [--dump DIR] "
					"[--fault-around PAGES] [--per-cpu] "
					"[--follow] [--other MiB] "
					"[--pause-only]\n",
				argv[0]);
			return 2;
		}
	}
	if (!c.runs || c.runs > MAX_RUNS || !c.sample)
		errx(2, "--runs 1..%d, --sample > 0", MAX_RUNS);
	{
		struct cowmm_config cfg = COWMM_CONFIG_INIT;

		cfg.fault_around = c.fault_around;
		cfg.flags = (c.per_cpu ? COWMM_OPEN_PER_CPU : 0) |
			    (c.follow ? COWMM_OPEN_FOLLOW : 0);
		ret = cowmm_open(&cfg, &mm);
		if (ret)
			errx(1, "cowmm_open: %s", cowmm_strerror(ret));
		cfg.flags = COWMM_OPEN_IN_THREAD;
		ret = cowmm_open(&cfg, &mm_it);
		if (ret)
			errx(1, "cowmm_open(IN_THREAD): %s",
			     cowmm_strerror(ret));
	}
	if (c.other_mib) {
		size_t olen = c.other_mib << 20;
		char *other = mmap(NULL, olen, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (other == MAP_FAILED)
			err(1, "mmap --other");
		populate(other, olen); /* kept until exit */
	}
	printf("# other memory in the process: %lu MiB\n", c.other_mib);
	printf("bench,metric,size_mib,pages,method,order,median,min,max,unit,n\n");
	for (tok = strtok_r(kinds, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		char sz[256], *t2, *s2;

		c.huge_cow = !strcmp(tok, "thp2m");
		c.thp = c.huge_cow || !strcmp(tok, "thp");
		if (!c.thp && strcmp(tok, "4k"))
			errx(2, "unknown page kind %s (4k, thp, thp2m)", tok);
		snprintf(sz, sizeof(sz), "%s", sizes);
		for (t2 = strtok_r(sz, ",", &s2); t2;
		     t2 = strtok_r(NULL, ",", &s2)) {
			c.size_mib = strtoul(t2, NULL, 0);
			if (c.size_mib < 2)
				errx(2, "sizes are MiB, at least 2");
			if (c.pause_only)
				bench_pause(mm, &c);
			else
				bench_size(mm, mm_it, &c);
		}
	}
	cowmm_close(mm_it);
	cowmm_close(mm);
	return 0;
}
