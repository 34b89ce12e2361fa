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
#include "cowmm_i.h"
#include "cowmmd.h"
#include "uffd.h"

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
	*err = cowmmd_check_registration(cn->pid, dr, h->nranges);
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

void cowmmd_handle_hello(struct conn *cn, const struct cowmmd_hello *h,
			 size_t len, int *fds, unsigned nfds)
{
	struct client *c;
	const char *why;
	unsigned i;
	size_t first = 0;
	int err;

	why = check_hello(cn, h, len, fds, nfds, &err);
	if (why) {
		cowmmd_say("connection from pid %d refused: %s", cn->pid, why);
		cowmmd_welcome(cn, err, 0);
		cowmmd_conn_close(cn);
		return;
	}
	c = calloc(1, sizeof(*c));
	if (!c) {
		cowmmd_welcome(cn, -ENOMEM, 0);
		cowmmd_conn_close(cn);
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

