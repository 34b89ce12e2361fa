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
#
# Each build runs whatever failed before it, and its suites one by one
# (all but stress, model-long and swap; deb in the plain build
# only), each under a "=== SETUP: ... ===" heading.  It always ends with
# the failed tests' own lines that say why ("why: ..."), what failed, and
# the line "N passed, M failed, K skipped" (tests; a lint, configure or
# build that fails counts as one failed), and exits 1 if anything failed.
# COWMM_TEST_STRICT=1 (the default here, and what .ci/run sets) makes a
# skip fail the test that skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

export COWMM_TEST_STRICT="${COWMM_TEST_STRICT:-1}"
passed=0 failed=0 skipped=0
failures=()   # "asan: build", "tsan: unit/stress", ...
reasons=()    # why: the failed tests' own lines that say so
summary=()    # one line per setup
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Something other than a test failed: it counts as one failure.
step_failed() {
	failures+=("$1")
	failed=$((failed + 1))
	echo "=== $1 FAILED ==="
}

# Count the results in meson test's output ($log) for setup $1: each test
# ("  3/12 libcowmm:unit / abi   OK   0.01s") once, by its last status
# before the "Summary of Failures" that lists the failed again.  Sets cp,
# cf, cs and adds each failed test to failures.
count() {
	local name status
	cp=0 cf=0 cs=0
	while read -r name status; do
		case "$status" in
		OK | EXPECTEDFAIL) cp=$((cp + 1)) ;;
		SKIP) cs=$((cs + 1)) ;;
		*) cf=$((cf + 1)); failures+=("$1: $name ($status)") ;;
		esac
	done < <(sed -n -e '/^Summary of Failures:/q' -e \
		's|^ *[0-9]*/[0-9]* *[^ :]*:\([^ ]*\) / \([^ ]*\)  *\([A-Z]*\) .*|\1/\2 \3|p' \
		"$log" | awk '{ if (!($1 in st)) order[n++] = $1; st[$1] = $2 }
			END { for (i = 0; i < n; i++) print order[i], st[order[i]] }')
}

setups=("$@")
[ ${#setups[@]} -gt 0 ] || setups=(lint plain asan tsan)
for s in "${setups[@]}"; do
	case "$s" in
	lint | plain | asan | tsan) ;;
	*)
		echo "unknown setup: $s (lint, plain, asan, tsan)" >&2
		echo "0 passed, 1 failed, 0 skipped"
		exit 2
		;;
	esac
done

echo "=== deps ==="
./scripts/deps.sh --deb || step_failed "deps" # --deb: the deb suite

for s in "${setups[@]}"; do
	if [ "$s" = lint ]; then
		echo "=== lint ==="
		if ./scripts/lint.sh; then
			summary+=("lint: clean")
		else
			step_failed "lint"
			summary+=("lint: FAILED")
		fi
		continue
	fi
	# The long suites run on demand; the model tester's bounded run
	# (50 s of seeds) is in every build.  The deb suite builds packages
	# from the source tree, whatever the build directory: once, in plain.
	long='stress|model-long|swap'
	case "$s" in
	plain) dir=build;      opts=() ;;
	asan)  dir=build-asan; opts=(-Db_sanitize=address,undefined -Db_lundef=false)
	       long+='|deb' ;;
	tsan)  dir=build-tsan; opts=(-Db_sanitize=thread -Db_lundef=false)
	       long+='|deb' ;;
	esac
	echo "=== $s: configure ($dir) ==="
	reconf=()
	[ -d "$dir" ] && reconf=(--reconfigure)
	if ! meson setup "${reconf[@]}" "$dir" -Dwerror=true "${opts[@]}" >/dev/null; then
		step_failed "$s: configure"
		summary+=("setup $s: configure FAILED, no tests run")
		continue
	fi
	echo "=== $s: build ($dir) ==="
	if ! ninja -C "$dir"; then
		step_failed "$s: build"
		summary+=("setup $s: build FAILED, no tests run")
		continue
	fi
	# Every suite but the long ones, in the order meson lists them.
	suites=$(meson test -C "$dir" --list 2>/dev/null |
		sed -n 's|^[^ :]*:\([^ ]*\) / .*|\1|p' | awk '!seen[$0]++' |
		grep -vxE "$long")
	if [ -z "$suites" ]; then
		step_failed "$s: listing its tests"
		summary+=("setup $s: no tests listed")
		continue
	fi
	sp=0 sf=0 ss=0
	for suite in $suites; do
		echo "=== $s: suite $suite ==="
		meson test -C "$dir" --setup="$s" --print-errorlogs \
			--suite "$suite" | tee "$log"
		rc=${PIPESTATUS[0]}
		count "$s"
		if [ "$rc" -ne 0 ] && [ "$cf" -eq 0 ]; then
			echo "=== $s: suite $suite: meson test exit $rc ==="
			failures+=("$s: suite $suite (meson test exit $rc)")
			cf=1
		fi
		# CI keeps only the end of the output: repeat there what the
		# failed tests said about their failure (Check's ":F:" and ":E:"
		# lines, sanitizer reports, the model's diverged seeds).
		if [ "$cf" -ne 0 ]; then
			while IFS= read -r line; do
				reasons+=("$s: $line")
			done < <(grep -E -e ':[FE]:' -e 'SUMMARY: |ERROR: |WARNING: ThreadSanitizer' \
				-e '^MODEL FAILURE|^seed [0-9]+ FAILED' \
				-e '^FAIL ' "$log" | cut -c1-300 | head -n 20)
		fi
		sp=$((sp + cp)) sf=$((sf + cf)) ss=$((ss + cs))
	done
	passed=$((passed + sp)) failed=$((failed + sf)) skipped=$((skipped + ss))
	summary+=("setup $s: $sp passed, $sf failed, $ss skipped")
done

echo "=== summary (${setups[*]}) ==="
for line in "${summary[@]}"; do
	echo "$line"
done
for what in "${reasons[@]}"; do
	echo "why: $what"
done
for what in "${failures[@]}"; do
	echo "FAILED: $what"
done
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
