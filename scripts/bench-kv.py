#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The database case: redis-benchmark against kvstore while it BGSAVEs, with
libcowmm snapshots and with fork(), and against Debian's redis-server doing
its own fork-based BGSAVE on the same data.

For each server: load KEYS keys of VALUE bytes; for SET and GET, without
and with pipelining (-P 16), run redis-benchmark once with no save and once
while BGSAVE runs back to back; record throughput, p50/p99/p99.9 latency,
the pause of each save (snapshot or fork), save duration and the peak Pss
of the server and its children.  Then one client's SET latency over time
around a single BGSAVE, every server on one chart (gnuplot, PNG).

Usage: bench-kv.py BUILD_DIR OUT_PREFIX [--keys N] [--requests N] [--quick]
Writes OUT_PREFIX.csv, OUT_PREFIX.md and OUT_PREFIX-timeline.png.
"""
import argparse
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
    """One redis-benchmark run; returns (rps, p50, p99, p999) in ms."""
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
    return rps, at(50), at(99), at(99.9)


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
        med = lambda v: sorted(v)[len(v) // 2] if v else float("nan")
        res.update(pause_ms=med(pauses), save_ms=med(durations),
                   peak_mib=peak[0] / 1024)
        return res
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)


def plot(rows, out):
    """Latency over time around one BGSAVE, every server on one chart."""
    if not shutil.which("gnuplot"):
        return
    files = []
    for r in rows:
        path = f"{out}-timeline-{r['kind']}.dat"
        with open(path, "w") as f:
            for t, ms in r["timeline"]:
                f.write(f"{t:.6f} {ms:.4f}\n")
        files.append((path, r["kind"]))
    script = (f"set terminal pngcairo size 1100,600\nset output '{out}-timeline.png'\n"
              "set title 'SET latency of one client, BGSAVE at t = 1 s'\n"
              "set xlabel 'time (s)'\nset ylabel 'latency (ms)'\nset logscale y\n"
              "set grid\nplot " + ", ".join(
                  f"'{p}' using 1:2 with points pt 7 ps 0.3 title '{k}'"
                  for p, k in files) + "\n")
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("out")
    ap.add_argument("--keys", type=int, default=1000000)
    ap.add_argument("--value", type=int, default=200)
    ap.add_argument("--requests", type=int, default=200000)
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--heap", type=int, default=2048)
    ap.add_argument("--timeline", type=float, default=6.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", default="kvstore-cowmm,kvstore-cowmm-armed,"
                    "kvstore-cowmm-huge,kvstore-fork,redis",
                    help="servers, from: " + ", ".join(KVSTORE_FLAGS) +
                    ", redis")
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
    kinds = args.kinds.split(",")
    for k in kinds:
        if k != "redis" and k not in KVSTORE_FLAGS:
            ap.error(f"unknown server {k}")
    if "redis" in kinds and not shutil.which("redis-server"):
        kinds.remove("redis")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, kind in enumerate(kinds):
            rows.append(measure(kind, args.build, 28000 + os.getpid() % 1000 + i,
                                args, tmp))
    with open(args.out + ".csv", "w") as f:
        f.write("server,test,pipeline,phase,rps,p50_ms,p99_ms,p999_ms,saves,"
                "wp_faults,pause_ms,save_ms,pss_before_mib,peak_pss_mib\n")
        for r in rows:
            for (test, pipe), (base, during, saves, faults) in r["runs"].items():
                for phase, v in (("base", base), ("during", during)):
                    f.write(f"{r['kind']},{test},{pipe},{phase},{v[0]:.0f},"
                            f"{v[1]},{v[2]},{v[3]},{saves},{faults},"
                            f"{r['pause_ms']:.3f},"
                            f"{r['save_ms']:.0f},{r['pss0_mib']:.0f},"
                            f"{r['peak_mib']:.0f}\n")
    plot(rows, args.out)
    with open(args.out + ".md", "w") as f:
        f.write(f"redis-benchmark, {args.keys} keys of {args.value} bytes, "
                f"{args.requests} requests per run, 20 clients; 'during' = "
                "while BGSAVE runs back to back.\n\n")
        f.write("| server | test | rps no save → during save | p99 / p99.9 ms, no save "
                "| p99 / p99.9 ms, during save | saves | libcowmm write faults "
                "during |\n|---|---|---:|---:|---:|---:|---:|\n")
        for r in rows:
            for (test, pipe), (b, d, saves, faults) in r["runs"].items():
                fl = f"{faults:,}" if r["kind"].startswith("kvstore-cowmm") else "–"
                f.write(f"| {r['kind']} | {test.upper()} -P {pipe} | {b[0]:,.0f} → "
                        f"{d[0]:,.0f} ({d[0] / b[0]:.0%}) | {b[2]} / {b[3]} "
                        f"| {d[2]} / {d[3]} | {saves} | {fl} |\n")
        f.write("\n| server | pause per save (median) | save duration (median) "
                "| Pss before → peak during saves |\n|---|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['kind']} | {r['pause_ms']:.2f} ms | {r['save_ms']:.0f} ms "
                    f"| {r['pss0_mib']:.0f} → {r['peak_mib']:.0f} MiB |\n")
    print(open(args.out + ".md").read())


if __name__ == "__main__":
    main()
