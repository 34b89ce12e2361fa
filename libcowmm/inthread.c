// SPDX-License-Identifier: MIT
/*
 * In-thread fault mode (COWMM_OPEN_IN_THREAD): the manager's userfaultfd
 * has UFFD_FEATURE_SIGBUS, so a write to a protected page raises SIGBUS in
 * the writing thread instead of queueing a message, and this file's handler
 * resolves the fault right there: the same cowmm__region_fault_wp() a
 * worker would run, without the hand-off to another thread and back.
 *
 * Why that is safe to do in a signal handler here: the handler runs only
 * for a write to a protected page of a region, and the library itself
 * never writes such a page while it holds a lock (restore unprotects a page
 * before it copies into it; an eager load holds none).  So the thread it
 * interrupts holds no lock the handler takes (r->lock, the frame pool's),
 * unless the application writes regions from inside its own signal
 * handlers or makes the C library's heap a region, which this mode does
 * not support (README).  Every other SIGBUS goes to the handler that was
 * installed before.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cowmm_i.h"
#include "uffd.h"

#define MAX_MANAGERS 16

__thread bool cowmm__in_sigbus;
static _Atomic(cowmm_t *) managers[MAX_MANAGERS];
static atomic_uint in_handler;
/* Regions between leaving the lookup table and losing their protection. */
atomic_uint cowmm__releasing;
/* Open in-thread managers: live reads bounce through a buffer then. */
atomic_uint cowmm__inthread_managers;
static struct sigaction previous;
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;
static bool installed;

/*
 * Pass a SIGBUS that is not ours to whoever had it before.  With no
 * handler before, do what the kernel would have done: a fault kills (and
 * the kernel kills on a fault even when SIGBUS is ignored); a SIGBUS sent
 * with kill() is ignored or kills, as the disposition says.
 */
static void chain(int sig, siginfo_t *si, void *uc)
{
	bool fault = si->si_code > 0;

	if (previous.sa_flags & SA_SIGINFO) {
		previous.sa_sigaction(sig, si, uc);
	} else if (previous.sa_handler != SIG_DFL &&
		   previous.sa_handler != SIG_IGN) {
		previous.sa_handler(sig);
	} else if (previous.sa_handler == SIG_DFL || fault) {
		signal(SIGBUS, SIG_DFL);
		if (!fault)
			raise(SIGBUS);
		/* a fault: the access is retried and dies of SIGBUS */
	}
}

/*
 * No region at the address.  Still protected in pagemap: a region that is
 * moving (mremap, its event not handled yet) or being released: retry.
 * Not protected: retry once, then it was not ours; once per move read
 * (@moves), since a page of ours may have come and gone again at the
 * address meanwhile (the fourteenth session's outside review,
 * inthread_move_race: a retry that succeeded left the address noted, and
 * the next such fault there, rounds later, reached the application).
 */
static bool retry_unknown(uintptr_t addr, unsigned moves)
{
	static __thread uintptr_t last;
	static __thread unsigned last_moves;
	uint64_t e = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);

	if (fd >= 0) {
		if (pread(fd, &e, sizeof(e),
			  (off_t)(addr / COWMM_PAGE_SIZE * sizeof(e))) !=
		    sizeof(e))
			e = 0;
		close(fd);
	}
	if (e & PM_UFFD_WP) {
		sched_yield();
		last = 0;
		return true;
	}
	if (last == addr && last_moves == moves) {
		last = 0;
		return false;
	}
	last = addr;
	last_moves = moves;
	return true;
}

/* The moves and unmaps read by every in-thread manager, summed. */
static unsigned moves_read(void)
{
	unsigned i, n = 0;

	for (i = 0; i < MAX_MANAGERS; i++) {
		cowmm_t *mm = atomic_load(&managers[i]);

		if (mm)
			n += cowmm__maps_seq(mm);
	}
	return n;
}

/*
 * A fault let go of the region's lock with moves read and not followed:
 * give the workers the lock before the store is retried, until they have
 * followed those (up to FOLLOW_WAIT_NS).  The store faulted again at once
 * and the thread took the lock back before them, for seconds on end (the
 * twenty-fourth review's lv is2: stores held up to 28 s while two threads
 * moved pages of the region).
 */
#define FOLLOW_WAIT_NS (100 * 1000 * 1000ull)

static void follow_moves(cowmm_t *mm)
{
	unsigned seq = cowmm__maps_seq(mm);
	uint64_t t0 = cowmm__now_ns();
	struct timespec nap = { 0, 50000 };

	while (!cowmm__maps_done(mm, seq) &&
	       cowmm__now_ns() - t0 < FOLLOW_WAIT_NS)
		nanosleep(&nap, NULL);
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	uintptr_t addr = (uintptr_t)si->si_addr & ~(COWMM_PAGE_SIZE - 1);
	int saved = errno, ret = 0;
	cowmm_t *found = NULL;
	unsigned i, moves = 0;
	/* A call it interrupted may have had them. */
	uint64_t deadline = cowmm__uffd_deadline;
	const atomic_bool *held = cowmm__uffd_held;

	/* Hardware memory errors and the like are never ours. */
	if (si->si_code != BUS_ADRERR) {
		chain(sig, si, uc);
		return;
	}
	atomic_fetch_add(&in_handler, 1);
	cowmm__in_sigbus = true;
	for (i = 0; i < MAX_MANAGERS && !found; i++) {
		cowmm_t *mm = atomic_load(&managers[i]);
		cowmm_region_t *r;

		if (!mm)
			continue;
		urcu_bp_read_lock();
		r = cowmm__region_lookup(mm, addr);
		if (r) {
			/*
			 * The fault is resolved with the region's lock held:
			 * an ioctl the kernel keeps refusing, for an event
			 * the workers cannot read before a move waiting for
			 * that lock is followed, gives up (-EAGAIN, the store
			 * is retried) rather than hold the lock for ever.
			 */
			cowmm__uffd_patience(&mm->maps_behind);
			found = mm;
			ret = cowmm__region_fault_wp(r, addr, true);
		}
		urcu_bp_read_unlock();
	}
	if (!found) /* while no manager can be closed */
		moves = moves_read();
	else if (ret == -EAGAIN && cowmm__uffd_impatient())
		follow_moves(found);
	cowmm__uffd_deadline = deadline;
	cowmm__uffd_held = held;
	cowmm__in_sigbus = false;
	atomic_fetch_sub(&in_handler, 1);
	errno = saved;
	/*
	 * Resolved; or busy, or the region is being released: either way the
	 * write is retried, and faults again only if it must.
	 */
	if (found && ret == -ENOSPC) {
		/* Bounded mode, at the cap: give a release time to run. */
		struct timespec nap = { 0, 200000 };

		nanosleep(&nap, NULL);
		return;
	}
	if (found && (ret >= 0 || ret == -EAGAIN || ret == -ENOENT))
		return;
	if (!found && (atomic_load(&cowmm__releasing) ||
		       retry_unknown(addr, moves)))
		return;
	chain(sig, si, uc);
}

int cowmm__inthread_add(cowmm_t *mm)
{
	struct sigaction sa;
	unsigned i;
	int ret = -EMFILE;

	pthread_mutex_lock(&install_lock);
	if (!installed) {
		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = on_sigbus;
		sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_NODEFER;
		sigemptyset(&sa.sa_mask);
		if (sigaction(SIGBUS, &sa, &previous) < 0) {
			ret = -errno;
			goto out;
		}
		installed = true;
	}
	for (i = 0; i < MAX_MANAGERS; i++) {
		cowmm_t *none = NULL;

		if (atomic_compare_exchange_strong(&managers[i], &none, mm)) {
			atomic_fetch_add(&cowmm__inthread_managers, 1);
			ret = 0;
			break;
		}
	}
out:
	pthread_mutex_unlock(&install_lock);
	return ret;
}

/* After this returns no handler still looks at @mm. */
void cowmm__inthread_remove(cowmm_t *mm)
{
	unsigned i;

	pthread_mutex_lock(&install_lock);
	for (i = 0; i < MAX_MANAGERS; i++) {
		cowmm_t *cur = mm;

		if (atomic_compare_exchange_strong(&managers[i], &cur, NULL))
			atomic_fetch_sub(&cowmm__inthread_managers, 1);
	}
	pthread_mutex_unlock(&install_lock);
	while (atomic_load(&in_handler))
		sched_yield();
}
