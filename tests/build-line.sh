#!/bin/sh
# SPDX-License-Identifier: MIT
#
# An example's one-line out-of-tree build, exactly as the header comment of
# its source gives it, against this build's library (meson's uninstalled
# cowmm.pc): it must build without a single diagnostic, as a user who
# copies it would want (an implicit declaration is an error in GCC 14).
#
# Usage: build-line.sh SOURCE BUILDDIR
set -eu
src=$1
build=$2
line=$(sed -n '/Build out of tree:/{n;s/^ \*  *//;p;q;}' "$src")
if [ -z "$line" ]; then
	echo "FAIL: no 'Build out of tree:' line in $src"
	exit 1
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp "$src" "$dir/"
cd "$dir"
echo "\$ $line"
export PKG_CONFIG_PATH="$build/meson-uninstalled"
if ! sh -c "$line" >out 2>&1; then
	cat out
	echo "FAIL: the build line in $src does not build"
	exit 1
fi
if [ -s out ]; then
	cat out
	echo "FAIL: the build line in $src builds with diagnostics"
	exit 1
fi
echo "ok: $(basename "$src") builds out of tree without a diagnostic"
