#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Write libcowmm's manual pages with scdoc.

  gen-man.py man3 SCDOC VERSION PAGES README OUTDIR HEADER...
      Section 3, from the Doxygen comments of the public headers: one page
      per line of PAGES (its functions, and the types and constants that
      go with them), a .so link for each other function of a page, and
      libcowmm(3), the overview, with the README's example program.  The
      header comments are the only source:
      a function without one, or in no page, or a page that names
      something the headers lack, fails the build.
  gen-man.py md SCDOC VERSION NAME.SECTION "DESCRIPTION" SEEALSO OUT IN.md
      A page from a Markdown file of docs/ (the subset those use), up to
      the comment that ends the page: docs/format.md is the one source of
      cowmm-snapshot(5).
  gen-man.py scd SCDOC VERSION OUT IN.scd
      A hand-written scdoc page (cowmmd(1), cowmmctl(1)).

scdoc does the roff; this only writes scdoc, escaping what scdoc would
take for markup.  SOURCE_DATE_EPOCH, when set, dates the pages.
"""
import os
import re
import subprocess
import sys

MANUAL = 'libcowmm manual'


def die(msg):
    sys.exit('gen-man.py: ' + msg)


# ---------------------------------------------------------------------------
# scdoc text

def esc(text):
    """Plain text for scdoc: markup characters are taken literally."""
    return re.sub(r'([\\*_`])', r'\\\1', text)


def bold(text):
    return '*' + esc(text) + '*'


def under(text):
    return '_' + esc(text) + '_'


def inline(text, funcs):
    """Doxygen prose to scdoc: @p arg, @c field, #CONSTANT, func()."""
    out = []
    pos = 0
    pat = re.compile(r'@p\s+(\w+)|@c\s+([\w.]+)|#(COWMM_\w+)|'
                     r'\b(cowmm_\w+)\(\)')
    for m in pat.finditer(text):
        out.append(esc(text[pos:m.start()]))
        if m.group(1):
            out.append(under(m.group(1)))
        elif m.group(2):
            out.append(bold(m.group(2)))
        elif m.group(3):
            out.append(bold(m.group(3)))
        else:
            out.append(bold(m.group(4)) + '()')
        pos = m.end()
    out.append(esc(text[pos:]))
    line = ''.join(out)
    if line.startswith(('.', "'")):
        die('a line would start with a roff control character: ' + line)
    return line


def literal(text):
    """A literal block: scdoc copies it as it is, so roff's escape character
    is doubled here; tabs become 4 spaces, as a terminal shows them best."""
    text = text.expandtabs(4).replace('\\', '\\\\')
    if re.search(r'^[.\']', text, re.M):
        die('a literal line would start with a roff control character')
    return '```\n' + text.rstrip('\n') + '\n```\n'


def scdoc(scdoc_bin, text, out):
    r = subprocess.run([scdoc_bin], input=text.encode(), capture_output=True)
    if r.returncode != 0:
        sys.stderr.write(text)
        die('scdoc failed for %s: %s' % (out, r.stderr.decode()))
    with open(out, 'wb') as f:
        f.write(r.stdout)


def preamble(name, section, version):
    return '%s(%s) "libcowmm %s" "%s"\n\n' % (name, section, version, MANUAL)


# ---------------------------------------------------------------------------
# The headers' Doxygen comments

class Item:
    """One documented declaration of a public header."""

    def __init__(self, kind, name, decl, doc):
        self.kind = kind          # func, struct, enum, define, typedef
        self.name = name
        self.decl = decl          # the declaration, comments removed
        self.doc = doc            # the comment's lines, '*' stripped
        self.members = []         # (name, decl, doc lines) of struct/enum
        self.anonymous = False    # an enum without a name


def comment_lines(body):
    lines = []
    for line in body.split('\n'):
        line = re.sub(r'^\s*\*( |$)', '', line.rstrip())
        lines.append(line)
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def strip_comments(text):
    return re.sub(r'/\*.*?\*/', '', text, flags=re.S)


def members_of(body, kind):
    """Fields of a struct or constants of an enum, each with its doc."""
    out = []
    pending = None
    pos = 0
    tok = re.compile(r'/\*\*<(.*?)\*/|/\*\*(.*?)\*/|/\*.*?\*/|'
                     r'#define[^\n]*|([^;,/#]+)([;,]?)', re.S)
    while pos < len(body):
        m = tok.match(body, pos)
        if not m:
            pos += 1
            continue
        pos = m.end()
        if m.group(1) is not None:            # trailing /**< doc */
            if out:
                out[-1][2].extend(comment_lines(m.group(1)))
        elif m.group(2) is not None:          # leading /** doc */
            pending = comment_lines(m.group(2))
        elif m.group(3) is not None and m.group(3).strip():
            decl = ' '.join(m.group(3).split())
            if kind == 'struct':
                name = re.search(r'(\w+)\s*(\[[^]]*\])?$', decl).group(1)
            else:
                name = decl.split('=')[0].strip()
            out.append((name, decl, pending or []))
            pending = None
    return out


def parse_header(path, subst):
    text = open(path).read()
    for k, v in subst.items():
        text = text.replace('@%s@' % k, v)
    # extern "C" { ... } is no block of declarations to us.
    text = text.replace('extern "C" {', 'extern "C"  ')
    text = re.sub(r'(#ifdef __cplusplus\s*\n)\}', r'\1 ', text)
    items = []
    file_doc = None
    depth = 0
    pos = 0
    doc_re = re.compile(r'/\*\*(?!<)(.*?)\*/', re.S)
    while True:
        m = doc_re.search(text, pos)
        if not m:
            break
        depth += text.count('{', pos, m.start()) - \
            text.count('}', pos, m.start())
        pos = m.end()
        if depth:
            continue                   # a member's comment: see members_of
        doc = comment_lines(m.group(1))
        if doc and doc[0].startswith('@file'):
            file_doc = doc[1:]
            continue
        rest = text[m.end():].lstrip()
        start = len(text) - len(rest)
        if rest.startswith('#define'):
            end = start
            while True:
                nl = text.index('\n', end)
                if text[nl - 1] != '\\':
                    break
                end = nl + 1
            decl = text[start:nl]
            name = decl.split()[1].split('(')[0]
            decl = ' '.join(decl.replace('\\\n', ' ').split())
            m2 = re.match(r'#define \w+\([^)]*\)', decl)
            if m2:                     # a macro with arguments: no body
                decl = m2.group(0)
            items.append(Item('define', name, decl, doc))
            pos = nl
            continue
        if re.match(r'(struct|enum)\b[^;(]*\{', rest):
            open_at = text.index('{', start)
            d, i = 0, open_at
            while True:
                if text[i] == '{':
                    d += 1
                elif text[i] == '}':
                    d -= 1
                    if d == 0:
                        break
                i += 1
            close = text.index(';', i)
            head = text[start:open_at].split()
            kind = head[0]
            name = head[1] if len(head) > 1 else None
            it = Item(kind, name, None, doc)
            it.members = members_of(text[open_at + 1:i], kind)
            if kind == 'enum':
                vals = [mb[1] for mb in it.members]
                it.decl = '%s {\n%s\n};' % (
                    ' '.join(head), ',\n'.join('    ' + v for v in vals))
            else:
                it.decl = '%s {\n%s\n};' % (
                    ' '.join(head),
                    '\n'.join('    ' + mb[1] + ';' for mb in it.members))
            items.append(it)
            pos = close + 1
            continue
        end = text.index(';', start)
        decl = ' '.join(strip_comments(text[start:end + 1]).split())
        if decl.startswith('COWMM_EXPORT '):
            decl = decl[len('COWMM_EXPORT '):]
            name = re.search(r'(\w+)\s*\(', decl).group(1)
            items.append(Item('func', name, decl, doc))
        elif decl.startswith('typedef'):
            name = re.search(r'\(\s*\*\s*(\w+)\s*\)|(\w+)\s*;$', decl)
            name = name.group(1) or name.group(2)
            items.append(Item('typedef', name, decl, doc))
        else:
            die('%s: a comment before something not understood: %s'
                % (path, decl[:60]))
        pos = end + 1
    # Every exported function must have been seen with a comment.
    for m in re.finditer(r'^COWMM_EXPORT\s+[^;(]*?\b(\w+)\s*\(', text,
                         re.M):
        if not any(i.kind == 'func' and i.name == m.group(1) for i in items):
            die('%s: %s() has no /** comment */' % (path, m.group(1)))
    return file_doc, items


class Doc:
    """A Doxygen comment: prose paragraphs, @param, @return, @since."""

    def __init__(self, lines):
        self.paras = []       # ('p', text) or ('li', text)
        self.params = []      # (name, text)
        self.ret = None
        self.since = None
        cur = None            # the list being appended to, and where

        def flush():
            nonlocal cur
            cur = None

        for line in lines:
            s = line.strip()
            if not s:
                flush()
                continue
            m = re.match(r'@param\s+(\w+)\s+(.*)', s)
            if m:
                self.params.append([m.group(1), m.group(2)])
                cur = ('param', self.params[-1])
                continue
            m = re.match(r'@return\s*(.*)', s)
            if m:
                self.ret = [m.group(1)]
                cur = ('ret', self.ret)
                continue
            m = re.match(r'@since\s+(.*)', s)
            if m:
                self.since = m.group(1)
                flush()
                continue
            if re.match(r'@(?!p\b|c\b)', s):
                die('unknown Doxygen command: ' + s)
            if s.startswith('- '):
                self.paras.append(['li', s[2:]])
                cur = ('para', self.paras[-1])
                continue
            if s.startswith('Context:'):
                self.paras.append(['p', s])
                cur = ('para', self.paras[-1])
                continue
            if cur is None:
                self.paras.append(['p', s])
                cur = ('para', self.paras[-1])
                continue
            kind, target = cur
            if kind == 'param':
                target[1] += ' ' + s
            elif kind == 'ret':
                target[0] += ' ' + s
            else:
                target[1] += ' ' + s

    def prose(self, funcs):
        out = []
        prev = None
        for kind, text in self.paras:
            if kind == 'li':
                out.append('- ' + inline(text, funcs))
            else:
                if prev == 'li':
                    out.append('')
                out.append(inline(text, funcs))
                out.append('')
            prev = kind
        if prev == 'li':
            out.append('')
        return '\n'.join(out)


# ---------------------------------------------------------------------------
# Section 3

def read_pages(path):
    """PAGES: 'page: name name ... -- description', one page a line.
    Names with a '+' are types and constants shown on the page; the others
    are its functions, each of which gets a .so link to it."""
    pages = []
    for raw in open(path):
        line = raw.strip()
        if not line or line.startswith('#'):
            continue
        m = re.match(r'(\w+):\s*(.*?)\s+--\s+(.*)$', line)
        if not m:
            die('%s: bad line: %s' % (path, line))
        names = m.group(2).split()
        funcs = [n for n in names if not n.startswith('+')]
        extras = [n[1:] for n in names if n.startswith('+')]
        pages.append((m.group(1), funcs, extras, m.group(3)))
    return pages


def wrap_proto(decl, width=72):
    """A prototype on lines of at most width, continued after its '('."""
    if len(decl) <= width:
        return decl
    open_at = decl.index('(')
    if decl.startswith('typedef'):
        open_at = decl.index('(', decl.index(')'))
    indent = ' ' * (open_at + 1)
    args = decl[open_at + 1:].split(', ')
    lines = [decl[:open_at + 1] + args[0]]
    for a in args[1:]:
        if len(lines[-1]) + 2 + len(a) <= width:
            lines[-1] += ', ' + a
        else:
            lines[-1] += ','
            lines.append(indent + a)
    return '\n'.join(lines)


def synopsis_of(item):
    if item.kind == 'func':
        return wrap_proto(item.decl)
    if item.kind == 'typedef':
        return wrap_proto(item.decl)
    return item.decl


def member_docs(item, funcs):
    """Each member with its comment; those without one (the log levels,
    named after syslog's) in one line after them."""
    out = []
    bare = []
    for name, decl, doc in item.members:
        if item.kind == 'enum':
            name = decl          # NAME = value
        text = Doc(doc).prose(funcs).strip()
        if not text:
            bare.append(bold(name))
            continue
        out.append(bold(name))
        out.extend('\t' + ln if ln else '' for ln in text.split('\n'))
        out.append('')
    if bare:
        out.append(', '.join(bare) + '\n')
    return out


def item_title(item):
    if item.kind in ('struct', 'enum') and not item.anonymous:
        return item.kind + ' ' + item.name
    if item.kind == 'enum':
        return ', '.join(m[0] for m in item.members)
    return item.name


def man3_page(page, funcs, extras, desc, byname, pagefor, version,
              include):
    ftitems = [byname[f] for f in funcs]
    xitems = []
    for x in extras:
        if x not in byname:
            die('page %s: %s is not in the headers' % (page, x))
        xitems.append(byname[x])
    refs = set()
    out = [preamble(page, 3, version)]
    out.append('# NAME\n\n%s - %s\n' % (', '.join(funcs), esc(desc)))
    out.append('# SYNOPSIS\n')
    out.append(bold('#include <%s>' % include) + '\n')
    syn = [synopsis_of(i) for i in xitems] + [synopsis_of(i) for i in ftitems]
    out.append(literal('\n\n'.join(syn)))
    out.append('Compile and link with *pkg-config --cflags --libs cowmm* '
               '(*-lcowmm*).\n')
    out.append('# DESCRIPTION\n')
    for it in ftitems:
        d = Doc(it.doc)
        out.append('## %s()\n' % it.name)
        out.append(d.prose(funcs))
        for name, text in d.params:
            out.append(under(name))
            out.append('\t' + inline(text, funcs) + '\n')
    for it in xitems:
        d = Doc(it.doc)
        out.append('## %s\n' % item_title(it))
        out.append(d.prose(funcs))
        if it.kind == 'typedef':
            for name, text in d.params:
                out.append(under(name))
                out.append('\t' + inline(text, funcs) + '\n')
            if d.ret:
                out.append('Returns ' + inline(d.ret[0], funcs) + '\n')
        out.extend(member_docs(it, funcs))
    rets = [(it, Doc(it.doc)) for it in ftitems]
    if any(d.ret for _, d in rets):
        out.append('# RETURN VALUE\n')
        for it, d in rets:
            if d.ret:
                out.append(bold(it.name) + '(): ' + inline(d.ret[0], funcs)
                           + '\n')
            elif not it.decl.startswith('void '):
                die('%s() returns something and has no @return' % it.name)
            else:
                out.append(bold(it.name) + '() returns nothing.\n')
    since = {}
    for it in ftitems + xitems:
        v = Doc(it.doc).since
        if v:
            since.setdefault(v, []).append(it)
    for it in ftitems:
        if not Doc(it.doc).since:
            die('%s() has no @since' % it.name)
    out.append('# VERSIONS\n')
    for v in sorted(since, key=lambda s: [int(x) for x in s.split('.')]):
        out.append('%s first appeared in libcowmm %s.\n' % (
            ', '.join(bold(item_title(i)) + ('()' if i.kind == 'func' else '')
                      for i in since[v]), esc(v)))
    text = '\n'.join(out)
    for f in re.findall(r'\*(cowmm(?:\\_|\w)+)\*\(\)', text):
        f = f.replace('\\_', '_')
        if f in pagefor and pagefor[f] != page:
            refs.add(pagefor[f])
    see = ['*libcowmm*(3)'] + ['*%s*(3)' % esc(r) for r in sorted(refs)]
    text += '\n# SEE ALSO\n\n' + ', '.join(see) + '\n'
    return text


def overview(pages, file_doc, byname, version):
    funcs = [f for _, fs, _, _ in pages for f in fs]
    out = [preamble('libcowmm', 3, version)]
    out.append('# NAME\n\nlibcowmm - snapshots and copy-on-write for '
               'anonymous memory, with userfaultfd\n')
    out.append('# SYNOPSIS\n')
    out.append(bold('#include <cowmm.h>') + '\n')
    out.append('Compile and link with *pkg-config --cflags --libs cowmm* '
               '(*-lcowmm*).\n')
    out.append('# DESCRIPTION\n')
    out.append(Doc(file_doc).prose(funcs))
    out.append('## Handles\n')
    for it in byname.values():
        if it.kind == 'typedef' and '(' not in it.decl:
            out.append(bold(it.decl))
            out.append('\t' + Doc(it.doc).prose(funcs).strip() + '\n')
    out.append('## Functions\n')
    for page, fs, _, desc in pages:
        out.append(', '.join(bold(f) + '()' for f in fs))
        out.append('\t%s: *%s*(3)\n' % (esc(desc), esc(page)))
    return out


def man3(argv):
    scdoc_bin, version, pages_path, readme, outdir = argv[:5]
    headers = argv[5:]
    major, minor, patch = version.split('.')
    subst = {'MAJOR': major, 'MINOR': minor, 'PATCH': patch,
             'VERSION': version}
    byname = {}
    file_doc = None
    for h in headers:
        fd, items = parse_header(h, subst)
        file_doc = file_doc or fd
        for it in items:
            it.anonymous = it.name is None
            if it.anonymous:           # an unnamed enum: by its first one
                it.name = it.members[0][0]
            key = it.name
            if it.kind in ('struct', 'enum') and it.name != it.members[0][0]:
                key = it.kind + ':' + it.name
            if key in byname:
                die('%s documented twice' % key)
            byname[key] = it
    pages = read_pages(pages_path)
    pagefor = {}
    for page, funcs, extras, _ in pages:
        for f in funcs:
            if f not in byname or byname[f].kind != 'func':
                die('page %s: %s() is not a function of the headers'
                    % (page, f))
            if f in pagefor:
                die('%s() is on two pages' % f)
            pagefor[f] = page
        if page not in funcs:
            die('page %s does not document %s()' % (page, page))
    shown = {x for _, _, xs, _ in pages for x in xs}
    for name, it in byname.items():
        if it.kind == 'func' and name not in pagefor:
            die('%s() is on no page: add it to %s' % (name, pages_path))
        handle = it.kind == 'typedef' and '(' not in it.decl
        if it.kind != 'func' and not handle and name not in shown:
            die('%s is on no page: add +%s to %s'
                % (name, name, pages_path))
        if it.kind == 'func' and not Doc(it.doc).since:
            die('%s() has no @since' % name)
    ex = ['# EXAMPLE\n', readme_example(readme)]
    for page, funcs, extras, desc in pages:
        include = 'cowmm.h'
        text = man3_page(page, funcs, extras, desc, byname, pagefor,
                         version, include)
        scdoc(scdoc_bin, text, os.path.join(outdir, page + '.3'))
        for f in funcs:
            if f != page:
                with open(os.path.join(outdir, f + '.3'), 'w') as o:
                    o.write('.so man3/%s.3\n' % page)
    text = '\n'.join(overview(pages, file_doc, byname, version) + ex)
    text += '\n# SEE ALSO\n\n' + ', '.join(
        ['*%s*(3)' % esc(p) for p, _, _, _ in pages] +
        ['*cowmm-snapshot*(5)', '*cowmmd*(1)', '*cowmmctl*(1)',
         '*userfaultfd*(2)']) + '\n'
    scdoc(scdoc_bin, text, os.path.join(outdir, 'libcowmm.3'))


def readme_example(path):
    """The README's example program (after '<!-- example: ... -->')."""
    text = open(path).read()
    m = re.search(r'<!-- example: (\S+) -->\s*```c\n(.*?)```', text, re.S)
    if not m:
        die('%s: no example program' % path)
    return ('The program of the README (%s): a snapshot keeps the bytes of '
            'its instant while the region is written.\n\n%s'
            % (esc(m.group(1)), literal(m.group(2))))


# ---------------------------------------------------------------------------
# Markdown (docs/) to a page

def md_inline(text):
    out = []
    pos = 0
    pat = re.compile(r'`([^`]+)`|\*\*([^*]+)\*\*|\[([^]]+)\]\(([^)]+)\)')
    for m in pat.finditer(text):
        out.append(esc(text[pos:m.start()]))
        if m.group(1) is not None:
            out.append(bold(m.group(1)))
        elif m.group(2) is not None:
            out.append(bold(m.group(2)))
        else:
            out.append(esc(m.group(3)))
        pos = m.end()
    out.append(esc(text[pos:]))
    line = ''.join(out)
    if line.startswith(('.', "'")):
        die('a line would start with a roff control character: ' + line)
    return line


def md_table(rows):
    cells = [[c.strip() for c in r.strip().strip('|').split('|')]
             for r in rows]
    aligns = []
    for c in cells[1]:
        aligns.append(']' if c.endswith(':') and not c.startswith(':')
                      else '-' if c.startswith(':') and c.endswith(':')
                      else '[')
    out = []
    for i, row in enumerate([cells[0]] + cells[2:]):
        for j, c in enumerate(row):
            text = bold(c) if i == 0 else md_inline(c)
            if j == 0:
                out.append(('[' if i == 0 else '|') +
                           (aligns[j] if i == 0 else ' ') + ' ' + text)
            else:
                out.append(':' + (aligns[j] if i == 0 else ' ') + ' ' + text)
    return out


def md(argv):
    scdoc_bin, version, namesec, desc, seealso, out_path, src = argv
    name, section = namesec.rsplit('.', 1)
    lines = open(src).read().split('\n')
    out = [preamble(name, section, version)]
    out.append('# NAME\n\n%s - %s\n' % (esc(name), esc(desc)))
    out.append('# DESCRIPTION\n')
    i = 0
    para = []

    def flush():
        if para:
            out.append(md_inline(' '.join(para)) + '\n')
            para.clear()

    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if s.startswith('<!--'):
            flush()
            if 'ends here' in s:
                break
            i += 1
            continue
        if s.startswith('# '):         # the title: NAME says it
            i += 1
            continue
        if s.startswith('## ') or s.startswith('### '):
            flush()
            out.append('# ' + s.split(' ', 1)[1].upper() + '\n')
            i += 1
            continue
        if s.startswith('|'):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith('|'):
                rows.append(lines[i])
                i += 1
            out.extend(md_table(rows))
            out.append('')
            continue
        if s.startswith('```'):
            flush()
            block = []
            i += 1
            while not lines[i].strip().startswith('```'):
                block.append(lines[i])
                i += 1
            out.append(literal('\n'.join(block)))
            i += 1
            continue
        if s.startswith('- '):
            flush()
            item = [s[2:]]
            i += 1
            while i < len(lines) and lines[i].startswith('  ') and \
                    lines[i].strip():
                item.append(lines[i].strip())
                i += 1
            out.append('- ' + md_inline(' '.join(item)))
            if i >= len(lines) or not lines[i].strip().startswith('- '):
                out.append('')
            continue
        if not s:
            flush()
        else:
            para.append(s)
        i += 1
    flush()
    see = ', '.join('*%s*(%s)' % tuple(esc(x) for x in p.rsplit('.', 1))
                    for p in seealso.split(',') if p)
    out.append('# SEE ALSO\n\n' + see + '\n')
    scdoc(scdoc_bin, '\n'.join(out), out_path)


def scd(argv):
    scdoc_bin, version, out_path, src = argv
    text = open(src).read().replace('@VERSION@', version)
    scdoc(scdoc_bin, text, out_path)


if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in ('man3', 'md', 'scd'):
        die('usage: gen-man.py man3|md|scd ...')
    {'man3': man3, 'md': md, 'scd': scd}[sys.argv[1]](sys.argv[2:])
