// SPDX-License-Identifier: MIT
/*
 * cowmmd: takes snapshots of other processes' memory to files while they
 * run.  A client hands over a userfaultfd with its ranges registered in
 * write-protect mode and a pidfd (cowmm_attach_daemon()); cowmmctl asks for
 * snapshots and schedules over the same socket.
 *
 * A snapshot: a helper thread stops the client's threads (ptrace, for the
 * arming only), write-protects its ranges and lets it run (freeze.c).  The
 * loop thread then reads its write faults (fault.c) and hands pages whose
 * old bytes are still needed to the snapshot's copier thread, which reads
 * them (process_vm_readv) before the page is unprotected (snapshot.c).  A
 * pool thread streams the files, unprotecting each run of pages once it is
 * in the file (stream.c).  The loop never touches a client's memory and
 * never waits on a client.
 *
 * This file: options, the snapshot directory's default, main().
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
#include "cowmm_daemon.h"
#include "cowmmd.h"

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif


/*
 * Where snapshots go unless told: systemd's StateDirectory=, else
 * /var/lib/cowmmd for root, else $XDG_STATE_HOME/cowmmd or
 * ~/.local/state/cowmmd: places no other user can create first.
 */
static const char *default_dir(char *buf, size_t n)
{
	const char *state = getenv("STATE_DIRECTORY");
	const char *xdg = getenv("XDG_STATE_HOME");
	const char *home = getenv("HOME");

	if (state && *state)
		snprintf(buf, n, "%.*s", (int)strcspn(state, ":"), state);
	else if (geteuid() == 0)
		snprintf(buf, n, "/var/lib/cowmmd");
	else if (xdg && *xdg)
		snprintf(buf, n, "%s/cowmmd", xdg);
	else
		snprintf(buf, n, "%s/.local/state/cowmmd", home ? home : "");
	return buf;
}

static void usage(FILE *f)
{
	char def[108], dir[PATH_MAX / 2];

	fprintf(f,
		"usage: cowmmd [--socket PATH] [--dir DIR] [--keep N] [--rate MIB]\n"
		"              [--idle-timeout S]\n"
		"\n"
		"Takes snapshots of the memory of processes that attach with\n"
		"cowmm_attach_daemon(), on cowmmctl's command or on a schedule.\n"
		"\n"
		"  -s, --socket PATH  listen here (default %s)\n"
		"  -d, --dir DIR      write snapshots here (default %s)\n"
		"  -k, --keep N       snapshots kept per client (default 3)\n"
		"  -r, --rate MIB     write snapshots at most MIB MiB/s "
		"(default 0:\n"
		"                     no limit); the client's writes fault "
		"meanwhile\n"
		"  -i, --idle-timeout S  close a connection that is not a "
		"client\n"
		"                     after S seconds without a request "
		"(default %d)\n"
		"  -h, --help         this text\n"
		"  -V, --version      the version\n"
		"\n"
		"SIGTERM or SIGINT: finish the snapshots in flight, then exit;\n"
		"a second one abandons them (their files are removed).\n",
		cowmmd_default_socket(def, sizeof(def)),
		default_dir(dir, sizeof(dir)), IDLE_TIMEOUT_S);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "dir", required_argument, NULL, 'd' },
		{ "keep", required_argument, NULL, 'k' },
		{ "rate", required_argument, NULL, 'r' },
		{ "idle-timeout", required_argument, NULL, 'i' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ NULL, 0, NULL, 0 },
	};
	unsigned long keep, rate, idle;
	int opt;

	cowmmd_default_socket(D.sock, sizeof(D.sock));
	default_dir(D.dir, sizeof(D.dir));
	while ((opt = getopt_long(argc, argv, "s:d:k:r:i:hV", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			snprintf(D.sock, sizeof(D.sock), "%s", optarg);
			break;
		case 'd':
			snprintf(D.dir, sizeof(D.dir), "%s", optarg);
			break;
		case 'k':
			if (!cowmmd_parse_uint(optarg, KEEP_MAX - 1, &keep) ||
			    !keep) {
				fprintf(stderr, "cowmmd: --keep takes 1 to %d\n",
					KEEP_MAX - 1);
				return 2;
			}
			D.keep = (unsigned)keep;
			break;
		case 'r':
			if (!cowmmd_parse_uint(optarg, 1ul << 20, &rate)) {
				fprintf(stderr, "cowmmd: --rate takes MiB/s, "
						"0 for no limit\n");
				return 2;
			}
			D.rate = (uint64_t)rate << 20;
			break;
		case 'i':
			if (!cowmmd_parse_uint(optarg, 86400, &idle) || !idle) {
				fprintf(stderr, "cowmmd: --idle-timeout takes "
						"1 to 86400 seconds\n");
				return 2;
			}
			D.idle_ns = idle * 1000000000ull;
			break;
		case 'h':
			usage(stdout);
			return 0;
		case 'V':
			printf("cowmmd %s\n", COWMM_VERSION_STRING);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return 2;
	}
	/* Names are kept short (NAME_MAX) but the path must fit too. */
	if (strlen(D.dir) >= sizeof(D.dir) - 1) {
		fprintf(stderr, "cowmmd: --dir too long\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	cowmm_set_log(cowmmd_log_lib, NULL);
	/* This thread resolves faults: an ioctl held back by a pending event
	 * must come back to it rather than spin (see cowmmd_loop_wp()). */
	cowmm__in_worker = true;
	D.dirfd = cowmmd_open_dir(D.dir);
	if (D.dirfd < 0) {
		cowmmd_say("cannot use %s for snapshots: %s", D.dir,
			   strerror(-D.dirfd));
		return 1;
	}
	cowmmd_remove_stale();
	D.listen_fd = cowmmd_listen_activated();
	if (D.listen_fd == -ENOENT)
		D.listen_fd = cowmmd_listen_on(D.sock);
	if (D.listen_fd < 0)
		return 1;
	D.loop = uv_default_loop();
	D.started = now_ns();
	D.run = (uint64_t)time(NULL);
	uv_poll_init(D.loop, &D.listen_poll, D.listen_fd);
	uv_poll_start(&D.listen_poll, UV_READABLE, cowmmd_on_listen);
	uv_timer_init(D.loop, &D.backoff_timer);
	uv_timer_init(D.loop, &D.idle_timer);
	uv_timer_start(&D.idle_timer, cowmmd_on_idle_timer,
		       D.idle_ns / 4000000 + 1, D.idle_ns / 4000000 + 1);
	uv_signal_init(D.loop, &D.sigint);
	uv_signal_init(D.loop, &D.sigterm);
	uv_signal_start(&D.sigint, cowmmd_on_signal, SIGINT);
	uv_signal_start(&D.sigterm, cowmmd_on_signal, SIGTERM);
	cowmmd_say("listening on %s, snapshots in %s, keeping %u per client",
		   D.sock, D.dir, D.keep);
	uv_run(D.loop, UV_RUN_DEFAULT);
	uv_loop_close(D.loop);
	cowmmd_say("exited cleanly: %llu snapshot(s) written, %llu failed",
		   (unsigned long long)D.snaps_ok,
		   (unsigned long long)D.snaps_failed);
	return 0;
}

