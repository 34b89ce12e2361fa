#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# scripts/test.sh when things fail, in a second: meson and ninja replaced
# by fakes (first in PATH) that print what meson test prints, and
# dpkg-query by one that finds every package installed.  The asan
# build fails and a plain test fails; the tsan build must still run, the
# output must name both, the summary must repeat the failed test's own
# line, the last line must count them and the exit status must be 1.
# Then a run where everything passes exits 0, and a suite whose meson
# test fails without a result line (a crash) counts as failed.
#
# Usage: test-script.sh SCRIPTS/TEST.SH
set -uo pipefail
script=$1
fake=$(mktemp -d)
trap 'rm -rf "$fake"' EXIT

cat >"$fake/ninja" <<'FAKE'
#!/bin/sh
# fake ninja: the build in $FAKE_BROKEN fails
case " $* " in *" $FAKE_BROKEN "*) echo "fake: error: broken build" >&2; exit 1 ;; esac
exit 0
FAKE
cat >"$fake/meson" <<'FAKE'
#!/bin/bash
# fake meson: setup succeeds; test --list and test --suite print canned
# results: $FAKE_FAILING (BUILDDIR:TEST) FAILs, $FAKE_SKIPPING likewise
# SKIPs, $FAKE_CRASH (a suite) exits 1 without a result line.
[ "$1" = setup ] && exit 0
dir= suite= list=
while [ $# -gt 0 ]; do
	case "$1" in
	-C) dir=$2; shift ;;
	--suite) suite=$2; shift ;;
	--list) list=1 ;;
	esac
	shift
done
if [ -n "$list" ]; then
	printf '%s\n' "libcowmm:unit / abi" "libcowmm:unit / open" \
		"libcowmm:examples / kvstore" "libcowmm:stress / stress-long" \
		"libcowmm:model / model" "libcowmm:model-long / model-long" \
		"libcowmm:swap / swap-model" "libcowmm:deb / deb"
	exit 0
fi
[ -n "$FAKE_CRASH" ] && [ "$suite" = "$FAKE_CRASH" ] && { echo "fake: meson test crashed"; exit 1; }
case "$suite" in
unit) tests="abi open" ;;
examples) tests="kvstore" ;;
model) tests="model" ;;
deb) [ "$dir" = build ] || { echo "fake: deb should not run in $dir"; exit 1; }
     tests="deb" ;;
*) echo "fake: suite $suite should not run"; exit 1 ;;
esac
i=0 rc=0 failed=()
n=$(echo $tests | wc -w)
for t in $tests; do
	i=$((i + 1))
	st=OK
	if [ "$dir:$t" = "$FAKE_FAILING" ]; then
		st=FAIL rc=1 failed+=("$t")
		echo "../tests/test-$t.c:12:F:case:test_case:0: Assertion 'x == 0' failed"
	fi
	[ "$dir:$t" = "$FAKE_SKIPPING" ] && st=SKIP
	printf '%d/%d libcowmm:%s / %-10s %-8s 0.01s\n' $i $n "$suite" "$t" "$st"
done
if [ $rc -ne 0 ]; then
	echo; echo "Summary of Failures:"; echo
	for t in "${failed[@]}"; do
		printf '1/%d libcowmm:%s / %-10s FAIL    0.01s\n' $n "$suite" "$t"
	done
fi
echo; echo "Ok:                 $((n - ${#failed[@]}))"
exit $rc
FAKE
# Every package present: the real dpkg-query would see the deb suite's
# packages half installed, were a full test run going on beside this one.
cat >"$fake/dpkg-query" <<'FAKE'
#!/bin/sh
printf 'install ok installed'
FAKE
chmod +x "$fake/meson" "$fake/ninja" "$fake/dpkg-query"

fails=0
check() {
	if eval "$1"; then
		echo "ok - $2"
	else
		echo "FAIL - $2"
		fails=$((fails + 1))
	fi
}
run() {
	out=$(env PATH="$fake:$PATH" "$@" "$script" plain asan tsan 2>&1)
	rc=$?
	last=$(printf '%s\n' "$out" | tail -n 1)
}

export FAKE_BROKEN= FAKE_FAILING= FAKE_SKIPPING= FAKE_CRASH=
run env FAKE_BROKEN=build-asan FAKE_FAILING=build:open \
	FAKE_SKIPPING=build:kvstore \
	COWMM_TEST_STRICT=1
printf '%s\n' "$out" | sed 's/^/  | /'
check '[ "$rc" -eq 1 ]' "a failed build and a failed test: exit 1 (got $rc)"
check '[ "$last" = "7 passed, 2 failed, 1 skipped" ]' \
	"the last line counts them: '$last'"
check 'grep -qx "=== tsan: suite unit ===" <<<"$out"' \
	"the tsan build runs after the asan build failed"
check 'grep -qx "=== plain: suite examples ===" <<<"$out"' \
	"each suite is announced with its build"
check 'grep -qx "FAILED: asan: build" <<<"$out"' \
	"the failed build is named"
check 'grep -qx "FAILED: plain: unit/open (FAIL)" <<<"$out"' \
	"the failed test is named with its build and suite"
check 'printf "%s\n" "$out" | tail -n 4 | grep -qx "why: plain: ../tests/test-open.c:12:F:case:test_case:0: Assertion .x == 0. failed"' \
	"the summary repeats what the failed test said"
check '! grep -q "should not run" <<<"$out"' \
	"stress, model-long and swap are not run, deb only in plain"

run env
check '[ "$rc" -eq 0 ] && [ "$last" = "13 passed, 0 failed, 0 skipped" ]' \
	"all passing: exit 0, '$last'"

run env FAKE_CRASH=examples
check '[ "$rc" -eq 1 ] && [ "$last" = "10 passed, 3 failed, 0 skipped" ]' \
	"a suite that fails without a result counts as failed: '$last'"
check 'grep -q "FAILED: tsan: suite examples (meson test exit 1)" <<<"$out"' \
	"and is named"

if [ "$fails" -ne 0 ]; then
	echo "$fails check(s) failed"
	exit 1
fi
