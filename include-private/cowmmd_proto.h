/* SPDX-License-Identifier: MIT */
/*
 * The wire protocol between cowmmd and the processes that talk to it: a
 * client library (cowmm_attach_daemon()) and cowmmctl.  One AF_UNIX
 * SOCK_SEQPACKET connection each; every message is one datagram that starts
 * with struct cowmmd_hdr, whose len is the datagram's length.  Integers are
 * in host byte order: both ends are on the same machine.
 *
 *   client -> daemon   HELLO (+ SCM_RIGHTS: userfaultfd, pidfd)
 *   daemon -> client   WELCOME (status, client id)
 *   client -> daemon   DETACH
 *   daemon -> client   BYE (the daemon closed the userfaultfd)
 *
 *   ctl    -> daemon   CTL: flags, then up to COWMMD_CTL_ARGS arguments,
 *                      each NUL-terminated ("list", "snapshot 3", ...)
 *   daemon -> ctl      REPLY: status (0 or a negative errno), then text
 *                      (or JSON with COWMMD_CTL_JSON), not NUL-terminated
 *
 * Not part of the public API; cowmmd and libcowmm are built together.
 */
#ifndef COWMMD_PROTO_H
#define COWMMD_PROTO_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define COWMMD_MAGIC 0x444d5743u /* "CWMD" */
#define COWMMD_VERSION 1
#define COWMMD_MAX_RANGES 16
#define COWMMD_NAME_MAX 32
#define COWMMD_CTL_MAX 1024   /* a CTL request, all of it */
#define COWMMD_CTL_ARGS 8
#define COWMMD_REPLY_MAX 65536
#define COWMMD_CTL_JSON 1u

enum cowmmd_type {
	COWMMD_HELLO = 1,
	COWMMD_WELCOME = 2,
	COWMMD_DETACH = 3,
	COWMMD_BYE = 4,
	COWMMD_CTL = 5,
	COWMMD_REPLY = 6,
};

struct cowmmd_hdr {
	uint32_t magic;
	uint16_t version;
	uint16_t type;
	uint32_t len; /* of the whole datagram */
	uint32_t reserved;
};

struct cowmmd_range {
	uint64_t addr;
	uint64_t len;
};

struct cowmmd_hello {
	struct cowmmd_hdr h;
	char name[COWMMD_NAME_MAX]; /* NUL-padded */
	uint32_t nranges;
	uint32_t reserved;
	struct cowmmd_range ranges[]; /* nranges of them */
};

struct cowmmd_welcome {
	struct cowmmd_hdr h;
	int32_t status;
	uint32_t id;
};

struct cowmmd_ctl {
	struct cowmmd_hdr h;
	uint32_t flags;
	char args[]; /* NUL-terminated strings, back to back */
};

struct cowmmd_reply {
	struct cowmmd_hdr h;
	int32_t status;
	char text[];
};

/* Where cowmmd listens unless told otherwise. */
#define COWMMD_SOCKET_ENV "COWMMD_SOCKET"
#define COWMMD_SOCKET_ROOT "/run/cowmmd.sock"
#define COWMMD_SOCKET_USER "cowmmd.sock" /* in $XDG_RUNTIME_DIR */

/*
 * The socket path: $COWMMD_SOCKET, else /run/cowmmd.sock for root, else
 * $XDG_RUNTIME_DIR/cowmmd.sock, else $HOME/.cowmmd.sock: never a directory
 * another user may write, where it could take the path first (/tmp was).
 * Without $HOME either, /tmp/cowmmd-<uid>.sock, whose listener cowmmctl
 * and cowmm_attach_daemon() check before they trust it.
 */
static inline const char *cowmmd_default_socket(char *buf, size_t n)
{
	const char *env = getenv(COWMMD_SOCKET_ENV);
	const char *run = getenv("XDG_RUNTIME_DIR");
	const char *home = getenv("HOME");

	if (env && *env)
		snprintf(buf, n, "%s", env);
	else if (geteuid() == 0)
		snprintf(buf, n, "%s", COWMMD_SOCKET_ROOT);
	else if (run && *run)
		snprintf(buf, n, "%s/%s", run, COWMMD_SOCKET_USER);
	else if (home && *home == '/')
		snprintf(buf, n, "%s/.%s", home, COWMMD_SOCKET_USER);
	else
		snprintf(buf, n, "/tmp/cowmmd-%u.sock", (unsigned)geteuid());
	return buf;
}

#endif
