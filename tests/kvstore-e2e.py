#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""End to end: kvstore as a user meets it.

- modes: it serves, BGSAVEs while writes go on, and a restart loads every
  key of the save's instant back: saving with stream-and-release (the
  default), kept armed, with 2 MiB copies on huge pages, in-thread, and
  with --fork.
- help, bad-args: --help documents every option with its default; a bad
  value names its option and the value.
- heap-size: a dump saved from another --heap says both sizes.
- save-errors: a save into a directory that does not exist says which file
  and why; SHUTDOWN and SIGTERM do not exit when their save fails.
- shutdown: SIGTERM and SHUTDOWN save, SHUTDOWN NOSAVE does not, --no-save
  turns the default off and SHUTDOWN SAVE forces it.
- config: CONFIG GET answers name/value pairs (raw RESP); redis-benchmark,
  where installed, does not warn "Could not fetch server CONFIG".

Usage: kvstore-e2e.py KVSTORE [TEST...]   (default: every test)"""
import os
import re
import shutil
import signal
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
    def __init__(self, port, proc=None):
        for _ in range(200):
            try:
                self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError("kvstore exited with %d: %s" %
                                       (proc.returncode, err_of(proc)))
                time.sleep(0.05)
        else:
            raise RuntimeError("kvstore did not start listening")
        self.buf = b""

    def fill(self):
        data = self.s.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self.buf += data

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        l, self.buf = self.buf.split(b"\r\n", 1)
        return l

    def reply(self):
        l = self.line()
        if l[:1] == b"$":
            n = int(l[1:])
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.fill()
            v, self.buf = self.buf[:n], self.buf[n + 2:]
            return v
        if l[:1] == b"*":
            return [self.reply() for _ in range(int(l[1:]))]
        if l[:1] == b":":
            return int(l[1:])
        if l[:1] == b"-":
            raise RuntimeError(l.decode())
        return l[1:].decode()

    def cmd(self, *args):
        self.s.sendall(resp(*args))
        return self.reply()

    def error(self, *args):
        """The error reply to @args (it must be one)."""
        try:
            got = self.cmd(*args)
        except RuntimeError as e:
            return str(e)
        raise AssertionError("%s answered %r, not an error" % (args, got))

    def closed(self):
        """True once the server closed the connection, sending nothing."""
        try:
            self.s.settimeout(30)
            return self.s.recv(1) == b"" and not self.buf
        except ConnectionResetError:
            return True

    def pipeline(self, cmds):
        self.s.sendall(b"".join(resp(*c) for c in cmds))
        return [self.reply() for _ in cmds]


def err_of(p):
    return p.stderr.read().decode(errors="replace") if p.stderr else ""


class Server:
    """One kvstore process; its stderr goes to a file to read after."""

    def __init__(self, kvstore, port, dump, *extra, heap=64):
        self.port = port
        self.log = tempfile.TemporaryFile()
        self.p = subprocess.Popen(
            [kvstore, "--port", str(port), "--heap", str(heap), "--dump",
             dump] + list(extra), stderr=self.log)
        self.c = Conn(port, self.p)

    def stderr(self):
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait(self, timeout=60):
        return self.p.wait(timeout=timeout)

    def shutdown(self, *args):
        """SHUTDOWN @args: no answer, the connection closes, exit 0."""
        self.c.s.sendall(resp("SHUTDOWN", *args))
        assert self.c.closed(), "SHUTDOWN answered: " + repr(self.c.buf)
        rc = self.wait()
        assert rc == 0, (rc, self.stderr())

    def signal(self, sig=signal.SIGTERM):
        self.p.send_signal(sig)

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def wait_saved(c):
    for _ in range(600):
        info = c.cmd("INFO", "persistence").decode()
        if "rdb_bgsave_in_progress:0" in info:
            return info
        time.sleep(0.05)
    raise AssertionError("BGSAVE did not end: " + info)


def value(i):
    return "value:%d:" % i + "x" * (i % 300)


def mode_run(kvstore, mode, port, dump):
    s = Server(kvstore, port, dump, *mode)
    try:
        c = s.c
        assert c.cmd("PING") == "PONG"
        n = 20000
        c.pipeline([("SET", "key:%d" % i, value(i)) for i in range(n)])
        assert c.cmd("DBSIZE") == n
        assert c.cmd("BGSAVE") == "Background saving started"
        # Writes go on while the save runs; they are after its instant.
        # (Each reply whole: BGSAVE's once ended in a stray NUL.)
        got = c.pipeline([("SET", "key:%d" % i, "changed")
                          for i in range(0, n, 7)])
        assert got == ["OK"] * len(got), set(got)
        c.pipeline([("DEL", "key:%d" % i) for i in range(1, n, 11)])
        info = wait_saved(c)
        assert "rdb_last_bgsave_status:ok" in info, info
        assert c.cmd("GET", "key:7") == b"changed"
        s.shutdown("NOSAVE")  # the dump keeps the instant of BGSAVE
    finally:
        s.kill()
    # Restart: the dump holds the instant of BGSAVE, every key of it.
    s = Server(kvstore, port, dump, *mode)
    try:
        c = s.c
        assert c.cmd("DBSIZE") == n, c.cmd("DBSIZE")
        got = c.pipeline([("GET", "key:%d" % i) for i in range(n)])
        for i, v in enumerate(got):
            assert v == value(i).encode(), (i, v[:40] if v else v)
        s.shutdown("NOSAVE")
    finally:
        s.kill()
    print("ok: %s: %d keys saved under writes and loaded back" %
          (mode[0] if mode else "cowmm", n))


def test_modes(kvstore, port, d):
    modes = [[], ["--keep-armed"], ["--huge-cow"], ["--in-thread"],
             ["--follow"], ["--fork"]]
    for i, mode in enumerate(modes):
        mode_run(kvstore, mode, port + i, os.path.join(d, "%d.dump" % i))


def test_help(kvstore, port, d):
    p = subprocess.run([kvstore, "--help"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, (p.returncode, p.stderr)
    out = p.stdout
    # Every option, each with its default, in the order of this list.
    opts = [("--port", "default 7379"), ("--heap", "default 1024"),
            ("--dump", "default kvstore.dump"), ("--no-save", "default"),
            ("--fork", "default"), ("--thp", "default"),
            ("--huge-cow", "default"), ("--in-thread", "default"),
            ("--follow", "default"), ("--keep-armed", "default"), ("--save-nice", "default 0"),
            ("--help", "")]
    def where(opt):  # its line: "  -p, --port N ..." or "      --no-save"
        m = re.search(r"^ +(-\w, )?%s\b" % opt, out, re.M)
        assert m, "--help does not document %s:\n%s" % (opt, out)
        return m.start()
    for i, (opt, default) in enumerate(opts):
        at = where(opt)
        end = where(opts[i + 1][0]) if i + 1 < len(opts) else None
        text = " ".join(out[at:end].split())  # lines wrap anywhere
        assert default in text, \
            "--help: %s without %r:\n%s" % (opt, default, out[at:end])
    assert "SHUTDOWN [SAVE|NOSAVE]" in out, out
    # An unknown option points at --help, on stderr, status 2.
    p = subprocess.run([kvstore, "--frobnicate"], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2 and "--help" in p.stderr, p.stderr
    print("ok: --help documents every option and its default")


def test_bad_args(kvstore, port, d):
    for args in (["--port", "70000"], ["--port", "http"], ["--port", "0"],
                 ["--heap", "0"], ["--heap", "64k"], ["--heap", "-5"],
                 ["--save-nice", "99"]):
        p = subprocess.run([kvstore] + args, capture_output=True, text=True,
                           timeout=30)
        want = "%s '%s'" % tuple(args)
        assert p.returncode == 2 and want in p.stderr, \
            (args, p.returncode, p.stderr)
    print("ok: a bad option value says which option and which value")


def test_heap_size(kvstore, port, d):
    for i, mode in enumerate([[], ["--fork"]]):
        dump = os.path.join(d, "heap%d.dump" % i)
        s = Server(kvstore, port + i, dump, *mode, heap=16)
        try:
            s.c.cmd("SET", "a", "1")
            assert s.c.cmd("BGSAVE") == "Background saving started"
            assert "rdb_last_bgsave_status:ok" in wait_saved(s.c)
            s.shutdown("NOSAVE")
        finally:
            s.kill()
        p = subprocess.run([kvstore, "--port", str(port + i), "--heap", "32",
                            "--dump", dump], capture_output=True, text=True,
                           timeout=60)
        err = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 1 and "16 MiB" in err and "32 MiB" in err \
            and dump in err, (p.returncode, p.stderr)
        print("ok: %s dump of another heap size: %s" %
              (mode[0] if mode else "snapshot", err))


def test_save_errors(kvstore, port, d):
    dump = os.path.join(d, "missing", "x.dump")
    tmp = dump + ".tmp"
    s = Server(kvstore, port, dump)
    try:
        c = s.c
        c.cmd("SET", "a", "1")
        e = c.error("SAVE")
        assert tmp in e and "No such file or directory" in e, e
        assert "unmapped" not in e, e
        assert c.cmd("BGSAVE") == "Background saving started"
        assert "rdb_last_bgsave_status:err" in wait_saved(c)
        # SHUTDOWN's save fails: it says why and the server stays up.
        e = c.error("SHUTDOWN")
        assert "SHUTDOWN" in e and tmp in e and "No such file" in e, e
        assert c.cmd("PING") == "PONG"
        # So does SIGTERM's; the next signal exits without saving.
        s.signal()
        time.sleep(0.5)
        assert s.p.poll() is None and c.cmd("PING") == "PONG", s.stderr()
        s.signal()
        assert s.wait() == 1, s.stderr()
        log = s.stderr()
        assert "background save to %s failed: open %s: No such file" % (
            dump, tmp) in log, log
        assert "SIGTERM: save to %s failed" % dump in log, log
        assert "exiting without saving" in log, log
    finally:
        s.kill()
    print("ok: a failed save names the file and why; nothing exits on it")


def test_shutdown(kvstore, port, d):
    dump = os.path.join(d, "shutdown.dump")

    def keys(*extra):
        s = Server(kvstore, port, dump, *extra)
        got = s.c.cmd("DBSIZE")
        return s, got

    def fill(s, tag, n=100):
        s.c.pipeline([("SET", "%s:%d" % (tag, i), value(i))
                      for i in range(n)])

    s, n0 = keys()
    try:
        assert n0 == 0, n0
        fill(s, "a")
        s.signal(signal.SIGTERM)  # saves, then exits 0
        assert s.wait() == 0, s.stderr()
        s, n = keys()
        assert n == 100, "after SIGTERM and a restart, %d keys" % n
        assert s.c.cmd("GET", "a:99") == value(99).encode()
        fill(s, "b")
        s.shutdown("NOSAVE")  # loses b
        s, n = keys()
        assert n == 100, "after SHUTDOWN NOSAVE, %d keys" % n
        assert "SHUTDOWN" in s.c.error("SHUTDOWN", "BOGUS")
        fill(s, "c")
        s.shutdown()  # saves c
        s, n = keys()
        assert n == 200, "after SHUTDOWN, %d keys" % n
        fill(s, "d")
        s.signal(signal.SIGINT)  # as SIGTERM
        assert s.wait() == 0, s.stderr()
        s, n = keys("--no-save")
        assert n == 300, "after SIGINT, %d keys" % n
        fill(s, "e")
        s.signal(signal.SIGTERM)  # --no-save: loses e
        assert s.wait() == 0, s.stderr()
        s, n = keys("--no-save")
        assert n == 300, "SIGTERM with --no-save: %d keys" % n
        fill(s, "f")
        s.shutdown()  # --no-save: loses f
        s, n = keys("--no-save")
        assert n == 300, "SHUTDOWN with --no-save: %d keys" % n
        fill(s, "g")
        s.shutdown("SAVE")  # saves g all the same
        s, n = keys()
        assert n == 400, "SHUTDOWN SAVE with --no-save: %d keys" % n
        s.shutdown("NOSAVE")
    finally:
        s.kill()
    print("ok: SIGTERM, SIGINT and SHUTDOWN save; NOSAVE and --no-save "
          "do not; SAVE forces")


def test_config(kvstore, port, d):
    dump = os.path.join(d, "config.dump")
    s = Server(kvstore, port, dump)
    try:
        c = s.c
        # Byte for byte, as redis-benchmark's hiredis reads it.
        c.s.sendall(resp("CONFIG", "GET", "save"))
        raw = b""
        while raw.count(b"\r\n") < 5:
            raw += c.s.recv(4096)
        assert raw == b"*2\r\n$4\r\nsave\r\n$8\r\nshutdown\r\n", raw
        assert c.cmd("CONFIG", "GET", "appendonly") == [b"appendonly", b"no"]
        assert c.cmd("CONFIG", "GET", "SAVE", "appendonly") == \
            [b"save", b"shutdown", b"appendonly", b"no"]
        got = c.cmd("CONFIG", "GET", "*")
        conf = dict(zip(got[::2], got[1::2]))
        assert len(got) == 2 * len(conf) and conf[b"port"] == \
            str(port).encode() and conf[b"dbfilename"] == b"config.dump" \
            and conf[b"dir"] == os.path.realpath(d).encode() \
            and conf[b"maxmemory"] == str(64 << 20).encode(), conf
        assert c.cmd("CONFIG", "GET", "nothing-like-it") == []
        assert "CONFIG GET" in c.error("CONFIG", "SET", "save", "")
        assert "CONFIG GET" in c.error("CONFIG", "GET")
        bench = shutil.which("redis-benchmark")
        if bench:
            p = subprocess.run([bench, "-p", str(port), "-n", "200", "-c",
                                "2", "-t", "set,get", "-q"],
                               capture_output=True, text=True, timeout=120)
            assert p.returncode == 0 and \
                "Could not fetch server CONFIG" not in p.stderr, \
                (p.returncode, p.stderr)
            print("ok: redis-benchmark fetched the CONFIG (no warning)")
        else:
            print("note: no redis-benchmark (scripts/deps.sh --bench "
                  "installs it); CONFIG checked with raw RESP only")
        s.shutdown("NOSAVE")
    finally:
        s.kill()
    s = Server(kvstore, port, dump, "--no-save")
    try:
        assert s.c.cmd("CONFIG", "GET", "save") == [b"save", b""]
        s.shutdown()
    finally:
        s.kill()
    print("ok: CONFIG GET answers name/value pairs")


TESTS = {
    "help": test_help,
    "bad-args": test_bad_args,
    "heap-size": test_heap_size,
    "save-errors": test_save_errors,
    "shutdown": test_shutdown,
    "config": test_config,
    "modes": test_modes,
}


def main():
    kvstore = sys.argv[1]
    names = sys.argv[2:] or list(TESTS)
    failed = []
    with tempfile.TemporaryDirectory() as d:
        base = 20000 + os.getpid() % 20000
        for i, name in enumerate(names):
            try:
                TESTS[name](kvstore, base + 10 * i, d)
            except Exception as e:  # report each, run the rest
                print("FAIL: %s: %s: %s" % (name, type(e).__name__, e))
                failed.append(name)
    if failed:
        print("failed: " + " ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
