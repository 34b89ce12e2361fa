/* SPDX-License-Identifier: MIT */
/*
 * cowmmd's shared declarations: the daemon is one libuv loop (cowmmd.c:
 * sockets, clients, faults, signals, timers) plus snapshot streams that run
 * on libuv's thread pool (stream.c).
 */
#ifndef COWMMD_H
#define COWMMD_H

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "cowmmd_proto.h"

#define PAGE 4096UL
#define KEEP_MAX 64
#define MAX_CLIENTS 64
#define MAX_CLIENTS_PER_PID 4
#define MAX_CONNS 512	  /* every connection, clients included */
#define MAX_IDLE_PER_UID 32 /* connections that are not clients */
#define MAX_IDLE_PER_PID 8
#define IDLE_TIMEOUT_S 10 /* for a connection with nothing in flight */
#define MAX_WAITERS 8
#define RETRY_MAX 4096
#define MAX_REMOVED 256 /* discards recorded during one snapshot */

/* Where a page of a snapshot in flight stands. */
enum { PG_NONE, PG_STREAMED, PG_PRESERVED };

struct conn;
struct helper;

struct dregion {
	uint64_t addr, len;
	size_t first; /* index of its first page among the client's pages */
	bool gone;    /* unmapped or moved: left out of later snapshots */
};

/*
 * One snapshot being written.  The loop thread preserves pages on write
 * faults; a pool thread streams the file.  Each page's state moves once,
 * from PG_NONE, by compare-and-swap: to PG_PRESERVED when the fault
 * handler has the old bytes in frames[pg] (published before the swap and
 * before the page is unprotected), or to PG_STREAMED when the stream read
 * the page while it was still protected.
 */
struct dsnap {
	struct client *c;
	uint64_t seq;
	pid_t pid;
	int pidfd, uffd;
	unsigned nregions;
	struct dregion r[COWMMD_MAX_RANGES];
	size_t npages;
	_Atomic uint8_t *state;
	void **frames;
	atomic_int err;		   /* set to abandon the snapshot */
	atomic_uint_fast64_t done; /* bytes streamed */
	atomic_uint_fast64_t copies;
	uint64_t total;
	uint64_t rate; /* bytes per second the stream may write; 0: any */
	/*
	 * Ranges the client discarded while this snapshot was in flight, and
	 * the client's counts of event batches read and dispatched: a page
	 * the stream read live may have been zapped by a discard whose event
	 * was already read; the stream waits until that batch is dispatched,
	 * then looks here.
	 */
	uint64_t removed[MAX_REMOVED][2];
	atomic_uint nremoved;
	atomic_uint_fast64_t *ev_started, *ev_done;
	int fds[COWMMD_MAX_RANGES];
	/* Names in the snapshot directory, which dirfd holds open. */
	int dirfd;
	char tmpdir[NAME_MAX + 1], finaldir[NAME_MAX + 1];
	uint64_t t_start, pause_ns, t_stream, t_end;
	int result;
	/*
	 * Pages whose write faults wait for the copier thread, which reads
	 * their old bytes (process_vm_readv) so that the loop thread never
	 * touches the client's memory.  The loop queues a page at most once
	 * (queued[], loop thread only), so npages slots are enough.
	 */
	pthread_mutex_t qlock;
	pthread_cond_t qcond;
	uint64_t *queue;
	size_t qhead, qtail;
	bool qstop;
	uint8_t *queued;
	struct helper *copier; /* NULL until armed, and once it exited */
	uv_work_t work;
	struct conn *waiters[MAX_WAITERS];
	unsigned nwaiters;
};

/* Streams a snapshot; runs on the thread pool (stream.c). */
void stream_snapshot(uv_work_t *w);
int check_discards(struct dsnap *s, uint64_t addr, size_t len,
		   const bool *live);
void remove_snapshot_dir(int dirfd, const char *name, unsigned nregions);
uint64_t now_ns(void);

#endif
