// SPDX-License-Identifier: MIT
/*
 * Snapshots: start, copy on write (the copier thread), finish, prune;
 * the snapshot directory, held open.
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
#include "cowmmd.h"

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif

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
 * NAME-PID-RUN.ID-SEQ, in the snapshot directory: RUN (the daemon's
 * start, in seconds) and the client id keep names unique across attaches
 * and daemon restarts.
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

			if (atomic_load(&s->err) ||
			    !cowmmd_page_of(s, addr[k], &p) ||
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
			(void)cowmmd_wp_retry(s->uffd, addr[k], PAGE, false,
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

void cowmmd_reply_snapshot_error(struct conn *cn, struct client *c, int ret)
{
	cowmmd_reply_error(
	    cn, ret, "snapshot of client %u (%s) into %s failed: %s%s", c->id,
	    c->name, D.dir, strerror(-ret),
	    ret == -EPERM    ? " (ptrace not allowed: run cowmmd as root "
			       "or the client's user)"
	    : ret == -EPROTO ? " (its ranges are no longer registered for "
			       "write-protect faults alone)"
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
		ret = cowmmd_helper_start(h);
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
 * The client is stopped and armed on a helper thread (cowmmd_arm_thread()), the
 * files streamed on the pool (stream.c); the loop goes on meanwhile.
 */
int cowmmd_start_snapshot(struct client *c, struct conn *waiter)
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
	*h = (struct helper){
	    .run = cowmmd_arm_thread, .done = arm_done, .data = s};
	if (!ret) {
		c->snap = s;
		ret = cowmmd_helper_start(h);
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

void cowmmd_prune(struct client *c)
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
		cowmmd_outf(
		    o, "{\"seq\": %llu, \"dir\": ", (unsigned long long)s->seq);
		cowmmd_out_jstr(o, dir);
		cowmmd_outf(
		    o,
		    ", \"regions\": %u, "
		    "\"bytes\": %llu, \"pause_us\": %llu, \"seconds\": %.3f, "
		    "\"copies\": %llu}\n",
		    s->nregions, (unsigned long long)s->total,
		    (unsigned long long)(s->pause_ns / 1000), secs,
		    (unsigned long long)atomic_load(&s->copies));
	} else {
		cowmmd_outf(
		    o,
		    "%s\n  %u region file(s), %.1f MiB in %.3f s; client "
		    "stopped %.3f ms; %llu pages copied on write\n",
		    dir, s->nregions, (double)s->total / (1 << 20), secs,
		    (double)s->pause_ns / 1e6,
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
				cowmmd_loop_wp(c, c->r[i].addr, c->r[i].len,
					       false);
		c->snaps_failed++;
		D.snaps_failed++;
		c->last_err = s->result;
		cowmmd_say("client %u (%s): snapshot %llu into %s failed: %s",
			   c->id, c->name, (unsigned long long)s->seq, D.dir,
			   strerror(-s->result));
	} else {
		c->snaps_ok++;
		D.snaps_ok++;
		c->bytes += s->total;
		D.bytes += s->total;
		c->last_err = 0;
		c->last_pause_us = s->pause_ns / 1000;
		c->last_ms = (s->t_end - s->t_start) / 1000000;
		snprintf(c->last, sizeof(c->last), "%s/%s", D.dir, s->finaldir);
		c->kept[c->nkept++] =
		    s->seq; /* cowmmd_prune() keeps it < KEEP_MAX */
		cowmmd_prune(c);
		cowmmd_say(
		    "client %u: snapshot %llu: %.1f MiB in %.3f s, stopped "
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
			cowmmd_reply_snapshot_error(cn, c, s->result);
		} else {
			o.json = cn->flags & COWMMD_CTL_JSON;
			o.len = 0;
			out_snapshot(&o, s);
			cowmmd_send_reply(cn, 0, &o);
		}
		if (D.stopping)
			cowmmd_conn_close(cn);
	}
	ret = s->result;
	free_dsnap(s);
	if (ret == -EPROTO)
		cowmmd_client_close(
		    c, -EPROTO); /* it lied about its registration */
	if (c->gone)
		cowmmd_client_finish(c);
	else if (D.stopping)
		cowmmd_client_close(c, -ECANCELED);
}

void cowmmd_on_timer(uv_timer_t *t)
{
	struct client *c = t->data;
	int ret;

	if (c->snap) {
		cowmmd_say(
		    "client %u: scheduled snapshot skipped: the last one is "
		    "still being written",
		    c->id);
		return;
	}
	ret = cowmmd_start_snapshot(c, NULL);
	if (ret)
		cowmmd_say("client %u (%s): scheduled snapshot into %s failed: "
			   "%s",
			   c->id, c->name, D.dir, strerror(-ret));
}

/* ------------------------------------------------------------------------ */
/* The snapshot directory */

/*
 * Open the snapshot directory for good, walking from / one component at a
 * time without following symlinks, creating what is missing (0700).
 * Root writes there: every component must belong to root or to us, and
 * be writable by nobody else unless sticky (/tmp); the last must be ours
 * and writable by us alone.  Snapshots are then written relative to the
 * descriptor, so a directory swapped for a symlink later changes nothing.
 */
int cowmmd_open_dir(const char *dir)
{
	char tmp[PATH_MAX], *comp, *next, *save = NULL;
	uid_t me = geteuid();
	struct stat st;
	int fd, sub;

	if (dir[0] != '/') {
		cowmmd_say(
		    "%s: the snapshot directory must be an absolute path", dir);
		return -EINVAL;
	}
	snprintf(tmp, sizeof(tmp), "%s", dir);
	fd = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	for (comp = strtok_r(tmp, "/", &save); comp; comp = next) {
		next = strtok_r(NULL, "/", &save);
		if (!strcmp(comp, ".") || !strcmp(comp, "..")) {
			cowmmd_say("%s: no . or .. in the snapshot directory",
				   dir);
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

			cowmmd_say("%s: %s: %s%s", dir, comp, strerror(-err),
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
			cowmmd_say(
			    "%s: %s is owned by uid %u, mode %04o: the "
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
void cowmmd_remove_stale(void)
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
		cowmmd_say("removed %u unfinished snapshot(s) left in %s", n,
			   D.dir);
}

