// SPDX-License-Identifier: MIT
/*
 * libFuzzer target for the snapshot file reader (cowmm_region_load()).
 *
 * Every input is a candidate snapshot file for a 64-page region that holds
 * a known pattern.  A file the reader refuses must leave that region
 * byte for byte as it was; one it accepts is simply loaded.  Built with
 * clang by scripts/fuzz.sh; tests/fuzz/replay.c runs the corpus in the
 * normal test suite with any compiler.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cowmm.h"

#define PAGES 64
#define LEN (PAGES * 4096)

static cowmm_t *mm;
static cowmm_region_t *region;
static unsigned char *base;

static unsigned char pattern(size_t i)
{
	return (unsigned char)(i * 31 + 7);
}

static void quiet(enum cowmm_log_level level, const char *msg, void *data)
{
	(void)level;
	(void)msg;
	(void)data;
}

static void setup(void)
{
	size_t i;

	cowmm_set_log(quiet, NULL);
	if (cowmm_open(NULL, &mm) || cowmm_region_alloc(mm, LEN, 0, &region)) {
		fprintf(stderr, "fuzz-format: no userfaultfd here\n");
		abort();
	}
	base = cowmm_region_base(region);
	for (i = 0; i < LEN; i++)
		base[i] = pattern(i);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t i, done = 0;
	int fd, ret;

	if (!mm)
		setup();
	fd = memfd_create("fuzz-format", MFD_CLOEXEC);
	if (fd < 0)
		abort();
	while (done < size) {
		ssize_t n = write(fd, data + done, size - done);

		if (n <= 0)
			abort();
		done += (size_t)n;
	}
	ret = cowmm_region_load(region, fd, 0);
	close(fd);
	if (ret > 0)
		abort(); /* 0 or a negative errno, nothing else */
	for (i = 0; i < LEN; i++) {
		if (!ret)
			base[i] = pattern(i); /* accepted: back to the pattern */
		else if (base[i] != pattern(i))
			abort(); /* refused, yet the region changed */
	}
	return 0;
}
