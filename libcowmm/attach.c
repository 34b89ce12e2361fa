// SPDX-License-Identifier: MIT
/*
 * Handing memory over to cowmmd.
 *
 * The client registers the ranges it offers with a userfaultfd of its own
 * in write-protect mode, then passes that userfaultfd and a pidfd to the
 * daemon with SCM_RIGHTS and closes its own copies: from then on the daemon
 * holds the only reference.  That is what makes a daemon crash harmless:
 * when the daemon's last descriptor goes, the kernel unregisters the ranges
 * and clears their write protection, and the client's writers run on.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "cowmm_i.h"
#include "cowmmd_proto.h"
#include "uffd.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

struct cowmm_client {
	int sock;
	uint32_t id;
};

static int check_ranges(const struct iovec *ranges, unsigned n)
{
	unsigned i, j;

	if (!ranges || !n || n > COWMMD_MAX_RANGES)
		return -EINVAL;
	for (i = 0; i < n; i++) {
		uintptr_t a = (uintptr_t)ranges[i].iov_base;
		size_t len = ranges[i].iov_len;

		if (!len || a % COWMM_PAGE_SIZE || len % COWMM_PAGE_SIZE ||
		    a + len < a)
			return -EINVAL;
		for (j = 0; j < i; j++) {
			uintptr_t b = (uintptr_t)ranges[j].iov_base;

			if (a < b + ranges[j].iov_len && b < a + len)
				return -EEXIST;
		}
	}
	for (i = 0; i < n; i++) {
		int ret = cowmm__check_maps(0, (uintptr_t)ranges[i].iov_base,
					    ranges[i].iov_len);
		if (ret)
			return ret;
	}
	return 0;
}

static int uffd_setup(const struct iovec *ranges, unsigned n)
{
	uint64_t want = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
			UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_EVENT_REMOVE |
			UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP;
	uint64_t have = 0;
	unsigned i;
	int fd, ret;

	ret = cowmm__uffd_probe(&have);
	if (ret)
		return ret;
	if ((have & want) != want)
		return -EOPNOTSUPP; /* needs 6.4: write-protecting holes */
	fd = cowmm__uffd_open(false);
	if (fd < 0)
		return fd;
	ret = cowmm__uffd_api(fd, want, NULL);
	for (i = 0; !ret && i < n; i++)
		ret = cowmm__uffd_register(fd, (uintptr_t)ranges[i].iov_base,
					   ranges[i].iov_len,
					   UFFDIO_REGISTER_MODE_WP, NULL);
	if (ret) {
		close(fd); /* unregisters what was registered */
		return ret;
	}
	return fd;
}

static int connect_daemon(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = 10 };
	int fd, err;

	if (strlen(path) >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	memcpy(sa.sun_path, path, strlen(path) + 1); /* length checked */
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	/* A daemon that does not answer in 10 s is not working. */
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		err = -errno;
		close(fd);
		if (err == -ENOENT || err == -ECONNREFUSED)
			cowmm__log(COWMM_LOG_ERR,
				   "cowmmd is not running at %s (%s)", path,
				   strerror(-err));
		return err;
	}
	return fd;
}

static int send_hello(int sock, const char *name, const struct iovec *ranges,
		      unsigned n, int uffd, int pidfd)
{
	size_t len = sizeof(struct cowmmd_hello) + n * sizeof(struct cowmmd_range);
	struct cowmmd_hello *h = calloc(1, len);
	union {
		struct cmsghdr c;
		char buf[CMSG_SPACE(2 * sizeof(int))];
	} ctl;
	struct iovec iov;
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = ctl.buf,
			      .msg_controllen = sizeof(ctl.buf) };
	struct cmsghdr *c;
	int fds[2] = { uffd, pidfd };
	unsigned i;
	ssize_t sent;

	if (!h)
		return -ENOMEM;
	h->h = (struct cowmmd_hdr){ COWMMD_MAGIC, COWMMD_VERSION, COWMMD_HELLO,
				    (uint32_t)len, 0 };
	strncpy(h->name, name ? name : "", COWMMD_NAME_MAX - 1);
	h->nranges = n;
	for (i = 0; i < n; i++)
		h->ranges[i] = (struct cowmmd_range){
			(uintptr_t)ranges[i].iov_base, ranges[i].iov_len
		};
	iov = (struct iovec){ h, len };
	memset(&ctl, 0, sizeof(ctl));
	c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(c), fds, sizeof(fds));
	do
		sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (sent < 0 && errno == EINTR);
	free(h);
	return sent == (ssize_t)len ? 0 : sent < 0 ? -errno : -EIO;
}

/* Wait for a message of @type; 0 or the daemon's negative status. */
static int recv_answer(int sock, uint16_t type, uint32_t *id)
{
	struct cowmmd_welcome w;
	ssize_t n;

	do
		n = recv(sock, &w, sizeof(w), 0);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return errno == EAGAIN ? -ETIMEDOUT : -errno;
	if (n == 0)
		return -ECONNRESET;
	if ((size_t)n < sizeof(w.h) || w.h.magic != COWMMD_MAGIC ||
	    w.h.type != type || w.h.len != (size_t)n)
		return -EPROTO;
	if (type != COWMMD_WELCOME)
		return 0;
	if ((size_t)n != sizeof(w))
		return -EPROTO;
	if (w.status > 0 || w.status < -4095)
		return -EPROTO;
	*id = w.id;
	return w.status;
}

int cowmm_attach_daemon(const char *path, const char *name,
			const struct iovec *ranges, unsigned nranges,
			cowmm_client_t **out)
{
	char def[108];
	struct ucred cred;
	socklen_t clen = sizeof(cred);
	cowmm_client_t *c;
	int ret, uffd, pidfd = -1, sock;

	if (!out)
		return -EINVAL;
	*out = NULL;
	ret = check_ranges(ranges, nranges);
	if (ret)
		return ret;
	if (!path)
		path = cowmmd_default_socket(def, sizeof(def));
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	sock = connect_daemon(path);
	if (sock < 0) {
		free(c);
		return sock;
	}
	/*
	 * The daemon stops this process's threads with ptrace for the instant
	 * it arms a snapshot; under Yama's ptrace_scope 1 it needs leave.
	 */
	/* Only a daemon of our own user (or root) gets our memory. */
	if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0 ||
	    (cred.uid != 0 && cred.uid != geteuid())) {
		cowmm__log(COWMM_LOG_ERR,
			   "%s is served by uid %u, neither root nor us: "
			   "refused",
			   path, (unsigned)cred.uid);
		close(sock);
		free(c);
		/* Not -EPERM: its text points at userfaultfd permission. */
		return -EACCES;
	}
	(void)prctl(PR_SET_PTRACER, (unsigned long)cred.pid, 0, 0, 0);

	uffd = uffd_setup(ranges, nranges);
	if (uffd < 0) {
		ret = uffd;
		goto fail;
	}
	pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
	if (pidfd < 0) {
		ret = -errno;
		goto fail;
	}
	ret = send_hello(sock, name, ranges, nranges, uffd, pidfd);
	if (!ret)
		ret = recv_answer(sock, COWMMD_WELCOME, &c->id);
	/*
	 * Either way our copies go.  On success the daemon's are the only
	 * ones; on failure closing the last one unregisters the ranges.
	 */
	close(pidfd);
	pidfd = -1;
	close(uffd);
	uffd = -1;
	if (ret)
		goto fail;
	c->sock = sock;
	*out = c;
	cowmm__log(COWMM_LOG_INFO, "attached to cowmmd at %s as client %u",
		   path, c->id);
	return 0;

fail:
	if (pidfd >= 0)
		close(pidfd);
	if (uffd >= 0)
		close(uffd);
	close(sock);
	free(c);
	return ret;
}

unsigned cowmm_client_id(const cowmm_client_t *c)
{
	return c ? c->id : 0;
}

int cowmm_detach_daemon(cowmm_client_t *c)
{
	struct cowmmd_hdr h = { COWMMD_MAGIC, COWMMD_VERSION, COWMMD_DETACH,
				sizeof(h), 0 };
	int ret;

	if (!c)
		return -EINVAL;
	if (send(c->sock, &h, sizeof(h), MSG_NOSIGNAL) != sizeof(h))
		ret = -errno;
	else
		ret = recv_answer(c->sock, COWMMD_BYE, NULL);
	/* A daemon that is gone has closed the userfaultfd already. */
	if (ret == -ECONNRESET || ret == -EPIPE)
		ret = 0;
	close(c->sock);
	free(c);
	return ret;
}
