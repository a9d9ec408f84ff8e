#!/usr/bin/env python3
"""Fails when modules under src/ import each other in a circle.

Each file is a module (src/audit/query.rs is `audit::query`, a mod.rs is its
directory). A module depends on every module it names through `crate::...`
or `super::...` paths (the longest prefix that is a module), and the
dependencies must point one way: a circle means neither side can be read,
tested or changed without the other. A module and its own ancestors are the
one exception: a directory's mod.rs declares its children and the children
use the types it defines (Rust's own idiom), so those edges are not counted.

Usage: python3 scripts/import_cycles.py [SRC_DIR]   (exit 1 on a circle)
"""

import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP = re.compile(r"\b(crate|super)::\{([^}]*)\}")


def modules(src: Path) -> dict:
    """Module path (tuple) -> file, for every .rs file but main.rs."""
    found = {}
    for f in sorted(src.rglob("*.rs")):
        rel = f.relative_to(src).with_suffix("")
        parts = tuple(rel.parts)
        if parts in (("main",), ("lib",)):
            continue
        if parts[-1] == "mod":
            parts = parts[:-1]
        found[parts] = f
    return found


def strip_comments(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


def test_only(mod: tuple) -> bool:
    return "tests" in mod


def references(mod: tuple, text: str):
    """Every module path a file names, resolved to absolute tuples."""
    for m in GROUP.finditer(text):
        base = m.group(1)
        for item in m.group(2).split(","):
            item = item.strip().split(" as ")[0].strip()
            if item:
                yield resolve(mod, base, tuple(item.split("::")))
    for m in PATH.finditer(text):
        yield resolve(mod, m.group(1), tuple(m.group(2).strip(":").split("::")))


def resolve(mod: tuple, base: str, rest: tuple) -> tuple:
    if base == "crate":
        return rest
    parent = mod[:-1]
    while rest and rest[0] == "super":
        parent, rest = parent[:-1], rest[1:]
    return parent + rest


def graph(src: Path) -> dict:
    mods = modules(src)
    edges = {m: set() for m in mods if not test_only(m)}
    for mod in edges:
        text = strip_comments(mods[mod].read_text())
        # Unit tests may reach anywhere; only the code's own imports count.
        text = text.split("#[cfg(test)]")[0]
        for ref in references(mod, text):
            target = max(
                (ref[:n] for n in range(len(ref), 0, -1) if ref[:n] in edges),
                key=len,
                default=None,
            )
            if target is None or target == mod:
                continue
            if mod[: len(target)] == target or target[: len(mod)] == mod:
                continue  # a module and its ancestors (see the doc)
            edges[mod].add(target)
    return edges


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    edges = graph(src)
    found = cycles(edges)
    for comp in found:
        names = ["::".join(m) for m in comp]
        print("import circle: " + ", ".join(names))
        members = set(comp)
        for m in comp:
            inside = sorted("::".join(t) for t in edges[m] & members)
            print(f"    {'::'.join(m)} -> {', '.join(inside)}")
    if found:
        return 1
    print(f"no import circles among {len(edges)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
