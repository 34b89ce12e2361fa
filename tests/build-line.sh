#!/bin/sh
# SPDX-License-Identifier: MIT
#
# An example's one-line out-of-tree build, exactly as the header comment of
# its source gives it, against this build's library (meson's uninstalled
# cowmm.pc): it must build without a single diagnostic, as a user who
# copies it would want (an implicit declaration is an error in GCC 14).
# In a sanitizer build (SANITIZE not "none") the library pulls in the
# sanitizer's runtime, whose own link-time warnings (tmpnam) are not the
# example's and are left out.
#
# Usage: build-line.sh SOURCE BUILDDIR [SANITIZE]
set -eu
src=$1
build=$2
sanitize=${3:-none}
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
if [ "$sanitize" != none ]; then
	grep -v ': [^ ]*/lib[a-z]*san\.so[.0-9]*: warning: ' out >kept || :
	mv kept out
fi
if [ -s out ]; then
	cat out
	echo "FAIL: the build line in $src builds with diagnostics"
	exit 1
fi
echo "ok: $(basename "$src") builds out of tree without a diagnostic"
