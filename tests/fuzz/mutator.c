// SPDX-License-Identifier: MIT
/*
 * libFuzzer custom mutator for fuzz-format: mutate the snapshot file's
 * structure, then make its checksums right again, so that inputs get past
 * the CRC32C checks into the chunk logic.
 *
 * One mutation per call: libFuzzer's own byte-level one (LLVMFuzzerMutate),
 * a header field, a chunk field, or the chunk list (drop, duplicate, swap,
 * add a chunk, cut a chunk's pages), each field set to a value that
 * matters: the region's page counts, 2^52 + k (which wrapped), page
 * numbers at and past chunk boundaries, all ones.  Then, in 15 calls of 16,
 * the fix-up: each chunk's CRC over its bitmap and the pages it has, the
 * header's and the trailer's CRC, and (mostly) the chunk indices and the
 * trailer's counts, as the reader will count them.  Without a fix-up now
 * and then the checks themselves stay fuzzed.  Built only with libFuzzer
 * (scripts/fuzz.sh); the format is libcowmm/format.c's.
 */
#include <endian.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096
#define HDR 64
#define CHDR 88
#define TRL 32
#define CHUNK_PAGES 512
#define CHUNK_MAGIC 0x4b4e4843u

size_t LLVMFuzzerMutate(uint8_t *data, size_t size, size_t max_size);
size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size,
			       unsigned int seed);

static uint64_t rng;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static uint32_t crc32c(uint32_t crc, const void *buf, size_t n)
{
	static uint32_t table[256];
	const unsigned char *p = buf;

	if (!table[1]) {
		for (uint32_t i = 0; i < 256; i++) {
			uint32_t c = i;

			for (int j = 0; j < 8; j++)
				c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
			table[i] = c;
		}
	}
	crc = ~crc;
	while (n--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

static uint32_t get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return le32toh(v);
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return le64toh(v);
}

static void put32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static void put64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

static unsigned popcount64(const uint8_t *bitmap)
{
	unsigned i, n = 0;

	for (i = 0; i < 64; i++)
		n += __builtin_popcount(bitmap[i]);
	return n;
}

/* Page counts and page numbers that matter to the reader. */
static uint64_t interesting_pages(void)
{
	static const uint64_t v[] = {
		0,
		1,
		64,
		65,
		511,
		512,
		1024,
		1040,
		1536,
		(1ULL << 52) + 64,
		(1ULL << 52) + 1040,
		1ULL << 52,
		(1ULL << 53) + 512,
		(1ULL << 63) + 512,
		UINT64_MAX,
		UINT64_MAX - 511,
		UINT32_MAX + 1ULL,
		(UINT32_MAX + 1ULL) * 512,
	};

	return rnd() % 4 ? v[rnd() % (sizeof(v) / sizeof(v[0]))] : rnd();
}

/* Where the chunks lie, walked as the reader walks them. */
struct layout {
	size_t off[64], len[64]; /* each chunk: header + the pages it has */
	unsigned n;
};

static void walk(const uint8_t *d, size_t size, struct layout *l)
{
	size_t off = HDR;

	l->n = 0;
	if (size < HDR + TRL)
		return;
	while (l->n < 64 && off + CHDR <= size - TRL) {
		uint32_t stored = get32(d + off + 16);
		size_t avail = (size - TRL - off - CHDR) / PAGE;
		size_t pages = stored < avail ? stored : avail;

		l->off[l->n] = off;
		l->len[l->n] = CHDR + pages * PAGE;
		l->n++;
		off += CHDR + pages * PAGE;
	}
}

/* A fresh, valid, empty file for a region of @npages. */
static size_t skeleton(uint8_t *d, size_t max_size, uint64_t npages)
{
	if (max_size < HDR + TRL)
		return 0;
	memset(d, 0, HDR + TRL);
	memcpy(d, "COWMMSNP", 8);
	put32(d + 8, 1);
	put32(d + 12, PAGE);
	put64(d + 16, npages * PAGE);
	put64(d + 24, npages);
	put32(d + 32, CHUNK_PAGES);
	memcpy(d + HDR, "COWMMEND", 8);
	return HDR + TRL;
}

static void mutate_header(uint8_t *d)
{
	uint64_t pages;

	switch (rnd() % 6) {
	case 0: /* a page count that wraps into a region's size */
		pages = rnd() % 2 ? 64 : 1040;
		put64(d + 16, pages * PAGE);
		put64(d + 24, pages + ((rnd() % 4 + 1) << (50 + rnd() % 14)));
		break;
	case 1:
		put64(d + 24, interesting_pages());
		break;
	case 2:
		put64(d + 16, interesting_pages() * PAGE +
				      (rnd() % 8 ? 0 : rnd() % PAGE));
		break;
	case 3:
		put32(d + 12, rnd() % 2 ? 1u << (rnd() % 32) : (uint32_t)rnd());
		break;
	case 4:
		put32(d + 32, rnd() % 2 ? 1u << (rnd() % 32) : (uint32_t)rnd());
		break;
	default:
		/* the version, or the flags */
		put32(d + (rnd() % 2 ? 8 : 36), (uint32_t)rnd() % 3);
		break;
	}
}

static void mutate_chunk(uint8_t *c, size_t len)
{
	unsigned bit;

	switch (rnd() % 6) {
	case 0:
		put64(c + 8,
		      interesting_pages() & (rnd() % 4 ? ~511ULL : ~0ULL));
		break;
	case 1: /* stored: the bitmap's count, off by one, or anything */
		put32(c + 16, popcount64(c + 24) + (uint32_t)(rnd() % 3) - 1);
		if (rnd() % 4 == 0)
			put32(c + 16, rnd() % 2 ? 513 : (uint32_t)rnd());
		break;
	case 2: /* a bit moves: same count, another page */
		bit = rnd() % CHUNK_PAGES;
		c[24 + bit / 8] ^= 1u << (bit % 8);
		bit = rnd() % CHUNK_PAGES;
		c[24 + bit / 8] ^= 1u << (bit % 8);
		break;
	case 3: /* a high bit (past a small region's end) */
		bit = 64 + rnd() % (CHUNK_PAGES - 64);
		c[24 + bit / 8] |= 1u << (bit % 8);
		put32(c + 16, popcount64(c + 24));
		break;
	case 4:
		put32(c + 4, (uint32_t)interesting_pages());
		break;
	default: /* a page's bytes */
		if (len > CHDR)
			c[CHDR + rnd() % (len - CHDR)] ^= 1u << (rnd() % 8);
		break;
	}
}

/* Move the bytes from @at on by @delta (inserting or removing). */
static size_t shift(uint8_t *d, size_t size, size_t max_size, size_t at,
		    long delta)
{
	if (delta > 0 && size + (size_t)delta > max_size)
		return size;
	memmove(d + at + delta, d + at, size - at);
	return size + delta;
}

static size_t mutate_chunks(uint8_t *d, size_t size, size_t max_size,
			    struct layout *l)
{
	size_t i = l->n ? rnd() % l->n : 0, at, pages, k;
	uint64_t first;

	switch (l->n ? rnd() % 5 : 3) {
	case 0: /* drop chunk i */
		at = l->off[i];
		memmove(d + at, d + at + l->len[i], size - at - l->len[i]);
		return size - l->len[i];
	case 1: /* duplicate chunk i */
		at = l->off[i];
		if (size + l->len[i] > max_size)
			return size;
		memmove(d + at + l->len[i], d + at, size - at);
		return size + l->len[i];
	case 2: /* cut the last page of chunk i, or add one */
		at = l->off[i] + l->len[i];
		if (rnd() % 2 && l->len[i] > CHDR)
			return shift(d, size, max_size, at, -PAGE);
		if (size + PAGE > max_size)
			return size;
		size = shift(d, size, max_size, at, PAGE);
		memset(d + at, (int)rnd(), PAGE);
		return size;
	case 3: /* a new chunk, after the last, or anywhere */
		pages = 1 + rnd() % 3;
		at = l->n ? l->off[l->n - 1] + l->len[l->n - 1] : HDR;
		first = l->n ? get64(d + l->off[l->n - 1] + 8) + CHUNK_PAGES
			     : 0;
		if (rnd() % 4 == 0)
			first = interesting_pages() & ~511ULL;
		if (at > size || size + CHDR + pages * PAGE > max_size)
			return size;
		size = shift(d, size, max_size, at, CHDR + pages * PAGE);
		memset(d + at, 0, CHDR);
		put32(d + at, CHUNK_MAGIC);
		put64(d + at + 8, first);
		put32(d + at + 16, pages);
		for (k = 0; k < pages; k++) {
			unsigned bit = rnd() % CHUNK_PAGES;

			if (rnd() % 2)
				bit %= 64; /* within a small region */
			while (d[at + 24 + bit / 8] >> (bit % 8) & 1)
				bit = (bit + 1) % CHUNK_PAGES;
			d[at + 24 + bit / 8] |= 1u << (bit % 8);
		}
		memset(d + at + CHDR, (int)(rnd() | 1), pages * PAGE);
		return size;
	default: /* swap chunk i and the next */
		if (i + 1 >= l->n ||
		    l->len[i] + l->len[i + 1] > 2 * CHDR + 2 * PAGE)
			return size;
		{
			uint8_t tmp[2 * CHDR + 2 * PAGE];
			size_t a = l->len[i], b = l->len[i + 1];

			memcpy(tmp, d + l->off[i], a + b);
			memcpy(d + l->off[i], tmp + a, b);
			memcpy(d + l->off[i] + b, tmp, a);
		}
		return size;
	}
}

/* The checksums (and mostly the counts) as the reader will compute them. */
static void fix_up(uint8_t *d, size_t size, int counts)
{
	struct layout l;
	uint32_t chunks_crc = 0;
	uint64_t stored = 0;
	uint8_t *t;
	unsigned i;

	if (size < HDR)
		return;
	put32(d + 60, crc32c(0, d, 60));
	if (size < HDR + TRL)
		return;
	walk(d, size, &l);
	for (i = 0; i < l.n; i++) {
		uint8_t *c = d + l.off[i];

		if (counts) {
			put32(c, CHUNK_MAGIC);
			put32(c + 4, i);
		}
		put32(c + 20, crc32c(0, c + 24, l.len[i] - 24));
		chunks_crc = crc32c(chunks_crc, c + 20, 4);
		stored += get32(c + 16);
	}
	t = d + size - TRL;
	if (counts) {
		memcpy(t, "COWMMEND", 8);
		put64(t + 8, l.n);
		put64(t + 16, stored);
		put32(t + 24, chunks_crc);
	}
	put32(t + 28, crc32c(0, t, 28));
}

size_t LLVMFuzzerCustomMutator(uint8_t *data, size_t size, size_t max_size,
			       unsigned int seed)
{
	struct layout l;

	rng = seed * 0x9e3779b97f4a7c15ULL + 1;
	if (size < HDR + TRL || memcmp(data, "COWMMSNP", 8) != 0 ||
	    rnd() % 64 == 0) {
		if (rnd() % 4 == 0)
			return LLVMFuzzerMutate(data, size, max_size);
		size = skeleton(data, max_size, rnd() % 2 ? 64 : 1040);
		if (!size)
			return LLVMFuzzerMutate(data, size, max_size);
	}
	walk(data, size, &l);
	switch (rnd() % 8) {
	case 0:
	case 1:
		size = LLVMFuzzerMutate(data, size, max_size);
		break;
	case 2:
		mutate_header(data);
		break;
	case 3:
	case 4:
		if (l.n) {
			unsigned i = rnd() % l.n;

			mutate_chunk(data + l.off[i], l.len[i]);
			break;
		}
		/* fall through */
	default:
		size = mutate_chunks(data, size, max_size, &l);
		break;
	}
	if (rnd() % 16)
		fix_up(data, size, rnd() % 8 != 0);
	return size;
}
