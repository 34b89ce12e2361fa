// SPDX-License-Identifier: MIT
/*
 * cowmmd: takes snapshots of other processes' memory to files while they
 * run.  A client hands over a userfaultfd with its ranges registered in
 * write-protect mode and a pidfd (cowmm_attach_daemon()); cowmmctl asks for
 * snapshots and schedules over the same socket.
 *
 * A snapshot: stop the client's threads (ptrace, for the arming only),
 * write-protect its ranges, let it run.  This loop thread then handles its
 * write faults: the old bytes of a page go to a frame (process_vm_readv)
 * before the page is unprotected.  A pool thread streams the files,
 * unprotecting each run of pages once it is in the file (stream.c).
 */
#include <dirent.h>
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cowmm.h"
#include "cowmm_i.h"
#include "cowmmd.h"
#include "uffd.h"

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif

struct client {
	struct conn *conn; /* NULL once its connection is gone */
	unsigned id;
	char name[COWMMD_NAME_MAX + 1];
	pid_t pid;
	uid_t uid;
	int uffd, pidfd;
	uv_poll_t uffd_poll, pidfd_poll;
	uv_timer_t timer, retry_timer;
	unsigned handles; /* libuv handles not yet closed */
	unsigned nregions;
	struct dregion r[COWMMD_MAX_RANGES];
	size_t npages;
	struct dsnap *snap; /* in flight */
	uint64_t seq;
	uint64_t period_ms;
	unsigned keep;
	uint64_t kept[KEEP_MAX]; /* sequence numbers on disk, oldest first */
	unsigned nkept;
	uint64_t retry[RETRY_MAX]; /* pages to unprotect after EAGAIN */
	unsigned nretry;
	bool gone, closing, bye;
	/* numbers for cowmmctl */
	uint64_t faults, copies, snaps_ok, snaps_failed, bytes;
	atomic_uint_fast64_t ev_started, ev_done; /* event batches */
	uint64_t last_pause_us, last_ms;
	int last_err;
	char last[PATH_MAX];
	struct client *next;
};

enum conn_kind { CONN_NEW, CONN_CLIENT, CONN_CTL };

struct conn {
	uv_poll_t poll;
	int fd;
	uid_t uid;
	pid_t pid;
	enum conn_kind kind;
	struct client *client;
	struct dsnap *waiting; /* a ctl waiting for this snapshot */
	uint64_t last_ns;      /* its last message: for the idle timeout */
	unsigned flags;
	bool closing;
	struct conn *next;
};

static struct {
	uv_loop_t *loop;
	uv_poll_t listen_poll;
	uv_signal_t sigint, sigterm;
	uv_timer_t idle_timer, backoff_timer;
	int dirfd; /* the snapshot directory, held open */
	bool activated; /* the socket came from systemd */
	uint64_t idle_ns;
	int listen_fd;
	char sock[108];
	char dir[PATH_MAX / 2];
	unsigned keep;
	uint64_t rate;
	unsigned next_id;
	unsigned signals;
	bool stopping;
	struct client *clients;
	struct conn *conns;
	uint64_t started;
	uint64_t run; /* start time, seconds since the epoch: in file names */
	uint64_t faults, copies, snaps_ok, snaps_failed, bytes;
	uint64_t refused;
} D = { .keep = 3, .next_id = 1, .idle_ns = IDLE_TIMEOUT_S * 1000000000ull };

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	struct timespec ts;
	struct tm tm;
	char when[32];
	va_list ap;

	clock_gettime(CLOCK_REALTIME, &ts);
	localtime_r(&ts.tv_sec, &tm);
	strftime(when, sizeof(when), "%H:%M:%S", &tm);
	fprintf(stderr, "cowmmd %s.%03ld: ", when, ts.tv_nsec / 1000000);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void log_lib(enum cowmm_log_level level, const char *msg, void *data)
{
	(void)data;
	if (level <= COWMM_LOG_WARNING)
		say("libcowmm: %s", msg);
}

/* ------------------------------------------------------------------------ */
/* Text and JSON replies */

struct out {
	char *buf;
	size_t len, cap;
	bool json;
};

static void outf(struct out *o, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void outf(struct out *o, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (o->len >= o->cap)
		return;
	va_start(ap, fmt);
	n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
	va_end(ap);
	if (n > 0)
		o->len = o->len + (size_t)n < o->cap ? o->len + (size_t)n
						     : o->cap;
}

/* A JSON string (names are sanitised; paths come from the operator). */
static void out_jstr(struct out *o, const char *s)
{
	outf(o, "\"");
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			outf(o, "\\%c", *s);
		else if ((unsigned char)*s < 0x20)
			outf(o, "\\u%04x", *s);
		else
			outf(o, "%c", *s);
	}
	outf(o, "\"");
}

static void send_reply(struct conn *cn, int status, const struct out *o)
{
	size_t len = sizeof(struct cowmmd_reply) + (o ? o->len : 0);
	struct cowmmd_reply *r = malloc(len);

	if (!r)
		return;
	r->h = (struct cowmmd_hdr){ COWMMD_MAGIC, COWMMD_VERSION,
				    COWMMD_REPLY, (uint32_t)len, 0 };
	r->status = status;
	if (o)
		memcpy(r->text, o->buf, o->len);
	if (send(cn->fd, r, len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
		say("ctl %d: reply lost: %s", cn->pid, strerror(errno));
	free(r);
}

static void reply_error(struct conn *cn, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void reply_error(struct conn *cn, int err, const char *fmt, ...)
{
	char text[512];
	struct out o = { text, 0, sizeof(text), false };
	char msg[400];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (cn->flags & COWMMD_CTL_JSON) {
		outf(&o, "{\"error\": ");
		out_jstr(&o, msg);
		outf(&o, ", \"errno\": %d}\n", -err);
	} else {
		outf(&o, "%s\n", msg);
	}
	send_reply(cn, err, &o);
}

/* ------------------------------------------------------------------------ */
/* Connections and clients: lifetime */

static void conn_close(struct conn *cn);
static void client_close(struct client *c, int why);
static void maybe_exit(void);

static void conn_closed(uv_handle_t *h)
{
	struct conn *cn = h->data, **pp;

	for (pp = &D.conns; *pp; pp = &(*pp)->next)
		if (*pp == cn) {
			*pp = cn->next;
			break;
		}
	close(cn->fd);
	free(cn);
	maybe_exit();
}

static void conn_close(struct conn *cn)
{
	struct dsnap *s = cn->waiting;
	unsigned i;

	if (cn->closing)
		return;
	cn->closing = true;
	if (s) /* stop waiting: the snapshot goes on */
		for (i = 0; i < s->nwaiters; i++)
			if (s->waiters[i] == cn)
				s->waiters[i] = NULL;
	if (cn->client) {
		cn->client->conn = NULL;
		client_close(cn->client, -ECONNRESET);
	}
	uv_close((uv_handle_t *)&cn->poll, conn_closed);
}

static void client_handle_closed(uv_handle_t *h)
{
	struct client *c = h->data, **pp;

	if (--c->handles)
		return;
	for (pp = &D.clients; *pp; pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	free(c);
	maybe_exit();
}

/*
 * The end of a client: once no snapshot of it is in flight, close the
 * userfaultfd, which unregisters its ranges and wakes any waiting writer.
 */
static void client_finish(struct client *c)
{
	struct cowmmd_hdr bye = { COWMMD_MAGIC, COWMMD_VERSION, COWMMD_BYE,
				  sizeof(bye), 0 };

	if (c->closing)
		return;
	c->closing = true;
	close(c->uffd);
	close(c->pidfd);
	c->uffd = c->pidfd = -1;
	if (c->conn && c->bye)
		(void)send(c->conn->fd, &bye, sizeof(bye),
			   MSG_NOSIGNAL | MSG_DONTWAIT);
	if (c->conn) {
		c->conn->client = NULL;
		conn_close(c->conn);
		c->conn = NULL;
	}
	uv_close((uv_handle_t *)&c->uffd_poll, client_handle_closed);
	uv_close((uv_handle_t *)&c->pidfd_poll, client_handle_closed);
	uv_close((uv_handle_t *)&c->timer, client_handle_closed);
	uv_close((uv_handle_t *)&c->retry_timer, client_handle_closed);
}

static void client_close(struct client *c, int why)
{
	if (c->gone)
		return;
	c->gone = true;
	if (why != -ECANCELED)
		say("client %u (%s, pid %d): gone (%s)", c->id, c->name,
		    c->pid, strerror(-why));
	else
		say("client %u (%s, pid %d): detached", c->id, c->name,
		    c->pid);
	if (c->snap) { /* finish when the stream returns */
		int zero = 0;

		atomic_compare_exchange_strong(&c->snap->err, &zero, why);
		return;
	}
	client_finish(c);
}

static void maybe_exit(void)
{
	if (!D.stopping || D.clients || D.conns)
		return;
	if (!uv_is_closing((uv_handle_t *)&D.sigint)) {
		uv_close((uv_handle_t *)&D.sigint, NULL);
		uv_close((uv_handle_t *)&D.sigterm, NULL);
		uv_close((uv_handle_t *)&D.idle_timer, NULL);
		uv_close((uv_handle_t *)&D.backoff_timer, NULL);
	}
}

/* ------------------------------------------------------------------------ */
/* Write faults */

static void process_events(struct client *c);
static void on_retry(uv_timer_t *t);
static int loop_wp(struct client *c, uint64_t addr, uint64_t len, bool on);

/* The page of a snapshot in flight at @addr, by the snapshot's own list. */
static bool page_of(const struct dsnap *s, uint64_t addr, size_t *pg)
{
	unsigned i;

	for (i = 0; i < s->nregions; i++)
		if (!s->r[i].gone && addr - s->r[i].addr < s->r[i].len) {
			*pg = s->r[i].first + (addr - s->r[i].addr) / PAGE;
			return true;
		}
	return false;
}

static void abandon(struct client *c, int err, const char *why)
{
	int zero = 0;

	if (c->snap && atomic_compare_exchange_strong(&c->snap->err, &zero,
						      err))
		say("client %u: snapshot %llu abandoned: %s", c->id,
		    (unsigned long long)c->snap->seq, why);
}

/*
 * Hand a page whose old bytes the snapshot still needs to the copier
 * thread: it reads them, then unprotects the page and wakes the writer.
 * Never here: a read of the client's memory may fault into a userfaultfd
 * the client controls, and this thread must keep serving everyone else.
 */
static void queue_copy(struct dsnap *s, size_t pg, uint64_t addr)
{
	if (s->queued[pg])
		return; /* the copier wakes every writer of the page */
	s->queued[pg] = 1;
	pthread_mutex_lock(&s->qlock);
	if (s->qhead == s->qtail)
		pthread_cond_signal(&s->qcond);
	s->queue[s->qtail++] = addr;
	pthread_mutex_unlock(&s->qlock);
}

/*
 * Resolve a write fault at @addr: keep the old bytes if the snapshot in
 * flight still needs them, then unprotect and wake.  An ioctl held back by
 * a pending event (-EAGAIN) is retried through here again, after the event
 * is read: a snapshot armed meanwhile gets its copy first.
 */
static void resolve(struct client *c, uint64_t addr)
{
	struct dsnap *s = c->snap;
	size_t pg;
	int ret;

	if (s && page_of(s, addr, &pg) &&
	    atomic_load(&s->state[pg]) == PG_NONE) {
		queue_copy(s, pg, addr);
		return;
	}
	ret = cowmm__uffd_wp(c->uffd, addr, PAGE, false, true);
	if (ret != -EAGAIN)
		return;
	if (c->nretry == RETRY_MAX) { /* never drop one: it would hang */
		abandon(c, -EAGAIN, "too many faults held back");
		(void)loop_wp(c, addr, PAGE, false);
		return;
	}
	c->retry[c->nretry++] = addr;
	uv_timer_start(&c->retry_timer, on_retry, 1, 0);
}

static void missing_fault(struct client *c, uint64_t addr);

static void on_retry(uv_timer_t *t)
{
	struct client *c = t->data;
	unsigned i, n = c->nretry;
	uint64_t *todo = malloc(n * sizeof(*todo));

	if (!todo) {
		uv_timer_start(&c->retry_timer, on_retry, 1, 0);
		return;
	}
	/* Retries that fail again append to c->retry: work on a copy. */
	memcpy(todo, c->retry, n * sizeof(*todo));
	c->nretry = 0;
	process_events(c);
	for (i = 0; i < n; i++)
		if (todo[i] & 1)
			missing_fault(c, todo[i] & ~1ull);
		else
			resolve(c, todo[i]);
	free(todo);
}

/*
 * A missing (or minor) fault on the client's userfaultfd: the client
 * registered its ranges for more than write-protect faults after HELLO.
 * The faulting thread may be one of ours (the copier, a stream) reading
 * its memory: map a zero page so that it goes on, and drop the client.
 */
static void missing_fault(struct client *c, uint64_t addr)
{
	int ret = cowmm__uffd_zeropage(c->uffd, addr, PAGE, true);

	if (ret == -EAGAIN && c->nretry < RETRY_MAX) {
		c->retry[c->nretry++] = addr | 1; /* after the event is read */
		uv_timer_start(&c->retry_timer, on_retry, 1, 0);
	} else if (ret) {
		(void)cowmm__uffd_wake(c->uffd, addr, PAGE);
	}
	if (!c->gone) {
		say("client %u: a missing or minor fault at 0x%llx: its ranges "
		    "are registered for more than write-protect faults",
		    c->id, (unsigned long long)addr);
		abandon(c, -EPROTO, "the client registered missing faults");
		client_close(c, -EPROTO);
	}
}

static void handle_fault(struct client *c, const struct uffd_msg *m)
{
	uint64_t addr = m->arg.pagefault.address & ~(PAGE - 1);

	c->faults++;
	D.faults++;
	if (!(m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
		missing_fault(c, addr);
	else
		resolve(c, addr);
}

/*
 * Memory discarded, unmapped or moved: a snapshot in flight that still
 * needed any of it cannot be completed (the kernel zaps the pages as soon
 * as the event is read), and a region unmapped or moved is left out of
 * later snapshots.
 */
static void handle_gone(struct client *c, uint64_t start, uint64_t end,
			bool unmapped)
{
	struct dsnap *s = c->snap;
	unsigned i, k;

	/*
	 * The stream may have read these pages after the kernel zapped them:
	 * it checks this list after each read (see remote_read()).
	 */
	if (s) {
		k = atomic_load(&s->nremoved);
		if (k == MAX_REMOVED) {
			abandon(c, -EBUSY, "too many discards during the "
					   "snapshot");
		} else {
			s->removed[k][0] = start;
			s->removed[k][1] = end;
			atomic_store(&s->nremoved, k + 1);
		}
	}
	for (i = 0; i < c->nregions; i++) {
		struct dregion *r = &c->r[i];
		uint64_t lo = start > r->addr ? start : r->addr;
		uint64_t hi = end < r->addr + r->len ? end : r->addr + r->len;
		uint64_t a;

		if (r->gone || lo >= hi)
			continue;
		/* A region unmapped in part: the rest can no longer be read
		 * whole, so the snapshot cannot finish either. */
		if (s && unmapped && (lo != r->addr || hi != r->addr + r->len))
			abandon(c, -EBUSY, "the client unmapped part of a "
					   "region during the snapshot");
		for (a = lo & ~(PAGE - 1); s && a < hi; a += PAGE) {
			size_t pg = r->first + (a - r->addr) / PAGE;

			if (atomic_load(&s->state[pg]) == PG_NONE) {
				abandon(c, -EBUSY,
					"the client discarded memory the "
					"snapshot still needed");
				break;
			}
		}
		if (unmapped) {
			say("client %u: region %u unmapped; left out of "
			    "later snapshots",
			    c->id, i);
			r->gone = true;
		}
	}
}

static void process_events(struct client *c)
{
	struct uffd_msg msgs[64];
	ssize_t n;
	int i;

	if (c->uffd < 0)
		return;
	for (;;) {
		/* Batches read and dispatched: the stream waits on these. */
		atomic_fetch_add(&c->ev_started, 1);
		n = read(c->uffd, msgs, sizeof(msgs));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int err = errno;

			atomic_fetch_add(&c->ev_done, 1);
			if (err != EAGAIN)
				client_close(c, -err);
			return;
		}
		for (i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
			const struct uffd_msg *m = &msgs[i];

			switch (m->event) {
			case UFFD_EVENT_PAGEFAULT:
				handle_fault(c, m);
				break;
			case UFFD_EVENT_REMOVE:
				handle_gone(c, m->arg.remove.start,
					    m->arg.remove.end, false);
				break;
			case UFFD_EVENT_UNMAP:
				handle_gone(c, m->arg.remove.start,
					    m->arg.remove.end, true);
				break;
			case UFFD_EVENT_REMAP:
				handle_gone(c, m->arg.remap.from,
					    m->arg.remap.from + m->arg.remap.len,
					    true);
				break;
			default:
				break;
			}
		}
		atomic_fetch_add(&c->ev_done, 1);
	}
}

static void on_uffd(uv_poll_t *h, int status, int events)
{
	(void)status;
	(void)events;
	process_events(h->data);
}

static void on_pidfd(uv_poll_t *h, int status, int events)
{
	struct client *c = h->data;

	(void)status;
	(void)events;
	uv_poll_stop(h);
	client_close(c, -ESRCH); /* the process exited */
}

/* Write-protect or unprotect a range from the loop, reading events the
 * kernel holds the ioctl back for. */
static int loop_wp(struct client *c, uint64_t addr, uint64_t len, bool on)
{
	int ret, tries;

	for (tries = 0; tries < 2000; tries++) {
		ret = cowmm__uffd_wp(c->uffd, addr, len, on, true);
		if (ret != -EAGAIN)
			return ret;
		process_events(c);
		usleep(500);
	}
	return -ETIMEDOUT;
}

/* ------------------------------------------------------------------------ */
/* Helper threads */

/*
 * A thread of its own for work that may block on the client: ptrace
 * (waiting for its threads to stop) and reading its memory (a read may
 * fault into a userfaultfd it controls).  The loop learns that the thread
 * has exited from a pidfd of the thread (PIDFD_THREAD, Linux 6.9), which
 * turns readable only once the kernel has run exit_ptrace(): whatever
 * the thread left seized is detached and running by then.
 */
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL /* 6.9 */
#endif

struct helper {
	pthread_t th;
	int pidfd, err;
	uv_poll_t poll;
	uv_sem_t started;
	void (*run)(struct helper *h);	/* on the thread */
	void (*done)(struct helper *h); /* on the loop, once it exited */
	void *data;
	int result;
};

static void *helper_main(void *arg)
{
	struct helper *h = arg;

	h->pidfd = (int)syscall(SYS_pidfd_open, (pid_t)syscall(SYS_gettid),
				PIDFD_THREAD);
	h->err = h->pidfd < 0 ? -errno : 0;
	uv_sem_post(&h->started);
	if (h->err)
		return NULL;
	/* Userfaultfd ioctls come back with -EAGAIN: we retry, bounded. */
	cowmm__in_worker = true;
	h->run(h);
	return NULL;
}

static void helper_closed(uv_handle_t *hd)
{
	struct helper *h = hd->data;

	close(h->pidfd);
	h->done(h);
}

static void on_helper_exit(uv_poll_t *p, int status, int events)
{
	struct helper *h = p->data;

	(void)status;
	(void)events;
	uv_poll_stop(p);
	pthread_join(h->th, NULL); /* it has exited: no wait */
	uv_close((uv_handle_t *)p, helper_closed);
}

/* Start @h->run on a thread; @h->done follows on the loop.  -errno. */
static int helper_start(struct helper *h)
{
	int ret;

	if (uv_sem_init(&h->started, 0))
		return -ENOMEM;
	ret = -pthread_create(&h->th, NULL, helper_main, h);
	if (!ret) {
		uv_sem_wait(&h->started); /* the pidfd: microseconds */
		ret = h->err;
		if (ret)
			pthread_join(h->th, NULL);
	}
	uv_sem_destroy(&h->started);
	if (ret)
		return ret;
	uv_poll_init(D.loop, &h->poll, h->pidfd);
	h->poll.data = h;
	uv_poll_start(&h->poll, UV_READABLE, on_helper_exit);
	return 0;
}

/* ------------------------------------------------------------------------ */
/* The registration of the client's ranges */

/*
 * Every mapping that overlaps the ranges must be registered for
 * write-protect faults (smaps VmFlags "uw") and for nothing else: with
 * "um" (missing) or "ui" (minor) a read of the page by this daemon would
 * wait for a fault nobody here resolves.  Returns 0, -EPROTO (missing or
 * minor), -EINVAL (a range not registered) or -ESRCH.
 */
static int check_registration(pid_t pid, const struct dregion *r, unsigned n)
{
	char path[64], *line = NULL;
	unsigned long lo = 0, hi = 0;
	size_t cap = 0;
	bool in = false;
	int ret = 0;
	unsigned i;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/smaps", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return -ESRCH;
	while (!ret && getline(&line, &cap, f) > 0) {
		char perms[8];

		if (sscanf(line, "%lx-%lx %4s ", &lo, &hi, perms) == 3) {
			in = false;
			for (i = 0; i < n; i++)
				if (!r[i].gone && lo < r[i].addr + r[i].len &&
				    r[i].addr < hi)
					in = true;
			continue;
		}
		if (!in || strncmp(line, "VmFlags:", 8))
			continue;
		if (strstr(line, " um") || strstr(line, " ui"))
			ret = -EPROTO;
		else if (!strstr(line, " uw"))
			ret = -EINVAL;
		in = false;
	}
	free(line);
	fclose(f);
	return ret;
}

/* ------------------------------------------------------------------------ */
/* Stopping a client for the instant of a snapshot (on a helper thread) */

struct frozen {
	pid_t tid[1024];
	int sig[1024];
	unsigned n;
};

static bool frozen_has(const struct frozen *f, pid_t tid)
{
	unsigned i;

	for (i = 0; i < f->n; i++)
		if (f->tid[i] == tid)
			return true;
	return false;
}

/*
 * Detach every thread that stopped.  One interrupted but not stopped yet
 * (asleep in vfork(), say) cannot be detached: the helper thread's exit
 * detaches it, and the loop goes on only after that exit.
 */
static void thaw(struct frozen *f)
{
	unsigned i;

	for (i = 0; i < f->n; i++)
		if (f->tid[i])
			(void)ptrace(PTRACE_DETACH, f->tid[i], 0, f->sig[i]);
	f->n = 0;
}

/* Wait for thread @i to stop (the client's other threads stay stopped). */
static int wait_stopped(struct frozen *f, unsigned i, uint64_t deadline)
{
	int st;

	for (;;) {
		pid_t r = waitpid(f->tid[i], &st, __WALL | WNOHANG);

		if (r == f->tid[i]) {
			if (WIFEXITED(st) || WIFSIGNALED(st)) {
				f->tid[i] = 0;
				return 0;
			}
			if (WIFSTOPPED(st) && st >> 16 != PTRACE_EVENT_STOP &&
			    WSTOPSIG(st) != SIGTRAP)
				f->sig[i] = WSTOPSIG(st); /* deliver later */
			return 0;
		}
		if (r < 0 && errno == ECHILD) {
			f->tid[i] = 0;
			return 0;
		}
		if (now_ns() > deadline)
			return -ETIMEDOUT;
		usleep(100);
	}
}

/*
 * Stop every thread of the client (PTRACE_SEIZE + PTRACE_INTERRUPT: no
 * signal, invisible to its parent), again until no new thread appears.
 */
static int freeze(pid_t pid, struct frozen *f)
{
	uint64_t deadline = now_ns() + 2000000000ull;
	char path[32];
	int round, ret = 0;

	snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
	for (round = 0; round < 16; round++) {
		struct dirent *e;
		unsigned first = f->n, i;
		DIR *d = opendir(path);

		if (!d)
			return -ESRCH;
		while ((e = readdir(d))) {
			pid_t tid = (pid_t)atoi(e->d_name);

			if (tid <= 0 || frozen_has(f, tid))
				continue;
			if (f->n == 1024) {
				ret = -E2BIG;
				break;
			}
			if (ptrace(PTRACE_SEIZE, tid, 0, 0) < 0) {
				if (errno == ESRCH)
					continue;
				ret = -errno;
				break;
			}
			f->tid[f->n] = tid;
			f->sig[f->n++] = 0;
			if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0 &&
			    errno != ESRCH) {
				ret = -errno;
				break;
			}
		}
		closedir(d);
		for (i = first; !ret && i < f->n; i++)
			ret = wait_stopped(f, i, deadline);
		if (ret || f->n == first)
			break;
	}
	/* Still new threads after 16 rounds: not stopped, not an instant. */
	if (!ret && round == 16)
		ret = -EAGAIN;
	return ret;
}

/* Write-protect or unprotect from a helper thread while the loop reads
 * the events the kernel holds the ioctl back for. */
static int wp_retry(int uffd, uint64_t addr, uint64_t len, bool on,
		    uint64_t deadline)
{
	int ret;

	for (;;) {
		ret = cowmm__uffd_wp(uffd, addr, len, on, true);
		if (ret != -EAGAIN)
			return ret;
		if (now_ns() > deadline)
			return -ETIMEDOUT;
		usleep(100);
	}
}

/* The helper thread that arms a snapshot: stop, check, protect, resume. */
static void arm_thread(struct helper *h)
{
	struct dsnap *s = h->data;
	struct frozen *f = calloc(1, sizeof(*f));
	unsigned i;
	int ret;

	if (!f) {
		h->result = -ENOMEM;
		return;
	}
	ret = freeze(s->pid, f);
	/* Stopped: the registration cannot change under us any more. */
	if (!ret)
		ret = check_registration(s->pid, s->r, s->nregions);
	for (i = 0; !ret && i < s->nregions; i++)
		if (!s->r[i].gone)
			ret = wp_retry(s->uffd, s->r[i].addr, s->r[i].len,
				       true, now_ns() + 2000000000ull);
	thaw(f);
	s->pause_ns = now_ns() - s->t_start;
	free(f);
	h->result = ret;
}

/* ------------------------------------------------------------------------ */
/* Snapshots */

static void snapshot_done(uv_work_t *w, int status);
static void snapshot_finish(struct dsnap *s);

static void free_dsnap(struct dsnap *s)
{
	size_t i;

	if (s->frames)
		for (i = 0; i < s->npages; i++)
			free(s->frames[i]);
	free(s->frames);
	free((void *)s->state);
	free(s->queue);
	free(s->queued);
	pthread_mutex_destroy(&s->qlock);
	pthread_cond_destroy(&s->qcond);
	free(s);
}

/*
 * NAME-PID-RUN.ID-SEQ, in the snapshot directory: RUN (the daemon's start, in seconds) and the
 * client id keep names unique across attaches and daemon restarts.
 */
static void snapshot_name(char *buf, size_t n, const char *pre,
			  const struct client *c, uint64_t seq,
			  const char *suf)
{
	snprintf(buf, n, "%s%s-%d-%llu.%u-%llu%s", pre, c->name,
		 (int)c->pid, (unsigned long long)D.run, c->id,
		 (unsigned long long)seq, suf);
}

/* Everything relative to the directory held open; nothing followed. */
static int make_files(struct client *c, struct dsnap *s)
{
	char file[32];
	unsigned i;
	int fd, err = 0;

	s->dirfd = D.dirfd;
	snapshot_name(s->finaldir, sizeof(s->finaldir), "", c, s->seq, "");
	snapshot_name(s->tmpdir, sizeof(s->tmpdir), ".", c, s->seq, ".tmp");
	if (mkdirat(D.dirfd, s->tmpdir, 0700) < 0)
		return -errno;
	fd = openat(D.dirfd, s->tmpdir,
		    O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		err = -errno;
	for (i = 0; !err && i < s->nregions; i++) {
		if (s->r[i].gone)
			continue;
		snprintf(file, sizeof(file), "r%u.cowmm", i);
		s->fds[i] = openat(fd, file,
				   O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
					   O_CLOEXEC,
				   0600);
		if (s->fds[i] < 0)
			err = -errno;
	}
	if (fd >= 0)
		close(fd);
	if (err) {
		for (i = 0; i < s->nregions; i++)
			if (s->fds[i] >= 0) {
				close(s->fds[i]);
				s->fds[i] = -1;
			}
		remove_snapshot_dir(D.dirfd, s->tmpdir, s->nregions);
	}
	return err;
}

static void set_err(struct dsnap *s, int err)
{
	int zero = 0;

	atomic_compare_exchange_strong(&s->err, &zero, err);
}

#define COPY_BATCH 64

/*
 * The copier: reads the old bytes of the pages queued by the loop, a
 * batch per process_vm_readv(), then unprotects them and wakes their
 * writers.  Exits when asked, once the queue is empty.
 */
static void copy_thread(struct helper *h)
{
	struct dsnap *s = h->data;
	bool live = true;

	for (;;) {
		struct iovec local[COPY_BATCH], remote[COPY_BATCH];
		uint64_t addr[COPY_BATCH];
		size_t pg[COPY_BATCH];
		unsigned n = 0, m = 0, k;
		ssize_t got;
		int err;

		pthread_mutex_lock(&s->qlock);
		while (s->qhead == s->qtail && !s->qstop)
			pthread_cond_wait(&s->qcond, &s->qlock);
		while (n < COPY_BATCH && s->qhead < s->qtail)
			addr[n++] = s->queue[s->qhead++];
		pthread_mutex_unlock(&s->qlock);
		if (!n)
			return;

		for (k = 0; k < n; k++) {
			size_t p;

			if (atomic_load(&s->err) || !page_of(s, addr[k], &p) ||
			    atomic_load(&s->state[p]) != PG_NONE)
				continue;
			local[m].iov_base = malloc(PAGE);
			if (!local[m].iov_base) {
				set_err(s, -ENOMEM);
				break;
			}
			local[m].iov_len = PAGE;
			remote[m] = (struct iovec){ (void *)(uintptr_t)addr[k],
						    PAGE };
			pg[m++] = p;
		}
		got = m ? process_vm_readv(s->pid, local, m, remote, m, 0) : 0;
		if (got != (ssize_t)(m * PAGE))
			set_err(s, got < 0 ? -errno : -EFAULT);
		for (k = 0; k < m; k++) {
			uint8_t expect = PG_NONE;

			/* A discard zaps a page once its event is read. */
			err = atomic_load(&s->err);
			if (!err)
				err = check_discards(s, (uint64_t)(uintptr_t)
						     remote[k].iov_base, PAGE,
						     &live);
			if (err) {
				set_err(s, err);
				free(local[k].iov_base);
				continue;
			}
			s->frames[pg[k]] = local[k].iov_base;
			if (atomic_compare_exchange_strong(&s->state[pg[k]],
							   &expect,
							   PG_PRESERVED)) {
				atomic_fetch_add(&s->copies, 1);
				continue;
			}
			s->frames[pg[k]] = NULL; /* the stream got there first */
			free(local[k].iov_base);
		}
		/* Failing here, the loop unprotects everything at the end. */
		for (k = 0; k < n; k++)
			(void)wp_retry(s->uffd, addr[k], PAGE, false,
				       now_ns() + 1000000000ull);
	}
}

static void copier_done(struct helper *h)
{
	struct dsnap *s = h->data;

	free(h);
	s->copier = NULL;
	snapshot_finish(s);
}

static void reply_snapshot_error(struct conn *cn, struct client *c, int ret)
{
	reply_error(cn, ret, "snapshot of client %u failed: %s%s", c->id,
		    strerror(-ret),
		    ret == -EPERM ? " (ptrace not allowed: run cowmmd as root "
				    "or the client's user)"
		    : ret == -EPROTO ? " (its ranges are registered for more "
				       "than write-protect faults)"
				     : "");
}

/* Armed (or not): start the copier and the stream, or give up. */
static void arm_done(struct helper *h)
{
	struct dsnap *s = h->data;
	int ret = h->result;
	unsigned i;

	free(h);
	if (!ret)
		ret = atomic_load(&s->err);
	if (!ret) {
		h = calloc(1, sizeof(*h));
		if (!h)
			ret = -ENOMEM;
	}
	if (!ret) {
		*h = (struct helper){ .run = copy_thread, .done = copier_done,
				      .data = s };
		ret = helper_start(h);
		if (ret)
			free(h);
		else
			s->copier = h;
	}
	if (!ret) {
		s->work.data = s;
		uv_queue_work(D.loop, &s->work, stream_snapshot, snapshot_done);
		return;
	}
	for (i = 0; i < s->nregions; i++)
		if (s->fds[i] >= 0) {
			close(s->fds[i]);
			s->fds[i] = -1;
		}
	remove_snapshot_dir(s->dirfd, s->tmpdir, s->nregions);
	s->result = ret;
	s->t_end = now_ns();
	snapshot_finish(s);
}

/*
 * Start a snapshot of @c; the reply to @waiter follows when it is done.
 * The client is stopped and armed on a helper thread (arm_thread()), the
 * files streamed on the pool (stream.c); the loop goes on meanwhile.
 */
static int start_snapshot(struct client *c, struct conn *waiter)
{
	struct helper *h;
	struct dsnap *s;
	unsigned i, live = 0;
	int ret;

	if (c->gone)
		return -ESRCH;
	if (c->snap)
		return -EBUSY;
	for (i = 0; i < c->nregions; i++)
		live += !c->r[i].gone;
	if (!live)
		return -ENOENT;
	s = calloc(1, sizeof(*s));
	h = calloc(1, sizeof(*h));
	if (!s || !h) {
		free(s);
		free(h);
		return -ENOMEM;
	}
	pthread_mutex_init(&s->qlock, NULL);
	pthread_cond_init(&s->qcond, NULL);
	s->c = c;
	s->seq = ++c->seq;
	s->pid = c->pid;
	s->pidfd = c->pidfd;
	s->uffd = c->uffd;
	s->nregions = c->nregions;
	memcpy(s->r, c->r, sizeof(s->r));
	s->npages = c->npages;
	s->rate = D.rate;
	s->ev_started = &c->ev_started;
	s->ev_done = &c->ev_done;
	for (i = 0; i < COWMMD_MAX_RANGES; i++)
		s->fds[i] = -1;
	for (i = 0; i < c->nregions; i++)
		if (!c->r[i].gone)
			s->total += c->r[i].len;
	s->state = calloc(s->npages, 1);
	s->frames = calloc(s->npages, sizeof(void *));
	s->queue = calloc(s->npages, sizeof(*s->queue));
	s->queued = calloc(s->npages, 1);
	if (!s->state || !s->frames || !s->queue || !s->queued) {
		free(h);
		free_dsnap(s);
		return -ENOMEM;
	}
	ret = make_files(c, s);
	if (ret) {
		free(h);
		free_dsnap(s);
		return ret;
	}

	s->t_start = now_ns();
	/* The pid is the client's only while its pidfd says it lives. */
	ret = syscall(SYS_pidfd_send_signal, c->pidfd, 0, NULL, 0) < 0
		      ? -ESRCH
		      : 0;
	/* Faults read while arming already belong to this snapshot. */
	*h = (struct helper){ .run = arm_thread, .done = arm_done, .data = s };
	if (!ret) {
		c->snap = s;
		ret = helper_start(h);
	}
	if (ret) {
		c->snap = NULL;
		free(h);
		for (i = 0; i < c->nregions; i++)
			if (s->fds[i] >= 0)
				close(s->fds[i]);
		remove_snapshot_dir(s->dirfd, s->tmpdir, s->nregions);
		free_dsnap(s);
		return ret;
	}
	if (waiter) {
		s->waiters[s->nwaiters++] = waiter;
		waiter->waiting = s;
	}
	return 0;
}

static void prune(struct client *c)
{
	char dir[NAME_MAX + 1];

	while (c->nkept > c->keep) {
		snapshot_name(dir, sizeof(dir), "", c, c->kept[0], "");
		remove_snapshot_dir(D.dirfd, dir, c->nregions);
		memmove(c->kept, c->kept + 1, --c->nkept * sizeof(c->kept[0]));
	}
}

static void out_snapshot(struct out *o, const struct dsnap *s)
{
	double secs = (double)(s->t_end - s->t_start) / 1e9;

	char dir[PATH_MAX];

	snprintf(dir, sizeof(dir), "%s/%s", D.dir, s->finaldir);
	if (o->json) {
		outf(o, "{\"seq\": %llu, \"dir\": ",
		     (unsigned long long)s->seq);
		out_jstr(o, dir);
		outf(o,
		     ", \"regions\": %u, "
		     "\"bytes\": %llu, \"pause_us\": %llu, \"seconds\": %.3f, "
		     "\"copies\": %llu}\n",
		     s->nregions,
		     (unsigned long long)s->total,
		     (unsigned long long)(s->pause_ns / 1000), secs,
		     (unsigned long long)atomic_load(&s->copies));
	} else {
		outf(o,
		     "%s\n  %u region file(s), %.1f MiB in %.3f s; client "
		     "stopped %.3f ms; %llu pages copied on write\n",
		     dir, s->nregions, (double)s->total / (1 << 20),
		     secs, (double)s->pause_ns / 1e6,
		     (unsigned long long)atomic_load(&s->copies));
	}
}

/* The stream returned: let the copier drain its queue and exit. */
static void snapshot_done(uv_work_t *w, int status)
{
	struct dsnap *s = w->data;

	(void)status;
	pthread_mutex_lock(&s->qlock);
	s->qstop = true;
	pthread_cond_signal(&s->qcond);
	pthread_mutex_unlock(&s->qlock);
	/* copier_done() follows; without a copier, finish now. */
	if (!s->copier)
		snapshot_finish(s);
}

static void snapshot_finish(struct dsnap *s)
{
	struct client *c = s->c;
	char text[1024];
	struct out o = { text, 0, sizeof(text), false };
	unsigned i;
	int ret;

	c->snap = NULL;
	c->copies += atomic_load(&s->copies);
	D.copies += atomic_load(&s->copies);
	if (s->result) {
		/* Pages never streamed are still protected: let them go. */
		for (i = 0; c->uffd >= 0 && i < c->nregions; i++)
			if (!c->r[i].gone)
				loop_wp(c, c->r[i].addr, c->r[i].len, false);
		c->snaps_failed++;
		D.snaps_failed++;
		c->last_err = s->result;
		say("client %u: snapshot %llu failed: %s", c->id,
		    (unsigned long long)s->seq, strerror(-s->result));
	} else {
		c->snaps_ok++;
		D.snaps_ok++;
		c->bytes += s->total;
		D.bytes += s->total;
		c->last_err = 0;
		c->last_pause_us = s->pause_ns / 1000;
		c->last_ms = (s->t_end - s->t_start) / 1000000;
		snprintf(c->last, sizeof(c->last), "%s/%s", D.dir, s->finaldir);
		c->kept[c->nkept++] = s->seq; /* prune() keeps it < KEEP_MAX */
		prune(c);
		say("client %u: snapshot %llu: %.1f MiB in %.3f s, stopped "
		    "%.3f ms, %llu copies",
		    c->id, (unsigned long long)s->seq,
		    (double)s->total / (1 << 20),
		    (double)(s->t_end - s->t_start) / 1e9,
		    (double)s->pause_ns / 1e6,
		    (unsigned long long)atomic_load(&s->copies));
	}
	for (i = 0; i < s->nwaiters; i++) {
		struct conn *cn = s->waiters[i];

		if (!cn)
			continue;
		cn->waiting = NULL;
		if (s->result) {
			reply_snapshot_error(cn, c, s->result);
		} else {
			o.json = cn->flags & COWMMD_CTL_JSON;
			o.len = 0;
			out_snapshot(&o, s);
			send_reply(cn, 0, &o);
		}
		if (D.stopping)
			conn_close(cn);
	}
	ret = s->result;
	free_dsnap(s);
	if (ret == -EPROTO)
		client_close(c, -EPROTO); /* it lied about its registration */
	if (c->gone)
		client_finish(c);
	else if (D.stopping)
		client_close(c, -ECANCELED);
}

static void on_timer(uv_timer_t *t)
{
	struct client *c = t->data;
	int ret;

	if (c->snap) {
		say("client %u: scheduled snapshot skipped: the last one is "
		    "still being written",
		    c->id);
		return;
	}
	ret = start_snapshot(c, NULL);
	if (ret)
		say("client %u: scheduled snapshot failed: %s", c->id,
		    strerror(-ret));
}

/* ------------------------------------------------------------------------ */
/* HELLO: a new client */

static bool fd_is(int fd, const char *what)
{
	char path[64], link[64];
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		return false;
	link[n] = '\0';
	return !strcmp(link, what);
}

/*
 * The features a userfaultfd was opened with, from its fdinfo ("API:
 * <api>:<features>:<ioctls>"); 0 if unknown.
 */
static uint64_t uffd_features(int fd)
{
	char path[64], line[128];
	unsigned long long api, features = 0, ioctls;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	f = fopen(path, "re");
	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "API: %llx:%llx:%llx", &api, &features,
			   &ioctls) == 3)
			break;
	fclose(f);
	return features;
}

static pid_t pidfd_pid(int fd)
{
	char path[64], line[128];
	pid_t pid = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	f = fopen(path, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Pid: %d", &pid) == 1)
			break;
	fclose(f);
	return pid;
}

static void welcome(struct conn *cn, int status, unsigned id)
{
	struct cowmmd_welcome w = {
		{ COWMMD_MAGIC, COWMMD_VERSION, COWMMD_WELCOME, sizeof(w), 0 },
		status, id
	};

	(void)send(cn->fd, &w, sizeof(w), MSG_NOSIGNAL | MSG_DONTWAIT);
}

/* Checks a HELLO; returns why it is refused, with *err set, or NULL. */
static const char *check_hello(struct conn *cn, const struct cowmmd_hello *h,
			       size_t len, const int *fds, unsigned nfds,
			       int *err)
{
	struct dregion dr[COWMMD_MAX_RANGES];
	unsigned i, j, nclients = 0;
	uint64_t want, have;
	struct client *c;

	*err = -EPROTO;
	if (len < sizeof(*h) || !h->nranges ||
	    h->nranges > COWMMD_MAX_RANGES ||
	    len != sizeof(*h) + h->nranges * sizeof(h->ranges[0]))
		return "bad HELLO length or range count";
	if (nfds != 2)
		return "HELLO without exactly two descriptors";
	if (!fd_is(fds[0], "anon_inode:[userfaultfd]"))
		return "first descriptor is not a userfaultfd";
	/* Without these a discard or an unmap would go unseen. */
	want = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED |
	       UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP |
	       UFFD_FEATURE_EVENT_REMAP;
	have = uffd_features(fds[0]);
	if ((have & want) != want || (have & UFFD_FEATURE_SIGBUS))
		return "the userfaultfd lacks the features cowmmd needs";
	if (pidfd_pid(fds[1]) != cn->pid)
		return "second descriptor is not a pidfd of the peer";
	*err = -EINVAL;
	for (i = 0; i < h->nranges; i++) {
		const struct cowmmd_range *r = &h->ranges[i];

		if (!r->len || r->addr % PAGE || r->len % PAGE ||
		    r->addr + r->len < r->addr)
			return "unaligned, empty or wrapping range";
		for (j = 0; j < i; j++)
			if (r->addr < h->ranges[j].addr + h->ranges[j].len &&
			    h->ranges[j].addr < r->addr + r->len)
				return "overlapping ranges";
		if (cowmm__check_maps(cn->pid, r->addr, r->len))
			return "range is not private anonymous memory of the "
			       "client";
		dr[i] = (struct dregion){ r->addr, r->len, 0, false };
	}
	*err = check_registration(cn->pid, dr, h->nranges);
	if (*err == -EPROTO)
		return "ranges registered for missing or minor faults";
	if (*err)
		return "ranges not registered for write-protect faults";
	/*
	 * Registered with this userfaultfd, not another one of the client's
	 * (-EBUSY): registering again in the same mode changes nothing.
	 */
	for (i = 0; i < h->nranges; i++) {
		*err = cowmm__uffd_register(fds[0], h->ranges[i].addr,
					    h->ranges[i].len,
					    UFFDIO_REGISTER_MODE_WP, NULL);
		if (*err == -EBUSY)
			return "ranges registered with another userfaultfd";
		if (*err)
			return "cannot check the registration of the ranges";
	}
	j = 0;
	*err = -EUSERS;
	for (c = D.clients; c; c = c->next) {
		nclients++;
		if (!c->gone && c->pid == cn->pid && ++j >= MAX_CLIENTS_PER_PID)
			return "too many clients in this process";
	}
	if (nclients >= MAX_CLIENTS)
		return "too many clients";
	*err = 0;
	return NULL;
}

/*
 * Letters, digits, '-' and '_'; a name never starts with a digit, so that
 * cowmmctl's CLIENT, all digits, is always an id.
 */
static void sanitize_name(char *dst, const char *src, size_t n)
{
	size_t i, o = 0;

	if (src[0] >= '0' && src[0] <= '9')
		dst[o++] = '_';
	for (i = 0; i < n && src[i] && o < n; i++)
		dst[o++] = (src[i] >= 'a' && src[i] <= 'z') ||
				   (src[i] >= 'A' && src[i] <= 'Z') ||
				   (src[i] >= '0' && src[i] <= '9') ||
				   src[i] == '-' || src[i] == '_'
			   ? src[i]
			   : '_';
	dst[o] = '\0';
	if (!o)
		memcpy(dst, "client", sizeof("client"));
}

static void handle_hello(struct conn *cn, const struct cowmmd_hello *h,
			 size_t len, int *fds, unsigned nfds)
{
	struct client *c;
	const char *why;
	unsigned i;
	size_t first = 0;
	int err;

	why = check_hello(cn, h, len, fds, nfds, &err);
	if (why) {
		say("connection from pid %d refused: %s", cn->pid, why);
		welcome(cn, err, 0);
		conn_close(cn);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		welcome(cn, -ENOMEM, 0);
		conn_close(cn);
		return;
	}
	c->id = D.next_id++;
	sanitize_name(c->name, h->name, COWMMD_NAME_MAX);
	c->pid = cn->pid;
	c->uid = cn->uid;
	c->uffd = fds[0];
	c->pidfd = fds[1];
	fds[0] = fds[1] = -1; /* the client owns them now */
	c->keep = D.keep;
	c->nregions = h->nranges;
	for (i = 0; i < h->nranges; i++) {
		c->r[i] = (struct dregion){ h->ranges[i].addr,
					    h->ranges[i].len, first, false };
		first += h->ranges[i].len / PAGE;
	}
	c->npages = first;
	fcntl(c->uffd, F_SETFL, fcntl(c->uffd, F_GETFL) | O_NONBLOCK);
	uv_poll_init(D.loop, &c->uffd_poll, c->uffd);
	uv_poll_init(D.loop, &c->pidfd_poll, c->pidfd);
	uv_timer_init(D.loop, &c->timer);
	uv_timer_init(D.loop, &c->retry_timer);
	c->uffd_poll.data = c->pidfd_poll.data = c;
	c->timer.data = c->retry_timer.data = c;
	c->handles = 4;
	uv_poll_start(&c->uffd_poll, UV_READABLE, on_uffd);
	uv_poll_start(&c->pidfd_poll, UV_READABLE, on_pidfd);
	c->next = D.clients;
	D.clients = c;
	c->conn = cn;
	cn->client = c;
	cn->kind = CONN_CLIENT;
	say("client %u (%s, pid %d): attached, %u region(s), %.1f MiB",
	    c->id, c->name, c->pid, c->nregions,
	    (double)c->npages * PAGE / (1 << 20));
	welcome(cn, 0, c->id);
}

/* ------------------------------------------------------------------------ */
/* CTL: cowmmctl */

/*
 * CLIENT: all digits is an id, anything else a name, which must be
 * unique.  NULL with *err set (-ENOENT, -ENOTUNIQ) if none fits.
 */
static struct client *find_client(const char *arg, int *err)
{
	struct client *c, *found = NULL;
	bool id = *arg && strspn(arg, "0123456789") == strlen(arg);
	unsigned long n = id ? strtoul(arg, NULL, 10) : 0;

	*err = -ENOENT;
	for (c = D.clients; c; c = c->next) {
		if (c->gone || (id ? c->id != n : strcmp(c->name, arg)))
			continue;
		if (found) {
			*err = -ENOTUNIQ;
			return NULL;
		}
		found = c;
	}
	return found;
}

static void no_client(struct conn *cn, const char *arg, int err)
{
	if (err == -ENOTUNIQ)
		reply_error(cn, err, "more than one client is named %s: "
			    "use its id (cowmmctl list)", arg);
	else
		reply_error(cn, err, "no client %s", arg);
}

static void out_client(struct out *o, const struct client *c, bool first)
{
	const struct dsnap *s = c->snap;
	char sched[32];
	unsigned i;

	if (o->json) {
		outf(o,
		     "%s{\"id\": %u, \"name\": \"%s\", \"pid\": %d, "
		     "\"uid\": %u, \"regions\": [",
		     first ? "" : ", ", c->id, c->name, (int)c->pid,
		     (unsigned)c->uid);
		for (i = 0; i < c->nregions; i++)
			outf(o, "%s{\"addr\": \"0x%llx\", \"len\": %llu%s}",
			     i ? ", " : "", (unsigned long long)c->r[i].addr,
			     (unsigned long long)c->r[i].len,
			     c->r[i].gone ? ", \"gone\": true" : "");
		outf(o,
		     "], \"schedule_s\": %.3f, \"keep\": %u, \"snapshots\": "
		     "%llu, \"failed\": %llu, \"faults\": %llu, \"copies\": "
		     "%llu, \"bytes\": %llu, \"last\": ",
		     (double)c->period_ms / 1000, c->keep,
		     (unsigned long long)c->snaps_ok,
		     (unsigned long long)c->snaps_failed,
		     (unsigned long long)c->faults,
		     (unsigned long long)c->copies,
		     (unsigned long long)c->bytes);
		out_jstr(o, c->last);
		outf(o,
		     ", \"last_pause_us\": %llu, \"last_ms\": %llu, "
		     "\"last_error\": %d",
		     (unsigned long long)c->last_pause_us,
		     (unsigned long long)c->last_ms, -c->last_err);
		if (s)
			outf(o, ", \"writing\": {\"seq\": %llu, \"done\": %llu, "
				"\"total\": %llu}",
			     (unsigned long long)s->seq,
			     (unsigned long long)atomic_load(&s->done),
			     (unsigned long long)s->total);
		outf(o, "}");
		return;
	}
	if (c->period_ms)
		snprintf(sched, sizeof(sched), "%.0fs/%u",
			 (double)c->period_ms / 1000, c->keep);
	else
		snprintf(sched, sizeof(sched), "-/%u", c->keep);
	outf(o, "%-4u %-16s %-8d %3u  %10.1f  %-9s %5llu %6llu  %s\n", c->id,
	     c->name, (int)c->pid, c->nregions,
	     (double)c->npages * PAGE / (1 << 20), sched,
	     (unsigned long long)c->snaps_ok,
	     (unsigned long long)c->snaps_failed,
	     c->last[0] ? c->last : "-");
	if (s)
		outf(o, "     writing snapshot %llu: %.0f%%\n",
		     (unsigned long long)s->seq,
		     s->total ? 100.0 * (double)atomic_load(&s->done) /
					(double)s->total
			      : 0.0);
}

static void ctl_list(struct conn *cn, struct out *o)
{
	struct client *c;
	bool first = true;

	if (o->json)
		outf(o, "{\"clients\": [");
	else
		outf(o, "%-4s %-16s %-8s %3s  %10s  %-9s %5s %6s  %s\n", "ID",
		     "NAME", "PID", "RGN", "MIB", "EVERY/KEEP", "SNAPS",
		     "FAILED", "LAST");
	for (c = D.clients; c; c = c->next) {
		if (c->gone)
			continue;
		out_client(o, c, first);
		first = false;
	}
	if (o->json)
		outf(o, "]}\n");
	send_reply(cn, 0, o);
}

static void ctl_stats(struct conn *cn, struct out *o)
{
	struct client *c;
	unsigned n = 0;
	double up = (double)(now_ns() - D.started) / 1e9;

	for (c = D.clients; c; c = c->next)
		n += !c->gone;
	if (o->json)
		outf(o,
		     "{\"pid\": %d, \"uptime_s\": %.1f, \"socket\": \"%s\", "
		     "\"dir\": ",
		     (int)getpid(), up, D.sock);
	else
		outf(o, "cowmmd pid %d, up %.1f s, socket %s, snapshots in ",
		     (int)getpid(), up, D.sock);
	if (o->json)
		out_jstr(o, D.dir);
	else
		outf(o, "%s\n", D.dir);
	outf(o,
	     o->json ? ", \"clients\": %u, \"snapshots\": %llu, \"failed\": "
		       "%llu, \"bytes\": %llu, \"faults\": %llu, "
		       "\"copies\": %llu, \"refused\": %llu}\n"
		     : "clients %u\nsnapshots %llu\nfailed %llu\nbytes "
		       "written %llu\nwrite faults %llu\npages copied "
		       "%llu\nrefused connections %llu\n",
	     n, (unsigned long long)D.snaps_ok,
	     (unsigned long long)D.snaps_failed, (unsigned long long)D.bytes,
	     (unsigned long long)D.faults, (unsigned long long)D.copies,
	     (unsigned long long)D.refused);
	send_reply(cn, 0, o);
}

static bool parse_uint(const char *s, unsigned long max, unsigned long *v)
{
	char *end;

	if (!*s || *s == '-')
		return false;
	errno = 0;
	*v = strtoul(s, &end, 10);
	return !errno && !*end && *v <= max;
}

static void handle_ctl(struct conn *cn, const struct cowmmd_ctl *m,
		       size_t len)
{
	const char *argv[COWMMD_CTL_ARGS];
	char text[COWMMD_REPLY_MAX - 64];
	struct out o = { text, 0, sizeof(text), false };
	size_t off = 0, alen;
	unsigned argc = 0;
	struct client *c;
	unsigned long v, keep;
	int ret;

	cn->kind = CONN_CTL;
	cn->flags = m->flags & COWMMD_CTL_JSON;
	o.json = cn->flags & COWMMD_CTL_JSON;
	alen = len - sizeof(*m);
	/* NUL-terminated arguments filling the message exactly. */
	while (off < alen) {
		const char *a = m->args + off;
		const char *nul = memchr(a, '\0', alen - off);

		if (!nul || argc == COWMMD_CTL_ARGS) {
			reply_error(cn, -EPROTO, "malformed request");
			conn_close(cn);
			return;
		}
		argv[argc++] = a;
		off += (size_t)(nul - a) + 1;
	}
	if (!argc) {
		reply_error(cn, -EINVAL, "empty request");
		return;
	}
	if (cn->waiting) {
		reply_error(cn, -EBUSY, "a request is already waiting");
		return;
	}
	if (!strcmp(argv[0], "ping") && argc == 1) {
		outf(&o, o.json ? "{\"pong\": true}\n" : "pong\n");
		send_reply(cn, 0, &o);
	} else if (!strcmp(argv[0], "list") && argc == 1) {
		ctl_list(cn, &o);
	} else if (!strcmp(argv[0], "stats") && argc == 1) {
		ctl_stats(cn, &o);
	} else if (!strcmp(argv[0], "snapshot") && argc == 2) {
		c = find_client(argv[1], &ret);
		if (!c) {
			no_client(cn, argv[1], ret);
			return;
		}
		ret = start_snapshot(c, cn);
		if (ret)
			reply_snapshot_error(cn, c, ret);
	} else if (!strcmp(argv[0], "schedule") &&
		   (argc == 3 || argc == 4)) {
		c = find_client(argv[1], &ret);
		if (!c) {
			no_client(cn, argv[1], ret);
			return;
		}
		keep = c->keep;
		if (!parse_uint(argv[2], 86400 * 365, &v) ||
		    (argc == 4 &&
		     (!parse_uint(argv[3], KEEP_MAX - 1, &keep) || !keep))) {
			reply_error(cn, -EINVAL,
				    "usage: schedule CLIENT SECONDS [KEEP]; "
				    "SECONDS 0 stops it, KEEP 1 to %d",
				    KEEP_MAX - 1);
			return;
		}
		c->period_ms = v * 1000;
		c->keep = (unsigned)keep;
		if (v)
			uv_timer_start(&c->timer, on_timer, c->period_ms,
				       c->period_ms);
		else
			uv_timer_stop(&c->timer);
		prune(c);
		if (o.json)
			outf(&o, "{\"id\": %u, \"schedule_s\": %lu, "
				 "\"keep\": %u}\n",
			     c->id, v, c->keep);
		else if (v)
			outf(&o, "client %u: a snapshot every %lu s, keeping "
				 "the last %u\n",
			     c->id, v, c->keep);
		else
			outf(&o, "client %u: no schedule, keeping the last "
				 "%u\n",
			     c->id, c->keep);
		send_reply(cn, 0, &o);
	} else {
		reply_error(cn, -EINVAL,
			    "unknown request '%s' (ping, list, stats, snapshot "
			    "CLIENT, schedule CLIENT SECONDS [KEEP])",
			    argv[0]);
	}
}

/* ------------------------------------------------------------------------ */
/* The socket */

static void protocol_error(struct conn *cn, const char *why)
{
	say("connection from pid %d closed: %s", cn->pid, why);
	conn_close(cn);
}

static void on_conn(uv_poll_t *h, int status, int events)
{
	struct conn *cn = h->data;
	union {
		struct cowmmd_hdr h;
		char buf[COWMMD_CTL_MAX + 1];
	} m;
	union {
		struct cmsghdr c;
		char buf[CMSG_SPACE(8 * sizeof(int))];
	} ctl;
	struct iovec iov = { &m, sizeof(m) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = ctl.buf,
			      .msg_controllen = sizeof(ctl.buf) };
	struct cmsghdr *cm;
	int fds[8];
	unsigned nfds = 0, i;
	ssize_t n;

	(void)events;
	if (status < 0) {
		conn_close(cn);
		return;
	}
	n = recvmsg(cn->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	cn->last_ns = now_ns();
	for (cm = CMSG_FIRSTHDR(&msg); n >= 0 && cm;
	     cm = CMSG_NXTHDR(&msg, cm)) {
		if (cm->cmsg_level != SOL_SOCKET ||
		    cm->cmsg_type != SCM_RIGHTS)
			continue;
		for (i = 0; i < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		     i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int),
			       sizeof(int));
			if (nfds < ARRAY_SIZE(fds))
				fds[nfds++] = fd;
			else
				close(fd);
		}
	}
	if (n <= 0) {
		conn_close(cn);
	} else if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
		protocol_error(cn, "message too long");
	} else if ((size_t)n < sizeof(m.h) || m.h.magic != COWMMD_MAGIC ||
		   m.h.len != (size_t)n) {
		protocol_error(cn, "bad header");
	} else if (m.h.version != COWMMD_VERSION) {
		protocol_error(cn, "another protocol version");
	} else if (cn->uid != 0 && cn->uid != geteuid()) {
		D.refused++;
		say("connection from pid %d refused: uid %u", cn->pid,
		    (unsigned)cn->uid);
		if (m.h.type == COWMMD_HELLO)
			welcome(cn, -EPERM, 0);
		else
			reply_error(cn, -EPERM, "permission denied: uid %u",
				    (unsigned)cn->uid);
		conn_close(cn);
	} else if (m.h.type == COWMMD_HELLO && cn->kind == CONN_NEW) {
		handle_hello(cn, (void *)&m, (size_t)n, fds, nfds);
	} else if (nfds) {
		protocol_error(cn, "unexpected descriptors");
	} else if (m.h.type == COWMMD_CTL && cn->kind != CONN_CLIENT &&
		   (size_t)n >= sizeof(struct cowmmd_ctl)) {
		handle_ctl(cn, (void *)&m, (size_t)n);
	} else if (m.h.type == COWMMD_DETACH && cn->kind == CONN_CLIENT &&
		   (size_t)n == sizeof(m.h)) {
		struct client *c = cn->client;

		c->bye = true;
		abandon(c, -ECANCELED, "the client detached");
		client_close(c, -ECANCELED);
	} else {
		protocol_error(cn, "unexpected message");
	}
	for (i = 0; i < nfds; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

static void on_listen(uv_poll_t *h, int status, int events);

static void on_backoff(uv_timer_t *t)
{
	(void)t;
	if (!D.stopping)
		uv_poll_start(&D.listen_poll, UV_READABLE, on_listen);
}

/* Why a new connection from @cred is not taken, or NULL. */
static const char *over_limit(const struct ucred *cred)
{
	unsigned all = 0, uid = 0, pid = 0;
	struct conn *cn;

	for (cn = D.conns; cn; cn = cn->next) {
		all++;
		if (cn->kind == CONN_CLIENT || cn->closing)
			continue;
		uid += cn->uid == cred->uid;
		pid += cn->pid == cred->pid;
	}
	if (all >= MAX_CONNS)
		return "too many connections";
	if (uid >= MAX_IDLE_PER_UID)
		return "too many connections from this uid";
	if (pid >= MAX_IDLE_PER_PID)
		return "too many connections from this process";
	return NULL;
}

static void on_listen(uv_poll_t *h, int status, int events)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);
	const char *why;
	struct conn *cn;
	int fd;

	(void)h;
	(void)status;
	(void)events;
	fd = accept4(D.listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	if (fd < 0) {
		/*
		 * Out of descriptors or memory: the connection stays queued
		 * and the socket readable.  Stop polling it for a while
		 * rather than spin; the idle timeout frees descriptors.
		 */
		if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
		    errno == ENOMEM) {
			say("accept: %s: not accepting for 100 ms",
			    strerror(errno));
			uv_poll_stop(&D.listen_poll);
			uv_timer_start(&D.backoff_timer, on_backoff, 100, 0);
		}
		return;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) {
		close(fd);
		return;
	}
	why = over_limit(&cred);
	if (why) {
		D.refused++;
		say("connection from pid %d (uid %u) refused: %s",
		    (int)cred.pid, (unsigned)cred.uid, why);
		close(fd);
		return;
	}
	cn = calloc(1, sizeof(*cn));
	if (!cn) {
		close(fd);
		return;
	}
	cn->fd = fd;
	cn->uid = cred.uid;
	cn->pid = cred.pid;
	cn->kind = CONN_NEW;
	cn->last_ns = now_ns();
	uv_poll_init(D.loop, &cn->poll, fd);
	cn->poll.data = cn;
	cn->next = D.conns;
	D.conns = cn;
	uv_poll_start(&cn->poll, UV_READABLE | UV_DISCONNECT, on_conn);
}

/* Connections with nothing in flight that said nothing for too long. */
static void on_idle_timer(uv_timer_t *t)
{
	struct conn *cn, *next;
	uint64_t now = now_ns();

	(void)t;
	for (cn = D.conns; cn; cn = next) {
		next = cn->next;
		if (cn->kind == CONN_CLIENT || cn->waiting || cn->closing ||
		    now - cn->last_ns < D.idle_ns)
			continue;
		say("connection from pid %d closed: idle", (int)cn->pid);
		conn_close(cn);
	}
}

static void on_signal(uv_signal_t *h, int signum)
{
	struct client *c, *next;
	struct conn *cn, *cnext;

	(void)h;
	if (D.signals++) {
		say("%s again: abandoning snapshots in flight",
		    strsignal(signum));
		for (c = D.clients; c; c = c->next)
			abandon(c, -ECANCELED, "cowmmd is shutting down");
		return;
	}
	say("%s: finishing snapshots in flight, then exiting",
	    strsignal(signum));
	D.stopping = true;
	uv_timer_stop(&D.backoff_timer);
	uv_close((uv_handle_t *)&D.listen_poll, NULL);
	close(D.listen_fd);
	if (!D.activated) /* systemd's socket stays for the next start */
		unlink(D.sock);
	for (c = D.clients; c; c = next) {
		next = c->next;
		if (!c->snap)
			client_close(c, -ECANCELED);
	}
	for (cn = D.conns; cn; cn = cnext) {
		cnext = cn->next;
		if (cn->kind != CONN_CLIENT && !cn->waiting)
			conn_close(cn);
	}
	maybe_exit();
}

/*
 * Socket activation (systemd's cowmmd.socket): one listening AF_UNIX
 * SOCK_SEQPACKET socket passed as descriptor 3 ($LISTEN_PID, $LISTEN_FDS,
 * as sd_listen_fds() reads them).  -ENOENT when not activated.
 */
static int listen_activated(void)
{
	const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
	struct sockaddr_un sa;
	socklen_t len = sizeof(sa);
	int type = 0, listening = 0, fd = 3;
	socklen_t ilen = sizeof(int);

	if (!pid || !fds || strtol(pid, NULL, 10) != getpid())
		return -ENOENT;
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
	if (strtol(fds, NULL, 10) != 1 ||
	    getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &ilen) < 0 ||
	    type != SOCK_SEQPACKET ||
	    getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ilen) < 0 ||
	    !listening || getsockname(fd, (struct sockaddr *)&sa, &len) < 0 ||
	    sa.sun_family != AF_UNIX) {
		say("socket activation: expected one listening AF_UNIX "
		    "SOCK_SEQPACKET socket (ListenSequentialPacket=)");
		return -EINVAL;
	}
	fcntl(fd, F_SETFD, FD_CLOEXEC);
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	if (len > offsetof(struct sockaddr_un, sun_path) && sa.sun_path[0])
		snprintf(D.sock, sizeof(D.sock), "%.*s",
			 (int)(len - offsetof(struct sockaddr_un, sun_path)),
			 sa.sun_path);
	D.activated = true;
	return fd;
}

static int listen_on(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	mode_t old;
	int fd, probe;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		say("socket path too long: %s", path);
		return -ENAMETOOLONG;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1); /* length checked */
	/* A socket file nobody listens on is a leftover: remove it. */
	probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (probe >= 0 &&
	    connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
		struct ucred cred = { 0, (uid_t)-1, 0 };
		socklen_t clen = sizeof(cred);

		(void)getsockopt(probe, SOL_SOCKET, SO_PEERCRED, &cred, &clen);
		close(probe);
		if (cred.uid != 0 && cred.uid != geteuid())
			say("%s is held by uid %u (pid %d), not by a cowmmd "
			    "of ours: refusing to start; use --socket "
			    "elsewhere (a directory only we can write)",
			    path, (unsigned)cred.uid, (int)cred.pid);
		else
			say("another cowmmd (pid %d) is already listening on "
			    "%s",
			    (int)cred.pid, path);
		return -EADDRINUSE;
	}
	if (probe >= 0)
		close(probe);
	unlink(path);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK,
		    0);
	if (fd < 0)
		return -errno;
	old = umask(0177); /* 0600 from the start */
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    chmod(path, 0600) < 0 || listen(fd, 64) < 0) {
		int err = -errno;

		umask(old);
		say("cannot listen on %s: %s", path, strerror(-err));
		close(fd);
		return err;
	}
	umask(old);
	return fd;
}

/*
 * Open the snapshot directory for good, walking from / one component at a
 * time without following symlinks, creating what is missing (0700).
 * Root writes there: every component must belong to root or to us, and
 * be writable by nobody else unless sticky (/tmp); the last must be ours
 * and writable by us alone.  Snapshots are then written relative to the
 * descriptor, so a directory swapped for a symlink later changes nothing.
 */
static int open_dir(const char *dir)
{
	char tmp[PATH_MAX], *comp, *next, *save = NULL;
	uid_t me = geteuid();
	struct stat st;
	int fd, sub;

	if (dir[0] != '/') {
		say("%s: the snapshot directory must be an absolute path", dir);
		return -EINVAL;
	}
	snprintf(tmp, sizeof(tmp), "%s", dir);
	fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	for (comp = strtok_r(tmp, "/", &save); comp; comp = next) {
		next = strtok_r(NULL, "/", &save);
		if (!strcmp(comp, ".") || !strcmp(comp, "..")) {
			say("%s: no . or .. in the snapshot directory", dir);
			close(fd);
			return -EINVAL;
		}
		sub = openat(fd, comp,
			     O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (sub < 0 && errno == ENOENT &&
		    (mkdirat(fd, comp, 0700) == 0 || errno == EEXIST))
			sub = openat(fd, comp, O_RDONLY | O_DIRECTORY |
						       O_NOFOLLOW | O_CLOEXEC);
		if (sub < 0) {
			int err = -errno;

			say("%s: %s: %s%s", dir, comp, strerror(-err),
			    err == -ELOOP || err == -ENOTDIR
				    ? " (a symlink? give the real path)"
				    : "");
			close(fd);
			return err;
		}
		close(fd);
		fd = sub;
		if (fstat(fd, &st) < 0) {
			close(fd);
			return -errno;
		}
		if ((st.st_uid != 0 && st.st_uid != me) ||
		    (next && (st.st_mode & 022) && !(st.st_mode & S_ISVTX)) ||
		    (!next && (st.st_uid != me || (st.st_mode & 022)))) {
			say("%s: %s is owned by uid %u, mode %04o: the "
			    "snapshot directory must be owned by uid %u and "
			    "writable by it alone, and each directory above "
			    "it owned by root or uid %u and writable by no "
			    "one else unless sticky",
			    dir, comp, (unsigned)st.st_uid,
			    (unsigned)(st.st_mode & 07777), (unsigned)me,
			    (unsigned)me);
			close(fd);
			return -EPERM;
		}
	}
	if (faccessat(fd, ".", W_OK | X_OK, AT_EACCESS) < 0) {
		int err = -errno;

		close(fd);
		return err;
	}
	return fd;
}

/* Hidden .tmp directories left by a daemon that died mid-snapshot. */
static void remove_stale(void)
{
	struct dirent *e;
	int fd = dup(D.dirfd);
	DIR *d = fd < 0 ? NULL : fdopendir(fd);
	unsigned n = 0;

	if (!d) {
		if (fd >= 0)
			close(fd);
		return;
	}
	while ((e = readdir(d))) {
		size_t len = strlen(e->d_name);

		if (e->d_name[0] != '.' || len < 6 ||
		    strcmp(e->d_name + len - 4, ".tmp") != 0)
			continue;
		remove_snapshot_dir(D.dirfd, e->d_name, COWMMD_MAX_RANGES);
		n++;
	}
	closedir(d);
	if (n)
		say("removed %u unfinished snapshot(s) left in %s", n, D.dir);
}

/*
 * Where snapshots go unless told: systemd's StateDirectory=, else
 * /var/lib/cowmmd for root, else $XDG_STATE_HOME/cowmmd or
 * ~/.local/state/cowmmd: places no other user can create first.
 */
static const char *default_dir(char *buf, size_t n)
{
	const char *state = getenv("STATE_DIRECTORY");
	const char *xdg = getenv("XDG_STATE_HOME");
	const char *home = getenv("HOME");

	if (state && *state)
		snprintf(buf, n, "%.*s", (int)strcspn(state, ":"), state);
	else if (geteuid() == 0)
		snprintf(buf, n, "/var/lib/cowmmd");
	else if (xdg && *xdg)
		snprintf(buf, n, "%s/cowmmd", xdg);
	else
		snprintf(buf, n, "%s/.local/state/cowmmd", home ? home : "");
	return buf;
}

static void usage(FILE *f)
{
	char def[108], dir[PATH_MAX / 2];

	fprintf(f,
		"usage: cowmmd [--socket PATH] [--dir DIR] [--keep N] [--rate MIB]\n"
		"              [--idle-timeout S]\n"
		"\n"
		"Takes snapshots of the memory of processes that attach with\n"
		"cowmm_attach_daemon(), on cowmmctl's command or on a schedule.\n"
		"\n"
		"  -s, --socket PATH  listen here (default %s)\n"
		"  -d, --dir DIR      write snapshots here (default %s)\n"
		"  -k, --keep N       snapshots kept per client (default 3)\n"
		"  -r, --rate MIB     write snapshots at most MIB MiB/s "
		"(default 0:\n"
		"                     no limit); the client's writes fault "
		"meanwhile\n"
		"  -i, --idle-timeout S  close a connection that is not a "
		"client\n"
		"                     after S seconds without a request "
		"(default %d)\n"
		"  -h, --help         this text\n"
		"  -V, --version      the version\n"
		"\n"
		"SIGTERM or SIGINT: finish the snapshots in flight, then exit;\n"
		"a second one abandons them (their files are removed).\n",
		cowmmd_default_socket(def, sizeof(def)),
		default_dir(dir, sizeof(dir)), IDLE_TIMEOUT_S);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "dir", required_argument, NULL, 'd' },
		{ "keep", required_argument, NULL, 'k' },
		{ "rate", required_argument, NULL, 'r' },
		{ "idle-timeout", required_argument, NULL, 'i' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	unsigned long keep, rate, idle;
	int opt;

	cowmmd_default_socket(D.sock, sizeof(D.sock));
	default_dir(D.dir, sizeof(D.dir));
	while ((opt = getopt_long(argc, argv, "s:d:k:r:i:hV", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			snprintf(D.sock, sizeof(D.sock), "%s", optarg);
			break;
		case 'd':
			snprintf(D.dir, sizeof(D.dir), "%s", optarg);
			break;
		case 'k':
			if (!parse_uint(optarg, KEEP_MAX - 1, &keep) || !keep) {
				fprintf(stderr, "cowmmd: --keep takes 1 to %d\n",
					KEEP_MAX - 1);
				return 2;
			}
			D.keep = (unsigned)keep;
			break;
		case 'r':
			if (!parse_uint(optarg, 1ul << 20, &rate)) {
				fprintf(stderr, "cowmmd: --rate takes MiB/s, "
						"0 for no limit\n");
				return 2;
			}
			D.rate = (uint64_t)rate << 20;
			break;
		case 'i':
			if (!parse_uint(optarg, 86400, &idle) || !idle) {
				fprintf(stderr, "cowmmd: --idle-timeout takes "
						"1 to 86400 seconds\n");
				return 2;
			}
			D.idle_ns = idle * 1000000000ull;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("cowmmd %s\n", COWMM_VERSION_STRING);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 2;
	}
	/* Names are kept short (NAME_MAX) but the path must fit too. */
	if (strlen(D.dir) >= sizeof(D.dir) - 1) {
		fprintf(stderr, "cowmmd: --dir too long\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	cowmm_set_log(log_lib, NULL);
	/* This thread resolves faults: an ioctl held back by a pending event
	 * must come back to it rather than spin (see loop_wp()). */
	cowmm__in_worker = true;
	D.dirfd = open_dir(D.dir);
	if (D.dirfd < 0) {
		say("cannot use %s for snapshots: %s", D.dir,
		    strerror(-D.dirfd));
		return 1;
	}
	remove_stale();
	D.listen_fd = listen_activated();
	if (D.listen_fd == -ENOENT)
		D.listen_fd = listen_on(D.sock);
	if (D.listen_fd < 0)
		return 1;
	D.loop = uv_default_loop();
	D.started = now_ns();
	D.run = (uint64_t)time(NULL);
	uv_poll_init(D.loop, &D.listen_poll, D.listen_fd);
	uv_poll_start(&D.listen_poll, UV_READABLE, on_listen);
	uv_timer_init(D.loop, &D.backoff_timer);
	uv_timer_init(D.loop, &D.idle_timer);
	uv_timer_start(&D.idle_timer, on_idle_timer, D.idle_ns / 4000000 + 1,
		       D.idle_ns / 4000000 + 1);
	uv_signal_init(D.loop, &D.sigint);
	uv_signal_init(D.loop, &D.sigterm);
	uv_signal_start(&D.sigint, on_signal, SIGINT);
	uv_signal_start(&D.sigterm, on_signal, SIGTERM);
	say("listening on %s, snapshots in %s, keeping %u per client",
	    D.sock, D.dir, D.keep);
	uv_run(D.loop, UV_RUN_DEFAULT);
	uv_loop_close(D.loop);
	say("exited cleanly: %llu snapshot(s) written, %llu failed",
	    (unsigned long long)D.snaps_ok,
	    (unsigned long long)D.snaps_failed);
	return 0;
}
