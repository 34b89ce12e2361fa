// SPDX-License-Identifier: MIT
/*
 * HELLO: a new client, its descriptors, ranges and registration checked.
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

void cowmmd_welcome(struct conn *cn, int status, unsigned id)
{
	struct cowmmd_welcome w = {
		{ COWMMD_MAGIC, COWMMD_VERSION, COWMMD_WELCOME, sizeof(w), 0 },
		status, id
	};

	(void)send(cn->fd, &w, sizeof(w), MSG_NOSIGNAL | MSG_DONTWAIT);
}

/*
 * A HELLO being checked on a helper thread: reading the client's maps and
 * smaps costs time in proportion to its address space (the kernel walks
 * its page tables for smaps), which the client chooses.
 */
struct hello_job {
	struct helper h;
	struct conn *cn; /* NULL once the connection is gone */
	pid_t pid;
	int fds[2];
	size_t len;
	const char *why;
	int err;
	union { /* last: the HELLO ends in a flexible array */
		struct cowmmd_hello msg;
		char buf[sizeof(struct cowmmd_hello) +
			 COWMMD_MAX_RANGES * sizeof(struct cowmmd_range)];
	} m;
};

/* The quick checks, on the loop: why it is refused, with *err, or NULL. */
static const char *check_hello(struct conn *cn, const struct cowmmd_hello *h,
			       size_t len, const int *fds, unsigned nfds,
			       int *err)
{
	uint64_t want, have;
	unsigned i, j;

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
	}
	*err = 0;
	return NULL;
}

/* The slow checks, on a helper thread: the client's memory. */
static void hello_thread(struct helper *hp)
{
	struct hello_job *job = hp->data;
	const struct cowmmd_hello *h = &job->m.msg;
	struct dregion dr[COWMMD_MAX_RANGES];
	unsigned i;

	job->err = -EINVAL;
	for (i = 0; i < h->nranges; i++) {
		if (cowmm__check_maps(job->pid, h->ranges[i].addr,
				      h->ranges[i].len)) {
			job->why = "range is not private anonymous memory of "
				   "the client";
			return;
		}
		dr[i] = (struct dregion){ h->ranges[i].addr, h->ranges[i].len,
					  0, false };
	}
	job->err = cowmmd_check_registration(job->pid, dr, h->nranges);
	if (job->err == -EPROTO) {
		job->why = "ranges registered for missing or minor faults";
		return;
	}
	if (job->err) {
		job->why = "ranges not registered for write-protect faults";
		return;
	}
	/*
	 * Registered with this userfaultfd, not another one of the client's
	 * (-EBUSY): registering again in the same mode changes nothing.
	 */
	for (i = 0; i < h->nranges; i++) {
		job->err = cowmm__uffd_register(job->fds[0], h->ranges[i].addr,
						h->ranges[i].len,
						UFFDIO_REGISTER_MODE_WP, NULL);
		if (job->err == -EBUSY) {
			job->why = "ranges registered with another userfaultfd";
			return;
		}
		if (job->err) {
			job->why = "cannot check the registration of the "
				   "ranges";
			return;
		}
	}
}

/* The limits, on the loop once the checks passed. */
static const char *check_room(const struct conn *cn, int *err)
{
	unsigned nclients = 0, mine = 0;
	struct client *c;

	*err = -EUSERS;
	for (c = D.clients; c; c = c->next) {
		nclients++;
		if (!c->gone && c->pid == cn->pid &&
		    ++mine >= MAX_CLIENTS_PER_PID)
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

static void refuse(struct conn *cn, int err, const char *why)
{
	cowmmd_say("connection from pid %d refused: %s", cn->pid, why);
	cowmmd_welcome(cn, err, 0);
	cowmmd_conn_close(cn);
}

/* The client, once every check passed: it owns @fds from here on. */
static void hello_accept(struct conn *cn, const struct cowmmd_hello *h,
			 int *fds)
{
	struct client *c;
	unsigned i;
	size_t first = 0;

	c = calloc(1, sizeof(*c));
	if (!c) {
		refuse(cn, -ENOMEM, "out of memory");
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
	uv_poll_start(&c->uffd_poll, UV_READABLE, cowmmd_on_uffd);
	uv_poll_start(&c->pidfd_poll, UV_READABLE, cowmmd_on_pidfd);
	c->next = D.clients;
	D.clients = c;
	c->conn = cn;
	cn->client = c;
	cn->kind = CONN_CLIENT;
	cowmmd_say("client %u (%s, pid %d): attached, %u region(s), %.1f MiB",
		   c->id, c->name, c->pid, c->nregions,
		   (double)c->npages * PAGE / (1 << 20));
	cowmmd_welcome(cn, 0, c->id);
}

/* Its connection is gone: the job ends alone. */
void cowmmd_hello_forget(struct hello_job *job)
{
	job->cn = NULL;
}

static void hello_done(struct helper *hp)
{
	struct hello_job *job = hp->data;
	struct conn *cn = job->cn;
	const char *why = job->why;
	int err = job->err;

	if (cn) {
		cn->hello = NULL;
		if (!why)
			why = check_room(cn, &err);
		if (why)
			refuse(cn, err, why);
		else
			hello_accept(cn, &job->m.msg, job->fds);
	}
	if (job->fds[0] >= 0)
		close(job->fds[0]);
	if (job->fds[1] >= 0)
		close(job->fds[1]);
	free(job);
}

/*
 * HELLO: the quick checks here; the client's maps and registration on a
 * helper thread; hello_done() answers.  Takes @fds (set to -1) if it goes
 * on.
 */
void cowmmd_handle_hello(struct conn *cn, const struct cowmmd_hello *h,
			 size_t len, int *fds, unsigned nfds)
{
	struct hello_job *job;
	const char *why;
	int err;

	why = check_hello(cn, h, len, fds, nfds, &err);
	if (why) {
		refuse(cn, err, why);
		return;
	}
	job = calloc(1, sizeof(*job));
	if (!job) {
		refuse(cn, -ENOMEM, "out of memory");
		return;
	}
	job->h = (struct helper){ .run = hello_thread, .done = hello_done,
				  .data = job };
	job->cn = cn;
	job->pid = cn->pid;
	job->len = len;
	memcpy(job->m.buf, h, len); /* length checked */
	job->fds[0] = fds[0];
	job->fds[1] = fds[1];
	err = cowmmd_helper_start(&job->h);
	if (err) {
		free(job);
		refuse(cn, err, "cannot start a thread");
		return;
	}
	fds[0] = fds[1] = -1; /* the job's now */
	cn->hello = job;
}
