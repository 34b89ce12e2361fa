// SPDX-License-Identifier: MIT
/*
 * cowmm_open()/cowmm_close(): configuration, permissions, fork(), and the
 * manager's own failures: a worker thread that stops, the userfaultfd
 * closed behind the library's back.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "cowmm_i.h"

START_TEST(test_defaults)
{
	cowmm_t *mm = NULL;
	struct cowmm_stats st;

	ck_assert_int_eq(cowmm_open(NULL, &mm), 0);
	ck_assert_ptr_nonnull(mm);
	ck_assert(cowmm_features(mm) & 1); /* PAGEFAULT_FLAG_WP */
	st = t_stats(mm);
	ck_assert_uint_eq(st.wp_faults, 0);
	ck_assert_uint_eq(st.regions_live, 0);
	cowmm_close(mm);
	cowmm_close(NULL);
}
END_TEST

START_TEST(test_config)
{
	struct {
		struct cowmm_config cfg;
		uint64_t tail;
	} big = { COWMM_CONFIG_INIT, 0 };
	struct cowmm_config cfg = COWMM_CONFIG_INIT;
	cowmm_t *mm = NULL, *keep = (cowmm_t *)&cfg;

	/* Bad arguments leave *out alone. */
	mm = keep;
	cfg.flags = 1u << 31;
	ck_assert_int_eq(cowmm_open(&cfg, &mm), -EINVAL);
	cfg.flags = 0;
	cfg.workers = COWMM_WORKERS_MAX + 1;
	ck_assert_int_eq(cowmm_open(&cfg, &mm), -EINVAL);
	cfg.workers = 0;
	cfg.size = 0;
	ck_assert_int_eq(cowmm_open(&cfg, &mm), -EINVAL);
	ck_assert_ptr_eq(mm, keep);
	ck_assert_int_eq(cowmm_open(NULL, NULL), -EINVAL);

	/* A longer struct with a non-zero unknown tail is refused. */
	big.cfg.size = sizeof(big);
	big.tail = 1;
	ck_assert_int_eq(cowmm_open(&big.cfg, &mm), -E2BIG);
	ck_assert_ptr_eq(mm, keep);
	big.tail = 0;
	ck_assert_int_eq(cowmm_open(&big.cfg, &mm), 0);
	cowmm_close(mm);

	/* A shorter struct (an older caller) is zero-extended. */
	cfg.size = offsetof(struct cowmm_config, fault_around);
	cfg.workers = 3;
	cfg.fault_around = COWMM_FAULT_AROUND_MAX + 1; /* beyond size: unread */
	ck_assert_int_eq(cowmm_open(&cfg, &mm), 0);
	cowmm_close(mm);
}
END_TEST

START_TEST(test_stats_size)
{
	cowmm_t *mm = t_open(0);
	struct cowmm_stats st;
	unsigned char buf[sizeof(st) + 8];

	memset(buf, 0xa5, sizeof(buf));
	ck_assert_int_eq(cowmm_stats(mm, (void *)buf, 8), 0);
	ck_assert_uint_eq(buf[8], 0xa5); /* only 8 bytes written */
	ck_assert_int_eq(cowmm_stats(mm, (void *)buf, sizeof(buf)), 0);
	ck_assert_uint_eq(buf[sizeof(st)], 0xa5);
	ck_assert_int_eq(cowmm_stats(mm, NULL, sizeof(st)), -EINVAL);
	ck_assert_int_eq(cowmm_stats(NULL, &st, sizeof(st)), -EINVAL);
	cowmm_close(mm);
}
END_TEST

START_TEST(test_eperm)
{
	int pipefd[2], status;
	char msg[512] = "";
	pid_t pid;

	/* Only meaningful where unprivileged users are not allowed. */
	ck_assert_int_eq(pipe(pipefd), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		cowmm_t *mm = NULL;
		int ret;

		t_log_clear();
		if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
			_exit(10);
		ret = cowmm_open(NULL, &mm);
		if (write(pipefd[1], t_log_text(), strlen(t_log_text())) < 0)
			_exit(11);
		_exit(ret == -EPERM ? 0 : ret == 0 ? 12 : 13);
	}
	close(pipefd[1]);
	ck_assert_int_ge(read(pipefd[0], msg, sizeof(msg) - 1), 0);
	close(pipefd[0]);
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "unprivileged cowmm_open: status %d, log: %s", status, msg);
	ck_assert_msg(strstr(msg, "vm.unprivileged_userfaultfd") &&
			      strstr(msg, "/dev/userfaultfd"),
		      "the -EPERM message says how to grant access: %s", msg);
}
END_TEST

/*
 * The child of fork() gets ordinary memory: it may write pages that are
 * write-protected for a live snapshot in the parent without hanging, and
 * library calls on inherited handles give -ECHILD.  The parent's snapshot
 * is untouched by the child's writes.
 */
START_TEST(test_fork_child)
{
	cowmm_t *mm = t_open(0);
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p, buf[T_PAGE];
	int status;
	pid_t pid;

	ck_assert_int_eq(cowmm_region_alloc(mm, 64 * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	memset(p, 0x11, 64 * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);

	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		struct cowmm_stats st;
		cowmm_snap_t *s2 = NULL;

		alarm(10); /* a hang fails the test */
		memset(p, 0x22, 64 * T_PAGE);
		if (p[5 * T_PAGE] != 0x22)
			_exit(1);
		if (cowmm_snapshot(r, &s2) != -ECHILD || s2)
			_exit(2);
		if (cowmm_stats(mm, &st, sizeof(st)) != -ECHILD)
			_exit(3);
		if (cowmm_snap_read(s, 0, buf, sizeof(buf)) != -ECHILD)
			_exit(4);
		if (cowmm_region_release(r) != -ECHILD)
			_exit(5);
		cowmm_close(mm); /* does nothing in the child */
		_exit(0);
	}
	ck_assert_int_eq(waitpid(pid, &status, 0), pid);
	ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
		      "child status %d", status);
	ck_assert_int_eq(p[0], 0x11);
	ck_assert_int_eq(cowmm_snap_read(s, 0, buf, sizeof(buf)), T_PAGE);
	ck_assert_int_eq(buf[100], 0x11);
	memset(p, 0x33, T_PAGE);
	ck_assert_int_eq(cowmm_snap_read(s, 0, buf, sizeof(buf)), T_PAGE);
	ck_assert_int_eq(buf[100], 0x11);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

START_TEST(test_workers)
{
	cowmm_t *mm = t_open_fa(COWMM_WORKERS_MAX, 1); /* counts page by page */
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	size_t i;

	ck_assert_int_eq(cowmm_region_alloc(mm, 256 * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	for (i = 0; i < 256; i++)
		p[i * T_PAGE] = 1;
	ck_assert_uint_eq(t_stats(mm).wp_faults, 256);
	cowmm_snap_release(s);
	cowmm_close(mm); /* releases the region too */
}
END_TEST

/*
 * COWMM_OPEN_PER_CPU: one worker bound to each CPU this process may use,
 * and faults still resolved with their copies.
 */
START_TEST(test_per_cpu)
{
	struct cowmm_config cfg = COWMM_CONFIG_INIT;
	cpu_set_t set, w, all;
	cowmm_t *mm = NULL;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	unsigned char *p;
	unsigned i;

	ck_assert_int_eq(sched_getaffinity(0, sizeof(set), &set), 0);
	cfg.flags = COWMM_OPEN_PER_CPU;
	cfg.fault_around = 1;
	ck_assert_int_eq(cowmm_open(&cfg, &mm), 0);
	ck_assert_uint_eq(mm->nworkers, (unsigned)CPU_COUNT(&set));
	CPU_ZERO(&all);
	for (i = 0; i < mm->nworkers; i++) {
		ck_assert_int_eq(pthread_getaffinity_np(mm->workers[i],
							sizeof(w), &w),
				 0);
		ck_assert_int_eq(CPU_COUNT(&w), 1);
		CPU_OR(&all, &all, &w);
	}
	ck_assert(CPU_EQUAL(&all, &set)); /* each CPU has its worker */
	ck_assert_int_eq(cowmm_region_alloc(mm, 64 * T_PAGE, 0, &r), 0);
	p = cowmm_region_base(r);
	memset(p, 7, 64 * T_PAGE);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	for (i = 0; i < 64; i++)
		p[i * T_PAGE] = 9;
	ck_assert_uint_eq(t_stats(mm).copies, 64);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/* The CPUs worker 0 of @mm may run on. */
static cpu_set_t worker_cpus(cowmm_t *mm)
{
	cpu_set_t w;

	ck_assert_int_eq(pthread_getaffinity_np(mm->workers[0], sizeof(w), &w),
			 0);
	return w;
}

/* Bind the calling thread to @cpu, then write one byte of @n pages. */
static void write_from(int cpu, unsigned char *p, size_t first, size_t n)
{
	cpu_set_t one;
	size_t i;

	CPU_ZERO(&one);
	CPU_SET(cpu, &one);
	ck_assert_int_eq(sched_setaffinity(0, sizeof(one), &one), 0);
	for (i = first; i < first + n; i++)
		p[i * T_PAGE] = 9;
}

/*
 * With COWMM_OPEN_FOLLOW the worker resolves faults on the CPU of the
 * thread that wrote (no cross-CPU wake-up): it binds itself there, and
 * moves when the writer moves.  By default it stays where the scheduler
 * puts it.
 */
START_TEST(test_follow_writer)
{
	const size_t npages = 512;
	cpu_set_t set, w;
	int cpu[2], n = 0, c;

	ck_assert_int_eq(sched_getaffinity(0, sizeof(set), &set), 0);
	for (c = 0; c < CPU_SETSIZE && n < 2; c++)
		if (CPU_ISSET(c, &set))
			cpu[n++] = c;
	if (n < 2) { /* nothing to follow between */
		fprintf(stderr, "follow-writer: one CPU only, not tested\n");
		return;
	}
	for (int follow = 1; follow >= 0; follow--) {
		struct cowmm_config cfg = COWMM_CONFIG_INIT;
		cowmm_t *mm = NULL;
		cowmm_region_t *r;
		cowmm_snap_t *s;
		unsigned char *p;

		cfg.flags = follow ? COWMM_OPEN_FOLLOW : 0;
		ck_assert_int_eq(cowmm_open(&cfg, &mm), 0);
		ck_assert_int_eq(cowmm_region_alloc(mm, npages * T_PAGE, 0, &r),
				 0);
		p = cowmm_region_base(r);
		memset(p, 7, npages * T_PAGE);
		ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
		write_from(cpu[1], p, 0, 200);
		w = worker_cpus(mm);
		if (follow) {
			ck_assert_int_eq(CPU_COUNT(&w), 1);
			ck_assert(CPU_ISSET(cpu[1], &w));
		} else {
			ck_assert(CPU_EQUAL(&w, &set));
		}
		write_from(cpu[0], p, 200, 200);
		w = worker_cpus(mm);
		if (follow) {
			ck_assert_int_eq(CPU_COUNT(&w), 1);
			ck_assert(CPU_ISSET(cpu[0], &w));
			ck_assert_uint_ge(t_stats(mm).follows, 2);
			/* The application sets its CPUs: it stays there. */
			ck_assert_int_eq(pthread_setaffinity_np(mm->workers[0],
								sizeof(set),
								&set),
					 0);
			usleep(20 * 1000); /* a pause: it looks again */
			write_from(cpu[1], p, 400, 100);
			w = worker_cpus(mm);
			ck_assert(CPU_EQUAL(&w, &set));
		} else {
			ck_assert(CPU_EQUAL(&w, &set));
			ck_assert_uint_eq(t_stats(mm).follows, 0);
		}
		ck_assert_int_eq(sched_setaffinity(0, sizeof(set), &set), 0);
		ck_assert_uint_eq(t_stats(mm).copies, follow ? 500 : 400);
		for (size_t i = 0; i < npages; i++) {
			unsigned char b;

			ck_assert_int_eq(cowmm_snap_read(s, i * T_PAGE, &b, 1),
					 1);
			ck_assert_uint_eq(b, 7);
		}
		cowmm_snap_release(s);
		ck_assert_int_eq(cowmm_region_release(r), 0);
		cowmm_close(mm);
	}
}
END_TEST

/*
 * A worker that stops on an error is replaced: writes under a snapshot
 * are still resolved with their copies, again and again, with a single
 * worker, and cowmm_close() joins the replacement.
 */
START_TEST(test_worker_dies)
{
	const size_t npages = 64;
	cowmm_t *mm = t_open_fa(0, 1);
	unsigned char *p;
	cowmm_region_t *r;
	cowmm_snap_t *s;
	size_t pg;
	int round, i;

	p = t_filled_region(mm, npages, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	for (round = 0; round < 4; round++) {
		t_log_clear();
		cowmm__fail_worker(mm);
		for (pg = round; pg < npages; pg += 4)
			p[pg * T_PAGE] ^= 0xff; /* the first one wakes it */
		/*
		 * The dying worker starts its replacement before it logs, so
		 * the replacement may resolve every write first: wait for
		 * the line (with a deadline) instead of expecting it now.
		 */
		for (i = 0; i < 5000 && !t_log_has("restarted"); i++)
			usleep(1000);
		ck_assert(t_log_has("restarted"));
	}
	ck_assert_uint_eq(t_stats(mm).copies, npages);
	t_assert_snap_filled(s, npages);
	t_assert_live_filled(p, 0, npages, 0, 0xff);
	cowmm_snap_release(s);
	ck_assert_int_eq(cowmm_region_release(r), 0);
	cowmm_close(mm);
}
END_TEST

/*
 * The application closes the library's userfaultfd by mistake: once the
 * workers let go of the file (at the next fault), the kernel unregisters
 * everything, so writes go through uncopied.  Nothing hangs,
 * every snapshot reports -EIO instead of changed bytes, no new snapshot
 * is taken, the log says why, and cowmm_close() does not close the fd
 * number again (it may be someone else's by then).
 */
START_TEST(test_uffd_closed)
{
	const size_t npages = 64;
	cowmm_t *mm = t_open(0);
	unsigned char buf[T_PAGE], *p;
	cowmm_region_t *r;
	cowmm_snap_t *s, *s2;
	cowmm_region_t *cl;
	int fd, other, i;
	size_t pg;

	p = t_filled_region(mm, npages, &r);
	ck_assert_int_eq(cowmm_snapshot(r, &s), 0);
	p[0] ^= 1; /* preserved while the fd is there */
	t_log_clear();
	fd = mm->uffd;
	close(fd);
	/*
	 * The worker's poll() holds the file until it returns: the next
	 * fault wakes it, it finds the number closed, and the file goes.
	 */
	p[2 * T_PAGE] ^= 1;
	for (i = 0; i < 500 && !t_log_has("closed under the library"); i++)
		usleep(2000);
	ck_assert(t_log_has("closed under the library"));
	other = open("/dev/null", O_RDONLY); /* takes the number */
	ck_assert_int_eq(other, fd);
	for (pg = 0; pg < npages; pg++)
		p[pg * T_PAGE + 1] ^= 1; /* no hang */
	ck_assert_int_eq(cowmm_snap_read(s, T_PAGE, buf, T_PAGE), -EIO);
	ck_assert_int_eq(cowmm_snapshot(r, &s2), -EIO);
	ck_assert_int_eq(cowmm_clone(r, 0, &cl), -EIO);
	cowmm_snap_release(s);
	cowmm_region_release(r);
	cowmm_close(mm);
	ck_assert_int_eq(fcntl(other, F_GETFD), 0); /* still open */
	close(other);
}
END_TEST

int main(void)
{
	const struct t_case cases[] = {
		{ "defaults", test_defaults, T_WP },
		{ "config", test_config, T_WP },
		{ "stats-size", test_stats_size, T_WP },
		{ "eperm", test_eperm, T_WP, T_NEEDS_ROOT },
		{ "fork-child", test_fork_child, T_WP_UNPOPULATED },
		{ "workers", test_workers, T_WP_UNPOPULATED },
		{ "per-cpu", test_per_cpu, T_WP_UNPOPULATED },
		{ "follow-writer", test_follow_writer, T_WP_UNPOPULATED },
		{ "worker-dies", test_worker_dies, T_WP_UNPOPULATED },
		{ "uffd-closed", test_uffd_closed, T_WP_UNPOPULATED },
	};

	return t_run("open", cases, ARRAY_SIZE(cases));
}
