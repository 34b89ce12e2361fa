// SPDX-License-Identifier: MIT
/*
 * The snapshot file format: versioned, checksummed, sparse.
 *
 *   header    64 bytes  "COWMMSNP", version, page size, region size,
 *                       page count, pages per chunk, CRC32C of the header
 *   chunk     *         one per run of 512 pages holding any non-zero page:
 *                       "CHNK", index, first page, pages stored, CRC32C
 *                       (of bitmap and data), a 64-byte bitmap of the pages
 *                       stored, then those pages, 4 KiB each
 *   trailer   32 bytes  "COWMMEND", chunk count, pages stored, CRC32C of
 *                       the chunks' CRCs, CRC32C of the trailer
 *
 * All integers are little-endian.  Pages that read as zero are not stored,
 * so a region never populated costs 96 bytes.  A reader checks everything
 * (every checksum, every count, the trailer) before it changes a single
 * byte of the target region.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cowmm_i.h"

#define FILE_MAGIC "COWMMSNP"
#define END_MAGIC "COWMMEND"
#define CHUNK_MAGIC 0x4b4e4843u /* "CHNK" */
#define FILE_VERSION 1
#define CHUNK_PAGES 512
#define BITMAP_BYTES (CHUNK_PAGES / 8)

struct file_header {
	char magic[8];
	uint32_t version;
	uint32_t page_size;
	uint64_t region_size;
	uint64_t npages;
	uint32_t chunk_pages;
	uint32_t flags;
	uint8_t reserved[20];
	uint32_t crc; /* of the bytes before it */
};

struct chunk_header {
	uint32_t magic;
	uint32_t index;
	uint64_t first_page;
	uint32_t stored;
	uint32_t crc; /* of the bitmap and the data */
	uint8_t bitmap[BITMAP_BYTES];
};

struct file_trailer {
	char magic[8];
	uint64_t nchunks;
	uint64_t stored;
	uint32_t chunks_crc;
	uint32_t crc; /* of the bytes before it */
};

_Static_assert(sizeof(struct file_header) == 64, "file header ABI");
_Static_assert(sizeof(struct chunk_header) == 88, "chunk header ABI");
_Static_assert(sizeof(struct file_trailer) == 32, "file trailer ABI");

/* ------------------------------------------------------------------------ */
/* CRC32C (Castagnoli), with the SSE4.2 instruction where the CPU has it */

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;
static bool crc_hw;

static void crc_init(void)
{
	uint32_t i, j, c;

	for (i = 0; i < 256; i++) {
		for (c = i, j = 0; j < 8; j++)
			c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
		crc_table[i] = c;
	}
#if defined(__x86_64__)
	crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t
crc_hw_update(uint32_t crc, const unsigned char *p, size_t n)
{
	uint64_t c = crc;

	for (; n >= 8; n -= 8, p += 8) {
		uint64_t w;

		memcpy(&w, p, 8);
		c = __builtin_ia32_crc32di(c, w);
	}
	crc = (uint32_t)c;
	for (; n; n--)
		crc = __builtin_ia32_crc32qi(crc, *p++);
	return crc;
}
#endif

static uint32_t crc32c(uint32_t crc, const void *buf, size_t n)
{
	const unsigned char *p = buf;

	pthread_once(&crc_once, crc_init);
	crc = ~crc;
#if defined(__x86_64__)
	if (crc_hw)
		return ~crc_hw_update(crc, p, n);
#endif
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* ------------------------------------------------------------------------ */
/* Writing */

static int write_all(int fd, struct iovec *iov, int cnt)
{
	while (cnt > 0) {
		ssize_t n = writev(fd, iov, cnt > IOV_MAX ? IOV_MAX : cnt);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		while (cnt > 0 && (size_t)n >= iov->iov_len) {
			n -= iov->iov_len;
			iov++;
			cnt--;
		}
		if (cnt > 0) {
			iov->iov_base = (char *)iov->iov_base + n;
			iov->iov_len -= n;
		}
	}
	return 0;
}

int cowmm_format_write(int fd, size_t len, cowmm_read_fn read, void *rdata,
		       cowmm_progress_fn progress, void *pdata)
{
	struct iovec iov[1 + CHUNK_PAGES];
	struct file_header h = { .magic = FILE_MAGIC };
	struct file_trailer t = { .magic = END_MAGIC };
	size_t npages = len / COWMM_PAGE_SIZE, first;
	unsigned char *buf;
	uint32_t chunks_crc = 0;
	uint64_t stored = 0, nchunks = 0, done = 0;
	int ret = 0;

	if (!read || !len || len % COWMM_PAGE_SIZE)
		return -EINVAL;
	if (fd < 0)
		return -EBADF;
	buf = aligned_alloc(COWMM_PAGE_SIZE, CHUNK_PAGES * COWMM_PAGE_SIZE);
	if (!buf)
		return -ENOMEM;

	h.version = htole32(FILE_VERSION);
	h.page_size = htole32(COWMM_PAGE_SIZE);
	h.region_size = htole64(len);
	h.npages = htole64(npages);
	h.chunk_pages = htole32(CHUNK_PAGES);
	h.crc = htole32(crc32c(0, &h, offsetof(struct file_header, crc)));
	iov[0] = (struct iovec){ &h, sizeof(h) };
	ret = write_all(fd, iov, 1);

	for (first = 0; !ret && first < npages; first += CHUNK_PAGES) {
		size_t n = npages - first < CHUNK_PAGES ? npages - first
							: CHUNK_PAGES;
		struct chunk_header c = { .magic = htole32(CHUNK_MAGIC) };
		int cnt = 1; /* iov[0]: the chunk header, then the pages */
		size_t i;

		ret = read(rdata, first * COWMM_PAGE_SIZE, buf,
			   n * COWMM_PAGE_SIZE);
		if (ret)
			break;
		for (i = 0; i < n; i++) {
			unsigned char *pg = buf + i * COWMM_PAGE_SIZE;

			if (cowmm__page_is_zero(pg))
				continue;
			c.bitmap[i / 8] |= 1u << (i % 8);
			iov[cnt++] = (struct iovec){ pg, COWMM_PAGE_SIZE };
		}
		done += n * COWMM_PAGE_SIZE;
		if (cnt > 1) {
			uint32_t crc = crc32c(0, c.bitmap, BITMAP_BYTES);

			for (i = 1; i < (size_t)cnt; i++)
				crc = crc32c(crc, iov[i].iov_base,
					     COWMM_PAGE_SIZE);
			c.index = htole32((uint32_t)nchunks);
			c.first_page = htole64(first);
			c.stored = htole32((uint32_t)(cnt - 1));
			c.crc = htole32(crc);
			chunks_crc = crc32c(chunks_crc, &c.crc, sizeof(c.crc));
			iov[0] = (struct iovec){ &c, sizeof(c) };
			ret = write_all(fd, iov, cnt);
			stored += cnt - 1;
			nchunks++;
		}
		if (!ret && progress)
			progress(done, len, pdata);
	}
	if (!ret) {
		t.nchunks = htole64(nchunks);
		t.stored = htole64(stored);
		t.chunks_crc = htole32(chunks_crc);
		t.crc = htole32(
			crc32c(0, &t, offsetof(struct file_trailer, crc)));
		iov[0] = (struct iovec){ &t, sizeof(t) };
		ret = write_all(fd, iov, 1);
	}
	free(buf);
	return ret;
}

struct snap_src {
	cowmm_snap_t *s;
	bool release;
};

static int snap_source(void *data, size_t off, void *buf, size_t len)
{
	struct snap_src *src = data;
	ssize_t got = cowmm_snap_read(src->s, off, buf, len);

	if (got != (ssize_t)len)
		return got < 0 ? (int)got : -EIO;
	if (src->release)
		cowmm__snap_drain(src->s, (off + len) >> COWMM_PAGE_SHIFT);
	return 0;
}

int cowmm_snap_stream(cowmm_snap_t *s, int fd, unsigned flags,
		      cowmm_progress_fn progress, void *data)
{
	struct snap_src src = { s, flags & COWMM_STREAM_RELEASE };
	int ret = cowmm__check_snap(s);

	if (ret)
		return ret;
	if (flags & ~COWMM_STREAM_RELEASE)
		return -EINVAL;
	if (fd < 0)
		return -EBADF;
	if (src.release && __atomic_load_n(&s->view, __ATOMIC_ACQUIRE))
		return -EBUSY; /* the view fills from the pages */
	ret = cowmm_format_write(fd, s->len, snap_source, &src, progress, data);
	if (src.release)
		cowmm_snap_release(s);
	return ret;
}

int cowmm_snap_write_progress(cowmm_snap_t *s, int fd,
			      cowmm_progress_fn progress, void *data)
{
	return cowmm_snap_stream(s, fd, 0, progress, data);
}

int cowmm_snap_write(cowmm_snap_t *s, int fd)
{
	return cowmm_snap_stream(s, fd, 0, NULL, NULL);
}

/* ------------------------------------------------------------------------ */
/* Reading */

/* All @n bytes at @off; -EBADMSG if the file ends first. */
int cowmm__read_at(int fd, void *buf, size_t n, off_t off)
{
	size_t done = 0;

	while (done < n) {
		ssize_t r = pread(fd, (char *)buf + done, n - done,
				  off + (off_t)done);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		if (r == 0)
			return -EBADMSG; /* truncated */
		done += r;
	}
	return 0;
}

/* A file the reader refuses: log what failed, with its value; -EBADMSG. */
__attribute__((format(printf, 1, 2)))
static int bad_file(const char *fmt, ...)
{
	char msg[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	cowmm__log(COWMM_LOG_WARNING, "snapshot file refused: %s", msg);
	return -EBADMSG;
}

static unsigned popcount_bitmap(const uint8_t *b)
{
	unsigned i, n = 0;

	for (i = 0; i < BITMAP_BYTES; i++)
		n += __builtin_popcount(b[i]);
	return n;
}

/* Page @pg of @r, where it is now; NULL if it left the region (unmapped). */
static unsigned char *load_page(cowmm_region_t *r, size_t pg)
{
	if (cowmm__hole(r, pg)) /* also read without the lock */
		return NULL;
	return (unsigned char *)cowmm__page_addr(r, pg);
}

/*
 * Make page @pg of @r read as zero, writing only where it does not already:
 * a page never populated stays so, and the write of a non-zero page goes
 * through the write fault like any other, so snapshots keep their bytes.
 */
static void load_zero(cowmm_region_t *r, size_t pg)
{
	unsigned char *p = load_page(r, pg);
	unsigned char vec;

	if (!p ||
	    (!r->origin && !cowmm__resident((uintptr_t)p, 1, &vec) && !vec))
		return;
	if (!cowmm__page_is_zero(p))
		memset(p, 0, COWMM_PAGE_SIZE);
}

/*
 * Walk the file; with @r NULL only check it (and with @index, note where
 * each stored page lies), else write each chunk's pages into @r (and zero
 * the pages the file does not store).
 *
 * @npages bounds every page number the file may name: the region's page
 * count, which is also the length of @index.  The header's own count was
 * checked equal to it before; nothing below trusts the file for a bound.
 * Offsets stay below @size (the file's, from fstat()) and page numbers
 * below @npages, so no sum below can wrap: @npages * 4096 is the region's
 * length, and each chunk is checked to lie inside the file before it is
 * read.
 */
static int load_pass(int fd, cowmm_region_t *r, uint64_t npages,
		     unsigned char *buf, off_t size, uint64_t *index)
{
	uint64_t nchunks = 0, stored = 0, next_first = 0, pg;
	uint32_t chunks_crc = 0;
	off_t off = sizeof(struct file_header);
	struct file_trailer t;
	int ret;

	if (size < (off_t)(sizeof(struct file_header) + sizeof(t)))
		return bad_file("%jd bytes, shorter than header and trailer",
				(intmax_t)size);
	while (off < size - (off_t)sizeof(t)) {
		struct chunk_header c;
		uint64_t first;
		unsigned n, i, k = 0;
		uint32_t crc;

		if (size - (off_t)sizeof(t) - off < (off_t)sizeof(c))
			return bad_file("%jd bytes at offset %jd: no room for "
					"a chunk header and the trailer",
					(intmax_t)(size - off), (intmax_t)off);
		ret = cowmm__read_at(fd, &c, sizeof(c), off);
		if (ret)
			return ret;
		first = le64toh(c.first_page);
		n = le32toh(c.stored);
		if (le32toh(c.magic) != CHUNK_MAGIC)
			return bad_file("chunk %" PRIu64 " at offset %jd: "
					"magic %#x",
					nchunks, (intmax_t)off,
					le32toh(c.magic));
		if (le32toh(c.index) != nchunks)
			return bad_file("chunk %" PRIu64 ": index %u",
					nchunks, le32toh(c.index));
		if (first % CHUNK_PAGES || first < next_first ||
		    first >= npages)
			return bad_file("chunk %" PRIu64 ": first page %" PRIu64
					" (next free %" PRIu64 ", %" PRIu64
					" pages, %u per chunk)",
					nchunks, first, next_first, npages,
					CHUNK_PAGES);
		if (n == 0 || n > CHUNK_PAGES || popcount_bitmap(c.bitmap) != n)
			return bad_file("chunk %" PRIu64 ": %u pages stored, "
					"%u in its bitmap",
					nchunks, n, popcount_bitmap(c.bitmap));
		/* n <= CHUNK_PAGES: the product is at most 2 MiB. */
		if ((off_t)n * (off_t)COWMM_PAGE_SIZE >
		    size - (off_t)sizeof(t) - off - (off_t)sizeof(c))
			return bad_file("chunk %" PRIu64 " at offset %jd: %u "
					"pages, past the end (%jd bytes)",
					nchunks, (intmax_t)off, n,
					(intmax_t)size);
		/* first < npages, i < 512: no wrap. */
		for (i = 0; i < CHUNK_PAGES; i++)
			if ((c.bitmap[i / 8] >> (i % 8) & 1) &&
			    first + i >= npages)
				return bad_file("chunk %" PRIu64 ": page %"
						PRIu64 " stored, the region "
						"has %" PRIu64,
						nchunks, first + i, npages);
		ret = cowmm__read_at(fd, buf, (size_t)n * COWMM_PAGE_SIZE,
				     off + sizeof(c));
		if (ret)
			return ret;
		crc = crc32c(crc32c(0, c.bitmap, BITMAP_BYTES), buf,
			     (size_t)n * COWMM_PAGE_SIZE);
		if (crc != le32toh(c.crc))
			return bad_file("chunk %" PRIu64 ": CRC32C %#x, "
					"stored %#x",
					nchunks, crc, le32toh(c.crc));
		chunks_crc = crc32c(chunks_crc, &c.crc, sizeof(c.crc));
		for (i = 0; index && i < CHUNK_PAGES; i++)
			if (c.bitmap[i / 8] >> (i % 8) & 1)
				index[first + i] =
					(uint64_t)off + sizeof(c) +
					(uint64_t)k++ * COWMM_PAGE_SIZE;
		if (r) {
			/* Zero what lies between the stored chunks. */
			for (pg = next_first; pg < first; pg++)
				load_zero(r, pg);
			for (i = 0; i < CHUNK_PAGES && first + i < npages; i++) {
				unsigned char *p = load_page(r, first + i);

				if (!(c.bitmap[i / 8] >> (i % 8) & 1))
					load_zero(r, first + i);
				else if (p)
					memcpy(p, buf + (size_t)k * COWMM_PAGE_SIZE,
					       COWMM_PAGE_SIZE);
				k += c.bitmap[i / 8] >> (i % 8) & 1;
			}
		}
		next_first = first + CHUNK_PAGES;
		off += sizeof(c) + (off_t)n * COWMM_PAGE_SIZE;
		stored += n;
		nchunks++;
	}
	if (off != size - (off_t)sizeof(t))
		return bad_file("%jd bytes: the last chunk ends at %jd, "
				"the trailer does not follow it",
				(intmax_t)size, (intmax_t)off);
	ret = cowmm__read_at(fd, &t, sizeof(t), off);
	if (ret)
		return ret;
	if (memcmp(t.magic, END_MAGIC, 8) != 0 ||
	    le32toh(t.crc) != crc32c(0, &t, offsetof(struct file_trailer, crc)))
		return bad_file("trailer at offset %jd: bad magic or CRC32C",
				(intmax_t)off);
	if (le64toh(t.nchunks) != nchunks || le64toh(t.stored) != stored ||
	    le32toh(t.chunks_crc) != chunks_crc)
		return bad_file("trailer: %" PRIu64 " chunks, %" PRIu64
				" pages, chunk CRCs %#x; the file has %" PRIu64
				", %" PRIu64 ", %#x",
				le64toh(t.nchunks), le64toh(t.stored),
				le32toh(t.chunks_crc), nchunks, stored,
				chunks_crc);
	if (r)
		for (; next_first < npages; next_first++)
			load_zero(r, next_first);
	return 0;
}

int cowmm_region_load(cowmm_region_t *r, int fd, unsigned flags)
{
	struct file_header h;
	unsigned char *buf;
	struct stat st;
	uint32_t hcrc;
	int ret = cowmm__check_region(r);

	if (ret)
		return ret;
	if (flags & ~COWMM_LOAD_LAZY)
		return -EINVAL;
	if (fd < 0 || fstat(fd, &st) < 0)
		return -EBADF;
	if (!S_ISREG(st.st_mode))
		return -ESPIPE; /* checked whole before anything is written */
	ret = cowmm__read_at(fd, &h, sizeof(h), 0);
	if (ret == -EBADMSG)
		return bad_file("%jd bytes, shorter than its header",
				(intmax_t)st.st_size);
	if (ret)
		return ret;
	if (memcmp(h.magic, FILE_MAGIC, 8) != 0)
		return bad_file("no \"%s\" magic", FILE_MAGIC);
	hcrc = crc32c(0, &h, offsetof(struct file_header, crc));
	if (le32toh(h.crc) != hcrc)
		return bad_file("header CRC32C %#x, stored %#x", hcrc,
				le32toh(h.crc));
	if (le32toh(h.version) != FILE_VERSION) {
		cowmm__log(COWMM_LOG_WARNING,
			   "snapshot file refused: version %u, this library "
			   "reads %u",
			   le32toh(h.version), FILE_VERSION);
		return -EPROTONOSUPPORT;
	}
	if (le32toh(h.page_size) != COWMM_PAGE_SIZE ||
	    le32toh(h.chunk_pages) != CHUNK_PAGES || h.flags)
		return bad_file("page size %u, %u pages per chunk, flags %#x",
				le32toh(h.page_size), le32toh(h.chunk_pages),
				le32toh(h.flags));
	/*
	 * Divide, never multiply: npages * 4096 wraps in 64 bits, and a
	 * page count of 2^52 + k passed for a k-page region.
	 */
	if (le64toh(h.region_size) % COWMM_PAGE_SIZE ||
	    le64toh(h.npages) != le64toh(h.region_size) / COWMM_PAGE_SIZE)
		return bad_file("%" PRIu64 " pages for a region of %" PRIu64
				" bytes",
				le64toh(h.npages), le64toh(h.region_size));
	if (le64toh(h.region_size) != r->len) {
		cowmm__log(COWMM_LOG_WARNING,
			   "snapshot file refused: for a region of %" PRIu64
			   " bytes, this one has %zu",
			   le64toh(h.region_size), r->len);
		return le64toh(h.region_size) > r->len ? -EFBIG : -EINVAL;
	}
	if (le64toh(h.npages) != r->npages) /* both from r->len: never */
		return bad_file("%" PRIu64 " pages for a region of %zu",
				le64toh(h.npages), r->npages);

	buf = aligned_alloc(COWMM_PAGE_SIZE, CHUNK_PAGES * COWMM_PAGE_SIZE);
	if (!buf)
		return -ENOMEM;
	if (flags & COWMM_LOAD_LAZY) {
		uint64_t *index = calloc(r->npages, sizeof(*index));

		ret = index ? load_pass(fd, NULL, r->npages, buf, st.st_size,
					    index)
			    : -ENOMEM;
		free(buf);
		if (ret) {
			free(index);
			return ret;
		}
		return cowmm__lazy_start(r, fd, index); /* takes @index */
	}
	ret = load_pass(fd, NULL, r->npages, buf, st.st_size, NULL);
	if (!ret && r->lazy) {
		/* A lazy load under way: its pages first, then these over. */
		pthread_mutex_lock(&r->lock);
		ret = cowmm__lazy_finish_moving(r);
		pthread_mutex_unlock(&r->lock);
	}
	if (!ret)
		ret = load_pass(fd, r, r->npages, buf, st.st_size, NULL);
	free(buf);
	return ret;
}
