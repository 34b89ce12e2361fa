// SPDX-License-Identifier: MIT
/*
 * A hostile client of cowmmd, for tests/daemon-attack.py.  It speaks the
 * protocol by hand (not through cowmm_attach_daemon()), so it can lie.
 *
 *   daemon-attack SOCKET MODE NAME MIB
 *	Maps MIB MiB of private anonymous memory (the first half populated),
 *	opens a userfaultfd with the features cowmmd asks for, registers the
 *	range as MODE says, sends HELLO with the userfaultfd and a pidfd and
 *	keeps its own copy of the userfaultfd.  Prints "ready ID" (or
 *	"refused STATUS"), then waits: SIGUSR1 does MODE's late action and
 *	prints "acted"; SIGTERM exits.
 *
 *   MODE: wp        write-protect registration, as cowmm_attach_daemon()
 *         missing   missing + write-protect registration
 *         empty     no registration at all
 *         late      wp; SIGUSR1 re-registers missing + wp
 *         vfork     wp; a thread stays in vfork() until SIGUSR1
 *         traced    wp; 32 busy threads, then one seized by a helper
 *                   process (another tracer); SIGUSR1 releases it
 *         unreg     wp; SIGUSR1 unregisters the range
 *         second    wp; SIGUSR1 moves the range to a second userfaultfd
 *                   in missing mode that nobody reads: cowmmd's reads of
 *                   a page not yet populated then wait until we exit
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cowmmd_proto.h"

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13) /* 6.4 */
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

static int uffd;
static char *mem;
static size_t len;
static pid_t tracer;
static int vfork_pipe[2];
static pid_t worker_tid; /* __atomic */

static void die(const char *what)
{
	fprintf(stderr, "daemon-attack: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void reg(unsigned long long mode)
{
	struct uffdio_register r = { { (unsigned long)mem, len }, mode, 0 };

	if (ioctl(uffd, UFFDIO_REGISTER, &r) < 0)
		die("UFFDIO_REGISTER");
}

/* Off cowmmd's userfaultfd (our copy of it), onto one of our own. */
static void move_to_second(void)
{
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_range range = { (unsigned long)mem, len };
	struct uffdio_register r = { range, UFFDIO_REGISTER_MODE_MISSING, 0 };
	int second = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

	if (second < 0 || ioctl(second, UFFDIO_API, &api) < 0)
		die("second userfaultfd");
	if (ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0)
		die("UFFDIO_UNREGISTER");
	if (ioctl(second, UFFDIO_REGISTER, &r) < 0)
		die("UFFDIO_REGISTER (second)");
}

/*
 * The child of a vfork: shares our memory, so raw system calls only (no
 * sanitizer interceptors), and EOF once the parent is gone.
 */
static int vfork_child(void *arg)
{
	char b;

	(void)arg;
	syscall(SYS_close, vfork_pipe[1]);
	syscall(SYS_read, vfork_pipe[0], &b, 1);
	syscall(SYS_exit, 0);
	return 0;
}

/*
 * Wait until thread @tid sleeps uninterruptibly ('D'), as a parent waiting
 * for its vfork child does: "ready" before that let a loaded machine
 * snapshot the client before the thread was in vfork(), and the snapshot
 * the case expects to fail succeeded (daemon-attack vfork-untraced, once
 * in the test loop).
 */
static void wait_in_vfork(pid_t tid)
{
	char path[64], buf[512], *p;
	int i, fd;
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
	for (i = 0; i < 10000; i++) {
		fd = open(path, O_RDONLY | O_CLOEXEC);
		n = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);
		if (fd >= 0)
			close(fd);
		if (n > 0) {
			buf[n] = '\0';
			p = strrchr(buf, ')'); /* "tid (comm) state ..." */
			if (p && p[1] == ' ' && p[2] == 'D')
				return;
		}
		usleep(1000);
	}
	die("the thread did not enter vfork() in 10 s");
}

/*
 * Blocked in a vfork until the child reads a byte and exits.  clone()
 * with CLONE_VM | CLONE_VFORK and a stack of its own, rather than vfork():
 * ThreadSanitizer turns vfork() into fork().
 */
static void *in_vfork(void *arg)
{
	static char stack[64 * 1024] __attribute__((aligned(16)));

	(void)arg;
	__atomic_store_n(&worker_tid, (pid_t)syscall(SYS_gettid),
			 __ATOMIC_RELEASE);
	clone(vfork_child, stack + sizeof(stack), CLONE_VM | CLONE_VFORK |
		SIGCHLD, NULL);
	for (;;)
		pause();
	return NULL;
}

static void *spin_thread(void *arg)
{
	volatile unsigned long n = 0;

	(void)arg;
	for (;;)
		n++;
	return NULL;
}

static void *idle_thread(void *arg)
{
	(void)arg;
	__atomic_store_n(&worker_tid, (pid_t)syscall(SYS_gettid),
			 __ATOMIC_RELEASE);
	for (;;)
		pause();
	return NULL;
}

/* Another tracer on one of our threads: cowmmd's PTRACE_SEIZE fails. */
static void seize_worker(void)
{
	int p[2];
	char b = 0;

	if (pipe(p) < 0)
		die("pipe");
	tracer = fork();
	if (tracer == 0) {
		/* Gone with us, so that our zombie is never held. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() == 1)
			_exit(0);
		if (ptrace(PTRACE_SEIZE, worker_tid, 0, 0) < 0)
			b = 1;
		if (write(p[1], &b, 1) < 0)
			_exit(1);
		for (;;)
			pause();
	}
	if (read(p[0], &b, 1) != 1 || b)
		die("seize");
	close(p[0]);
	close(p[1]);
}

static int hello(const char *path, const char *name)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char buf[sizeof(struct cowmmd_hello) + sizeof(struct cowmmd_range)];
	struct cowmmd_hello *h = (void *)buf;
	struct cowmmd_welcome w;
	int fds[2], sock, pidfd;
	union {
		struct cmsghdr c;
		char b[CMSG_SPACE(sizeof(fds))];
	} ctl;
	struct iovec iov = { buf, sizeof(buf) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = ctl.b,
			      .msg_controllen = sizeof(ctl.b) };
	struct cmsghdr *c;

	memset(buf, 0, sizeof(buf));
	h->h = (struct cowmmd_hdr){ COWMMD_MAGIC, COWMMD_VERSION, COWMMD_HELLO,
				    sizeof(buf), 0 };
	strncpy(h->name, name, COWMMD_NAME_MAX - 1);
	h->nranges = 1;
	h->ranges[0] = (struct cowmmd_range){ (uintptr_t)mem, len };
	pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
	if (pidfd < 0)
		die("pidfd_open");
	fds[0] = uffd;
	fds[1] = pidfd;
	memset(&ctl, 0, sizeof(ctl));
	c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(c), fds, sizeof(fds));
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sock < 0 || connect(sock, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("connect");
	if (sendmsg(sock, &msg, MSG_NOSIGNAL) != (ssize_t)sizeof(buf))
		die("sendmsg");
	close(pidfd);
	if (recv(sock, &w, sizeof(w), 0) != (ssize_t)sizeof(w))
		die("recv WELCOME");
	if (w.status) {
		printf("refused %d\n", w.status);
		exit(0);
	}
	printf("ready %u\n", w.id);
	fflush(stdout);
	return sock;
}

int main(int argc, char **argv)
{
	struct uffdio_api api = {
		.api = UFFD_API,
		.features = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
			    UFFD_FEATURE_WP_UNPOPULATED |
			    UFFD_FEATURE_EVENT_REMOVE |
			    UFFD_FEATURE_EVENT_UNMAP |
			    UFFD_FEATURE_EVENT_REMAP,
	};
	const char *mode;
	pthread_t th;
	sigset_t set;
	size_t i;
	int sig;

	if (argc != 5) {
		fprintf(stderr, "usage: daemon-attack SOCKET MODE NAME MIB\n");
		return 2;
	}
	mode = argv[2];
	len = strtoul(argv[4], NULL, 10) << 20;
	mem = mmap(NULL, len, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	for (i = 0; i < len / 2; i += 4096)
		mem[i] = 1;
	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0)
		die("userfaultfd");
	if (!strcmp(mode, "missing"))
		reg(UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP);
	else if (strcmp(mode, "empty"))
		reg(UFFDIO_REGISTER_MODE_WP);

	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	if (!strcmp(mode, "vfork")) {
		if (pipe(vfork_pipe) < 0)
			die("pipe");
		pthread_create(&th, NULL, in_vfork, NULL);
		while (!__atomic_load_n(&worker_tid, __ATOMIC_ACQUIRE))
			usleep(1000);
		wait_in_vfork(worker_tid);
	}
	if (!strcmp(mode, "traced")) {
		/*
		 * Threads cowmmd seizes and interrupts before it reaches the
		 * traced one: the last of them are still running when the
		 * seize fails.
		 */
		for (i = 0; i < 32; i++)
			pthread_create(&th, NULL, spin_thread, NULL);
		pthread_create(&th, NULL, idle_thread, NULL);
		while (!__atomic_load_n(&worker_tid, __ATOMIC_ACQUIRE))
			usleep(1000);
		seize_worker();
	}
	hello(argv[1], argv[3]);
	for (;;) {
		if (sigwait(&set, &sig))
			continue;
		if (sig != SIGUSR1)
			break;
		if (!strcmp(mode, "late"))
			reg(UFFDIO_REGISTER_MODE_MISSING |
			    UFFDIO_REGISTER_MODE_WP);
		if (!strcmp(mode, "second"))
			move_to_second();
		if (!strcmp(mode, "unreg")) {
			struct uffdio_range range = { (unsigned long)mem, len };

			if (ioctl(uffd, UFFDIO_UNREGISTER, &range) < 0)
				die("UFFDIO_UNREGISTER");
		}
		if (!strcmp(mode, "vfork") && write(vfork_pipe[1], "x", 1) < 0)
			die("write");
		if (!strcmp(mode, "traced") && tracer > 0) {
			kill(tracer, SIGKILL);
			waitpid(tracer, NULL, 0);
			tracer = 0;
		}
		printf("acted\n");
		fflush(stdout);
	}
	if (tracer > 0) {
		kill(tracer, SIGKILL);
		waitpid(tracer, NULL, 0);
	}
	return 0;
}
