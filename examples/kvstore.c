// SPDX-License-Identifier: MIT
/*
 * kvstore: an in-memory key-value server that snapshots without fork().
 *
 * Its whole heap (hash table, keys and values) lives in one libcowmm
 * region, addressed by offsets so that a dump loads at any address.  It
 * speaks enough of the Redis protocol (RESP) for redis-cli and
 * redis-benchmark: PING, SET, GET, DEL, EXISTS, DBSIZE, FLUSHALL, SAVE,
 * BGSAVE, LASTSAVE, INFO [persistence], CONFIG GET, COMMAND,
 * SHUTDOWN [SAVE|NOSAVE], QUIT.
 *
 * BGSAVE takes a libcowmm snapshot (the server pauses for the length of
 * cowmm_snapshot()) and a background thread streams it to the dump file
 * while the server goes on serving writes.  The stream releases the
 * snapshot as it goes (COWMM_STREAM_RELEASE): writes to the part already
 * in the file no longer fault.  With --keep-armed it is written whole and
 * released after, which leaves the pages not written since protected (the
 * next snapshot has less to protect, but each page's first write after
 * the save still faults once).  With --fork, BGSAVE forks a child that
 * writes the heap, the way Redis does.
 * On start the dump is loaded if it exists; a save goes to a temporary
 * file renamed over the dump only once complete.  SHUTDOWN, SIGTERM and
 * SIGINT save before exiting (not with --no-save; SHUTDOWN NOSAVE never,
 * SHUTDOWN SAVE always), as Redis does when persistence is configured.
 *
 * Build out of tree:
 *   cc -O2 kvstore.c $(pkg-config --cflags --libs cowmm) -lpthread
 *
 * Usage: kvstore [--port N] [--heap MiB] [--dump FILE] [--no-save] [--fork]
 *                [--thp] [--huge-cow] [--in-thread] [--keep-armed]
 *                [--save-nice N]; kvstore --help says what each does.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4(), FNM_CASEFOLD */
#endif
#include <arpa/inet.h>
#include <err.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <getopt.h>
#include <limits.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cowmm.h>

/* ------------------------------------------------------------------------ */
/* The heap: an arena inside the region, everything by offset */

#define HEAP_MAGIC 0x314b564d4d4f43ULL /* "COMMVK1" */
#define NCLASS 24                      /* free lists for 16 B .. 128 MiB */
#define TABLE_MIN 1024

struct heap_hdr {
	uint64_t magic;
	uint64_t size;      /* of the region */
	uint64_t top;       /* arena bump pointer */
	uint64_t table;     /* offset of the bucket array */
	uint64_t buckets;   /* power of two */
	uint64_t count;     /* keys */
	uint64_t free[NCLASS];
};

struct entry {
	uint64_t next;  /* offset of the next entry in the bucket, or 0 */
	uint32_t klen, vlen;
	uint8_t class;
	unsigned char data[]; /* key, then value */
};

static char *heap;
static struct heap_hdr *H;

#define AT(off) ((void *)(heap + (off)))

static unsigned class_of(size_t n)
{
	unsigned c = 0;

	while ((16UL << c) < n)
		c++;
	return c;
}

static uint64_t heap_alloc(size_t n, unsigned *cls)
{
	unsigned c = class_of(n);
	uint64_t off;

	if (c >= NCLASS)
		return 0;
	*cls = c;
	off = H->free[c];
	if (off) {
		H->free[c] = *(uint64_t *)AT(off);
		return off;
	}
	if (H->top + (16UL << c) > H->size)
		return 0;
	off = H->top;
	H->top += 16UL << c;
	return off;
}

static void heap_free(uint64_t off, unsigned c)
{
	*(uint64_t *)AT(off) = H->free[c];
	H->free[c] = off;
}

static uint64_t hash(const void *k, size_t n)
{
	const unsigned char *p = k;
	uint64_t h = 0xcbf29ce484222325ULL;

	while (n--)
		h = (h ^ *p++) * 0x100000001b3ULL;
	return h;
}

static uint64_t *bucket(const void *k, size_t n)
{
	uint64_t *b = AT(H->table);

	return &b[hash(k, n) & (H->buckets - 1)];
}

static bool heap_init(size_t size)
{
	unsigned cls;

	memset(H, 0, sizeof(*H));
	H->magic = HEAP_MAGIC;
	H->size = size;
	H->top = (sizeof(*H) + 63) & ~63UL;
	H->buckets = TABLE_MIN;
	H->table = heap_alloc(H->buckets * sizeof(uint64_t), &cls);
	if (!H->table)
		return false;
	memset(AT(H->table), 0, H->buckets * sizeof(uint64_t));
	return true;
}

/* Double the bucket array when the load factor reaches 1. */
static void maybe_grow(void)
{
	uint64_t nb = H->buckets * 2, old = H->table, ob = H->buckets, i;
	unsigned cls, ocls = class_of(ob * sizeof(uint64_t));
	uint64_t nt;

	if (H->count < H->buckets)
		return;
	nt = heap_alloc(nb * sizeof(uint64_t), &cls);
	if (!nt)
		return;
	memset(AT(nt), 0, nb * sizeof(uint64_t));
	H->table = nt;
	H->buckets = nb;
	for (i = 0; i < ob; i++) {
		uint64_t e = ((uint64_t *)AT(old))[i];

		while (e) {
			struct entry *en = AT(e);
			uint64_t next = en->next, *b = bucket(en->data, en->klen);

			en->next = *b;
			*b = e;
			e = next;
		}
	}
	heap_free(old, ocls);
}

static struct entry *lookup(const void *k, size_t n, uint64_t **link)
{
	uint64_t *l = bucket(k, n);

	while (*l) {
		struct entry *e = AT(*l);

		if (e->klen == n && !memcmp(e->data, k, n)) {
			if (link)
				*link = l;
			return e;
		}
		l = &e->next;
	}
	return NULL;
}

static bool del(const void *k, size_t n)
{
	uint64_t *link, off;
	struct entry *e = lookup(k, n, &link);

	if (!e)
		return false;
	off = *link;
	*link = e->next;
	heap_free(off, e->class);
	H->count--;
	return true;
}

static bool set(const void *k, size_t kn, const void *v, size_t vn)
{
	struct entry *e;
	unsigned cls;
	uint64_t off;

	del(k, kn);
	off = heap_alloc(sizeof(*e) + kn + vn, &cls);
	if (!off)
		return false;
	e = AT(off);
	e->klen = kn;
	e->vlen = vn;
	e->class = cls;
	memcpy(e->data, k, kn);
	memcpy(e->data + kn, v, vn);
	{
		uint64_t *b = bucket(k, kn);

		e->next = *b;
		*b = off;
	}
	H->count++;
	maybe_grow();
	return true;
}

/* ------------------------------------------------------------------------ */
/* Persistence */

static const char *dump_path = "kvstore.dump";
static bool use_fork, keep_armed;
static bool save_on_exit = true; /* --no-save clears it */
static int save_nice; /* --save-nice: the saver's nice value */

/* Why a save or a load failed: the step, its file and the reason. */
#define WHY_MAX (2 * PATH_MAX + 128)

/* The saving thread (or child) yields the CPU to the server. */
static void saver_priority(void)
{
	if (save_nice &&
	    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), save_nice) < 0)
		warn("setpriority");
}
static cowmm_region_t *region;
static struct {
	atomic_bool running;
	atomic_int last_status; /* 0 ok, -errno */
	atomic_llong last_save;  /* unix time */
	atomic_llong last_ms;    /* duration of the last save */
	double pause_ms;         /* of the last BGSAVE's snapshot or fork */
	pid_t child;
	long long started_ns;
	pthread_t th;
	cowmm_snap_t *snap;
} save;

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Raw format for --fork: the heap's bytes up to its bump pointer. */
#define RAW_MAGIC "KVRAWDMP"

static int write_raw(int fd)
{
	uint64_t len = H->top;
	size_t done = 0;

	if (write(fd, RAW_MAGIC, 8) != 8 || write(fd, &len, 8) != 8)
		return -errno;
	while (done < len) {
		ssize_t n = write(fd, heap + done, len - done > (1 << 20)
							 ? (1 << 20)
							 : len - done);

		if (n < 0)
			return -errno;
		done += n;
	}
	return 0;
}

/* The temporary file a save writes, renamed over the dump once whole. */
static int open_tmp(char *tmp, size_t n, char *why)
{
	int fd;

	snprintf(tmp, n, "%s.tmp", dump_path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		fd = -errno;
		snprintf(why, WHY_MAX, "open %s: %s", tmp, strerror(-fd));
	}
	return fd;
}

/*
 * Sync and close @fd, then rename @tmp over the dump; with @ret (the
 * writing failed, @why says how) or on failure, remove @tmp instead.
 */
static int finish_file(int fd, const char *tmp, int ret, char *why)
{
	if (!ret && fsync(fd) < 0) {
		ret = -errno;
		snprintf(why, WHY_MAX, "fsync %s: %s", tmp, strerror(-ret));
	}
	if (close(fd) < 0 && !ret) {
		ret = -errno;
		snprintf(why, WHY_MAX, "close %s: %s", tmp, strerror(-ret));
	}
	if (!ret && rename(tmp, dump_path) < 0) {
		ret = -errno;
		snprintf(why, WHY_MAX, "rename %s to %s: %s", tmp, dump_path,
			 strerror(-ret));
	}
	if (ret)
		unlink(tmp);
	return ret;
}

/* Write @s to @fd (the file @tmp) and release it. */
static int write_snapshot(cowmm_snap_t *s, int fd, const char *tmp,
			  char *why)
{
	int ret;

	if (!keep_armed) { /* consumes the snapshot, even on failure */
		ret = cowmm_snap_stream(s, fd, COWMM_STREAM_RELEASE, NULL,
					NULL);
	} else {
		ret = cowmm_snap_write(s, fd);
		cowmm_snap_release(s);
	}
	if (ret)
		snprintf(why, WHY_MAX, "writing %s: %s", tmp,
			 cowmm_strerror(ret));
	return ret;
}

static void *bgsave_thread(void *arg)
{
	char tmp[PATH_MAX], why[WHY_MAX];
	int fd, ret;

	(void)arg;
	saver_priority();
	fd = open_tmp(tmp, sizeof(tmp), why);
	if (fd < 0) {
		ret = fd;
		cowmm_snap_release(save.snap);
	} else {
		ret = write_snapshot(save.snap, fd, tmp, why);
		ret = finish_file(fd, tmp, ret, why);
	}
	save.snap = NULL;
	if (ret)
		fprintf(stderr, "kvstore: background save to %s failed: %s\n",
			dump_path, why);
	atomic_store(&save.last_status, ret);
	atomic_store(&save.last_ms, (now_ns() - save.started_ns) / 1000000);
	if (!ret)
		atomic_store(&save.last_save, (long long)time(NULL));
	atomic_store(&save.running, false);
	return NULL;
}

/* Start a background save; on failure @why says what failed. */
static int bgsave(char *why)
{
	long long t0;
	int ret;

	if (atomic_load(&save.running))
		return -EBUSY;
	if (save.th) {
		pthread_join(save.th, NULL);
		save.th = 0;
	}
	save.started_ns = t0 = now_ns();
	if (use_fork) {
		pid_t pid = fork();

		if (pid < 0) {
			ret = -errno;
			snprintf(why, WHY_MAX, "fork: %s", strerror(-ret));
			return ret;
		}
		if (pid == 0) {
			char tmp[PATH_MAX];
			int fd;

			saver_priority();
			fd = open_tmp(tmp, sizeof(tmp), why);
			if (fd >= 0) {
				ret = write_raw(fd);
				if (ret)
					snprintf(why, WHY_MAX, "writing %s: %s",
						 tmp, strerror(-ret));
				ret = finish_file(fd, tmp, ret, why);
			}
			if (fd < 0 || ret)
				fprintf(stderr,
					"kvstore: background save to %s "
					"failed: %s\n",
					dump_path, why);
			_exit(fd < 0 || ret);
		}
		save.pause_ms = (now_ns() - t0) / 1e6;
		save.child = pid;
		atomic_store(&save.running, true);
		return 0;
	}
	ret = cowmm_snapshot(region, &save.snap);
	save.pause_ms = (now_ns() - t0) / 1e6;
	if (ret) {
		snprintf(why, WHY_MAX, "cowmm_snapshot: %s",
			 cowmm_strerror(ret));
		return ret;
	}
	atomic_store(&save.running, true);
	ret = -pthread_create(&save.th, NULL, bgsave_thread, NULL);
	if (ret) {
		snprintf(why, WHY_MAX, "pthread_create: %s", strerror(-ret));
		cowmm_snap_release(save.snap);
		atomic_store(&save.running, false);
	}
	return ret;
}

/* Reap a --fork child; called from the event loop. */
static void bgsave_poll(void)
{
	int status;

	if (!use_fork || !save.child ||
	    waitpid(save.child, &status, WNOHANG) != save.child)
		return;
	save.child = 0;
	atomic_store(&save.last_status,
		     WIFEXITED(status) && !WEXITSTATUS(status) ? 0 : -EIO);
	atomic_store(&save.last_ms, (now_ns() - save.started_ns) / 1000000);
	if (!atomic_load(&save.last_status))
		atomic_store(&save.last_save, (long long)time(NULL));
	atomic_store(&save.running, false);
}

/* Wait for a background save in flight to end. */
static void bgsave_wait(void)
{
	if (save.th) {
		pthread_join(save.th, NULL);
		save.th = 0;
	}
	while (use_fork && save.child) {
		usleep(10000);
		bgsave_poll();
	}
}

/* SAVE: the snapshot written in the foreground; @why on failure. */
static int save_now(char *why)
{
	cowmm_snap_t *s;
	char tmp[PATH_MAX];
	int fd, ret;

	fd = open_tmp(tmp, sizeof(tmp), why);
	if (fd < 0)
		return fd;
	ret = cowmm_snapshot(region, &s);
	if (ret)
		snprintf(why, WHY_MAX, "cowmm_snapshot: %s",
			 cowmm_strerror(ret));
	else
		ret = write_snapshot(s, fd, tmp, why);
	ret = finish_file(fd, tmp, ret, why);
	if (!ret)
		atomic_store(&save.last_save, (long long)time(NULL));
	return ret;
}

/* The save before exiting (SHUTDOWN, SIGTERM): after any in flight. */
static int save_at_exit(char *why)
{
	long long t0 = now_ns();
	int ret;

	bgsave_wait();
	ret = save_now(why);
	if (!ret)
		fprintf(stderr, "kvstore: saved %" PRIu64 " keys to %s in %lld "
				"ms\n",
			H->count, dump_path, (now_ns() - t0) / 1000000);
	return ret;
}

/* "16 MiB", or bytes when not whole MiB. */
static const char *size_str(char *buf, size_t n, uint64_t v)
{
	if (v && !(v % (1 << 20)))
		snprintf(buf, n, "%" PRIu64 " MiB", v >> 20);
	else
		snprintf(buf, n, "%" PRIu64 " bytes", v);
	return buf;
}

/*
 * The heap size a dump was saved with, 0 if the file cannot say: the
 * region size in a snapshot file's header (little-endian, at byte 16:
 * after "COWMMSNP", version and page size), or the size in the heap
 * header of a raw (--fork) dump, which follows its magic and length.
 */
static uint64_t dump_heap_size(int fd, bool raw)
{
	uint64_t v;

	if (pread(fd, &v, 8, raw ? 16 + offsetof(struct heap_hdr, size) : 16) !=
	    8)
		return 0;
	return raw ? v : le64toh(v);
}

static int heap_mismatch(uint64_t have, size_t size, char *why)
{
	char a[32], b[32];

	snprintf(why, WHY_MAX,
		 "%s holds a heap of %s, this server's --heap is %s: start it "
		 "with --heap %" PRIu64 ", or move the dump away",
		 dump_path, size_str(a, sizeof(a), have),
		 size_str(b, sizeof(b), size), have >> 20);
	return -EINVAL;
}

/* Load the dump into the heap: 0, 1 if there is none, or -errno + @why. */
static int load_dump(size_t size, char *why)
{
	char magic[8];
	uint64_t len, have;
	int fd = open(dump_path, O_RDONLY | O_CLOEXEC), ret = 0;

	if (fd < 0) {
		if (errno == ENOENT)
			return 1;
		ret = -errno;
		snprintf(why, WHY_MAX, "open %s: %s", dump_path,
			 strerror(-ret));
		return ret;
	}
	if (pread(fd, magic, 8, 0) != 8) {
		ret = -EBADMSG;
		snprintf(why, WHY_MAX, "%s: not a kvstore dump (too short)",
			 dump_path);
	} else if (!memcmp(magic, RAW_MAGIC, 8)) {
		have = dump_heap_size(fd, true);
		if (pread(fd, &len, 8, 8) != 8 || !have) {
			ret = -EBADMSG;
			snprintf(why, WHY_MAX, "%s: raw dump truncated",
				 dump_path);
		} else if (have != size) {
			ret = heap_mismatch(have, size, why);
		} else if (len > size ||
			   pread(fd, heap, len, 16) != (ssize_t)len) {
			ret = -EBADMSG;
			snprintf(why, WHY_MAX, "%s: raw dump truncated",
				 dump_path);
		}
	} else {
		ret = cowmm_region_load(region, fd, 0);
		have = ret == -EINVAL || ret == -EFBIG
			       ? dump_heap_size(fd, false)
			       : 0;
		if (have && have != size)
			ret = heap_mismatch(have, size, why);
		else if (ret)
			snprintf(why, WHY_MAX, "loading %s: %s", dump_path,
				 cowmm_strerror(ret));
	}
	close(fd);
	if (!ret && H->magic != HEAP_MAGIC) {
		ret = -EBADMSG;
		snprintf(why, WHY_MAX, "%s: a snapshot file, but not of a "
				       "kvstore heap",
			 dump_path);
	} else if (!ret && H->size != size) {
		ret = heap_mismatch(H->size, size, why);
	}
	return ret;
}

/* ------------------------------------------------------------------------ */
/* RESP */

struct client {
	int fd;
	char *in, *out;
	size_t in_len, in_cap, out_len, out_cap;
	bool close_after, dead;
};

static void out_add(struct client *c, const void *p, size_t n)
{
	if (c->out_len + n > c->out_cap) {
		size_t cap = c->out_cap ? c->out_cap : 4096;

		while (cap < c->out_len + n)
			cap *= 2;
		c->out = realloc(c->out, cap);
		if (!c->out)
			err(1, "realloc");
		c->out_cap = cap;
	}
	memcpy(c->out + c->out_len, p, n);
	c->out_len += n;
}

static void out_fmt(struct client *c, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void out_fmt(struct client *c, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	out_add(c, buf, n < (int)sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
}

static void out_bulk(struct client *c, const void *p, size_t n)
{
	out_fmt(c, "$%zu\r\n", n);
	out_add(c, p, n);
	out_add(c, "\r\n", 2);
}

static void out_str(struct client *c, const char *s)
{
	out_bulk(c, s, strlen(s));
}

/* An error reply: one line, whatever the paths in it hold. */
static void out_error(struct client *c, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void out_error(struct client *c, const char *fmt, ...)
{
	char buf[1024], *p;
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	for (p = buf; *p; p++)
		if (*p == '\r' || *p == '\n')
			*p = ' ';
	out_fmt(c, "-%s\r\n", buf);
}

#define MAX_ARGS 64

static bool eq(const char *a, size_t n, const char *word)
{
	return strlen(word) == n && !strncasecmp(a, word, n);
}

static cowmm_t *mm;
static int port = 7379;
static size_t heap_size;
/* SHUTDOWN: exit the loop, with this status; -1 until then. */
static int exit_status = -1;

/* The dump's directory, absolute as Redis gives its dir. */
static void dump_dir(char dir[PATH_MAX])
{
	char d[PATH_MAX], *slash;

	snprintf(d, sizeof(d), "%s", dump_path);
	slash = strrchr(d, '/');
	if (!slash)
		snprintf(d, sizeof(d), ".");
	else
		slash[slash == d] = '\0'; /* "/dump" keeps its "/" */
	if (!realpath(d, dir))
		snprintf(dir, PATH_MAX, "%s", d);
}

/*
 * CONFIG GET pattern...: name and value of each parameter that a glob
 * pattern matches, as Redis answers (redis-benchmark asks for save and
 * appendonly).  kvstore has no timed save points: save is "" with
 * --no-save, else "shutdown" (it saves on SHUTDOWN and SIGTERM).
 */
static void config_get(struct client *c, char **a, size_t *l, int argc)
{
	char dir[PATH_MAX], num[2][32];
	const char *base = strrchr(dump_path, '/');
	const char *params[][2] = {
		{ "save", save_on_exit ? "shutdown" : "" },
		{ "appendonly", "no" },
		{ "dbfilename", base ? base + 1 : dump_path },
		{ "dir", dir },
		{ "port", num[0] },
		{ "maxmemory", num[1] },
	};
	bool hit[sizeof(params) / sizeof(params[0])] = { false };
	size_t i, n = 0;
	int j;

	dump_dir(dir);
	snprintf(num[0], sizeof(num[0]), "%d", port);
	snprintf(num[1], sizeof(num[1]), "%zu", heap_size);
	for (j = 2; j < argc; j++) {
		char pat[256];

		snprintf(pat, sizeof(pat), "%.*s", (int)l[j], a[j]);
		for (i = 0; i < sizeof(params) / sizeof(params[0]); i++)
			if (!hit[i] &&
			    !fnmatch(pat, params[i][0], FNM_CASEFOLD)) {
				hit[i] = true;
				n++;
			}
	}
	out_fmt(c, "*%zu\r\n", 2 * n);
	for (i = 0; i < sizeof(params) / sizeof(params[0]); i++)
		if (hit[i]) {
			out_str(c, params[i][0]);
			out_str(c, params[i][1]);
		}
}

/*
 * SHUTDOWN [SAVE|NOSAVE], as Redis: save first if persistence is on (no
 * --no-save) or SAVE says so, never with NOSAVE.  A failed save keeps the
 * server up and says why; otherwise the connection closes unanswered.
 */
static void shutdown_cmd(struct client *c, char **a, size_t *l, int argc)
{
	bool save_it = save_on_exit;
	char why[WHY_MAX];

	if (argc > 2 || (argc == 2 && !eq(a[1], l[1], "SAVE") &&
			 !eq(a[1], l[1], "NOSAVE"))) {
		out_error(c, "ERR syntax error: SHUTDOWN [SAVE|NOSAVE]");
		return;
	}
	if (argc == 2)
		save_it = eq(a[1], l[1], "SAVE");
	if (save_it && save_at_exit(why)) {
		fprintf(stderr, "kvstore: SHUTDOWN: save to %s failed: %s; not "
				"shutting down\n",
			dump_path, why);
		out_error(c,
			  "ERR Errors trying to SHUTDOWN: save to %s "
			  "failed: %s",
			  dump_path, why);
		return;
	}
	fprintf(stderr, "kvstore: SHUTDOWN%s\n",
		save_it ? "" : ": exiting without saving");
	exit_status = 0;
}

static void info(struct client *c)
{
	struct cowmm_stats st = { 0 };
	char buf[1024];
	int n;

	cowmm_stats(mm, &st, sizeof(st));
	n = snprintf(
		buf, sizeof(buf),
		"# Persistence\r\nloading:0\r\nrdb_bgsave_in_progress:%d\r\n"
		"rdb_last_save_time:%lld\r\nrdb_last_bgsave_status:%s\r\n"
		"rdb_last_bgsave_time_sec:%lld\r\n"
		"rdb_last_bgsave_duration_ms:%lld\r\n"
		"rdb_last_bgsave_pause_ms:%.3f\r\nbgsave_method:%s\r\n"
		"# Keyspace\r\ndb0:keys=%" PRIu64 ",expires=0\r\n"
		"# Memory\r\nused_memory:%" PRIu64 "\r\n"
		"# cowmm\r\ncowmm_wp_faults:%" PRIu64 "\r\n"
		"cowmm_copies:%" PRIu64 "\r\n",
		(int)atomic_load(&save.running),
		(long long)atomic_load(&save.last_save),
		atomic_load(&save.last_status) ? "err" : "ok",
		(long long)atomic_load(&save.last_ms) / 1000,
		(long long)atomic_load(&save.last_ms), save.pause_ms,
		use_fork ? "fork" : "cowmm", H->count, H->top, st.wp_faults,
		st.copies);

	out_bulk(c, buf, n);
}

static void command(struct client *c, char **a, size_t *l, int argc)
{
	struct entry *e;
	int i, n;

	if (eq(a[0], l[0], "PING")) {
		if (argc > 1)
			out_bulk(c, a[1], l[1]);
		else
			out_add(c, "+PONG\r\n", 7);
	} else if (eq(a[0], l[0], "SET") && argc >= 3) {
		if (set(a[1], l[1], a[2], l[2]))
			out_add(c, "+OK\r\n", 5);
		else
			out_fmt(c, "-OOM heap full\r\n");
	} else if (eq(a[0], l[0], "GET") && argc == 2) {
		e = lookup(a[1], l[1], NULL);
		if (e)
			out_bulk(c, e->data + e->klen, e->vlen);
		else
			out_add(c, "$-1\r\n", 5);
	} else if ((eq(a[0], l[0], "DEL") || eq(a[0], l[0], "EXISTS")) &&
		   argc >= 2) {
		bool d = eq(a[0], l[0], "DEL");

		for (n = 0, i = 1; i < argc; i++)
			n += d ? del(a[i], l[i]) : !!lookup(a[i], l[i], NULL);
		out_fmt(c, ":%d\r\n", n);
	} else if (eq(a[0], l[0], "DBSIZE")) {
		out_fmt(c, ":%" PRIu64 "\r\n", H->count);
	} else if (eq(a[0], l[0], "FLUSHALL") || eq(a[0], l[0], "FLUSHDB")) {
		heap_init(H->size);
		out_add(c, "+OK\r\n", 5);
	} else if (eq(a[0], l[0], "SAVE")) {
		char why[WHY_MAX];

		if (atomic_load(&save.running))
			out_error(c, "ERR Background save already in progress");
		else if (save_now(why))
			out_error(c, "ERR save to %s failed: %s", dump_path,
				  why);
		else
			out_add(c, "+OK\r\n", 5);
	} else if (eq(a[0], l[0], "BGSAVE")) {
		char why[WHY_MAX];
		int ret = bgsave(why);

		if (ret == -EBUSY)
			out_error(c, "ERR Background save already in progress");
		else if (ret)
			out_error(c, "ERR bgsave to %s failed: %s", dump_path,
				  why);
		else
			out_fmt(c, "+Background saving started\r\n");
	} else if (eq(a[0], l[0], "LASTSAVE")) {
		out_fmt(c, ":%lld\r\n", (long long)atomic_load(&save.last_save));
	} else if (eq(a[0], l[0], "INFO")) {
		info(c);
	} else if (eq(a[0], l[0], "CONFIG") && argc >= 3 &&
		   eq(a[1], l[1], "GET")) {
		config_get(c, a, l, argc);
	} else if (eq(a[0], l[0], "CONFIG")) {
		out_error(c, "ERR kvstore answers CONFIG GET pattern... only");
	} else if (eq(a[0], l[0], "COMMAND")) {
		out_add(c, "*0\r\n", 4); /* no command table to report */
	} else if (eq(a[0], l[0], "SHUTDOWN")) {
		shutdown_cmd(c, a, l, argc);
	} else if (eq(a[0], l[0], "QUIT")) {
		out_add(c, "+OK\r\n", 5);
		c->close_after = true;
	} else {
		out_fmt(c, "-ERR unknown command or wrong arguments '%.*s'\r\n",
			(int)(l[0] > 64 ? 64 : l[0]), a[0]);
	}
}

/* Parse and run every complete command in the input buffer. */
static bool parse(struct client *c)
{
	size_t pos = 0;

	while (pos < c->in_len && exit_status < 0) {
		char *a[MAX_ARGS], *p = c->in + pos, *end = c->in + c->in_len;
		size_t l[MAX_ARGS];
		long argc, i;
		char *nl;

		if (*p != '*') { /* inline command, as typed into telnet */
			nl = memchr(p, '\n', end - p);
			if (!nl)
				break;
			argc = 0;
			for (char *t = p; t < nl && argc < MAX_ARGS;) {
				while (t < nl && (*t == ' ' || *t == '\r'))
					t++;
				if (t >= nl)
					break;
				a[argc] = t;
				while (t < nl && *t != ' ' && *t != '\r')
					t++;
				l[argc] = t - a[argc];
				argc++;
			}
			pos = nl + 1 - c->in;
			if (argc)
				command(c, a, l, argc);
			continue;
		}
		nl = memchr(p, '\n', end - p);
		if (!nl)
			break;
		argc = strtol(p + 1, NULL, 10);
		if (argc <= 0 || argc > MAX_ARGS)
			return false;
		p = nl + 1;
		for (i = 0; i < argc; i++) {
			long n;

			if (p >= end)
				goto partial;
			if (*p != '$')
				return false;
			nl = memchr(p, '\n', end - p);
			if (!nl)
				goto partial;
			n = strtol(p + 1, NULL, 10);
			if (n < 0 || n > (512L << 20))
				return false;
			p = nl + 1;
			if (end - p < n + 2)
				goto partial;
			a[i] = p;
			l[i] = n;
			p += n + 2;
		}
		pos = p - c->in;
		command(c, a, l, (int)argc);
	}
partial:
	memmove(c->in, c->in + pos, c->in_len - pos);
	c->in_len -= pos;
	return true;
}

/* ------------------------------------------------------------------------ */
/* Server */

static volatile sig_atomic_t stop; /* SIGINT or SIGTERM, not handled yet */

static void on_signal(int sig)
{
	stop = sig;
}

/*
 * SIGTERM or SIGINT: SHUTDOWN's default, save (unless --no-save), then
 * exit.  A save that fails keeps the server up, as Redis does, and says
 * so; the next signal exits without saving, with status 1.
 */
static void on_stop(int sig)
{
	static bool failed;
	const char *name = sig == SIGINT ? "SIGINT" : "SIGTERM";
	char why[WHY_MAX];

	if (!save_on_exit) {
		exit_status = 0;
	} else if (failed) {
		fprintf(stderr, "kvstore: %s again: exiting without saving\n",
			name);
		exit_status = 1;
	} else if (save_at_exit(why)) {
		fprintf(stderr,
			"kvstore: %s: save to %s failed: %s; not exiting "
			"(SHUTDOWN NOSAVE or another signal exits without "
			"saving)\n",
			name, dump_path, why);
		failed = true;
	} else {
		exit_status = 0;
	}
}

/* Parse --OPT ARG as a number from @min to @max, or exit saying why. */
static long num_arg(const char *opt, const char *arg, long min, long max,
		    const char *what)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(arg, &end, 10);
	if (!*arg || *end || errno || v < min || v > max)
		errx(2, "bad %s '%s': %s from %ld to %ld", opt, arg, what, min,
		     max);
	return v;
}

static void usage(FILE *f, const char *argv0)
{
	fprintf(f,
		"usage: %s [OPTION]...\n"
		"An in-memory key-value server speaking the Redis protocol "
		"(RESP) on\n"
		"127.0.0.1, whose BGSAVE snapshots its heap with libcowmm "
		"instead of fork().\n"
		"\n"
		"  -p, --port N       TCP port on 127.0.0.1 (default 7379)\n"
		"  -m, --heap MiB     size of the heap that holds every key "
		"and value, fixed\n"
		"                     at start (default 1024); a dump loads "
		"only into a heap\n"
		"                     of the size it was saved from\n"
		"  -d, --dump FILE    the dump: loaded at start if it exists, "
		"written by SAVE,\n"
		"                     BGSAVE, SHUTDOWN, SIGTERM and SIGINT "
		"(default\n"
		"                     kvstore.dump, in the current "
		"directory)\n"
		"      --no-save      no save on SHUTDOWN, SIGTERM or SIGINT "
		"(Redis's save \"\");\n"
		"                     SAVE, BGSAVE and SHUTDOWN SAVE still "
		"save (default: save)\n"
		"  -f, --fork         BGSAVE forks a child that writes the "
		"heap, as Redis does\n"
		"                     (default: a libcowmm snapshot, streamed "
		"by a thread)\n"
		"  -H, --thp          the heap on transparent huge pages "
		"(default: 4 KiB pages)\n"
		"  -C, --huge-cow     copy whole 2 MiB pages on write; implies "
		"--thp\n"
		"                     (default off)\n"
		"  -T, --in-thread    resolve write faults in the writing "
		"thread\n"
		"                     (COWMM_OPEN_IN_THREAD; default: "
		"libcowmm's workers)\n"
		"  -F, --follow       libcowmm's worker follows the writer's "
		"CPU\n"
		"                     (COWMM_OPEN_FOLLOW; default: where the "
		"scheduler\n"
		"                     puts it)\n"
		"  -K, --keep-armed   BGSAVE writes the whole snapshot, then "
		"releases it\n"
		"                     (default: released as it is written)\n"
		"  -n, --save-nice N  nice value of the saving thread or "
		"child, -20 to 19\n"
		"                     (default 0: the server's)\n"
		"  -h, --help         this text\n"
		"\n"
		"Commands: PING, SET, GET, DEL, EXISTS, DBSIZE, FLUSHALL, "
		"FLUSHDB, SAVE,\n"
		"BGSAVE, LASTSAVE, INFO, CONFIG GET, COMMAND, "
		"SHUTDOWN [SAVE|NOSAVE], QUIT.\n",
		argv0);
}

static void log_stderr(enum cowmm_log_level level, const char *msg, void *d)
{
	(void)d;
	fprintf(stderr, "kvstore: cowmm[%d]: %s\n", level, msg);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "port", required_argument, NULL, 'p' },
		{ "heap", required_argument, NULL, 'm' },
		{ "dump", required_argument, NULL, 'd' },
		{ "fork", no_argument, NULL, 'f' },
		{ "thp", no_argument, NULL, 'H' },
		{ "huge-cow", no_argument, NULL, 'C' },
		{ "in-thread", no_argument, NULL, 'T' },
		{ "follow", no_argument, NULL, 'F' },
		{ "keep-armed", no_argument, NULL, 'K' },
		{ "save-nice", required_argument, NULL, 'n' },
		{ "no-save", no_argument, NULL, 'N' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	struct pollfd *pfd = NULL;
	struct client **cl = NULL;
	size_t ncl = 0, heap_mib = 1024;
	struct sockaddr_in sa = { .sin_family = AF_INET };
	/* A save's writes sweep the heap: fault-around pays off there. */
	struct cowmm_config cfg = {
		.size = sizeof(cfg),
		.fault_around = COWMM_FAULT_AROUND_SEQUENTIAL,
	};
	char why[WHY_MAX];
	unsigned flags = 0;
	int ls, one = 1, opt, ret;

	while ((opt = getopt_long(argc, argv, "p:m:d:fHCTFKn:h", opts, NULL)) !=
	       -1) {
		switch (opt) {
		case 'p':
			port = (int)num_arg("--port", optarg, 1, 65535,
					    "a TCP port");
			break;
		case 'm': /* the region's size must fit a size_t */
			heap_mib = (size_t)num_arg("--heap", optarg, 1,
						   (long)(SIZE_MAX >> 21),
						   "a size in MiB");
			break;
		case 'd':
			dump_path = optarg;
			break;
		case 'f':
			use_fork = true;
			break;
		case 'H':
			flags |= COWMM_REGION_THP;
			break;
		case 'C': /* copy whole huge pages: implies --thp */
			flags |= COWMM_REGION_THP | COWMM_REGION_HUGE_COW;
			break;
		case 'T':
			cfg.flags |= COWMM_OPEN_IN_THREAD;
			break;
		case 'F':
			cfg.flags |= COWMM_OPEN_FOLLOW;
			break;
		case 'K':
			keep_armed = true;
			break;
		case 'n':
			save_nice = (int)num_arg("--save-nice", optarg, -20,
						 19, "a nice value");
			break;
		case 'N':
			save_on_exit = false;
			break;
		case 'h':
			usage(stdout, argv[0]);
			return 0;
		default:
			fprintf(stderr, "Try '%s --help' for more.\n",
				argv[0]);
			return 2;
		}
	}
	if (optind < argc)
		errx(2, "unexpected argument '%s' (try --help)", argv[optind]);
	if (!*dump_path)
		errx(2, "bad --dump '': a file name");
	heap_size = heap_mib << 20;

	cowmm_set_log(log_stderr, NULL);
	ret = cowmm_open(&cfg, &mm);
	if (ret)
		errx(1, "cowmm_open: %s", cowmm_strerror(ret));
	ret = cowmm_region_alloc(mm, heap_size, flags, &region);
	if (ret)
		errx(1, "cowmm_region_alloc of a %zu MiB heap (--heap): %s",
		     heap_mib, cowmm_strerror(ret));
	heap = cowmm_region_base(region);
	H = (struct heap_hdr *)heap;
	ret = load_dump(heap_size, why);
	if (ret < 0)
		errx(1, "%s", why);
	if (ret > 0 && !heap_init(heap_size))
		errx(1, "heap of %zu MiB too small", heap_mib);
	fprintf(stderr, "kvstore: %" PRIu64 " keys %s %s; %s BGSAVE\n",
		H->count, ret ? "(new heap)" : "loaded from", ret ? "" : dump_path,
		use_fork ? "fork()" : "libcowmm");

	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (ls < 0)
		err(1, "socket");
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	sa.sin_port = htons(port);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(ls, 128) < 0)
		err(1, "listen on 127.0.0.1:%d", port);
	fprintf(stderr, "kvstore: listening on 127.0.0.1:%d\n", port);

	while (exit_status < 0) {
		size_t i;

		if (stop) {
			int sig = stop;

			stop = 0;
			on_stop(sig);
			if (exit_status >= 0)
				break;
		}

		pfd = realloc(pfd, (ncl + 1) * sizeof(*pfd));
		if (!pfd)
			err(1, "realloc");
		pfd[0] = (struct pollfd){ .fd = ls, .events = POLLIN };
		for (i = 0; i < ncl; i++)
			pfd[i + 1] = (struct pollfd){
				.fd = cl[i]->fd,
				.events = POLLIN | (cl[i]->out_len ? POLLOUT : 0),
			};
		if (poll(pfd, ncl + 1, 100) < 0) {
			if (errno == EINTR)
				continue;
			err(1, "poll");
		}
		bgsave_poll();
		for (i = 0; i < ncl; i++) {
			struct client *c = cl[i];
			short ev = pfd[i + 1].revents;
			bool drop = false;

			if (ev & (POLLIN | POLLHUP | POLLERR)) {
				ssize_t n;

				if (c->in_cap - c->in_len < 65536) {
					c->in_cap = c->in_cap ? c->in_cap * 2
							      : 131072;
					c->in = realloc(c->in, c->in_cap);
					if (!c->in)
						err(1, "realloc");
				}
				n = read(c->fd, c->in + c->in_len,
					 c->in_cap - c->in_len);
				if (n > 0) {
					c->in_len += n;
					drop = !parse(c);
				} else if (n == 0 ||
					   (errno != EAGAIN && errno != EINTR)) {
					drop = true;
				}
			}
			if (!drop && c->out_len) {
				ssize_t n = write(c->fd, c->out, c->out_len);

				if (n > 0) {
					memmove(c->out, c->out + n,
						c->out_len - n);
					c->out_len -= n;
				} else if (n < 0 && errno != EAGAIN) {
					drop = true;
				}
			}
			c->dead = drop || (c->close_after && !c->out_len);
		}
		for (i = 0; i < ncl;) {
			struct client *c = cl[i];

			if (!c->dead) {
				i++;
				continue;
			}
			close(c->fd);
			free(c->in);
			free(c->out);
			free(c);
			cl[i] = cl[--ncl];
		}
		if (pfd[0].revents & POLLIN) {
			int fd = accept4(ls, NULL, NULL,
					 SOCK_NONBLOCK | SOCK_CLOEXEC);
			struct client *c;

			if (fd >= 0 && (c = calloc(1, sizeof(*c)))) {
				setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
					   sizeof(one));
				c->fd = fd;
				cl = realloc(cl, (ncl + 1) * sizeof(*cl));
				if (!cl)
					err(1, "realloc");
				cl[ncl++] = c;
			} else if (fd >= 0) {
				close(fd);
			}
		}
	}
	fprintf(stderr, "kvstore: shutting down\n");
	bgsave_wait();
	while (ncl--) {
		close(cl[ncl]->fd);
		free(cl[ncl]->in);
		free(cl[ncl]->out);
		free(cl[ncl]);
	}
	free(cl);
	free(pfd);
	close(ls);
	cowmm_region_release(region);
	cowmm_close(mm);
	return exit_status;
}
