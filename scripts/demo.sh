#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Build libcowmm and run the end-to-end demo on its built-in defaults: a
# 256 MiB region, two writer threads, a snapshot taken and verified while
# they write.  Extra arguments go to the demo (--size MiB, --writers N,
# --seconds S, --thp).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh >/dev/null
[ -d build ] || meson setup build >/dev/null
ninja -C build >/dev/null
exec ./build/examples/snapshot-demo "$@"
