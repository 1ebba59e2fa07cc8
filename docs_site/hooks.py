"""MkDocs hooks: a site that works offline.

* MathJax ships with the site. `npm ci` (in the repository root) installs the
  version that ``package-lock.json`` pins into ``node_modules/``; the build
  copies the parts the pages use into ``javascripts/mathjax/``. The build
  fails, naming the command to run, when MathJax is not installed.
* Notebook pages lose the scripts that nbconvert's template puts in them and
  that never work here: a MathJax 2 loader with an empty address and its
  configuration (the site's MathJax 3 typesets the notebooks too), and a
  Mermaid loader that imports from a CDN.
* Links in notebooks to other pages of the site (``../lambda.md``,
  ``1_mislabeled_data.ipynb``), written as in the Markdown pages, point to
  those pages' addresses, as MkDocs does for Markdown pages. A link to a page
  that does not exist is a warning, so a strict build fails on it.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import shutil
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[1]
MATHJAX = ROOT / "node_modules" / "mathjax"
MATHJAX_SITE_DIR = "javascripts/mathjax"
# The combined component the pages load, and what it loads on demand (TeX
# extensions, fonts, the menu and the accessibility tools).
MATHJAX_PARTS = (
    "tex-mml-chtml.js",
    "input",
    "output/chtml.js",
    "output/chtml",
    "ui",
    "a11y",
    "adaptors",
    "sre",
)

log = logging.getLogger("mkdocs.hooks.offline_site")

# nbconvert's MathJax 2 block (an empty or CDN address and its configuration).
NB_MATHJAX = re.compile(
    r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL
)
# nbconvert's Mermaid loader: a module script that imports Mermaid from a CDN.
NB_MERMAID = re.compile(
    r'<script type="module">(?:(?!</script>).)*?jp-Mermaid.*?</script>', re.DOTALL
)
# A relative link to a Markdown page or a notebook, with an optional anchor.
NB_PAGE_LINK = re.compile(
    r'href="(?P<path>(?![a-z][a-z0-9+.-]*:|/|#)[^"#?]+\.(?:md|ipynb))(?P<anchor>#[^"]*)?"'
)


def mathjax_version() -> str:
    """The installed MathJax's version; a PluginError says how to install it."""
    manifest = MATHJAX / "package.json"
    if not (MATHJAX / "es5" / MATHJAX_PARTS[0]).is_file() or not manifest.is_file():
        raise PluginError(
            f"MathJax is not installed in {MATHJAX}: run `npm ci` in the "
            "repository root (`bash .ci/setup-env docs` does it), then build again."
        )
    return str(json.loads(manifest.read_text(encoding="utf-8"))["version"])


def on_config(config: Any) -> Any:
    """Fail early, before the pages are built, when MathJax is missing."""
    log.info("MathJax %s from %s", mathjax_version(), MATHJAX)
    return config


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """Notebook pages: drop the dead scripts and resolve links to pages."""
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    html = NB_MERMAID.sub("", NB_MATHJAX.sub("", html))

    def resolve(m: re.Match[str]) -> str:
        base = posixpath.dirname(page.file.src_uri)
        target = posixpath.normpath(posixpath.join(base, m["path"]))
        file = files.get_file_from_path(target)
        if file is None:
            log.warning(
                "Doc file '%s' contains a link '%s', but the target '%s' is not "
                "found among documentation files.",
                page.file.src_uri,
                m["path"],
                target,
            )
            return m[0]
        return f'href="{file.url_relative_to(page.file)}{m["anchor"] or ""}"'

    return NB_PAGE_LINK.sub(resolve, html)


def on_post_build(config: Any) -> None:
    """Copy MathJax into the site."""
    source = MATHJAX / "es5"
    dest = Path(config["site_dir"]) / MATHJAX_SITE_DIR
    for part in MATHJAX_PARTS:
        src = source / part
        if src.is_dir():
            shutil.copytree(src, dest / part, dirs_exist_ok=True)
        else:
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    shutil.copy2(MATHJAX / "LICENSE", dest / "LICENSE")
