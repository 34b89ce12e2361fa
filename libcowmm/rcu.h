/* SPDX-License-Identifier: MIT */
/*
 * The one RCU flavour of the library: urcu-bp ("bulletproof"), made for
 * libraries that cannot ask their callers to register threads.  Application
 * threads reach the read side through cowmm_snap_read(), and the worker
 * threads through the fault path; urcu-bp registers each on first use.
 *
 * The names stay prefixed (urcu_bp_read_lock()) so that the flavour shows at
 * every call.  _LGPL_SOURCE is not defined: the library is MIT, so liburcu's
 * LGPL read side is called, not inlined.
 */
#ifndef COWMM_RCU_H
#define COWMM_RCU_H

#include <urcu/urcu-bp.h>

/*
 * ThreadSanitizer cannot see liburcu's grace periods (liburcu is not
 * instrumented): to it, a table freed by a call_rcu callback races with
 * every reader that looked at it.  Each such report costs it milliseconds
 * to match against the suppressions, and it keeps them all: a test whose
 * thread moved memory a few thousand times (a new region table each)
 * spent over a minute in cowmm_close() waiting for the callbacks
 * (exact/fault-while-other-moves, red in CI).  So under TSan the end of
 * every read section releases one variable, and whatever runs after a
 * grace period acquires it (cowmm__rcu_after_grace()): the order liburcu
 * guarantees, told to TSan.  Elsewhere these are liburcu's own calls.
 */
#if defined(__SANITIZE_THREAD__)
#define COWMM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define COWMM_TSAN 1
#endif
#endif

#ifdef COWMM_TSAN
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
extern char cowmm__rcu_tsan;

static inline void cowmm__tsan_read_unlock(void)
{
	__tsan_release(&cowmm__rcu_tsan);
	urcu_bp_read_unlock();
}
#define urcu_bp_read_unlock cowmm__tsan_read_unlock

static inline void cowmm__tsan_synchronize(void)
{
	urcu_bp_synchronize_rcu();
	__tsan_acquire(&cowmm__rcu_tsan);
}
#define urcu_bp_synchronize_rcu cowmm__tsan_synchronize

/* First thing in every call_rcu callback. */
static inline void cowmm__rcu_after_grace(void)
{
	__tsan_acquire(&cowmm__rcu_tsan);
}
#else
static inline void cowmm__rcu_after_grace(void)
{
}
#endif

#endif /* COWMM_RCU_H */
