#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Run a libFuzzer target for SECONDS (default 60) from a clang build with
# ASan and UBSan in build-fuzz/ (-Dfuzz=true).  One job; run it under nice
# on a shared machine.
#
#   scripts/fuzz.sh [--target format|cowmmd] [SECONDS]
#
# format (the default): the snapshot file reader, eager and lazy loads
#   (tests/fuzz/fuzz-format.c), seeded from tests/fuzz/corpus, with the
#   custom mutator of tests/fuzz/mutator.c (it keeps the CRCs right).  New
#   inputs go to build-fuzz/corpus.  Leaks are not checked.
# cowmmd: cowmmd's receive path, messages with descriptors on one
#   connection (tests/fuzz/fuzz-cowmmd.c), seeded from
#   tests/fuzz/cowmmd-corpus.  New inputs go to build-fuzz/corpus-cowmmd.
#   LeakSanitizer is on: a leak is a finding.
#
# Crashes (and leaks, timeouts) go to build-fuzz/crash-*, leak-*,
# timeout-*; add a minimised one to the target's seed corpus (and to the
# list in tests/meson.build) once it is fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() {
	echo "usage: $0 [--target format|cowmmd] [SECONDS]" >&2
	exit 2
}
target=format
secs=60
while [ $# -gt 0 ]; do
	case "$1" in
	--target) [ $# -ge 2 ] || usage; target=$2; shift 2 ;;
	--target=*) target=${1#--target=}; shift ;;
	'' | *[!0-9]*) usage ;;
	*) secs=$1; shift ;;
	esac
done
case "$target" in
format)
	seeds=../tests/fuzz/corpus corpus=corpus
	opts=(-max_len=65536)
	export ASAN_OPTIONS=detect_leaks=0 ;;
cowmmd)
	# Four messages of up to a CTL's 1024 bytes each, and their framing.
	seeds=../tests/fuzz/cowmmd-corpus corpus=corpus-cowmmd
	opts=(-max_len=8192) ;;
*) usage ;;
esac
"$(dirname "$0")/deps.sh"
if [ ! -d build-fuzz ]; then
	CC=clang meson setup build-fuzz -Dfuzz=true -Dwerror=true \
		-Db_sanitize=address,undefined -Db_lundef=false \
		-Dc_args=-fsanitize=fuzzer-no-link >/dev/null
fi
ninja -C build-fuzz "tests/fuzz-$target" >/dev/null
mkdir -p "build-fuzz/$corpus"
cd build-fuzz
"./tests/fuzz-$target" -max_total_time="$secs" "${opts[@]}" \
	-print_final_stats=1 "$corpus" "$seeds"
