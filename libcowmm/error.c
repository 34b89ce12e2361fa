// SPDX-License-Identifier: MIT
/* cowmm_strerror(): what each return value means in libcowmm's terms. */
#include <errno.h>
#include <string.h>

#include "cowmm_i.h"

const char *cowmm_strerror(int err)
{
	switch (err) {
	case 0:
		return "success";
	case -EPERM:
		return "no permission to use userfaultfd (see the log for how "
		       "to grant it)";
	case -EINVAL:
		return "invalid argument";
	case -E2BIG:
		return "struct larger than this library knows, with non-zero "
		       "fields it does not know";
	case -EBADF:
		return "handle already released";
	case -ECHILD:
		return "handle inherited through fork(): only the parent can "
		       "use it";
	case -EEXIST:
		return "range overlaps a region of this manager";
	case -EBUSY:
		return "range or object in use";
	case -ENOMEM:
		return "out of memory, or range not mapped";
	case -EIO:
		return "snapshot is broken: its content could not be kept";
	case -EOPNOTSUPP:
		return "not supported by the running kernel";
	case -ENOSYS:
		return "kernel without userfaultfd";
	case -EOVERFLOW:
		return "too many snapshots of one region";
	case -EBADMSG:
		return "not a snapshot file, or corrupted or truncated";
	case -EPROTONOSUPPORT:
		return "snapshot file of another format version";
	case -EFBIG:
		return "snapshot file for a larger region";
	case -ESPIPE:
		return "snapshot files are read from regular files only";
	case -ENOENT:
		return "memory unmapped behind the library's back";
	default:
		return err < 0 ? strerror(-err) : "not an error code";
	}
}
