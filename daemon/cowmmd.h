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

#include "cowmm.h"
#include "cowmmd_proto.h"

#ifndef ARRAY_SIZE
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#endif
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
struct hello_job;

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

struct client {
	struct conn *conn; /* NULL once its connection is gone */
	unsigned id;
	char name[COWMMD_NAME_MAX + 1];
	pid_t pid;
	uid_t uid;
	int uffd, pidfd;
	uv_poll_t uffd_poll, pidfd_poll;
	uv_timer_t timer, retry_timer;
	unsigned handles; /* libuv handles not yet closed */
	unsigned nregions;
	struct dregion r[COWMMD_MAX_RANGES];
	size_t npages;
	struct dsnap *snap; /* in flight */
	uint64_t seq;
	uint64_t period_ms;
	unsigned keep;
	uint64_t kept[KEEP_MAX]; /* sequence numbers on disk, oldest first */
	unsigned nkept;
	uint64_t retry[RETRY_MAX]; /* pages to unprotect after EAGAIN */
	unsigned nretry;
	bool gone, closing, bye;
	/* numbers for cowmmctl */
	uint64_t faults, copies, snaps_ok, snaps_failed, bytes;
	atomic_uint_fast64_t ev_started, ev_done; /* event batches */
	uint64_t last_pause_us, last_ms;
	int last_err;
	char last[PATH_MAX];
	struct client *next;
};

enum conn_kind { CONN_NEW, CONN_CLIENT, CONN_CTL };

struct conn {
	uv_poll_t poll;
	int fd;
	uid_t uid;
	pid_t pid;
	enum conn_kind kind;
	struct client *client;
	struct dsnap *waiting; /* a ctl waiting for this snapshot */
	struct hello_job *hello; /* its HELLO, being checked */
	uint64_t last_ns;      /* its last message: for the idle timeout */
	unsigned flags;
	bool closing;
	struct conn *next;
};

/* The daemon: one, defined in client.c. */
struct cowmmd_state {
	uv_loop_t *loop;
	uv_poll_t listen_poll;
	uv_signal_t sigint, sigterm;
	uv_timer_t idle_timer, backoff_timer;
	int dirfd; /* the snapshot directory, held open */
	bool activated; /* the socket came from systemd */
	uint64_t idle_ns;
	int listen_fd;
	char sock[108];
	char dir[PATH_MAX / 2];
	unsigned keep;
	uint64_t rate;
	unsigned next_id;
	unsigned signals;
	bool stopping;
	struct client *clients;
	struct conn *conns;
	uint64_t started;
	uint64_t run; /* start time, seconds since the epoch: in file names */
	uint64_t faults, copies, snaps_ok, snaps_failed, bytes;
	uint64_t refused;
	unsigned helpers; /* helper threads not yet exited */
};
extern struct cowmmd_state D;

/* reply.c: the log, and replies to cowmmctl (text or JSON) */
struct out {
	char *buf;
	size_t len, cap;
	bool json;
};
void cowmmd_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void cowmmd_log_lib(enum cowmm_log_level level, const char *msg, void *data);
void cowmmd_outf(struct out *o, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void cowmmd_out_jstr(struct out *o, const char *s);
void cowmmd_send_reply(struct conn *cn, int status, const struct out *o);
void cowmmd_reply_error(struct conn *cn, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* client.c: lifetimes */
void cowmmd_conn_close(struct conn *cn);
void cowmmd_client_finish(struct client *c);
void cowmmd_client_close(struct client *c, int why);
void cowmmd_maybe_exit(void);

/* fault.c: the client's userfaultfd, on the loop */
bool cowmmd_page_of(const struct dsnap *s, uint64_t addr, size_t *pg);
void cowmmd_abandon(struct client *c, int err, const char *why);
void cowmmd_on_uffd(uv_poll_t *h, int status, int events);
void cowmmd_on_pidfd(uv_poll_t *h, int status, int events);
int cowmmd_loop_wp(struct client *c, uint64_t addr, uint64_t len, bool on);

/*
 * freeze.c: a thread for work that may block on a client (ptrace, reading
 * its memory); the loop learns of its exit from a PIDFD_THREAD pidfd.
 */
struct helper {
	pthread_t th;
	int pidfd, err;
	uv_poll_t poll;
	uv_sem_t started;
	void (*run)(struct helper *h);	/* on the thread */
	void (*done)(struct helper *h); /* on the loop, once it exited */
	void *data;
	int result;
};
int cowmmd_helper_start(struct helper *h);
int cowmmd_check_registration(pid_t pid, const struct dregion *r, unsigned n);
int cowmmd_wp_retry(int uffd, uint64_t addr, uint64_t len, bool on,
		    uint64_t deadline);
void cowmmd_arm_thread(struct helper *h);

/* snapshot.c: snapshots, and the snapshot directory */
void cowmmd_reply_snapshot_error(struct conn *cn, struct client *c, int ret);
int cowmmd_start_snapshot(struct client *c, struct conn *waiter);
void cowmmd_prune(struct client *c);
void cowmmd_on_timer(uv_timer_t *t);
int cowmmd_open_dir(const char *dir);
void cowmmd_remove_stale(void);

/* hello.c */
void cowmmd_hello_forget(struct hello_job *job);
void cowmmd_welcome(struct conn *cn, int status, unsigned id);
void cowmmd_handle_hello(struct conn *cn, const struct cowmmd_hello *h,
			 size_t len, int *fds, unsigned nfds);

/* ctl.c */
bool cowmmd_parse_uint(const char *s, unsigned long max, unsigned long *v);
void cowmmd_handle_ctl(struct conn *cn, const struct cowmmd_ctl *m, size_t len);

/* socket.c */
void cowmmd_on_conn(uv_poll_t *h, int status, int events);
void cowmmd_on_listen(uv_poll_t *h, int status, int events);
void cowmmd_on_idle_timer(uv_timer_t *t);
void cowmmd_on_signal(uv_signal_t *h, int signum);
int cowmmd_listen_activated(void);
int cowmmd_listen_on(const char *path);

#endif
