// SPDX-License-Identifier: MIT
/* Messages go to the callback set with cowmm_set_log(); by default nowhere. */
#include <stdarg.h>
#include <stdio.h>

#include "cowmm_i.h"

struct log_sink {
	cowmm_log_fn fn;
	void *data;
};

static struct log_sink sink;
static pthread_mutex_t sink_lock = PTHREAD_MUTEX_INITIALIZER;

void cowmm_set_log(cowmm_log_fn fn, void *data)
{
	pthread_mutex_lock(&sink_lock);
	sink.fn = fn;
	sink.data = data;
	pthread_mutex_unlock(&sink_lock);
}

void cowmm__log(enum cowmm_log_level level, const char *fmt, ...)
{
	struct log_sink s;
	char msg[512];
	va_list ap;

	/* Not from the in-thread fault handler: not async-signal-safe. */
	if (cowmm__in_sigbus)
		return;
	pthread_mutex_lock(&sink_lock);
	s = sink;
	pthread_mutex_unlock(&sink_lock);
	if (!s.fn)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	s.fn(level, msg, s.data);
}
