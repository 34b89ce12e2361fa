// SPDX-License-Identifier: MIT
/*
 * Writing a client's snapshot: one file per region, in the snapshot file
 * format, into a hidden directory that is renamed to its final name only
 * when every file is complete and synced.  Runs on libuv's thread pool
 * while the loop thread keeps handling the client's write faults.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "cowmm.h"
#include "cowmm_daemon.h"
#include "cowmmd.h"

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct source {
	struct dsnap *s;
	const struct dregion *r;
};

/* With --rate, sleep until @done bytes are due since the stream began. */
static void throttle(struct dsnap *s, uint64_t done)
{
	uint64_t due, now = now_ns();
	struct timespec ts;

	if (!s->rate)
		return;
	due = s->t_stream + (uint64_t)((double)done * 1e9 / (double)s->rate);
	if (due <= now)
		return;
	ts.tv_sec = (time_t)((due - now) / 1000000000u);
	ts.tv_nsec = (long)((due - now) % 1000000000u);
	nanosleep(&ts, NULL);
}

/*
 * Did the client discard a page we took live?  The kernel zaps discarded
 * pages as soon as their REMOVE event is read, maybe before the loop
 * thread handles it: wait until every batch of events read by now has been
 * dispatched (recorded in s->removed), then look.
 */
int check_discards(struct dsnap *s, uint64_t addr, size_t len,
		   const bool *live)
{
	uint64_t want = atomic_load(s->ev_started);
	unsigned k, n;
	size_t i;

	while (atomic_load(s->ev_done) < want && !atomic_load(&s->err))
		sched_yield();
	n = atomic_load(&s->nremoved);
	for (k = 0; k < n; k++) {
		if (s->removed[k][1] <= addr || s->removed[k][0] >= addr + len)
			continue;
		for (i = 0; i < len / PAGE; i++) {
			uint64_t a = addr + i * PAGE;

			if (live[i] && a + PAGE > s->removed[k][0] &&
			    a < s->removed[k][1])
				return -EBUSY;
		}
	}
	return atomic_load(&s->err);
}

/*
 * Read [off, off + len) of a region for the file.  Pages not yet saved are
 * still write-protected, so the live bytes are the snapshot's; a page the
 * fault handler preserved meanwhile is taken from its frame instead.  Then
 * the range no longer needs protection: the client's writes there stop
 * faulting at all.
 */
static int remote_read(void *data, size_t off, void *buf, size_t len)
{
	struct source *src = data;
	struct dsnap *s = src->s;
	struct iovec local = { buf, len };
	struct iovec remote = { (void *)(uintptr_t)(src->r->addr + off), len };
	bool live[2 * 1024 * 1024 / PAGE]; /* cowmm_format_write's 2 MiB */
	size_t i, first = src->r->first + off / PAGE;
	ssize_t n;
	int err = atomic_load(&s->err);

	if (err)
		return err;
	n = process_vm_readv(s->pid, &local, 1, &remote, 1, 0);
	if (n != (ssize_t)len)
		return n < 0 ? -errno : -EFAULT;
	/* The pid may have been reused once the client died: ask the pidfd. */
	if (syscall(SYS_pidfd_send_signal, s->pidfd, 0, NULL, 0) < 0)
		return -ESRCH;
	for (i = 0; i < len / PAGE; i++) {
		uint8_t expect = PG_NONE;

		live[i] = atomic_compare_exchange_strong(&s->state[first + i],
							 &expect, PG_STREAMED);
		if (!live[i])
			memcpy((char *)buf + i * PAGE, s->frames[first + i],
			       PAGE);
	}
	err = check_discards(s, src->r->addr + off, len, live);
	if (err)
		return err;
	/* Errors only cost faults later: the handler clears those too. */
	(void)cowmm__uffd_wp(s->uffd, src->r->addr + off, len, false, true);
	throttle(s, atomic_fetch_add(&s->done, len) + len);
	return 0;
}

/*
 * Remove a snapshot directory this daemon wrote, with its files; @name is
 * in @dirfd, and nothing is followed: a symlink put in its place is only
 * unlinked.
 */
void remove_snapshot_dir(int dirfd, const char *name, unsigned nregions)
{
	char file[32];
	unsigned i;
	int fd = openat(dirfd, name,
			O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0) {
		unlinkat(dirfd, name, 0);
		return;
	}
	for (i = 0; i < nregions; i++) {
		snprintf(file, sizeof(file), "r%u.cowmm", i);
		unlinkat(fd, file, 0);
	}
	close(fd);
	unlinkat(dirfd, name, AT_REMOVEDIR);
}

static int sync_fd(int fd)
{
	return fsync(fd) < 0 ? -errno : 0;
}

static int sync_dir(int dirfd, const char *name)
{
	int fd = openat(dirfd, name,
			O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	int ret;

	if (fd < 0)
		return -errno;
	ret = sync_fd(fd);
	close(fd);
	return ret;
}

void stream_snapshot(uv_work_t *w)
{
	struct dsnap *s = w->data;
	bool renamed = false;
	unsigned i;
	int ret = 0;

	s->t_stream = now_ns();
	for (i = 0; i < s->nregions; i++) {
		struct source src = { s, &s->r[i] };

		if (s->fds[i] < 0) /* a region gone before the snapshot */
			continue;
		if (!ret)
			ret = cowmm_format_write(s->fds[i], s->r[i].len,
						 remote_read, &src, NULL, NULL);
		if (!ret && fsync(s->fds[i]) < 0)
			ret = -errno;
		close(s->fds[i]);
		s->fds[i] = -1;
	}
	if (!ret)
		ret = atomic_load(&s->err);
	if (!ret)
		ret = sync_dir(s->dirfd, s->tmpdir); /* before the rename */
	if (!ret) {
		if (renameat(s->dirfd, s->tmpdir, s->dirfd, s->finaldir) < 0)
			ret = -errno;
		else
			renamed = true;
	}
	if (!ret)
		ret = sync_fd(s->dirfd);
	if (ret)
		remove_snapshot_dir(s->dirfd,
				    renamed ? s->finaldir : s->tmpdir,
				    s->nregions);
	s->result = ret;
	s->t_end = now_ns();
}
