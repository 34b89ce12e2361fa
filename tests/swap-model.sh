#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# The model tester over real swap: as root, add a swap file, run
# test-model with many MADV_PAGEOUT operations (region and clone pages
# pushed out, then read, written, discarded, cloned and snapshotted while
# swapped), and remove the swap file again, whatever happens.
#
# Usage: tests/swap-model.sh path/to/test-model [seconds]
# Exit 77 (skip) when not root or when the kernel refuses swapon; the
# reason is printed.
set -uo pipefail

model=${1:?usage: swap-model.sh path/to/test-model [seconds]}
seconds=${2:-${COWMM_SWAP_SECONDS:-60}}
size_mib=${COWMM_SWAP_MIB:-1024}

if [ "$(id -u)" != 0 ]; then
	echo "SKIP swap-model: needs root (swapon)"
	exit 77
fi
for tool in mkswap swapon swapoff; do
	if ! command -v "$tool" >/dev/null; then
		echo "SKIP swap-model: $tool not found"
		exit 77
	fi
done

dir=${COWMM_SWAP_DIR:-/var/tmp}
swapfile=$(mktemp "$dir/cowmm-swap.XXXXXX") || {
	echo "SKIP swap-model: cannot create a file in $dir"
	exit 77
}
active=0
cleanup() {
	if [ "$active" = 1 ]; then
		swapoff "$swapfile" || echo "swap-model: swapoff $swapfile failed"
	fi
	rm -f "$swapfile"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

chmod 600 "$swapfile"
# fallocate makes a file swapon refuses on some filesystems: dd then.
if ! fallocate -l "${size_mib}M" "$swapfile" 2>/dev/null; then
	dd if=/dev/zero of="$swapfile" bs=1M count="$size_mib" status=none || {
		echo "SKIP swap-model: cannot write a ${size_mib} MiB swap file in $dir"
		exit 77
	}
fi
mkswap "$swapfile" >/dev/null || {
	echo "SKIP swap-model: mkswap $swapfile failed"
	exit 77
}
if ! err=$(swapon "$swapfile" 2>&1); then
	# retry with a file written out in full (holes are refused)
	dd if=/dev/zero of="$swapfile" bs=1M count="$size_mib" status=none &&
		mkswap "$swapfile" >/dev/null &&
		err=$(swapon "$swapfile" 2>&1) || {
		echo "SKIP swap-model: swapon refused: $err"
		exit 77
	}
fi
active=1
echo "swap-model: ${size_mib} MiB of swap at $swapfile; model for $seconds s"
swapon --show

COWMM_MODEL_SECONDS=$seconds COWMM_MODEL_PAGEOUT=${COWMM_MODEL_PAGEOUT:-25} \
	"$model"
status=$?
grep -E '^(SwapTotal|SwapFree)' /proc/meminfo
exit $status
