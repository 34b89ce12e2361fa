#!/bin/sh
# SPDX-License-Identifier: MIT
# Only cowmm_* symbols may be exported from the shared library.
set -eu
lib=$1
syms=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRVW]$/ {print $3}' | sed 's/@.*//')
bad=$(printf '%s\n' "$syms" | grep -v '^cowmm_' | grep -v '^COWMM_' || true)
if [ -n "$bad" ]; then
	echo "exported symbols outside the cowmm_ namespace:"
	echo "$bad"
	exit 1
fi
printf '%s\n' "$syms" | grep -q '^cowmm_open$' || { echo "cowmm_open not exported"; exit 1; }
n=$(printf '%s\n' "$syms" | grep -c '^cowmm_')
echo "ok: $n cowmm_ symbols, nothing else exported"
