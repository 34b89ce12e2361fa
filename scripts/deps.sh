#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Install the Debian packages libcowmm needs to build and test it; with
# --bench, also those the benchmarks compare against (Redis); with --deb,
# those that build and check its Debian packages (scripts/deb.sh).
# Idempotent:
# packages already installed are left alone, and apt is only asked when
# something is missing.
set -euo pipefail

pkgs=(
	meson ninja-build pkg-config gcc clang python3
	liburcu-dev libuv1-dev check liburing-dev
	libclang-rt-14-dev cppcheck clang-tidy
	systemd # systemd-socket-activate, for the daemon's socket activation test
	scdoc   # the man pages (man/), 47 KiB where pandoc is 168 MiB
	groff-base man-db # the man test renders every page (groff -ww, man -l)
)
for opt in "$@"; do
	case "$opt" in
	# The database benchmark also runs Debian's Redis and its redis-benchmark.
	--bench) pkgs+=(redis-server redis-tools gnuplot-nox) ;;
	# dpkg-buildpackage -b with debhelper (debian/), then lintian.
	--deb) pkgs+=(dpkg-dev debhelper fakeroot lintian) ;;
	*) echo "usage: $0 [--bench] [--deb]" >&2; exit 2 ;;
	esac
done

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
		missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
	echo "deps: all ${#pkgs[@]} packages present"
	exit 0
fi

echo "deps: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
