// SPDX-License-Identifier: MIT
/*
 * CTL: cowmmctl's requests.
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

/* ------------------------------------------------------------------------ */
/* CTL: cowmmctl */

/*
 * CLIENT: all digits is an id, anything else a name, which must be
 * unique.  NULL with *err set (-ENOENT, -ENOTUNIQ) if none fits.
 */
static struct client *find_client(const char *arg, int *err)
{
	struct client *c, *found = NULL;
	bool id = *arg && strspn(arg, "0123456789") == strlen(arg);
	unsigned long n = id ? strtoul(arg, NULL, 10) : 0;

	*err = -ENOENT;
	for (c = D.clients; c; c = c->next) {
		if (c->gone || (id ? c->id != n : strcmp(c->name, arg) != 0))
			continue;
		if (found) {
			*err = -ENOTUNIQ;
			return NULL;
		}
		found = c;
	}
	return found;
}

static void no_client(struct conn *cn, const char *arg, int err)
{
	if (err == -ENOTUNIQ)
		cowmmd_reply_error(cn, err,
				   "more than one client is named %s: "
				   "use its id (cowmmctl list)",
				   arg);
	else
		cowmmd_reply_error(cn, err, "no client %s", arg);
}

static void out_client(struct out *o, const struct client *c, bool first)
{
	const struct dsnap *s = c->snap;
	char sched[32];
	unsigned i;

	if (o->json) {
		cowmmd_outf(o,
			    "%s{\"id\": %u, \"name\": \"%s\", \"pid\": %d, "
			    "\"uid\": %u, \"regions\": [",
			    first ? "" : ", ", c->id, c->name, (int)c->pid,
			    (unsigned)c->uid);
		for (i = 0; i < c->nregions; i++)
			cowmmd_outf(
			    o, "%s{\"addr\": \"0x%llx\", \"len\": %llu%s}",
			    i ? ", " : "", (unsigned long long)c->r[i].addr,
			    (unsigned long long)c->r[i].len,
			    c->r[i].gone ? ", \"gone\": true" : "");
		cowmmd_outf(
		    o,
		    "], \"schedule_s\": %.3f, \"keep\": %u, \"snapshots\": "
		    "%llu, \"failed\": %llu, \"faults\": %llu, \"copies\": "
		    "%llu, \"bytes\": %llu, \"last\": ",
		    (double)c->period_ms / 1000, c->keep,
		    (unsigned long long)c->snaps_ok,
		    (unsigned long long)c->snaps_failed,
		    (unsigned long long)c->faults,
		    (unsigned long long)c->copies,
		    (unsigned long long)c->bytes);
		cowmmd_out_jstr(o, c->last);
		cowmmd_outf(o,
			    ", \"last_pause_us\": %llu, \"last_ms\": %llu, "
			    "\"last_error\": %d",
			    (unsigned long long)c->last_pause_us,
			    (unsigned long long)c->last_ms, -c->last_err);
		if (s)
			cowmmd_outf(
			    o,
			    ", \"writing\": {\"seq\": %llu, \"done\": %llu, "
			    "\"total\": %llu}",
			    (unsigned long long)s->seq,
			    (unsigned long long)atomic_load(&s->done),
			    (unsigned long long)s->total);
		cowmmd_outf(o, "}");
		return;
	}
	if (c->period_ms)
		snprintf(sched, sizeof(sched), "%.0fs/%u",
			 (double)c->period_ms / 1000, c->keep);
	else
		snprintf(sched, sizeof(sched), "-/%u", c->keep);
	cowmmd_outf(o, "%-4u %-16s %-8d %3u  %10.1f  %-9s %5llu %6llu  %s\n",
		    c->id, c->name, (int)c->pid, c->nregions,
		    (double)c->npages * PAGE / (1 << 20), sched,
		    (unsigned long long)c->snaps_ok,
		    (unsigned long long)c->snaps_failed,
		    c->last[0] ? c->last : "-");
	if (s)
		cowmmd_outf(o, "     writing snapshot %llu: %.0f%%\n",
			    (unsigned long long)s->seq,
			    s->total ? 100.0 * (double)atomic_load(&s->done) /
					   (double)s->total
				     : 0.0);
}

static void ctl_list(struct conn *cn, struct out *o, const char **argv)
{
	struct client *c;
	bool first = true;

	(void)argv;
	if (o->json)
		cowmmd_outf(o, "{\"clients\": [");
	else
		cowmmd_outf(o, "%-4s %-16s %-8s %3s  %10s  %-9s %5s %6s  %s\n",
			    "ID", "NAME", "PID", "RGN", "MIB", "EVERY/KEEP",
			    "SNAPS", "FAILED", "LAST");
	for (c = D.clients; c; c = c->next) {
		if (c->gone)
			continue;
		out_client(o, c, first);
		first = false;
	}
	if (o->json)
		cowmmd_outf(o, "]}\n");
	cowmmd_send_reply(cn, 0, o);
}

static void ctl_stats(struct conn *cn, struct out *o, const char **argv)
{
	struct client *c;
	unsigned n = 0;
	double up = (double)(now_ns() - D.started) / 1e9;

	(void)argv;
	for (c = D.clients; c; c = c->next)
		n += !c->gone;
	if (o->json)
		cowmmd_outf(
		    o,
		    "{\"pid\": %d, \"uptime_s\": %.1f, \"socket\": \"%s\", "
		    "\"dir\": ",
		    (int)getpid(), up, D.sock);
	else
		cowmmd_outf(
		    o, "cowmmd pid %d, up %.1f s, socket %s, snapshots in ",
		    (int)getpid(), up, D.sock);
	if (o->json)
		cowmmd_out_jstr(o, D.dir);
	else
		cowmmd_outf(o, "%s\n", D.dir);
	cowmmd_outf(
	    o,
	    o->json ? ", \"clients\": %u, \"snapshots\": %llu, \"failed\": "
		      "%llu, \"bytes\": %llu, \"faults\": %llu, "
		      "\"copies\": %llu, \"refused\": %llu}\n"
		    : "clients %u\nsnapshots %llu\nfailed %llu\nbytes "
		      "written %llu\nwrite faults %llu\npages copied "
		      "%llu\nrefused connections %llu\n",
	    n, (unsigned long long)D.snaps_ok,
	    (unsigned long long)D.snaps_failed, (unsigned long long)D.bytes,
	    (unsigned long long)D.faults, (unsigned long long)D.copies,
	    (unsigned long long)D.refused);
	cowmmd_send_reply(cn, 0, o);
}

bool cowmmd_parse_uint(const char *s, unsigned long max, unsigned long *v)
{
	char *end;

	if (!*s || *s == '-')
		return false;
	errno = 0;
	*v = strtoul(s, &end, 10);
	return !errno && !*end && *v <= max;
}

static void ctl_ping(struct conn *cn, struct out *o, const char **argv)
{
	(void)argv;
	cowmmd_outf(o, o->json ? "{\"pong\": true}\n" : "pong\n");
	cowmmd_send_reply(cn, 0, o);
}

static void ctl_snapshot(struct conn *cn, struct out *o, const char **argv)
{
	struct client *c;
	int ret;

	(void)o;
	c = find_client(argv[1], &ret);
	if (!c) {
		no_client(cn, argv[1], ret);
		return;
	}
	ret = cowmmd_start_snapshot(c, cn);
	if (ret)
		cowmmd_reply_snapshot_error(cn, c, ret);
}

static void ctl_schedule(struct conn *cn, struct out *o, const char **argv)
{
	unsigned long v, keep;
	struct client *c;
	int ret;

	c = find_client(argv[1], &ret);
	if (!c) {
		no_client(cn, argv[1], ret);
		return;
	}
	keep = c->keep;
	if (!cowmmd_parse_uint(argv[2], 86400 * 365, &v) ||
	    (argv[3] &&
	     (!cowmmd_parse_uint(argv[3], KEEP_MAX - 1, &keep) || !keep))) {
		cowmmd_reply_error(cn, -EINVAL,
				   "usage: schedule CLIENT SECONDS [KEEP]; "
				   "SECONDS 0 stops it, KEEP 1 to %d",
				   KEEP_MAX - 1);
		return;
	}
	c->period_ms = v * 1000;
	c->keep = (unsigned)keep;
	if (v)
		uv_timer_start(&c->timer, cowmmd_on_timer, c->period_ms,
			       c->period_ms);
	else
		uv_timer_stop(&c->timer);
	cowmmd_prune(c);
	if (o->json)
		cowmmd_outf(o,
			    "{\"id\": %u, \"schedule_s\": %lu, \"keep\": %u}\n",
			    c->id, v, c->keep);
	else if (v)
		cowmmd_outf(
		    o,
		    "client %u: a snapshot every %lu s, keeping the last "
		    "%u\n",
		    c->id, v, c->keep);
	else
		cowmmd_outf(o, "client %u: no schedule, keeping the last %u\n",
			    c->id, c->keep);
	cowmmd_send_reply(cn, 0, o);
}

/*
 * cowmmctl's requests: NAME and from min to max arguments after it; argv
 * is NULL-terminated, so an optional one reads as NULL when absent.
 */
static const struct {
	const char *name;
	unsigned min, max;
	void (*run)(struct conn *cn, struct out *o, const char **argv);
	const char *usage;
} commands[] = {
	{ "ping", 0, 0, ctl_ping, "ping" },
	{ "list", 0, 0, ctl_list, "list" },
	{ "stats", 0, 0, ctl_stats, "stats" },
	{ "snapshot", 1, 1, ctl_snapshot, "snapshot CLIENT" },
	{ "schedule", 2, 3, ctl_schedule, "schedule CLIENT SECONDS [KEEP]" },
};

void cowmmd_handle_ctl(struct conn *cn, const struct cowmmd_ctl *m, size_t len)
{
	const char *argv[COWMMD_CTL_ARGS + 1] = { NULL };
	char text[COWMMD_REPLY_MAX - 64];
	struct out o = { text, 0, sizeof(text), false };
	size_t off = 0, alen;
	unsigned argc = 0, i;
	char n[32];

	cn->kind = CONN_CTL;
	cn->flags = m->flags & COWMMD_CTL_JSON;
	o.json = cn->flags & COWMMD_CTL_JSON;
	alen = len - sizeof(*m);
	/* NUL-terminated arguments filling the message exactly. */
	while (off < alen) {
		const char *a = m->args + off;
		const char *nul = memchr(a, '\0', alen - off);

		if (!nul || argc == COWMMD_CTL_ARGS) {
			cowmmd_reply_error(cn, -EPROTO, "malformed request");
			cowmmd_conn_close(cn);
			return;
		}
		argv[argc++] = a;
		off += (size_t)(nul - a) + 1;
	}
	if (!argc) {
		cowmmd_reply_error(cn, -EINVAL, "empty request");
		return;
	}
	if (cn->waiting) {
		cowmmd_reply_error(cn, -EBUSY, "a request is already waiting");
		return;
	}
	for (i = 0; i < ARRAY_SIZE(commands); i++) {
		if (strcmp(argv[0], commands[i].name) != 0)
			continue;
		if (argc - 1 >= commands[i].min &&
		    argc - 1 <= commands[i].max) {
			commands[i].run(cn, &o, argv);
			return;
		}
		if (commands[i].max > commands[i].min)
			snprintf(n, sizeof(n), "%u to %u", commands[i].min,
				 commands[i].max);
		else
			snprintf(n, sizeof(n), "%u", commands[i].min);
		cowmmd_reply_error(cn, -EINVAL,
				   "%s takes %s argument%s, not %u (usage: %s)",
				   argv[0], n, commands[i].max == 1 ? "" : "s",
				   argc - 1, commands[i].usage);
		return;
	}
	for (i = 0; i < ARRAY_SIZE(commands); i++)
		cowmmd_outf(&o, "%s%s", i ? ", " : "", commands[i].usage);
	cowmmd_reply_error(cn, -EINVAL, "unknown request '%s' (%.*s)", argv[0],
			   (int)o.len, o.buf);
}
