"""Execute every tutorial notebook in reduced mode (DATAINF_NOTEBOOK_MODE=reduced).

The executed copies go to a temporary folder: the notebooks in the repository
keep the outputs of their full-mode run, which the docs render.
"""

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("[0-9]*.ipynb"))


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
