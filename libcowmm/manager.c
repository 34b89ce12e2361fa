// SPDX-License-Identifier: MIT
/*
 * cowmm_t: one userfaultfd, the worker threads that read its messages in
 * batches, and the RCU-published table that maps a fault address to its
 * region without a lock.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "cowmm_i.h"
#include "uffd.h"

#define MSG_BATCH 64

/* ------------------------------------------------------------------------ */
/* fork() detection: a counter the child side of every fork() increments. */

static atomic_ulong fork_gen;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
	atomic_fetch_add_explicit(&fork_gen, 1, memory_order_relaxed);
}

static void atfork_register(void)
{
	pthread_atfork(NULL, NULL, on_fork_child);
}

unsigned long cowmm__fork_gen(void)
{
	return atomic_load_explicit(&fork_gen, memory_order_relaxed);
}

int cowmm__check_mm(const cowmm_t *mm)
{
	if (!mm)
		return -EINVAL;
	if (mm->magic != COWMM_MAGIC_MM)
		return -EBADF;
	if (mm->fork_gen != cowmm__fork_gen())
		return -ECHILD;
	return 0;
}

/*
 * Remember a released handle so that later use gives -EBADF rather than a
 * use-after-free; the oldest of COWMM_GRAVEYARD is freed for good.
 * Call with mm->lock held, the handle's magic set to COWMM_MAGIC_DEAD.
 */
void cowmm__bury(cowmm_t *mm, void *handle)
{
	unsigned i = mm->grave_next++ % COWMM_GRAVEYARD;

	free(mm->graveyard[i]);
	mm->graveyard[i] = handle;
}

/* ------------------------------------------------------------------------ */
/* The region table */

static void rtable_free_rcu(struct rcu_head *head)
{
	free(caa_container_of(head, struct cowmm_rtable, rcu));
}

static int rtable_replace(cowmm_t *mm, struct cowmm_region *add,
			  struct cowmm_region *del)
{
	struct cowmm_rtable *old = mm->rtable, *t;
	size_t n = old ? old->n : 0, i, j = 0;
	bool added = false;

	t = malloc(sizeof(*t) + (n + 1) * sizeof(t->r[0]));
	if (!t)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		if (old->r[i] == del)
			continue;
		if (add && !added && add->base < old->r[i]->base) {
			t->r[j++] = add;
			added = true;
		}
		t->r[j++] = old->r[i];
	}
	if (add && !added)
		t->r[j++] = add;
	t->n = j;
	__atomic_store_n(&mm->rtable, t, __ATOMIC_RELEASE); /* publish */
	if (old)
		urcu_bp_call_rcu(&old->rcu, rtable_free_rcu);
	return 0;
}

/* Call with mm->lock held. */
int cowmm__rtable_insert(cowmm_t *mm, struct cowmm_region *r)
{
	return rtable_replace(mm, r, NULL);
}

/* Call with mm->lock held; wait for a grace period before freeing @r. */
void cowmm__rtable_remove(cowmm_t *mm, struct cowmm_region *r)
{
	/*
	 * Readers must never miss a live region (its faults would never be
	 * resolved), so the table is only ever replaced whole; a failed
	 * allocation of a few pointers is waited out.
	 */
	while (rtable_replace(mm, NULL, r) < 0)
		usleep(1000);
}

/* The region holding @addr, or NULL.  Call inside an RCU read section. */
struct cowmm_region *cowmm__region_lookup(cowmm_t *mm, uintptr_t addr)
{
	struct cowmm_rtable *t = __atomic_load_n(&mm->rtable, __ATOMIC_ACQUIRE);
	size_t lo = 0, hi;

	if (!t)
		return NULL;
	hi = t->n;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		struct cowmm_region *r = t->r[mid];

		if (addr < r->base)
			hi = mid;
		else if (addr - r->base >= r->len)
			lo = mid + 1;
		else
			return r;
	}
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* Workers */

static int fault(cowmm_t *mm, uintptr_t addr, bool wp, bool wake)
{
	struct cowmm_region *r;
	int ret = -ENOENT;

	urcu_bp_read_lock();
	r = cowmm__region_lookup(mm, addr);
	if (r)
		ret = wp ? cowmm__region_fault_wp(r, addr, wake)
			 : cowmm__region_fault_missing(r, addr, wake);
	urcu_bp_read_unlock();
	return ret;
}

static int cmp_addr(const void *a, const void *b)
{
	uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;

	return x < y ? -1 : x > y;
}

/*
 * Resolve a batch of messages.  Protection is cleared page by page without
 * waking; the blocked threads are then woken once per run of adjacent
 * pages.  A batch of one clears and wakes in a single ioctl.
 */
static void dispatch(cowmm_t *mm, const struct uffd_msg *msg, size_t n)
{
	uintptr_t wake[MSG_BATCH];
	size_t i, nwake = 0;

	for (i = 0; i < n; i++) {
		const struct uffd_msg *m = &msg[i];
		uintptr_t addr;

		if (m->event != UFFD_EVENT_PAGEFAULT) {
			cowmm__log(COWMM_LOG_DEBUG, "ignoring uffd event %#x",
				   m->event);
			continue;
		}
		addr = m->arg.pagefault.address & ~(COWMM_PAGE_SIZE - 1);
		if (fault(mm, addr, m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP,
			  n == 1) > 0)
			wake[nwake++] = addr;
	}
	if (!nwake)
		return;
	qsort(wake, nwake, sizeof(wake[0]), cmp_addr);
	for (i = 0; i < nwake;) {
		uintptr_t start = wake[i], end = start + COWMM_PAGE_SIZE;

		while (++i < nwake && wake[i] <= end)
			end = wake[i] + COWMM_PAGE_SIZE;
		cowmm__uffd_wake(mm->uffd, start, end - start);
	}
}

static void *worker_main(void *arg)
{
	cowmm_t *mm = arg;
	struct uffd_msg msg[MSG_BATCH];
	struct pollfd pfd[2] = {
		{ .fd = mm->uffd, .events = POLLIN },
		{ .fd = mm->stopfd, .events = POLLIN },
	};

	for (;;) {
		ssize_t n;

		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			cowmm__log(COWMM_LOG_ERR, "worker: poll: %s",
				   strerror(errno));
			break;
		}
		if (pfd[1].revents)
			break;
		if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
			cowmm__log(COWMM_LOG_ERR, "worker: userfaultfd error");
			break;
		}
		atomic_fetch_add(&mm->busy, 1);
		n = read(mm->uffd, msg, sizeof(msg));
		if (n > 0)
			dispatch(mm, msg, (size_t)n / sizeof(msg[0]));
		atomic_fetch_sub(&mm->busy, 1);
		if (n < 0 && errno != EAGAIN && errno != EINTR) {
			cowmm__log(COWMM_LOG_ERR, "worker: read: %s",
				   strerror(errno));
			break;
		}
	}
	urcu_bp_unregister_thread();
	return NULL;
}

static void workers_stop(cowmm_t *mm, unsigned n)
{
	uint64_t one = 1;
	unsigned i;

	if (write(mm->stopfd, &one, sizeof(one)) < 0)
		cowmm__log(COWMM_LOG_ERR, "stopping workers: %s",
			   strerror(errno));
	for (i = 0; i < n; i++)
		pthread_join(mm->workers[i], NULL);
}

static int workers_start(cowmm_t *mm)
{
	sigset_t all, old;
	unsigned i;
	int ret = 0;

	mm->workers = calloc(mm->nworkers, sizeof(*mm->workers));
	if (!mm->workers)
		return -ENOMEM;
	/* Workers take no signals: those belong to the application. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (i = 0; i < mm->nworkers; i++) {
		ret = -pthread_create(&mm->workers[i], NULL, worker_main, mm);
		if (ret)
			break;
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (ret) {
		workers_stop(mm, i);
		free(mm->workers);
		mm->workers = NULL;
	}
	return ret;
}

/* ------------------------------------------------------------------------ */
/* Public */

/* Read a caller's struct as copy_struct_from_user() reads open_how. */
static int config_read(const struct cowmm_config *ucfg,
		       struct cowmm_config *cfg)
{
	size_t usize;

	memset(cfg, 0, sizeof(*cfg));
	if (!ucfg)
		return 0;
	usize = ucfg->size;
	if (usize < sizeof(ucfg->size))
		return -EINVAL;
	if (usize > sizeof(*cfg)) {
		const unsigned char *tail = (const unsigned char *)ucfg;
		size_t i;

		for (i = sizeof(*cfg); i < usize; i++)
			if (tail[i])
				return -E2BIG;
		usize = sizeof(*cfg);
	}
	memcpy(cfg, ucfg, usize);
	return 0;
}

static void log_eperm(void)
{
	cowmm__log(COWMM_LOG_ERR,
		   "userfaultfd: permission denied. Grant it in one of "
		   "three ways: run as root (or with CAP_SYS_PTRACE); give "
		   "this user read and write access to /dev/userfaultfd "
		   "(Linux 6.1+); or allow unprivileged use with "
		   "'sysctl vm.unprivileged_userfaultfd=1'");
}

int cowmm_open(const struct cowmm_config *ucfg, cowmm_t **out)
{
	struct cowmm_config cfg;
	cowmm_t *mm;
	int ret;

	if (!out)
		return -EINVAL;
	ret = config_read(ucfg, &cfg);
	if (ret)
		return ret;
	if (cfg.flags || cfg.workers > COWMM_WORKERS_MAX ||
	    cfg.fault_around > 1)
		return -EINVAL;
	if (sysconf(_SC_PAGESIZE) != (long)COWMM_PAGE_SIZE)
		return -EOPNOTSUPP;
	pthread_once(&atfork_once, atfork_register);

	mm = calloc(1, sizeof(*mm));
	if (!mm)
		return -ENOMEM;
	mm->magic = COWMM_MAGIC_MM;
	mm->fork_gen = cowmm__fork_gen();
	mm->flags = cfg.flags;
	mm->fault_around = cfg.fault_around ? cfg.fault_around : 1;
	mm->nworkers = cfg.workers ? cfg.workers : 1;
	mm->uffd = mm->stopfd = -1;

	ret = cowmm__uffd_probe(&mm->kernel_features);
	if (ret == -EPERM)
		log_eperm();
	if (ret)
		goto err_free;
	if ((mm->kernel_features & COWMM_UFFD_REQUIRED) !=
	    COWMM_UFFD_REQUIRED) {
		cowmm__log(COWMM_LOG_ERR, "kernel lacks userfaultfd "
					  "write-protect support");
		ret = -EOPNOTSUPP;
		goto err_free;
	}
	mm->features = mm->kernel_features & COWMM_UFFD_WANTED;

	ret = cowmm__uffd_open(false);
	if (ret < 0)
		goto err_free;
	mm->uffd = ret;
	ret = cowmm__uffd_api(mm->uffd, mm->features, NULL);
	if (ret)
		goto err_close;
	mm->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (mm->stopfd < 0) {
		ret = -errno;
		goto err_close;
	}
	ret = pthread_mutex_init(&mm->lock, NULL);
	if (ret) {
		ret = -ret;
		goto err_close;
	}
	ret = cowmm__frame_pool_init(&mm->pool, &mm->cnt.frames_live);
	if (ret)
		goto err_mutex;
	ret = workers_start(mm);
	if (ret)
		goto err_pool;
	*out = mm;
	return 0;

err_pool:
	cowmm__frame_pool_fini(&mm->pool);
err_mutex:
	pthread_mutex_destroy(&mm->lock);
err_close:
	if (mm->stopfd >= 0)
		close(mm->stopfd);
	close(mm->uffd);
err_free:
	free(mm);
	return ret;
}

void cowmm_close(cowmm_t *mm)
{
	unsigned i;

	if (cowmm__check_mm(mm))
		return;
	cowmm__region_release_all(mm);
	workers_stop(mm, mm->nworkers);
	free(mm->workers);
	close(mm->uffd);
	close(mm->stopfd);

	/* Every frame and table freed through call_rcu is back. */
	urcu_bp_barrier();
	cowmm__frame_pool_fini(&mm->pool);
	free(mm->rtable);
	for (i = 0; i < COWMM_GRAVEYARD; i++)
		free(mm->graveyard[i]);
	pthread_mutex_destroy(&mm->lock);
	mm->magic = COWMM_MAGIC_DEAD;
	free(mm);
}

int cowmm_stats(cowmm_t *mm, struct cowmm_stats *st, size_t size)
{
	struct cowmm_stats s;
	int ret = cowmm__check_mm(mm);

	if (ret)
		return ret;
	if (!st)
		return -EINVAL;
#define LOAD(f) s.f = atomic_load_explicit(&mm->cnt.f, memory_order_relaxed)
	LOAD(wp_faults);
	LOAD(missing_faults);
	LOAD(copies);
	LOAD(reuses);
	LOAD(moves);
	LOAD(pin_copies);
	LOAD(ahead_copies);
	LOAD(bytes_preserved);
	LOAD(frames_live);
	LOAD(snapshots_live);
	LOAD(regions_live);
	LOAD(detach_copies);
	LOAD(broken);
#undef LOAD
	memcpy(st, &s, size < sizeof(s) ? size : sizeof(s));
	return 0;
}

/*
 * Wait until no fault message is queued or being resolved.  A message can
 * outlive its fault: a thread woken by another thread's resolution of the
 * same page goes on while its own message is still to be read, so counters
 * settle only here.  For tests, after their writers have stopped.
 */
void cowmm__quiesce(cowmm_t *mm)
{
	struct pollfd pfd = { .fd = mm->uffd, .events = POLLIN };

	for (;;) {
		pfd.revents = 0;
		if (poll(&pfd, 1, 0) == 0 && atomic_load(&mm->busy) == 0)
			return;
		usleep(100);
	}
}

/* Not part of the API: the next @n frame allocations fail, as without memory. */
void cowmm__inject_frame_failures(cowmm_t *mm, unsigned n)
{
	atomic_store(&mm->pool.fail_next, n);
}

/* Not part of the API: the naive policy exists to show what it breaks. */
void cowmm__set_naive(cowmm_t *mm, bool on)
{
	mm->naive = on;
}

uint64_t cowmm_features(const cowmm_t *mm)
{
	return mm && mm->magic == COWMM_MAGIC_MM ? mm->features : 0;
}
