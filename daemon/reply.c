// SPDX-License-Identifier: MIT
/*
 * cowmmd's log and its replies to cowmmctl, text or JSON.
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

void cowmmd_say(const char *fmt, ...)
{
	struct timespec ts;
	struct tm tm;
	char when[32];
	va_list ap;

	clock_gettime(CLOCK_REALTIME, &ts);
	localtime_r(&ts.tv_sec, &tm);
	strftime(when, sizeof(when), "%H:%M:%S", &tm);
	fprintf(stderr, "cowmmd %s.%03ld: ", when, ts.tv_nsec / 1000000);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

void cowmmd_log_lib(enum cowmm_log_level level, const char *msg, void *data)
{
	(void)data;
	if (level <= COWMM_LOG_WARNING)
		cowmmd_say("libcowmm: %s", msg);
}

/* ------------------------------------------------------------------------ */
/* Text and JSON replies */

void cowmmd_outf(struct out *o, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void cowmmd_outf(struct out *o, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (o->len >= o->cap)
		return;
	va_start(ap, fmt);
	n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
	va_end(ap);
	if (n > 0)
		o->len = o->len + (size_t)n < o->cap ? o->len + (size_t)n
						     : o->cap;
}

/* A JSON string (names are sanitised; paths come from the operator). */
void cowmmd_out_jstr(struct out *o, const char *s)
{
	cowmmd_outf(o, "\"");
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			cowmmd_outf(o, "\\%c", *s);
		else if ((unsigned char)*s < 0x20)
			cowmmd_outf(o, "\\u%04x", *s);
		else
			cowmmd_outf(o, "%c", *s);
	}
	cowmmd_outf(o, "\"");
}

void cowmmd_send_reply(struct conn *cn, int status, const struct out *o)
{
	size_t len = sizeof(struct cowmmd_reply) + (o ? o->len : 0);
	struct cowmmd_reply *r = malloc(len);

	if (!r)
		return;
	r->h = (struct cowmmd_hdr){ COWMMD_MAGIC, COWMMD_VERSION,
				    COWMMD_REPLY, (uint32_t)len, 0 };
	r->status = status;
	if (o)
		memcpy(r->text, o->buf, o->len);
	if (send(cn->fd, r, len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
		cowmmd_say("ctl %d: reply lost: %s", cn->pid, strerror(errno));
	free(r);
}

void cowmmd_reply_error(struct conn *cn, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void cowmmd_reply_error(struct conn *cn, int err, const char *fmt, ...)
{
	char text[512];
	struct out o = { text, 0, sizeof(text), false };
	char msg[400];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (cn->flags & COWMMD_CTL_JSON) {
		cowmmd_outf(&o, "{\"error\": ");
		cowmmd_out_jstr(&o, msg);
		cowmmd_outf(&o, ", \"errno\": %d}\n", -err);
	} else {
		cowmmd_outf(&o, "%s\n", msg);
	}
	cowmmd_send_reply(cn, err, &o);
}

