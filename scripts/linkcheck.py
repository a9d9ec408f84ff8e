#!/usr/bin/env python3
"""The manual's link check (run by scripts/docs.sh after `mdbook build docs`).

Two checks, one list of broken links:

1. Every page of the built book (docs/book/*.html): each relative link
   (`href`/`src`) must lead to a file inside the book, and each `#anchor` to
   an `id` (or `<a name>`) in the page it points at, the page itself
   included. Links that leave the book (`../examples/...`) are broken: the
   published book has nothing there.
2. The pages' sources (docs/*.md): each `{{#include FILE[:ANCHOR]}}` must
   name a file that exists and, with an anchor, one that file marks with
   `ANCHOR: name` and `ANCHOR_END: name` (mdBook includes nothing, silently,
   for an anchor it does not find).
3. README.md: each relative link must lead to a file or directory of the
   repository, and an `#anchor` into a page of the manual (docs/X.md) must
   name an id of the built page (docs/book/X.html); an anchor into another
   Markdown file must name one of its headings (GitHub's slugs).

Absolute links (`https:`, `mailto:`, ...) are not fetched. Exit status 1 with
the list when anything is broken, 0 otherwise.

Usage: scripts/linkcheck.py [REPO_ROOT]   (default: the parent of scripts/)
"""

from __future__ import annotations

import html.parser
import os
import re
import sys
import urllib.parse
from pathlib import Path

# Pages mdBook writes that are not ours to check: 404.html resolves its
# links against the site's root (a <base> tag), not the book's directory.
SKIP_PAGES = {"404.html"}

ABSOLUTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


class Page(html.parser.HTMLParser):
    """The ids and the links of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attrs_d = dict(attrs)
        if attrs_d.get("id"):
            self.ids.add(attrs_d["id"])
        if tag == "a" and attrs_d.get("name"):
            self.ids.add(attrs_d["name"])
        for attr in ("href", "src"):
            value = attrs_d.get(attr)
            if value is not None and tag in ("a", "img", "script", "link", "iframe", "source"):
                self.links.append(value)


_pages: dict[Path, Page] = {}


def page(path: Path) -> Page:
    path = path.resolve()
    if path not in _pages:
        parsed = Page()
        parsed.feed(path.read_text(encoding="utf-8", errors="replace"))
        _pages[path] = parsed
    return _pages[path]


def split(link: str) -> tuple[str, str]:
    path, _, fragment = link.partition("#")
    path = path.split("?", 1)[0]
    return urllib.parse.unquote(path), urllib.parse.unquote(fragment)


def inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_book(book: Path) -> list[str]:
    broken = []
    for source in sorted(book.rglob("*.html")):
        if source.name in SKIP_PAGES:
            continue
        where = source.relative_to(book)
        for link in page(source).links:
            if not link or ABSOLUTE.match(link) or link.startswith("javascript:"):
                continue
            path, fragment = split(link)
            if path.startswith("/"):
                broken.append(f"docs/book/{where}: {link}: a root-relative link (the book may not be served at /)")
                continue
            target = (source.parent / path) if path else source
            if target.is_dir():
                target = target / "index.html"
            if not inside(target, book):
                broken.append(f"docs/book/{where}: {link}: leads out of the book")
                continue
            if not target.is_file():
                broken.append(f"docs/book/{where}: {link}: no such file")
                continue
            if fragment and target.suffix == ".html" and fragment not in page(target).ids:
                broken.append(f"docs/book/{where}: {link}: no id \"{fragment}\" in {target.relative_to(book)}")
    return broken


MD_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MD_REF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*\b(?:href|src)=\"([^\"]+)\"", re.IGNORECASE)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def markdown_links(text: str) -> list[str]:
    text = FENCE.sub("", text)
    text = INLINE_CODE.sub("", text)
    return MD_LINK.findall(text) + MD_REF.findall(text) + HTML_LINK.findall(text)


def github_slugs(text: str) -> set[str]:
    slugs: set[str] = set()
    seen: dict[str, int] = {}
    for title in HEADING.findall(FENCE.sub("", text)):
        title = re.sub(r"`|\*|_(?=\w)|(?<=\w)_|\[|\]\([^)]*\)", "", title)
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        slugs.add(slug if n == 0 else f"{slug}-{n}")
    return slugs


def check_markdown(root: Path, source: Path, book: Path) -> list[str]:
    broken = []
    where = source.relative_to(root)
    for link in markdown_links(source.read_text(encoding="utf-8")):
        if ABSOLUTE.match(link):
            continue
        path, fragment = split(link)
        target = (source.parent / path) if path else source
        if not inside(target, root):
            broken.append(f"{where}: {link}: leads out of the repository")
            continue
        if not target.exists():
            broken.append(f"{where}: {link}: no such file")
            continue
        if not fragment:
            continue
        rel = target.resolve().relative_to((root / "docs").resolve()) if inside(target, root / "docs") else None
        if rel is not None and target.suffix == ".md":
            built = book / rel.with_suffix(".html")
            if not built.is_file():
                broken.append(f"{where}: {link}: {rel} is not a page of the book (not in docs/SUMMARY.md?)")
            elif fragment not in page(built).ids:
                broken.append(f"{where}: {link}: no id \"{fragment}\" in docs/book/{rel.with_suffix('.html')}")
        elif target.suffix == ".md":
            if fragment not in github_slugs(target.read_text(encoding="utf-8")):
                broken.append(f"{where}: {link}: no heading \"{fragment}\" in {target.relative_to(root)}")
        else:
            broken.append(f"{where}: {link}: an anchor into a file that is not Markdown")
    return broken


INCLUDE = re.compile(r"\{\{#include\s+([^}\s:]+)(?::([A-Za-z0-9_-]+))?\s*\}\}")


def check_includes(root: Path) -> list[str]:
    broken = []
    for source in sorted((root / "docs").glob("*.md")):
        where = source.relative_to(root)
        for path, anchor in INCLUDE.findall(source.read_text(encoding="utf-8")):
            target = source.parent / path
            if not target.is_file():
                broken.append(f"{where}: {{{{#include {path}}}}}: no such file")
                continue
            text = target.read_text(encoding="utf-8")
            if anchor and not (
                re.search(rf"ANCHOR:\s*{re.escape(anchor)}\b", text)
                and re.search(rf"ANCHOR_END:\s*{re.escape(anchor)}\b", text)
            ):
                broken.append(f"{where}: {{{{#include {path}:{anchor}}}}}: {Path(os.path.normpath(target)).relative_to(root)} marks no anchor \"{anchor}\"")
    return broken


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    book = root / "docs" / "book"
    if not (book / "index.html").is_file():
        print(f"linkcheck: {book} has no index.html: run `mdbook build docs` first", file=sys.stderr)
        return 2
    broken = check_book(book) + check_includes(root) + check_markdown(root, root / "README.md", book)
    pages = len([p for p in book.rglob("*.html") if p.name not in SKIP_PAGES])
    if broken:
        print(f"linkcheck: {len(broken)} broken link(s):", file=sys.stderr)
        for line in broken:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"linkcheck: ok ({pages} pages of docs/book and README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
