"""Execute every tutorial notebook in reduced mode (DATAINF_NOTEBOOK_MODE=reduced).

The executed copies go to a temporary folder: the notebooks in the repository
keep the outputs of their full-mode run, which the docs render.
"""

import base64
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "notebooks" / "results"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def test_there_are_tutorials():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "1_mislabeled_data.ipynb",
        "2_approximation_quality.ipynb",
        "3_influential_data.ipynb",
        "4_scaling_out.ipynb",
    ]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_reduced_mode(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAINF_NOTEBOOK_MODE", "reduced")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # the kernel must run the interpreter of this environment
    monkeypatch.setenv(
        "PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    )
    # the results files the notebooks read (they write only in full mode, or
    # where DATAINF_RESULTS_DIR says; reduced runs write to this copy)
    shutil.copytree(RESULTS, tmp_path / "results")
    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        book,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    nbformat.write(book, tmp_path / path.name)
    errors = [
        o
        for c in book.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert "mode: reduced" in "".join(
        o.get("text", "")
        for o in book.cells[[c.cell_type for c in book.cells].index("code")].outputs
    )
    images = sum(
        "image/png" in o.get("data", {})
        for c in book.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert images >= 1  # every tutorial draws at least one figure


def _lambda_page():
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        import lambda_page
    finally:
        sys.path.pop(0)
    return lambda_page


def _numbers_in(obj, found):
    """Every number of a JSON document: values, and numbers inside keys and strings."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _numbers_in(k, found)
            _numbers_in(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _numbers_in(v, found)
    elif isinstance(obj, bool):
        pass
    elif isinstance(obj, (int, float)):
        found.update({str(obj), f"{obj:.3f}", f"{obj:g}"})
    elif isinstance(obj, str):
        found.update(re.findall(r"\d+(?:\.\d+)?", obj))
    return found


def test_lambda_page_is_generated_from_the_results_files():
    page = (ROOT / "docs" / "lambda.md").read_text(encoding="utf-8")
    figures = json.loads((RESULTS / "lambda.json").read_text(encoding="utf-8"))
    lp = _lambda_page()
    # lambda.json aggregates the tutorials' results files, the page renders it
    assert lp.aggregate(RESULTS) == figures
    assert page == lp.render(figures)
    # and every figure on the page is in lambda.json (formulas, code and
    # links aside, which hold no measured figures)
    prose = re.sub(r"\$[^$]*\$|`[^`]*`|\]\([^)]*\)", " ", page)
    numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?", prose)
    assert numbers, "the page shows no figures"
    known = _numbers_in(figures, set())
    assert [x for x in numbers if x not in known] == []


def test_lambda_page_number_check_can_fail(tmp_path):
    lp = _lambda_page()
    figures = json.loads((RESULTS / "lambda.json").read_text(encoding="utf-8"))
    page = lp.render(figures)
    known = _numbers_in(figures, set())
    assert "0.123456" not in known
    assert page.replace("seeds", "seeds (0.123456)", 1) != page


def _control_characters(book):
    """(cell index, character) of every control character in the cells' text."""
    return [
        (i, repr(ch))
        for i, cell in enumerate(book.cells)
        for ch in "\t\r\x0b\x0c\x08\x07"
        if ch in cell.source
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_control_characters_in_notebook_text(path):
    """LaTeX such as \\text or \\rVert written through Python escapes turns into TAB or CR."""
    assert _control_characters(nbformat.read(path, as_version=4)) == []


def test_control_character_check_can_fail():
    book = nbformat.v4.new_notebook()
    book.cells = [
        nbformat.v4.new_markdown_cell("$\\lVert g \\rVert$"),
        nbformat.v4.new_markdown_cell("$\text{mean}$"),  # "\t" + "ext"
    ]
    assert _control_characters(book) == [(1, "'\\t'")]


# the text of each notebook names the mode of the outputs it holds
MODE_NOTES = {
    "full": "The outputs shown here come from the **full**",
    "reduced": "The outputs on this page are from the reduced mode",
}


def _printed_mode(book) -> str:
    first = next(c for c in book.cells if c.cell_type == "code")
    text = "".join(o.get("text", "") for o in first.get("outputs", []))
    found = re.findall(r"mode: (full|reduced)", text)
    assert found, "the first code cell has no output: run notebooks/execute.py"
    return found[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_are_those_the_text_describes(path):
    """The docs render the committed outputs: they exist, hold no error, and
    the text says which mode made them."""
    book = nbformat.read(path, as_version=4)
    mode = _printed_mode(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code), "a code cell has no output"
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert errors == []
    text = "\n".join(c.source for c in book.cells if c.cell_type == "markdown")
    assert MODE_NOTES[mode] in text
    other = "reduced" if mode == "full" else "full"
    assert MODE_NOTES[other] not in text


def _png_dpi(png: bytes) -> float:
    """The resolution a PNG declares (its pHYs chunk), in dots per inch."""
    at = png.find(b"pHYs")
    assert at > 0, "the PNG declares no resolution"
    per_metre, _, unit = struct.unpack(">IIB", png[at + 4 : at + 13])
    assert unit == 1  # metres
    return per_metre * 0.0254


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_figures_are_at_least_150_dpi(path):
    book = nbformat.read(path, as_version=4)
    dpis = [
        _png_dpi(base64.b64decode(o["data"]["image/png"]))
        for c in book.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert dpis, "no figure"
    assert min(dpis) >= 149.5
