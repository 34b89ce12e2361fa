#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Build libcowmm and run the whole test suite, three times: a plain build,
# AddressSanitizer + UndefinedBehaviorSanitizer, and ThreadSanitizer.  Each
# build lives in its own directory (build/, build-asan/, build-tsan/) and is
# compiled with -Dwerror=true.  Before them, static analysis (scripts/lint.sh:
# cppcheck and clang-tidy, no finding allowed).  Installs missing Debian
# packages first.
#
# Usage: scripts/test.sh [lint|plain|asan|tsan ...]   (default: all four)
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh --deb # --deb: the deb suite builds Debian packages

export COWMM_TEST_STRICT="${COWMM_TEST_STRICT:-1}"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
setups=("$@")
[ ${#setups[@]} -gt 0 ] || setups=(lint plain asan tsan)

for s in "${setups[@]}"; do
	if [ "$s" = lint ]; then
		echo "=== lint ==="
		./scripts/lint.sh
		continue
	fi
	# The deb suite builds packages from the source tree, whatever the
	# build directory: once, in the plain setup.
	skip=(--no-suite stress --no-suite model --no-suite model-long
	      --no-suite swap)
	case "$s" in
	plain) dir=build;      opts=() ;;
	asan)  dir=build-asan; opts=(-Db_sanitize=address,undefined -Db_lundef=false)
	       skip+=(--no-suite deb) ;;
	tsan)  dir=build-tsan; opts=(-Db_sanitize=thread -Db_lundef=false)
	       skip+=(--no-suite deb) ;;
	*) echo "unknown setup: $s (lint, plain, asan, tsan)" >&2; exit 2 ;;
	esac
	echo "=== $s build ($dir) ==="
	if [ -d "$dir" ]; then
		meson setup --reconfigure "$dir" -Dwerror=true "${opts[@]}" >/dev/null
	else
		meson setup "$dir" -Dwerror=true "${opts[@]}" >/dev/null
	fi
	ninja -C "$dir"
	echo "=== $s tests ==="
	meson test -C "$dir" --setup="$s" --print-errorlogs "${skip[@]}" |
		tee -a "$results"
done
echo "=== all test setups passed: ${setups[*]} ==="
passed=$(grep -cE '^ *[0-9]+/[0-9]+ .* OK ' "$results" || true)
skipped=$(grep -cE '^ *[0-9]+/[0-9]+ .* SKIP ' "$results" || true)
echo "$passed passed, 0 failed, $skipped skipped"
