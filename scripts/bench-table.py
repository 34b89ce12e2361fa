#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Turn bench-cow/bench-pin CSV into the Markdown tables bench/README.md quotes."""
import csv
import sys


def main(path):
    cow, pin, floor, head = [], [], [], ""
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                head = (head + "; " if head else "") + line[1:].strip()
                continue
            if line.startswith("bench,"):
                continue
            row = next(csv.reader([line]))
            {"cow": cow, "floor": floor}.get(row[0], pin).append(row)

    print(f"Run: {head}\n")
    if cow:
        cow_tables(cow)
    if floor:
        floor_table(floor)
    if pin:
        pin_table(pin)


def cow_tables(cow):
    """bench-cow: pauses, first-write costs, memory."""
    sizes = sorted({(r[2], r[3]) for r in cow}, key=lambda s: (s[1], int(s[0])))
    get = {(r[1], r[2], r[3], r[4], r[5]): r for r in cow}

    def fig(metric, size, kind, method, order="-", col=6):
        r = get.get((metric, size, kind, method, order))
        return float(r[col]) if r else None

    print("Snapshot pause (call to return; median, min–max).  Repeat: a "
          "second snapshot of the same region once the first was released "
          "and the sampled pages written (the rest are still protected):\n")
    print("| region | libcowmm | fork() | fork / libcowmm | libcowmm, repeat |")
    print("|---|---:|---:|---:|---:|")
    for size, kind in sizes:
        c, f = fig("pause_ms", size, kind, "cowmm"), fig("pause_ms", size, kind, "fork")
        cr = get[("pause_ms", size, kind, "cowmm", "-")]
        fr = get[("pause_ms", size, kind, "fork", "-")]
        rr = get.get(("pause_repeat_ms", size, kind, "cowmm", "-"))
        rep = f"{float(rr[6]):.2f} ms ({float(rr[7]):.2f}–{float(rr[8]):.2f})" if rr else "–"
        print(f"| {size} MiB {kind} | {c:.2f} ms ({float(cr[7]):.2f}–{float(cr[8]):.2f}) "
              f"| {f:.2f} ms ({float(fr[7]):.2f}–{float(fr[8]):.2f}) | {f / c:.1f}× | {rep} |")

    if not any(fig("write_p50", size, kind, "fork", "random") for size, kind in sizes):
        return  # bench-cow --pause-only
    print("\nFirst write to a page while a snapshot (libcowmm) or a fork child "
          "(kernel COW) holds the old bytes, ns (p50 / p99 / p99.9), against "
          "a plain write.  libcowmm resolves the fault in a worker thread "
          "(default) or in the writing thread (COWMM_OPEN_IN_THREAD):\n")
    print("| region | order | libcowmm, worker | libcowmm, in-thread | kernel COW after fork() "
          "| plain write | p50 / kernel: worker, in-thread |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size, kind in sizes:
        for order in ("seq", "random"):
            cells = []
            for m in ("cowmm", "cowmm-inthread", "fork", "plain"):
                p = [fig(x, size, kind, m, order) for x in ("write_p50", "write_p99", "write_p999")]
                cells.append(" / ".join("–" if v is None else f"{v:,.0f}" for v in p))
            k = fig("write_p50", size, kind, "fork", order)
            w = fig("write_p50", size, kind, "cowmm", order)
            t = fig("write_p50", size, kind, "cowmm-inthread", order)
            ratio = f"{w / k:.2g}×, " + (f"{t / k:.2g}×" if t else "–")
            if order == "seq":  # most writes do not fault: see throughput
                ratio = "see below"
            print(f"| {size} MiB {kind} | {order} | {cells[0]} | {cells[1]} | {cells[2]} "
                  f"| {cells[3]} | {ratio} |")

    print("\nSequential first writes (the first pages of the region, one "
          "after another): cost per page over the whole pass, mean ns, and "
          "throughput against the kernel's COW (above 1×: faster than it).  "
          "libcowmm's fault-around preserves and unprotects the pages ahead "
          "of a sequential writer:\n")
    print("| region | libcowmm, worker | libcowmm, in-thread | kernel COW after fork() "
          "| plain write | throughput / kernel: worker, in-thread |")
    print("|---|---:|---:|---:|---:|---:|")
    for size, kind in sizes:
        v = [fig("write_mean", size, kind, m, "seq")
             for m in ("cowmm", "cowmm-inthread", "fork", "plain")]
        if None in v:
            continue
        print(f"| {size} MiB {kind} | {v[0]:,.0f} | {v[1]:,.0f} | {v[2]:,.0f} | {v[3]:,.0f} "
              f"| {v[2] / v[0]:.2f}×, {v[2] / v[1]:.2f}× |")

    print("\nExtra memory while the snapshot or the fork child is alive and "
          "K% of the pages are rewritten (Pss growth, MiB, median):\n")
    print("| region | K | libcowmm | fork() |")
    print("|---|---:|---:|---:|")
    for size, kind in sizes:
        for k in (1, 10, 50, 100):
            m = f"extra_mem_{k}pct"
            print(f"| {size} MiB {kind} | {k}% | {fig(m, size, kind, 'cowmm'):.1f} "
                  f"| {fig(m, size, kind, 'fork'):.1f} |")


def pin_table(pin):
    """bench-pin: the eager copy of write-pinned pages."""
    print("\nEager copy of write-pinned pages at snapshot time (bench-pin):\n")
    print("| write-pinned | snapshot (median) | extra per pinned MiB |")
    print("|---:|---:|---:|")
    per = {r[2]: r[3] for r in pin if r[1] == "eager_copy_ms_per_mib"}
    for r in pin:
        if r[1] == "snapshot_ms":
            extra = f"{float(per[r[2]]):.2f} ms" if r[2] in per else ""
            print(f"| {r[2]} MiB | {float(r[3]):.2f} ms | {extra} |")


FLOOR_METHODS = (
    ("kernel", "kernel COW after fork()"),
    ("kernel-busy", "kernel COW after fork(), another thread busy"),
    ("sigbus-clear", "SIGBUS handler, clear only"),
    ("sigbus-clear-busy", "SIGBUS handler, clear only, another thread busy"),
    ("sigbus-memcpy", "SIGBUS handler, memcpy and clear"),
    ("sigbus-checked", "SIGBUS handler, pagemap + memcpy + pagemap, clear"),
    ("worker-clear-unbound", "worker wherever the scheduler puts it, clear and wake"),
    ("worker-clear-same", "worker on the writer's CPU, clear and wake"),
    ("worker-clear-other", "worker on another CPU, sleeping, clear and wake"),
    ("worker-clear-spin", "worker on another CPU, busy-polling, clear and wake"),
    ("worker-memcpy-same", "worker on the writer's CPU, memcpy, clear and wake"),
    ("worker-memcpy-spin", "worker on another CPU, busy-polling, memcpy, clear and wake"),
    ("worker-checked-unbound", "worker wherever the scheduler puts it, pagemap + process_vm_readv + pagemap"),
    ("worker-checked-same", "worker on the writer's CPU, pagemap + process_vm_readv + pagemap"),
    ("worker-checked-other", "worker on another CPU, sleeping, pagemap + process_vm_readv + pagemap"),
    ("worker-checked-spin", "worker on another CPU, busy-polling, pagemap + process_vm_readv + pagemap"),
)


def floor_table(rows):
    """bench-floor: the raw interface's cost of a first write."""
    get = {(r[1], r[2], r[4]): float(r[6]) for r in rows}
    for size in sorted({r[2] for r in rows}, key=int):
        n = next(r[10] for r in rows if r[2] == size)
        print(f"\nThe floor (bench-floor, no libcowmm: raw userfaultfd), {size} MiB of "
              f"4 KiB pages, random first writes, ns (p50 / p99 / p99.9 over {n}):\n")
        print("| how the fault is resolved | p50 / p99 / p99.9 | p50 / kernel |")
        print("|---|---:|---:|")
        k = get.get(("write_p50", size, "kernel"))
        for m, label in FLOOR_METHODS:
            p = [get.get((x, size, m)) for x in ("write_p50", "write_p99", "write_p999")]
            if None in p:
                continue
            print(f"| {label} | {' / '.join(f'{v:,.0f}' for v in p)} | {p[0] / k:.2f}× |")


if __name__ == "__main__":
    main(sys.argv[1])
