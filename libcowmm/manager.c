// SPDX-License-Identifier: MIT
/*
 * cowmm_t: one userfaultfd, the worker threads that read its messages in
 * batches, and the RCU-published table that maps a fault address to its
 * region without a lock.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/capability.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "cowmm_i.h"
#include "uffd.h"

#define MSG_BATCH 64

#ifdef COWMM_TSAN
char cowmm__rcu_tsan; /* rcu.h */
#endif
__thread bool cowmm__in_worker;
__thread bool cowmm__in_remove;
__thread bool cowmm__stamped;
__thread uint32_t cowmm__stamp;

/* ------------------------------------------------------------------------ */
/* fork() detection: a counter the child side of every fork() increments. */

static atomic_ulong fork_gen;
static atomic_int self_pid;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void on_fork_child(void)
{
	atomic_fetch_add_explicit(&fork_gen, 1, memory_order_relaxed);
	atomic_store(&self_pid, 0);
}

/*
 * Live memory of this process is copied without ever taking SIGSEGV: the
 * application may unmap a region behind the library's back (the UNMAP
 * event comes after the fact).
 */
static pid_t own_pid(void)
{
	pid_t pid = atomic_load_explicit(&self_pid, memory_order_relaxed);

	if (!pid) {
		pid = getpid();
		atomic_store(&self_pid, pid);
	}
	return pid;
}

/*
 * Copy @n pages of this process, at the addresses @remote gives, into
 * @local (library memory, never a region's), in one call.  Only for
 * ranges registered for write-protect faults alone (fault-around in plain
 * regions): process_vm_readv() waits on a missing fault.  Returns 0, or
 * -EFAULT when any of them could not be read whole.
 */
int cowmm__live_readv(const struct iovec *local, const struct iovec *remote,
		      size_t n)
{
	ssize_t got = process_vm_readv(own_pid(), local, n, remote, n, 0);

	return got == (ssize_t)(n * COWMM_PAGE_SIZE) ? 0 : -EFAULT;
}

/*
 * /proc/self/mem of this process, opened once per process (a child of
 * fork() opens its own: the parent's would read the parent's memory).
 * For writing too where the system allows it (@writable: whether it does).
 */
static int self_mem_fd(bool *writable)
{
	static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
	static int fd = -1;
	static bool fd_rw;
	static pid_t fd_pid;
	pid_t pid = own_pid();
	int ret;

	pthread_mutex_lock(&lock);
	if (fd < 0 || fd_pid != pid) {
		/* The parent's descriptor is not ours to close. */
		fd = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
		fd_rw = fd >= 0;
		if (fd < 0)
			fd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
		fd_pid = pid;
	}
	ret = fd < 0 ? -errno : fd;
	if (writable)
		*writable = fd_rw;
	pthread_mutex_unlock(&lock);
	return ret;
}

static int self_mem(void)
{
	return self_mem_fd(NULL);
}

/* How long a check waits for an event to be read. */
#define DROPPED_WAIT_NS (100 * 1000000ull)

static int probe_pages(cowmm_t *mm, uintptr_t addr, size_t n)
{
	size_t i;
	int ret = cowmm__uffd_range_probe(mm->uffd, addr,
					  n * COWMM_PAGE_SIZE);

	/* Perhaps two mappings side by side (they do not always merge). */
	for (i = 0; ret == -ENOENT && n > 1 && i < n; i++) {
		ret = cowmm__uffd_range_probe(
			mm->uffd, addr + i * COWMM_PAGE_SIZE, COWMM_PAGE_SIZE);
		if (ret)
			break;
	}
	return ret;
}

/* Did move or unmap @m take memory from, or move some to, [start, end)? */
static bool moved_over(const struct cowmm_moved *m, uintptr_t start,
		       uintptr_t end)
{
	return (start < m->from_end && m->from < end) ||
	       (start < m->to_end && m->to < end);
}

/* Entry @i of the moves read and not handled yet, oldest first. */
static const struct cowmm_moved *pend_at(const cowmm_t *mm, size_t i)
{
	return &mm->pend[(mm->pend_head + i) % mm->pend_cap];
}

/*
 * Did a move or unmap read since @seq take memory from, or move some to,
 * [@start, @start + @len)?  Call with read_lock held.  Anything mapped
 * there since that was not ours took our pages with an UNMAP, or a REMAP
 * moved them away: one of these, or one not read yet.  Past the ring's
 * reach, yes.
 */
static bool moved_since(cowmm_t *mm, unsigned seq, uintptr_t start,
			size_t len)
{
	uint16_t n = (uint16_t)(mm->maps_read - (uint16_t)seq), i;
	uintptr_t end = start + len;

	if (n > COWMM_MOVED_RING) {
		/*
		 * Past the ring.  If none was handled since @seq, those read
		 * since are the ones not handled yet, all in mm->pend: a
		 * write fault counted from cowmm__maps_handled() with a
		 * thread moving other memory without pause is not taken for
		 * one of its page (exact/fault-while-other-moves timed out
		 * under TSan on a loaded machine).
		 */
		if ((uint16_t)atomic_load(&mm->maps_done) != (uint16_t)seq)
			return true;
		for (size_t k = 0; k < mm->pend_n; k++)
			if (moved_over(pend_at(mm, k), start, end))
				return true;
		return false;
	}
	for (i = 1; i <= n; i++)
		if (moved_over(&mm->moved[(uint16_t)(seq + i) %
					  COWMM_MOVED_RING],
			       start, end))
			return true;
	return false;
}

/* moved_since(), for callers without read_lock. */
bool cowmm__moved_since(cowmm_t *mm, unsigned seq, uintptr_t start,
			size_t len)
{
	bool ret;

	pthread_mutex_lock(&mm->read_lock);
	ret = moved_since(mm, seq, start, len);
	pthread_mutex_unlock(&mm->read_lock);
	return ret;
}

/*
 * Is the region memory at @addr, @n pages, still where the library thinks,
 * with no move or unmap read since @seq nor on its way?  0, or -ENOENT.
 * Call with read_lock held.  With an event not read yet (while read_lock
 * is held none is), the lock is let go until a worker read what was there
 * (a discard, perhaps, from a thread that discards without pause: then
 * others keep coming, and only a move or unmap among them counts).
 */
static int still_ours(cowmm_t *mm, unsigned seq, uintptr_t addr, size_t n)
{
	uint32_t read;
	uint64_t t0;
	int ret = probe_pages(mm, addr, n);

	if (ret != -EAGAIN)
		return ret ? -ENOENT : 0;
	read = mm->removes_read; /* every event read is numbered there */
	t0 = cowmm__now_ns();
	do {
		pthread_mutex_unlock(&mm->read_lock);
		usleep(20);
		pthread_mutex_lock(&mm->read_lock);
	} while (mm->removes_read == read &&
		 cowmm__now_ns() - t0 < DROPPED_WAIT_NS);
	if (moved_since(mm, seq, addr, n << COWMM_PAGE_SHIFT) ||
	    mm->removes_read == read)
		return -ENOENT;
	return probe_pages(mm, addr, n) == -ENOENT ? -ENOENT : 0;
}

/*
 * Is the memory at @addr (a page) still the region's, where its layout put
 * it, with no move or unmap read since @seq nor on its way?  For a read
 * that found something there: another thread may have mapped memory where
 * the pages were before the move's event is read.  Not for workers: it
 * waits for an unread event to be read.
 */
bool cowmm__still_ours(cowmm_t *mm, unsigned seq, uintptr_t addr)
{
	return cowmm__still_ours_span(mm, seq, addr, 1);
}

/* cowmm__still_ours() for @n pages at @addr, one question to the kernel. */
bool cowmm__still_ours_span(cowmm_t *mm, unsigned seq, uintptr_t addr,
			    size_t n)
{
	int ret;

	pthread_mutex_lock(&mm->read_lock);
	ret = !moved_since(mm, seq, addr, n << COWMM_PAGE_SHIFT)
		      ? still_ours(mm, seq, addr, n)
		      : -ENOENT;
	pthread_mutex_unlock(&mm->read_lock);
	return !ret;
}

/*
 * Is the page at @page (aligned) leaving, a move or unmap of it on its way
 * that no one has read: nothing mapped there any more (mremap() and
 * munmap() take the pages first and send their event after), or other
 * memory mapped there already, or an event of ours not read (the kernel
 * tells, without waiting).  Never once no event can come any more.
 */
bool cowmm__page_leaving(cowmm_t *mm, uintptr_t page)
{
	unsigned char vec;

	if (atomic_load(&mm->uffd_lost))
		return false;
	return mincore((void *)page, COWMM_PAGE_SIZE, &vec) ||
	       cowmm__uffd_range_probe(mm->uffd, page, COWMM_PAGE_SIZE);
}

/*
 * Clear write protection on [@start, @start + @len), an address the
 * caller found in a region's layout after cowmm__maps_seq() gave @seq,
 * only if no move or unmap read since touched it: the kernel clears it
 * on any mapping registered for write-protect faults there, another
 * manager's too, and refuses (-EAGAIN) only while an event of ours is not
 * read.  read_lock is held across the ioctl, so that none is read
 * meanwhile: a move that begins after the check makes the ioctl refuse.
 * -EAGAIN when a move touched it since @seq.  Moves elsewhere do not
 * count: a thread that kept moving another region's pages held every
 * write fault back for a minute and more (the thirteenth session's
 * outside review, fault_starve).
 */
int cowmm__unprotect(cowmm_t *mm, unsigned seq, uintptr_t start, size_t len,
		     bool wake)
{
	unsigned tries = 0;
	bool moved;
	int ret;

	for (;;) {
		pthread_mutex_lock(&mm->read_lock);
		moved = moved_since(mm, seq, start, len);
		cowmm__uffd_once = true;
		ret = moved ? -EAGAIN
			    : cowmm__uffd_wp(mm->uffd, start, len, false, wake);
		cowmm__uffd_once = false;
		pthread_mutex_unlock(&mm->read_lock);
		/* An event not read: the lock let go, a worker reads it. */
		if (ret != -EAGAIN || moved ||
		    !cowmm__uffd_again(mm->uffd, &tries, false))
			return ret;
	}
}

/*
 * cowmm__still_ours() for a caller that holds a region's lock and must not
 * give up while an event is only slow to be read (a loaded machine): it
 * waits for as long as an ioctl of the library would
 * (cowmm__uffd_again()), then asks again.  Not for workers.
 */
bool cowmm__still_ours_wait(cowmm_t *mm, unsigned seq, uintptr_t addr)
{
	unsigned tries = 0;
	int ret;

	for (;;) {
		pthread_mutex_lock(&mm->read_lock);
		ret = !moved_since(mm, seq, addr, COWMM_PAGE_SIZE)
			      ? probe_pages(mm, addr, 1)
			      : -ENOENT;
		pthread_mutex_unlock(&mm->read_lock);
		if (ret != -EAGAIN)
			return !ret;
		if (!cowmm__uffd_again(mm->uffd, &tries, false))
			return false;
	}
}

/*
 * Write @n pages from @src (library memory) to the live pages at @addr,
 * as cowmm__live_read() reads them: a write never waits on a userfaultfd,
 * nor faults in the caller.  A page still write-protected, or missing in
 * a range registered for missing faults, fails at once; so does an
 * address with nothing mapped.  Anything else mapped there is written:
 * the caller checks that no move or unmap landed meanwhile.  A page is
 * written in place, as a store to it would be: a pinned page keeps its
 * physical frame.  Returns 0; -EFAULT when not every byte was written;
 * -EBADF when this process may not write its own memory that way (then
 * the caller copies with stores).
 *
 * cowmm__live_write_unmoved() writes only if no move or unmap was read
 * since cowmm__maps_seq() returned @seq, and none is on its way: the pages
 * are still one registered mapping and no event is unread (-ENOENT
 * otherwise).  It holds read_lock while it writes, so that none is read
 * meanwhile.  mremap() lets go of the address space before it sends its
 * event, and other memory can be mapped where the pages were before the
 * event is read: the check before the write sees that (the model
 * tester's seed 610895645 wrote the snapshot's bytes there); one after it
 * sees a move that landed while it wrote (-ENOENT: the caller does it
 * again where the pages went; memory mapped there in that instant got the
 * bytes).  Memory mapped or moved over the pages with MAP_FIXED or
 * MREMAP_FIXED is the application's race.  The write never waits on a
 * userfaultfd, so holding the lock cannot stop the reader it would wait
 * for.
 */
int cowmm__live_write_unmoved(cowmm_t *mm, unsigned seq, uintptr_t addr,
			      const struct iovec *src, size_t n)
{
	int ret = -ENOENT;

	pthread_mutex_lock(&mm->read_lock);
	if (!moved_since(mm, seq, addr, n << COWMM_PAGE_SHIFT))
		ret = still_ours(mm, seq, addr, n);
	if (!ret)
		ret = cowmm__live_write(addr, src, n);
	/* A move that landed while it wrote: do it again where they went. */
	if (!ret)
		ret = still_ours(mm, seq, addr, n);
	pthread_mutex_unlock(&mm->read_lock);
	return ret;
}

/*
 * Fill the missing page at @addr, where a region's layout put it after
 * cowmm__maps_handled() gave @seq, only if no move or unmap read since
 * touched it: with @src's bytes (UFFDIO_COPY), zeros (@src NULL) or
 * poison (@poison).  read_lock is held across the ioctl, tried once: no
 * event is read meanwhile, and the kernel refuses the ioctl (-EAGAIN)
 * while one is not read, so the bytes land where the layout says and
 * never in another page moved there in between (the twenty-third
 * review's lazymv: a lazy load filled a page into the range another page
 * of the region had just moved to, which then read the first one's
 * bytes for good).  -EAGAIN when a move touched it or one is on its way.
 */
int cowmm__fill_unmoved(cowmm_t *mm, unsigned seq, uintptr_t addr,
			const void *src, bool poison, bool wake)
{
	bool once = cowmm__uffd_once, moved;
	unsigned tries = 0;
	int ret;

	for (;;) {
		pthread_mutex_lock(&mm->read_lock);
		moved = moved_since(mm, seq, addr, COWMM_PAGE_SIZE);
		cowmm__uffd_once = true;
		ret = moved ? -EAGAIN
		      : poison
			      ? cowmm__uffd_poison(mm->uffd, addr,
						   COWMM_PAGE_SIZE, wake)
		      : src ? cowmm__uffd_copy(mm->uffd, addr, src,
					       COWMM_PAGE_SIZE, false, wake)
			    : cowmm__uffd_zeropage(mm->uffd, addr,
						   COWMM_PAGE_SIZE, wake);
		cowmm__uffd_once = once;
		pthread_mutex_unlock(&mm->read_lock);
		/*
		 * An event not read: the lock let go, it is read, and the
		 * fill tried again, as cowmm__unprotect() does (a thread
		 * that kept moving other pages of the region held a lazy
		 * load's faults back for seconds when it went back to the
		 * workers at once: the twenty-third review's snapmix).  A
		 * caller with no patience set comes back later.
		 */
		if (ret != -EAGAIN || moved ||
		    !cowmm__uffd_again(mm->uffd, &tries,
				       !cowmm__uffd_deadline))
			return ret;
	}
}

int cowmm__live_write(uintptr_t addr, const struct iovec *src, size_t n)
{
	bool writable;
	int fd = self_mem_fd(&writable);

	if (fd < 0)
		return fd;
	if (!writable)
		return -EBADF;
	while (n) {
		int cnt = n > IOV_MAX ? IOV_MAX : (int)n, i;
		size_t want = 0;
		ssize_t got;

		for (i = 0; i < cnt; i++)
			want += src[i].iov_len;
		got = pwritev(fd, src, cnt, (off_t)addr);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0 && errno != EIO && errno != EFAULT)
			return -errno;
		if (got != (ssize_t)want)
			return -EFAULT; /* short: a page it could not write */
		addr += want;
		src += cnt;
		n -= (size_t)cnt;
	}
	return 0;
}

/*
 * Copy live memory of this process into @dst (library memory, never a
 * region's).  Through /proc/self/mem, not process_vm_readv(): its reads
 * never wait on a userfaultfd.  A page missing in a range registered for
 * missing faults (a clone's or a view's) fails at once with -EIO, where
 * process_vm_readv() would sleep until some worker resolved the fault,
 * perhaps the very worker that is reading (Linux 6.3+: access_remote_vm()
 * does not allow a fault retry, so handle_userfault() gives SIGBUS).  An
 * unmapped address fails the same way; a swapped-out page is read in.
 * Returns 0, or -EFAULT when the bytes could not be read whole.
 */
int cowmm__live_read(uintptr_t addr, void *dst, size_t len)
{
	int fd = self_mem();
	ssize_t n;

	if (fd < 0)
		return fd;
	/*
	 * In in-thread mode the kernel cannot resolve a fault on our behalf:
	 * a destination in a protected region page would fail with EFAULT,
	 * read as "the source was unmapped".  Bounce through the stack (the
	 * callers read at most a page at a time).
	 */
	if (atomic_load_explicit(&cowmm__inthread_managers,
				 memory_order_relaxed) &&
	    len <= COWMM_PAGE_SIZE) {
		unsigned char bounce[COWMM_PAGE_SIZE];

		n = pread(fd, bounce, len, (off_t)addr);
		if (n == (ssize_t)len) {
			/* filled by pread(), which cppcheck does not see */
			// cppcheck-suppress uninitvar
			memcpy(dst, bounce, len);
			return 0;
		}
	} else {
		n = pread(fd, dst, len, (off_t)addr);
		if (n == (ssize_t)len)
			return 0;
	}
	return n < 0 && errno != EIO && errno != EFAULT ? -errno : -EFAULT;
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
	cowmm__rcu_after_grace();
	free(caa_container_of(head, struct cowmm_rtable, rcu));
}

/* Publish a copy of the table with @add inserted and @del left out. */
static int rtable_cmp(const void *a, const void *b)
{
	const struct cowmm_rtable_ent *x = a, *y = b;

	return x->base < y->base ? -1 : x->base > y->base;
}

/*
 * Append an entry for each run of @r's pages (cowmm__next_run(): not in a
 * hole, where something else may be mapped now, a region too; one piece
 * of a region part of which moved), at most @cap; returns how many there
 * are.
 */
static size_t rtable_runs(struct cowmm_region *r, struct cowmm_rtable_ent *e,
			  size_t cap)
{
	size_t pg = 0, run, n = 0;
	uintptr_t start;

	for (; (run = cowmm__next_run(r, &pg, &start)); pg += run, n++)
		if (n < cap)
			e[n] = (struct cowmm_rtable_ent){
				start, run << COWMM_PAGE_SHIFT, r, pg
			};
	return n;
}

/*
 * Call with @add's lock held, or mm->lock while no one else can reach it:
 * its layout and holes stay as they are.
 */
static int rtable_replace(cowmm_t *mm, struct cowmm_region *add,
			  struct cowmm_region *del)
{
	struct cowmm_rtable *old, *t;
	size_t n, nadd = add ? rtable_runs(add, NULL, 0) : 0;
	size_t i, j = 0;

	pthread_mutex_lock(&mm->table_lock);
	old = mm->rtable;
	n = old ? old->n : 0;
	/*
	 * A region indexed anew that left the table already stays out: a
	 * worker that found it in an older table may follow a move of its
	 * pages after its release took it out (a freed region, kept in the
	 * table for good, refused memory adopted where its pages went).
	 */
	if (add && add == del) {
		for (i = 0; i < n && old->e[i].r != add; i++)
			;
		if (i == n) {
			pthread_mutex_unlock(&mm->table_lock);
			return 0;
		}
	}
	t = malloc(sizeof(*t) + (n + nadd) * sizeof(t->e[0]));
	if (!t) {
		pthread_mutex_unlock(&mm->table_lock);
		return -ENOMEM;
	}
	for (i = 0; i < n; i++)
		if (old->e[i].r != del)
			t->e[j++] = old->e[i];
	if (add)
		j += rtable_runs(add, t->e + j, nadd);
	qsort(t->e, j, sizeof(t->e[0]), rtable_cmp);
	t->n = j;
	__atomic_store_n(&mm->rtable, t, __ATOMIC_RELEASE); /* publish */
	pthread_mutex_unlock(&mm->table_lock);
	if (old)
		urcu_bp_call_rcu(&old->rcu, rtable_free_rcu);
	return 0;
}

/*
 * Does [@start, @start + @len) overlap a region's pages that have not left
 * it?  Call with mm->lock held.
 */
bool cowmm__rtable_overlaps(cowmm_t *mm, uintptr_t start, size_t len)
{
	struct cowmm_rtable *t;
	bool ret = false;
	size_t i;

	urcu_bp_read_lock(); /* a moving region's REMAP may replace it */
	t = __atomic_load_n(&mm->rtable, __ATOMIC_ACQUIRE);
	for (i = 0; t && i < t->n && !ret; i++)
		ret = start < t->e[i].base + t->e[i].len &&
		      t->e[i].base < start + len;
	urcu_bp_read_unlock();
	return ret;
}

/*
 * @r moved (mremap), or pages of it left it: index it anew.  Call with
 * r->lock held, @r not dying (its release takes it out of the table).
 */
int cowmm__rtable_move(cowmm_t *mm, struct cowmm_region *r)
{
	return rtable_replace(mm, r, r);
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
		const struct cowmm_rtable_ent *e = &t->e[mid];

		if (addr < e->base)
			hi = mid;
		else if (addr - e->base >= e->len)
			lo = mid + 1;
		else
			return e->r;
	}
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* Workers */

/*
 * A fault at an address no region holds (any more): its region was released
 * and unregistered, or the application moved the memory away.  Resolve it
 * as plain memory so that the thread never waits forever.
 *
 * Only while the memory there is still this manager's: @seq is the count
 * of moves and unmaps read when the fault was read, and only a move or
 * unmap of ours lets other memory take the address.  The kernel clears
 * write protection (or fills a missing page) in any mapping registered
 * with a userfaultfd there, another manager's too: after the application
 * moved the page away and moved another manager's protected page in, this
 * cleared that page's protection, and its snapshot lost it silently (the
 * fourth outside review, 8 in 10 tries).  With a move read since, the
 * thread is only woken: its access faults again where the memory is now,
 * into whichever userfaultfd holds it.  read_lock is held across the
 * ioctl, so that no event is read meanwhile (one not read makes the
 * kernel refuse: -EAGAIN, tried again).
 */
static int fault_stray(cowmm_t *mm, uintptr_t addr, bool wp, bool wake,
		       unsigned seq)
{
	int ret;

	/*
	 * While a REMAP event is read but not yet handled, this may be a
	 * region at its new address: wait for the table to follow.
	 */
	if (atomic_load(&mm->remaps_pending))
		return -EAGAIN;
	pthread_mutex_lock(&mm->read_lock);
	if (moved_since(mm, seq, addr, COWMM_PAGE_SIZE)) {
		pthread_mutex_unlock(&mm->read_lock);
		cowmm__uffd_wake(mm->uffd, addr, COWMM_PAGE_SIZE);
		return 0;
	}
	cowmm__uffd_once = true; /* no waiting for a read under the lock */
	ret = wp ? cowmm__uffd_wp(mm->uffd, addr, COWMM_PAGE_SIZE, false, wake)
		 : cowmm__uffd_zeropage(mm->uffd, addr, COWMM_PAGE_SIZE, wake);
	cowmm__uffd_once = false;
	pthread_mutex_unlock(&mm->read_lock);
	if (ret == -EAGAIN)
		return ret;
	if (ret && ret != -EEXIST && ret != -ENOENT) {
		cowmm__uffd_wake(mm->uffd, addr, COWMM_PAGE_SIZE);
		return 0;
	}
	return wake && !ret ? 0 : 1; /* the caller wakes */
}

static int fault(cowmm_t *mm, uintptr_t addr, bool wp, bool wake,
		 unsigned seq)
{
	struct cowmm_region *r;
	int ret;

	/*
	 * A missing fault where a move or unmap read (by another worker,
	 * perhaps) is not handled yet: the layout may still put a region's
	 * page here that is elsewhere now, and filling it would count that
	 * page as filled where it moved (the model tester's seed 654867910:
	 * a store to the range MREMAP_DONTUNMAP left made the clone's page
	 * read zero at its new address).  Once the move is handled.
	 */
	if (!wp && cowmm__moved_since(mm, cowmm__maps_handled(mm), addr,
				      COWMM_PAGE_SIZE))
		return -EAGAIN;
	urcu_bp_read_lock();
	r = cowmm__region_lookup(mm, addr);
	if (r)
		ret = wp ? cowmm__region_fault_wp(r, addr, wake)
			 : cowmm__region_fault_missing(r, addr, wake);
	else
		ret = fault_stray(mm, addr, wp, wake, seq);
	urcu_bp_read_unlock();
	return ret == -ENOSPC ? -EAGAIN : ret; /* at the cap: try again */
}

static int cmp_addr(const void *a, const void *b)
{
	uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;

	return x < y ? -1 : x > y;
}

/* Messages a worker could not resolve yet (a lock was busy). */
struct deferred {
	struct uffd_msg *msg;
	size_t n, cap;
};

static void defer(cowmm_t *mm, struct deferred *d, const struct uffd_msg *m)
{
	while (d->n == d->cap) {
		size_t cap = d->cap ? 2 * d->cap : 64;
		struct uffd_msg *p = realloc(d->msg, cap * sizeof(*p));

		if (!p) { /* a message dropped is a thread stuck for good */
			usleep(1000);
			continue;
		}
		d->msg = p;
		d->cap = cap;
	}
	d->msg[d->n++] = *m;
	atomic_fetch_add(&mm->deferred, 1);
}

/*
 * Discards in order.  Each REMOVE event gets a sequence number when it is
 * read, and every other message the number of the last REMOVE read before
 * it, in the message's reserved3 (the kernel leaves it zero).  A fault
 * waits only for the discards read before it: under a steady stream of
 * discards elsewhere, "any discard pending" would defer it for ever.
 */
static void removes_add(cowmm_t *mm, const struct uffd_msg *m)
{
	pthread_mutex_lock(&mm->removes_lock);
	while (mm->removes_n == mm->removes_cap) {
		size_t cap = mm->removes_cap ? 2 * mm->removes_cap : 16;
		struct cowmm_removing *q =
			realloc(mm->removes_q, cap * sizeof(*q));

		if (q) {
			mm->removes_q = q;
			mm->removes_cap = cap;
		} else { /* a discard forgotten would let a copy race it */
			pthread_mutex_unlock(&mm->removes_lock);
			usleep(1000);
			pthread_mutex_lock(&mm->removes_lock);
		}
	}
	mm->removes_q[mm->removes_n++] = (struct cowmm_removing){
		.seq = m->reserved3,
		.start = m->arg.remove.start,
		.end = m->arg.remove.end,
	};
	pthread_mutex_unlock(&mm->removes_lock);
}

static void removes_done(cowmm_t *mm, uint32_t seq)
{
	size_t i;

	pthread_mutex_lock(&mm->removes_lock);
	for (i = 0; i < mm->removes_n; i++)
		if (mm->removes_q[i].seq == seq) {
			mm->removes_q[i] = mm->removes_q[--mm->removes_n];
			break;
		}
	pthread_mutex_unlock(&mm->removes_lock);
	atomic_fetch_sub(&mm->removes_pending, 1);
}

/*
 * Is a discard read at or before @stamp, of memory in [@start, @end), not
 * handled yet?
 */
static bool removes_before_over(cowmm_t *mm, uint32_t stamp, uintptr_t start,
				uintptr_t end)
{
	bool ret = false;
	size_t i;

	pthread_mutex_lock(&mm->removes_lock);
	for (i = 0; i < mm->removes_n && !ret; i++)
		ret = (int32_t)(mm->removes_q[i].seq - stamp) <= 0 &&
		      mm->removes_q[i].start < end &&
		      start < mm->removes_q[i].end;
	pthread_mutex_unlock(&mm->removes_lock);
	return ret;
}

/* Is a discard read at or before @stamp not handled yet? */
bool cowmm__removes_before(cowmm_t *mm, uint32_t stamp)
{
	return removes_before_over(mm, stamp, 0, UINTPTR_MAX);
}

/*
 * Is a discard of the page at @addr read and not handled yet?  Through
 * read_lock: the kernel lets madvise() go on, and zap the page, inside
 * the worker's read(), before the event is counted.
 */
bool cowmm__removes_over(cowmm_t *mm, uintptr_t addr)
{
	bool ret;

	pthread_mutex_lock(&mm->read_lock);
	ret = removes_before_over(mm, mm->removes_read, addr, addr + 1);
	pthread_mutex_unlock(&mm->read_lock);
	return ret;
}

/*
 * The moves and unmaps read and not handled yet (mm->pend), appended as
 * they are read, under read_lock, and dropped once handled, in order.
 */
static void pend_add(cowmm_t *mm, const struct cowmm_moved *e)
{
	while (mm->pend_n == mm->pend_cap) {
		size_t cap = mm->pend_cap ? 2 * mm->pend_cap : 64, i;
		struct cowmm_moved *q = malloc(cap * sizeof(*q));

		if (!q) { /* forgotten, a REMOVE handler would read elsewhere */
			usleep(1000);
			continue;
		}
		for (i = 0; i < mm->pend_n; i++)
			q[i] = *pend_at(mm, i);
		free(mm->pend);
		mm->pend = q;
		mm->pend_cap = cap;
		mm->pend_head = 0;
	}
	mm->pend[(mm->pend_head + mm->pend_n++) % mm->pend_cap] = *e;
	if (mm->pend_n == 1)
		atomic_store(&mm->maps_behind, true);
}

/*
 * The oldest move or unmap read is handled: drop it and count it, under
 * read_lock, so that moved_since() and cowmm__moved_now() see both or
 * neither.  A move's handler calls it before it lets go of the regions
 * whose layout it changed: a REMOVE handler holding one reads the layout
 * and the moves still to apply to it as one.
 */
void cowmm__pend_done(cowmm_t *mm)
{
	pthread_mutex_lock(&mm->read_lock);
	if (mm->pend_n) { /* the oldest: handled in order */
		mm->pend_head = (mm->pend_head + 1) % mm->pend_cap;
		if (!--mm->pend_n)
			atomic_store(&mm->maps_behind, false);
	}
	atomic_fetch_add(&mm->maps_done, 1);
	pthread_mutex_unlock(&mm->read_lock);
}

/*
 * Where the page the layout puts at @page is now: followed through the
 * moves and unmaps read and not handled yet, in the order read.  0 if one
 * of them unmapped it, or put other memory where it was.  *@seq receives
 * the count of moves read (cowmm__maps_seq()): moved_since() after a copy
 * tells of one read meanwhile.  For a REMOVE handler, which cannot wait
 * for those moves: each waits for the discards read before it.
 */
uintptr_t cowmm__moved_now(cowmm_t *mm, uintptr_t page, unsigned *seq)
{
	size_t i;

	pthread_mutex_lock(&mm->read_lock);
	for (i = 0; i < mm->pend_n && page; i++) {
		const struct cowmm_moved *e = pend_at(mm, i);

		if (page >= e->from && page < e->from_end)
			page = e->to ? e->to + (page - e->from) : 0;
		else if (page >= e->to && page < e->to_end)
			page = 0;
	}
	*seq = mm->maps_read;
	pthread_mutex_unlock(&mm->read_lock);
	return page;
}

/*
 * Page @addr lost its protection since @stamp (cowmm__removes_stamp()),
 * with no event to say why: was it the kernel dropping a page MADV_FREE
 * left?  1: yes; 0: an event read since may explain it; -EAGAIN: what is
 * at @addr is not the region's page any more, or a move or unmap of it is
 * on its way (see below): look again once its event is handled.  Not if
 * a discard was read since or is pending (the kernel zaps only once its
 * event is read), nor if an unmap or a move was: munmap()
 * and mremap() take the page first and send their event after, so one not
 * read yet is one whose range is no longer mapped (mincore() fails; other
 * memory can take it only once the call returned, after the read), and
 * one read is numbered as a discard is (count_event()) and counted until
 * handled.  A caller that found @addr in a layout taken with such an
 * event pending cannot trust it: it waits for the event first.
 *
 * mincore() is not enough: mremap() lets go of the address space before it
 * sends its event, and another thread may map other memory where the pages
 * were before the event is read.  An ioctl on the page tells, one that
 * changes nothing (cowmm__uffd_range_probe()): the kernel refuses it with
 * EAGAIN while an event is not read, and with ENOENT where the memory is
 * not registered.
 */
static bool no_event_since(cowmm_t *mm, uint32_t stamp)
{
	bool quiet;

	pthread_mutex_lock(&mm->read_lock);
	pthread_mutex_lock(&mm->removes_lock);
	quiet = mm->removes_read == stamp && !mm->removes_n &&
		!atomic_load(&mm->unmaps_pending) &&
		!atomic_load(&mm->remaps_pending);
	pthread_mutex_unlock(&mm->removes_lock);
	pthread_mutex_unlock(&mm->read_lock);
	return quiet;
}

int cowmm__dropped_quietly(cowmm_t *mm, uintptr_t addr, uint32_t stamp)
{
	uintptr_t page = addr & ~(uintptr_t)(COWMM_PAGE_SIZE - 1);
	unsigned char vec;

	uint64_t t0 = 0;
	int ret;

	if (mincore((void *)page, COWMM_PAGE_SIZE, &vec))
		return -EAGAIN;
	if (!no_event_since(mm, stamp))
		return 0;
	/*
	 * A worker asks once: it may be the one to read the event.  Any
	 * other thread waits for the event to be read, a while (a thread
	 * that discards without pause keeps one unread most of the time);
	 * then no event read meanwhile either.
	 */
	while ((ret = cowmm__uffd_range_probe(mm->uffd, page,
						      COWMM_PAGE_SIZE)) == -EAGAIN &&
	       !cowmm__in_worker) {
		if (!t0)
			t0 = cowmm__now_ns();
		else if (cowmm__now_ns() - t0 > DROPPED_WAIT_NS)
			break;
		usleep(20);
	}
	if (ret)
		return -EAGAIN;
	return no_event_since(mm, stamp);
}

/* The last discard read so far (through read_lock: every one read). */
uint32_t cowmm__removes_stamp(cowmm_t *mm)
{
	uint32_t stamp;

	pthread_mutex_lock(&mm->read_lock);
	stamp = mm->removes_read;
	pthread_mutex_unlock(&mm->read_lock);
	return stamp;
}

/* Have the REMAP and UNMAP events up to number @seq been handled? */
static bool maps_done_upto(cowmm_t *mm, uint16_t seq)
{
	uint16_t done = (uint16_t)atomic_load(&mm->maps_done);

	return (int16_t)(done - seq) >= 0;
}

/*
 * Which regions an UNMAP (number @nr among the moves and unmaps) may
 * concern: those that entered the table before it was read.  The kernel
 * unmaps first and sends the event after, so memory mapped later is not
 * what it took.  And mremap() takes the pages, lets go of the address
 * space, and sends a REMAP and then an UNMAP of the range they left:
 * once the REMAP is followed the table no longer lists that range, and a
 * region allocated or adopted there before the UNMAP is read is not what
 * it took either (it made holes of its pages, which its snapshots read
 * as zero and its release left mapped: the fifth outside review's
 * pinmove and adoptrace; exact/adopt-where-move-left).  So an UNMAP of
 * exactly the old range of the move read just before it concerns only
 * regions in the table before that move was read, or entered it while
 * an event was in flight (cowmm__born_maps()).  With MREMAP_DONTUNMAP no
 * UNMAP follows the move and the old range stays mapped: memory adopted
 * there and unmapped by another thread sends an UNMAP of exactly that
 * range (the thirteenth session's outside review), which must not spare
 * it.  It entered the table with no event in flight, so the move's own
 * UNMAP, had there been one, was read before: the exception is not its.
 */
void (*cowmm__remap_handled)(uintptr_t from, size_t len);

static uint32_t unmap_since(cowmm_t *mm, uint32_t nr, uintptr_t start,
			    uintptr_t end)
{
	if (mm->last_remap.nr == nr - 1 && mm->last_remap.start == start &&
	    mm->last_remap.end == end)
		return nr - 1;
	return nr;
}

/*
 * Return once every event queued on the userfaultfd before the call has
 * been read.  Waiting until none is unread (the kernel's probe refuses
 * while one is) can wait for ever while other threads keep sending them
 * (the seventh outside review: a region allocation stalled 40 s behind
 * two threads that kept unmapping).  Events are read in the order they
 * were queued: a discard of the manager's own barrier page, registered
 * and no region's, queues a REMOVE and returns once a worker read it, so
 * every event before it was read too.  Application threads only (a
 * worker would wait for itself); without REMOVE events, a bounded wait.
 */
static void events_barrier(cowmm_t *mm)
{
	uint64_t t0;

	if (cowmm__in_worker || cowmm__in_sigbus ||
	    atomic_load(&mm->uffd_lost))
		return;
	if (mm->barrier) {
		if (cowmm__uffd_range_probe(mm->uffd, (uintptr_t)mm->barrier,
					    COWMM_PAGE_SIZE) == -EAGAIN)
			madvise(mm->barrier, COWMM_PAGE_SIZE, MADV_DONTNEED);
		return;
	}
	t0 = cowmm__now_ns();
	while (cowmm__uffd_range_probe(mm->uffd, 0, COWMM_PAGE_SIZE) ==
		       -EAGAIN &&
	       cowmm__now_ns() - t0 < DROPPED_WAIT_NS)
		usleep(20);
}

/*
 * A region entering the table: the count of moves and unmaps read, and
 * whether none of the manager's events was in flight then (true), taken
 * together under read_lock.  The barrier sees only the events queued
 * before it; an unmap that spans another userfaultfd's range queues this
 * manager's UNMAP only once that one's is read, however long that takes
 * (the thirteenth session's outside review: a region adopted in memory
 * mapped meanwhile took it for its own).  The kernel counts an event from
 * the moment it is prepared, before it is queued, until it is read, and
 * refuses the probe while any is: a probe that passes means every unmap
 * and move made before it has been read, and counted, as read_lock is
 * held.  Wait for that at most BORN_WAIT_NS (threads that keep unmapping
 * may never leave a moment; the seventh review waited 40 s), then count
 * from after the barrier.
 */
#define BORN_WAIT_NS (1000 * 1000000ull)

bool cowmm__born_maps(cowmm_t *mm, uint32_t *maps)
{
	uintptr_t at = mm->barrier ? (uintptr_t)mm->barrier : 0;
	uint64_t t0 = cowmm__now_ns();
	bool quiet;

	events_barrier(mm);
	for (;;) {
		pthread_mutex_lock(&mm->read_lock);
		quiet = cowmm__uffd_range_probe(mm->uffd, at,
						COWMM_PAGE_SIZE) != -EAGAIN;
		*maps = mm->maps_all;
		pthread_mutex_unlock(&mm->read_lock);
		if (quiet || cowmm__in_worker || cowmm__in_sigbus ||
		    atomic_load(&mm->uffd_lost) ||
		    cowmm__now_ns() - t0 >= BORN_WAIT_NS)
			return quiet;
		usleep(50);
	}
}

/* Resolve one message; -EAGAIN: try again later. */
static int handle(cowmm_t *mm, const struct uffd_msg *m, bool wake)
{
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT: {
		int ret;

		/* Discards read after this fault are not its business. */
		cowmm__stamp = m->reserved3;
		cowmm__stamped = true;
		ret = fault(mm, m->arg.pagefault.address & ~(COWMM_PAGE_SIZE - 1),
			    m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP,
			    wake, m->reserved2);
		cowmm__stamped = false;
		return ret;
	}
	case UFFD_EVENT_REMOVE: {
		int ret;

		/* A move read before it first: it finds the pages there. */
		if (!maps_done_upto(mm, m->reserved2))
			return -EAGAIN;
		cowmm__in_remove = true;
		ret = cowmm__event_remove(mm, m->arg.remove.start,
					  m->arg.remove.end);
		cowmm__in_remove = false;

		if (ret != -EAGAIN)
			removes_done(mm, m->reserved3);
		return ret;
	}
	case UFFD_EVENT_UNMAP: {
		uint32_t nr;
		int ret;

		/*
		 * mremap() sends REMAP, then UNMAP of the old range: the
		 * move is followed first, and a range moved away and back is
		 * not taken for unmapped.  And after the discards read
		 * before it of its memory: the discard came first, and gave
		 * the snapshots of a clone's page its origin's bytes; taken
		 * for unmapped first, the page broke them (the sixteenth
		 * review's dlmin F).
		 */
		if (!maps_done_upto(mm, (uint16_t)(m->reserved2 - 1)) ||
		    removes_before_over(mm, m->reserved3, m->arg.remove.start,
					m->arg.remove.end))
			return -EAGAIN;
		nr = (uint32_t)atomic_load(&mm->maps_done) + 1;
		ret = cowmm__event_unmap(mm, m->arg.remove.start,
					 m->arg.remove.end, nr,
					 unmap_since(mm, nr, m->arg.remove.start,
						     m->arg.remove.end));
		if (ret != -EAGAIN) {
			cowmm__pend_done(mm);
			atomic_fetch_sub(&mm->unmaps_pending, 1);
		}
		return ret;
	}
	case UFFD_EVENT_REMAP: {
		void (*hook)(uintptr_t, size_t);
		uint32_t nr;
		int ret;

		/* After the moves and unmaps, and the discards, before it. */
		if (!maps_done_upto(mm, (uint16_t)(m->reserved2 - 1)) ||
		    cowmm__removes_before(mm, m->reserved3))
			return -EAGAIN;
		/*
		 * Counted handled inside (cowmm__pend_done()); this one is
		 * next in order, so nothing else counts meanwhile.
		 */
		nr = (uint32_t)atomic_load(&mm->maps_done) + 1;
		/*
		 * Before it is counted: the UNMAP after it may be handled by
		 * another worker as soon as it is (the UNMAP before it was
		 * handled first, so nothing reads the old values now).
		 */
		mm->last_remap.nr = nr;
		mm->last_remap.start = m->arg.remap.from;
		mm->last_remap.end = m->arg.remap.from + m->arg.remap.len;
		ret = cowmm__event_remap(mm, m->arg.remap.from,
					 m->arg.remap.to, m->arg.remap.len);
		if (ret != -EAGAIN) {
			atomic_fetch_sub(&mm->remaps_pending, 1);
			hook = __atomic_load_n(&cowmm__remap_handled,
					       __ATOMIC_ACQUIRE);
			if (cowmm__unlikely(hook != NULL))
				hook(m->arg.remap.from, m->arg.remap.len);
		}
		return ret;
	}
	default:
		cowmm__log(COWMM_LOG_DEBUG, "ignoring uffd event %#x",
			   m->event);
		return 0;
	}
}

/*
 * A worker follows the thread whose faults it resolves onto its CPU: the
 * writer sleeps in the fault, so its CPU is free for the worker, and
 * neither wake-up needs an inter-processor interrupt (on the VMs measured,
 * a worker on another CPU costs 7-26 times the kernel's COW fault per
 * fault, on the writer's about 3.5 times: bench-floor).  The writer's CPU
 * is read from /proc (about 3 COW faults' worth), so only on the first
 * fault after an idle pause and every FOLLOW_EVERY faults.
 *
 * The worker wakes its writers as a SCHED_IDLE thread: the scheduler
 * then counts their CPU as idle and wakes them there, where the worker
 * runs, instead of on another CPU (a writer that moved away each time
 * would be followed each time).  Only where the worker may switch back:
 * with CAP_SYS_NICE or an RLIMIT_NICE that allows its nice value.
 *
 * As SCHED_IDLE it runs again only when nothing else wants that CPU: on a
 * CPU another busy thread shares, getting back took up to 140 ms, and
 * every fault waited behind it (bench: a spinning thread on the writer's
 * CPU made 4,000 writes take 8.3 s, against 0.4 s without the trick).  So
 * when getting back took longer than IDLE_STALL_NS, the trick is off for
 * a while: 1 s, doubling with each stall up to 64 s, reset after a minute
 * without one.
 */
#define FOLLOW_EVERY 64
#define FOLLOW_IDLE_NS (10 * 1000 * 1000)
#define IDLE_STALL_NS (1000 * 1000)
#define IDLE_OFF_MIN_NS (1000 * 1000 * 1000ull)
#define IDLE_OFF_MAX_NS (64 * IDLE_OFF_MIN_NS)

uint64_t cowmm__now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct follow {
	int cpu;          /* the CPU this worker is bound to, or -1 */
	unsigned faults;  /* since the last look */
	uint64_t last_ns; /* of the last fault */
	int policy;       /* the worker's own before it went SCHED_IDLE */
	bool idle_wake;   /* wake writers as SCHED_IDLE */
	bool off;         /* the application set its CPUs: follow no more */
	uint64_t idle_off_until; /* after a stall: not before then */
	uint64_t idle_off_ns;    /* how long the next stall turns it off */
	uint64_t last_stall;     /* when the last one was */
};

/* May this thread go SCHED_IDLE and come back to @policy? */
static bool may_idle_wake(int policy)
{
	struct __user_cap_header_struct hdr = {
		.version = _LINUX_CAPABILITY_VERSION_3,
	};
	struct __user_cap_data_struct cap[2];
	struct rlimit rl;
	int nice;

	if (policy != SCHED_OTHER && policy != SCHED_BATCH)
		return false; /* real-time: leave it alone */
	if (syscall(SYS_capget, &hdr, cap) == 0 &&
	    (cap[0].effective & (1u << CAP_SYS_NICE)))
		return true;
	errno = 0;
	nice = getpriority(PRIO_PROCESS, 0); /* this thread's */
	if (errno || getrlimit(RLIMIT_NICE, &rl))
		return false;
	return rl.rlim_cur == RLIM_INFINITY ||
	       rl.rlim_cur >= (rlim_t)(20 - nice);
}

/* Wake the writers of this batch as SCHED_IDLE?  Returns when it began. */
static uint64_t idle_begin(struct follow *f)
{
	struct sched_param sp = { 0 };
	uint64_t now;

	if (!f->idle_wake)
		return 0;
	now = cowmm__now_ns();
	if (now < f->idle_off_until)
		return 0;
	/* Asked each time: the application may have changed either. */
	f->policy = sched_getscheduler(0);
	if (!may_idle_wake(f->policy) ||
	    sched_setscheduler(0, SCHED_IDLE, &sp))
		return 0;
	return now;
}

/* Back to the worker's own policy; a stall turns the trick off a while. */
static void idle_end(struct follow *f, uint64_t began)
{
	struct sched_param sp = { 0 };
	uint64_t now;

	if (!began)
		return;
	if (sched_setscheduler(0, f->policy, &sp)) {
		cowmm__log(COWMM_LOG_ERR, "worker: back from SCHED_IDLE: %s",
			   strerror(errno));
		f->idle_wake = false;
		return;
	}
	now = cowmm__now_ns();
	if (now - began < IDLE_STALL_NS)
		return;
	if (!f->idle_off_ns || now - f->last_stall > 60 * IDLE_OFF_MIN_NS)
		f->idle_off_ns = IDLE_OFF_MIN_NS;
	else if (f->idle_off_ns < IDLE_OFF_MAX_NS)
		f->idle_off_ns *= 2;
	f->last_stall = now;
	f->idle_off_until = now + f->idle_off_ns;
	cowmm__log(COWMM_LOG_DEBUG,
		   "worker: %llu us to get back from SCHED_IDLE (its CPU is "
		   "busy): waking as SCHED_IDLE off for %llu s",
		   (unsigned long long)(now - began) / 1000,
		   (unsigned long long)(f->idle_off_ns / 1000000000u));
}

/*
 * The CPU thread @tid of this process last ran on, or -1.  Opened each
 * time, not kept: a number the library kept open could take the
 * userfaultfd's after the application closed it, and a worker would read
 * the file as messages instead of seeing the fd gone (uffd_lost()).
 */
static int thread_cpu(pid_t tid)
{
	char buf[512], *p;
	ssize_t n;
	int fd, field;

	snprintf(buf, sizeof(buf), "/proc/self/task/%d/stat", (int)tid);
	fd = open(buf, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = pread(fd, buf, sizeof(buf) - 1, 0);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	/* "pid (comm) state ...": field 39 is the CPU; comm may hold ')' */
	p = strrchr(buf, ')');
	for (field = 2; p && field < 39; field++)
		p = strchr(p + 1, ' ');
	return p ? atoi(p + 1) : -1;
}

static void follow_writer(cowmm_t *mm, struct follow *f,
			  const struct uffd_msg *msg, size_t n)
{
	uint64_t now;
	cpu_set_t one;
	pid_t tid = 0;
	int cpu;

	for (size_t i = 0; i < n && !tid; i++)
		if (msg[i].event == UFFD_EVENT_PAGEFAULT)
			tid = (pid_t)msg[i].arg.pagefault.feat.ptid;
	if (!tid)
		return;
	now = cowmm__now_ns();
	if (++f->faults < FOLLOW_EVERY && now - f->last_ns < FOLLOW_IDLE_NS) {
		f->last_ns = now;
		return;
	}
	f->faults = 0;
	f->last_ns = now;
	cpu = thread_cpu(tid);
	if (cpu < 0 || cpu == f->cpu || cpu >= CPU_SETSIZE)
		return;
	if (f->cpu >= 0) {
		cpu_set_t now_set;

		CPU_ZERO(&one);
		CPU_SET(f->cpu, &one);
		if (pthread_getaffinity_np(pthread_self(), sizeof(now_set),
					   &now_set) ||
		    !CPU_EQUAL(&now_set, &one)) {
			/* Someone set this worker's CPUs: theirs to say. */
			f->off = true;
			f->idle_wake = false;
			cowmm__log(COWMM_LOG_INFO,
				   "worker: its CPUs were set by the "
				   "application: it follows writers no more");
			return;
		}
	}
	CPU_ZERO(&one);
	CPU_SET(cpu, &one);
	if (pthread_setaffinity_np(pthread_self(), sizeof(one), &one))
		return; /* not a CPU this process may use: stay */
	f->cpu = cpu;
	cowmm__count(mm, follows, 1);
}

/*
 * Resolve the messages deferred earlier, then a new batch.  Protection is
 * cleared page by page without waking; the blocked threads are then woken
 * once per run of adjacent pages.  A lone fault clears and wakes in a
 * single ioctl.
 */
static void dispatch(cowmm_t *mm, struct deferred *d, struct follow *f,
		     const struct uffd_msg *msg, size_t n)
{
	uintptr_t *wake = malloc((n + d->n) * sizeof(*wake));
	size_t old = d->n, i, nwake = 0, total = n + old;
	uint64_t began;
	struct uffd_msg *again = d->msg;

	d->msg = NULL;
	d->n = d->cap = 0;
	atomic_fetch_sub(&mm->deferred, old);
	/*
	 * The messages put off before, then the new ones, but the faults
	 * put off last: tried before the moves and unmaps just read were
	 * followed, a fault finds one pending and is put off again, for as
	 * long as a thread keeps moving other memory (the thirteenth
	 * session's outside review, fault_starve: a minute and more).
	 */
	for (i = 0; i < total + old; i++) {
		bool lone = (total == 1 && !f->idle_wake) || !wake;
		bool late = i >= total; /* the faults put off, second look */
		const struct uffd_msg *m;
		int ret;

		if (i < old)
			m = &again[i];
		else if (!late)
			m = &msg[i - old];
		else
			m = &again[i - total];
		if ((i < old || late) &&
		    (m->event == UFFD_EVENT_PAGEFAULT) != late)
			continue;
		ret = handle(mm, m, lone);

		/*
		 * A fault not resolved (ret < 0) is woken too: nothing will
		 * try it again, and the writer's access faults anew if it
		 * must.  A thread left asleep here sleeps for good.
		 */
		if (ret == -EAGAIN)
			defer(mm, d, m);
		else if (ret > 0 && wake)
			wake[nwake++] = m->arg.pagefault.address &
					~(COWMM_PAGE_SIZE - 1);
		else if (ret > 0 || (ret < 0 &&
				     m->event == UFFD_EVENT_PAGEFAULT))
			cowmm__uffd_wake(mm->uffd,
					 m->arg.pagefault.address &
						 ~(COWMM_PAGE_SIZE - 1),
					 COWMM_PAGE_SIZE);
	}
	free(again);
	if (!nwake) {
		free(wake);
		return;
	}
	qsort(wake, nwake, sizeof(wake[0]), cmp_addr);
	began = idle_begin(f);
	for (i = 0; i < nwake;) {
		uintptr_t start = wake[i], end = start + COWMM_PAGE_SIZE;

		while (++i < nwake && wake[i] <= end)
			end = wake[i] + COWMM_PAGE_SIZE;
		cowmm__uffd_wake(mm->uffd, start, end - start);
	}
	idle_end(f, began);
	free(wake);
}

static int worker_spawn(cowmm_t *mm, pthread_t *slot);
static void worker_bind(cowmm_t *mm, unsigned i);

/*
 * Count a message just read, under read_lock, before any worker can read
 * a later one: a fault at a moved region's new address must not look
 * stray, and a fault must see the discards read before it.
 */
static void count_event(cowmm_t *mm, struct uffd_msg *m)
{
	switch (m->event) {
	case UFFD_EVENT_REMAP:
		m->reserved2 = ++mm->maps_read;
		mm->moved[mm->maps_read % COWMM_MOVED_RING] =
			(struct cowmm_moved){
				.from = m->arg.remap.from,
				.from_end = m->arg.remap.from + m->arg.remap.len,
				.to = m->arg.remap.to,
				.to_end = m->arg.remap.to + m->arg.remap.len,
			};
		pend_add(mm, &mm->moved[mm->maps_read % COWMM_MOVED_RING]);
		mm->maps_all++;
		/* Numbered, not queued: cowmm__dropped_quietly(). */
		m->reserved3 = ++mm->removes_read;
		atomic_fetch_add(&mm->remaps_pending, 1);
		return;
	case UFFD_EVENT_REMOVE:
		m->reserved2 = mm->maps_read;
		m->reserved3 = ++mm->removes_read;
		removes_add(mm, m);
		atomic_fetch_add(&mm->removes_pending, 1);
		return;
	case UFFD_EVENT_UNMAP:
		m->reserved2 = ++mm->maps_read;
		mm->moved[mm->maps_read % COWMM_MOVED_RING] =
			(struct cowmm_moved){ .from = m->arg.remove.start,
					      .from_end = m->arg.remove.end };
		pend_add(mm, &mm->moved[mm->maps_read % COWMM_MOVED_RING]);
		mm->maps_all++;
		/* Numbered, not queued: cowmm__dropped_quietly(). */
		m->reserved3 = ++mm->removes_read;
		atomic_fetch_add(&mm->unmaps_pending, 1);
		return;
	default:
		break;
	}
	/* A fault: the moves read before it (fault_stray()). */
	m->reserved2 = mm->maps_read;
	m->reserved3 = mm->removes_read;
}

/*
 * The userfaultfd is gone (the application closed the library's fd): the
 * kernel has unregistered every range and woken every writer, so writes
 * now land without a copy.  Every live snapshot is broken, and no new one
 * can be taken.
 */
static void uffd_lost(cowmm_t *mm)
{
	struct cowmm_snap *s;
	unsigned n = 0;

	if (atomic_exchange(&mm->uffd_lost, true))
		return;
	pthread_mutex_lock(&mm->lock);
	for (s = mm->snaps; s; s = s->mm_next, n++)
		cowmm__snap_break(s, "userfaultfd lost");
	pthread_mutex_unlock(&mm->lock);
	cowmm__log(COWMM_LOG_ERR,
		   "userfaultfd %d closed under the library: writes are no "
		   "longer protected; %u snapshots broken",
		   mm->uffd, n);
}

/*
 * A worker stopped on an error while the manager runs: start another in
 * its slot, so that faults are still resolved.  Called by that worker,
 * which then detaches itself; not once cowmm_close() is stopping the
 * workers (it joins this one).
 */
static void worker_replace(cowmm_t *mm)
{
	pthread_t self = pthread_self();
	unsigned i;
	int ret;

	pthread_mutex_lock(&mm->workers_lock);
	for (i = 0; i < mm->nworkers && !mm->stopping; i++) {
		if (!pthread_equal(mm->workers[i], self))
			continue;
		ret = worker_spawn(mm, &mm->workers[i]);
		if (ret) {
			cowmm__log(COWMM_LOG_ERR,
				   "worker %u stopped; no replacement: %s", i,
				   strerror(-ret));
			break;
		}
		worker_bind(mm, i);
		cowmm__log(COWMM_LOG_WARNING, "worker %u stopped on an error; "
					   "restarted", i);
		pthread_detach(self);
		break;
	}
	pthread_mutex_unlock(&mm->workers_lock);
}

/*
 * How many moves and unmaps may be read and not followed yet.  A thread
 * that moves memory without pause waits in the kernel only until its
 * event is read.  Workers that read on while following falls behind (two
 * that hand the events to each other wait up to a millisecond each time)
 * let it run ever further ahead, and the numbers that order the events,
 * 16 bits in the message, turned over past 32,768: events were followed
 * out of order, and the region's own page taken for unmapped
 * (exact/moves-read-far-ahead).  Past MAPS_AHEAD a worker reads no more
 * until one is followed.  With none followed for MAPS_STUCK_NS it reads
 * one batch more, since a handler may be waiting for an event not read
 * yet, but never past MAPS_AHEAD_MAX.
 */
#define MAPS_AHEAD 1024
#define MAPS_AHEAD_MAX 16384
#define MAPS_STUCK_NS (50 * 1000000ull)

struct ahead {
	uint32_t done;  /* mm->maps_done when this worker last looked */
	uint64_t since; /* when it last changed, or the last batch let in */
};

/* May this worker read now?  Call with read_lock held. */
static bool may_read(cowmm_t *mm, struct ahead *a)
{
	uint32_t done = atomic_load(&mm->maps_done);
	uint64_t now;

	if (mm->pend_n < MAPS_AHEAD)
		return true;
	now = cowmm__now_ns();
	if (done != a->done || !a->since) {
		a->done = done;
		a->since = now;
		return false;
	}
	if (now - a->since < MAPS_STUCK_NS || mm->pend_n >= MAPS_AHEAD_MAX)
		return false;
	a->since = now; /* one batch, then wait again */
	return true;
}

static void *worker_main(void *arg)
{
	cowmm_t *mm = arg;
	bool failed = true;
	struct uffd_msg msg[MSG_BATCH];
	struct deferred d = { 0 };
	struct follow f = { .cpu = -1, .policy = sched_getscheduler(0) };
	bool follow = (mm->flags & COWMM_OPEN_FOLLOW) &&
		      !(mm->flags & COWMM_OPEN_PER_CPU);
	struct pollfd pfd[2] = {
		{ .fd = mm->uffd, .events = POLLIN },
		{ .fd = mm->stopfd, .events = POLLIN },
	};

	struct ahead ahead = { 0 };
	bool hold = false; /* read no more for now: may_read() */

	cowmm__in_worker = true;
	f.idle_wake = follow && may_idle_wake(f.policy);
	for (;;) {
		ssize_t n = 0;
		int rerr = 0; /* read()'s errno: dispatch() makes calls too */

		/*
		 * With messages deferred, or reading held back, look again
		 * within a millisecond.
		 */
		pfd[0].fd = hold ? -1 : mm->uffd;
		if (poll(pfd, 2, d.n || hold ? 1 : -1) < 0) {
			if (errno == EINTR)
				continue;
			cowmm__log(COWMM_LOG_ERR, "worker: poll: %s",
				   strerror(errno));
			break;
		}
		if (pfd[1].revents) {
			failed = false;
			break;
		}
		if (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
			uffd_lost(mm);
			failed = false; /* a replacement would find it gone too */
			break;
		}
		if (atomic_load(&mm->uffd_lost)) { /* seen by another worker */
			failed = false;
			break;
		}
		if (cowmm__unlikely(atomic_load(&mm->fail_worker)) &&
		    atomic_exchange(&mm->fail_worker, 0)) {
			cowmm__log(COWMM_LOG_ERR, "worker: failing on request");
			break;
		}
		atomic_fetch_add(&mm->busy, 1);
		if (hold || (pfd[0].revents & POLLIN)) {
			/*
			 * Count the REMAP events of a batch before any worker
			 * can read a later message: a fault at a moved
			 * region's new address must not look stray.
			 */
			while (cowmm__unlikely(atomic_load(&mm->pause_until)) &&
			       cowmm__now_ns() < atomic_load(&mm->pause_until))
				usleep(200);
			pthread_mutex_lock(&mm->read_lock);
			hold = !may_read(mm, &ahead);
			if (!hold) {
				n = read(mm->uffd, msg, sizeof(msg));
				rerr = n < 0 ? errno : 0;
			}
			for (ssize_t i = 0; i < n / (ssize_t)sizeof(msg[0]); i++)
				count_event(mm, &msg[i]);
			pthread_mutex_unlock(&mm->read_lock);
		}
		if (n > 0 || d.n)
			dispatch(mm, &d, &f, msg,
				 n > 0 ? (size_t)n / sizeof(msg[0]) : 0);
		atomic_fetch_sub(&mm->busy, 1);
		/* After the batch is resolved: a move costs tens of µs. */
		if (follow && !f.off && n > 0)
			follow_writer(mm, &f, msg, (size_t)n / sizeof(msg[0]));
		if (rerr == EBADF || rerr == EINVAL) {
			uffd_lost(mm); /* the number is not a userfaultfd */
			failed = false;
			break;
		}
		if (rerr && rerr != EAGAIN && rerr != EINTR) {
			cowmm__log(COWMM_LOG_ERR, "worker: read: %s",
				   strerror(rerr));
			break;
		}
	}
	/* Messages it held are lost to it: its replacement cannot see
	 * them, so their writers are woken to fault again. */
	for (size_t i = 0; i < d.n; i++)
		if (d.msg[i].event == UFFD_EVENT_PAGEFAULT)
			cowmm__uffd_wake(mm->uffd,
					 d.msg[i].arg.pagefault.address &
						 ~(COWMM_PAGE_SIZE - 1),
					 COWMM_PAGE_SIZE);
	atomic_fetch_sub(&mm->deferred, d.n);
	free(d.msg);
	urcu_bp_unregister_thread();
	if (failed)
		worker_replace(mm);
	return NULL;
}

static void workers_stop(cowmm_t *mm, unsigned n)
{
	uint64_t one = 1;
	unsigned i;

	pthread_mutex_lock(&mm->workers_lock);
	mm->stopping = true;
	pthread_mutex_unlock(&mm->workers_lock);

	if (write(mm->stopfd, &one, sizeof(one)) < 0)
		cowmm__log(COWMM_LOG_ERR, "stopping workers: %s",
			   strerror(errno));
	for (i = 0; i < n; i++)
		pthread_join(mm->workers[i], NULL);
}

/* Start a worker into @slot; it takes no signals: those are the
 * application's. */
static int worker_spawn(cowmm_t *mm, pthread_t *slot)
{
	sigset_t all, old;
	int ret;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	ret = -pthread_create(slot, NULL, worker_main, mm);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return ret;
}

/* COWMM_OPEN_PER_CPU: bind worker @i to the i-th CPU this process may
 * use.  Best effort: an unbound worker still works. */
static void worker_bind(cowmm_t *mm, unsigned i)
{
	cpu_set_t set, one;
	unsigned cpu, seen = 0, nth;

	if (!(mm->flags & COWMM_OPEN_PER_CPU) ||
	    sched_getaffinity(0, sizeof(set), &set))
		return;
	nth = i % (unsigned)CPU_COUNT(&set);
	for (cpu = 0; cpu < CPU_SETSIZE; cpu++) {
		if (!CPU_ISSET(cpu, &set) || seen++ != nth)
			continue;
		CPU_ZERO(&one);
		CPU_SET(cpu, &one);
		pthread_setaffinity_np(mm->workers[i], sizeof(one), &one);
		return;
	}
}

static int workers_start(cowmm_t *mm)
{
	unsigned i;
	int ret = 0;

	mm->workers = calloc(mm->nworkers, sizeof(*mm->workers));
	if (!mm->workers)
		return -ENOMEM;
	pthread_mutex_lock(&mm->workers_lock);
	for (i = 0; i < mm->nworkers; i++) {
		ret = worker_spawn(mm, &mm->workers[i]);
		if (ret)
			break;
		worker_bind(mm, i);
	}
	pthread_mutex_unlock(&mm->workers_lock);
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

/* The page events_barrier() discards; none without REMOVE events. */
static void barrier_open(cowmm_t *mm)
{
	void *p;

	if (!(mm->features & UFFD_FEATURE_EVENT_REMOVE))
		return;
	p = mmap(NULL, COWMM_PAGE_SIZE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		return;
	if (cowmm__uffd_register(mm->uffd, (uintptr_t)p, COWMM_PAGE_SIZE,
				 UFFDIO_REGISTER_MODE_WP, NULL)) {
		munmap(p, COWMM_PAGE_SIZE);
		return;
	}
	mm->barrier = p;
}

/* After the userfaultfd is closed: an unmap sends no event then. */
static void barrier_close(cowmm_t *mm)
{
	if (mm->barrier)
		munmap(mm->barrier, COWMM_PAGE_SIZE);
	mm->barrier = NULL;
}

/*
 * How pagemap shows a uffd-wp marker, which a page never populated holds
 * once protected: its PM_SWAP and frame bits, learnt from a page of our
 * own.  Linux 6.18 shows it as a swap entry of the marker's own type,
 * told from a page swapped out by its frame bits; those are shown only to
 * CAP_SYS_ADMIN (zero otherwise): then, and when no marker shows at all,
 * UINT64_MAX, and every empty page a release meets is read.
 */
static uint64_t probe_marker(cowmm_t *mm)
{
	uint64_t e = 0, ret = UINT64_MAX;
	void *p;

	if (!(mm->features & UFFD_FEATURE_WP_UNPOPULATED))
		return ret;
	p = mmap(NULL, COWMM_PAGE_SIZE, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return ret;
	if (!cowmm__uffd_register(mm->uffd, (uintptr_t)p, COWMM_PAGE_SIZE,
				  UFFDIO_REGISTER_MODE_WP, NULL)) {
		if (!cowmm__uffd_wp(mm->uffd, (uintptr_t)p, COWMM_PAGE_SIZE,
				    true, false) &&
		    !cowmm__pagemap_read(mm->pagemap, (uintptr_t)p, 1, &e) &&
		    (e & (PM_UFFD_WP | PM_PRESENT)) == PM_UFFD_WP &&
		    (!(e & PM_SWAP) || (e & PM_PFN_MASK)))
			ret = e & (PM_SWAP | PM_PFN_MASK);
		cowmm__uffd_unregister(mm->uffd, (uintptr_t)p,
				       COWMM_PAGE_SIZE);
	}
	munmap(p, COWMM_PAGE_SIZE);
	return ret;
}

/*
 * Is pagemap entry @e a uffd-wp marker: a page never populated (or
 * discarded) since the range was protected, which reads as zero?  Never
 * a page swapped out, whose entry shows PM_SWAP and the uffd-wp bit too.
 */
bool cowmm__pm_is_marker(const cowmm_t *mm, uint64_t e)
{
	return mm->pm_marker != UINT64_MAX &&
	       (e & (PM_UFFD_WP | PM_PRESENT)) == PM_UFFD_WP &&
	       (e & (PM_SWAP | PM_PFN_MASK)) == mm->pm_marker;
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
	if ((cfg.flags & ~(COWMM_OPEN_IN_THREAD | COWMM_OPEN_PER_CPU |
			   COWMM_OPEN_FOLLOW)) ||
	    cfg.workers > COWMM_WORKERS_MAX ||
	    cfg.fault_around > COWMM_FAULT_AROUND_MAX ||
	    (cfg.max_preserved && cfg.max_preserved < COWMM_PAGE_SIZE))
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
	mm->max_frames = cfg.max_preserved / COWMM_PAGE_SIZE;
	mm->nworkers = cfg.workers ? cfg.workers : 1;
	if (cfg.flags & COWMM_OPEN_PER_CPU) {
		cpu_set_t set;

		if (sched_getaffinity(0, sizeof(set), &set) == 0 &&
		    (unsigned)CPU_COUNT(&set) > mm->nworkers)
			mm->nworkers = CPU_COUNT(&set);
		if (mm->nworkers > COWMM_WORKERS_MAX)
			mm->nworkers = COWMM_WORKERS_MAX;
	}
	mm->uffd = mm->stopfd = mm->pagemap = -1;

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
	if (mm->flags & COWMM_OPEN_IN_THREAD)
		mm->features |= UFFD_FEATURE_SIGBUS; /* since 4.14 */

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
	mm->pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (mm->pagemap < 0) {
		ret = -errno;
		cowmm__log(COWMM_LOG_ERR,
			   "cannot open /proc/self/pagemap: %s%s",
			   strerror(-ret),
			   ret == -EACCES ? " (a process that is not dumpable: "
					    "prctl(PR_SET_DUMPABLE, 1) after "
					    "setuid())"
					  : "");
		goto err_close;
	}
	mm->pm_marker = probe_marker(mm);
	barrier_open(mm);
	ret = pthread_mutex_init(&mm->lock, NULL);
	if (ret) {
		ret = -ret;
		goto err_close;
	}
	pthread_mutex_init(&mm->read_lock, NULL);
	pthread_mutex_init(&mm->table_lock, NULL);
	pthread_mutex_init(&mm->removes_lock, NULL);
	pthread_mutex_init(&mm->workers_lock, NULL);
	ret = cowmm__frame_pool_init(&mm->pool, &mm->cnt.frames_live);
	if (ret)
		goto err_mutex;
	if (mm->flags & COWMM_OPEN_IN_THREAD) {
		ret = cowmm__inthread_add(mm);
		if (ret)
			goto err_pool;
	}
	ret = workers_start(mm);
	if (ret) {
		if (mm->flags & COWMM_OPEN_IN_THREAD)
			cowmm__inthread_remove(mm);
		goto err_pool;
	}
	*out = mm;
	return 0;

err_pool:
	cowmm__frame_pool_fini(&mm->pool);
err_mutex:
	pthread_mutex_destroy(&mm->lock);
	pthread_mutex_destroy(&mm->read_lock);
	pthread_mutex_destroy(&mm->table_lock);
	pthread_mutex_destroy(&mm->removes_lock);
	free(mm->removes_q);
	free(mm->pend);
	pthread_mutex_destroy(&mm->workers_lock);
err_close:
	if (mm->pagemap >= 0)
		close(mm->pagemap);
	if (mm->stopfd >= 0)
		close(mm->stopfd);
	close(mm->uffd);
	barrier_close(mm);
err_free:
	free(mm);
	return ret;
}

void cowmm_close(cowmm_t *mm)
{
	unsigned i;

	if (cowmm__check_mm(mm))
		return;
	/*
	 * Moves, unmaps and discards read so far first, as for
	 * cowmm_region_release(): a region released before its move is
	 * handled would be unmapped where the application may have mapped
	 * its own memory since, and a lazy load's discarded pages would get
	 * the file's bytes.  No worker is left to handle them once the
	 * userfaultfd is lost.
	 */
	if (!atomic_load(&mm->uffd_lost))
		cowmm__wait_events(mm);
	cowmm__region_release_all(mm);
	if (mm->flags & COWMM_OPEN_IN_THREAD)
		cowmm__inthread_remove(mm);
	workers_stop(mm, mm->nworkers);
	free(mm->workers);
	if (!atomic_load(&mm->uffd_lost)) /* else: closed, maybe reused */
		close(mm->uffd);
	barrier_close(mm);
	close(mm->stopfd);
	close(mm->pagemap);

	/* Every frame and table freed through call_rcu is back. */
	urcu_bp_barrier();
	cowmm__frame_pool_fini(&mm->pool);
	free(mm->rtable);
	for (i = 0; i < COWMM_GRAVEYARD; i++)
		free(mm->graveyard[i]);
	pthread_mutex_destroy(&mm->lock);
	pthread_mutex_destroy(&mm->read_lock);
	pthread_mutex_destroy(&mm->table_lock);
	pthread_mutex_destroy(&mm->removes_lock);
	free(mm->removes_q);
	free(mm->pend);
	pthread_mutex_destroy(&mm->workers_lock);
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
	LOAD(throttled);
	LOAD(follows);
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
		if (poll(&pfd, 1, 0) == 0 && atomic_load(&mm->busy) == 0 &&
		    atomic_load(&mm->deferred) == 0)
			return;
		usleep(100);
	}
}

/*
 * One more round of waiting for the workers: a yield at first, then 50 µs
 * sleeps that leave the CPU to a worker that shares it (one that wakes as
 * SCHED_IDLE runs only then).  A bound of time, not of rounds: a worker
 * held back by a busy CPU took over 100 ms to get back, more than 100,000
 * yields took, and a snapshot taken before a pending discard is handled
 * breaks (the exact test restore-discard-storm, under load).  False after
 * WAIT_EVENTS_NS, with a warning: the caller goes on.
 */
#define WAIT_EVENTS_NS (10 * 1000 * 1000 * 1000ull)

struct wait {
	unsigned rounds;
	uint64_t start;
};

static bool wait_more(struct wait *w, const char *what)
{
	if (w->rounds++ < 100) {
		sched_yield();
		return true;
	}
	if (!w->start)
		w->start = cowmm__now_ns();
	else if (cowmm__now_ns() - w->start > WAIT_EVENTS_NS) {
		cowmm__log(COWMM_LOG_WARNING,
			   "%s read 10 s ago are still not handled: going on "
			   "without them", what);
		return false;
	}
	usleep(50);
	return true;
}

/*
 * Let discards already read be handled before a snapshot is taken: one
 * handled after would find the new snapshot sharing a page that was gone
 * before it existed, and break it (events.c).  Called with no lock held;
 * a discard read afterwards raced with the snapshot call itself.
 */
void cowmm__wait_discards(cowmm_t *mm)
{
	uint32_t stamp = cowmm__stamped ? cowmm__stamp
					: cowmm__removes_stamp(mm);
	struct wait w = { 0 };

	/* Only those read so far: new ones may come for ever. */
	while (cowmm__removes_before(mm, stamp) && wait_more(&w, "discards"))
		;
}

/*
 * cowmm__wait_discards(), and unmaps and moves read but not handled yet:
 * a snapshot taken before them would protect a range that is gone.  For
 * cowmm_snapshot() and cowmm_clone(), with no lock held.
 */
void cowmm__wait_events(cowmm_t *mm)
{
	unsigned seq = cowmm__maps_seq(mm);
	struct wait w = { 0 };

	cowmm__wait_discards(mm);
	/*
	 * Only those read so far, as for discards: waiting until none is
	 * pending held a release back for as long as another thread kept
	 * unmapping (the seventh outside review: 10-28 s).
	 */
	while (!cowmm__maps_done(mm, seq) && wait_more(&w, "unmaps and moves"))
		;
}

/*
 * REMOVE events read but not handled yet.  The madvise() that sent one
 * returns as soon as a worker's read() has it, perhaps before that worker
 * has counted it: the count is taken under read_lock, so going through
 * the lock first sees every event read so far.
 */
bool cowmm__discards_pending(cowmm_t *mm)
{
	pthread_mutex_lock(&mm->read_lock);
	pthread_mutex_unlock(&mm->read_lock);
	return atomic_load(&mm->removes_pending) != 0;
}

/*
 * A move or unmap read but not handled yet.  mremap() and munmap() return
 * once a worker's read() has their event, perhaps before it is counted:
 * going through read_lock first sees every event read so far.  A region
 * whose lock is held cannot have its own handled meanwhile.
 */
bool cowmm__maps_pending(cowmm_t *mm)
{
	bool ret;

	pthread_mutex_lock(&mm->read_lock);
	ret = (uint16_t)atomic_load(&mm->maps_done) != mm->maps_read;
	pthread_mutex_unlock(&mm->read_lock);
	return ret;
}

/*
 * A call found pages of a region moved or unmapped under it (protecting
 * or writing met nothing, or other memory, where the layout put them):
 * go again?  While a move or unmap is read but not handled, yes, up to
 * 100 rounds (each waits for the events first).  With none read, the
 * kernel is about to send one (it moves the pages, then sends the event;
 * the thread that moved them may be slow to run again): yes, after
 * 100 us, for up to 200 ms.  *@rounds and *@since start at 0.
 */
#define MOVED_WAIT_NS (200 * 1000 * 1000ull)

bool cowmm__moved_again(cowmm_t *mm, int *rounds, uint64_t *since)
{
	uint64_t now;

	if (cowmm__maps_pending(mm)) {
		*since = 0;
		return ++*rounds < 100;
	}
	now = cowmm__now_ns();
	if (!*since)
		*since = now;
	else if (now - *since > MOVED_WAIT_NS)
		return false;
	usleep(100);
	return true;
}

/* Tests: workers read nothing from the userfaultfd for @ms from now. */
void cowmm__pause_reads(cowmm_t *mm, unsigned ms)
{
	atomic_store(&mm->pause_until, cowmm__now_ns() + ms * 1000000ull);
}

/* Have the moves and unmaps read up to cowmm__maps_seq() @seq been handled? */
bool cowmm__maps_done(cowmm_t *mm, unsigned seq)
{
	return maps_done_upto(mm, (uint16_t)seq);
}

/*
 * How many moves and unmaps were read so far (wrapping): a call that sees
 * it change knows the layout it worked with may be stale.
 */

unsigned cowmm__maps_seq(cowmm_t *mm)
{
	unsigned ret;

	pthread_mutex_lock(&mm->read_lock);
	ret = mm->maps_read;
	pthread_mutex_unlock(&mm->read_lock);
	return ret;
}

/*
 * How many moves and unmaps were followed so far, numbered as
 * cowmm__maps_seq() numbers them read: a layout looked at after this
 * holds every one up to it, and a check with moved_since() counts those
 * read and not followed yet too.  For a write fault, whose clear of the
 * protection must not land on memory moved in where its page was: one
 * read but not followed when the fault took cowmm__maps_seq() went
 * unseen (the fourteenth session's outside review, foreign_wp: with two
 * workers, another manager's snapshot read zeros).
 */
unsigned cowmm__maps_handled(cowmm_t *mm)
{
	return (uint16_t)atomic_load(&mm->maps_done);
}

/* Not part of the API: the next @n frame allocations fail, as when out of
 * memory. */
void cowmm__inject_frame_failures(cowmm_t *mm, unsigned n)
{
	atomic_store(&mm->pool.fail_next, n);
}

/* Not part of the API: the naive policy exists to show what it breaks. */
void cowmm__fail_worker(cowmm_t *mm)
{
	atomic_store(&mm->fail_worker, 1);
}

void cowmm__set_naive(cowmm_t *mm, bool on)
{
	mm->naive = on;
}

uint64_t cowmm_features(const cowmm_t *mm)
{
	return mm && mm->magic == COWMM_MAGIC_MM ? mm->features : 0;
}
