"""The built documentation site works offline.

Every internal link and anchor of every page, notebook pages included,
resolves (docs_site/linkcheck.py), no page carries a dead script, and two
pages, one Markdown page and one notebook, show their maths typeset in
headless Chromium with no network (docs_site/browser.py).

The site comes from ``$PYDVL_DATAINF_DOCS_SITE`` when set (CI points it to
the strict build it just made), else from a strict build made here (about
ten seconds). Outside CI a missing tool (MkDocs, MathJax from ``npm ci``,
Chromium) skips the tests that need it; in CI (``CI=true``) it fails them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs_site"))

import browser  # noqa: E402
import linkcheck  # noqa: E402

SITE_ENV = "PYDVL_DATAINF_DOCS_SITE"
IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(what: str) -> None:
    """Skip, or fail in CI, where every test of this module must run."""
    if IN_CI:
        pytest.fail(f"{what}; CI must run this test")
    pytest.skip(what)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get(SITE_ENV)
    if given:
        path = Path(given)
        assert (path / "index.html").is_file(), f"{SITE_ENV}={given}: no built site"
        return path
    try:
        import mkdocs  # noqa: F401
    except ImportError:
        missing("MkDocs is not installed (the docs extra)")
    if not (ROOT / "node_modules" / "mathjax" / "package.json").is_file():
        missing("MathJax is not installed: run `npm ci` in the repository root")
    out = tmp_path_factory.mktemp("site") / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def chromium() -> str:
    path = browser.find_chromium()
    if path is None:
        missing("Chromium is not installed (Debian: apt-get install chromium)")
    assert path is not None
    return path


# --- links ------------------------------------------------------------------


def test_every_internal_link_and_anchor_resolves(site: Path) -> None:
    report = linkcheck.check_site(site)
    assert report.problems == []
    # it read the site: every page, the notebooks among them, and their links
    assert report.pages >= 40 and report.links >= 1000
    assert (site / "tutorials" / "4_scaling_out" / "index.html").is_file()


def test_the_check_catches_a_broken_link_and_anchor_in_a_notebook(
    site: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    page = copy / "tutorials" / "4_scaling_out" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert 'href="../1_mislabeled_data/"' in html
    html = html.replace(
        'href="../1_mislabeled_data/"', 'href="1_mislabeled_data.ipynb"', 1
    ).replace('href="../../lambda/"', 'href="../../lambda/#no-such-part"', 1)
    page.write_text(html, encoding="utf-8")
    problems = linkcheck.check_site(copy).problems
    assert sorted(problems) == [
        "tutorials/4_scaling_out/index.html: broken anchor "
        "'../../lambda/#no-such-part': lambda/index.html has no id 'no-such-part'",
        "tutorials/4_scaling_out/index.html: broken link '1_mislabeled_data.ipynb' (a)",
    ]


def write_site(root: Path, pages: dict[str, str]) -> Path:
    for name, body in pages.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"<html><body>{body}</body></html>", "utf-8")
    return root


def test_the_check_reports_each_kind_of_problem(tmp_path: Path) -> None:
    site = write_site(
        tmp_path,
        {
            "index.html": (
                '<h2 id="top">x</h2><a href="a/">ok</a> <a href="a/#part">ok</a>'
                ' <a href="#top">ok</a> <a href="https://example.org/x">external</a>'
                ' <a href="/docs/a/">ok, absolute</a> <a href="mailto:x@y">ok</a>'
                ' <a href="b/">missing page</a> <a href="a/#nope">missing id</a>'
                ' <a href="#gone">missing id here</a> <img src="pic.png">'
                ' <a href="../../outside.html">outside</a>'
            ),
            "a/index.html": (
                '<p id="part">x</p><script src=""></script>'
                '<script type="text/x-mathjax-config">MathJax.Hub.Config({})</script>'
                '<script src="https://cdn.example.org/mathjax.js"></script>'
                '<link rel="stylesheet" href="https://fonts.example.org/css">'
                '<link rel="canonical" href="https://example.org/a/">'
                '<script type="module">await import("https://cdn.example.org/m.js")'
                "</script>"
            ),
        },
    )
    report = linkcheck.check_site(site, base_path="/docs/")
    assert sorted(report.problems) == sorted(
        [
            "index.html: broken link 'b/' (a)",
            "index.html: broken anchor 'a/#nope': a/index.html has no id 'nope'",
            "index.html: broken anchor '#gone': index.html has no id 'gone'",
            "index.html: broken link 'pic.png' (img)",
            "index.html: broken link '../../outside.html' (a)",
            "a/index.html: a script with an empty src",
            "a/index.html: a MathJax 2 configuration script",
            "a/index.html: a script from another host: "
            "https://cdn.example.org/mathjax.js",
            "a/index.html: a <link rel=stylesheet> from another host: "
            "https://fonts.example.org/css",
            "a/index.html: an inline script that imports from another host",
        ]
    )
    assert linkcheck.main([str(site), "--base-path", "/docs/"]) == 1


def test_the_site_loads_nothing_from_other_hosts_and_ships_mathjax(
    site: Path,
) -> None:
    mathjax = site / "javascripts" / "mathjax"
    assert (mathjax / "tex-mml-chtml.js").is_file()
    assert any((mathjax / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    for page in ("concepts/index.html", "tutorials/2_approximation_quality/index.html"):
        html = (site / page).read_text(encoding="utf-8")
        srcs = re.findall(r'<script[^>]*\ssrc="([^"]*)"', html)
        assert any(s.endswith("javascripts/mathjax/tex-mml-chtml.js") for s in srcs)
        assert all(s and "://" not in s for s in srcs), srcs


# --- the hook ---------------------------------------------------------------


def test_hook_points_notebook_links_to_pages_and_drops_dead_scripts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    try:
        from mkdocs.structure.files import File, Files
        from mkdocs_jupyter.plugin import NotebookFile
    except ImportError:
        missing("MkDocs is not installed (the docs extra)")
    import hooks

    def file(uri: str) -> Any:  # as MkDocs and mkdocs-jupyter make them
        f = File(uri, "/docs", "/site", use_directory_urls=True)
        if uri.endswith(".ipynb"):
            return NotebookFile(f, use_directory_urls=True, site_dir="/site")
        return f

    files = Files([file(u) for u in ("lambda.md", "tutorials/1_nb.ipynb")])
    page = type("Page", (), {"file": file("tutorials/2_nb.ipynb")})()
    html = (
        '<!-- Load mathjax -->\n<script src=""> </script>\n<script type="text/x-'
        'mathjax-config">init_mathjax()</script>\n<!-- End of mathjax configuration'
        ' --><script type="module">\n const d = document.querySelectorAll('
        '".jp-Mermaid > pre.mermaid");\n</script>\n<p><a href="../lambda.md#rule">'
        'λ</a> <a href="1_nb.ipynb">one</a> <a href="https://x.org/a.md">out</a>'
        ' <a href="../missing.md">gone</a></p>'
    )
    out = hooks.on_page_content(html, page=page, config={}, files=files)
    assert out.strip() == (
        '<p><a href="../../lambda/#rule">λ</a> <a href="../1_nb/">one</a>'
        ' <a href="https://x.org/a.md">out</a> <a href="../missing.md">gone</a></p>'
    )
    assert "'../missing.md'" in caplog.text and "not found" in caplog.text
    # Markdown pages are left alone (MkDocs resolves their links itself)
    md_page = type("Page", (), {"file": file("concepts.md")})()
    assert hooks.on_page_content(html, page=md_page, config={}, files=files) == html


# --- maths, in a browser with no network -------------------------------------

MATHS_PAGES = ["concepts/", "tutorials/2_approximation_quality/"]


@pytest.mark.parametrize("page", MATHS_PAGES)
def test_maths_is_typeset_offline(site: Path, chromium: str, page: str) -> None:
    html = (site / page / "index.html").read_text(encoding="utf-8")
    with browser.serve(site) as base:
        dom = browser.dump_dom(base + page)
    typeset, errors, raw = browser.read_maths(dom)
    assert raw == [] and errors == 0
    if page.startswith("tutorials/"):
        assert typeset >= 10
    else:  # one typeset formula per formula of the page
        assert typeset == html.count('class="arithmatex"') >= 10


class _RecordingProxy(BaseHTTPRequestHandler):
    """A proxy that forwards nothing: it records what it was asked for."""

    asked: List[str] = []

    def _refuse(self) -> None:
        self.asked.append(f"{self.command} {self.path}")
        self.send_error(502)

    do_GET = do_CONNECT = _refuse

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def test_the_browser_has_no_network_and_raw_tex_is_seen(
    chromium: str, tmp_path: Path
) -> None:
    """A page that takes MathJax from another host: the request reaches only
    the local proxy (nothing leaves the machine), and the TeX stays raw."""
    write_site(
        tmp_path,
        {
            "index.html": (
                "<p>The rule \\(R_l v = v / \\lambda_l\\).</p>"
                '<script src="https://cdn.example.org/mathjax/tex-mml-chtml.js">'
                "</script>"
            )
        },
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingProxy)
    _RecordingProxy.asked = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proxy = f"http://127.0.0.1:{server.server_address[1]}"
        with browser.serve(tmp_path) as base:
            dom = browser.dump_dom(base, proxy=proxy)
    finally:
        server.shutdown()
        server.server_close()
    assert "CONNECT cdn.example.org:443" in _RecordingProxy.asked
    typeset, _, raw = browser.read_maths(dom)
    assert typeset == 0
    assert any("\\(R_l v" in r for r in raw) and any("\\lambda" in r for r in raw)


# --- abbreviations ----------------------------------------------------------

GLOSSARY_FILE = ROOT / "docs_site" / "abbreviations.md"
GLOSSARY = dict(
    re.findall(r"^\*\[([^\]]+)\]: (.+)$", GLOSSARY_FILE.read_text("utf-8"), re.M)
)
# Known to every reader: explained on hover, not spelled out in the text.
COMMON = {"CPU", "GPU", "CUDA", "CI", "SMS"}
# Pages a new reader starts with, and the API pages: each abbreviation of the
# glossary is spelled out at its first use in the text.
FIRST_READ = [
    ROOT / "docs" / name
    for name in ("index.md", "install.md", "getting-started.md", "concepts.md")
] + sorted((ROOT / "docs" / "api").glob("*.md"))
# Capitals that are names, units or file names, not abbreviations to explain.
NOT_ABBREVIATIONS = {
    "API", "BBC", "BERT", "CHANGELOG", "FAQ", "JSON", "README", "URL", "RAM",
    "GB", "MB", "TB", "SHA-256", "CRC-32C", "SLURM", "LGPL-3", "ICLR", "ICML",
    "AAAI", "ACM", "EMNLP-IJCNLP", "TRAIS", "L2",
    "GGUF", "UTF-8", "PNG", "GPT", "NVIDIA", "H100", "H200", "A100",
}  # fmt: skip
ALL_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def prose(markdown: str) -> str:
    """The text of a Markdown page without code, maths, link targets,
    comments and headings."""
    for pattern, flags in (
        (r"<!--.*?-->", re.S),
        (r"^(```|~~~).*?^\1", re.S | re.M),
        (r"^(?:    |\t).*$", re.M),
        (r"^#.*$", re.M),
        (r"`[^`\n]*`", 0),
        (r"\$\$.*?\$\$|\$[^$\n]*\$", re.S),
        (r"\]\([^)]*\)|\]\[[^\]]*\]", 0),
    ):
        markdown = re.sub(
            pattern, "]" if pattern.startswith(r"\]") else "", markdown, flags=flags
        )
    return markdown


def _words(text: str) -> str:
    return re.sub(r"[\s-]+", " ", text.lower())


def first_use_problems(markdown: str, glossary: dict[str, str]) -> List[str]:
    """Abbreviations whose meaning is not in the text up to the end of the
    paragraph of their first use."""
    text = prose(markdown)
    problems = []
    for abbr, meaning in glossary.items():
        m = re.search(rf"(?<![\w-]){re.escape(abbr)}(?![\w-])", text)
        if m is None:
            continue
        end = text.find("\n\n", m.end())
        if _words(meaning) not in _words(text[: len(text) if end < 0 else end]):
            problems.append(f"{abbr} ({meaning}): {text[m.start() : m.end() + 40]!r}")
    return problems


def test_every_abbreviation_of_the_docs_has_a_meaning() -> None:
    unknown = set()
    for page in ALL_PAGES:
        text = prose(page.read_text(encoding="utf-8"))
        unknown |= set(
            re.findall(r"(?<![\w-])[A-Z][A-Z0-9]+(?:-[A-Z0-9]+)*(?![\w-])", text)
        )
    unknown -= set(GLOSSARY) | NOT_ABBREVIATIONS
    assert not unknown, f"add them to {GLOSSARY_FILE.name}: {sorted(unknown)}"


@pytest.mark.parametrize(
    "page", FIRST_READ, ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_abbreviations_are_spelled_out_at_first_use(page: Path) -> None:
    glossary = {a: m for a, m in GLOSSARY.items() if a not in COMMON}
    assert first_use_problems(page.read_text(encoding="utf-8"), glossary) == []


def test_first_use_check_can_fail() -> None:
    glossary = {"IHM": "inverse harmonic mean"}
    assert first_use_problems("pyDVL's IHM.\n\nThe inverse harmonic mean.", glossary)
    assert not first_use_problems("The inverse harmonic mean (IHM).", glossary)
    assert not first_use_problems("# IHM\n\nThe inverse harmonic mean (IHM).", glossary)
