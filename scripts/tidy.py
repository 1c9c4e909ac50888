#!/usr/bin/env python3
"""Properties of the kms library's tree, checked as rust-analyzer's xtask tidy checks its own.

    scripts/tidy.py [SRC]      check SRC (default: kms/src); exit 1 on a failure
    scripts/tidy.py --self-test  run the checker on small fake trees and assert what it says
    scripts/tidy.py --graph [SRC]  also print which top-level modules each one imports

Failing properties:
  1. No import cycle between the library's top-level modules. A top-level module is
     SRC/<m>.rs or SRC/<m>/ (derived from the tree, never a fixed list); every file under
     SRC/<m>/ belongs to <m>; lib.rs is the crate root and belongs to none. An edge m -> n is
     any path in m's code that names n: `crate::n`, `$crate::n`, `crate::{n::..}` (in `use`
     lines, expressions, types, macros, `pub(in crate::n)`), and `super::` paths that climb
     out of m to the crate root (`super::n` in SRC/m.rs or SRC/m/mod.rs,
     `super::super::n` in SRC/m/x.rs, one more `super` per inline `mod x { .. }`).
     Comments (`//`, `///`, `//!`, `/* */`, so intra-doc links too) and string and char
     literals are skipped: they do not make the code depend on a module. Each cycle is
     reported with the file:line of every edge on it.
  2. No `use super::*` outside a `#[cfg(test)]` inline module (`mod tests { .. }`).
Reported, not failing:
  3. Files over 1,100 lines.

Python 3 and its standard library only.
"""

import os
import re
import sys
import tempfile

MAX_LINES = 1100

IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def tokens(text):
    """(kind, value, line) for the code of a Rust file: identifiers, `::`, and single
    punctuation characters; comments, strings and char literals are dropped."""
    out = []
    i, n, line = 0, len(text), 1
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += text[i] == "\n"
                    i += 1
        elif c == '"' or (
            c in "br" and re.match(r'(b?r#*"|b")', text[i:i + 40]) and not _ident_before(text, i)
        ):
            m = re.match(r'(b?)(r?)(#*)"', text[i:])
            if m is None:  # a plain '"'
                m = re.match(r'()()()"', text[i:])
            raw, hashes = m.group(2), m.group(3)
            i += m.end()
            if raw:
                end = '"' + hashes
                j = text.find(end, i)
                j = n if j < 0 else j
                line += text.count("\n", i, j)
                i = j + len(end)
            else:
                while i < n and text[i] != '"':
                    if text[i] == "\\":
                        line += text[i + 1:i + 2] == "\n"
                        i += 2
                        continue
                    line += text[i] == "\n"
                    i += 1
                i += 1
        elif c == "'":
            # A char literal ('x', '\n', '\u{..}', b'x' is caught by the ident branch: see
            # below) or a lifetime/label ('a).
            m = re.match(r"'(\\(u\{[0-9a-fA-F_]+\}|x[0-9a-fA-F]{2}|.)|[^\\'\n])'", text[i:])
            if m:
                i += m.end()
            else:
                m = IDENT.match(text, i + 1)
                i = m.end() if m else i + 1
        elif c == "$" and text.startswith("$crate", i):
            out.append(("ident", "crate", line))
            i += len("$crate")
        elif IDENT.match(text, i):
            m = IDENT.match(text, i)
            word = m.group()
            if word == "b" and text.startswith("'", m.end()):
                # A byte literal b'x'.
                lit = re.match(r"'(\\(x[0-9a-fA-F]{2}|.)|[^\\'\n])'", text[m.end():])
                if lit:
                    i = m.end() + lit.end()
                    continue
            out.append(("ident", word, line))
            i = m.end()
        elif text.startswith("::", i):
            out.append(("path", "::", line))
            i += 2
        else:
            out.append(("punct", c, line))
            i += 1
    return out


def _ident_before(text, i):
    return i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")


def modules(src):
    """The top-level modules of the tree: `<m>.rs` and `<m>/` beside lib.rs."""
    found = set()
    for entry in os.listdir(src):
        path = os.path.join(src, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            found.add(entry[:-3])
        elif os.path.isdir(path):
            found.add(entry)
    return found


def rust_files(src):
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".rs"):
                yield os.path.join(root, f)


def module_path(src, path):
    """The module path of a file: kms/src/seal/init.rs -> ["seal", "init"]; lib.rs -> []."""
    parts = os.path.relpath(path, src).split(os.sep)
    last = parts[-1][:-3]
    if last in ("mod", "lib", "main"):
        return parts[:-1]
    return parts[:-1] + [last]


def scan(src, path, tops):
    """(edges, glob_imports) of one file: edges as (target module, line); glob imports of
    `super::*` outside a #[cfg(test)] inline module, as lines."""
    with open(path, encoding="utf-8") as f:
        toks = tokens(f.read())
    here = module_path(src, path)
    edges, globs = [], []
    # Inline modules open here: (brace depth at which they close, cfg(test)?).
    inline = []
    depth = 0
    cfg_test_pending = False
    k = 0
    n = len(toks)

    def tok(j):
        return toks[j] if 0 <= j < n else ("", "", 0)

    while k < n:
        kind, val, line = toks[k]
        if kind == "punct" and val == "#":
            # An attribute: #[cfg(test)] (or #[cfg(all(test, ..))]) marks the next item.
            j = k + 1
            if tok(j)[1] == "!":
                j += 1
            if tok(j)[1] == "[":
                level, start = 0, j
                while j < n:
                    if toks[j][1] == "[":
                        level += 1
                    elif toks[j][1] == "]":
                        level -= 1
                        if level == 0:
                            break
                    j += 1
                words = [t[1] for t in toks[start:j]]
                if words[1:3] == ["cfg", "("] and "test" in words and "not" not in words:
                    cfg_test_pending = True
                k = j + 1
                continue
        if kind == "punct" and val == "{":
            depth += 1
        elif kind == "punct" and val == "}":
            depth -= 1
            while inline and inline[-1][0] > depth:
                inline.pop()
        elif kind == "ident" and val == "mod" and tok(k + 1)[0] == "ident" and tok(k + 2)[1] == "{":
            inline.append((depth + 1, cfg_test_pending, tok(k + 1)[1]))
            cfg_test_pending = False
            depth += 1
            k += 3
            continue
        elif kind == "punct" and val == ";":
            cfg_test_pending = False
        elif kind == "ident" and val == "fn":
            cfg_test_pending = False

        if kind == "ident" and val == "crate" and tok(k + 1)[1] == "::" and tok(k - 1)[1] != "::":
            for target in _heads(toks, k + 2):
                if target in tops:
                    edges.append((target, line))
        elif kind == "ident" and val == "super" and tok(k - 1)[1] != "::":
            climbs, j = 1, k + 1
            while tok(j)[1] == "::" and tok(j + 1)[1] == "super":
                climbs, j = climbs + 1, j + 2
            if tok(j)[1] == "::":
                current = here + [m[2] for m in inline]
                if climbs == len(current):
                    for target in _heads(toks, j + 1):
                        if target in tops:
                            edges.append((target, line))
                if (
                    climbs == 1
                    and tok(j + 1)[1] == "*"
                    and tok(k - 1)[1] == "use"
                    and not any(m[1] for m in inline)
                ):
                    globs.append(line)
        k += 1
    return edges, globs


def _heads(toks, j):
    """The first segment of a path starting at toks[j] (after `crate::`), or of each path of
    a `{a::.., b, ..}` group there."""
    if j >= len(toks):
        return []
    kind, val, _ = toks[j]
    if kind == "ident":
        return [val]
    if val != "{":
        return []
    heads, level, expect = [], 0, True
    while j < len(toks):
        kind, val, _ = toks[j]
        if val == "{":
            level += 1
            expect = level == 1
        elif val == "}":
            level -= 1
            if level == 0:
                break
        elif val == "," and level == 1:
            expect = True
        elif kind == "ident" and expect and level == 1:
            heads.append(val)
            expect = False
        else:
            expect = False if level == 1 else expect
        j += 1
    return heads


def cycles(graph):
    """The strongly connected components of more than one module, and a shortest cycle
    through each of their modules."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    found = []
    for comp in sorted(comps):
        members = set(comp)
        seen_cycles = []
        covered = set()
        for start in comp:
            if start in covered:
                continue
            # Breadth first from start back to start, inside the component.
            prev, frontier, cycle = {start: None}, [start], None
            while frontier and cycle is None:
                nxt = []
                for v in frontier:
                    for w in sorted(graph.get(v, ())):
                        if w == start:
                            cycle = [start]
                            x = v
                            while x is not None:
                                cycle.append(x)
                                x = prev[x]
                            cycle.reverse()  # start ... v, start
                            cycle = cycle[:-1] + [start]
                            break
                        if w in members and w not in prev:
                            prev[w] = v
                            nxt.append(w)
                    if cycle:
                        break
                frontier = nxt
            covered.update(cycle[:-1])
            if cycle not in seen_cycles:
                seen_cycles.append(cycle)
        found.append((comp, seen_cycles))
    return found


def check(src, out=sys.stdout, graph_out=None):
    """Checks the tree at src; returns the number of failures. With graph_out, also prints
    each module's imports there."""
    tops = modules(src)
    graph, where = {}, {}
    failures = 0
    for path in rust_files(src):
        mp = module_path(src, path)
        rel = os.path.relpath(path)
        with open(path, encoding="utf-8") as f:
            lines = sum(1 for _ in f)
        if lines > MAX_LINES:
            print(f"note: {rel} has {lines} lines (over {MAX_LINES}: consider splitting it)", file=out)
        edges, globs = scan(src, path, tops)
        for line in globs:
            print(f"{rel}:{line}: `use super::*` outside a #[cfg(test)] module: import by name", file=out)
            failures += 1
        if not mp:
            continue  # lib.rs: the crate root declares every module
        me = mp[0]
        graph.setdefault(me, set())
        for target, line in edges:
            if target == me:
                continue
            graph[me].add(target)
            where.setdefault((me, target), []).append(f"{rel}:{line}")
    if graph_out is not None:
        for m in sorted(graph):
            print(f"{m} -> {', '.join(sorted(graph[m])) or '(nothing)'}", file=graph_out)
    for comp, found in cycles(graph):
        failures += 1
        print(f"import cycle between top-level modules {{{', '.join(comp)}}}:", file=out)
        for cycle in found:
            print(f"  {' -> '.join(cycle)}", file=out)
            for a, b in zip(cycle, cycle[1:]):
                sites = where[(a, b)]
                more = f" (and {len(sites) - 1} more)" if len(sites) > 1 else ""
                print(f"    {a} -> {b}: {sites[0]}{more}", file=out)
    return failures


def self_test():
    """The checker fails on what it must, and passes what it must."""
    import io

    def tree(files):
        d = tempfile.mkdtemp(prefix="kms-tidy-")
        for name, text in files.items():
            p = os.path.join(d, name)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)
        return d

    def run(files):
        out = io.StringIO()
        failures = check(tree(files), out)
        return failures, out.getvalue()

    base = {
        "lib.rs": "mod leaf;\nmod a;\nmod b;\nmod c;\npub fn root() {}\n",
        "leaf.rs": "pub(crate) fn f() { crate::root() }\n",
        "a.rs": "use crate::leaf;\n// crate::c::g() in a comment is no edge\n"
        'const S: &str = "crate::c::g";\nconst C: char = \'"\';\n'
        "fn h<'x>(_: &'x str) { leaf::f() }\n"
        'const R: &str = r#"crate::c::g() "quoted" crate::b::g()"#;\n'
        "const B: u8 = b'\"'; // crate::c::g()\n",
        "b/mod.rs": "mod inner;\npub(crate) fn g() { crate::a::h(\"\") }\n",
        "b/inner.rs": "pub(crate) fn i() { super::g() }\n",
        "c.rs": "/* crate::b::g() /* nested */ crate::b::g() */\n"
        "#[cfg(test)]\nmod tests {\n    use super::*;\n    fn t() { super::super::b::g() }\n}\n",
    }
    failures, out = run(base)
    assert failures == 0, out

    # An edge in an expression, through a group import, and by climbing with super::.
    for name, text, via in [
        ("a.rs", base["a.rs"] + "fn k() { crate::b::inner::i() }\n", "a -> b: "),
        ("a.rs", base["a.rs"] + "use crate::{leaf::f as _, b::g};\n", "a -> b: "),
        ("leaf.rs", base["leaf.rs"] + "fn k() { super::a::h(\"\") }\n", "leaf -> a: "),
    ]:
        files = dict(base)
        files[name] = text
        failures, out = run(files)
        assert failures == 1, out
        assert "import cycle between top-level modules" in out, out
        assert via in out, out
        assert f"{name}:" in out.split(via, 1)[1], out

    # Two climbs from b/inner.rs reach the root: b -> c, and c -> b by $crate in a macro.
    files = dict(base)
    files["b/inner.rs"] += "fn k() { super::super::c::x() }\n"
    files["c.rs"] += "macro_rules! m { () => { $crate::b::g() } }\n"
    failures, out = run(files)
    assert failures == 1 and "b -> c: " in out and "c -> b: " in out, out
    assert "b/inner.rs:2" in out and "c.rs:5 (and 1 more)" in out, out

    # use super::* outside a test module fails; a large file is only reported.
    files = dict(base)
    files["b/inner.rs"] = "use super::*;\n" + "\n" * (MAX_LINES + 1)
    failures, out = run(files)
    assert failures == 1, out
    assert "inner.rs:1: `use super::*`" in out, out
    assert f"over {MAX_LINES}" in out, out
    print("tidy self-test: ok")


def main(argv):
    if argv[1:] == ["--self-test"]:
        self_test()
        return 0
    args = argv[1:]
    graph = "--graph" in args
    args = [a for a in args if a != "--graph"]
    src = args[0] if args else "kms/src"
    failures = check(src, graph_out=sys.stdout if graph else None)
    if failures:
        print(f"tidy: {failures} failure(s) in {src}", file=sys.stderr)
        return 1
    print(f"tidy: {src}: no import cycle between top-level modules, no stray `use super::*`")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
