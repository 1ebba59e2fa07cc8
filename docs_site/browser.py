"""Look at the built site as a reader would, in headless Chromium, offline.

The site is served on 127.0.0.1 from a thread; Chromium gets a fresh profile
and no network: every request that does not go to 127.0.0.1 goes to a proxy
address where nothing listens, and host names resolve to nothing, so a page
that needs another host shows it (a formula stays raw TeX).

    python docs_site/browser.py SITE_DIR concepts/ --dom out.html
    python docs_site/browser.py SITE_DIR benchmarks/ --screenshot out.png --width 1280

Debian's package ``chromium`` provides the browser.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import tempfile
import threading
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

CHROMIUM_NAMES = ("chromium", "chromium-browser")
OFFLINE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # No host name resolves; with the proxy below, no request leaves the
    # machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
# Every request that does not go to a loopback address goes to this proxy:
# a closed port on this machine.
NO_NETWORK_PROXY = "http://127.0.0.1:9"
# Time the page gets to load and typeset (virtual time: it runs as fast as
# the page lets it).
VIRTUAL_TIME_MS = 20000


def find_chromium() -> Optional[str]:
    """The path of Chromium, or None when it is not installed."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve `site` on 127.0.0.1 (a free port) while the block runs; yields
    the base URL, ending in a slash."""
    handler = partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_chromium(
    url: str,
    action: Sequence[str],
    width: int = 1280,
    height: int = 900,
    proxy: str = NO_NETWORK_PROXY,
) -> subprocess.CompletedProcess[bytes]:
    """Run headless Chromium offline, with a fresh profile, on `url`; `action`
    is ``["--dump-dom"]`` or ``[f"--screenshot={path}"]``. Requests to other
    hosts than loopback addresses go to `proxy`."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError(
            "Chromium is not installed: `apt-get install chromium` (Debian)"
        )
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [
                chromium,
                *OFFLINE_FLAGS,
                f"--proxy-server={proxy}",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={VIRTUAL_TIME_MS}",
                *action,
                url,
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )


def dump_dom(url: str, width: int = 1280, proxy: str = NO_NETWORK_PROXY) -> str:
    """The page's DOM after its scripts ran (MathJax typeset the maths)."""
    done = run_chromium(url, ["--dump-dom"], width=width, proxy=proxy)
    return done.stdout.decode("utf-8")


def screenshot(url: str, path: Path, width: int = 1280, height: int = 900) -> None:
    """A PNG of the top `height` pixels of the page at `width` pixels."""
    run_chromium(url, [f"--screenshot={path}"], width=width, height=height)


# Elements whose text is not prose: code, scripts, typeset maths, and the
# hidden copy of each notebook cell's code (for the copy button).
_NOT_PROSE_TAGS = {"script", "style", "pre", "code", "textarea", "svg", "math"}
_NOT_PROSE_CLASSES = {"clipboard-copy-txt"}
# What TeX looks like when MathJax did not typeset it.
RAW_TEX = re.compile(r"\\[A-Za-z]+|\\[()\[\]]|\$\$|\$[^$\s][^$]*\$")


class _ProseParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: List[str] = []
        self.maths = 0
        self.math_errors = 0
        self._skip: Optional[Tuple[str, int]] = None  # (tag, nesting)

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        if tag == "mjx-container":
            self.maths += 1
        if tag == "mjx-merror":
            self.math_errors += 1
        if self._skip is not None:
            if tag == self._skip[0]:
                self._skip = (tag, self._skip[1] + 1)
            return
        classes = set((dict(attrs).get("class") or "").split())
        if (
            tag in _NOT_PROSE_TAGS
            or tag.startswith("mjx-")
            or classes & _NOT_PROSE_CLASSES
        ):
            self._skip = (tag, 1)

    def handle_endtag(self, tag: str) -> None:
        if self._skip is not None and tag == self._skip[0]:
            depth = self._skip[1] - 1
            self._skip = None if depth == 0 else (tag, depth)

    def handle_data(self, data: str) -> None:
        if self._skip is None:
            self.text.append(data)


def read_maths(dom: str) -> Tuple[int, int, List[str]]:
    """In a page's DOM: how many formulas MathJax typeset, how many of them
    are errors, and the raw TeX left in the prose (each with some context)."""
    parser = _ProseParser()
    parser.feed(dom)
    parser.close()
    text = "".join(parser.text)
    raw = [
        text[max(0, m.start() - 30) : m.end() + 30].replace("\n", " ")
        for m in RAW_TEX.finditer(text)
    ]
    return parser.maths, parser.math_errors, raw


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site's folder")
    parser.add_argument("page", help="the page's path in the site, e.g. concepts/")
    parser.add_argument("--dom", type=Path, help="write the DOM here")
    parser.add_argument("--screenshot", type=Path, help="write a PNG here")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    with serve(args.site) as base:
        url = base + args.page.lstrip("/")
        if args.screenshot:
            screenshot(url, args.screenshot, args.width, args.height)
        dom = dump_dom(url, args.width)
    if args.dom:
        args.dom.write_text(dom, encoding="utf-8")
    maths, errors, raw = read_maths(dom)
    print(f"{maths} formulas typeset, {errors} errors, {len(raw)} raw TeX")
    for r in raw:
        print("  raw TeX:", r)
    return 1 if raw or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
