#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Write the seed corpus of fuzz-cowmmd.c into cowmmd-corpus/: one file per
seed, each a sequence of [fds][len lo][len hi][message] (see the target)."""
import os
import struct

MAGIC, VERSION = 0x444D5743, 1
HELLO, DETACH, BYE, CTL = 1, 3, 4, 5
PIPE, UFFD, PIDFD, NULL = 0, 1, 2, 3
here = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                    "cowmmd-corpus")


def hdr(type_, length, magic=MAGIC, version=VERSION):
    return struct.pack("=IHHII", magic, version, type_, length, 0)


def ctl(*args, flags=0):
    body = struct.pack("=I", flags) + b"".join(a + b"\0" for a in args)
    return hdr(CTL, 16 + len(body)) + body


def hello(ranges, name=b"seed"):
    body = name.ljust(32, b"\0") + struct.pack("=II", len(ranges), 0)
    body += b"".join(struct.pack("=QQ", a, n) for a, n in ranges)
    return hdr(HELLO, 16 + len(body)) + body


def fds(*kinds):
    b = len(kinds)
    for i, k in enumerate(kinds):
        b |= k << (2 + 2 * i)
    return b


def msg(m, kinds=0):
    return bytes([kinds]) + struct.pack("<H", len(m)) + m


seeds = {
    "ping": msg(ctl(b"ping")),
    "list-json": msg(ctl(b"list", flags=1)),
    "stats": msg(ctl(b"stats")),
    "snapshot-id": msg(ctl(b"snapshot", b"1")),
    "snapshot-name": msg(ctl(b"snapshot", b"seed")),
    "schedule": msg(ctl(b"schedule", b"seed", b"1", b"2")),
    "unknown": msg(ctl(b"frobnicate")),
    "ping-then-list": msg(ctl(b"ping")) + msg(ctl(b"list")),
    "hello-pipe-pidfd": msg(hello([(0x10000, 4096)]), fds(PIPE, PIDFD)),
    "hello-uffd-pidfd": msg(hello([(0x10000, 8192), (0x20000, 4096)]),
                            fds(UFFD, PIDFD)),
    "hello-three-fds": msg(hello([(0x10000, 4096)]), fds(UFFD, PIDFD, NULL)),
    "detach": msg(hdr(DETACH, 16)),
    "bye": msg(hdr(BYE, 16)),
    "bad-magic": msg(hdr(CTL, 16, magic=0x12345678)),
    "ctl-with-fd": msg(ctl(b"list"), fds(NULL)),
}
os.makedirs(here, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(here, name), "wb") as f:
        f.write(data)
print(" ".join(sorted(seeds)))
