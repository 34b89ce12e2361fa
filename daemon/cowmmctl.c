// SPDX-License-Identifier: MIT
/*
 * cowmmctl: talk to cowmmd.  One request per run; the daemon renders the
 * answer (text, or JSON with --json) and this prints it.
 */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cowmmd_proto.h"

/*
 * Print what the daemon sent; it never reaches the terminal raw.  Text:
 * anything but printable ASCII, newline and tab as \xNN.  JSON: control
 * characters as \u00NN (the daemon escapes them itself; an impostor may
 * not), UTF-8 as it is.
 */
static void put_escaped(FILE *f, const char *buf, size_t n, bool json)
{
	size_t i;

	for (i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)buf[i];

		if (ch == '\n' || ch == '\t' || (ch >= 0x20 && ch < 0x7f) ||
		    (json && ch >= 0x80))
			fputc(ch, f);
		else if (json)
			fprintf(f, "\\u%04x", ch);
		else
			fprintf(f, "\\x%02x", ch);
	}
}

static void usage(FILE *f)
{
	char def[108];

	fprintf(f,
		"usage: cowmmctl [--socket PATH] [--json] COMMAND [ARGS]\n"
		"\n"
		"commands:\n"
		"  list                        clients, their regions and "
		"snapshots\n"
		"  snapshot CLIENT             take a snapshot now; waits "
		"until written\n"
		"  schedule CLIENT SECONDS [KEEP]\n"
		"                              a snapshot every SECONDS (0: "
		"none),\n"
		"                              keeping the last KEEP\n"
		"  stats                       the daemon's numbers\n"
		"  ping                        is the daemon there?\n"
		"\n"
		"CLIENT is an id from 'list' (all digits) or a client's name\n"
		"(never all digits; a name shared by two clients is refused).\n"
		"  -s, --socket PATH  the daemon's socket (default %s)\n"
		"  -j, --json         answer in JSON\n",
		cowmmd_default_socket(def, sizeof(def)));
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char req[COWMMD_CTL_MAX];
	struct cowmmd_ctl *m = (struct cowmmd_ctl *)req;
	struct cowmmd_reply *r;
	struct ucred cred;
	socklen_t clen = sizeof(cred);
	char path[108];
	size_t len = sizeof(*m);
	unsigned flags = 0;
	ssize_t n;
	int opt, fd, i;

	cowmmd_default_socket(path, sizeof(path));
	while ((opt = getopt_long(argc, argv, "+s:jh", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			snprintf(path, sizeof(path), "%s", optarg);
			break;
		case 'j':
			flags |= COWMMD_CTL_JSON;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind == argc || argc - optind > COWMMD_CTL_ARGS) {
		usage(stderr);
		return 2;
	}
	for (i = optind; i < argc; i++) {
		size_t a = strlen(argv[i]) + 1;

		if (len + a > sizeof(req)) {
			fprintf(stderr, "cowmmctl: request too long\n");
			return 2;
		}
		memcpy(req + len, argv[i], a);
		len += a;
	}
	m->h = (struct cowmmd_hdr){ COWMMD_MAGIC, COWMMD_VERSION, COWMMD_CTL,
				    (uint32_t)len, 0 };
	m->flags = flags;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "cowmmctl: socket path too long\n");
		return 2;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1); /* length checked */
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int err = errno;

		fprintf(stderr, "cowmmctl: cannot reach cowmmd at %s: %s%s\n",
			path, strerror(err),
			err == ENOENT || err == ECONNREFUSED
				? " (is cowmmd running? start it, or pass "
				  "--socket)"
				: err == EACCES ? " (the socket is 0600: run "
						  "as the daemon's user)"
						: "");
		return 1;
	}
	/* Only a daemon of our own user (or root) hears us and is believed:
	 * anyone may listen on a path in /tmp first. */
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0) {
		fprintf(stderr, "cowmmctl: SO_PEERCRED: %s\n", strerror(errno));
		return 1;
	}
	if (cred.uid != 0 && cred.uid != geteuid()) {
		fprintf(stderr,
			"cowmmctl: %s is served by uid %u (pid %d), neither "
			"root nor us: refused\n",
			path, (unsigned)cred.uid, (int)cred.pid);
		return 1;
	}
	if (send(fd, req, len, MSG_NOSIGNAL) != (ssize_t)len) {
		fprintf(stderr, "cowmmctl: send: %s\n", strerror(errno));
		return 1;
	}
	r = malloc(COWMMD_REPLY_MAX);
	if (!r) {
		fprintf(stderr, "cowmmctl: out of memory\n");
		return 1;
	}
	/* A snapshot answers when its files are written: no time limit. */
	do
		n = recv(fd, r, COWMMD_REPLY_MAX, 0);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		fprintf(stderr, "cowmmctl: no answer from cowmmd: %s\n",
			n ? strerror(errno) : "it closed the connection");
		return 1;
	}
	if ((size_t)n < sizeof(*r) || r->h.magic != COWMMD_MAGIC ||
	    r->h.type != COWMMD_REPLY || r->h.len != (size_t)n) {
		fprintf(stderr, "cowmmctl: malformed answer from cowmmd\n");
		return 1;
	}
	put_escaped(r->status ? stderr : stdout, r->text,
		    (size_t)n - sizeof(*r), flags & COWMMD_CTL_JSON);
	if (r->status && !(flags & COWMMD_CTL_JSON))
		fprintf(stderr, "cowmmctl: %s\n", strerror(-r->status));
	i = r->status ? 1 : 0;
	free(r);
	close(fd);
	return i;
}
