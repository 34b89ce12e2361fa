// SPDX-License-Identifier: MIT
/*
 * The frame store: where preserved 4 KiB pages live.
 *
 * Frames come from chunks of 512 pages mapped in one go, so that a snapshot
 * of a busy region costs one VMA per 2 MiB of preserved data rather than one
 * per page, and every frame is page aligned (ready for UFFDIO_COPY/MOVE).
 * A chunk is unmapped as soon as its last frame is freed, so memory goes
 * back to the system when snapshots are released.
 *
 * A frame is shared by every snapshot that needed the same old bytes and is
 * freed after an RCU grace period once the last of them lets go, so that a
 * lock-free reader never copies from a freed page.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cowmm_i.h"

#define CHUNK_FRAMES 512
/* A frame map's leaf: COWMM_LEAF_SIZE frame pointers, one page. */
#define LEAF_BYTES (COWMM_LEAF_SIZE * sizeof(struct cowmm_frame *))
_Static_assert(LEAF_BYTES == COWMM_PAGE_SIZE, "a leaf is one page");
/*
 * Frames are populated 16 at a time (64 KiB) as a chunk's slots are first
 * handed out: one madvise instead of 16 page faults, at most 15 pages held
 * ahead of need.
 */
#define POPULATE_BATCH 16

struct cowmm_frame_chunk {
	struct cowmm_frame_pool *pool;
	struct cowmm_frame_chunk *prev, *next; /* in pool->partial */
	void *data;                            /* CHUNK_FRAMES pages */
	struct cowmm_frame *free;
	unsigned used;
	unsigned populated; /* slots below this have their page */
	struct cowmm_frame frames[CHUNK_FRAMES];
};

/*
 * The fault path allocates with mmap() only, never malloc(): in in-thread
 * mode it runs in a signal handler (inthread.c), where mmap() is safe.
 */
static void *page_alloc(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

static void page_free(void *p, size_t len)
{
	munmap(p, len);
}

static const unsigned char zero_page[COWMM_PAGE_SIZE]
	__attribute__((aligned(COWMM_PAGE_SIZE)));

struct cowmm_frame cowmm__zero_frame = { .refs = 1 };
struct cowmm_frame cowmm__gone_frame = { .refs = 1 };

int cowmm__frame_pool_init(struct cowmm_frame_pool *pool,
			   atomic_uint_fast64_t *live)
{
	pool->partial = NULL;
	pool->live = live;
	atomic_init(&pool->fail_next, 0);
	return -pthread_mutex_init(&pool->lock, NULL);
}

static void partial_add(struct cowmm_frame_pool *pool,
			struct cowmm_frame_chunk *c)
{
	c->prev = NULL;
	c->next = pool->partial;
	if (c->next)
		c->next->prev = c;
	pool->partial = c;
}

static void partial_del(struct cowmm_frame_pool *pool,
			struct cowmm_frame_chunk *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		pool->partial = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = c->next = NULL;
}

/* Every frame must have been put, and every grace period waited for. */
void cowmm__frame_pool_fini(struct cowmm_frame_pool *pool)
{
	struct cowmm_frame_chunk *c;

	pthread_mutex_lock(&pool->lock); /* after the last call_rcu free */
	while ((c = pool->partial)) {
		partial_del(pool, c);
		munmap(c->data, CHUNK_FRAMES * COWMM_PAGE_SIZE);
		page_free(c, sizeof(*c));
	}
	pthread_mutex_unlock(&pool->lock);
	pthread_mutex_destroy(&pool->lock);
}

static struct cowmm_frame_chunk *chunk_new(struct cowmm_frame_pool *pool)
{
	struct cowmm_frame_chunk *c = page_alloc(sizeof(*c)); /* zeroed */
	unsigned i;

	if (!c)
		return NULL;
	c->data = mmap(NULL, CHUNK_FRAMES * COWMM_PAGE_SIZE,
		       PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (c->data == MAP_FAILED) {
		page_free(c, sizeof(*c));
		return NULL;
	}
	/*
	 * 2 MiB of anonymous memory is huge-page aligned since Linux 6.7: with
	 * THP "always" the first populate would allocate a whole huge page
	 * in the fault path (milliseconds here; bench/README.md, levers).  Best
	 * effort: without THP the call fails and nothing changes.
	 */
	madvise(c->data, CHUNK_FRAMES * COWMM_PAGE_SIZE, MADV_NOHUGEPAGE);
	c->pool = pool;
	for (i = CHUNK_FRAMES; i-- > 0;) {
		c->frames[i].chunk = c;
		c->frames[i].slot = i;
		c->frames[i].next_free = c->free;
		c->free = &c->frames[i];
	}
	return c;
}

/* A frame with one reference, its content undefined; NULL without memory. */
struct cowmm_frame *cowmm__frame_alloc(struct cowmm_frame_pool *pool)
{
	struct cowmm_frame_chunk *c;
	struct cowmm_frame *f;
	unsigned fail = atomic_load_explicit(&pool->fail_next,
					     memory_order_relaxed);

	while (cowmm__unlikely(fail))
		if (atomic_compare_exchange_weak(&pool->fail_next, &fail,
						 fail - 1))
			return NULL; /* injected by a test */
	pthread_mutex_lock(&pool->lock);
	c = pool->partial;
	if (!c) {
		c = chunk_new(pool);
		if (!c) {
			pthread_mutex_unlock(&pool->lock);
			return NULL;
		}
		partial_add(pool, c);
	}
	f = c->free;
	c->free = f->next_free;
	if (++c->used == CHUNK_FRAMES)
		partial_del(pool, c);
	if (f->slot >= c->populated) {
		/* Slots are first handed out in order: populate ahead. */
		madvise((char *)c->data + (size_t)c->populated * COWMM_PAGE_SIZE,
			POPULATE_BATCH * COWMM_PAGE_SIZE, MADV_POPULATE_WRITE);
		c->populated += POPULATE_BATCH;
	}
	pthread_mutex_unlock(&pool->lock);

	f->next_free = NULL;
	atomic_store_explicit(&f->refs, 1,
			      memory_order_relaxed);
	atomic_fetch_add_explicit(pool->live, 1, memory_order_relaxed);
	return f;
}

/* Return a frame's page to its chunk; unmap the chunk once it is empty. */
static void frame_release(struct cowmm_frame *f)
{
	struct cowmm_frame_chunk *c = f->chunk;
	struct cowmm_frame_pool *pool = c->pool;
	bool unmap = false;

	pthread_mutex_lock(&pool->lock);
	if (c->used-- == CHUNK_FRAMES)
		partial_add(pool, c);
	f->next_free = c->free;
	c->free = f;
	if (c->used == 0 && (pool->partial != c || c->next)) {
		/* Keep one empty chunk around to absorb alloc/free churn. */
		partial_del(pool, c);
		unmap = true;
	}
	pthread_mutex_unlock(&pool->lock);
	if (unmap) {
		munmap(c->data, CHUNK_FRAMES * COWMM_PAGE_SIZE);
		page_free(c, sizeof(*c));
	}
}

/* Give a frame back at once: only for frames no reader can have seen. */
void cowmm__frame_free_now(struct cowmm_frame *f)
{
	atomic_fetch_sub_explicit(f->chunk->pool->live, 1,
				  memory_order_relaxed);
	frame_release(f);
}

void *cowmm__frame_data(const struct cowmm_frame *f)
{
	if (!cowmm__frame_real(f))
		return (void *)zero_page;
	return (char *)f->chunk->data + (size_t)f->slot * COWMM_PAGE_SIZE;
}

void cowmm__frame_get(struct cowmm_frame *f)
{
	if (!cowmm__frame_real(f))
		return;
	atomic_fetch_add_explicit(&f->refs, 1,
				  memory_order_relaxed);
}

static void frame_free_rcu(struct rcu_head *head)
{
	cowmm__rcu_after_grace();
	frame_release(caa_container_of(head, struct cowmm_frame, rcu));
}

void cowmm__frame_put(struct cowmm_frame *f)
{
	if (!cowmm__frame_real(f))
		return;
	if (atomic_fetch_sub_explicit(&f->refs, 1,
				      memory_order_acq_rel) == 1) {
		/* No longer held: counted out now, its page freed later. */
		atomic_fetch_sub_explicit(f->chunk->pool->live, 1,
					  memory_order_relaxed);
		urcu_bp_call_rcu(&f->rcu, frame_free_rcu);
	}
}

/* ------------------------------------------------------------------------ */
/* Frame maps */

static size_t fmap_ndir(size_t npages)
{
	return (npages + COWMM_LEAF_SIZE - 1) >> COWMM_LEAF_SHIFT;
}

int cowmm__fmap_init(struct cowmm_frame_map *m, size_t npages)
{
	m->npages = npages;
	m->dir = calloc(fmap_ndir(npages), sizeof(*m->dir));
	return m->dir ? 0 : -ENOMEM;
}

void cowmm__fmap_fini(struct cowmm_frame_map *m)
{
	size_t d, i, ndir = fmap_ndir(m->npages);

	if (!m->dir)
		return;
	for (d = 0; d < ndir; d++) {
		struct cowmm_frame **leaf = m->dir[d];

		if (!leaf)
			continue;
		for (i = 0; i < COWMM_LEAF_SIZE; i++)
			if (leaf[i])
				cowmm__frame_put(leaf[i]);
		page_free(leaf, LEAF_BYTES);
	}
	free(m->dir);
	m->dir = NULL;
}

/* The frame of page @pg, or NULL; a lock-free read (acquire). */
struct cowmm_frame *cowmm__fmap_get(const struct cowmm_frame_map *m,
				    size_t pg)
{
	struct cowmm_frame **leaf;

	leaf = __atomic_load_n(&m->dir[pg >> COWMM_LEAF_SHIFT],
			       __ATOMIC_ACQUIRE);
	if (!leaf)
		return NULL;
	return __atomic_load_n(&leaf[pg & (COWMM_LEAF_SIZE - 1)],
			       __ATOMIC_ACQUIRE);
}

/*
 * Publish @f (whose reference the map takes over) as the content of @pg.
 * Writers are serialised by the owner (the region lock); readers may run.
 */
int cowmm__fmap_set(struct cowmm_frame_map *m, size_t pg,
		    struct cowmm_frame *f)
{
	struct cowmm_frame ***slot = &m->dir[pg >> COWMM_LEAF_SHIFT];
	struct cowmm_frame **leaf = *slot;

	if (!leaf) {
		leaf = page_alloc(LEAF_BYTES);
		if (!leaf)
			return -ENOMEM;
		__atomic_store_n(slot, leaf, __ATOMIC_RELEASE);
	}
	__atomic_store_n(&leaf[pg & (COWMM_LEAF_SIZE - 1)], f,
			 __ATOMIC_RELEASE);
	return 0;
}
