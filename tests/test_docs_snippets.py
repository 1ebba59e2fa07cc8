"""Every fenced Python block in README.md and docs/*.md runs as written.

One test per page. Blocks run in order, each in a fresh namespace, except a
block whose first line is a comment saying that it continues the block above
(e.g. ``# continues the block above``): it shares the namespace of the block
before it. A block preceded by an HTML comment ``<!-- no-run: REASON -->`` is
not run (the page must say why in its text); such blocks are counted and kept
rare. Blocks run in a temporary working directory.
"""

from __future__ import annotations

import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<info>[^\n`]*)$")
NO_RUN = re.compile(r"<!--\s*no-run:\s*(?P<reason>.+?)\s*-->")
CONTINUES = re.compile(r"^#.*\bcontinues\b.*\b(above|previous)\b", re.IGNORECASE)
MAX_NO_RUN = 3  # over all pages: not running a block is the exception


@dataclass
class Block:
    source: str  # the page (or object) the block comes from
    line: int  # 1-based line of the opening fence
    code: str
    continues: bool
    no_run: Optional[str]

    @property
    def label(self) -> str:
        return f"{self.source}:{self.line}"


def python_blocks(page: Path) -> List[Block]:
    """The fenced ```python blocks of a Markdown page, in order."""
    try:
        source = str(page.relative_to(ROOT))
    except ValueError:
        source = str(page)
    return markdown_python_blocks(page.read_text(encoding="utf-8"), source)


def markdown_python_blocks(text: str, source: str) -> List[Block]:
    """The fenced ```python blocks of Markdown text, in order."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    previous_text = ""  # the last non-blank line before the fence
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            if lines[i].strip():
                previous_text = lines[i]
            i += 1
            continue
        fence, indent = m["fence"], m["indent"]
        info = m["info"].strip().split()
        start = i
        body: List[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and lines[i].strip() == fence
        ):
            body.append(lines[i])
            i += 1
        if i >= len(lines):
            raise AssertionError(f"{source}:{start + 1}: unclosed code fence")
        i += 1
        if info and info[0] in ("python", "py"):
            code = textwrap.dedent(
                "\n".join(b[len(indent) :] if b.startswith(indent) else b for b in body)
            )
            first = next((ln for ln in code.splitlines() if ln.strip()), "")
            no_run = NO_RUN.search(previous_text)
            blocks.append(
                Block(
                    source,
                    start + 1,
                    code,
                    continues=bool(CONTINUES.match(first.strip())),
                    no_run=no_run["reason"] if no_run else None,
                )
            )
        previous_text = ""
    return blocks


ALL_BLOCKS = {page: python_blocks(page) for page in PAGES}


def test_pages_have_python_blocks_and_few_are_not_run():
    blocks = [b for bs in ALL_BLOCKS.values() for b in bs]
    assert len(blocks) >= 10, "the collector found almost no blocks: broken?"
    skipped = [f"{b.label} ({b.no_run})" for b in blocks if b.no_run]
    print(f"{len(blocks)} Python blocks, {len(skipped)} not run: {skipped}")
    assert len(skipped) <= MAX_NO_RUN, skipped


def test_collector_reads_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n```python\nx = 1\n```\n\n"
        "<!-- no-run: needs a cluster -->\n```python\nimport nothing_here\n```\n\n"
        "1. item\n\n    ```python\n    # continues the block above\n    y = x + 1\n"
        "    ```\n\n```bash\necho no\n```\n"
    )
    a, b, c = python_blocks(page)
    assert (a.code.strip(), a.continues, a.no_run) == ("x = 1", False, None)
    assert b.no_run == "needs a cluster" and not b.continues
    assert c.continues and c.code.splitlines()[1] == "y = x + 1"


def run_page(
    blocks: List[Block], tmp_path: Path, initial: Optional[Dict[str, object]] = None
) -> None:
    """Run the blocks in order; a block that does not continue the one before
    starts from a fresh namespace (a copy of `initial`, if given)."""
    namespace: Dict[str, object] = {}
    ran_any = False
    for block in blocks:
        if block.no_run:
            continue
        if block.continues:
            assert ran_any, f"{block.label} continues a block that did not run"
        else:
            namespace = {**(initial or {}), "__name__": "__docs__"}
        code = compile(block.code, block.label, "exec")
        try:
            exec(code, namespace)
        except Exception as exc:  # name the block in the failure
            raise AssertionError(f"{block.label} failed: {exc!r}") from exc
        ran_any = True


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if any(not b.no_run for b in ALL_BLOCKS[p])],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_page_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import matplotlib

    matplotlib.use("Agg")
    cwd = os.getcwd()
    run_page(ALL_BLOCKS[page], tmp_path)
    os.chdir(cwd)
    # Nothing is left in the current folder: an example that writes its stores
    # there fails when it is run a second time, or after another one.
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [], f"{page.name}'s examples write in the current folder: {left}"


def test_readme_quotes_the_pydvl_comparison_results_file():
    """The README's output of benchmarks/compare_pydvl_ihm.py is its results file."""
    results = ROOT / "benchmarks" / "results" / "compare_pydvl_ihm.txt"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert results.read_text(encoding="utf-8").strip() in readme
