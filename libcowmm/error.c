// SPDX-License-Identifier: MIT
/*
 * cowmm_strerror(): what each return value means in libcowmm's terms.
 *
 * A value that more than one call returns for different reasons (or that
 * the library passes on from a system call) says its general meaning first,
 * then the library's cases: the caller knows which call failed and on what,
 * this text does not.  A value with one meaning in the library says it.
 */
#include <errno.h>
#include <string.h>

#include "cowmm_i.h"

const char *cowmm_strerror(int err)
{
	switch (err) {
	case 0:
		return "success";
	case -EPERM:
		return "operation not permitted (for userfaultfd, the log says "
		       "how to grant it)";
	case -EINVAL:
		return "invalid argument";
	case -E2BIG:
		return "struct larger than this library knows, with non-zero "
		       "fields it does not know";
	case -EBADF:
		return "bad file descriptor, or a handle already released";
	case -ECHILD:
		return "handle inherited through fork(): only the parent can "
		       "use it";
	case -EEXIST:
		return "overlapping ranges (a region of this manager, or "
		       "another range of the same call)";
	case -EBUSY:
		return "range or object in use";
	case -ENOMEM:
		return "out of memory, or range not mapped";
	case -EIO:
		return "I/O error, or a broken snapshot (its content could not "
		       "be kept)";
	case -EOPNOTSUPP:
		return "operation not supported (by the running kernel, or in "
		       "this mode)";
	case -ENOSYS:
		return "kernel without userfaultfd";
	case -EOVERFLOW:
		return "value too large (too many snapshots of one region, or "
		       "pins on one page)";
	case -EBADMSG:
		return "not a snapshot file, or corrupted or truncated";
	case -EPROTONOSUPPORT:
		return "snapshot file of another format version";
	case -EFBIG:
		return "file too large, or a snapshot file for a larger region";
	case -ESPIPE:
		return "not a regular file (snapshot files are read from "
		       "regular files only)";
	case -ENOENT:
		return "no such file, directory, socket, pin, region or "
		       "mapping";
	case -EMFILE:
		return "too many open files (or in-thread managers)";
	default:
		return err < 0 ? strerror(-err) : "not an error code";
	}
}
