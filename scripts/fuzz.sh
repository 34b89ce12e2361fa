#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Fuzz the snapshot file reader, eager and lazy loads, with libFuzzer for
# SECONDS (default 60): a clang build with ASan and UBSan in build-fuzz/,
# seeded from tests/fuzz/corpus, with the custom mutator of
# tests/fuzz/mutator.c (it keeps the CRCs right).  One job; run it under
# nice on a shared machine.  New inputs go to build-fuzz/corpus, crashes to
# build-fuzz/crash-*; add a minimised crash to tests/fuzz/corpus (and to
# the list in tests/meson.build) once it is fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
"$(dirname "$0")/deps.sh"
if [ ! -d build-fuzz ]; then
	CC=clang meson setup build-fuzz -Dfuzz=true -Dwerror=true \
		-Db_sanitize=address,undefined -Db_lundef=false \
		-Dc_args=-fsanitize=fuzzer-no-link >/dev/null
fi
ninja -C build-fuzz tests/fuzz-format >/dev/null
mkdir -p build-fuzz/corpus
cd build-fuzz
ASAN_OPTIONS=detect_leaks=0 ./tests/fuzz-format -max_total_time="$secs" \
	-max_len=65536 -print_final_stats=1 corpus ../tests/fuzz/corpus
