// SPDX-License-Identifier: MIT
/*
 * Helper threads, and the one that arms a snapshot on one: stop the
 * client's threads with ptrace, check its registration, write-protect.
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
	D.helpers--;
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
int cowmmd_helper_start(struct helper *h)
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
	D.helpers++;
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
int cowmmd_check_registration(pid_t pid, const struct dregion *r, unsigned n)
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
		if (!in || strncmp(line, "VmFlags:", 8) != 0)
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
int cowmmd_wp_retry(int uffd, uint64_t addr, uint64_t len, bool on,
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
void cowmmd_arm_thread(struct helper *h)
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
	/*
	 * Stopped: the registration cannot change under us any more.  Its
	 * ranges were registered for write-protect faults at HELLO: one that
	 * is not any more (unregistered, or caught between an unregister and
	 * a register elsewhere) is the client breaking the protocol, as one
	 * registered for more is, not an invalid argument.
	 */
	if (!ret)
		ret = cowmmd_check_registration(s->pid, s->r, s->nregions);
	if (ret == -EINVAL)
		ret = -EPROTO;
	for (i = 0; !ret && i < s->nregions; i++)
		if (!s->r[i].gone)
			ret =
			    cowmmd_wp_retry(s->uffd, s->r[i].addr, s->r[i].len,
					    true, now_ns() + 2000000000ull);
	thaw(f);
	s->pause_ns = now_ns() - s->t_start;
	free(f);
	h->result = ret;
}

