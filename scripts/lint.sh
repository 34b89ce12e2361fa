#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Static analysis of the library and the daemon: cppcheck (warning,
# portability, performance) and clang-tidy (.clang-tidy), both over the
# compile commands of build/.  Any finding fails.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f build/compile_commands.json ] || { meson setup build >/dev/null; }
ninja -C build >/dev/null
files=(libcowmm/*.c daemon/*.c)

echo "=== daemon includes ==="
# cowmmd uses cowmm.h and include-private/ only; its include path has no
# libcowmm/ (daemon/meson.build), and no quoted include may name a path.
bad=$(grep -HnE '^#[[:space:]]*include[[:space:]]*"' daemon/*.[ch] \
	tests/fuzz/fuzz-cowmmd.c | while IFS= read -r line; do
	h=${line#*\"}; h=${h%%\"*}
	if [[ $h == */* || -e libcowmm/$h ]]; then echo "$line"; fi
done)
if [ -n "$bad" ]; then
	echo "the daemon includes the library's internals:"
	echo "$bad"
	exit 1
fi
echo "daemon includes: cowmm.h and include-private/ only"

echo "=== cppcheck ==="
cppcheck --quiet --error-exitcode=1 --inline-suppr \
	--enable=warning,portability,performance --std=c11 \
	-D_GNU_SOURCE -D__x86_64__ -Iinclude -Iinclude-private -Ilibcowmm \
	-Ibuild -Ibuild/include \
	--suppress=missingIncludeSystem "${files[@]}"
echo "cppcheck: no findings in ${#files[@]} files"

echo "=== clang-tidy ==="
# Its exit status is what counts (.clang-tidy: WarningsAsErrors '*').
if ! out=$(clang-tidy --quiet -p build "${files[@]}" 2>&1); then
	echo "$out" | grep -v "warnings generated\|Suppressed [0-9]* warnings\|Use -header-filter\|NOLINT"
	exit 1
fi
echo "clang-tidy: no findings in ${#files[@]} files"
