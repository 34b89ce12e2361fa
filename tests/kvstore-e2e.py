#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""End to end: kvstore serves, BGSAVEs while writes go on, and a restart
loads every key back: saving with stream-and-release (the default), kept
armed, with 2 MiB copies on huge pages, in-thread, and with --fork.
Usage: kvstore-e2e.py KVSTORE"""
import os
import socket
import subprocess
import sys
import tempfile
import time


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


class Conn:
    def __init__(self, port):
        for _ in range(100):
            try:
                self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("kvstore did not start listening")
        self.buf = b""

    def line(self):
        while b"\r\n" not in self.buf:
            data = self.s.recv(65536)
            if not data:
                raise RuntimeError("connection closed")
            self.buf += data
        l, self.buf = self.buf.split(b"\r\n", 1)
        return l

    def reply(self):
        l = self.line()
        if l[:1] == b"$":
            n = int(l[1:])
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.s.recv(65536)
            v, self.buf = self.buf[:n], self.buf[n + 2:]
            return v
        if l[:1] == b":":
            return int(l[1:])
        if l[:1] == b"-":
            raise RuntimeError(l.decode())
        return l[1:].decode()

    def cmd(self, *args):
        self.s.sendall(resp(*args))
        return self.reply()

    def pipeline(self, cmds):
        self.s.sendall(b"".join(resp(*c) for c in cmds))
        return [self.reply() for _ in cmds]


def run(kvstore, mode, port, dump):
    args = [kvstore, "--port", str(port), "--heap", "64", "--dump", dump] + mode
    p = subprocess.Popen(args, stderr=subprocess.PIPE)
    try:
        c = Conn(port)
        assert c.cmd("PING") == "PONG"
        n = 20000
        c.pipeline([("SET", "key:%d" % i, "value:%d:" % i + "x" * (i % 300))
                    for i in range(n)])
        assert c.cmd("DBSIZE") == n
        assert c.cmd("BGSAVE") == "Background saving started"
        # Writes go on while the save runs; they are after its instant.
        c.pipeline([("SET", "key:%d" % i, "changed") for i in range(0, n, 7)])
        c.pipeline([("DEL", "key:%d" % i) for i in range(1, n, 11)])
        for _ in range(200):
            info = c.cmd("INFO", "persistence").decode()
            if "rdb_bgsave_in_progress:0" in info:
                break
            time.sleep(0.05)
        assert "rdb_last_bgsave_status:ok" in info, info
        assert c.cmd("GET", "key:7") == b"changed"
    finally:
        p.terminate()
        p.wait(timeout=30)
    # Restart: the dump holds the instant of BGSAVE, every key of it.
    p = subprocess.Popen(args, stderr=subprocess.PIPE)
    try:
        c = Conn(port)
        assert c.cmd("DBSIZE") == n, c.cmd("DBSIZE")
        got = c.pipeline([("GET", "key:%d" % i) for i in range(n)])
        for i, v in enumerate(got):
            want = ("value:%d:" % i + "x" * (i % 300)).encode()
            assert v == want, (i, v[:40] if v else v)
    finally:
        p.terminate()
        p.wait(timeout=30)
    print("ok: %s: %d keys saved under writes and loaded back" %
          (mode[0] if mode else "cowmm", n))


def main():
    kvstore = sys.argv[1]
    with tempfile.TemporaryDirectory() as d:
        base = 20000 + os.getpid() % 20000
        modes = [[], ["--keep-armed"], ["--huge-cow"], ["--in-thread"],
                 ["--fork"]]
        for i, mode in enumerate(modes):
            run(kvstore, mode, base + i, os.path.join(d, "%d.dump" % i))


if __name__ == "__main__":
    main()
