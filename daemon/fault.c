// SPDX-License-Identifier: MIT
/*
 * A client's userfaultfd, on the loop thread: write faults (handed to
 * the copier when a snapshot still needs the old bytes), missing faults
 * (a client that lied), discards, unmaps and moves.
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
#include "cowmm_daemon.h"
#include "cowmmd.h"

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif

/* ------------------------------------------------------------------------ */
/* Write faults */

static void process_events(struct client *c);
static void on_retry(uv_timer_t *t);

/* The page of a snapshot in flight at @addr, by the snapshot's own list. */
bool cowmmd_page_of(const struct dsnap *s, uint64_t addr, size_t *pg)
{
	unsigned i;

	for (i = 0; i < s->nregions; i++)
		if (!s->r[i].gone && addr - s->r[i].addr < s->r[i].len) {
			*pg = s->r[i].first + (addr - s->r[i].addr) / PAGE;
			return true;
		}
	return false;
}

void cowmmd_abandon(struct client *c, int err, const char *why)
{
	int zero = 0;

	if (c->snap && atomic_compare_exchange_strong(&c->snap->err, &zero,
						      err))
		cowmmd_say("client %u: snapshot %llu abandoned: %s", c->id,
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

	if (s && cowmmd_page_of(s, addr, &pg) &&
	    atomic_load(&s->state[pg]) == PG_NONE) {
		queue_copy(s, pg, addr);
		return;
	}
	ret = cowmm__uffd_wp(c->uffd, addr, PAGE, false, true);
	if (ret != -EAGAIN)
		return;
	if (c->nretry == RETRY_MAX) { /* never drop one: it would hang */
		cowmmd_abandon(c, -EAGAIN, "too many faults held back");
		(void)cowmmd_loop_wp(c, addr, PAGE, false);
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
		cowmmd_say(
		    "client %u: a missing or minor fault at 0x%llx: its ranges "
		    "are registered for more than write-protect faults",
		    c->id, (unsigned long long)addr);
		cowmmd_abandon(c, -EPROTO,
			       "the client registered missing faults");
		cowmmd_client_close(c, -EPROTO);
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
			cowmmd_abandon(c, -EBUSY,
				       "too many discards during the "
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
			cowmmd_abandon(c, -EBUSY,
				       "the client unmapped part of a "
				       "region during the snapshot");
		for (a = lo & ~(PAGE - 1); s && a < hi; a += PAGE) {
			size_t pg = r->first + (a - r->addr) / PAGE;

			if (atomic_load(&s->state[pg]) == PG_NONE) {
				cowmmd_abandon(
				    c, -EBUSY,
				    "the client discarded memory the "
				    "snapshot still needed");
				break;
			}
		}
		if (unmapped) {
			cowmmd_say("client %u: region %u unmapped; left out of "
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
				cowmmd_client_close(c, -err);
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

void cowmmd_on_uffd(uv_poll_t *h, int status, int events)
{
	(void)status;
	(void)events;
	process_events(h->data);
}

void cowmmd_on_pidfd(uv_poll_t *h, int status, int events)
{
	struct client *c = h->data;

	(void)status;
	(void)events;
	uv_poll_stop(h);
	cowmmd_client_close(c, -ESRCH); /* the process exited */
}

/* Write-protect or unprotect a range from the loop, reading events the
 * kernel holds the ioctl back for. */
int cowmmd_loop_wp(struct client *c, uint64_t addr, uint64_t len, bool on)
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

