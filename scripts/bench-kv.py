#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The database case: redis-benchmark against kvstore while it BGSAVEs, with
libcowmm snapshots (in every mode kvstore offers) and with fork(), and
against Debian's redis-server doing its own fork-based BGSAVE on the same
data.

For each server: load KEYS keys of VALUE bytes; for SET and GET, without
and with pipelining (-P 16), run redis-benchmark once with no save and once
while BGSAVE runs back to back; record throughput, the latency distribution
(redis-benchmark's percentiles), the pause of each save (snapshot or fork),
save duration and the peak Pss of the server and its children.  Then one
client's SET latency over time around a single BGSAVE.  All of it RUNS
times (default 3), the servers in a rotated order each run so that a slow
stretch of the host does not fall on one server alone; the tables give
medians over the runs, with the range where it matters, and ratios to
kvstore --fork.

Two charts (gnuplot, PNG): OUT-cdf.png, the latency distribution during
saves (every run, one colour per server), and OUT-timeline.png, the 99th
percentile and the maximum of one client's SET latency per 100 ms window
around one BGSAVE (first run).

Usage: bench-kv.py BUILD_DIR OUT_PREFIX [--runs N] [--keys N] [--quick]
Writes OUT_PREFIX.csv (one row per run), OUT_PREFIX.md, OUT_PREFIX-cdf.png
and OUT_PREFIX-timeline.png.
"""
import argparse
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time


def pss_kb(pid):
    total = 0
    pids = [pid]
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port)] + list(args),
                         capture_output=True, text=True, timeout=60)
    return out.stdout


def info(port):
    d = {}
    for line in cli(port, "INFO").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            d[k.strip()] = v.strip()
    return d


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def bench(port, requests, keys, value, pipeline, test="set"):
    """One redis-benchmark run: (rps, p50, p99, p999, distribution), in ms;
    the distribution is redis-benchmark's [(percentile, ms), ...]."""
    out = subprocess.run(
        ["redis-benchmark", "-p", str(port), "-t", test, "-n", str(requests),
         "-r", str(keys), "-d", str(value), "-P", str(pipeline), "-c", "20"],
        capture_output=True, text=True, timeout=1200).stdout
    rps = float(re.search(r"throughput summary: ([\d.]+)", out).group(1))
    pct = {}
    for m in re.finditer(r"([\d.]+)% <= ([\d.]+) milliseconds", out):
        pct[float(m.group(1))] = float(m.group(2))

    def at(p):
        return min(v for k, v in pct.items() if k >= p)
    return rps, at(50), at(99), at(99.9), sorted(pct.items())


def run_server(kind, build, port, tmp, heap_mib):
    if kind == "redis":
        cmd = ["redis-server", "--port", str(port), "--save", "",
               "--appendonly", "no", "--dir", tmp, "--dbfilename",
               "dump.rdb", "--bind", "127.0.0.1", "--protected-mode", "no"]
    else:
        # --no-save: no save at exit, as redis-server's --save "".
        cmd = [os.path.join(build, "examples", "kvstore"), "--port",
               str(port), "--heap", str(heap_mib), "--dump",
               os.path.join(tmp, f"{kind}.dump"), "--no-save"]
        cmd += KVSTORE_FLAGS[kind] + EXTRA
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_port(port)
    return p


EXTRA = []
WORKLOADS = [("set", 1), ("get", 1), ("set", 16), ("get", 16)]
# Servers: kvstore in its modes, and Debian's redis-server when installed.
KVSTORE_FLAGS = {
    "kvstore-cowmm": [],                          # stream-and-release saves
    "kvstore-cowmm-armed": ["--keep-armed"],      # write, then release
    "kvstore-cowmm-inthread": ["--in-thread"],    # faults in the server thread
    "kvstore-cowmm-follow": ["--follow"],         # worker on the writer's CPU
    "kvstore-cowmm-thp": ["--thp"],               # heap on huge pages
    "kvstore-cowmm-huge": ["--huge-cow"],         # huge pages, 2 MiB copies
    "kvstore-fork": ["--fork"],
}


def timeline(port, seconds, save_at):
    """SET latency of one client over time, a BGSAVE at @save_at s."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out, t0, saved, i = [], time.monotonic(), False, 0
    while True:
        now = time.monotonic() - t0
        if now > seconds:
            break
        if not saved and now >= save_at:
            cli(port, "BGSAVE")
            saved = True
        key = b"key:%d" % (i * 7919 % 1000000)
        req = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$8\r\nxxxxxxxx\r\n" % (len(key), key)
        a = time.monotonic()
        s.sendall(req)
        buf = b""
        while not buf.endswith(b"\r\n"):
            buf += s.recv(64)
        out.append((a - t0, (time.monotonic() - a) * 1000))
        i += 1
    s.close()
    return out


def measure(kind, build, port, args, tmp):
    p = run_server(kind, build, port, tmp, args.heap)
    try:
        # Load the data set.
        bench(port, args.keys, args.keys, args.value, 64)
        res = dict(kind=kind, runs={}, pss0_mib=pss_kb(p.pid) / 1024)
        peak, pauses, durations = [0], [], []
        for test, pipe in args.workloads:
            base = bench(port, args.requests, args.keys, args.value, pipe, test)
            saves = [0]
            stop = threading.Event()

            def saver():
                while not stop.is_set():
                    cli(port, "BGSAVE")
                    while not stop.is_set():
                        peak[0] = max(peak[0], pss_kb(p.pid))
                        i = info(port)
                        if i.get("rdb_bgsave_in_progress") == "0":
                            break
                        time.sleep(0.02)
                    i = info(port)
                    if i.get("rdb_last_bgsave_status") == "ok":
                        saves[0] += 1
                        if kind == "redis":
                            pauses.append(int(i.get("latest_fork_usec", 0)) / 1000)
                            durations.append(float(i.get("rdb_last_bgsave_time_sec", 0)) * 1000)
                        else:
                            pauses.append(float(i.get("rdb_last_bgsave_pause_ms", 0)))
                            durations.append(float(i.get("rdb_last_bgsave_duration_ms", 0)))
                    time.sleep(0.05)
            t = threading.Thread(target=saver)
            t.start()
            f0 = int(info(port).get("cowmm_wp_faults", 0))
            during = bench(port, args.requests, args.keys, args.value, pipe, test)
            stop.set()
            t.join()
            faults = int(info(port).get("cowmm_wp_faults", 0)) - f0
            res["runs"][(test, pipe)] = (base, during, saves[0], faults)
        while info(port).get("rdb_bgsave_in_progress") == "1":
            time.sleep(0.05)
        res["timeline"] = timeline(port, args.timeline, 1.0)
        res.update(pause_ms=med(pauses), save_ms=med(durations),
                   peak_mib=peak[0] / 1024)
        return res
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
           "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


def med(v):
    v = sorted(v)
    if not v:
        return float("nan")
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def gnuplot(script):
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


def plot_cdf(results, workloads, out, tmp):
    """Latency distribution during saves: one panel per SET workload, every
    run a line, one colour per server.  The x axis counts nines (90%, 99%,
    99.9%) so that the tail, where saves hurt, gets the room."""
    panels = [w for w in workloads if w[0] == "set"] or workloads[:1]
    script = (f"set terminal pngcairo noenhanced size 1100,{460 * len(panels)} "
              f"font 'sans,10'\nset output '{out}-cdf.png'\n"
              f"set multiplot layout {len(panels)},1\n"
              "set logscale y\nset grid\nset key top left\n"
              "set xlabel 'percentile of requests'\n"
              "set ylabel 'latency (ms, log scale)'\n"
              "set xtics ('0%%' 0, '90%%' 1, '99%%' 2, '99.9%%' 3, '99.99%%' 4, "
              "'99.999%%' 5)\nset xrange [0:5]\n")
    for test, pipe in panels:
        lines = []
        for k, (kind, runs) in enumerate(results.items()):
            for i, res in enumerate(runs):
                dist = res["runs"][(test, pipe)][1][4]
                path = os.path.join(tmp, f"cdf-{kind}-{test}{pipe}-{i}.dat")
                with open(path, "w") as f:
                    for pct, ms in dist:
                        if pct < 100:
                            f.write(f"{-math.log10(1 - pct / 100):.5f} {ms}\n")
                title = f"title '{kind}'" if i == 0 else "notitle"
                lines.append(f"'{path}' using 1:2 with steps lw 1.5 "
                             f"lc rgb '{COLOURS[k % len(COLOURS)]}' {title}")
        script += (f"set title '{test.upper()} -P {pipe}: latency while BGSAVE "
                   f"runs back to back ({len(runs)} runs each)'\n"
                   "plot " + ", ".join(lines) + "\n")
    gnuplot(script + "unset multiplot\n")


def plot_timeline(results, out, tmp, window=0.1):
    """One client's SET latency around one BGSAVE: the 99th percentile and
    the maximum per window, per server (first run)."""
    lines = []
    for k, (kind, runs) in enumerate(results.items()):
        buckets = {}
        for t, ms in runs[0]["timeline"]:
            buckets.setdefault(int(t / window), []).append(ms)
        path = os.path.join(tmp, f"timeline-{kind}.dat")
        with open(path, "w") as f:
            for b in sorted(buckets):
                v = sorted(buckets[b])
                p99 = v[min(len(v) - 1, int(len(v) * 0.99))]
                f.write(f"{(b + 0.5) * window:.3f} {p99} {v[-1]}\n")
        c = COLOURS[k % len(COLOURS)]
        lines.append(f"'{path}' using 1:2 with lines lw 2 lc rgb '{c}' "
                     f"title '{kind}, p99'")
        lines.append(f"'{path}' using 1:3 with lines lw 1 dt 2 lc rgb '{c}' "
                     f"title '{kind}, max'")
    gnuplot(f"set terminal pngcairo noenhanced size 1100,600 font 'sans,10'\n"
            f"set output '{out}-timeline.png'\n"
            "set title 'SET latency of one client per "
            f"{window * 1000:.0f} ms window, BGSAVE at t = 1 s'\n"
            "set xlabel 'time (s)'\nset ylabel 'latency (ms, log scale)'\n"
            "set logscale y\nset grid\nset key outside right\n"
            "plot " + ", ".join(lines) + "\n")


def spread(v, fmt):
    """Median, and the range over the runs when there are several."""
    m = fmt(med(v))
    return m if len(v) < 2 else f"{m} ({fmt(min(v))}–{fmt(max(v))})"


def write_md(results, args, path):
    rps = lambda x: f"{x:,.0f}"
    ms = lambda x: f"{x:.1f}"
    fork = results.get("kvstore-fork")
    with open(path, "w") as f:
        f.write(f"redis-benchmark, {args.keys:,} keys of {args.value} bytes, "
                f"{args.requests:,} requests per run, 20 clients; 'during' = "
                "while BGSAVE runs back to back.  Medians of "
                f"{args.runs} run{'s' if args.runs > 1 else ''}, the range "
                "over the runs in brackets; × fork: the median against "
                "kvstore --fork's median (throughput: above 1 is better; "
                "latency and memory: below 1 is better).\n\n")
        f.write("| server | test | rps, no save | rps, during saves | × fork "
                "| p99.9 ms, no save | p99.9 ms, during saves | × fork "
                "| p99 ms, during | saves | libcowmm write faults |\n"
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for kind, runs in results.items():
            for test, pipe in args.workloads:
                r = [x["runs"][(test, pipe)] for x in runs]
                d_rps = [x[1][0] for x in r]
                d_999 = [x[1][3] for x in r]
                if fork:
                    fr = [x["runs"][(test, pipe)] for x in fork]
                    x_rps = f"{med(d_rps) / med([x[1][0] for x in fr]):.2f}"
                    x_999 = f"{med(d_999) / med([x[1][3] for x in fr]):.2f}"
                else:
                    x_rps = x_999 = "–"
                faults = (rps(med([x[3] for x in r]))
                          if kind.startswith("kvstore-cowmm") else "–")
                f.write(f"| {kind} | {test.upper()} -P {pipe} "
                        f"| {rps(med([x[0][0] for x in r]))} "
                        f"| {spread(d_rps, rps)} | {x_rps} "
                        f"| {ms(med([x[0][3] for x in r]))} "
                        f"| {spread(d_999, ms)} | {x_999} "
                        f"| {ms(med([x[1][2] for x in r]))} "
                        f"| {med([x[2] for x in r]):.0f} | {faults} |\n")
        f.write("\n| server | pause per save | save duration | Pss before "
                "| peak Pss during saves | peak × fork |\n"
                "|---|---:|---:|---:|---:|---:|\n")
        for kind, runs in results.items():
            peak = [x["peak_mib"] for x in runs]
            x_peak = (f"{med(peak) / med([x['peak_mib'] for x in fork]):.2f}"
                      if fork else "–")
            f.write(f"| {kind} "
                    f"| {spread([x['pause_ms'] for x in runs], lambda v: f'{v:.2f} ms')} "
                    f"| {med([x['save_ms'] for x in runs]):.0f} ms "
                    f"| {med([x['pss0_mib'] for x in runs]):.0f} MiB "
                    f"| {spread(peak, lambda v: f'{v:.0f} MiB')} | {x_peak} |\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("out")
    ap.add_argument("--runs", type=int, default=3,
                    help="repeat everything this often (medians; default 3)")
    ap.add_argument("--keys", type=int, default=1000000)
    ap.add_argument("--value", type=int, default=200)
    ap.add_argument("--requests", type=int, default=200000)
    ap.add_argument("--heap", type=int, default=2048)
    ap.add_argument("--timeline", type=float, default=6.0)
    ap.add_argument("--quick", action="store_true",
                    help="small data, one run: does it work at all")
    ap.add_argument("--kinds", default=",".join(list(KVSTORE_FLAGS) +
                                                ["redis"]),
                    help="servers, from: " + ", ".join(KVSTORE_FLAGS) +
                    ", redis (default: all)")
    ap.add_argument("--workloads", default="set:1,get:1,set:16,get:16",
                    help="TEST:PIPELINE,...")
    ap.add_argument("--kvstore-args", default="",
                    help="more kvstore options, for every kvstore server")
    args = ap.parse_args()
    EXTRA.extend(args.kvstore_args.split())
    args.workloads = [(t, int(p)) for t, p in
                      (w.split(":") for w in args.workloads.split(","))]
    if args.quick:
        args.keys, args.requests, args.heap, args.timeline = 20000, 20000, 128, 2
        args.runs = 1
    if args.runs < 1:
        ap.error(f"--runs {args.runs}: at least 1")
    kinds = args.kinds.split(",")
    for k in kinds:
        if k != "redis" and k not in KVSTORE_FLAGS:
            ap.error(f"unknown server {k}")
    if "redis" in kinds and not shutil.which("redis-server"):
        print("bench-kv: redis-server is not installed: measuring without it")
        kinds.remove("redis")
    results = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            order = kinds[run % len(kinds):] + kinds[:run % len(kinds)]
            for i, kind in enumerate(order):
                print(f"bench-kv: run {run + 1} of {args.runs}: {kind} "
                      f"({i + 1} of {len(order)})", flush=True)
                res = measure(kind, args.build,
                              28000 + os.getpid() % 1000 + i, args, tmp)
                res["run"] = run + 1
                results[kind].append(res)
        with open(args.out + ".csv", "w") as f:
            f.write("server,run,test,pipeline,phase,rps,p50_ms,p99_ms,p999_ms,"
                    "saves,wp_faults,pause_ms,save_ms,pss_before_mib,"
                    "peak_pss_mib\n")
            for kind, runs in results.items():
                for r in runs:
                    for (test, pipe), (base, during, saves, faults) in \
                            r["runs"].items():
                        for phase, v in (("base", base), ("during", during)):
                            f.write(f"{kind},{r['run']},{test},{pipe},{phase},"
                                    f"{v[0]:.0f},{v[1]},{v[2]},{v[3]},"
                                    f"{saves},{faults},{r['pause_ms']:.3f},"
                                    f"{r['save_ms']:.0f},{r['pss0_mib']:.0f},"
                                    f"{r['peak_mib']:.0f}\n")
        if shutil.which("gnuplot"):
            plot_cdf(results, args.workloads, args.out, tmp)
            plot_timeline(results, args.out, tmp)
        else:
            print("bench-kv: gnuplot is not installed: no charts")
    write_md(results, args, args.out + ".md")
    print(open(args.out + ".md").read())


if __name__ == "__main__":
    main()
