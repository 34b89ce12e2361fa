// SPDX-License-Identifier: MIT
/*
 * cowmmctl: talk to cowmmd.  One request per run; the daemon renders the
 * answer (text, or JSON with --json) and this prints it: the answer on
 * stdout, an error on stderr, or with --json every outcome as one JSON
 * object on stdout (an error as {"error": ..., "errno": ...}), so that
 * stdout stays machine-readable either way.
 *
 * A snapshot answers only once its files are written.  On a terminal
 * (stderr a tty), cowmmctl shows how far it got meanwhile: it asks the
 * daemon "list" on a second connection every half second and shows the
 * client's snapshot in flight ("writing": bytes done of total), or, before
 * the writing starts, how long it has waited.
 */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cowmmd_proto.h"

static bool json; /* --json */

/*
 * Print what the daemon sent; it never reaches the terminal raw.  Text:
 * anything but printable ASCII, newline and tab as \xNN.  JSON: control
 * characters as \u00NN (the daemon escapes them itself; an impostor may
 * not), UTF-8 as it is.
 */
static void put_escaped(FILE *f, const char *buf, size_t n, bool js)
{
	size_t i;

	for (i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)buf[i];

		if (ch == '\n' || ch == '\t' || (ch >= 0x20 && ch < 0x7f) ||
		    (js && ch >= 0x80))
			fputc(ch, f);
		else if (js)
			fprintf(f, "\\u%04x", ch);
		else
			fprintf(f, "\\x%02x", ch);
	}
}

/* A JSON string: quotes, backslashes and control characters escaped. */
static void put_jstr(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '"' || ch == '\\')
			fprintf(f, "\\%c", ch);
		else if (ch < 0x20 || ch == 0x7f)
			fprintf(f, "\\u%04x", ch);
		else
			fputc(ch, f);
	}
	fputc('"', f);
}

/*
 * Say why cowmmctl failed and return @status: "cowmmctl: MESSAGE" on
 * stderr, or with --json {"error": MESSAGE, "errno": @err} on stdout.
 */
static int fail(int status, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int fail(int status, int err, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (json) {
		fputs("{\"error\": ", stdout);
		put_jstr(stdout, msg);
		printf(", \"errno\": %d}\n", err);
	} else {
		fputs("cowmmctl: ", stderr);
		put_escaped(stderr, msg, strlen(msg), false);
		fputc('\n', stderr);
	}
	return status;
}

static void usage(FILE *f)
{
	char def[108];

	fprintf(f,
		"usage: cowmmctl [OPTION]... COMMAND [ARG]... [OPTION]...\n"
		"\n"
		"commands:\n"
		"  list                        clients, their regions and "
		"snapshots\n"
		"  snapshot CLIENT             take a snapshot now; waits "
		"until written\n"
		"                              (on a terminal, shows how far "
		"it got)\n"
		"  schedule CLIENT SECONDS [KEEP]\n"
		"                              a snapshot every SECONDS (0: "
		"none),\n"
		"                              keeping the last KEEP\n"
		"  stats                       the daemon's numbers\n"
		"  ping                        is the daemon there?\n"
		"\n"
		"CLIENT is an id from 'list' (all digits) or a client's name\n"
		"(never all digits; a name shared by two clients is refused).\n"
		"Options go before or after the command; '--' ends them.\n"
		"  -s, --socket PATH  the daemon's socket (default %s)\n"
		"  -j, --json         answer in JSON, errors too: one object "
		"on stdout,\n"
		"                     {\"error\": TEXT, \"errno\": N} when "
		"it failed\n"
		"  -h, --help         this text\n"
		"Exit status: 0 done, 1 failed, 2 bad usage.\n",
		cowmmd_default_socket(def, sizeof(def)));
}

/* ------------------------------------------------------------------------ */
/* Options, before or after the command */

struct opts {
	char path[108];
	const char *args[COWMMD_CTL_ARGS + 1];
	unsigned nargs;
	bool help;
	char bad[160]; /* the first usage error, said once --json is known */
};

static void bad(struct opts *o, const char *fmt, const char *arg)
{
	if (!o->bad[0])
		snprintf(o->bad, sizeof(o->bad), fmt, arg);
}

/* --NAME or an unambiguous prefix of it ("--js"); NULL if none. */
static const char *long_opt(const char *arg, size_t n)
{
	static const char *const names[] = { "socket", "json", "help" };
	const char *found = NULL;
	size_t i;

	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (strncmp(names[i], arg, n) != 0)
			continue;
		if (strlen(names[i]) == n)
			return names[i];
		if (found)
			return NULL;
		found = names[i];
	}
	return found;
}

/*
 * getopt_long(), with "+" or without, would either stop at the command
 * or take "schedule X -1"'s "-1" for an option; so by hand: -s PATH,
 * -sPATH, --socket PATH, --socket=PATH, -j, --json, -h, --help, short
 * ones bundled (-js PATH), anywhere; "--" ends them; "-" or "-5" is an
 * argument.
 */
static void parse(int argc, char **argv, struct opts *o)
{
	bool opts_end = false;
	int i;

	for (i = 1; i < argc; i++) {
		const char *a = argv[i], *val = NULL;

		if (opts_end || a[0] != '-' || !a[1] ||
		    (a[1] >= '0' && a[1] <= '9')) {
			if (o->nargs == COWMMD_CTL_ARGS)
				bad(o, "too many arguments (from '%s' on)", a);
			else
				o->args[o->nargs++] = a;
			continue;
		}
		if (!strcmp(a, "--")) {
			opts_end = true;
		} else if (a[1] == '-') {
			const char *eq = strchr(a, '=');
			size_t n = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
			const char *name = long_opt(a + 2, n);

			if (!name) {
				bad(o, "unknown option '%s'", a);
			} else if (!strcmp(name, "socket")) {
				if (eq)
					val = eq + 1;
				else if (i + 1 < argc)
					val = argv[++i];
				else
					bad(o, "%s needs a PATH", a);
			} else if (eq) {
				bad(o, "%s takes no value", a);
			} else if (!strcmp(name, "json")) {
				json = true;
			} else {
				o->help = true;
			}
		} else {
			for (a++; *a; a++) {
				if (*a == 'j') {
					json = true;
				} else if (*a == 'h') {
					o->help = true;
				} else if (*a == 's') {
					if (a[1])
						val = a + 1;
					else if (i + 1 < argc)
						val = argv[++i];
					else
						bad(o, "%s needs a PATH",
						    argv[i]);
					break;
				} else {
					char opt[3] = { '-', *a, '\0' };

					bad(o, "unknown option '%s'", opt);
					break;
				}
			}
		}
		if (val && strlen(val) >= sizeof(o->path))
			bad(o, "socket path too long: %s", val);
		else if (val)
			snprintf(o->path, sizeof(o->path), "%s", val);
	}
	if (!o->nargs && !o->help)
		bad(o, "%s", "no command given");
}

/* ------------------------------------------------------------------------ */
/* The daemon */

/*
 * Connect to the daemon at @path; only one of our own user (or root) is
 * believed: anyone may listen on a path in /tmp first.  The socket, or -1
 * once fail() said why (unless @quiet).
 */
static int connect_daemon(const char *path, bool quiet)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct ucred cred;
	socklen_t clen = sizeof(cred);
	int fd, err;

	memcpy(sa.sun_path, path, strlen(path) + 1); /* length checked */
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		err = errno;
		if (fd >= 0)
			close(fd);
		if (quiet)
			return -1;
		fail(1, err, "cannot reach cowmmd at %s: %s%s", path,
		     strerror(err),
		     err == ENOENT || err == ECONNREFUSED
			     ? " (is cowmmd running? start it, or pass "
			       "--socket)"
			     : err == EACCES ? " (the socket is 0600: run as "
					       "the daemon's user)"
					     : "");
		return -1;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) < 0) {
		err = errno;
		close(fd);
		if (!quiet)
			fail(1, err, "SO_PEERCRED on %s: %s", path,
			     strerror(err));
		return -1;
	}
	if (cred.uid != 0 && cred.uid != geteuid()) {
		close(fd);
		if (!quiet)
			fail(1, EPERM,
			     "%s is served by uid %u (pid %d), neither root "
			     "nor us: refused",
			     path, (unsigned)cred.uid, (int)cred.pid);
		return -1;
	}
	return fd;
}

/* Send a CTL request of @nargs arguments; 0 or -errno. */
static int send_ctl(int fd, const char *const *args, unsigned nargs,
		    unsigned flags)
{
	char req[COWMMD_CTL_MAX];
	struct cowmmd_ctl *m = (struct cowmmd_ctl *)req;
	size_t len = sizeof(*m);
	unsigned i;

	for (i = 0; i < nargs; i++) {
		size_t a = strlen(args[i]) + 1;

		if (len + a > sizeof(req))
			return -E2BIG;
		memcpy(req + len, args[i], a);
		len += a;
	}
	m->h = (struct cowmmd_hdr){ COWMMD_MAGIC, COWMMD_VERSION, COWMMD_CTL,
				    (uint32_t)len, 0 };
	m->flags = flags;
	if (send(fd, req, len, MSG_NOSIGNAL) != (ssize_t)len)
		return errno ? -errno : -EIO;
	return 0;
}

/* Receive a reply into @r (COWMMD_REPLY_MAX bytes): its length, or -errno
 * (-ECONNRESET: closed, -EBADMSG: not a reply). */
static ssize_t recv_reply(int fd, struct cowmmd_reply *r)
{
	ssize_t n;

	do
		n = recv(fd, r, COWMMD_REPLY_MAX, 0);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if (!n)
		return -ECONNRESET;
	if ((size_t)n < sizeof(*r) || r->h.magic != COWMMD_MAGIC ||
	    r->h.type != COWMMD_REPLY || r->h.len != (size_t)n)
		return -EBADMSG;
	return n;
}

/* ------------------------------------------------------------------------ */
/* Progress of a snapshot, on a terminal */

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * In the JSON of "list", the snapshot client @who (an id, or a name) is
 * writing: true with its bytes @done of @total, false when it writes none
 * (not yet, or no such client).  The daemon writes each client as
 * {"id": N, "name": "NAME", ..., "writing": {"seq": S, "done": D,
 * "total": T}}, names never holding a quote.
 */
static bool find_writing(const char *js, const char *who,
			 unsigned long long *done, unsigned long long *total)
{
	static const char key[] = "{\"id\": ";
	bool by_id = strspn(who, "0123456789") == strlen(who);
	size_t wlen = strlen(who);
	const char *c = strstr(js, key);

	while (c) {
		const char *next = strstr(c + 1, key);
		const char *name = strstr(c, "\"name\": \"");
		const char *w = strstr(c, "\"writing\": {");
		bool match;

		if (by_id)
			match = strtoul(c + sizeof(key) - 1, NULL, 10) ==
				strtoul(who, NULL, 10);
		else
			match = name && (!next || name < next) &&
				!strncmp(name + 9, who, wlen) &&
				name[9 + wlen] == '"';
		if (match) {
			w = w && (!next || w < next) ? strstr(w, "\"done\": ")
						     : NULL;
			if (!w)
				return false;
			*done = strtoull(w + 8, NULL, 10);
			w = strstr(w, "\"total\": ");
			*total = w ? strtoull(w + 9, NULL, 10) : 0;
			return w && *total;
		}
		c = next;
	}
	return false;
}

struct progress {
	int fd;          /* asks "list" every half second; -1 if it cannot */
	const char *who; /* the CLIENT argument */
	double t0;
	bool shown;
};

/* One line on stderr, drawn over the last: how far the snapshot got. */
static void progress_show(struct progress *p, struct cowmmd_reply *r)
{
	static const char *const list[] = { "list" };
	unsigned long long done = 0, total = 0;
	bool writing = false;
	ssize_t n = -1;

	if (p->fd >= 0 && !send_ctl(p->fd, list, 1, COWMMD_CTL_JSON)) {
		struct pollfd pfd = { .fd = p->fd, .events = POLLIN };

		if (poll(&pfd, 1, 1000) == 1)
			n = recv_reply(p->fd, r);
	}
	if (n > (ssize_t)sizeof(*r) && !r->status) {
		char *js = r->text;
		size_t len = (size_t)n - sizeof(*r);

		js[len < COWMMD_REPLY_MAX - sizeof(*r) ? len : len - 1] = '\0';
		writing = find_writing(js, p->who, &done, &total);
	} else if (p->fd >= 0) { /* no answer: only the time from now on */
		close(p->fd);
		p->fd = -1;
	}
	if (writing)
		fprintf(stderr,
			"\r\033[Kcowmmctl: snapshot of %s: %3.0f%% written "
			"(%.1f of %.1f MiB), %.1f s",
			p->who, 100.0 * (double)done / (double)total,
			(double)done / (1 << 20), (double)total / (1 << 20),
			now_s() - p->t0);
	else
		fprintf(stderr,
			"\r\033[Kcowmmctl: snapshot of %s: waiting for "
			"cowmmd, %.1f s",
			p->who, now_s() - p->t0);
	fflush(stderr);
	p->shown = true;
}

/*
 * Wait for the answer on @fd; on a terminal, show the snapshot's progress
 * meanwhile (first after half a second: a quick one shows nothing).
 */
static void wait_answer(int fd, const struct opts *o, struct cowmmd_reply *r)
{
	struct progress p = { -1, o->args[1], now_s(), false };
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	int ret;

	if (strcmp(o->args[0], "snapshot") != 0 || o->nargs != 2 ||
	    !isatty(STDERR_FILENO))
		return;
	p.fd = connect_daemon(o->path, true);
	while ((ret = poll(&pfd, 1, 500)) == 0 ||
	       (ret < 0 && errno == EINTR))
		if (!ret)
			progress_show(&p, r);
	if (p.shown)
		fputs("\r\033[K", stderr);
	if (p.fd >= 0)
		close(p.fd);
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	struct opts o = { .nargs = 0 };
	struct cowmmd_reply *r;
	char what[256];
	size_t off = 0;
	unsigned i;
	ssize_t n;
	int fd, ret;

	cowmmd_default_socket(o.path, sizeof(o.path));
	parse(argc, argv, &o);
	if (o.help) {
		usage(stdout);
		return 0;
	}
	if (o.bad[0]) {
		if (!json)
			usage(stderr);
		return fail(2, EINVAL, "%s (cowmmctl --help)", o.bad);
	}
	/* "snapshot alpha": what the messages say failed. */
	for (i = 0; i < o.nargs && off < sizeof(what); i++)
		off += (size_t)snprintf(what + off, sizeof(what) - off, "%s%s",
					i ? " " : "", o.args[i]);

	r = malloc(COWMMD_REPLY_MAX);
	if (!r)
		return fail(1, ENOMEM, "out of memory");
	fd = connect_daemon(o.path, false);
	if (fd < 0) {
		free(r);
		return 1;
	}
	ret = send_ctl(fd, o.args, o.nargs, json ? COWMMD_CTL_JSON : 0);
	if (ret) {
		free(r);
		close(fd);
		return ret == -E2BIG ? fail(2, E2BIG, "%s: request too long",
					    what)
				     : fail(1, -ret, "%s: sending to %s: %s",
					    what, o.path, strerror(-ret));
	}
	/* A snapshot answers when its files are written: no time limit. */
	wait_answer(fd, &o, r);
	n = recv_reply(fd, r);
	close(fd);
	if (n < 0) {
		free(r);
		return n == -EBADMSG
			       ? fail(1, EBADMSG,
				      "%s: malformed answer from cowmmd at %s",
				      what, o.path)
			       : fail(1, (int)-n,
				      "%s: no answer from cowmmd at %s: %s",
				      what, o.path,
				      n == -ECONNRESET
					      ? "it closed the connection"
					      : strerror((int)-n));
	}
	/*
	 * The daemon's answer: on stdout if it succeeded or is JSON (its
	 * errors then are {"error": ..., "errno": ...}); a text error on
	 * stderr, after what was asked.
	 */
	if (!r->status || json) {
		put_escaped(stdout, r->text, (size_t)n - sizeof(*r), json);
	} else {
		fprintf(stderr, "cowmmctl: %s: ", what);
		put_escaped(stderr, r->text, (size_t)n - sizeof(*r), false);
		if (n == (ssize_t)sizeof(*r) || r->text[n - sizeof(*r) - 1] !=
							'\n')
			fprintf(stderr, "%s%s\n",
				n == (ssize_t)sizeof(*r) ? "" : ": ",
				strerror(-r->status));
	}
	ret = r->status ? 1 : 0;
	free(r);
	return ret;
}
