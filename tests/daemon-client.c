// SPDX-License-Identifier: MIT
/*
 * The client side of tests/daemon-e2e.py.
 *
 *   daemon-client run SOCKET MIB NAME
 *	Two regions of MIB/2 MiB each, handed to cowmmd; one thread writes
 *	forever.  Step k stores the value k into the 8-byte word that a hash
 *	of k picks, in one region or the other, so the memory after step k is
 *	a function of k alone.  Prints "ready ID" once attached; SIGUSR1
 *	prints the step reached; SIGTERM detaches and exits.
 *
 *   daemon-client verify MIB DIR
 *	Loads DIR/r0.cowmm and DIR/r1.cowmm into a fresh process's cowmm
 *	regions (cowmm_region_load), takes K, the largest step found, and
 *	replays steps 1..K: the snapshot is right only if it equals the memory
 *	after step K exactly.  A snapshot taken page by page while the writer
 *	runs, rather than at one instant, fails this.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "cowmm.h"

#define INIT_BIT (1ull << 63)

static atomic_uint_fast64_t step;
static atomic_bool stop;
static uint64_t *mem[2];
static size_t words; /* per region */

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* What a word holds before any step: every other page is populated. */
static uint64_t initial(size_t w)
{
	return w % 512 == 0 && (w / 512) % 2 == 0 ? INIT_BIT | (w / 512 + 1)
						  : 0;
}

static void *writer(void *arg)
{
	struct timespec nap = { 0, 20000 };
	uint64_t k;

	(void)arg;
	for (k = 1; !atomic_load_explicit(&stop, memory_order_relaxed); k++) {
		uint64_t x = mix(k);

		/* One aligned 8-byte store per step: never torn. */
		__atomic_store_n(&mem[x & 1][(x >> 1) % words], k,
				 __ATOMIC_RELAXED);
		atomic_store_explicit(&step, k, memory_order_relaxed);
		if (k % 512 == 0)
			nanosleep(&nap, NULL);
	}
	return NULL;
}

static int run(const char *sock, size_t mib, const char *name)
{
	size_t len = mib << 19; /* half of mib MiB */
	struct iovec ranges[2];
	cowmm_client_t *c;
	pthread_t th;
	sigset_t set;
	size_t i, w;
	int sig, ret;

	words = len / 8;
	for (i = 0; i < 2; i++) {
		mem[i] = mmap(NULL, len, PROT_READ | PROT_WRITE,
			      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mem[i] == MAP_FAILED)
			return 1;
		for (w = 0; w < words; w += 512)
			if (initial(w))
				mem[i][w] = initial(w);
		ranges[i] = (struct iovec){ mem[i], len };
	}
	ret = cowmm_attach_daemon(sock, name, ranges, 2, &c);
	if (ret) {
		fprintf(stderr, "daemon-client: attach: %s\n",
			cowmm_strerror(ret));
		return 1;
	}
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	pthread_create(&th, NULL, writer, NULL);
	printf("ready %u\n", cowmm_client_id(c));
	fflush(stdout);
	for (;;) {
		if (sigwait(&set, &sig))
			continue;
		if (sig != SIGUSR1)
			break;
		printf("step %llu\n", (unsigned long long)atomic_load(&step));
		fflush(stdout);
	}
	atomic_store(&stop, true);
	pthread_join(th, NULL);
	ret = cowmm_detach_daemon(c);
	printf("detached %d step %llu\n", ret,
	       (unsigned long long)atomic_load(&step));
	return ret ? 1 : 0;
}

static int verify(size_t mib, const char *dir)
{
	size_t len = mib << 19, i, w, bad = 0;
	cowmm_region_t *r[2];
	uint64_t *got[2], *want[2], kmax = 0, k;
	char path[4096];
	cowmm_t *mm;
	int ret;

	words = len / 8;
	ret = cowmm_open(NULL, &mm);
	if (ret) {
		fprintf(stderr, "verify: cowmm_open: %s\n", cowmm_strerror(ret));
		return 1;
	}
	for (i = 0; i < 2; i++) {
		int fd;

		snprintf(path, sizeof(path), "%s/r%zu.cowmm", dir, i);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			fprintf(stderr, "verify: %s: %s\n", path,
				strerror(errno));
			return 1;
		}
		ret = cowmm_region_alloc(mm, len, 0, &r[i]);
		if (!ret)
			ret = cowmm_region_load(r[i], fd, 0);
		close(fd);
		if (ret) {
			fprintf(stderr, "verify: load %s: %s\n", path,
				cowmm_strerror(ret));
			return 1;
		}
		got[i] = cowmm_region_base(r[i]);
		want[i] = malloc(len);
		if (!want[i])
			return 1;
		for (w = 0; w < words; w++) {
			want[i][w] = initial(w);
			if (!(got[i][w] & INIT_BIT) && got[i][w] > kmax)
				kmax = got[i][w];
		}
	}
	for (k = 1; k <= kmax; k++) {
		uint64_t x = mix(k);

		want[x & 1][(x >> 1) % words] = k;
	}
	for (i = 0; i < 2; i++)
		for (w = 0; w < words; w++)
			if (got[i][w] != want[i][w] && bad++ < 5)
				fprintf(stderr,
					"verify: region %zu word %zu: %llx, "
					"want %llx\n",
					i, w, (unsigned long long)got[i][w],
					(unsigned long long)want[i][w]);
	if (bad) {
		printf("MISMATCH: %zu words differ from the memory after step "
		       "%llu\n",
		       bad, (unsigned long long)kmax);
		return 1;
	}
	printf("ok: the memory after step %llu, %zu words\n",
	       (unsigned long long)kmax, 2 * words);
	cowmm_close(mm);
	free(want[0]);
	free(want[1]);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "run"))
		return run(argv[2], strtoul(argv[3], NULL, 10), argv[4]);
	if (argc == 4 && !strcmp(argv[1], "verify"))
		return verify(strtoul(argv[2], NULL, 10), argv[3]);
	fprintf(stderr, "usage: daemon-client run SOCKET MIB NAME\n"
			"       daemon-client verify MIB DIR\n");
	return 2;
}
