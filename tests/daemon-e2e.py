#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""End-to-end test of cowmmd, cowmmctl and cowmm_attach_daemon().

usage: daemon-e2e.py COWMMD COWMMCTL DAEMON_CLIENT

Starts cowmmd on a temporary socket; clients (tests/daemon-client.c) write
continuously while snapshots are taken through cowmmctl; every snapshot is
loaded into a fresh process and compared with the memory the writer had
after the step the snapshot holds (see daemon-client.c).  Then: two clients
at once, a schedule with a keep count, cowmmctl's options before and after
the command and its errors (text: one line saying what was asked; --json:
one object on stdout), a table of malformed and hostile messages, a
snapshot's progress on a terminal, a client SIGKILLed and one detaching
mid-snapshot, SIGTERM to the daemon with a snapshot in flight, and a daemon
killed outright.
"""
import ctypes
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

COWMMD, CTL, CLIENT = sys.argv[1:4]
MAGIC, VERSION = 0x444D5743, 1
HELLO, WELCOME, DETACH, BYE, CTLMSG, REPLY = 1, 2, 3, 4, 5, 6

tmp = tempfile.mkdtemp(prefix="cowmmd-e2e-")
checks = 0
daemons = []
clients = []


def fail(msg):
    print(f"FAIL: {msg}")
    for d in daemons:
        if d["proc"].poll() is None:
            d["proc"].kill()
        d["proc"].wait()
        d["log"].flush()
        print(f"--- cowmmd log ({d['sock']}) ---")
        with open(d["logpath"]) as f:
            print(f.read()[-6000:])
    for c in clients:
        if c.poll() is None:
            c.kill()
    sys.exit(1)


def ok(cond, msg, detail=None):
    """Check @cond; on failure, @detail() (if given) says what was seen."""
    global checks
    if not cond:
        fail(f"{msg}: {detail()}" if detail else msg)
    checks += 1
    print(f"ok {checks} - {msg}")


def run_ctl(args, timeout=120):
    """cowmmctl with @args in the order given."""
    return subprocess.run([CTL] + args, capture_output=True, text=True,
                          timeout=timeout)


def ctl_on_tty(args, timeout=120):
    """cowmmctl with its stderr on a terminal, stdout a pipe: (exit
    status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([CTL] + args, stdout=subprocess.PIPE,
                         stderr=slave, text=True)
    os.close(slave)
    tty, end = b"", time.time() + timeout
    while time.time() < end:
        if not select.select([master], [], [], 1)[0]:
            continue
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the last writer closed it
            break
        if not data:
            break
        tty += data
    os.close(master)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out, tty.decode(errors="replace")


def ctl(sock, *args, js=False, timeout=120):
    cmd = [CTL, "--socket", sock] + (["--json"] if js else []) + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if js and p.returncode == 0:
        return p.returncode, json.loads(p.stdout), p.stderr
    return p.returncode, p.stdout, p.stderr


def start_daemon(name, *extra):
    sock = os.path.join(tmp, name + ".sock")
    snaps = os.path.join(tmp, name + "-snaps")
    logpath = os.path.join(tmp, name + ".log")
    log = open(logpath, "w")
    proc = subprocess.Popen([COWMMD, "--socket", sock, "--dir", snaps,
                             *extra], stderr=log)
    d = {"proc": proc, "sock": sock, "dir": snaps, "log": log,
         "logpath": logpath}
    daemons.append(d)
    for _ in range(200):
        if ctl(sock, "ping")[0] == 0:
            return d
        if proc.poll() is not None:
            fail(f"cowmmd exited with {proc.returncode} at start")
        time.sleep(0.05)
    fail("cowmmd did not answer ping in 10 s")


def start_client(d, mib, name):
    p = subprocess.Popen([CLIENT, "run", d["sock"], str(mib), name],
                         stdout=subprocess.PIPE, text=True)
    clients.append(p)
    line = p.stdout.readline().split()
    if len(line) != 2 or line[0] != "ready":
        fail(f"client {name} did not attach: {line}")
    return p, line[1]


def step(p):
    p.send_signal(signal.SIGUSR1)
    line = p.stdout.readline().split()
    if len(line) != 2 or line[0] != "step":
        fail(f"client answered {line} to SIGUSR1")
    return int(line[1])


def progresses(p):
    a = step(p)
    time.sleep(0.2)
    return step(p) > a


def stop_client(p):
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    return p.returncode, out


def verify(mib, snapdir):
    p = subprocess.run([CLIENT, "verify", str(mib), snapdir],
                       capture_output=True, text=True, timeout=300)
    return p.returncode == 0, (p.stdout + p.stderr).strip()


def snapshot(d, who):
    rc, out, err = ctl(d["sock"], "snapshot", who, js=True)
    if rc:
        fail(f"snapshot {who}: {err.strip()}")
    return out


def client_dirs(d, name):
    if not os.path.isdir(d["dir"]):
        return []
    return sorted(e for e in os.listdir(d["dir"]) if e.startswith(name))


def tmp_dirs(d):
    return [e for e in os.listdir(d["dir"]) if e.endswith(".tmp")]


def fd_count(d):
    return len(os.listdir(f"/proc/{d['proc'].pid}/fd"))


def settled_fd_count(d, seconds=10):
    """The daemon's descriptor count once it holds still for 0.3 s: a
    baseline taken while it still closes a finished cowmmctl connection
    would count that one too."""
    end = time.time() + seconds
    last = fd_count(d)
    while time.time() < end:
        time.sleep(0.3)
        now = fd_count(d)
        if now == last:
            return now
        last = now
    return last


def fd_list(d):
    fds = f"/proc/{d['proc'].pid}/fd"
    out = []
    for n in sorted(os.listdir(fds), key=int):
        try:
            out.append(f"{n}->{os.readlink(os.path.join(fds, n))}")
        except OSError:
            pass
    return " ".join(out)


def listed(d):
    rc, out, _ = ctl(d["sock"], "list", js=True)
    return [c["name"] for c in out["clients"]] if rc == 0 else None


def wait_until(cond, seconds=10):
    end = time.time() + seconds
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def hdr(type_, length, magic=MAGIC, version=VERSION):
    return struct.pack("=IHHII", magic, version, type_, length, 0)


def raw_exchange(sock, data, fds=()):
    """Send one datagram; return the answer (b'' when the daemon closed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect(sock)
    try:
        if fds:
            socket.send_fds(s, [data], list(fds))
        else:
            s.send(data)
        return s.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        s.close()


def hello(nranges, ranges, name=b"evil", extra=b""):
    body = name.ljust(32, b"\0") + struct.pack("=II", nranges, 0)
    body += b"".join(struct.pack("=QQ", a, n) for a, n in ranges) + extra
    return hdr(HELLO, 16 + len(body)) + body


def ctl_raw(args, flags=0):
    body = struct.pack("=I", flags) + args
    return hdr(CTLMSG, 16 + len(body)) + body


def status_of(answer):
    if len(answer) < 20:
        return None
    return struct.unpack_from("=i", answer, 16)[0]


# ---------------------------------------------------------------------------
try:
    # No daemon: a clear message, not a hang.
    rc, _, err = ctl(os.path.join(tmp, "none.sock"), "list")
    ok(rc != 0 and "is cowmmd running" in err,
       "cowmmctl says so when no daemon listens")

    d = start_daemon("main")
    mode = os.stat(d["sock"]).st_mode & 0o777
    ok(mode == 0o600, f"socket created 0600 (is {oct(mode)})")

    a, a_id = start_client(d, 64, "alpha")
    ok(listed(d) == ["alpha"], "the client is listed")

    # Snapshots of a client that writes all the time.
    dirs = []
    for i in range(4):
        before = step(a)
        snap = snapshot(d, "alpha")
        good, msg = verify(64, snap["dir"])
        ok(good, f"snapshot {i + 1} of a running writer is one instant: "
           f"{msg}")
        dirs.append(snap["dir"])
        ok(step(a) > before, "the writer kept running through it")
    left = client_dirs(d, "alpha")
    ok(len(left) == 3 and os.path.basename(dirs[0]) not in left,
       f"the oldest snapshot was removed, 3 kept: {left}")

    # Two clients at once.
    b, b_id = start_client(d, 32, "beta")
    ctls = [subprocess.Popen([CTL, "--socket", d["sock"], "--json",
                              "snapshot", w], stdout=subprocess.PIPE,
                             text=True) for w in (a_id, b_id)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in ctls]
    ok(all(p.returncode == 0 for p in ctls), "two snapshots at once")
    ok(verify(64, outs[0]["dir"])[0] and verify(32, outs[1]["dir"])[0],
       "both verify")

    # A schedule that keeps 2.  Waits for its snapshots, not a time: on a
    # loaded machine one took 2.5 s and the next two were skipped.
    def made():
        rc, st, _ = ctl(d["sock"], "stats", js=True)
        return st["snapshots"] if rc == 0 else -1

    before = made()
    rc, _, _ = ctl(d["sock"], "schedule", "beta", "1", "2")
    ok(rc == 0, "schedule beta every 1 s, keep 2")
    ok(wait_until(lambda: made() >= before + 2, 120),
       f"it took 2 snapshots ({made() - before})")
    rc, _, _ = ctl(d["sock"], "schedule", "beta", "0")
    ok(wait_until(lambda: not tmp_dirs(d), 60),
       "the last one in flight ends")
    left = client_dirs(d, "beta")
    ok(len(left) == 2, f"the schedule kept the last 2: {left}")
    ok(verify(32, os.path.join(d["dir"], left[-1]))[0],
       "the newest scheduled snapshot verifies")
    rc, st, _ = ctl(d["sock"], "stats", js=True)
    ok(rc == 0 and st["failed"] == 0 and st["snapshots"] >= 8,
       f"stats: {st['snapshots']} snapshots, {st['failed']} failed, "
       f"{st['copies']} pages copied on write")
    rc, out, _ = ctl(d["sock"], "list")
    ok(rc == 0 and "alpha" in out and "beta" in out, "text list")

    # Bad requests from cowmmctl: clear errors.
    rc, _, err = ctl(d["sock"], "snapshot", "nobody")
    ok(rc != 0 and "no client nobody" in err, "unknown client refused")
    rc, _, err = ctl(d["sock"], "schedule", "alpha", "-1")
    ok(rc != 0 and "usage" in err, "bad schedule refused")
    rc, _, err = ctl(d["sock"], "frobnicate")
    ok(rc != 0 and "unknown request" in err, "unknown request refused")
    rc, _, err = ctl(d["sock"], "stats", "extra")
    ok(rc == 1 and "cowmmctl: stats extra: stats takes 0 arguments, not 1"
       in err, "a request with too many arguments says so", lambda: err)
    ok(err.count("\n") == 1 and "No such file" not in err,
       "a failed request: one line, what was asked and why",
       lambda: repr(err))
    rc, _, err = ctl(d["sock"], "snapshot", "nobody")
    ok(err == "cowmmctl: snapshot nobody: no client nobody\n",
       "an unknown client: what was asked, and the daemon's reason only",
       lambda: repr(err))

    # Options after the command, the order the README shows (they gave
    # "unknown request 'stats'"), and every other place.
    for args in (["-s", d["sock"], "stats", "--json"],
                 ["stats", "--socket", d["sock"], "--json"],
                 ["stats", "--json", "-s", d["sock"]],
                 ["--json", "stats", "--socket=" + d["sock"]],
                 ["-js", d["sock"], "stats"],
                 ["stats", "-j", "-s" + d["sock"]]):
        p = run_ctl(args)
        ok(p.returncode == 0 and json.loads(p.stdout)["snapshots"] >= 8
           and not p.stderr, f"cowmmctl {' '.join(args)}",
           lambda: f"{p.returncode} {p.stdout!r} {p.stderr!r}")
    p = run_ctl(["--socket", d["sock"], "schedule", "beta", "--", "-1"])
    ok(p.returncode == 1 and "usage: schedule" in p.stderr,
       "after '--', '-1' is an argument", lambda: p.stderr)

    # --json covers errors: one JSON object on stdout, nothing on stderr.
    for args, status, errno_, text in (
            (["snapshot", "nobody"], 1, 2, "no client nobody"),
            (["frobnicate"], 1, 22, "unknown request 'frobnicate'"),
            (["stats", "extra"], 1, 22, "stats takes 0 arguments, not 1"),
            (["--frobnicate", "list"], 2, 22,
             "unknown option '--frobnicate'"),
            ([], 2, 22, "no command given")):
        p = run_ctl(["-s", d["sock"]] + args + ["--json"])
        try:
            js = json.loads(p.stdout)
        except ValueError:
            js = {}
        ok(p.returncode == status and js.get("errno") == errno_ and
           text in js.get("error", "") and not p.stderr,
           f"--json error for {args}: {js}",
           lambda: f"{p.returncode} {p.stdout!r} {p.stderr!r}")
    p = run_ctl(["list", "--json", "-s", os.path.join(tmp, "none.sock")])
    js = json.loads(p.stdout or "{}")
    ok(p.returncode == 1 and js.get("errno") == 2 and
       "cannot reach cowmmd" in js.get("error", "") and not p.stderr,
       f"--json error with no daemon: {js}", lambda: repr(p.stderr))

    # Malformed and hostile messages: each closes that connection only.
    fds0 = settled_fd_count(d)
    r1, w1 = os.pipe()
    me = os.pidfd_open(os.getpid())
    theirs = os.pidfd_open(d["proc"].pid)
    # Real userfaultfds of this process (SYS_userfaultfd, O_CLOEXEC): one
    # with the features cowmmd needs (UFFDIO_API: WP, REMAP, REMOVE,
    # UNMAP, WP_UNPOPULATED), one without.
    libc = ctypes.CDLL(None, use_errno=True)
    uffd = libc.syscall(323, 0o2000000)
    bare = libc.syscall(323, 0o2000000)
    ok(uffd >= 0 and bare >= 0, "userfaultfds for the hostile HELLOs")
    fcntl.ioctl(uffd, 0xC018AA3F, struct.pack("=QQQ", 0xAA, 8269, 0))
    table = [
        ("three bytes", b"abc", (), None),
        ("bad magic", hdr(CTLMSG, 16, magic=0x12345678), (), None),
        ("length field lies", hdr(CTLMSG, 99), (), None),
        ("another version", hdr(CTLMSG, 16, version=9), (), None),
        ("unknown type", hdr(77, 16), (), None),
        ("oversized datagram", hdr(CTLMSG, 5000) + b"x" * 4984, (), None),
        ("HELLO without descriptors", hello(1, [(0x10000, 4096)]), (),
         -71),
        ("HELLO with two pipes", hello(1, [(0x10000, 4096)]), (r1, w1),
         -71),
        ("HELLO with someone else's pidfd", hello(1, [(0x10000, 4096)]),
         (uffd, theirs), -71),
        ("HELLO with a userfaultfd without the events",
         hello(1, [(0x10000, 4096)]), (bare, me), -71),
        ("HELLO offering memory it does not have",
         hello(1, [(0x10000, 4096)]), (uffd, me), -22),
        ("HELLO with an unaligned range", hello(1, [(0x10001, 4096)]),
         (uffd, me), -22),
        ("HELLO with a wrapping range",
         hello(1, [(0xfffffffffffff000, 8192)]), (uffd, me), -22),
        ("HELLO with overlapping ranges",
         hello(2, [(0x10000, 8192), (0x11000, 4096)]), (uffd, me), -22),
        ("HELLO with 0 ranges", hello(0, []), (r1, me), -71),
        ("HELLO with 17 ranges", hello(17, [(0x10000, 4096)] * 17),
         (r1, me), -71),
        ("HELLO count and length disagree",
         hello(3, [(0x10000, 4096)]), (r1, me), -71),
        ("CTL with a descriptor", ctl_raw(b"list\0"), (r1,), None),
        ("CTL argument without NUL", ctl_raw(b"list"), (), -71),
        ("CTL with 9 arguments", ctl_raw(b"a\0" * 9), (), -71),
        ("DETACH from a stranger", hdr(DETACH, 16), (), None),
        ("a lone BYE", hdr(BYE, 16), (), None),
    ]
    for what, data, fds, want in table:
        answer = raw_exchange(d["sock"], data, fds)
        got = status_of(answer)
        ok((answer == b"" and want is None) or got == want,
           f"{what}: {'closed' if not answer else f'status {got}'}")
        ok(ctl(d["sock"], "ping")[0] == 0, f"daemon alive after: {what}")
    # A pidfd check passes for our own pidfd, so the uffd check must catch
    # a pipe given as the userfaultfd.
    answer = raw_exchange(d["sock"], hello(1, [(0x10000, 4096)]), (r1, me))
    ok(status_of(answer) == -71, "a pipe passed as the userfaultfd refused")
    for fd in (r1, w1, me, theirs, uffd, bare):
        os.close(fd)
    ok(wait_until(lambda: fd_count(d) == fds0),
       "no descriptor leaked in the daemon",
       lambda: f"{fd_count(d)} descriptors, {fds0} before: {fd_list(d)}")
    ok(listed(d) == ["beta", "alpha"] or listed(d) == ["alpha", "beta"],
       "the real clients are untouched")

    # Another user (SO_PEERCRED), with the socket opened up on purpose.
    if os.geteuid() == 0:
        os.chmod(tmp, 0o711)
        os.chmod(d["sock"], 0o666)
        pid = os.fork()
        if pid == 0:
            os.setgid(65534)
            os.setuid(65534)
            ans = raw_exchange(d["sock"], ctl_raw(b"list\0"))
            os._exit(0 if status_of(ans) == -1 else 1)
        _, st = os.waitpid(pid, 0)
        os.chmod(d["sock"], 0o600)
        os.chmod(tmp, 0o700)
        ok(os.waitstatus_to_exitcode(st) == 0,
           "another uid is refused with EPERM")

    # ---- A slow daemon: snapshots take seconds, so things can happen.
    s = start_daemon("slow", "--rate", "32")

    # On a terminal, a snapshot shows how far it got (from "list" on a
    # second connection); stdout holds only the answer.
    z, z_id = start_client(s, 96, "zeta")
    rc, out, tty = ctl_on_tty(["-s", s["sock"], "snapshot", "zeta"])
    shown = re.findall(r"snapshot of zeta: +(\d+)% written "
                       r"\(\d+\.\d of 96\.0 MiB\)", tty)
    ok(rc == 0 and len(shown) >= 2 and
       int(shown[0]) < int(shown[-1]), f"progress on a tty: {shown}%",
       lambda: repr(tty[-400:]))
    ok(out.startswith(s["dir"]) and "%" not in out and "\x1b" not in out,
       "stdout holds the answer only", lambda: repr(out))
    ok(verify(96, out.split()[0])[0], "that snapshot verifies")
    rc, out, err = ctl(s["sock"], "snapshot", z_id)
    ok(rc == 0 and err == "", "no progress when stderr is not a terminal",
       lambda: repr(err))
    rc, out = stop_client(z)
    ok(rc == 0, f"zeta detaches: {out.strip()}")

    base = settled_fd_count(s)
    g, g_id = start_client(s, 96, "gamma")
    snapper = subprocess.Popen([CTL, "--socket", s["sock"], "snapshot", "gamma"],
                               stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    ok(wait_until(lambda: tmp_dirs(s)), "snapshot in flight")
    time.sleep(0.5)
    g.kill()
    g.wait()
    _, err = snapper.communicate(timeout=60)
    ok(snapper.returncode != 0 and "failed" in err,
       f"SIGKILL mid-snapshot fails it: {err.strip()}")
    ok(f"snapshot of client {g_id} (gamma) into {s['dir']} failed" in err,
       "the failure names the client and the snapshot directory")
    ok(wait_until(lambda: listed(s) == []), "the dead client is forgotten")
    ok(client_dirs(s, "gamma") == [] and tmp_dirs(s) == [],
       "no partial snapshot left behind")
    ok(wait_until(lambda: fd_count(s) == base),
       "its userfaultfd, pidfd and socket are closed",
       lambda: f"{fd_count(s)} descriptors, {base} before: {fd_list(s)}")

    # Detach in the middle of a snapshot.
    e, e_id = start_client(s, 96, "delta")
    snapper = subprocess.Popen([CTL, "--socket", s["sock"], "snapshot", "delta"],
                               stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    ok(wait_until(lambda: tmp_dirs(s)), "snapshot in flight")
    rc, out = stop_client(e)
    ok(rc == 0 and out.startswith("detached 0"),
       f"detach mid-snapshot returns 0: {out.strip()}")
    snapper.communicate(timeout=60)
    ok(snapper.returncode != 0 and client_dirs(s, "delta") == [] and
       tmp_dirs(s) == [], "the abandoned snapshot left nothing")

    # SIGTERM with a snapshot in flight: it finishes, then the daemon exits.
    f, f_id = start_client(s, 64, "eps")
    snapper = subprocess.Popen([CTL, "--socket", s["sock"], "--json",
                                "snapshot", "eps"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    ok(wait_until(lambda: tmp_dirs(s)), "snapshot in flight")
    s["proc"].send_signal(signal.SIGTERM)
    out, err = snapper.communicate(timeout=60)
    ok(snapper.returncode == 0, f"it finished after SIGTERM: {err.strip()}")
    good, msg = verify(64, json.loads(out)["dir"])
    ok(good, f"and verifies: {msg}")
    ok(s["proc"].wait(timeout=30) == 0, "cowmmd exited 0")
    ok(not os.path.exists(s["sock"]), "and removed its socket")
    ok(progresses(f), "the client runs on without the daemon")
    rc, out = stop_client(f)
    ok(rc == 0, f"and exits cleanly: {out.strip()}")

    # The main daemon killed outright with a snapshot in flight: the
    # kernel unregisters the ranges, the clients never notice.
    snapper = subprocess.Popen([CTL, "--socket", d["sock"], "snapshot", "alpha"],
                               stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(0.05)
    d["proc"].kill()
    d["proc"].wait()
    snapper.communicate(timeout=30)
    ok(progresses(a) and progresses(b),
       "both clients run on after the daemon was killed")
    for p in (a, b):
        rc, out = stop_client(p)
        ok(rc == 0, f"detach from a dead daemon returns 0: {out.strip()}")
    print(f"all {checks} checks passed")
finally:
    for c in clients:
        if c.poll() is None:
            c.kill()
            c.wait()
    for dm in daemons:
        if dm["proc"].poll() is None:
            dm["proc"].kill()
            dm["proc"].wait()
    shutil.rmtree(tmp, ignore_errors=True)
