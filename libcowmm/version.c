// SPDX-License-Identifier: MIT
#include "cowmm_i.h"

int cowmm_version(void)
{
	return COWMM_VERSION_MAJOR * 10000 + COWMM_VERSION_MINOR * 100 +
	       COWMM_VERSION_PATCH;
}
