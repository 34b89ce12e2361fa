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

#endif /* COWMM_RCU_H */
