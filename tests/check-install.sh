#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# The README's "Installing", followed: its example program (the C block
# after '<!-- example: snap.c -->') built with pkg-config and run.
#
#   check-install.sh BUILDDIR README.md install [man|no-man]
#       meson install --destdir into a temporary directory; cowmm.pc,
#       cowmm.h and libcowmm.so must come from there, not from anywhere
#       else on the machine (checked: pkg-config's pcfiledir, the
#       compiler's dependency list, the linker's trace, ldd), the man
#       page of a function must be found under its prefix (unless
#       no-man: built without scdoc), and LICENSE,
#       NEWS.md and README.md in its share/doc/libcowmm.
#   check-install.sh BUILDDIR README.md uninstalled
#       The same against BUILDDIR/meson-uninstalled/cowmm-uninstalled.pc,
#       without installing: header from the source tree, library from the
#       build tree.
#
# Exit 77 (SKIP) only where the program builds but may not use
# userfaultfd (not root, no permission).
set -euo pipefail
build=$(cd "$1" && pwd)
readme=$2
mode=$3
with_man=${4:-man}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
	echo "FAIL: $*" >&2
	exit 1
}

awk '/<!-- example: snap.c -->/ { f = 1; next }
     f && /^```c$/ { g = 1; next }
     g && /^```$/ { exit }
     g' "$readme" > "$tmp/snap.c"
[ -s "$tmp/snap.c" ] || fail "no example program in $readme"

opt() {
	meson introspect "$build" --buildoptions |
		python3 -c 'import json, sys
print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == sys.argv[1]))' "$1"
}
prefix=$(opt prefix)
libdir=$(opt libdir)
includedir=$(opt includedir)
mandir=$(opt mandir)
case $libdir in /*) ;; *) libdir=$prefix/$libdir ;; esac
case $includedir in /*) ;; *) includedir=$prefix/$includedir ;; esac
case $mandir in /*) ;; *) mandir=$prefix/$mandir ;; esac

unset PKG_CONFIG_LIBDIR PKG_CONFIG_SYSROOT_DIR LD_LIBRARY_PATH
if [ "$mode" = install ]; then
	dest=$tmp/dest
	meson install -C "$build" --no-rebuild --quiet --destdir "$dest" \
		>"$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; fail "meson install"; }
	pcdir=$dest$libdir/pkgconfig
	want_h=$dest$includedir/cowmm.h
	want_lib=$dest$libdir
	# What the README says for a non-default prefix; the sysroot puts
	# the staging directory before the paths the .pc file names.
	export PKG_CONFIG_PATH=$pcdir PKG_CONFIG_SYSROOT_DIR=$dest
	export LD_LIBRARY_PATH=$want_lib
elif [ "$mode" = uninstalled ]; then
	pcdir=$build/meson-uninstalled
	want_h=$(cd "$(dirname "$readme")" && pwd)/include/cowmm.h
	want_lib=$build/libcowmm
	export PKG_CONFIG_PATH=$pcdir
	export LD_LIBRARY_PATH=$want_lib
else
	fail "mode: install or uninstalled, not $mode"
fi

got=$(pkg-config --variable=pcfiledir cowmm) || fail "pkg-config finds no cowmm"
[ "$got" = "$pcdir" ] || fail "pkg-config took cowmm from $got, not $pcdir"
flags=$(pkg-config --cflags --libs cowmm)
echo "pkg-config --cflags --libs cowmm: $flags"

# A library built with sanitizers (meson test --setup asan or tsan) needs
# a program built with them: their runtime must be loaded first.
san=$(opt b_sanitize)
sanflags=()
[ "$san" = none ] || sanflags=(-fsanitize="$san")
# shellcheck disable=SC2086 # the flags are words
${CC:-cc} -Wall -Wextra -Werror "${sanflags[@]}" -MD -MF "$tmp/snap.d" \
	-o "$tmp/snap" "$tmp/snap.c" $flags -Wl,--trace >"$tmp/cc.log" 2>&1 ||
	{ cat "$tmp/cc.log"; fail "cc"; }
h=$(tr ' \\' '\n\n' <"$tmp/snap.d" | grep '/cowmm\.h$' | head -1)
[ "$(realpath "$h")" = "$(realpath "$want_h")" ] ||
	fail "cowmm.h came from ${h:-nowhere}, not $want_h"
l=$(grep 'libcowmm\.so' "$tmp/cc.log" | head -1)
case $(realpath "$l" 2>/dev/null) in
"$(realpath "$want_lib")"/*) ;;
*) fail "the linker took ${l:-no libcowmm.so}, not one in $want_lib" ;;
esac
r=$(ldd "$tmp/snap" | awk '$1 == "libcowmm.so.0" { print $3 }')
case $(realpath "$r" 2>/dev/null) in
"$(realpath "$want_lib")"/*) ;;
*) fail "libcowmm.so.0 resolves to ${r:-nothing}, not one in $want_lib" ;;
esac

if [ "$mode" = install ]; then
	if [ "$with_man" = man ]; then
		page=$(man -M "$dest$mandir" -w cowmm_snap_read) ||
			fail "man cowmm_snap_read: no page under $dest$mandir"
		echo "man cowmm_snap_read: $page"
	fi
	datadir=$(opt datadir)
	case $datadir in /*) ;; *) datadir=$prefix/$datadir ;; esac
	for f in LICENSE NEWS.md README.md; do
		[ -s "$dest$datadir/doc/libcowmm/$f" ] ||
			fail "$f is not installed in $datadir/doc/libcowmm"
	done
fi

if ! out=$("$tmp/snap" 2>&1); then
	echo "$out"
	if [ "$(id -u)" -ne 0 ] && echo "$out" | grep -q 'not permitted'; then
		echo "SKIP: built, but userfaultfd is not allowed to this user"
		exit 77
	fi
	fail "the example program failed"
fi
echo "$out"
[ "$out" = "live: world, snapshot: hello" ] || fail "unexpected output"
echo "ok: the README's example built with pkg-config ($mode) and ran"
