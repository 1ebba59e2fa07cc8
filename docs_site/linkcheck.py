"""Check the links of a built site, notebook pages included, without a network.

Every link, image and script of every HTML page that stays inside the site
must reach a file of the site, and its anchor (``#part``) an element with
that id in the page it points to. Scripts must work offline: no script from
another host, no empty ``src``, no MathJax 2 configuration. Links to other
hosts are not followed (the site must work offline; they are listed with
``--external``).

    python docs_site/linkcheck.py SITE_DIR

exits with status 1 and lists the problems, one a line, when there are any.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple
from urllib.parse import unquote, urlsplit

# The attributes that point to another resource, by element.
LINK_ATTRS = {
    "a": "href",
    "link": "href",
    "img": "src",
    "script": "src",
    "source": "src",
    "iframe": "src",
}
NOT_CHECKED_SCHEMES = {"mailto", "tel", "data", "javascript"}
# <link rel=...> that the browser loads with the page (a canonical link is not).
LOADED_RELS = {"stylesheet", "preconnect", "preload", "modulepreload", "icon"}
MKDOCS_YML = Path(__file__).resolve().parents[1] / "mkdocs.yml"


def site_base_path(mkdocs_yml: Path = MKDOCS_YML) -> str:
    """The path at which the site is served: the path of ``site_url``
    (MkDocs writes the 404 page's links from it)."""
    m = re.search(r"^site_url:\s*(\S+)", mkdocs_yml.read_text(encoding="utf-8"), re.M)
    path = urlsplit(m[1]).path if m else "/"
    return path if path.endswith("/") else path + "/"


@dataclass
class Page:
    """What a page links to, the ids it has, and its scripts' problems."""

    links: List[Tuple[str, str]] = field(default_factory=list)  # (what, url)
    ids: Set[str] = field(default_factory=set)
    script_problems: List[str] = field(default_factory=list)


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self._in_inline_script = False

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.page.ids.add(a["id"])
        if tag == "a" and "name" in a:
            self.page.ids.add(a["name"])
        attr = LINK_ATTRS.get(tag)
        if attr is not None and attr in a:
            if tag == "script" and not a[attr].strip():
                self.page.script_problems.append("a script with an empty src")
            elif a[attr].strip():
                what = tag
                rels = set(a.get("rel", "").lower().split()) & LOADED_RELS
                if tag == "link" and rels:  # loaded with the page, like a script
                    what = f"<link rel={sorted(rels)[0]}>"
                self.page.links.append((what, a[attr].strip()))
        if tag == "script":
            kind = a.get("type", "").lower()
            if kind == "text/x-mathjax-config":
                self.page.script_problems.append("a MathJax 2 configuration script")
            self._in_inline_script = "src" not in a

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_inline_script = False

    def handle_data(self, data: str) -> None:
        if self._in_inline_script and any(
            f'import("{s}' in data or f"import('{s}" in data
            for s in ("http:", "https:", "//")
        ):
            self.page.script_problems.append(
                "an inline script that imports from another host"
            )


def parse_page(path: Path) -> Page:
    parser = _PageParser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser.page


def _target_file(site: Path, page_rel: str, url_path: str, base_path: str) -> str:
    """The site-relative file a link's path points to ('' for outside the site)."""
    if url_path.startswith("/"):
        if not url_path.startswith(base_path):
            return ""
        target = url_path[len(base_path) :]
    else:
        target = posixpath.join(posixpath.dirname(page_rel), url_path)
    target = posixpath.normpath(target) if target else "."
    if target.startswith(".."):
        return ""
    if url_path.endswith("/") or (site / target).is_dir():
        target = posixpath.join(target, "index.html")
    return posixpath.normpath(target)


@dataclass
class Report:
    problems: List[str]
    external: Set[str]
    pages: int
    links: int


def check_site(site: Path, base_path: Optional[str] = None) -> Report:
    """Check every HTML page under `site`.

    Args:
        site: the built site's folder.
        base_path: the path at which the site is served; links that start
            with it are links into the site. Default: the path of
            ``site_url`` in mkdocs.yml.

    Returns:
        The problems, one a line (``page: what``), the external links met,
        and how many pages and links were checked.
    """
    base_path = site_base_path() if base_path is None else base_path
    base_path = base_path if base_path.endswith("/") else base_path + "/"
    html_files = sorted(p for p in site.rglob("*.html") if p.is_file())
    pages: Dict[str, Page] = {
        p.relative_to(site).as_posix(): parse_page(p) for p in html_files
    }
    problems: List[str] = []
    external: Set[str] = set()
    n_links = 0
    for page_rel, page in pages.items():
        problems += [f"{page_rel}: {what}" for what in page.script_problems]
        for what, url in page.links:
            n_links += 1
            parts = urlsplit(url)
            if parts.scheme in NOT_CHECKED_SCHEMES:
                continue
            if parts.scheme or parts.netloc:
                external.add(url)
                if what != "a" and what != "link":
                    problems.append(f"{page_rel}: a {what} from another host: {url}")
                continue
            path, anchor = unquote(parts.path), unquote(parts.fragment)
            target = _target_file(site, page_rel, path, base_path) if path else page_rel
            if not target or not (site / target).is_file():
                problems.append(f"{page_rel}: broken link {url!r} ({what})")
                continue
            if anchor and target.endswith(".html"):
                if target not in pages:  # pragma: no cover - every page is parsed
                    pages[target] = parse_page(site / target)
                if anchor not in pages[target].ids:
                    problems.append(
                        f"{page_rel}: broken anchor {url!r}: {target} has no id "
                        f"{anchor!r}"
                    )
    return Report(problems, external, len(pages), n_links)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site's folder")
    parser.add_argument(
        "--base-path",
        help="the path the site is served at (default: the path of mkdocs.yml's site_url)",
    )
    parser.add_argument(
        "--external", action="store_true", help="list the links to other hosts"
    )
    args = parser.parse_args(argv)
    report = check_site(args.site, args.base_path)
    for line in report.problems:
        print(line)
    if args.external:
        print("\n".join(sorted(report.external)))
    print(
        f"{report.pages} pages, {report.links} links, "
        f"{len(report.problems)} problems, {len(report.external)} external links"
    )
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
