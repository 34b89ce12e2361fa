// SPDX-License-Identifier: MIT
/*
 * Fuzz target for cowmmd's protocol: message bytes, with descriptors of
 * several kinds, fed straight into the daemon's receive path (cowmmd_on_conn():
 * header checks, HELLO with its descriptor and range checks, CTL parsing
 * and every command) on one connection, then the connection is closed and
 * the loop run until everything it opened is released.
 *
 * Input: up to 4 messages, each [fds][len lo][len hi][len bytes]; the low
 * two bits of fds are how many descriptors go with it (0-3), the next
 * pairs their kinds: a pipe, a userfaultfd (with the features cowmmd
 * asks for, nothing registered), a pidfd of this process, /dev/null.
 *
 * Linked with every file of the daemon but main.c.  Built as a library
 * for the corpus replay (any compiler, meson test fuzz-cowmmd-corpus) and
 * with -Dfuzz as a libFuzzer binary.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "cowmm_daemon.h"
#include "cowmmd.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The snapshot directory stays empty: nothing attaches (daemon/README.md). */
static void remove_dir(void)
{
	if (D.dir[0])
		rmdir(D.dir);
}

static void setup(void)
{
	static bool done;
	char tmpl[] = "/tmp/cowmmd-fuzz-XXXXXX";

	if (done)
		return;
	done = true;
	signal(SIGPIPE, SIG_IGN);
	cowmm__in_worker = true;
	if (!mkdtemp(tmpl))
		abort();
	snprintf(D.dir, sizeof(D.dir), "%s", tmpl);
	atexit(remove_dir);
	D.dirfd = cowmmd_open_dir(D.dir);
	if (D.dirfd < 0)
		abort();
	D.loop = uv_default_loop();
	D.started = now_ns();
	D.run = (uint64_t)time(NULL);
	uv_timer_init(D.loop, &D.idle_timer);
	uv_timer_init(D.loop, &D.backoff_timer);
}

static int make_fd(unsigned kind)
{
	struct uffdio_api api = {
		.api = UFFD_API,
		.features = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
			    UFFD_FEATURE_WP_UNPOPULATED |
			    UFFD_FEATURE_EVENT_REMOVE |
			    UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP,
	};
	int p[2], fd;

	switch (kind) {
	case 0:
		if (pipe2(p, O_CLOEXEC) < 0)
			return -1;
		close(p[1]);
		return p[0];
	case 1:
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
		if (fd >= 0 && ioctl(fd, UFFDIO_API, &api) < 0) {
			close(fd);
			fd = -1;
		}
		return fd;
	case 2:
		return (int)syscall(SYS_pidfd_open, getpid(), 0);
	default:
		return open("/dev/null", O_RDONLY | O_CLOEXEC);
	}
}

static void send_one(int sock, const uint8_t *msg, size_t len, unsigned kinds)
{
	union {
		struct cmsghdr c;
		char buf[CMSG_SPACE(3 * sizeof(int))];
	} ctl;
	struct iovec iov = { (void *)msg, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	unsigned n = kinds & 3, i;
	int fds[3];

	for (i = 0; i < n; i++)
		fds[i] = make_fd((kinds >> (2 + 2 * i)) & 3);
	for (i = 0; i < n; i++)
		if (fds[i] < 0)
			n = 0;
	if (n) {
		struct cmsghdr *c;

		memset(&ctl, 0, sizeof(ctl));
		mh.msg_control = ctl.buf;
		mh.msg_controllen = CMSG_SPACE(n * sizeof(int));
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(n * sizeof(int));
		memcpy(CMSG_DATA(c), fds, n * sizeof(int));
	}
	(void)sendmsg(sock, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
	for (i = 0; i < (kinds & 3); i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char drain[COWMMD_REPLY_MAX];
	struct conn *cn;
	unsigned m;
	int sv[2];

	setup();
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
		return 0;
	cn = calloc(1, sizeof(*cn));
	if (!cn)
		abort();
	fcntl(sv[0], F_SETFL, O_NONBLOCK);
	cn->fd = sv[0];
	cn->uid = geteuid();
	cn->pid = getpid();
	cn->kind = CONN_NEW;
	cn->last_ns = now_ns();
	uv_poll_init(D.loop, &cn->poll, cn->fd);
	cn->poll.data = cn;
	cn->next = D.conns;
	D.conns = cn;

	for (m = 0; m < 4 && size >= 3 && !cn->closing; m++) {
		unsigned kinds = data[0];
		size_t len = (size_t)data[1] | (size_t)data[2] << 8;

		data += 3;
		size -= 3;
		if (len > size)
			len = size;
		send_one(sv[1], data, len, kinds);
		data += len;
		size -= len;
		cowmmd_on_conn(&cn->poll, 0, UV_READABLE);
		while (recv(sv[1], drain, sizeof(drain), MSG_DONTWAIT) > 0)
			;
	}
	close(sv[1]);
	/* A client accepted by a HELLO goes with its connection. */
	if (!cn->closing)
		cowmmd_conn_close(cn);
	while (D.conns || D.clients || D.helpers)
		uv_run(D.loop, UV_RUN_NOWAIT);
	return 0;
}
