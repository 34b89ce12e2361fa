#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Build the Debian packages (debian/) in a temporary copy of the source
# tree, as a packager would (dpkg-buildpackage -us -uc -b), check them with
# lintian (any error fails), install them with apt, build the README's
# example program against the installed libcowmm-dev with pkg-config and
# run it, check that cowmmd, cowmmctl, their units and every man page are
# where Debian looks for them, then purge the packages again.
#
# Usage: scripts/deb.sh [OUTDIR]    (keep the .deb files in OUTDIR)
# Needs root (dpkg) and installs what it needs first (deps.sh --deb).  It
# refuses to run where libcowmm0, libcowmm-dev or cowmmd is installed
# already, so that it never removes a copy it did not install.  meson test
# --suite deb runs it; exit 77 (SKIP) when not root.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-}
pkgs=(libcowmm0 libcowmm-dev cowmmd)

if [ "$(id -u)" -ne 0 ]; then
	echo "SKIP: scripts/deb.sh installs packages: run it as root"
	exit 77
fi
# meson test runs us with the build tree's library first in the path.
unset LD_LIBRARY_PATH PKG_CONFIG_PATH PKG_CONFIG_LIBDIR PKG_CONFIG_SYSROOT_DIR
"$src/scripts/deps.sh" --deb >/dev/null

installed() {
	dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed
}
for p in "${pkgs[@]}"; do
	if installed "$p"; then
		echo "FAIL: $p is installed already; scripts/deb.sh only removes" \
			"what it installed (apt-get purge ${pkgs[*]}, then again)" >&2
		exit 1
	fi
done

tmp=$(mktemp -d /var/tmp/cowmm-deb.XXXXXX)
added=0
cleanup() {
	if [ "$added" = 1 ]; then
		DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "${pkgs[@]}" \
			>"$tmp/purge.log" 2>&1 || cat "$tmp/purge.log" >&2
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
fail() {
	echo "FAIL: $*" >&2
	exit 1
}
step() {
	echo "=== $* ($SECONDS s)"
}

step "copy of the source tree"
mkdir "$tmp/libcowmm"
if git -C "$src" rev-parse --show-toplevel >/dev/null 2>&1; then
	# Tracked and new files as they are now, not build trees or .git.
	(cd "$src" && git ls-files -z --cached --others --exclude-standard |
		tar --null -T - --ignore-failed-read -cf - 2>/dev/null) |
		tar -xf - -C "$tmp/libcowmm"
else
	tar -C "$src" --exclude='./build*' --exclude=./.git -cf - . |
		tar -xf - -C "$tmp/libcowmm"
fi

step "dpkg-buildpackage -us -uc -b"
(cd "$tmp/libcowmm" &&
	DEB_BUILD_OPTIONS="nocheck parallel=$(nproc)" \
		dpkg-buildpackage -us -uc -b) >"$tmp/build.log" 2>&1 ||
	{ tail -n 60 "$tmp/build.log"; fail "dpkg-buildpackage"; }
grep -E '^dpkg-gensymbols|warning' "$tmp/build.log" || true
debs=()
for p in "${pkgs[@]}"; do
	f=$(ls "$tmp"/"${p}"_*.deb 2>/dev/null | head -1 || true)
	[ -n "$f" ] || fail "no $p package was built"
	debs+=("$f")
done
ls -l "${debs[@]}"

step "lintian"
changes=$(ls "$tmp"/libcowmm_*.changes)
lintian --fail-on error "$changes" \
	>"$tmp/lintian.log" 2>&1 || { cat "$tmp/lintian.log"; fail "lintian"; }
cat "$tmp/lintian.log"
echo "lintian: $(grep -c '^E:' "$tmp/lintian.log" || true) errors," \
	"$(grep -c '^W:' "$tmp/lintian.log" || true) warnings"

step "apt-get install ${pkgs[*]}"
added=1
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	"${debs[@]}" >"$tmp/install.log" 2>&1 ||
	{ cat "$tmp/install.log"; fail "apt-get install"; }
for p in "${pkgs[@]}"; do
	installed "$p" || fail "$p is not installed"
done

step "the installed files"
for f in /usr/bin/cowmmd /usr/bin/cowmmctl /lib/systemd/system/cowmmd.socket \
	/lib/systemd/system/cowmmd.service /usr/include/cowmm.h \
	/usr/include/cowmm_version.h; do
	[ -e "$f" ] || fail "$f is not installed"
done
for f in /usr/share/doc/libcowmm0/changelog.gz \
	/usr/share/doc/libcowmm0/copyright /usr/share/doc/cowmmd/cowmmd.md.gz \
	/usr/share/doc/libcowmm-dev/format.md.gz; do
	[ -e "$f" ] || fail "$f is not installed"
done
# The units as systemd reads them (no systemd runs as PID 1 on these
# machines, so they are checked offline, not started): every directive
# known, ExecStart= installed, and the sandbox's exposure score.
if command -v systemd-analyze >/dev/null; then
	systemd-analyze verify /lib/systemd/system/cowmmd.socket \
		/lib/systemd/system/cowmmd.service ||
		fail "systemd-analyze verify: the units have errors"
	systemd-analyze security --offline=yes --threshold=30 \
		/lib/systemd/system/cowmmd.service | tail -1 ||
		fail "systemd-analyze security: exposure above 3.0"
else
	echo "systemd-analyze not installed: units not verified"
fi
zcat /usr/share/doc/libcowmm0/changelog.gz | grep -q 'fault_around' ||
	fail "the changelog is not NEWS.md"
# Every exported symbol has its page where man looks (the .so links are
# symlinks now, as dh_installman makes them), and the others are there.
lib=$(dpkg -L libcowmm0 | grep '/libcowmm\.so\.0$')
syms=$(nm -D --defined-only "$lib" | awk '$3 ~ /^cowmm_/ { sub(/@.*/, "", $3); print $3 }')
[ "$(echo "$syms" | wc -l)" -ge 20 ] || fail "too few symbols in $lib"
for s in $syms libcowmm; do
	man -w 3 "$s" >/dev/null 2>&1 || fail "man 3 $s: no page"
done
for p in "1 cowmmd" "1 cowmmctl" "5 cowmm-snapshot"; do
	# shellcheck disable=SC2086 # section and name
	man -w $p >/dev/null 2>&1 || fail "man $p: no page"
done
echo "man pages: $(echo "$syms" | wc -l) functions, libcowmm(3), cowmmd(1)," \
	"cowmmctl(1), cowmm-snapshot(5)"
cowmmd --version
cowmmctl --help >/dev/null

step "the README's example, built with pkg-config against the package"
awk '/<!-- example: snap.c -->/ { f = 1; next }
     f && /^```c$/ { g = 1; next }
     g && /^```$/ { exit }
     g' "$src/README.md" >"$tmp/snap.c"
[ -s "$tmp/snap.c" ] || fail "no example program in README.md"
pcfile=$(pkg-config --variable=pcfiledir cowmm)/cowmm.pc
dpkg -S "$pcfile" | grep -q '^libcowmm-dev' || fail "$pcfile is not libcowmm-dev's"
flags=$(pkg-config --cflags --libs cowmm)
echo "pkg-config --cflags --libs cowmm: $flags"
# shellcheck disable=SC2086 # the flags are words
cc -Wall -Wextra -Werror -o "$tmp/snap" "$tmp/snap.c" $flags
so=$(ldd "$tmp/snap" | awk '$1 == "libcowmm.so.0" { print $3 }')
[ -n "$so" ] || fail "snap does not load libcowmm.so.0"
dpkg -S "$(realpath "$so")" 2>/dev/null | grep -q '^libcowmm0' ||
	dpkg -S "$so" | grep -q '^libcowmm0' || fail "$so is not libcowmm0's"
res=$("$tmp/snap")
echo "$res"
[ "$res" = "live: world, snapshot: hello" ] || fail "unexpected output"

if [ -n "$out" ]; then
	mkdir -p "$out"
	cp "${debs[@]}" "$changes" "$out"/
	echo "packages kept in $out"
fi

step "apt-get purge ${pkgs[*]}"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "${pkgs[@]}" \
	>"$tmp/purge.log" 2>&1 || { cat "$tmp/purge.log"; fail "apt-get purge"; }
added=0
for p in "${pkgs[@]}"; do
	! installed "$p" || fail "$p is still installed"
done
[ ! -e /usr/include/cowmm.h ] || fail "/usr/include/cowmm.h is left behind"
echo "ok: built, lintian-clean of errors, installed, used and removed in $SECONDS s"
