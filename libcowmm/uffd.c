// SPDX-License-Identifier: MIT
/*
 * The kernel interface: each userfaultfd ioctl wrapped once, feature
 * probing, and pagemap reads.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cowmm_i.h"
#include "uffd.h"

/*
 * Open a userfaultfd: the system call first, then /dev/userfaultfd, as the
 * kernel selftests' uffd_open() does.  The system call needs
 * CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1 (unless user_mode_only);
 * the device needs read/write access to /dev/userfaultfd.
 */
int cowmm__uffd_open(bool user_mode_only)
{
	int flags = O_CLOEXEC | O_NONBLOCK;
	int fd, dev, err;

	if (user_mode_only)
		flags |= UFFD_USER_MODE_ONLY;
	fd = syscall(SYS_userfaultfd, flags);
	if (fd >= 0)
		return fd;
	err = -errno;
	if (err != -EPERM && err != -ENOSYS)
		return err;

	dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return err == -ENOSYS && errno == ENOENT ? -ENOSYS : -EPERM;
	fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
	if (fd < 0)
		fd = -errno;
	close(dev);
	return fd;
}

int cowmm__uffd_api(int fd, uint64_t features, uint64_t *ioctls)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };

	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	if (ioctls)
		*ioctls = api.ioctls;
	return 0;
}

/*
 * What the running kernel offers.  UFFDIO_API answers once per fd, so the
 * question goes to a throwaway fd: asking for features 0 returns them all.
 */
int cowmm__uffd_probe(uint64_t *features)
{
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	int fd = cowmm__uffd_open(false);
	int ret = 0;

	if (fd < 0)
		return fd;
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		ret = -errno;
	else
		*features = api.features;
	close(fd);
	return ret;
}

/*
 * Every page-table ioctl may fail with EAGAIN while the address space is
 * changing (an event is being delivered); the contract is to retry.
 *
 * The kernel counts an event as changing from before it is queued until
 * the thread that sent it runs again after a worker read it.  A worker
 * must go and read an event still queued; but when none is (the event was
 * read and its sender is about to run), it tries again for a while: a
 * thread that discards without pause sends its next event within
 * microseconds, and a worker that always went back to poll() first would
 * come back each time to a new event and never get its ioctl through
 * (exact/discard-storm).
 */
#define WORKER_RETRIES 2000

__thread bool cowmm__uffd_once;
__thread uint64_t cowmm__uffd_deadline;
__thread const atomic_bool *cowmm__uffd_held;

/*
 * An ioctl on @fd was refused for an event not read: ask again (after a
 * yield), or give up (-EAGAIN)?  A worker gives up when an event is queued,
 * to go and read it, and after WORKER_RETRIES; so does any caller that
 * can come back later when @bounded; one with patience once it runs out
 * (cowmm__uffd_impatient()).  Any other asks as long as it takes.
 * *@tries starts at 0.
 */
bool cowmm__uffd_again(int fd, unsigned *tries, bool bounded)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };

	if ((cowmm__in_worker || bounded) && ++*tries > WORKER_RETRIES)
		return false;
	if (cowmm__in_worker && poll(&pfd, 1, 0) != 0)
		return false;
	if (cowmm__uffd_impatient())
		return false;
	sched_yield();
	return true;
}

static int uffd_ioctl(int fd, unsigned long req, void *arg)
{
	unsigned tries = 0;

	for (;;) {
		if (ioctl(fd, req, arg) == 0)
			return 0;
		if (errno != EAGAIN)
			return -errno;
		if (cowmm__uffd_once || !cowmm__uffd_again(fd, &tries, false))
			return -EAGAIN;
	}
}

int cowmm__uffd_register(int fd, uintptr_t start, size_t len, uint64_t mode,
			 uint64_t *ioctls)
{
	struct uffdio_register reg = {
		.range = { .start = start, .len = len },
		.mode = mode,
	};
	int ret = uffd_ioctl(fd, UFFDIO_REGISTER, &reg);

	if (ret == 0 && ioctls)
		*ioctls = reg.ioctls;
	return ret;
}

void (*cowmm__unregistered)(uintptr_t start, size_t len);

int cowmm__uffd_unregister(int fd, uintptr_t start, size_t len)
{
	struct uffdio_range range = { .start = start, .len = len };
	void (*fn)(uintptr_t, size_t);
	int ret = uffd_ioctl(fd, UFFDIO_UNREGISTER, &range);

	fn = __atomic_load_n(&cowmm__unregistered, __ATOMIC_ACQUIRE);
	if (cowmm__unlikely(fn != NULL) && !ret)
		fn(start, len);
	return ret;
}

/* @wake only matters when clearing: the kernel refuses WP | DONTWAKE. */
int cowmm__uffd_wp(int fd, uintptr_t start, size_t len, bool protect,
		   bool wake)
{
	struct uffdio_writeprotect wp = {
		.range = { .start = start, .len = len },
		.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP
			: wake	? 0
				: UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
	};

	return uffd_ioctl(fd, UFFDIO_WRITEPROTECT, &wp);
}

/*
 * Is [@start, @start + @len) one mapping registered with a userfaultfd, and
 * no event of ours unread?  Asked once, waiting for nothing, changing
 * nothing: UFFDIO_CONTINUE on anonymous memory finds the mapping first
 * (-ENOENT where none registered holds the whole range), then refuses while
 * an event is not read (-EAGAIN), and only then finds it cannot continue
 * there (-EINVAL): 0 for that.
 */
int cowmm__uffd_range_probe(int fd, uintptr_t start, size_t len)
{
	struct uffdio_continue c = {
		.range = { .start = start, .len = len },
		.mode = UFFDIO_CONTINUE_MODE_DONTWAKE,
	};

	if (!ioctl(fd, UFFDIO_CONTINUE, &c))
		return 0;
	return errno == EINVAL ? 0 : -errno;
}

int cowmm__uffd_wake(int fd, uintptr_t start, size_t len)
{
	struct uffdio_range range = { .start = start, .len = len };

	return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

/*
 * Install a new page at @dst holding @src's bytes (page aligned), into a
 * missing PTE only (-EEXIST otherwise); @wp: write-protected.
 */
int cowmm__uffd_copy(int fd, uintptr_t dst, const void *src, size_t len,
		     bool wp, bool wake)
{
	struct uffdio_copy copy = {
		.dst = dst,
		.src = (uintptr_t)src,
		.len = len,
		.mode = (wake ? 0 : UFFDIO_COPY_MODE_DONTWAKE) |
			(wp ? UFFDIO_COPY_MODE_WP : 0),
	};

	return uffd_ioctl(fd, UFFDIO_COPY, &copy);
}

/*
 * Map zeros at @dst (a missing PTE).  UFFDIO_ZEROPAGE refuses a PTE that
 * holds a uffd-wp marker (-EEXIST, where UFFDIO_COPY accepts it), which
 * would leave the faulting thread looping: then a zeroed page is copied.
 */
int cowmm__uffd_zeropage(int fd, uintptr_t dst, size_t len, bool wake)
{
	static const unsigned char zero[4096] __attribute__((aligned(4096)));
	struct uffdio_zeropage zp = {
		.range = { .start = dst, .len = len },
		.mode = wake ? 0 : UFFDIO_ZEROPAGE_MODE_DONTWAKE,
	};
	int ret = uffd_ioctl(fd, UFFDIO_ZEROPAGE, &zp);
	size_t off;

	for (off = 0; ret == -EEXIST && off < len; off += sizeof(zero)) {
		ret = cowmm__uffd_copy(fd, dst + off, zero, sizeof(zero), false,
				       wake);
		if (ret == -EEXIST && len == sizeof(zero))
			break; /* really there: another fault filled it */
		if (ret == -EEXIST)
			ret = 0;
	}
	return ret;
}

/* Make @dst (a missing PTE) raise SIGBUS when touched: a fault that can
 * never be resolved with the right bytes. */
int cowmm__uffd_poison(int fd, uintptr_t dst, size_t len, bool wake)
{
	struct uffdio_poison p = {
		.range = { .start = dst, .len = len },
		.mode = wake ? 0 : UFFDIO_POISON_MODE_DONTWAKE,
	};

	return uffd_ioctl(fd, UFFDIO_POISON, &p);
}

/*
 * Hand the page at @src over to @dst (a missing PTE of a registered range)
 * without copying.  The kernel refuses pinned pages with -EBUSY.
 */
int cowmm__uffd_move(int fd, uintptr_t dst, const void *src, size_t len,
		     bool wake)
{
	struct uffdio_move mv = {
		.dst = dst,
		.src = (uintptr_t)src,
		.len = len,
		.mode = wake ? 0 : UFFDIO_MOVE_MODE_DONTWAKE,
	};

	return uffd_ioctl(fd, UFFDIO_MOVE, &mv);
}

/* Read @npages pagemap entries from @start into @out. */
int cowmm__pagemap_read(int fd, uintptr_t start, size_t npages, uint64_t *out)
{
	size_t want = npages * sizeof(*out), done = 0;
	off_t off = (off_t)(start / 4096) * sizeof(*out);

	while (done < want) {
		ssize_t n = pread(fd, (char *)out + done, want - done,
				  off + done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		done += n;
	}
	return 0;
}

/*
 * The 2 MiB at @start: COWMM_HUGE_NO unless one present huge page maps
 * all of it, else COWMM_HUGE_PROTECTED (uffd-wp set) or COWMM_HUGE_WRITABLE.
 * One PAGEMAP_SCAN (Linux 6.7; needs no privilege); COWMM_HUGE_NO when it
 * fails.
 */
int cowmm__pagemap_huge(int fd, uintptr_t start)
{
	struct page_region v[2] = { { 0 } };
	struct pm_scan_arg a = {
		.size = sizeof(a),
		.start = start,
		.end = start + (2UL << 20),
		.vec = (uintptr_t)v,
		.vec_len = ARRAY_SIZE(v),
		.category_mask = PAGE_IS_HUGE | PAGE_IS_PRESENT,
		.return_mask = PAGE_IS_HUGE | PAGE_IS_WRITTEN,
	};

	if (ioctl(fd, PAGEMAP_SCAN, &a) != 1 || v[0].start != start ||
	    v[0].end != a.end)
		return COWMM_HUGE_NO;
	return v[0].categories & PAGE_IS_WRITTEN ? COWMM_HUGE_WRITABLE
						 : COWMM_HUGE_PROTECTED;
}
