// SPDX-License-Identifier: MIT
/*
 * Model-based random tester.  A seed gives a list of operations, generated
 * up front as data, over 2-3 regions, their clones, snapshots, views and
 * loaded regions.  Each operation is applied to the library (public API of
 * include/cowmm.h only) and to a byte-exact model in plain memory; after
 * each one every live object is compared with the model.  Each seed runs
 * in a child process with a fresh manager, under a watchdog.
 *
 * Environment:
 *   COWMM_MODEL_SECONDS=n   run seeds until n seconds have passed (50)
 *   COWMM_MODEL_SEED=n      run only seed n (replay)
 *   COWMM_MODEL_FIRST=n     start at seed n (default: from the clock)
 *   COWMM_MODEL_NSEEDS=n    stop after n seeds (or the time, if first)
 *   COWMM_MODEL_OPS=k       only the first k operations of each seed
 *   COWMM_MODEL_PICK=i,j,.. only these operations (a shrunk list)
 *   COWMM_MODEL_SHRINK=1    on failure, shrink the list (delta debugging)
 *   COWMM_MODEL_SHRINK_RUNS=n  at most n runs per shrink (300)
 *   COWMM_MODEL_SKIP=a,b    operation kinds that do nothing (by name:
 *                           alloc write write_mt pread pipe snapshot
 *                           snap_release clone release restore map
 *                           view_discard pin unpin dontneed free munmap
 *                           mremap mremap_part stream pageout count
 *                           write_discard read_moving discard_move),
 *                           and behaviours: discard_untouched (no
 *                           discard or unmap of a clone's or lazy load's
 *                           untouched page), discard_origin (nor of a
 *                           page such a clone page reads from), wp_sum
 *                           (no end-of-seed wp_faults == copies + reuses)
 *   COWMM_MODEL_NOPS=n      operations per seed (120)
 *   COWMM_MODEL_PAGEOUT=n   weight of pageout operations (2; swap: more)
 *   COWMM_MODEL_DONTUNMAP=1 the mover of snapshot, clone, restore and
 *                           release also moves with MREMAP_DONTUNMAP
 *                           (off by default: it finds open failures,
 *                           README's Status)
 *   COWMM_MODEL_LOG=1       print the library's messages
 *   COWMM_MODEL_HANG=n      seconds one step may take (20, x3 sanitized)
 *   COWMM_MODEL_GDB=1       on a hang, print every thread's stack (gdb)
 *   COWMM_MODEL_VERBOSE=1   print each operation as it runs
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 1U
#endif

#define PG T_PAGE
#define MAXR 8		/* region slots: regions, clones, loaded regions */
#define MAXS 8		/* snapshot slots */
#define MAXPINS 6
#define MAXOPS 4096
#define MAGIC 0x4d4f444cu	/* "MODL": the stamp of a model write */
#define BOUNDED_PAGES 192	/* max_preserved in bounded mode */

/* Exit codes of a seed's child. */
enum { M_OK = 0, M_BYTES = 1, M_ERROR = 2, M_STATS = 3, M_HANG = 4,
       M_CRASH = 5 };
static const char *const result_name[] = { "ok", "wrong bytes",
	"unexpected return", "counter", "hang", "crash" };

/* ------------------------------------------------------------------------ */
/* Operations, as data */

enum op_kind {
	OP_ALLOC, OP_WRITE, OP_WRITE_MT, OP_PREAD, OP_PIPE, OP_SNAPSHOT,
	OP_SNAP_RELEASE, OP_CLONE, OP_RELEASE, OP_RESTORE, OP_MAP,
	OP_VIEW_DISCARD, OP_PIN, OP_UNPIN, OP_DONTNEED, OP_FREE, OP_MUNMAP,
	OP_MREMAP, OP_MREMAP_PART, OP_STREAM, OP_PAGEOUT, OP_COUNT,
	OP_WRITE_DISCARD, OP_READ_MOVING, OP_DISCARD_MOVE, NKINDS
};

static const char *const kind_name[NKINDS] = {
	"alloc", "write", "write_mt", "pread", "pipe", "snapshot",
	"snap_release", "clone", "release", "restore", "map",
	"view_discard", "pin", "unpin", "dontneed", "free", "munmap",
	"mremap", "mremap_part", "stream", "pageout", "count",
	"write_discard", "read_moving", "discard_move",
};

static unsigned weight[NKINDS] = {
	[OP_ALLOC] = 2, [OP_WRITE] = 20, [OP_WRITE_MT] = 6, [OP_PREAD] = 4,
	[OP_PIPE] = 3, [OP_SNAPSHOT] = 10, [OP_SNAP_RELEASE] = 6,
	[OP_CLONE] = 5, [OP_RELEASE] = 3, [OP_RESTORE] = 5, [OP_MAP] = 3,
	[OP_VIEW_DISCARD] = 1, [OP_PIN] = 3, [OP_UNPIN] = 3,
	[OP_DONTNEED] = 5, [OP_FREE] = 3, [OP_MUNMAP] = 2, [OP_MREMAP] = 2,
	[OP_MREMAP_PART] = 2, [OP_STREAM] = 4, [OP_PAGEOUT] = 2,
	[OP_COUNT] = 1, [OP_WRITE_DISCARD] = 3, [OP_READ_MOVING] = 3,
	[OP_DISCARD_MOVE] = 2,
};

struct op {
	enum op_kind kind;
	uint32_t a, b, c, d;	/* selectors: object, pages, variant */
	uint64_t rnd;		/* data */
};

/* What the seed's mode is. */
struct mode {
	unsigned workers;
	bool in_thread;
	unsigned placement;	/* 0, COWMM_OPEN_FOLLOW or COWMM_OPEN_PER_CPU */
	size_t fault_around;
	size_t bounded;		/* max_preserved in pages; 0: unbounded */
};

/* ------------------------------------------------------------------------ */
/* The model */

enum { K_ALLOC, K_ADOPT, K_CLONE, K_LOADED };
static const char *const rkind_name[] = { "alloc", "adopt", "clone",
					  "loaded" };

struct pin {
	size_t pg, n;
	unsigned flags;
};

struct mregion {
	bool live;
	int id;			/* R<id>, never reused in a seed */
	int kind;
	cowmm_region_t *r;
	size_t npages;
	unsigned char *model;	/* the bytes each page must hold */
	unsigned char *amb;	/* MADV_FREE: zero also allowed */
	unsigned char **addr;	/* where each page is; NULL: unmapped */
	unsigned char *lazy;	/* not yet touched: a clone's or lazy
				   load's page, filled on first touch */
	unsigned char *cshared;	/* clone page not yet filled whose
				   origin still holds its bytes */
	unsigned char *maylose;	/* may raise SIGBUS (origin discarded) */
	int origin;		/* slot cloned from, -1 */
	bool holes;		/* pages unmapped */
	bool moved;		/* pages moved apart: in pieces */
	struct pin pins[MAXPINS];
	int npins;
};

struct msnap {
	bool live;
	int id;			/* S<id> */
	cowmm_snap_t *s;
	int region;		/* slot, -1 once the region is released */
	int region_id;
	size_t npages;
	unsigned char *model, *amb;
	unsigned char *shared;	/* page not changed in the region since */
	unsigned char *loose;	/* written since, maybe without a fault */
	unsigned char *unsure;	/* an eager load may have left it alone */
	bool may_break;		/* -EIO allowed from now on */
	const unsigned char *view;
	unsigned char *vtouched;
};

static struct mode mode;
static uint64_t seed;
static struct op ops[MAXOPS];
static size_t nops;
static unsigned char *pick;	/* ops[i] runs only if pick[i] */
static bool quiet, verbose;
static bool skip_kind[NKINDS];
/* Behaviours that can be left out while their bug is being fixed. */
static bool skip_untouched;	/* discard_untouched: no discard or unmap of
				   a clone's or lazy load's untouched page */
static bool skip_origin;	/* discard_origin: none of a page that an
				   untouched clone page still reads from */
static bool skip_wp_sum;	/* wp_sum: the end-of-seed check of
				   wp_faults == copies + reuses */
static double hang_seconds = 20;

static cowmm_t *mm;
static uint64_t features;
static struct mregion R[MAXR];
static struct msnap S[MAXS];
static int next_rid, next_sid;
static int memfd = -1, pipefd[2] = { -1, -1 };
static char descs[MAXOPS][200];
static atomic_int cur_op = -1;
static atomic_llong step_start_ns;
static bool ever_broken_allowed;

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return (x ^ (x >> 31)) | 1;
}

static void mode_str(char *buf, size_t len)
{
	snprintf(buf, len, "workers=%u fault_around=%zu%s%s%s", mode.workers,
		 mode.fault_around, mode.in_thread ? " in_thread" : "",
		 mode.placement == COWMM_OPEN_FOLLOW    ? " follow"
		 : mode.placement == COWMM_OPEN_PER_CPU ? " per_cpu"
							: "",
		 mode.bounded ? " bounded" : "");
	if (mode.bounded)
		snprintf(buf + strlen(buf), len - strlen(buf), "=%zu pages",
			 mode.bounded);
}

/* The op list run so far, one line each. */
static void dump_ops(int upto)
{
	int i;

	for (i = 0; i <= upto && i < (int)nops; i++)
		if (pick[i] && descs[i][0] &&
		    !strstr(descs[i], "COWMM_MODEL_SKIP"))
			printf("    #%d %s\n", i, descs[i]);
	fflush(stdout);
}

static void report_head(const char *what)
{
	char m[128];

	mode_str(m, sizeof(m));
	printf("MODEL FAILURE (%s): seed %llu, mode: %s, at op #%d\n", what,
	       (unsigned long long)seed, m, atomic_load(&cur_op));
	printf("  ops so far:\n");
	dump_ops(atomic_load(&cur_op));
}

/*
 * What failed, for the shrinker to keep the same failure: the format of
 * the message, or the kind of object and bytes, written by the child into
 * memory shared with its parent.
 */
static volatile uintptr_t *sigbox;

static __attribute__((noreturn, format(printf, 2, 3))) void
die(int code, const char *fmt, ...)
{
	va_list ap;

	if (sigbox && !*sigbox)
		*sigbox = (uintptr_t)fmt;

	if (!quiet) {
		report_head(result_name[code]);
		printf("  ");
		va_start(ap, fmt);
		vprintf(fmt, ap);
		va_end(ap);
		printf("\n");
		fflush(stdout);
	}
	_exit(code);
}

/* ------------------------------------------------------------------------ */
/* Signals: a SIGBUS where the model allows one, a report otherwise */

static __thread sigjmp_buf *guard;

static void on_signal(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (guard)
		siglongjmp(*guard, sig);
	if (sigbox)
		*sigbox = (uintptr_t)sig;
	if (!quiet) {
		report_head("crash");
		printf("  signal %d at address %p\n", sig, si->si_addr);
		fflush(stdout);
	}
	_exit(M_CRASH);
}

static void install_signals(void)
{
	struct sigaction sa = { 0 };

	sa.sa_sigaction = on_signal;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
}

/*
 * Copy a page of live memory; returns the signal number if the copy
 * faulted (SIGBUS on a page the library poisoned), else 0.
 */
static int guarded_copy(void *dst, const void *src, size_t len)
{
	sigjmp_buf jb;
	volatile int sig;

	sig = sigsetjmp(jb, 1);
	if (sig) {
		guard = NULL;
		return sig;
	}
	guard = &jb;
	memcpy(dst, src, len);
	__asm__ volatile("" ::: "memory");
	guard = NULL;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Watchdog: a step that takes too long is a hang, reported with its seed */

static size_t frame_budget(void);

/* Every thread's stack, by gdb attached to this process: where it hangs. */
static void print_stacks(void)
{
	char cmd[160];

	snprintf(cmd, sizeof(cmd),
		 "gdb -p %d -batch -nx -ex 'thread apply all bt' </dev/null "
		 "2>&1 | grep -v '^\\[New LWP'", (int)getpid());
	if (system(cmd))
		printf("  (gdb could not print the stacks)\n");
	fflush(stdout);
}

/* The first line of /proc/self/task/@tid/@what, without its newline. */
static void task_file(const char *tid, const char *what, char *buf,
		      size_t len)
{
	char path[96];
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/task/%s/%s", tid, what);
	buf[0] = 0;
	f = fopen(path, "r");
	if (f) {
		if (!fgets(buf, (int)len, f))
			buf[0] = 0;
		fclose(f);
	}
	buf[strcspn(buf, "\n")] = 0;
}

/*
 * Where every thread waits, from /proc: what the kernel knows without
 * stopping anyone (gdb cannot attach while a thread is stuck in the
 * kernel, and a hang seen once under load may not come back).
 */
static void print_threads(void)
{
	char comm[64], stat[512], wchan[64], sc[256];
	struct dirent *de;
	DIR *d = opendir("/proc/self/task");
	const char *st;

	while (d && (de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		task_file(de->d_name, "comm", comm, sizeof(comm));
		task_file(de->d_name, "stat", stat, sizeof(stat));
		task_file(de->d_name, "wchan", wchan, sizeof(wchan));
		task_file(de->d_name, "syscall", sc, sizeof(sc));
		st = strrchr(stat, ')');
		printf("  thread %s (%s): state %c, wchan %s, syscall %s\n",
		       de->d_name, comm, st && st[1] ? st[2] : '?',
		       wchan[0] ? wchan : "-", sc);
	}
	if (d)
		closedir(d);
	fflush(stdout);
}

static void *watchdog(void *arg)
{
	(void)arg;
	for (;;) {
		long long start;

		usleep(200000);
		start = atomic_load(&step_start_ns);
		if (start && now_ns() - start > hang_seconds * 1e9) {
			if (!quiet) {
				report_head("hang");
				struct cowmm_stats st;

				printf("  op #%d did not finish in %.0f s\n",
				       atomic_load(&cur_op), hang_seconds);
				print_threads();
				if (mm && !cowmm_stats(mm, &st, sizeof(st)))
					printf("  stats: frames_live %llu "
					       "snapshots_live %llu throttled "
					       "%llu wp_faults %llu "
					       "missing_faults %llu; model "
					       "frame budget %zu pages\n",
					       (unsigned long long)st.frames_live,
					       (unsigned long long)st.snapshots_live,
					       (unsigned long long)st.throttled,
					       (unsigned long long)st.wp_faults,
					       (unsigned long long)st.missing_faults,
					       frame_budget());
				sleep(1);
				if (mm && !cowmm_stats(mm, &st, sizeof(st)))
					printf("  1 s later: missing_faults "
					       "%llu wp_faults %llu\n",
					       (unsigned long long)st.missing_faults,
					       (unsigned long long)st.wp_faults);
				fflush(stdout);
				if (getenv("COWMM_MODEL_GDB"))
					print_stacks();
			}
			_exit(M_HANG);
		}
	}
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* Page contents: every write is distinguishable by its stamp */

struct stamp {
	uint32_t magic, op, pg, rid;
};

static void make_page(unsigned char *p, int op, int rid, size_t pg,
		      uint64_t rnd)
{
	struct stamp st = { MAGIC, (uint32_t)op, (uint32_t)pg, (uint32_t)rid };
	uint64_t x = mix(rnd ^ (pg << 20) ^ ((uint64_t)op << 40)), w;
	size_t i;

	switch (x % 4) {
	case 0: /* all zero: a written page that reads as zero */
		memset(p, 0, PG);
		return;
	case 1: /* stamp, then zeros */
		memset(p, 0, PG);
		break;
	case 2: /* stamp, then one byte */
		memset(p, (int)(x >> 8), PG);
		break;
	default: /* stamp, then random */
		for (i = 0; i < PG; i += 8) {
			w = t_rand(&x);
			memcpy(p + i, &w, 8);
		}
	}
	memcpy(p, &st, sizeof(st));
}

static bool is_zero(const unsigned char *p, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

static void describe_stamp(const char *label, const unsigned char *p)
{
	struct stamp st;

	memcpy(&st, p, sizeof(st));
	if (st.magic == MAGIC)
		printf("  %s: the bytes op #%u wrote to R%u page %u\n", label,
		       st.op, st.rid, st.pg);
	else if (is_zero(p, PG))
		printf("  %s: a zero page\n", label);
	else
		printf("  %s: no stamp (initial or partial bytes)\n", label);
}

/* First difference: object, page, offset, expected and got bytes. */
static __attribute__((noreturn)) void
diverge(const char *obj, size_t pg, const unsigned char *want,
	const unsigned char *got, bool amb)
{
	size_t off = 0, i;
	char e[64] = "", g[64] = "";

	if (sigbox)
		*sigbox = (uintptr_t)obj[0] | (uintptr_t)is_zero(got, PG) << 8 |
			  (uintptr_t)is_zero(want, PG) << 9;
	if (quiet)
		_exit(M_BYTES);
	while (off < PG && want[off] == got[off])
		off++;
	for (i = off; i < off + 8 && i < PG; i++) {
		snprintf(e + strlen(e), sizeof(e) - strlen(e), "%02x", want[i]);
		snprintf(g + strlen(g), sizeof(g) - strlen(g), "%02x", got[i]);
	}
	report_head(result_name[M_BYTES]);
	printf("  %s page %zu offset %zu: expected %s%s, got %s\n", obj, pg,
	       off, e, amb ? " (or a zero page)" : "", g);
	describe_stamp("expected", want);
	describe_stamp("got", got);
	fflush(stdout);
	_exit(M_BYTES);
}

/* ------------------------------------------------------------------------ */
/* Model bookkeeping */

static unsigned char *page_of(unsigned char *buf, size_t pg)
{
	return buf + pg * PG;
}

static int find_region(uint32_t sel, bool (*ok)(struct mregion *))
{
	int cand[MAXR], n = 0, i;

	for (i = 0; i < MAXR; i++)
		if (R[i].live && (!ok || ok(&R[i])))
			cand[n++] = i;
	return n ? cand[sel % n] : -1;
}

static int find_snap(uint32_t sel, bool (*ok)(struct msnap *))
{
	int cand[MAXS], n = 0, i;

	for (i = 0; i < MAXS; i++)
		if (S[i].live && (!ok || ok(&S[i])))
			cand[n++] = i;
	return n ? cand[sel % n] : -1;
}

static int free_region_slot(void)
{
	int i;

	for (i = 0; i < MAXR; i++)
		if (!R[i].live)
			return i;
	return -1;
}

static int free_snap_slot(void)
{
	int i;

	for (i = 0; i < MAXS; i++)
		if (!S[i].live)
			return i;
	return -1;
}

static size_t live_regions(void)
{
	size_t i, n = 0;

	for (i = 0; i < MAXR; i++)
		n += R[i].live;
	return n;
}

static size_t live_snaps(void)
{
	size_t i, n = 0;

	for (i = 0; i < MAXS; i++)
		n += S[i].live;
	return n;
}

/*
 * Bounded mode: the frames the live objects may need, in pages.  A
 * snapshot needs at most one frame per page (two with a view), a clone
 * one per page it has not read; the count op's region is included.  Ops
 * that could go past the bound are skipped, so that no write waits for a
 * release that only this thread could make.
 */
static size_t frame_budget(void)
{
	size_t i, n = 32;

	for (i = 0; i < MAXS; i++)
		if (S[i].live)
			n += S[i].npages * (S[i].view ? 2 : 1);
	for (i = 0; i < MAXR; i++)
		if (R[i].live && R[i].kind == K_CLONE)
			n += R[i].npages;
	return n;
}

static bool budget_allows(size_t more)
{
	return !mode.bounded || frame_budget() + more <= mode.bounded;
}

static void region_init(struct mregion *m, size_t npages)
{
	memset(m, 0, sizeof(*m));
	m->live = true;
	m->id = next_rid++;
	m->npages = npages;
	m->model = calloc(npages, PG);
	m->amb = calloc(npages, 1);
	m->addr = calloc(npages, sizeof(*m->addr));
	m->lazy = calloc(npages, 1);
	m->cshared = calloc(npages, 1);
	m->maylose = calloc(npages, 1);
	m->origin = -1;
}

static void region_free(struct mregion *m)
{
	free(m->model);
	free(m->amb);
	free(m->addr);
	free(m->lazy);
	free(m->cshared);
	free(m->maylose);
	memset(m, 0, sizeof(*m));
}

static void snap_free(struct msnap *s)
{
	free(s->model);
	free(s->amb);
	free(s->shared);
	free(s->loose);
	free(s->unsure);
	free(s->vtouched);
	memset(s, 0, sizeof(*s));
}

static bool pinned(struct mregion *m, size_t pg)
{
	int i;

	for (i = 0; i < m->npins; i++)
		if (pg >= m->pins[i].pg && pg < m->pins[i].pg + m->pins[i].n)
			return true;
	return false;
}

/*
 * Page pg of region ri may have lost its bytes (discarded or unmapped):
 * every clone that had not yet filled that page from it may read it as
 * SIGBUS (issue 15 item 5: bytes or a loud failure, never zeros), and
 * their snapshots and clones that shared it with them may break.
 */
static void lose(int ri, size_t pg)
{
	int c, i;

	for (c = 0; c < MAXR; c++) {
		struct mregion *m = &R[c];

		if (!m->live || m->origin != ri || pg >= m->npages ||
		    !m->cshared[pg])
			continue;
		m->cshared[pg] = 0;
		m->maylose[pg] = 1;
		/* the library may count the clone's loss as broken */
		ever_broken_allowed = true;
		for (i = 0; i < MAXS; i++)
			if (S[i].live && S[i].region == c && S[i].shared[pg]) {
				S[i].may_break = true;
				ever_broken_allowed = true;
			}
		lose(c, pg);
	}
}

/*
 * Page pg of region ri changes by a write (CPU, system call, restore,
 * eager load): snapshots and clones that shared it get their copy.  Not
 * always for a page MADV_FREE left: if the kernel dropped it, the write
 * found no protection and did not fault, and the library learns of it only
 * later (they read the zero the page became, or break at the next discard,
 * which cannot tell that page from one it zapped): they keep sharing it.
 */
static void page_written(int ri, size_t pg)
{
	struct mregion *m = &R[ri];
	int i;

	for (i = 0; i < MAXS; i++)
		if (S[i].live && S[i].region == ri && m->amb[pg])
			S[i].loose[pg] |= S[i].shared[pg];
		else if (S[i].live && S[i].region == ri)
			S[i].shared[pg] = 0;
	for (i = 0; i < MAXR && !m->amb[pg]; i++)
		if (R[i].live && R[i].origin == ri && pg < R[i].npages)
			R[i].cshared[pg] = 0;
	m->amb[pg] = 0;
	m->lazy[pg] = 0;
	m->cshared[pg] = 0;
}

/*
 * Page pg of region ri is written, but the library may have left it alone
 * (its bytes were already the ones written): the clones that still read it
 * from ri may keep doing so, and lose it at a later discard (SIGBUS).
 */
static void written_clones_unsure(int ri, size_t pg)
{
	unsigned char keep[MAXR];
	int i;

	for (i = 0; i < MAXR; i++)
		keep[i] = R[i].live && R[i].origin == ri && pg < R[i].npages &&
			  R[i].cshared[pg];
	page_written(ri, pg);
	for (i = 0; i < MAXR; i++)
		if (keep[i])
			R[i].cshared[pg] = 1;
}

/*
 * An eager load writes page pg of region ri with @file (@famb: the file's
 * bytes may be zero instead).  Where either side is "old bytes or zero"
 * (MADV_FREE), the loader may find the page equal and leave it alone, so
 * whether the page stays shared is not known: its snapshots read the same
 * bytes either way (they would share exactly the file's), but a later
 * discard may break them, and a clone that still read it from its origin
 * may lose it (SIGBUS).  Those are allowed; the rest is as a write.
 */
static void load_written(int ri, size_t pg, const unsigned char *file,
			 bool famb)
{
	struct mregion *m = &R[ri];
	const unsigned char *live = page_of(m->model, pg);
	bool equal = !memcmp(live, file, PG), unsure;
	int i;

	if (m->amb[pg] && famb)
		unsure = true;
	else if (m->amb[pg]) /* live: old or zero; the file's is sure */
		unsure = equal || is_zero(file, PG);
	else if (famb) /* the file's: its bytes or zero */
		unsure = equal || is_zero(live, PG);
	else
		unsure = equal;
	if (!unsure) {
		page_written(ri, pg);
		return;
	}
	for (i = 0; i < MAXS; i++)
		if (S[i].live && S[i].region == ri && S[i].shared[pg]) {
			S[i].may_break = true;
			S[i].unsure[pg] = 1;
			ever_broken_allowed = true;
		}
	written_clones_unsure(ri, pg);
}

/*
 * Page pg of region ri is discarded or unmapped by the application.  The
 * rule of -EIO (DESIGN.md, "The application's own mm calls": "Where the
 * kernel makes preservation impossible, the affected snapshot is marked
 * broken (-EIO), never silently wrong"; issue 15: "a discard or unmap of a
 * page that snapshot still shared"): a snapshot that still shared the page
 * may break.
 */
static void page_discarded(int ri, size_t pg)
{
	int i;

	for (i = 0; i < MAXS; i++)
		if (S[i].live && S[i].region == ri && S[i].shared[pg]) {
			S[i].may_break = true;
			ever_broken_allowed = true;
			S[i].shared[pg] = 0;
		}
	lose(ri, pg);
}

/* ------------------------------------------------------------------------ */
/* Checks */

static void read_page(struct mregion *m, size_t pg, unsigned char *buf,
		      const char *name)
{
	int sig = guarded_copy(buf, m->addr[pg], PG);

	if (sig && !m->maylose[pg])
		die(M_CRASH, "%s page %zu at %p: signal %d on read", name, pg,
		     (void *)m->addr[pg], sig);
	if (sig)
		memcpy(buf, page_of(m->model, pg), PG); /* loud: allowed */
}

static void check_region(int ri, uint64_t *x, unsigned touch_pct)
{
	struct mregion *m = &R[ri];
	unsigned char buf[PG];
	char name[48];
	size_t pg;

	snprintf(name, sizeof(name), "R%d (%s)", m->id, rkind_name[m->kind]);
	if (cowmm_region_size(m->r) != m->npages * PG)
		die(M_ERROR, "%s: cowmm_region_size %zu, expected %zu", name,
		     cowmm_region_size(m->r), m->npages * PG);
	for (pg = 0; pg < m->npages; pg++) {
		const unsigned char *want = page_of(m->model, pg);

		if (!m->addr[pg])
			continue;
		/* Untouched clone and lazy pages: read only some of them, so
		 * that untouched pages live on into later steps. */
		if (m->lazy[pg] && t_rand(x) % 100 >= touch_pct)
			continue;
		read_page(m, pg, buf, name);
		m->lazy[pg] = 0;
		m->cshared[pg] = 0;
		if (memcmp(buf, want, PG) && !(m->amb[pg] && is_zero(buf, PG)))
			diverge(name, pg, want, buf, m->amb[pg]);
	}
}

static void check_snap(int si, uint64_t *x, unsigned touch_pct)
{
	struct msnap *s = &S[si];
	unsigned char buf[PG];
	char name[48];
	size_t pg;
	ssize_t n;

	snprintf(name, sizeof(name), "S%d (of R%d)", s->id, s->region_id);
	if (cowmm_snap_size(s->s) != s->npages * PG)
		die(M_ERROR, "%s: cowmm_snap_size %zu, expected %zu", name,
		     cowmm_snap_size(s->s), s->npages * PG);
	for (pg = 0; pg < s->npages; pg++) {
		const unsigned char *want = page_of(s->model, pg);

		n = cowmm_snap_read(s->s, pg * PG, buf, PG);
		if (n == -EIO && s->may_break)
			return; /* broken, as allowed */
		if (n != (ssize_t)PG)
			die(M_ERROR, "%s: cowmm_snap_read page %zu: %zd (%s)%s",
			     name, pg, n, n < 0 ? cowmm_strerror((int)n) : "",
			     s->may_break ? "" : " (may not break)");
		if (memcmp(buf, want, PG) && !(s->amb[pg] && is_zero(buf, PG)))
			diverge(name, pg, want, buf, s->amb[pg]);
	}
	/* Byte granular: an unaligned read across pages, one past the end. */
	{
		size_t len = t_rand(x) % (2 * PG) + 1;
		size_t off = t_rand(x) % (s->npages * PG), want_n, i;
		unsigned char *b = malloc(len);

		want_n = off + len > s->npages * PG ? s->npages * PG - off : len;
		n = cowmm_snap_read(s->s, off, b, len);
		if (n == -EIO && s->may_break) {
			free(b);
			return;
		}
		if (n != (ssize_t)want_n)
			die(M_ERROR, "%s: cowmm_snap_read(%zu, %zu): %zd, "
				      "expected %zu", name, off, len, n, want_n);
		for (i = 0; i < want_n; i++) {
			size_t p = (off + i) / PG;

			if (!s->amb[p] && b[i] != s->model[off + i])
				die(M_BYTES, "%s: byte %zu (unaligned read "
					      "at %zu): expected %02x, got %02x",
				     name, off + i, off, s->model[off + i],
				     b[i]);
		}
		free(b);
		n = cowmm_snap_read(s->s, s->npages * PG, buf, 1);
		if (n != 0 && !(n == -EIO && s->may_break))
			die(M_ERROR, "%s: read at the end gives %zd", name, n);
	}
	/* The view: only while the snapshot may not be broken (reading a
	 * broken snapshot's view has no documented outcome). */
	if (s->view && !s->may_break) {
		for (pg = 0; pg < s->npages; pg++) {
			const unsigned char *want = page_of(s->model, pg);

			if (!s->vtouched[pg] && t_rand(x) % 100 >= touch_pct)
				continue;
			if (guarded_copy(buf, s->view + pg * PG, PG))
				die(M_CRASH, "view of %s page %zu: signal",
				     name, pg);
			s->vtouched[pg] = 1;
			if (memcmp(buf, want, PG) &&
			    !(s->amb[pg] && is_zero(buf, PG))) {
				char vn[64];

				snprintf(vn, sizeof(vn), "view of %s", name);
				diverge(vn, pg, want, buf, s->amb[pg]);
			}
		}
	}
}

static void check_stats(void)
{
	struct cowmm_stats st;
	int ret = cowmm_stats(mm, &st, sizeof(st));

	if (ret)
		die(M_ERROR, "cowmm_stats: %d", ret);
	if (st.snapshots_live != live_snaps())
		die(M_STATS, "snapshots_live %llu, model has %zu",
		     (unsigned long long)st.snapshots_live, live_snaps());
	if (st.regions_live != live_regions())
		die(M_STATS, "regions_live %llu, model has %zu",
		     (unsigned long long)st.regions_live, live_regions());
	if (st.broken && !ever_broken_allowed)
		die(M_STATS, "broken = %llu, but no snapshot may break",
		     (unsigned long long)st.broken);
}

static void check_all(int opi, bool final)
{
	uint64_t x = mix(seed * 31 + (uint64_t)opi);
	unsigned touch_pct = final ? 100 : (unsigned)(mix(seed) % 3) * 40;
	int i;

	for (i = 0; i < MAXR; i++)
		if (R[i].live)
			check_region(i, &x, touch_pct);
	for (i = 0; i < MAXS; i++)
		if (S[i].live)
			check_snap(i, &x, touch_pct);
	check_stats();
}

/* ------------------------------------------------------------------------ */
/* Operations: each returns a description, or "skipped: why" */

#define DESC(...) snprintf(d, 200, __VA_ARGS__)

static void expect_ret(const char *call, int ret, int want)
{
	if (ret != want && sigbox)
		*sigbox = (uintptr_t)call; /* which call, for the shrinker */
	if (ret != want)
		die(M_ERROR, "%s returned %d (%s), expected %d (%s)", call,
		     ret, cowmm_strerror(ret), want, cowmm_strerror(want));
}

static size_t fill_setup(int ri, int opi, uint64_t rnd);

static void op_alloc(int opi, struct op *o, char *d)
{
	int ri = free_region_slot(), n = 0, i, ret;
	size_t npages = 16 + o->b % 33, len = npages * PG;
	struct mregion *m;
	unsigned char *p;

	for (i = 0; i < MAXR; i++)
		n += R[i].live && R[i].kind != K_CLONE;
	if (ri < 0 || n >= 3) {
		DESC("alloc (skipped: %d regions)", n);
		return;
	}
	m = &R[ri];
	region_init(m, npages);
	if (o->d % 2) {
		m->kind = K_ADOPT;
		p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			die(M_ERROR, "mmap: %m");
		madvise(p, len, MADV_NOHUGEPAGE);
		/* adopted memory keeps its content: fill some first */
		fill_setup(ri, opi, o->rnd);
		for (i = 0; i < (int)npages; i++)
			memcpy(p + i * PG, page_of(m->model, i), PG);
		ret = cowmm_region_adopt(mm, p, len, 0, &m->r);
		expect_ret("cowmm_region_adopt", ret, 0);
	} else {
		m->kind = K_ALLOC;
		ret = cowmm_region_alloc(mm, len, COWMM_REGION_NOTHP, &m->r);
		expect_ret("cowmm_region_alloc", ret, 0);
		p = cowmm_region_base(m->r);
		fill_setup(ri, opi, o->rnd);
		for (i = 0; i < (int)npages; i++)
			if (!is_zero(page_of(m->model, i), PG))
				memcpy(p + i * PG, page_of(m->model, i), PG);
	}
	for (i = 0; i < (int)npages; i++)
		m->addr[i] = p + i * PG;
	DESC("alloc R%d: %s, %zu pages", m->id, rkind_name[m->kind], npages);
}

/* Half of the pages get a first write. */
static size_t fill_setup(int ri, int opi, uint64_t rnd)
{
	struct mregion *m = &R[ri];
	uint64_t x = mix(rnd);
	size_t pg, n = 0;

	for (pg = 0; pg < m->npages; pg++)
		if (t_rand(&x) % 2) {
			make_page(page_of(m->model, pg), opi, m->id, pg, rnd);
			n++;
		}
	return n;
}

static bool writable_region(struct mregion *m)
{
	size_t pg;

	for (pg = 0; pg < m->npages; pg++)
		if (m->addr[pg] && !m->maylose[pg])
			return true;
	return false;
}

/* Distinct writable pages of region ri, up to @max. */
static size_t pick_pages(int ri, uint64_t *x, size_t *out, size_t max)
{
	struct mregion *m = &R[ri];
	size_t pg, n = 0, k;

	for (k = 0; k < 4 * max && n < max; k++) {
		size_t i;

		pg = t_rand(x) % m->npages;
		if (!m->addr[pg] || m->maylose[pg])
			continue;
		for (i = 0; i < n && out[i] != pg; i++)
			;
		if (i == n)
			out[n++] = pg;
	}
	return n;
}

struct wjob {
	unsigned char **dst;
	unsigned char **src;
	size_t n;
};

static void *wjob_main(void *arg)
{
	struct wjob *j = arg;
	size_t i;

	for (i = 0; i < j->n; i++)
		memcpy(j->dst[i], j->src[i], PG);
	return NULL;
}

static void pages_list(char *s, size_t len, const size_t *pgs, size_t n)
{
	size_t i;

	s[0] = 0;
	for (i = 0; i < n; i++)
		snprintf(s + strlen(s), len - strlen(s), "%s%zu", i ? "," : "",
			 pgs[i]);
}

static void op_write(int opi, struct op *o, char *d, bool mt)
{
	int ri = find_region(o->a, writable_region);
	unsigned nthreads = mt ? 1 + o->d % 4 : 1, t;
	size_t pgs[16], n, i;
	unsigned char *src[16], *dst[16];
	struct wjob jobs[4];
	pthread_t th[4];
	uint64_t x = mix(o->rnd);
	char pl[80];

	if (ri < 0) {
		DESC("%s (skipped: no region)", kind_name[o->kind]);
		return;
	}
	n = pick_pages(ri, &x, pgs, 1 + o->b % (mt ? 16 : 8));
	for (i = 0; i < n; i++) {
		unsigned char *mp = page_of(R[ri].model, pgs[i]);

		page_written(ri, pgs[i]);
		make_page(mp, opi, R[ri].id, pgs[i], o->rnd);
		src[i] = mp;
		dst[i] = R[ri].addr[pgs[i]];
	}
	if (nthreads > n)
		nthreads = n ? n : 1;
	for (t = 0; t < nthreads; t++) {
		size_t from = n * t / nthreads, to = n * (t + 1) / nthreads;

		jobs[t] = (struct wjob){ dst + from, src + from, to - from };
		if (nthreads == 1)
			wjob_main(&jobs[t]);
		else
			pthread_create(&th[t], NULL, wjob_main, &jobs[t]);
	}
	if (nthreads > 1)
		for (t = 0; t < nthreads; t++)
			pthread_join(th[t], NULL);
	pages_list(pl, sizeof(pl), pgs, n);
	DESC("%s R%d pages %s (%u thread%s)", kind_name[o->kind], R[ri].id,
	     pl, nthreads, nthreads > 1 ? "s" : "");
}

/*
 * Writes by system calls: pread() from a file, read() from a pipe.  In
 * #COWMM_OPEN_IN_THREAD mode the header says such a write into a page a
 * snapshot needs fails with EFAULT instead of waiting: there the page is
 * written once by the CPU and the call retried.
 */
static void op_syscall_write(int opi, struct op *o, char *d, bool pipe_)
{
	int ri = find_region(o->a, writable_region);
	size_t pgs[4], n, i;
	uint64_t x = mix(o->rnd);
	char pl[40];

	if (ri < 0) {
		DESC("%s (skipped: no region)", kind_name[o->kind]);
		return;
	}
	n = pick_pages(ri, &x, pgs, 1 + o->b % 4);
	for (i = 0; i < n; i++) {
		unsigned char *mp = page_of(R[ri].model, pgs[i]);
		unsigned char *dst = R[ri].addr[pgs[i]];
		int tries;
		ssize_t got = 0;

		page_written(ri, pgs[i]);
		make_page(mp, opi, R[ri].id, pgs[i], o->rnd);
		for (tries = 0; tries < 2; tries++) {
			if (pipe_) {
				if (mode.in_thread)
					*(volatile unsigned char *)dst = mp[0];
				if (write(pipefd[1], mp, PG) != (ssize_t)PG)
					die(M_ERROR, "write to pipe: %m");
				got = read(pipefd[0], dst, PG);
			} else {
				if (pwrite(memfd, mp, PG, 0) != (ssize_t)PG)
					die(M_ERROR, "pwrite: %m");
				got = pread(memfd, dst, PG, 0);
			}
			if (got < 0 && errno == EFAULT && mode.in_thread &&
			    !pipe_) {
				*(volatile unsigned char *)dst = mp[0];
				continue;
			}
			break;
		}
		if (got != (ssize_t)PG)
			die(M_ERROR, "%s into R%d page %zu: %zd (%m)",
			     pipe_ ? "read from a pipe" : "pread", R[ri].id,
			     pgs[i], got);
	}
	pages_list(pl, sizeof(pl), pgs, n);
	DESC("%s R%d pages %s", kind_name[o->kind], R[ri].id, pl);
}

/*
 * Discards meanwhile: for restore, release, snapshot and pin, half of the
 * time another thread discards (MADV_DONTNEED, again and again) pages of
 * another region while the call runs (issue 15 items 1, 2, 10: the
 * library's REMOVE handling racing its own copies).  Its effect on the
 * model is known in advance: those pages read zero.
 */
enum { RUN_NOPIN = 1, RUN_DISCARD = 2 };
/* COWMM_MODEL_LOG=1: the library's messages, for a failure's replay. */
static void print_log(enum cowmm_log_level level, const char *msg,
		      void *data)
{
	(void)data;
	printf("  library (%d): %s\n", (int)level, msg);
}

static size_t pick_run(struct mregion *m, struct op *o, size_t *pg,
		       int flags, size_t max);
static void model_dontneed(int ri, size_t pg);

static struct {
	pthread_t th;
	atomic_bool stop, started;
	unsigned char *addr;
	size_t len;
	bool on;
	char what[64];
} busy;
static int busy_exclude;

/*
 * Another thread moves part of a region once, at a moment picked by the
 * seed, while the main thread calls the library (a snapshot, clone or
 * restore): wherever the move lands, the call's result is exact and the
 * pages are followed to their new address.
 */
static struct {
	pthread_t th;
	atomic_bool go;
	unsigned char *from, *to;
	size_t len;
	unsigned delay_us;
	int err;
	/* Bit 16 of the variant: a third thread maps other memory where
	 * the pages were as soon as they left, as another thread's mmap()
	 * may, before mremap() returns (its event not read yet). */
	pthread_t ph;
	bool placeholder;
	/* Bit 32 with it: that memory is write-protected by a userfaultfd
	 * of its own, as another manager's region would be (the third
	 * outside review read its bytes through a snapshot). */
	bool protect;
	int uffd;
	atomic_bool stop;
	bool placed;
	/* Bit 64 without a placeholder, with COWMM_MODEL_DONTUNMAP=1:
	 * MREMAP_DONTUNMAP, the range left mapped, empty and registered (a
	 * snapshot ending a lazy load filled it instead of the pages: seed
	 * 396).  Off by default: hangs in snapshot, clone and in-thread
	 * writes, and a clone reading zeros, are open (seeds 668572444,
	 * 668573371, 668574254, 668576190 in session 15's model run). */
	bool dontunmap;
} mover;
static bool mover_dontunmap; /* COWMM_MODEL_DONTUNMAP */

/* Write-protect [@p, @p + @len) with the model's own userfaultfd. */
static void protect_placeholder(void *p, size_t len)
{
	struct uffdio_register reg = {
		.range = { (uintptr_t)p, len },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};
	struct uffdio_writeprotect wp = {
		.range = { (uintptr_t)p, len },
		.mode = UFFDIO_WRITEPROTECT_MODE_WP,
	};

	if (ioctl(mover.uffd, UFFDIO_REGISTER, &reg) ||
	    ioctl(mover.uffd, UFFDIO_WRITEPROTECT, &wp))
		die(M_ERROR, "protecting the placeholder: %m");
}

static void *placeholder_main(void *arg)
{
	unsigned char vec;
	void *p;

	(void)arg;
	while (!atomic_load(&mover.stop)) {
		if (!mincore(mover.from, PG, &vec) || errno != ENOMEM)
			continue;
		p = mmap(mover.from, mover.len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1,
			 0);
		if (p == mover.from) {
			memset(p, 0x5c, mover.len); /* not zeros */
			if (mover.protect)
				protect_placeholder(p, mover.len);
			mover.placed = true;
		} else if (p != MAP_FAILED) {
			munmap(p, mover.len); /* an older kernel: elsewhere */
		}
		break;
	}
	return NULL;
}

static void *mover_main(void *arg)
{
	long long t0;

	(void)arg;
	while (!atomic_load(&mover.go))
		;
	/* spin: a sleep this short would take as long as the call */
	for (t0 = now_ns(); now_ns() - t0 < mover.delay_us * 1000LL;)
		;
	if (mremap(mover.from, mover.len, mover.len,
		   MREMAP_MAYMOVE | MREMAP_FIXED |
			   (mover.dontunmap ? MREMAP_DONTUNMAP : 0),
		   mover.to) != mover.to)
		mover.err = errno;
	return NULL;
}

static unsigned char *reserve(size_t len);
static size_t in_one_vma(const unsigned char *a, size_t n);

/* Start the mover on pages of @ri (none pinned; not all of them). */
static size_t mover_start(struct op *o, int ri, size_t *first)
{
	struct mregion *m = &R[ri];
	size_t n, i, mapped = 0;

	if (m->npins)
		return 0;
	for (i = 0; i < m->npages; i++)
		mapped += !!m->addr[i];
	n = pick_run(m, o, first, 0, 8);
	if (n)
		n = in_one_vma(m->addr[*first], n);
	if (!n || n >= mapped)
		return 0;
	mover.from = m->addr[*first];
	mover.len = n * PG;
	mover.to = reserve(mover.len);
	mover.delay_us = (unsigned)(o->rnd % 150);
	mover.err = 0;
	atomic_store(&mover.go, false);
	if (pthread_create(&mover.th, NULL, mover_main, NULL))
		die(M_ERROR, "pthread_create: %m");
	mover.placeholder = o->d & 16;
	mover.protect = mover.placeholder && (o->d & 32);
	mover.dontunmap = mover_dontunmap && !mover.placeholder &&
			  (o->d & 64);
	if (mover.protect && mover.uffd <= 0) {
		struct uffdio_api api = { .api = UFFD_API };

		mover.uffd = (int)syscall(SYS_userfaultfd,
					  O_CLOEXEC | O_NONBLOCK);
		if (mover.uffd < 0 || ioctl(mover.uffd, UFFDIO_API, &api))
			die(M_ERROR, "the placeholder's userfaultfd: %m");
	}
	mover.placed = false;
	atomic_store(&mover.stop, false);
	if (mover.placeholder &&
	    pthread_create(&mover.ph, NULL, placeholder_main, NULL))
		die(M_ERROR, "pthread_create: %m");
	return n;
}

/*
 * What a call that may not return is about to do, for the report should
 * it fail or hang: the region's kind, its pages not yet filled and the
 * mover's pages.
 */
static void desc_pending(char *d, const char *call, const struct mregion *m,
			 size_t moved, size_t first)
{
	static const char *const kinds[] = { "allocated", "adopted", "clone",
					     "loaded" };
	size_t pg, lazy = 0;

	for (pg = 0; pg < m->npages; pg++)
		lazy += m->lazy[pg];
	if (moved)
		DESC("%s R%d (%s, %zu pages not filled, %s; did not finish; "
		     "pages %zu..%zu moving %u us in%s)", call, m->id,
		     kinds[m->kind], lazy, m->moved ? "in pieces" : "whole",
		     first, first + moved - 1, mover.delay_us,
		     mover.placeholder ? ", other memory where they were" :
					 "");
	else
		DESC("%s R%d (%s, %zu pages not filled, %s; did not finish)",
		     call, m->id, kinds[m->kind], lazy,
		     m->moved ? "in pieces" : "whole");
}

/* The mappings of /proc/self/maps that overlap [@a, @a + @len). */
static void print_maps(const unsigned char *a, size_t len)
{
	char line[512];
	FILE *f = fopen("/proc/self/maps", "re");
	unsigned long lo, hi;

	if (!f)
		return;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 &&
		    lo < (uintptr_t)a + len && hi > (uintptr_t)a)
			printf("  maps: %s", line);
	fclose(f);
}

/*
 * How many of @n pages from @a lie in the mapping that holds @a: mremap()
 * moves one mapping (two mappings side by side stay two when the kernel
 * cannot merge them, as after a move; it refuses to move both at once
 * with EFAULT).
 */
static size_t in_one_vma(const unsigned char *a, size_t n)
{
	char line[512];
	FILE *f = fopen("/proc/self/maps", "re");
	unsigned long lo, hi;
	size_t ret = n;

	if (!f)
		die(M_ERROR, "/proc/self/maps: %m");
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 &&
		    lo <= (uintptr_t)a && hi > (uintptr_t)a) {
			if ((hi - (uintptr_t)a) / PG < n)
				ret = (hi - (uintptr_t)a) / PG;
			break;
		}
	fclose(f);
	return ret;
}

/* What the mover did, for an operation's description. */
static const char *mover_what(size_t moved, size_t first)
{
	static char what[96];

	if (!moved)
		return "";
	snprintf(what, sizeof(what), " (pages %zu..%zu moved meanwhile, %u us "
		 "in%s)", first, first + moved - 1, mover.delay_us,
		 mover.dontunmap ? ", MREMAP_DONTUNMAP" : !mover.placed ? ""
		 : mover.protect ? ", protected memory mapped where they were"
				 : ", other memory mapped where they were");
	return what;
}

/* The mover's pages, wherever it is, are at their new address now. */
static void mover_join(int ri, size_t first, size_t n)
{
	size_t i;

	pthread_join(mover.th, NULL);
	if (mover.placeholder) {
		atomic_store(&mover.stop, true);
		pthread_join(mover.ph, NULL);
		if (mover.placed)
			munmap(mover.from, mover.len);
	}
	if (mover.dontunmap && !mover.err)
		munmap(mover.from, mover.len); /* the range it left */
	if (mover.err)
		print_maps(mover.from, mover.len);
	if (mover.err)
		die(M_ERROR, "mremap part (concurrent): %s",
		    strerror(mover.err));
	for (i = 0; i < n; i++)
		R[ri].addr[first + i] = mover.to + i * PG;
	R[ri].moved = true;
}

/*
 * A bounded number of discards, 20 µs apart: a race with the call, not a
 * stream of REMOVE events that could starve it.
 */
static void *busy_main(void *arg)
{
	int i = 0;

	(void)arg;
	do {
		madvise(busy.addr, busy.len, MADV_DONTNEED);
		atomic_store(&busy.started, true);
		usleep(20);
	} while (!atomic_load(&busy.stop) && ++i < 5000);
	return NULL;
}

static bool busy_target(struct mregion *m)
{
	return m != &R[busy_exclude];
}

static void busy_start(struct op *o, int exclude)
{
	size_t pg, n, i;
	int ri;

	busy.on = false;
	busy.what[0] = 0;
	if (!(o->d & 4))
		return;
	busy_exclude = exclude;
	ri = find_region(o->c, busy_target);
	if (ri < 0)
		return;
	n = pick_run(&R[ri], o, &pg, RUN_NOPIN | RUN_DISCARD, 2);
	if (!n)
		return;
	for (i = pg; i < pg + n; i++)
		model_dontneed(ri, i);
	busy.addr = R[ri].addr[pg];
	busy.len = n * PG;
	atomic_store(&busy.stop, false);
	atomic_store(&busy.started, false);
	pthread_create(&busy.th, NULL, busy_main, NULL);
	while (!atomic_load(&busy.started))
		usleep(50);
	busy.on = true;
	snprintf(busy.what, sizeof(busy.what),
		 " (R%d pages %zu..%zu discarded meanwhile)", R[ri].id, pg,
		 pg + n - 1);
}

static void busy_stop(void)
{
	if (!busy.on)
		return;
	atomic_store(&busy.stop, true);
	pthread_join(busy.th, NULL);
	busy.on = false;
}

static void op_snapshot(int opi, struct op *o, char *d)
{
	int ri = find_region(o->a, NULL), si = free_snap_slot(), ret;
	struct mregion *m;
	struct msnap *s;
	size_t pg, moved = 0, first = 0;

	(void)opi;
	if (ri < 0 || si < 0 || !budget_allows(R[ri].npages)) {
		DESC("snapshot (skipped: %s)", ri < 0 ? "no region" :
			si < 0 ? "no slot" : "bounded budget");
		return;
	}
	m = &R[ri];
	s = &S[si];
	memset(s, 0, sizeof(*s));
	busy_start(o, ri);
	if (o->d & 8)
		moved = mover_start(o, ri, &first);
	desc_pending(d, "snapshot", m, moved, first);
	atomic_store(&mover.go, true);
	ret = cowmm_snapshot(m->r, &s->s);
	if (moved)
		mover_join(ri, first, moved);
	busy_stop();
	expect_ret("cowmm_snapshot", ret, 0);
	s->live = true;
	s->id = next_sid++;
	s->region = ri;
	s->region_id = m->id;
	s->npages = m->npages;
	s->model = calloc(m->npages, PG);
	s->amb = calloc(m->npages, 1);
	s->shared = calloc(m->npages, 1);
	s->loose = calloc(m->npages, 1);
	s->unsure = calloc(m->npages, 1);
	s->vtouched = calloc(m->npages, 1);
	for (pg = 0; pg < m->npages; pg++) {
		if (!m->addr[pg])
			continue; /* unmapped: reads as zero */
		memcpy(page_of(s->model, pg), page_of(m->model, pg), PG);
		s->amb[pg] = m->amb[pg];
		s->shared[pg] = 1;
		/*
		 * A page freed with MADV_FREE and not written since may be
		 * dropped by the kernel at any time (reclaim, MADV_PAGEOUT)
		 * with no event to the library: "where the kernel makes
		 * preservation impossible, the affected snapshot is marked
		 * broken" (DESIGN.md), so it may break.  A page lost in a
		 * clone (maylose) likewise.
		 */
		if (m->maylose[pg] || m->amb[pg]) {
			s->may_break = true;
			ever_broken_allowed = true;
		}
	}
	DESC("snapshot R%d -> S%d%s%s", m->id, s->id, busy.what,
	     mover_what(moved, first));
}

static void op_snap_release(struct op *o, char *d)
{
	int si = find_snap(o->a, NULL);

	if (si < 0) {
		DESC("snap_release (skipped: no snapshot)");
		return;
	}
	DESC("snap_release S%d%s", S[si].id, S[si].view ? " (mapped)" : "");
	cowmm_snap_release(S[si].s);
	snap_free(&S[si]);
}

static bool is_clonable(struct mregion *m)
{
	(void)m;
	return true;
}

static void op_clone(struct op *o, char *d)
{
	int ri = find_region(o->a, is_clonable), ci = free_region_slot(), ret;
	struct mregion *m, *c;
	cowmm_region_t *cr;
	unsigned char *base;
	size_t pg, moved = 0, first = 0;

	if (ri < 0 || ci < 0) {
		DESC("clone (skipped: %s)", ri < 0 ? "no region" : "no slot");
		return;
	}
	m = &R[ri];
	if (!budget_allows(m->npages)) {
		DESC("clone R%d (skipped: bounded budget)", m->id);
		return;
	}
	if (o->d & 8)
		moved = mover_start(o, ri, &first);
	desc_pending(d, "clone", m, moved, first);
	atomic_store(&mover.go, true);
	ret = cowmm_clone(m->r, COWMM_REGION_NOTHP, &cr);
	if (moved)
		mover_join(ri, first, moved);
	if (mode.in_thread) {
		/* header, cowmm_clone(): -EOPNOTSUPP in-thread */
		expect_ret("cowmm_clone (in_thread)", ret, -EOPNOTSUPP);
		DESC("clone R%d: -EOPNOTSUPP (in_thread)", m->id);
		return;
	}
	expect_ret("cowmm_clone", ret, 0);
	c = &R[ci];
	region_init(c, m->npages);
	c->kind = K_CLONE;
	c->r = cr;
	c->origin = ri;
	base = cowmm_region_base(cr);
	for (pg = 0; pg < m->npages; pg++) {
		c->addr[pg] = base + pg * PG;
		c->lazy[pg] = 1;
		if (!m->addr[pg])
			continue; /* unmapped in the source: zero */
		memcpy(page_of(c->model, pg), page_of(m->model, pg), PG);
		c->amb[pg] = m->amb[pg];
		c->cshared[pg] = 1;
		c->maylose[pg] = m->maylose[pg];
	}
	DESC("clone R%d -> R%d%s", m->id, c->id,
	     mover_what(moved, first));
}

/*
 * After a release or the close: adopted memory stays mapped, with every
 * byte (header, cowmm_region_release(): "Adopted memory stays mapped,
 * writable and unprotected"; a lazy load still going on is finished
 * first: "release of an adopted region load[s] the rest first",
 * cowmm_region_load()).
 */
static void check_adopted_kept(const struct mregion *m, const char *when)
{
	char name[64];
	size_t pg;

	if (m->kind != K_ADOPT)
		return;
	snprintf(name, sizeof(name), "R%d (adopted, after %s)", m->id, when);
	for (pg = 0; pg < m->npages; pg++) {
		const unsigned char *want = page_of(m->model, pg);
		const unsigned char *got = m->addr[pg];

		if (got && memcmp(got, want, PG) &&
		    !(m->amb[pg] && is_zero(got, PG)))
			diverge(name, pg, want, got, m->amb[pg]);
	}
}

static void unmap_owned(struct mregion *m)
{
	size_t pg;

	/* Adopted memory stays mapped after release: ours to unmap.
	 * Memory from the library (alloc, clone) it unmaps itself, pieces
	 * moved apart by a partial mremap too (the region followed them). */
	if (m->kind != K_ADOPT)
		return;
	for (pg = 0; pg < m->npages; pg++)
		if (m->addr[pg])
			munmap(m->addr[pg], PG);
}

/* Pages of @m not touched yet: a clone's or a lazy load's. */
static size_t untouched_pages(const struct mregion *m)
{
	size_t pg, n = 0;

	for (pg = 0; pg < m->npages; pg++)
		n += m->lazy[pg] != 0;
	return n;
}

static void op_release(struct op *o, char *d)
{
	int ri = find_region(o->a, NULL), ret, i;
	size_t moved = 0, first = 0;
	struct mregion *m;

	if (ri < 0) {
		DESC("release (skipped: no region)");
		return;
	}
	m = &R[ri];
	busy_start(o, ri);
	/*
	 * Pages of adopted memory, which stays the application's, moving
	 * while it runs (the twenty-first outside review's relmin got zeros
	 * in snapshots this way: exact/release-move-unread-*).  Memory of
	 * the library's own the release unmaps: moving it meanwhile is the
	 * application's race.
	 */
	if ((o->d & 8) && m->kind == K_ADOPT)
		moved = mover_start(o, ri, &first);
	desc_pending(d, "release", m, moved, first);
	atomic_store(&mover.go, true);
	ret = cowmm_region_release(m->r);
	if (moved)
		mover_join(ri, first, moved);
	busy_stop();
	/* header: -EAGAIN, loading lazily while its pages kept moving:
	 * "nothing released; call again" (the mover has stopped now) */
	if (ret == -EAGAIN && moved && untouched_pages(m))
		ret = cowmm_region_release(m->r);
	if (m->npins) {
		/* header: "A region with pins is refused and left
		 * unchanged" (-EBUSY); the next check sees it unchanged. */
		expect_ret("cowmm_region_release (pinned)", ret, -EBUSY);
		DESC("release R%d: -EBUSY (%d pins)%s", m->id, m->npins,
		     busy.what);
		return;
	}
	/* header: -ENOMEM: released, and that snapshot is marked broken */
	if (ret != -ENOMEM)
		expect_ret("cowmm_region_release", ret, 0);
	for (i = 0; i < MAXS; i++)
		if (S[i].live && S[i].region == ri) {
			S[i].region = -1;
			if (ret == -ENOMEM) {
				S[i].may_break = true;
				ever_broken_allowed = true;
			}
		}
	for (i = 0; i < MAXR; i++)
		if (R[i].live && R[i].origin == ri) {
			/* header, cowmm_clone(): released first, the source
			 * preserves what the clone has not yet read */
			R[i].origin = -1;
			memset(R[i].cshared, 0, R[i].npages);
		}
	DESC("release R%d (%s)%s%s%s", m->id, rkind_name[m->kind],
	     ret ? " -ENOMEM" : "", busy.what, mover_what(moved, first));
	check_adopted_kept(m, "its release");
	unmap_owned(m);
	region_free(m);
}

/*
 * Restore from snapshot @si writes page @pg of region @ri, but an eager
 * load may have left the page alone while @si shared it (load_written()):
 * then the library takes the page for unchanged since @si and leaves it
 * alone again, and the snapshots and clones that share it now keep
 * sharing it: a later discard may break the snapshots and take the page
 * from the clones (SIGBUS).
 */
static void restore_unsure(int ri, int si, size_t pg)
{
	int i;

	for (i = 0; i < MAXS; i++)
		if (i != si && S[i].live && S[i].region == ri &&
		    S[i].shared[pg]) {
			S[i].may_break = true;
			ever_broken_allowed = true;
		}
	written_clones_unsure(ri, pg);
}

static void op_restore(struct op *o, char *d)
{
	int si = find_snap(o->a, NULL), ret, ri;
	struct msnap *s;
	struct mregion *m;
	size_t pg, moved = 0, first = 0;

	if (si < 0) {
		DESC("restore (skipped: no snapshot)");
		return;
	}
	s = &S[si];
	ri = s->region;
	busy_start(o, ri < 0 ? MAXR : ri);
	if (ri >= 0 && (o->d & 8))
		moved = mover_start(o, ri, &first);
	if (ri >= 0)
		desc_pending(d, "restore into", &R[ri], moved, first);
	atomic_store(&mover.go, true);
	ret = cowmm_snap_restore(s->s);
	if (moved)
		mover_join(ri, first, moved);
	busy_stop();
	if (ri < 0) {
		expect_ret("cowmm_snap_restore (region released)", ret,
			   -ENOENT);
		DESC("restore S%d: -ENOENT (region released)", s->id);
		return;
	}
	if (ret == -EIO && s->may_break) {
		DESC("restore S%d: -EIO (may be broken)", s->id);
		return;
	}
	expect_ret("cowmm_snap_restore", ret, 0);
	m = &R[ri];
	for (pg = 0; pg < s->npages; pg++) {
		if (!m->addr[pg] || (s->shared[pg] && !s->loose[pg]))
			continue;
		if (s->unsure[pg])
			restore_unsure(ri, si, pg);
		else
			page_written(ri, pg);
		memcpy(page_of(m->model, pg), page_of(s->model, pg), PG);
		m->amb[pg] = s->amb[pg];
		m->maylose[pg] = 0;
	}
	DESC("restore S%d into R%d%s%s", s->id, m->id, busy.what,
	     mover_what(moved, first));
}

static void op_map(struct op *o, char *d)
{
	int si = find_snap(o->a, NULL), ret;
	const void *v = NULL;
	struct msnap *s;

	if (si < 0) {
		DESC("map (skipped: no snapshot)");
		return;
	}
	s = &S[si];
	if (!s->view && !budget_allows(s->npages)) {
		DESC("map S%d (skipped: bounded budget)", s->id);
		return;
	}
	ret = cowmm_snap_map(s->s, &v);
	if (ret == -EIO && s->may_break) {
		DESC("map S%d: -EIO (may be broken)", s->id);
		return;
	}
	if (mode.in_thread) {
		expect_ret("cowmm_snap_map (in_thread)", ret, -EOPNOTSUPP);
		DESC("map S%d: -EOPNOTSUPP (in_thread)", s->id);
		return;
	}
	expect_ret("cowmm_snap_map", ret, 0);
	/* header: "Mapping twice returns the same view" */
	if (s->view && v != s->view)
		die(M_ERROR, "cowmm_snap_map of S%d twice: %p, then %p",
		     s->id, (void *)s->view, v);
	DESC("map S%d%s", s->id, s->view ? " (again)" : "");
	s->view = v;
}

/*
 * The application discards pages of a view.  Per issue 15 item 12 a
 * discarded view page must not read other bytes than cowmm_snap_read():
 * the model expects the snapshot's bytes there.
 */
static void op_view_discard(struct op *o, char *d)
{
	int si = find_snap(o->a, NULL);
	struct msnap *s;
	size_t pg, n;

	if (si < 0 || !S[si].view) {
		DESC("view_discard (skipped: no view)");
		return;
	}
	s = &S[si];
	pg = o->b % s->npages;
	n = 1 + o->c % (s->npages - pg);
	if (madvise((void *)(s->view + pg * PG), n * PG, MADV_DONTNEED))
		die(M_ERROR, "madvise(view, DONTNEED): %m");
	memset(s->vtouched + pg, 0, n);
	DESC("view_discard S%d pages %zu..%zu", s->id, pg, pg + n - 1);
}

static bool pinnable(struct mregion *m)
{
	return !m->holes && m->npins < MAXPINS;
}

static void op_pin(struct op *o, char *d)
{
	int ri = find_region(o->a, pinnable), ret;
	static const unsigned fl[] = { COWMM_PIN_READ, COWMM_PIN_WRITE,
				       COWMM_PIN_READ | COWMM_PIN_WRITE };
	struct mregion *m;
	struct pin p;

	if (ri < 0) {
		DESC("pin (skipped: no region without holes)");
		return;
	}
	m = &R[ri];
	p.pg = o->b % m->npages;
	p.n = 1 + o->c % (m->npages - p.pg < 4 ? m->npages - p.pg : 4);
	p.flags = fl[o->d % 3];
	for (size_t i = p.pg; i < p.pg + p.n; i++)
		if (m->maylose[i]) {
			DESC("pin R%d (skipped: lost page)", m->id);
			return;
		}
	for (size_t i = 1; i < p.n; i++)
		if (m->addr[p.pg + i] != m->addr[p.pg] + i * PG) {
			/* NEWS: a pin lies within one piece of a region
			 * part of which mremap moved. */
			ret = cowmm_pin(m->r, m->addr[p.pg], p.n * PG,
					p.flags);
			expect_ret("cowmm_pin across pieces", ret, -EINVAL);
			DESC("pin R%d pages %zu..%zu: -EINVAL (across pieces)",
			     m->id, p.pg, p.pg + p.n - 1);
			return;
		}
	busy_start(o, ri);
	ret = cowmm_pin(m->r, m->addr[p.pg], p.n * PG, p.flags);
	busy_stop();
	expect_ret("cowmm_pin", ret, 0);
	m->pins[m->npins++] = p;
	DESC("pin R%d pages %zu..%zu %s%s", m->id, p.pg, p.pg + p.n - 1,
	     p.flags == COWMM_PIN_READ	 ? "READ" :
	     p.flags == COWMM_PIN_WRITE ? "WRITE" : "READ|WRITE", busy.what);
}

static bool has_pins(struct mregion *m)
{
	return m->npins > 0;
}

static void op_unpin(struct op *o, char *d)
{
	int ri = find_region(o->a, has_pins), ret, k;
	struct mregion *m;
	struct pin p;

	if (ri < 0) {
		DESC("unpin (skipped: no pin)");
		return;
	}
	m = &R[ri];
	k = (int)(o->b % (unsigned)m->npins);
	p = m->pins[k];
	ret = cowmm_unpin(m->r, m->addr[p.pg], p.n * PG);
	expect_ret("cowmm_unpin", ret, 0);
	m->pins[k] = m->pins[--m->npins];
	DESC("unpin R%d pages %zu..%zu", m->id, p.pg, p.pg + p.n - 1);
}

/*
 * A range of pages of region m, contiguous in memory, starting at a
 * mapped page: [*pg, *pg + n).  With @nopin, pinned pages end it.
 */
/* May page pg of m be discarded or unmapped, given COWMM_MODEL_SKIP? */
static bool discard_ok(struct mregion *m, size_t pg)
{
	int c;

	if (skip_untouched && m->lazy[pg])
		return false;
	if (skip_origin)
		for (c = 0; c < MAXR; c++)
			if (R[c].live && R[c].origin == m - R &&
			    pg < R[c].npages && R[c].cshared[pg])
				return false;
	return true;
}

static bool run_ok(struct mregion *m, size_t pg, int flags)
{
	return m->addr[pg] && !((flags & RUN_NOPIN) && pinned(m, pg)) &&
	       !((flags & RUN_DISCARD) && !discard_ok(m, pg));
}

static size_t pick_run(struct mregion *m, struct op *o, size_t *pg,
		       int flags, size_t max)
{
	size_t start = o->b % m->npages, want = 1 + o->c % max, n;

	while (start < m->npages && !run_ok(m, start, flags))
		start++;
	if (start == m->npages)
		return 0;
	for (n = 1; n < want && start + n < m->npages; n++)
		if (m->addr[start + n] != m->addr[start] + n * PG ||
		    !run_ok(m, start + n, flags))
			break;
	*pg = start;
	return n;
}

static void model_dontneed(int ri, size_t pg)
{
	struct mregion *m = &R[ri];

	/* DESIGN.md: "A discarded range stays managed and reads as zero"
	 * (also a clone's untouched page, issue 15 item 3; a lazy load's) */
	page_discarded(ri, pg);
	memset(page_of(m->model, pg), 0, PG);
	m->amb[pg] = 0;
	m->maylose[pg] = 0;
	m->cshared[pg] = 0;
	m->lazy[pg] = 0;
}

static void op_discard(struct op *o, char *d, int advice)
{
	int ri = find_region(o->a, NULL);
	const char *name = advice == MADV_DONTNEED ? "dontneed" : "free";
	struct mregion *m;
	size_t pg, n, i;

	if (ri < 0) {
		DESC("%s (skipped: no region)", name);
		return;
	}
	m = &R[ri];
	n = pick_run(m, o, &pg, RUN_NOPIN | RUN_DISCARD, m->npages);
	if (!n) {
		DESC("%s R%d (skipped: no unpinned page)", name, m->id);
		return;
	}
	if (madvise(m->addr[pg], n * PG, advice))
		die(M_ERROR, "madvise(%s): %m", name);
	for (i = pg; i < pg + n; i++) {
		if (advice == MADV_DONTNEED) {
			model_dontneed(ri, i);
		} else {
			page_discarded(ri, i);
			/* MADV_FREE: the kernel may free the page lazily,
			 * until the next write: old bytes or zeros. */
			m->amb[i] = 1;
		}
	}
	DESC("%s R%d pages %zu..%zu", name, m->id, pg, pg + n - 1);
}

/*
 * Another thread discards (MADV_DONTNEED) the pages the main thread is
 * writing whole, at a moment the seed picks: each page ends as zeros up to
 * where the discard landed and the written bytes from there (stores made
 * before it went with the page), and nothing else.  The snapshots that
 * shared a page read its old bytes, or -EIO where the discard came first
 * (never zeros: the copy a write makes for them may race the zap), and
 * the clones that read it from here may lose it.
 */
static struct {
	pthread_t th;
	atomic_bool go;
	unsigned char *addr;
	size_t len;
	unsigned delay_us;
	int err;
} zapper;

static void *zapper_main(void *arg)
{
	long long t0;

	(void)arg;
	while (!atomic_load(&zapper.go))
		;
	for (t0 = now_ns(); now_ns() - t0 < zapper.delay_us * 1000LL;)
		;
	if (madvise(zapper.addr, zapper.len, MADV_DONTNEED))
		zapper.err = errno;
	return NULL;
}

static bool region_unpinned_live(struct msnap *s)
{
	return s->region >= 0 && !R[s->region].npins;
}

/*
 * Read a snapshot, every page twice, while the mover moves pages of its
 * region (and with bit 16, other memory takes their place; with bit 32 as
 * well, that memory is write-protected by another userfaultfd): each read
 * gives the snapshot's bytes, or -EIO where it may break.
 */
static void op_read_moving(struct op *o, char *d)
{
	int si = find_snap(o->a, region_unpinned_live), ri;
	unsigned char buf[PG];
	char name[48];
	size_t pg, moved, first = 0;
	struct msnap *s;
	long long t0;
	int pass;
	ssize_t n;

	if (si < 0) {
		DESC("read_moving (skipped: no snapshot of a region without "
		     "pins)");
		return;
	}
	s = &S[si];
	ri = s->region;
	moved = mover_start(o, ri, &first);
	snprintf(name, sizeof(name), "S%d (of R%d, read while moving)", s->id,
		 s->region_id);
	DESC("read_moving S%d (did not finish)", s->id);
	atomic_store(&mover.go, true);
	for (pass = 0; pass < 2; pass++)
		for (pg = 0; pg < s->npages; pg++) {
			const unsigned char *want = page_of(s->model, pg);

			t0 = now_ns();
			n = cowmm_snap_read(s->s, pg * PG, buf, PG);
			if (n == -EIO && s->may_break)
				break;
			if (n != (ssize_t)PG)
				die(M_ERROR, "%s: cowmm_snap_read page %zu: "
					      "%zd (%s) after %lld ms%s",
				     name, pg, n,
				     n < 0 ? cowmm_strerror((int)n) : "",
				     (now_ns() - t0) / 1000000,
				     s->may_break ? "" : " (may not break)");
			if (memcmp(buf, want, PG) &&
			    !(s->amb[pg] && is_zero(buf, PG)))
				diverge(name, pg, want, buf, s->amb[pg]);
		}
	if (moved)
		mover_join(ri, first, moved);
	DESC("read_moving S%d of R%d%s", s->id, s->region_id,
	     mover_what(moved, first));
}

static void op_write_discard(int opi, struct op *o, char *d)
{
	int ri = find_region(o->a, writable_region);
	unsigned char want[4][PG], buf[PG];
	struct mregion *m;
	size_t pg, n, i, j, k, zeroed = 0;

	if (ri < 0) {
		DESC("write_discard (skipped: no region)");
		return;
	}
	m = &R[ri];
	n = pick_run(m, o, &pg, RUN_NOPIN | RUN_DISCARD, 4);
	for (i = 0; i < n; i++)
		if (m->maylose[pg + i])
			n = i; /* its write could raise SIGBUS */
	if (!n) {
		DESC("write_discard R%d (skipped: no page)", m->id);
		return;
	}
	for (i = 0; i < n; i++)
		make_page(want[i], opi, m->id, pg + i, o->rnd);
	zapper.addr = m->addr[pg];
	zapper.len = n * PG;
	zapper.delay_us = (unsigned)(o->rnd % 12);
	zapper.err = 0;
	atomic_store(&zapper.go, false);
	if (pthread_create(&zapper.th, NULL, zapper_main, NULL))
		die(M_ERROR, "pthread_create: %m");
	DESC("write_discard R%d pages %zu..%zu (did not finish; %u us in)",
	     m->id, pg, pg + n - 1, zapper.delay_us);
	atomic_store(&zapper.go, true);
	/* In order, 8 bytes at a time: memcpy() may store the end first. */
	for (i = 0; i < n; i++)
		for (j = 0; j < PG; j += 8) {
			uint64_t v;

			memcpy(&v, want[i] + j, 8);
			*(volatile uint64_t *)(m->addr[pg + i] + j) = v;
		}
	pthread_join(zapper.th, NULL);
	if (zapper.err)
		die(M_ERROR, "madvise(MADV_DONTNEED) racing writes: %s",
		    strerror(zapper.err));
	for (i = 0; i < n; i++) {
		read_page(m, pg + i, buf, "write_discard");
		for (k = 0; k < PG && !buf[k]; k++)
			;
		if (k < PG && memcmp(buf + k, want[i] + k, PG - k))
			die(M_BYTES, "R%d page %zu, written while discarded: "
			    "neither zeros nor what was written from byte "
			    "%zu on", m->id, pg + i, k);
		model_dontneed(ri, pg + i);
		if (k < PG) {
			page_written(ri, pg + i);
			memcpy(page_of(m->model, pg + i), buf, PG);
		} else {
			zeroed++;
		}
	}
	DESC("write_discard R%d pages %zu..%zu (%u us in; %zu zero after)",
	     m->id, pg, pg + n - 1, zapper.delay_us, zeroed);
}

static void op_pageout(struct op *o, char *d)
{
	int ri = find_region(o->a, NULL);
	unsigned char vec[64];
	struct mregion *m;
	size_t pg, n, i, out = 0;

	if (ri < 0) {
		DESC("pageout (skipped: no region)");
		return;
	}
	m = &R[ri];
	n = pick_run(m, o, &pg, 0, m->npages);
	if (!n) {
		DESC("pageout R%d (skipped: nothing mapped)", m->id);
		return;
	}
	/* Advice only: EINVAL on kernels without it is fine. */
	madvise(m->addr[pg], n * PG, MADV_PAGEOUT);
	/*
	 * How many went out (with swap; without, anonymous pages stay,
	 * but a page MADV_FREE left is dropped: its bytes are gone, and a
	 * clone that still needed them from it may read SIGBUS).
	 */
	if (mincore(m->addr[pg], n * PG, vec) == 0)
		for (i = 0; i < n; i++) {
			out += !(vec[i] & 1);
			if (!(vec[i] & 1) && m->amb[pg + i])
				lose(ri, pg + i);
		}
	DESC("pageout R%d pages %zu..%zu (%zu not resident after)", m->id,
	     pg, pg + n - 1, out);
}

static bool unmappable(struct mregion *m)
{
	return !m->npins;
}

static void op_munmap(struct op *o, char *d)
{
	int ri = find_region(o->a, unmappable);
	struct mregion *m;
	size_t pg, n, i, mapped = 0;

	if (ri < 0) {
		DESC("munmap (skipped: no region without pins)");
		return;
	}
	m = &R[ri];
	for (i = 0; i < m->npages; i++)
		mapped += !!m->addr[i];
	n = pick_run(m, o, &pg, RUN_DISCARD, 8);
	if (!n || n >= mapped) {
		DESC("munmap R%d (skipped: would unmap all)", m->id);
		return;
	}
	if (munmap(m->addr[pg], n * PG))
		die(M_ERROR, "munmap: %m");
	/* DESIGN.md: "an unmapped range leaves the region" */
	for (i = pg; i < pg + n; i++) {
		page_discarded(ri, i);
		m->addr[i] = NULL;
		m->maylose[i] = 0;
	}
	m->holes = true;
	DESC("munmap R%d pages %zu..%zu", m->id, pg, pg + n - 1);
}

static bool whole(struct mregion *m)
{
	return !m->holes && !m->moved && !m->npins;
}

/* A fresh address, reserved: mremap(MREMAP_FIXED) replaces it. */
static unsigned char *reserve(size_t len)
{
	void *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
		       0);

	if (p == MAP_FAILED)
		die(M_ERROR, "mmap reserve: %m");
	return p;
}

static void op_mremap(struct op *o, char *d)
{
	int ri = find_region(o->a, whole);
	struct mregion *m;
	unsigned char *to, *q;
	size_t len, pg;
	long long t0;

	if (ri < 0) {
		DESC("mremap (skipped: no whole region without pins)");
		return;
	}
	m = &R[ri];
	len = m->npages * PG;
	to = reserve(len);
	q = mremap(m->addr[0], len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
	if (q != to)
		die(M_ERROR, "mremap: %m");
	for (pg = 0; pg < m->npages; pg++)
		m->addr[pg] = to + pg * PG;
	/* DESIGN.md: "a moved range is followed to its new address"; the
	 * REMAP event is handled asynchronously: wait up to 2 s for it. */
	for (t0 = now_ns(); cowmm_region_base(m->r) != (void *)to;) {
		if (now_ns() - t0 > 2000000000LL)
			die(M_ERROR, "R%d moved to %p: cowmm_region_base "
				      "still %p after 2 s", m->id, (void *)to,
			     cowmm_region_base(m->r));
		usleep(1000);
	}
	DESC("mremap R%d whole to a new address", m->id);
}

static bool unpinned(struct mregion *m)
{
	return !m->npins;
}

/*
 * Memory adopted where a MREMAP_DONTUNMAP move left its old range mapped
 * (empty, and still registered with the manager's userfaultfd): a region
 * of its own, from its own content.
 */
static bool adopt_left(int opi, struct op *o, unsigned char *at, size_t n)
{
	int ri = free_region_slot(), live = 0, i, ret;
	struct mregion *m;

	for (i = 0; i < MAXR; i++)
		live += R[i].live && R[i].kind != K_CLONE;
	if (ri < 0 || live >= 3)
		return false;
	m = &R[ri];
	region_init(m, n);
	m->kind = K_ADOPT;
	fill_setup(ri, opi, o->rnd);
	for (i = 0; i < (int)n; i++)
		memcpy(at + i * PG, page_of(m->model, i), PG);
	ret = cowmm_region_adopt(mm, at, n * PG, 0, &m->r);
	expect_ret("cowmm_region_adopt (where a move left)", ret, 0);
	for (i = 0; i < (int)n; i++)
		m->addr[i] = at + i * PG;
	return true;
}

/*
 * A run of @n pages of another region than @m, without pins, mapped in
 * one piece, that it may lose as to munmap() (not all it has): its slot
 * and first page in *@xi and *@xpg.
 */
static bool onto_target(struct op *o, struct mregion *m, size_t n, int *xi,
			size_t *xpg)
{
	int k, c;
	size_t st, j, i, mapped;

	for (k = 0; k < MAXR; k++) {
		struct mregion *x = &R[(o->a + 1 + k) % MAXR];

		if (!x->live || x == m || !unmappable(x) || x->npages <= n)
			continue;
		for (i = 0, mapped = 0; i < x->npages; i++)
			mapped += !!x->addr[i];
		if (mapped <= n)
			continue;
		for (j = 0; j + n <= x->npages; j++) {
			st = (o->c + j) % (x->npages - n + 1);
			for (i = 0; i < n; i++)
				if (!run_ok(x, st + i, RUN_DISCARD) ||
				    x->addr[st + i] != x->addr[st] + i * PG)
					break;
			if (i == n && in_one_vma(x->addr[st], n) == n) {
				c = (int)(x - R);
				*xi = c;
				*xpg = st;
				return true;
			}
		}
	}
	return false;
}

/*
 * Move part of a region.  One in four with MREMAP_DONTUNMAP, which leaves
 * the old range mapped, empty and registered, and sends no UNMAP: then
 * the range is left so, or unmapped, or adopted as a new region (the
 * thirteenth session's outside review: its unmap was taken for the
 * move's own).  One in three of the others onto another region's pages,
 * which that region loses as to munmap() (the sixteenth review's dlmin F:
 * a move onto a clone's discarded page hung the manager).
 */
static void op_mremap_part(int opi, struct op *o, char *d)
{
	static const char *const left[] = { "left mapped", "unmapped after",
					    "adopted as R%d" };
	int ri = find_region(o->a, unpinned);
	bool dontunmap = o->d % 4 == 3;
	unsigned what = (o->d / 4) % 3;
	struct mregion *m;
	unsigned char *to, *q, *from;
	size_t pg, n, i, mapped = 0, xpg = 0;
	char how[48] = "";
	int xi = -1;

	if (ri < 0) {
		DESC("mremap_part (skipped: no region without pins)");
		return;
	}
	m = &R[ri];
	for (i = 0; i < m->npages; i++)
		mapped += !!m->addr[i];
	n = pick_run(m, o, &pg, 0, 8);
	if (n)
		n = in_one_vma(m->addr[pg], n);
	if (!n || n >= mapped) {
		DESC("mremap_part R%d (skipped: would move all)", m->id);
		return;
	}
	if (!dontunmap && what == 1 && onto_target(o, m, n, &xi, &xpg)) {
		struct mregion *x = &R[xi];

		to = x->addr[xpg];
		/* DESIGN.md: "an unmapped range leaves the region" */
		for (i = xpg; i < xpg + n; i++) {
			page_discarded(xi, i);
			x->addr[i] = NULL;
			x->maylose[i] = 0;
		}
		x->holes = true;
		snprintf(how, sizeof(how), "onto R%d pages %zu..%zu", x->id,
			 xpg, xpg + n - 1);
	} else {
		to = reserve(n * PG);
	}
	from = m->addr[pg];
	q = mremap(from, n * PG, n * PG,
		   MREMAP_MAYMOVE | MREMAP_FIXED |
			   (dontunmap ? MREMAP_DONTUNMAP : 0),
		   to);
	if (q != to)
		die(M_ERROR, "mremap part%s: %m",
		    dontunmap ? " (MREMAP_DONTUNMAP)" : "");
	/* DESIGN.md: "a moved range is followed to its new address" */
	for (i = 0; i < n; i++)
		m->addr[pg + i] = to + i * PG;
	m->moved = true;
	if (dontunmap && what == 1 && munmap(from, n * PG))
		die(M_ERROR, "munmap where a move left: %m");
	if (dontunmap && what == 2 && !adopt_left(opi, o, from, n))
		what = 0; /* no slot: left mapped */
	if (dontunmap)
		snprintf(how, sizeof(how), left[what],
			 what == 2 ? next_rid - 1 : 0);
	DESC("mremap_part R%d pages %zu..%zu %s%s%s%s", m->id, pg, pg + n - 1,
	     xi >= 0 ? "" : "to a new address",
	     dontunmap ? " (MREMAP_DONTUNMAP, old range " : "", how,
	     dontunmap ? ")" : "");
}

/*
 * A discard, and a move right after it, while the discard's event may
 * still be handled: part of a region moved away or onto another region's
 * pages.  Checked once both are done.  The sixteenth review's dlmin (a
 * clone's pages discarded, then the origin's page moved onto them, or the
 * clone's page moved away and then the origin's) hung the manager in
 * every run; the model's discards and moves, checked one by one, never
 * overlapped.
 */
/* Move pages @pg.. @pg + @n - 1 of R[@ri], mapped in one piece, to @to. */
static void move_run(int ri, size_t pg, size_t n, unsigned char *to)
{
	struct mregion *m = &R[ri];
	size_t i;

	if (mremap(m->addr[pg], n * PG, n * PG, MREMAP_MAYMOVE | MREMAP_FIXED,
		   to) != to)
		die(M_ERROR, "mremap R%d pages %zu..%zu: %m", m->id, pg,
		    pg + n - 1);
	/* DESIGN.md: "a moved range is followed to its new address" */
	for (i = 0; i < n; i++)
		m->addr[pg + i] = to + i * PG;
	m->moved = true;
}

static size_t mapped_pages(const struct mregion *m)
{
	size_t i, n = 0;

	for (i = 0; i < m->npages; i++)
		n += !!m->addr[i];
	return n;
}

/* A clone without pins whose origin is live, has no pins, and may move. */
static bool clone_of_live(struct mregion *m)
{
	return m->kind == K_CLONE && !m->npins && m->origin >= 0 &&
	       R[m->origin].live && !R[m->origin].npins;
}

/*
 * The review's two patterns on a clone: its pages discarded, then its
 * origin's pages moved onto them, or the clone's pages moved away and
 * then the origin's.  Returns false where no clone fits.
 */
static bool discard_clone_move(struct op *o, char *d)
{
	int ci = find_region(o->a, clone_of_live), oi;
	bool onto = o->d / 2 % 2;
	struct mregion *c, *m;
	size_t pg, n, s = 0, i, j;

	if (ci < 0)
		return false;
	c = &R[ci];
	oi = c->origin;
	m = &R[oi];
	n = pick_run(c, o, &pg, RUN_NOPIN | RUN_DISCARD, 4);
	if (n)
		n = in_one_vma(c->addr[pg], n);
	if (!n || n >= mapped_pages(c) || n >= mapped_pages(m))
		return false;
	for (j = 0; j + n <= m->npages; j++) {
		s = (pg + j) % (m->npages - n + 1);
		for (i = 0; i < n; i++)
			if (!m->addr[s + i] ||
			    m->addr[s + i] != m->addr[s] + i * PG)
				break;
		if (i == n && in_one_vma(m->addr[s], n) == n)
			break;
	}
	if (j + n > m->npages)
		return false;
	if (madvise(c->addr[pg], n * PG, MADV_DONTNEED))
		die(M_ERROR, "madvise(dontneed): %m");
	for (i = pg; i < pg + n; i++)
		model_dontneed(ci, i);
	if (onto) {
		unsigned char *to = c->addr[pg];

		/* DESIGN.md: "an unmapped range leaves the region" */
		for (i = pg; i < pg + n; i++) {
			page_discarded(ci, i);
			c->addr[i] = NULL;
			c->maylose[i] = 0;
		}
		c->holes = true;
		move_run(oi, s, n, to);
	} else {
		move_run(ci, pg, n, reserve(n * PG));
		move_run(oi, s, n, reserve(n * PG));
	}
	DESC("dontneed R%d (a clone of R%d) pages %zu..%zu, then %s", c->id,
	     m->id, pg, pg + n - 1,
	     onto ? "the origin's pages moved onto them" : "both moved away");
	if (onto)
		snprintf(d + strlen(d), 200 - strlen(d), " (R%d pages %zu..)",
			 m->id, s);
	return true;
}

/*
 * A discard, and a move right after it, while the discard's event may
 * still be handled: part of a region moved away or onto another region's
 * pages.  Checked once both are done.  The sixteenth review's dlmin (a
 * clone's pages discarded, then the origin's page moved onto them, or the
 * clone's page moved away and then the origin's) hung the manager in
 * every run; the model's discards and moves, checked one by one, never
 * overlapped.  Half of them that pattern, where a clone allows it.
 */
static void op_discard_move(int opi, struct op *o, char *d)
{
	struct op mv = *o;
	char d1[200], d2[200];

	if (o->d % 2 && discard_clone_move(o, d))
		return;
	mv.a = o->a / 7 + o->d;
	mv.b = o->d;
	mv.c = o->b;
	mv.d = o->c;
	op_discard(o, d1, MADV_DONTNEED);
	op_mremap_part(opi, &mv, d2);
	DESC("%.90s, then %.100s", d1, d2);
}

static bool loadable_target(struct mregion *m)
{
	size_t pg;

	if (m->holes)
		return false;
	for (pg = 0; pg < m->npages; pg++)
		if (m->maylose[pg])
			return false;
	return true;
}

/*
 * Stream a snapshot to a file (cowmm_snap_write, cowmm_snap_stream plain
 * or with COWMM_STREAM_RELEASE), then load it: eagerly into a fresh
 * region or an existing one of the same size, or lazily into a fresh one.
 */
static void op_stream(int opi, struct op *o, char *d)
{
	static const char *const how[] = { "write", "stream", "stream_release" };
	static const char *const load[] = { "eager, fresh region",
					    "lazy, fresh region",
					    "eager, existing region" };
	int si = find_snap(o->a, NULL), fd, ret, ri = -1, i;
	unsigned h = o->c % 3, l = o->d % 3, lflags = 0;
	struct msnap *s;
	unsigned char *fmodel, *famb;
	size_t npages, pg;
	bool may_break;
	int sid;

	(void)opi;
	if (si < 0) {
		DESC("stream (skipped: no snapshot)");
		return;
	}
	s = &S[si];
	sid = s->id;
	npages = s->npages;
	may_break = s->may_break;
	fd = memfd_create("cowmm-model", MFD_CLOEXEC);
	if (fd < 0)
		die(M_ERROR, "memfd_create: %m");
	if (h == 0)
		ret = cowmm_snap_write(s->s, fd);
	else
		ret = cowmm_snap_stream(s->s, fd,
					h == 2 ? COWMM_STREAM_RELEASE : 0,
					NULL, NULL);
	if (h == 2 && s->view) {
		/* header: -EBUSY (COWMM_STREAM_RELEASE on a mapped
		 * snapshot), which leaves it as it was */
		expect_ret("cowmm_snap_stream(RELEASE) of a mapped snapshot",
			   ret, -EBUSY);
		close(fd);
		DESC("stream S%d %s: -EBUSY (mapped)", sid, how[h]);
		return;
	}
	fmodel = s->model;
	famb = s->amb;
	if (h == 2) { /* consumed, whatever it returned */
		s->model = NULL;
		s->amb = NULL;
		free(s->shared);
		free(s->vtouched);
		memset(s, 0, sizeof(*s));
	}
	if (ret == -EIO && may_break) {
		close(fd);
		DESC("stream S%d %s: -EIO (may be broken)", sid, how[h]);
		if (h == 2) {
			free(fmodel);
			free(famb);
		}
		return;
	}
	expect_ret(h == 0 ? "cowmm_snap_write" : "cowmm_snap_stream", ret, 0);

	if (l == 2) {
		for (i = 0; i < MAXR; i++) /* a region of that size */
			if (R[i].live && R[i].npages == npages &&
			    loadable_target(&R[i]))
				ri = i;
		if (ri < 0)
			l = 0;
	}
	if (l == 1 && (mode.in_thread || !(features & T_POISON)))
		lflags = COWMM_LOAD_LAZY; /* expect -EOPNOTSUPP below */
	if (ri < 0) {
		struct mregion *m;

		ri = free_region_slot();
		if (ri < 0) {
			close(fd);
			DESC("stream S%d %s (no slot to load into)", sid,
			     how[h]);
			goto out;
		}
		m = &R[ri];
		region_init(m, npages);
		m->kind = K_LOADED;
		ret = cowmm_region_alloc(mm, npages * PG, COWMM_REGION_NOTHP,
					 &m->r);
		expect_ret("cowmm_region_alloc", ret, 0);
		for (pg = 0; pg < npages; pg++)
			m->addr[pg] = (unsigned char *)cowmm_region_base(m->r) +
				      pg * PG;
	}
	if (l == 1)
		lflags = COWMM_LOAD_LAZY;
	ret = cowmm_region_load(R[ri].r, fd, lflags);
	if (l == 1 && (mode.in_thread || !(features & T_POISON))) {
		/* header: lazily, -EOPNOTSUPP before 6.6 or in_thread */
		expect_ret("cowmm_region_load(LAZY)", ret, -EOPNOTSUPP);
		close(fd);
		DESC("stream S%d %s, load R%d lazy: -EOPNOTSUPP", sid, how[h],
		     R[ri].id);
		goto out;
	}
	expect_ret("cowmm_region_load", ret, 0);
	close(fd); /* a lazy load keeps its own duplicate */
	for (pg = 0; pg < npages; pg++) {
		/* A page that keeps its bytes may be left alone (and stay
		 * shared with the region's snapshots); any other is
		 * written through the normal write path. */
		if (memcmp(page_of(R[ri].model, pg), page_of(fmodel, pg), PG) ||
		    R[ri].amb[pg] || famb[pg])
			load_written(ri, pg, page_of(fmodel, pg), famb[pg]);
		memcpy(page_of(R[ri].model, pg), page_of(fmodel, pg), PG);
		R[ri].amb[pg] = famb[pg];
		R[ri].lazy[pg] = l == 1;
	}
	DESC("stream S%d %s, load %s R%d", sid, how[h], load[l], R[ri].id);
out:
	if (h == 2) {
		free(fmodel);
		free(famb);
	}
}

/*
 * The exact count of the contract (DESIGN.md, "Counting"; header,
 * cowmm_stats.copies): a snapshot of N pages, then writes to K distinct
 * pages, gives copies == K when fault-around preserves one page: with
 * fault_around 0 ("the default: one page" in DESIGN.md) or 1, K
 * consecutive pages in order (a sequential writer); with a window, K
 * pages in descending order two apart (each fault starts a new run, so
 * the window stays 1).  A region of its own, nothing else runs meanwhile.
 */
static void op_count(struct op *o, char *d)
{
	const size_t npages = 32;
	size_t k = 2 + o->b % 12, i;
	struct cowmm_stats st0, st1;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	bool seq = mode.fault_around <= 1;
	int ret;

	if (free_region_slot() < 0 || free_snap_slot() < 0) {
		DESC("count (skipped: no slot)");
		return;
	}
	ret = cowmm_region_alloc(mm, npages * PG, COWMM_REGION_NOTHP, &r);
	expect_ret("cowmm_region_alloc", ret, 0);
	p = cowmm_region_base(r);
	for (i = 0; i < npages; i++)
		memset(p + i * PG, (int)(i + 1), PG);
	ret = cowmm_snapshot(r, &s);
	expect_ret("cowmm_snapshot", ret, 0);
	cowmm_stats(mm, &st0, sizeof(st0));
	for (i = 0; i < k; i++) {
		size_t pg = seq ? 3 + i : 30 - 2 * i;

		p[pg * PG + 5] ^= 0xff;
	}
	cowmm_stats(mm, &st1, sizeof(st1));
	if (st1.copies - st0.copies != k)
		die(M_STATS, "count: a snapshot of %zu pages, then writes to "
			      "%zu distinct pages (%s): copies += %llu, "
			      "ahead_copies += %llu; the contract says copies "
			      "== %zu", npages, k,
		     seq ? "in order" : "descending, two apart",
		     (unsigned long long)(st1.copies - st0.copies),
		     (unsigned long long)(st1.ahead_copies - st0.ahead_copies),
		     k);
	for (i = 0; i < npages; i++) {
		unsigned char b[2];
		bool w = seq ? (i >= 3 && i < 3 + k) :
			       (i <= 30 && (30 - i) % 2 == 0 && (30 - i) / 2 < k);

		if (cowmm_snap_read(s, i * PG + 5, b, 1) != 1 ||
		    b[0] != (unsigned char)(i + 1))
			die(M_BYTES, "count: snapshot page %zu byte 5", i);
		if (p[i * PG + 5] != (unsigned char)(w ? (i + 1) ^ 0xff : i + 1))
			die(M_BYTES, "count: region page %zu byte 5", i);
	}
	cowmm_snap_release(s);
	ret = cowmm_region_release(r);
	expect_ret("cowmm_region_release", ret, 0);
	DESC("count: snapshot of %zu pages, %zu writes %s: copies == %zu",
	     npages, k, seq ? "in order" : "two apart", k);
}

static void run_op(int opi)
{
	struct op *o = &ops[opi];
	char *d = descs[opi];

	if (skip_kind[o->kind]) {
		DESC("%s (skipped: COWMM_MODEL_SKIP)", kind_name[o->kind]);
		return;
	}
	switch (o->kind) {
	case OP_ALLOC: op_alloc(opi, o, d); break;
	case OP_WRITE: op_write(opi, o, d, false); break;
	case OP_WRITE_MT: op_write(opi, o, d, true); break;
	case OP_PREAD: op_syscall_write(opi, o, d, false); break;
	case OP_PIPE: op_syscall_write(opi, o, d, true); break;
	case OP_SNAPSHOT: op_snapshot(opi, o, d); break;
	case OP_SNAP_RELEASE: op_snap_release(o, d); break;
	case OP_CLONE: op_clone(o, d); break;
	case OP_RELEASE: op_release(o, d); break;
	case OP_RESTORE: op_restore(o, d); break;
	case OP_MAP: op_map(o, d); break;
	case OP_VIEW_DISCARD: op_view_discard(o, d); break;
	case OP_PIN: op_pin(o, d); break;
	case OP_UNPIN: op_unpin(o, d); break;
	case OP_DONTNEED: op_discard(o, d, MADV_DONTNEED); break;
	case OP_FREE: op_discard(o, d, MADV_FREE); break;
	case OP_MUNMAP: op_munmap(o, d); break;
	case OP_MREMAP: op_mremap(o, d); break;
	case OP_MREMAP_PART: op_mremap_part(opi, o, d); break;
	case OP_DISCARD_MOVE: op_discard_move(opi, o, d); break;
	case OP_STREAM: op_stream(opi, o, d); break;
	case OP_PAGEOUT: op_pageout(o, d); break;
	case OP_COUNT: op_count(o, d); break;
	case OP_WRITE_DISCARD: op_write_discard(opi, o, d); break;
	case OP_READ_MOVING: op_read_moving(o, d); break;
	default: DESC("?");
	}
}

/* ------------------------------------------------------------------------ */
/* A seed: its mode and operations, generated up front */

static void gen_mode(uint64_t sd)
{
	uint64_t x = mix(sd ^ 0x6d6f6465ULL);
	static const size_t fa[] = { 0, 1, 8 };

	memset(&mode, 0, sizeof(mode));
	mode.workers = t_rand(&x) % 2 ? 2 : 0;
	mode.fault_around = fa[t_rand(&x) % 3];
	mode.in_thread = t_rand(&x) % 5 == 0;
	mode.bounded = t_rand(&x) % 5 == 0 ? BOUNDED_PAGES : 0;
	/* Drawn last: the modes above stay what they were for a seed. */
	switch (t_rand(&x) % 5) {
	case 0:
		mode.placement = COWMM_OPEN_FOLLOW;
		break;
	case 1:
		mode.placement = COWMM_OPEN_PER_CPU;
		break;
	}
}

static void gen_ops(uint64_t sd, size_t n)
{
	uint64_t x = mix(sd), total = 0;
	size_t i, k;

	for (k = 0; k < NKINDS; k++)
		total += weight[k];
	nops = n;
	for (i = 0; i < n; i++) {
		struct op *o = &ops[i];
		uint64_t w = t_rand(&x) % total;

		if (i < 2 + sd % 2) {
			o->kind = OP_ALLOC;
		} else {
			for (k = 0; w >= weight[k]; k++)
				w -= weight[k];
			o->kind = (enum op_kind)k;
		}
		o->a = (uint32_t)t_rand(&x);
		o->b = (uint32_t)t_rand(&x);
		o->c = (uint32_t)t_rand(&x);
		o->d = (uint32_t)t_rand(&x);
		o->rnd = t_rand(&x);
		if (o->kind == OP_ALLOC)
			o->d = (uint32_t)i; /* alternate alloc and adopt */
	}
}

/* The body of a seed's child: returns only on success. */
static void run_seed(void)
{
	struct cowmm_config cfg = COWMM_CONFIG_INIT;
	struct cowmm_stats st;
	pthread_t wd;
	int i, ret;

	install_signals();
	pthread_create(&wd, NULL, watchdog, NULL);
	cfg.workers = mode.workers;
	cfg.fault_around = mode.fault_around;
	cfg.flags = (mode.in_thread ? COWMM_OPEN_IN_THREAD : 0) | mode.placement;
	cfg.max_preserved = mode.bounded * PG;
	ret = cowmm_open(&cfg, &mm);
	if (ret)
		die(M_ERROR, "cowmm_open: %s", cowmm_strerror(ret));
	features = cowmm_features(mm);
	memfd = memfd_create("cowmm-model-src", MFD_CLOEXEC);
	if (memfd < 0 || pipe(pipefd))
		die(M_ERROR, "memfd/pipe: %m");
	for (i = 0; i < (int)nops; i++) {
		if (!pick[i])
			continue;
		snprintf(descs[i], sizeof(descs[i]), "%s (did not finish)",
			 kind_name[ops[i].kind]);
		atomic_store(&step_start_ns, now_ns());
		atomic_store(&cur_op, i);
		run_op(i);
		if (verbose) {
			printf("  #%d %s\n", i, descs[i]);
			fflush(stdout);
		}
		check_all(i, false);
		atomic_store(&step_start_ns, 0);
	}
	atomic_store(&step_start_ns, now_ns());
	check_all((int)nops, true);
	ret = cowmm_stats(mm, &st, sizeof(st));
	if (!ret && !mode.in_thread && !skip_wp_sum && st.wp_faults != st.copies + st.reuses)
		die(M_STATS, "wp_faults %llu != copies %llu + reuses %llu",
		     (unsigned long long)st.wp_faults,
		     (unsigned long long)st.copies,
		     (unsigned long long)st.reuses);
	cowmm_close(mm);
	for (i = 0; i < MAXR; i++)
		if (R[i].live)
			check_adopted_kept(&R[i], "cowmm_close");
	atomic_store(&step_start_ns, 0);
}

/* Run the picked ops of the current seed in a child: its result. */
static int run_child(void)
{
	pid_t pid;
	int status;

	if (!sigbox) {
		void *p = mmap(NULL, PG, PROT_READ | PROT_WRITE,
			       MAP_SHARED | MAP_ANONYMOUS, -1, 0);

		sigbox = p == MAP_FAILED ? NULL : p;
	}
	if (sigbox)
		*sigbox = 0;
	fflush(stdout);
	pid = fork();
	if (pid < 0)
		return M_ERROR;
	if (pid == 0) {
		memset(descs, 0, sizeof(descs));
		run_seed();
		_exit(M_OK);
	}
	if (waitpid(pid, &status, 0) < 0)
		return M_ERROR;
	if (WIFEXITED(status))
		return WEXITSTATUS(status) <= M_CRASH ? WEXITSTATUS(status)
						      : M_CRASH;
	if (!quiet)
		printf("MODEL FAILURE: seed %llu: child killed by signal %d\n",
		       (unsigned long long)seed, WTERMSIG(status));
	return M_CRASH;
}

static size_t count_picked(void)
{
	size_t i, n = 0;

	for (i = 0; i < nops; i++)
		n += pick[i];
	return n;
}

static long env_long(const char *name, long def)
{
	const char *v = getenv(name);

	return v && *v ? strtol(v, NULL, 0) : def;
}

/*
 * Delta debugging (ddmin over the picked ops): drop chunks while the
 * failure (of the same kind) remains, halving the chunk size.
 */
static uintptr_t last_sig(void)
{
	return sigbox ? *sigbox : 0;
}

static void shrink(int want, double deadline)
{
	uintptr_t want_sig = last_sig();
	unsigned char *save = malloc(nops);
	size_t chunk = count_picked() / 2, i, tries = 0;
	/* A failure that depends on timing shrinks slowly: bound it. */
	size_t max_tries = (size_t)env_long("COWMM_MODEL_SHRINK_RUNS", 300);
	bool progress;
	char m[128];

	quiet = true;
	while (chunk >= 1) {
		progress = false;
		for (i = 0; i < nops;) {
			size_t j, dropped = 0;

			memcpy(save, pick, nops);
			for (j = i; j < nops && dropped < chunk; j++)
				if (pick[j]) {
					pick[j] = 0;
					dropped++;
				}
			if (!dropped)
				break;
			tries++;
			if (run_child() == want && last_sig() == want_sig) {
				progress = true; /* keep the smaller list */
			} else {
				memcpy(pick, save, nops);
				i = j;
			}
			if (now_ns() / 1e9 > deadline || tries >= max_tries)
				goto out;
		}
		if (!progress)
			chunk /= 2;
	}
out:
	quiet = false;
	mode_str(m, sizeof(m));
	printf("SHRUNK seed %llu (%s, %s) to %zu ops in %zu runs:\n",
	       (unsigned long long)seed, result_name[want], m, count_picked(),
	       tries);
	printf("  replay: COWMM_MODEL_SEED=%llu COWMM_MODEL_PICK=",
	       (unsigned long long)seed);
	for (i = 0, tries = 0; i < nops; i++)
		if (pick[i])
			printf("%s%zu", tries++ ? "," : "", i);
	printf("\n");
	/* Once more, verbose, for the readable list and the failure. */
	verbose = true;
	run_child();
	verbose = false;
	free(save);
}


static void parse_skip(void)
{
	const char *v = getenv("COWMM_MODEL_SKIP");
	char buf[512], *tok, *save;
	int k;

	if (!v)
		return;
	snprintf(buf, sizeof(buf), "%s", v);
	for (tok = strtok_r(buf, ", ", &save); tok;
	     tok = strtok_r(NULL, ", ", &save)) {
		for (k = 0; k < NKINDS; k++)
			if (!strcmp(tok, kind_name[k]))
				break;
		if (!strcmp(tok, "discard_untouched"))
			skip_untouched = true;
		else if (!strcmp(tok, "discard_origin"))
			skip_origin = true;
		else if (!strcmp(tok, "wp_sum"))
			skip_wp_sum = true;
		else if (k == NKINDS)
			printf("COWMM_MODEL_SKIP: no op kind %s\n", tok);
		else
			skip_kind[k] = true;
	}
}

static void set_pick(long upto)
{
	const char *v = getenv("COWMM_MODEL_PICK");
	size_t i;

	memset(pick, 0, MAXOPS);
	if (v && *v) {
		char *end;

		for (const char *p = v; *p; p = end) {
			unsigned long k = strtoul(p, &end, 10);

			if (end == p)
				break;
			if (k < nops)
				pick[k] = 1;
			while (*end == ',' || *end == ' ')
				end++;
		}
		return;
	}
	for (i = 0; i < nops && (upto < 0 || (long)i < upto); i++)
		pick[i] = 1;
}

START_TEST(test_model)
{
	double seconds = (double)env_long("COWMM_MODEL_SECONDS", 50);
	long one = env_long("COWMM_MODEL_SEED", -1);
	long upto = env_long("COWMM_MODEL_OPS", -1);
	long n = env_long("COWMM_MODEL_NOPS", 120);
	bool do_shrink = env_long("COWMM_MODEL_SHRINK", 0) == 1;
	double start = now_ns() / 1e9, deadline = start + seconds;
	uint64_t base, seeds = 0, opsrun = 0, failures = 0;
	long first, nseeds;
	int res, counts[M_CRASH + 1] = { 0 };

	setvbuf(stdout, NULL, _IOLBF, 0); /* Check's failure does not flush */
	verbose = env_long("COWMM_MODEL_VERBOSE", 0) == 1;
	hang_seconds = (double)env_long("COWMM_MODEL_HANG", 20) *
		       (T_SANITIZED ? 3 : 1);
	weight[OP_PAGEOUT] = (unsigned)env_long("COWMM_MODEL_PAGEOUT", 2);
	mover_dontunmap = env_long("COWMM_MODEL_DONTUNMAP", 0) == 1;
	if (env_long("COWMM_MODEL_LOG", 0))
		cowmm_set_log(print_log, NULL);
	if (n < 4 || n > MAXOPS)
		n = 120;
	parse_skip();
	pick = malloc(MAXOPS);
	first = env_long("COWMM_MODEL_FIRST", -1);
	nseeds = env_long("COWMM_MODEL_NSEEDS", -1);
	base = one >= 0     ? (uint64_t)one
	       : first >= 0 ? (uint64_t)first
			    : (uint64_t)(time(NULL) % 1000000) * 1000;
	printf("model: %s seed %llu, %ld ops per seed, %.0f s\n",
	       one >= 0 ? "replaying" : "first", (unsigned long long)base, n,
	       seconds);
	for (seed = base;; seed++) {
		char m[128];

		gen_mode(seed);
		gen_ops(seed, (size_t)n);
		set_pick(upto);
		res = run_child();
		seeds++;
		opsrun += count_picked();
		counts[res]++;
		if (res != M_OK) {
			failures++;
			mode_str(m, sizeof(m));
			printf("seed %llu FAILED (%s), mode %s\n",
			       (unsigned long long)seed, result_name[res], m);
			if (do_shrink)
				shrink(res, deadline + 600);
		}
		if (one >= 0 || now_ns() / 1e9 > deadline ||
		    (nseeds > 0 && seeds >= (uint64_t)nseeds))
			break;
	}
	printf("model: %llu seeds, %llu ops in %.0f s: %llu failed (bytes %d, "
	       "returns %d, counters %d, hangs %d, crashes %d)\n",
	       (unsigned long long)seeds, (unsigned long long)opsrun,
	       now_ns() / 1e9 - start, (unsigned long long)failures,
	       counts[M_BYTES], counts[M_ERROR], counts[M_STATS],
	       counts[M_HANG], counts[M_CRASH]);
	free(pick);
	ck_assert_msg(failures == 0, "%llu of %llu seeds diverged from the "
		      "model", (unsigned long long)failures,
		      (unsigned long long)seeds);
}
END_TEST

int main(void)
{
	long seconds = env_long("COWMM_MODEL_SECONDS", 50);
	const struct t_case cases[] = {
		{ "random", test_model, T_WP_UNPOPULATED, 0,
		  (int)(seconds + 900) },
	};

	return t_run("model", cases, ARRAY_SIZE(cases));
}
