// SPDX-License-Identifier: MIT
/*
 * Connections and clients: their lifetime, from accept to the close
 * callbacks that free them.
 */
#include <dirent.h>
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cowmm.h"
#include "cowmmd.h"

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif

/* The daemon (cowmmd.h). */
struct cowmmd_state D = {
	.keep = 3, .next_id = 1, .idle_ns = IDLE_TIMEOUT_S * 1000000000ull
};

/* ------------------------------------------------------------------------ */
/* Connections and clients: lifetime */


static void conn_closed(uv_handle_t *h)
{
	struct conn *cn = h->data, **pp;

	for (pp = &D.conns; *pp; pp = &(*pp)->next)
		if (*pp == cn) {
			*pp = cn->next;
			break;
		}
	close(cn->fd);
	free(cn);
	cowmmd_maybe_exit();
}

void cowmmd_conn_close(struct conn *cn)
{
	struct dsnap *s = cn->waiting;
	unsigned i;

	if (cn->closing)
		return;
	cn->closing = true;
	if (s) /* stop waiting: the snapshot goes on */
		for (i = 0; i < s->nwaiters; i++)
			if (s->waiters[i] == cn)
				s->waiters[i] = NULL;
	if (cn->client) {
		cn->client->conn = NULL;
		cowmmd_client_close(cn->client, -ECONNRESET);
	}
	if (cn->hello)
		cowmmd_hello_forget(cn->hello);
	uv_close((uv_handle_t *)&cn->poll, conn_closed);
}

static void client_handle_closed(uv_handle_t *h)
{
	struct client *c = h->data, **pp;

	if (--c->handles)
		return;
	for (pp = &D.clients; *pp; pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	free(c);
	cowmmd_maybe_exit();
}

/*
 * The end of a client: once no snapshot of it is in flight, close the
 * userfaultfd, which unregisters its ranges and wakes any waiting writer.
 */
void cowmmd_client_finish(struct client *c)
{
	struct cowmmd_hdr bye = { COWMMD_MAGIC, COWMMD_VERSION, COWMMD_BYE,
				  sizeof(bye), 0 };

	if (c->closing)
		return;
	c->closing = true;
	close(c->uffd);
	close(c->pidfd);
	c->uffd = c->pidfd = -1;
	if (c->conn && c->bye)
		(void)send(c->conn->fd, &bye, sizeof(bye),
			   MSG_NOSIGNAL | MSG_DONTWAIT);
	if (c->conn) {
		c->conn->client = NULL;
		cowmmd_conn_close(c->conn);
		c->conn = NULL;
	}
	uv_close((uv_handle_t *)&c->uffd_poll, client_handle_closed);
	uv_close((uv_handle_t *)&c->pidfd_poll, client_handle_closed);
	uv_close((uv_handle_t *)&c->timer, client_handle_closed);
	uv_close((uv_handle_t *)&c->retry_timer, client_handle_closed);
}

void cowmmd_client_close(struct client *c, int why)
{
	if (c->gone)
		return;
	c->gone = true;
	if (why != -ECANCELED)
		cowmmd_say("client %u (%s, pid %d): gone (%s)", c->id, c->name,
			   c->pid, strerror(-why));
	else
		cowmmd_say("client %u (%s, pid %d): detached", c->id, c->name,
			   c->pid);
	if (c->snap) { /* finish when the stream returns */
		int zero = 0;

		atomic_compare_exchange_strong(&c->snap->err, &zero, why);
		return;
	}
	cowmmd_client_finish(c);
}

void cowmmd_maybe_exit(void)
{
	if (!D.stopping || D.clients || D.conns)
		return;
	if (!uv_is_closing((uv_handle_t *)&D.sigint)) {
		uv_close((uv_handle_t *)&D.sigint, NULL);
		uv_close((uv_handle_t *)&D.sigterm, NULL);
		uv_close((uv_handle_t *)&D.idle_timer, NULL);
		uv_close((uv_handle_t *)&D.backoff_timer, NULL);
	}
}

