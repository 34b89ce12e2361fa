#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Run the benchmarks in a release build of their own (build-bench/) and
# write the results: bench/results/<name>.csv (one row per figure) and a
# Markdown summary, bench/results/<name>.md, that the README quotes; then
# the database case (kvstore and Debian's redis-server under
# redis-benchmark while they BGSAVE): bench/results/<name>-kv.{csv,md}.
#
# Usage: scripts/bench.sh [--quick] [name]        (default name: latest)
# Environment: SIZES (MiB, default 256,1024), RUNS (default 5),
#              SAMPLE (pages timed per run, default 16384)
set -euo pipefail
cd "$(dirname "$0")/.."

quick=""
if [ "${1:-}" = "--quick" ]; then
	quick=--quick
	shift
fi
name=${1:-latest}

./scripts/deps.sh --bench >/dev/null
[ -d build-bench ] || meson setup build-bench --buildtype=release -Dtests=disabled >/dev/null
ninja -C build-bench >/dev/null

mkdir -p bench/results
out=bench/results/$name.csv
{
	echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r) $(nproc) cpus"
	if [ -n "$quick" ]; then
		./build-bench/bench/bench-cow --quick
		./build-bench/bench/bench-pin --quick
	else
		./build-bench/bench/bench-cow --sizes "${SIZES:-256,1024}" \
			--runs "${RUNS:-5}" --sample "${SAMPLE:-16384}"
		./build-bench/bench/bench-pin
	fi
} > "$out.tmp"
mv "$out.tmp" "$out"
python3 scripts/bench-table.py "$out" > "bench/results/$name.md"
cat "bench/results/$name.md"
python3 scripts/bench-kv.py build-bench "bench/results/$name-kv" $quick
echo "results: bench/results/$name.{csv,md} bench/results/$name-kv.{csv,md}"
