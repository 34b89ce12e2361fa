// SPDX-License-Identifier: MIT
/*
 * The socket: accepting (limits, backoff), receiving, idle
 * connections, signals, socket activation.
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
/* The socket */

static void protocol_error(struct conn *cn, const char *why)
{
	cowmmd_say("connection from pid %d closed: %s", cn->pid, why);
	cowmmd_conn_close(cn);
}

void cowmmd_on_conn(uv_poll_t *h, int status, int events)
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
		cowmmd_conn_close(cn);
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
		cowmmd_conn_close(cn);
	} else if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
		protocol_error(cn, "message too long");
	} else if ((size_t)n < sizeof(m.h) || m.h.magic != COWMMD_MAGIC ||
		   m.h.len != (size_t)n) {
		protocol_error(cn, "bad header");
	} else if (m.h.version != COWMMD_VERSION) {
		protocol_error(cn, "another protocol version");
	} else if (cn->uid != 0 && cn->uid != geteuid()) {
		D.refused++;
		cowmmd_say("connection from pid %d refused: uid %u", cn->pid,
			   (unsigned)cn->uid);
		if (m.h.type == COWMMD_HELLO)
			cowmmd_welcome(cn, -EPERM, 0);
		else
			cowmmd_reply_error(cn, -EPERM,
					   "permission denied: uid %u",
					   (unsigned)cn->uid);
		cowmmd_conn_close(cn);
	} else if (cn->hello) {
		protocol_error(cn, "a message before the answer to HELLO");
	} else if (m.h.type == COWMMD_HELLO && cn->kind == CONN_NEW) {
		cowmmd_handle_hello(cn, (void *)&m, (size_t)n, fds, nfds);
	} else if (nfds) {
		protocol_error(cn, "unexpected descriptors");
	} else if (m.h.type == COWMMD_CTL && cn->kind != CONN_CLIENT &&
		   (size_t)n >= sizeof(struct cowmmd_ctl)) {
		cowmmd_handle_ctl(cn, (void *)&m, (size_t)n);
	} else if (m.h.type == COWMMD_DETACH && cn->kind == CONN_CLIENT &&
		   (size_t)n == sizeof(m.h)) {
		struct client *c = cn->client;

		c->bye = true;
		cowmmd_abandon(c, -ECANCELED, "the client detached");
		cowmmd_client_close(c, -ECANCELED);
	} else {
		protocol_error(cn, "unexpected message");
	}
	for (i = 0; i < nfds; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}


static void on_backoff(uv_timer_t *t)
{
	(void)t;
	if (!D.stopping)
		uv_poll_start(&D.listen_poll, UV_READABLE, cowmmd_on_listen);
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

void cowmmd_on_listen(uv_poll_t *h, int status, int events)
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
			cowmmd_say("accept: %s: not accepting for 100 ms",
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
		cowmmd_say("connection from pid %d (uid %u) refused: %s",
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
	uv_poll_start(&cn->poll, UV_READABLE | UV_DISCONNECT, cowmmd_on_conn);
}

/* Connections with nothing in flight that said nothing for too long. */
void cowmmd_on_idle_timer(uv_timer_t *t)
{
	struct conn *cn, *next;
	uint64_t now = now_ns();

	(void)t;
	for (cn = D.conns; cn; cn = next) {
		next = cn->next;
		if (cn->kind == CONN_CLIENT || cn->waiting || cn->closing ||
		    now - cn->last_ns < D.idle_ns)
			continue;
		cowmmd_say("connection from pid %d closed: idle", (int)cn->pid);
		cowmmd_conn_close(cn);
	}
}

void cowmmd_on_signal(uv_signal_t *h, int signum)
{
	struct client *c, *next;
	struct conn *cn, *cnext;

	(void)h;
	if (D.signals++) {
		cowmmd_say("%s again: abandoning snapshots in flight",
			   strsignal(signum));
		for (c = D.clients; c; c = c->next)
			cowmmd_abandon(c, -ECANCELED,
				       "cowmmd is shutting down");
		return;
	}
	cowmmd_say("%s: finishing snapshots in flight, then exiting",
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
			cowmmd_client_close(c, -ECANCELED);
	}
	for (cn = D.conns; cn; cn = cnext) {
		cnext = cn->next;
		if (cn->kind != CONN_CLIENT && !cn->waiting)
			cowmmd_conn_close(cn);
	}
	cowmmd_maybe_exit();
}

/*
 * Socket activation (systemd's cowmmd.socket): one listening AF_UNIX
 * SOCK_SEQPACKET socket passed as descriptor 3 ($LISTEN_PID, $LISTEN_FDS,
 * as sd_listen_fds() reads them).  -ENOENT when not activated.
 */
int cowmmd_listen_activated(void)
{
	const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
	struct sockaddr_un sa = { 0 };
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
		cowmmd_say("socket activation: expected one listening AF_UNIX "
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

int cowmmd_listen_on(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	mode_t old;
	int fd, probe;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		cowmmd_say("socket path too long: %s", path);
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
			cowmmd_say(
			    "%s is held by uid %u (pid %d), not by a cowmmd "
			    "of ours: refusing to start; use --socket "
			    "elsewhere (a directory only we can write)",
			    path, (unsigned)cred.uid, (int)cred.pid);
		else
			cowmmd_say(
			    "another cowmmd (pid %d) is already listening on "
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
		cowmmd_say("cannot listen on %s: %s", path, strerror(-err));
		close(fd);
		return err;
	}
	umask(old);
	return fd;
}

