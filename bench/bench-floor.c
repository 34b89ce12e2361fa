// SPDX-License-Identifier: MIT
/*
 * bench-floor: what the kernel interface alone costs, for the first write
 * to a write-protected page, against the kernel's own COW fault after
 * fork(), side by side in one run.  No libcowmm: raw userfaultfd, so that
 * the library's figures (bench-cow) can be read against the floor of each
 * way of resolving a fault.
 *
 * Methods (each on a fresh populated region of 4 KiB pages, random order;
 * the writing thread is bound to one CPU except in "kernel"):
 *  kernel            fork(), then the parent writes: the kernel's COW fault;
 *  kernel-busy       the same, while another thread of the process spins
 *                    on the other CPU (a server's other threads under
 *                    load): each fault's TLB flush must reach it;
 *  sigbus-clear      UFFD_FEATURE_SIGBUS: the writing thread's SIGBUS
 *                    handler only clears the protection (no copy): the
 *                    floor of in-thread mode;
 *  sigbus-clear-busy the same, with the spinning thread of kernel-busy;
 *  sigbus-memcpy     the handler also copies the page into a frame;
 *  sigbus-checked    the handler reads the pagemap entry, copies the page
 *                    and reads the entry again, as libcowmm's in-thread
 *                    mode does;
 *  worker-<work>-<placement>
 *                    a worker thread reads the fault, does <work> and
 *                    clears the protection with a wake-up.  <work>: clear
 *                    (nothing), memcpy (a plain copy into a frame),
 *                    checked (process_vm_readv() between two pagemap
 *                    reads, as libcowmm's worker does).  <placement>:
 *                    unbound (wherever the scheduler runs it), same (on
 *                    the writer's CPU), other (on another CPU, sleeping
 *                    in poll() between faults), spin (on another CPU,
 *                    busy-polling the userfaultfd for SPIN_US after each
 *                    fault before it sleeps).
 *
 * Frames are populated before each pass, so a copy pays for the copy and
 * not for the frame's first touch.
 *
 * Output: CSV rows as bench-cow writes them (bench,metric,size_mib,pages,
 * method,order,median,min,max,unit,n), latencies pooled over the runs.
 *
 * Usage: bench-floor [--size MiB] [--runs N] [--sample PAGES] [--quick]
 * Exits 77 (skipped) where this user may not open a userfaultfd.
 */
#include <err.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define MAX_RUNS 64
#define SPIN_US 200 /* a spinning worker's window after each fault */

enum kind { BY_KERNEL, BY_HANDLER, BY_WORKER };
enum work { CLEAR, MEMCPY, CHECKED };
enum placement { UNBOUND, SAME, OTHER, SPIN };

static const struct method {
	const char *name;
	enum kind kind;
	enum work work;
	enum placement place;
	bool busy; /* another thread spins on the other CPU */
} methods[] = { /* the first is the reference of the ratios */
	{ "kernel", BY_KERNEL, CLEAR, UNBOUND, false },
	{ "kernel-busy", BY_KERNEL, CLEAR, SAME, true },
	{ "sigbus-clear", BY_HANDLER, CLEAR, SAME, false },
	{ "sigbus-clear-busy", BY_HANDLER, CLEAR, SAME, true },
	{ "sigbus-memcpy", BY_HANDLER, MEMCPY, SAME, false },
	{ "sigbus-checked", BY_HANDLER, CHECKED, SAME, false },
	{ "worker-clear-unbound", BY_WORKER, CLEAR, UNBOUND, false },
	{ "worker-clear-same", BY_WORKER, CLEAR, SAME, false },
	{ "worker-clear-other", BY_WORKER, CLEAR, OTHER, false },
	{ "worker-clear-spin", BY_WORKER, CLEAR, SPIN, false },
	{ "worker-memcpy-same", BY_WORKER, MEMCPY, SAME, false },
	{ "worker-memcpy-spin", BY_WORKER, MEMCPY, SPIN, false },
	{ "worker-checked-unbound", BY_WORKER, CHECKED, UNBOUND, false },
	{ "worker-checked-same", BY_WORKER, CHECKED, SAME, false },
	{ "worker-checked-other", BY_WORKER, CHECKED, OTHER, false },
	{ "worker-checked-spin", BY_WORKER, CHECKED, SPIN, false },
};

#define NMETHODS (sizeof(methods) / sizeof(methods[0]))

/* What a fault handler needs; one method runs at a time. */
static struct {
	int uffd, pagemap, stopfd;
	enum work work;
	bool spin;
	char *frames;
	size_t nframes;
	_Atomic size_t next_frame;
	_Atomic bool spinning;
} h;

static uint64_t pagemap_entry(uintptr_t addr)
{
	uint64_t e = 0;

	if (pread(h.pagemap, &e, sizeof(e), (off_t)(addr / PAGE) * 8) !=
	    sizeof(e))
		err(1, "pagemap");
	return e;
}

static char *next_frame(void)
{
	size_t i = h.next_frame++;

	if (i >= h.nframes)
		errx(1, "out of frames");
	return h.frames + i * PAGE;
}

static void clear_wp(uintptr_t addr, bool wake)
{
	struct uffdio_writeprotect wp = {
		.range = { addr, PAGE },
		.mode = wake ? 0 : UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
	};

	while (ioctl(h.uffd, UFFDIO_WRITEPROTECT, &wp))
		if (errno != EAGAIN)
			err(1, "UFFDIO_WRITEPROTECT");
}

/* Copy the page at @addr into a frame, as h.work says. */
static void copy_page(uintptr_t addr, bool worker)
{
	char *frame = next_frame();
	uint64_t e1, e2;

	if (h.work == MEMCPY) {
		memcpy(frame, (const void *)addr, PAGE);
		return;
	}
	e1 = pagemap_entry(addr);
	if (worker) {
		struct iovec local = { frame, PAGE };
		struct iovec remote = { (void *)addr, PAGE };

		if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) !=
		    (ssize_t)PAGE)
			err(1, "process_vm_readv");
	} else {
		memcpy(frame, (const void *)addr, PAGE);
	}
	e2 = pagemap_entry(addr);
	if (e1 != e2)
		errx(1, "the page changed under the copy");
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	uintptr_t addr = (uintptr_t)si->si_addr & ~(PAGE - 1);
	int saved = errno;

	(void)sig;
	(void)uc;
	if (h.work != CLEAR)
		copy_page(addr, false);
	clear_wp(addr, false);
	errno = saved;
}

/* Read one fault; false when the stop eventfd fired. */
static bool next_fault(struct uffd_msg *msg)
{
	struct pollfd pfd[2] = {
		{ .fd = h.uffd, .events = POLLIN },
		{ .fd = h.stopfd, .events = POLLIN },
	};
	double spin_until = h.spin ? now_ns() + SPIN_US * 1e3 : 0;

	for (;;) {
		/* Spinning: a non-blocking read until the window closes. */
		if (read(h.uffd, msg, sizeof(*msg)) == sizeof(*msg))
			return true;
		if (errno != EAGAIN)
			err(1, "read userfaultfd");
		if (spin_until && now_ns() < spin_until)
			continue;
		spin_until = 0;
		if (poll(pfd, 2, -1) < 0 && errno != EINTR)
			err(1, "poll");
		if (pfd[1].revents)
			return false;
	}
}

static void *worker(void *arg)
{
	struct uffd_msg msg;

	(void)arg;
	while (next_fault(&msg)) {
		if (msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		uintptr_t addr = msg.arg.pagefault.address & ~(PAGE - 1);

		if (h.work != CLEAR)
			copy_page(addr, true);
		clear_wp(addr, true);
	}
	return NULL;
}

static void *spinner(void *arg)
{
	(void)arg;
	while (h.spinning)
		;
	return NULL;
}

static void bind_to(pthread_t t, int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (pthread_setaffinity_np(t, sizeof(set), &set))
		warnx("cannot bind to CPU %d", cpu);
}

static char *populated(size_t len)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		err(1, "mmap");
	if (madvise(p, len, MADV_NOHUGEPAGE))
		err(1, "madvise");
	populate(p, len);
	return p;
}

static void protect(char *p, size_t len, uint64_t features)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	struct uffdio_register reg = {
		.range = { (uintptr_t)p, len },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};
	struct uffdio_writeprotect wp = {
		.range = { (uintptr_t)p, len },
		.mode = UFFDIO_WRITEPROTECT_MODE_WP,
	};

	h.uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (h.uffd < 0)
		err(1, "userfaultfd (root, or vm.unprivileged_userfaultfd=1)");
	if (ioctl(h.uffd, UFFDIO_API, &api))
		err(1, "UFFDIO_API");
	if (ioctl(h.uffd, UFFDIO_REGISTER, &reg))
		err(1, "UFFDIO_REGISTER");
	if (ioctl(h.uffd, UFFDIO_WRITEPROTECT, &wp))
		err(1, "UFFDIO_WRITEPROTECT");
}

/* One pass of @m over pages @o[0..n) of a fresh region; latencies to @lat. */
static void pass(const struct method *m, size_t len, const size_t *o,
		 size_t n, double *lat)
{
	char *p = populated(len);
	pthread_t t = 0, busy = 0;
	cpu_set_t was;
	pid_t child = -1;
	int cpu[2] = { -1, -1 }, found = 0;

	/* The first two CPUs this thread may use. */
	if (pthread_getaffinity_np(pthread_self(), sizeof(was), &was))
		errx(1, "pthread_getaffinity_np");
	for (int c = 0; c < CPU_SETSIZE && found < 2; c++)
		if (CPU_ISSET(c, &was))
			cpu[found++] = c;
	if (found < 2 && (m->place == OTHER || m->place == SPIN || m->busy))
		errx(1, "%s needs two CPUs", m->name);
	h.work = m->work;
	h.spin = m->place == SPIN;
	h.next_frame = 0;
	if (m->kind == BY_KERNEL) {
		child = fork();
		if (child < 0)
			err(1, "fork");
		if (child == 0) {
			pause();
			_exit(0);
		}
	} else {
		protect(p, len, m->kind == BY_WORKER ? 0 : UFFD_FEATURE_SIGBUS);
	}
	if (m->place != UNBOUND)
		bind_to(pthread_self(), cpu[0]);
	if (m->kind == BY_WORKER) {
		if (pthread_create(&t, NULL, worker, NULL))
			errx(1, "pthread_create");
		if (m->place != UNBOUND)
			bind_to(t, cpu[m->place == SAME ? 0 : 1]);
	}
	if (m->busy) {
		h.spinning = true;
		if (pthread_create(&busy, NULL, spinner, NULL))
			errx(1, "pthread_create");
		bind_to(busy, cpu[1]);
	}
	usleep(100 * 1000); /* let deferred work from the setup settle */
	for (size_t i = 0; i < n; i++) {
		volatile char *c = p + o[i] * PAGE + 8;
		double t0 = now_ns();

		*c = 2;
		lat[i] = now_ns() - t0;
	}
	if (busy) {
		h.spinning = false;
		pthread_join(busy, NULL);
	}
	if (t) {
		uint64_t one = 1;

		if (write(h.stopfd, &one, sizeof(one)) != sizeof(one))
			err(1, "eventfd");
		pthread_join(t, NULL);
		if (read(h.stopfd, &one, sizeof(one)) != sizeof(one))
			err(1, "eventfd");
	}
	if (pthread_setaffinity_np(pthread_self(), sizeof(was), &was))
		warnx("cannot restore this thread's CPUs");
	if (child > 0) {
		kill(child, SIGKILL);
		waitpid(child, NULL, 0);
	} else {
		close(h.uffd);
	}
	for (size_t i = 0; i < n; i++)
		if (p[o[i] * PAGE + 8] != 2)
			errx(1, "%s: a write was lost", m->name);
	munmap(p, len);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "size", required_argument, NULL, 's' },
		{ "runs", required_argument, NULL, 'r' },
		{ "sample", required_argument, NULL, 'n' },
		{ "quick", no_argument, NULL, 'q' },
		{ 0 },
	};
	size_t size_mib = 256, sample = 4096, runs = 3;
	struct sigaction sa = { .sa_sigaction = on_sigbus,
				.sa_flags = SA_SIGINFO };
	int c;

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 's': size_mib = strtoul(optarg, NULL, 0); break;
		case 'r': runs = strtoul(optarg, NULL, 0); break;
		case 'n': sample = strtoul(optarg, NULL, 0); break;
		case 'q': size_mib = 32; runs = 1; sample = 256; break;
		default:
			fprintf(stderr, "usage: %s [--size MiB] [--runs N] "
					"[--sample PAGES] [--quick]\n", argv[0]);
			return 2;
		}
	}
	size_t len = size_mib << 20, npages = len / PAGE;

	if (!size_mib || !runs || runs > MAX_RUNS || !sample || sample > npages)
		errx(2, "need 0 < runs <= %d and 0 < sample <= the region's "
			"%zu pages", MAX_RUNS, npages);
	int probe = syscall(SYS_userfaultfd, O_CLOEXEC);

	if (probe < 0 && (errno == EPERM || errno == ENOSYS)) {
		/* 77: skipped, for the smoke test run unprivileged */
		warn("userfaultfd (needs root or vm.unprivileged_userfaultfd=1)");
		return 77;
	}
	if (probe >= 0)
		close(probe);
	if (sigaction(SIGBUS, &sa, NULL))
		err(1, "sigaction");
	h.pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	h.stopfd = eventfd(0, EFD_CLOEXEC);
	if (h.pagemap < 0 || h.stopfd < 0)
		err(1, "pagemap or eventfd");
	h.nframes = sample;
	h.frames = mmap(NULL, sample * PAGE, PROT_READ | PROT_WRITE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (h.frames == MAP_FAILED)
		err(1, "mmap frames");

	/* Distinct pages spread over the region, in a shuffled order. */
	size_t *o = order_of(npages, sample, true);
	double *lat[NMETHODS];

	for (size_t m = 0; m < NMETHODS; m++)
		if (!(lat[m] = malloc(runs * sample * sizeof(double))))
			err(1, "malloc");
	/* Methods interleaved within each run, so drift hits them alike. */
	for (size_t run = 0; run < runs; run++)
		for (size_t m = 0; m < NMETHODS; m++) {
			pass(&methods[m], len, o, sample,
			     lat[m] + run * sample);
			/* fresh frames next time: their first touch counts */
			madvise(h.frames, sample * PAGE, MADV_DONTNEED);
			madvise(h.frames, sample * PAGE, MADV_POPULATE_WRITE);
		}

	size_t n = runs * sample;

	for (size_t m = 0; m < NMETHODS; m++) {
		static const struct { const char *name; double q; } qs[] = {
			{ "write_p50", 50 },
			{ "write_p99", 99 },
			{ "write_p999", 99.9 },
		};

		qsort(lat[m], n, sizeof(double), cmp_double);
		for (size_t q = 0; q < 3; q++)
			printf("floor,%s,%zu,4k,%s,random,%.0f,,,ns,%zu\n",
			       qs[q].name, size_mib, methods[m].name,
			       pct(lat[m], n, qs[q].q), n);
	}
	for (size_t m = 1; m < NMETHODS; m++)
		printf("floor,p50_over_kernel,%zu,4k,%s,random,%.2f,,,x,%zu\n",
		       size_mib, methods[m].name,
		       pct(lat[m], n, 50) / pct(lat[0], n, 50), n);
	for (size_t m = 0; m < NMETHODS; m++)
		free(lat[m]);
	free(o);
	munmap(h.frames, sample * PAGE);
	close(h.stopfd);
	close(h.pagemap);
	return 0;
}
