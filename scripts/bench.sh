#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
#
# Run the benchmarks in a release build of their own (build-bench/) and
# write the results: bench/results/<name>.csv (one row per figure) and a
# Markdown summary, bench/results/<name>.md, that bench/README.md quotes; then
# the database case (kvstore and Debian's redis-server under
# redis-benchmark while they BGSAVE): bench/results/<name>-kv.{csv,md}.
#
# Usage: scripts/bench.sh [--quick] [name]        (default name: latest)
# Environment: SIZES (MiB, default 256,1024), RUNS (default 5),
#              KINDS (page kinds, default 4k,thp,thp2m: see bench-cow),
#              SAMPLE (pages timed per run, default 16384),
#              KV=0 to skip the database case
# Also: bench/results/<name>-fault-latency.png, the distribution of
# first-write latency (kernel COW after fork, libcowmm with a worker,
# libcowmm in-thread) from the smallest size, when gnuplot is there.
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
		./build-bench/bench/bench-floor --quick
	else
		./build-bench/bench/bench-cow --sizes "${SIZES:-256,1024}" \
			--kinds "${KINDS:-4k,thp,thp2m}" \
			--runs "${RUNS:-5}" --sample "${SAMPLE:-16384}" \
			--dump bench/results
		./build-bench/bench/bench-pin
		./build-bench/bench/bench-floor --runs "${RUNS:-5}"
	fi
} > "$out.tmp"
mv "$out.tmp" "$out"
python3 scripts/bench-table.py "$out" > "bench/results/$name.md"
cat "bench/results/$name.md"
size=$(echo "${SIZES:-256,1024}" | cut -d, -f1)
if [ -z "$quick" ] && command -v gnuplot >/dev/null; then
	gnuplot <<-EOF
	set terminal pngcairo noenhanced size 900,520 font "sans,11"
	set output "bench/results/$name-fault-latency.png"
	set title "First write to a page while a snapshot lives: ${size} MiB, 4 KiB pages, random order"
	set xlabel "latency (µs, log scale)"
	set ylabel "fraction of writes at most that long"
	set logscale x
	set xrange [5:5000]
	set key bottom right
	set grid
	plot "bench/results/lat-4k-${size}-fork.dat" using 1:2 with lines lw 2 title "kernel COW after fork()", \
	     "bench/results/lat-4k-${size}-cowmm-inthread.dat" using 1:2 with lines lw 2 title "libcowmm, in-thread (COWMM_OPEN_IN_THREAD)", \
	     "bench/results/lat-4k-${size}-cowmm.dat" using 1:2 with lines lw 2 title "libcowmm, worker thread (default)"
	EOF
	echo "chart: bench/results/$name-fault-latency.png"
fi
[ "${KV:-1}" = 0 ] && exit 0
python3 scripts/bench-kv.py build-bench "bench/results/$name-kv" $quick
echo "results: bench/results/$name.{csv,md} bench/results/$name-kv.{csv,md}"
