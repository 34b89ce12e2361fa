#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The manual pages, as meson install lays them out.

  check-man.py BUILDDIR LIBCOWMM.so libcowmm.map cowmm.h [COWMMD COWMMCTL]

Installs the pages alone (meson install --tags man) into a temporary
directory, then checks:
  - the library's exported symbols, the version script's and the
    header's COWMM_EXPORT functions are one set;
  - 'man 3 SYMBOL' finds a page for each and renders it without a warning,
    with SYMBOL in its NAME (so a .so link resolves to the right page);
  - every installed page renders with groff -ww (all warnings) without one,
    and with man --warnings without one;
  - libcowmm(3), cowmm-snapshot(5) and, with the daemon, cowmmd(1) and
    cowmmctl(1) are there; every option and command that cowmmd --help and
    cowmmctl --help print is in its page.
"""
import os
import re
import subprocess
import sys
import tempfile

failures = []


def fail(msg):
    failures.append(msg)
    print('FAIL: ' + msg)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def exported(lib):
    out = run(['nm', '-D', '--defined-only', lib]).stdout
    syms = set()
    for line in out.splitlines():
        f = line.split()
        if len(f) == 3 and f[1] in 'TDBRVW':
            syms.add(f[2].split('@')[0])
    return {s for s in syms if s.startswith('cowmm_')}


def in_map(path):
    text = open(path).read()
    return set(re.findall(r'^\s*(cowmm_\w+);', text, re.M))


def in_header(path):
    text = open(path).read()
    return set(re.findall(r'^COWMM_EXPORT\s+[^;(]*?\b(cowmm_\w+)\s*\(',
                          text, re.M))


def main():
    if len(sys.argv) not in (5, 7):
        sys.exit(__doc__)
    builddir, lib, mapfile, header = sys.argv[1:5]
    daemon = sys.argv[5:7]

    syms = exported(lib)
    sets = {'exported by ' + os.path.basename(lib): syms,
            'in ' + os.path.basename(mapfile): in_map(mapfile),
            'COWMM_EXPORT in ' + os.path.basename(header): in_header(header)}
    allsyms = set().union(*sets.values())
    for name, s in sets.items():
        for missing in sorted(allsyms - s):
            fail('%s is not %s' % (missing, name))
    if len(syms) < 20:
        fail('only %d exported symbols: wrong library?' % len(syms))

    with tempfile.TemporaryDirectory() as dest:
        r = run(['meson', 'install', '-C', builddir, '--no-rebuild',
                 '--quiet', '--tags', 'man', '--destdir', dest])
        if r.returncode:
            sys.exit('meson install --tags man failed:\n' + r.stdout +
                     r.stderr)
        roots = [os.path.join(dp) for dp, dn, fn in os.walk(dest)
                 if os.path.basename(dp) == 'man' and 'man3' in dn]
        if len(roots) != 1:
            sys.exit('no man3 directory installed under ' + dest)
        root = roots[0]
        env = dict(os.environ, MANWIDTH='80', LC_ALL='C.UTF-8',
                   MANOPT='', PAGER='cat', MAN_KEEP_FORMATTING='')
        env.pop('MANPATH', None)

        def man(section, name, width='80'):
            r = run(['man', '--warnings', '-M', root, section, name],
                    env=dict(env, MANWIDTH=width))
            # U+2010 and U+2212, as groff may show '-' in UTF-8.
            r.stdout = r.stdout.replace('\u2010', '-').replace('\u2212', '-')
            return r

        def flat(section, name):
            """The page on lines long enough never to break a word."""
            return man(section, name, '4000').stdout

        for s in sorted(allsyms):
            r = man('3', s)
            if r.returncode or not r.stdout:
                fail('man 3 %s: no page (%s)' % (s, r.stderr.strip()))
                continue
            if r.stderr.strip():
                fail('man 3 %s warns: %s' % (s, r.stderr.strip()))
            page = flat('3', s)
            name = page.split('SYNOPSIS')[0]
            if not re.search(r'\b%s\b' % re.escape(s), name):
                fail('man 3 %s: %s is not in the NAME of the page shown'
                     % (s, s))
            if not re.search(r'\b%s\(' % re.escape(s), page):
                fail('man 3 %s: no prototype in the page shown' % s)

        pages = []
        for sec in ('man1', 'man3', 'man5'):
            d = os.path.join(root, sec)
            if os.path.isdir(d):
                pages += [os.path.join(sec, p) for p in sorted(os.listdir(d))]
        want = ['man3/libcowmm.3', 'man5/cowmm-snapshot.5']
        if daemon:
            want += ['man1/cowmmd.1', 'man1/cowmmctl.1']
        for w in want:
            if w not in pages:
                fail('%s is not installed' % w)
        for p in pages:
            r = run(['groff', '-K', 'utf8', '-ww', '-man', '-z', p],
                    cwd=root)
            if r.returncode or r.stderr.strip():
                fail('groff -ww %s: %s' % (p, r.stderr.strip()))
            r = run(['man', '--warnings', '-l', p], cwd=root, env=env)
            if r.returncode or r.stderr.strip() or len(r.stdout) < 200:
                fail('man -l %s: %s' % (p, r.stderr.strip() or 'empty'))

        for exe in daemon:
            prog = os.path.basename(exe)
            page = flat('1', prog)
            text = run([exe, '--help']).stdout
            opts = set(re.findall(r'(?<![\w-])(--[a-z][a-z-]*)', text))
            opts |= set(re.findall(r'(?<![\w-])(-[a-zA-Z])\b', text))
            cmds = set(re.findall(r'^  ([a-z]+)\b(?!-)', text, re.M))
            if not opts or (prog == 'cowmmctl' and not cmds):
                fail('%s --help: no options found in %r' % (prog, text))
            for o in sorted(opts | cmds):
                if not re.search(r'(?<![\w-])%s\b' % re.escape(o), page):
                    fail('%s(1) does not document %s (from --help)'
                         % (prog, o))

        print('%d symbols, each with a page; %d pages render without '
              'warnings' % (len(allsyms), len(pages)))
    if failures:
        print('%d failure(s)' % len(failures))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
