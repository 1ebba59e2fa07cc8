"""Every example in the docstrings of the library runs as written.

The library is every module of the ``pydvl_datainf`` package, found by walking
it (only ``pydvl_datainf.demo``, the launcher of ``python -m
pydvl_datainf.demo``, is left out: importing it does nothing but import the
demo). An example is a fenced ```python block in the docstring of a module, of
a class or function defined in it, or of a method or property of such a
class.

The blocks of one docstring form one example: they run in order, in one fresh
namespace (an example imports what it uses, as a reader copying it would), in
a temporary working directory, with the Hugging Face hub offline. ``>>>``
examples are doctests and run here too, one test per module.

``test_every_fence_in_the_sources_is_collected`` counts the fences in the
source files, so that an example the collector cannot reach (say, in a nested
function) fails the suite rather than going untested.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

import pydvl_datainf
from test_docs_snippets import Block, markdown_python_blocks, run_page

PACKAGE_DIR = Path(pydvl_datainf.__file__).resolve().parent
# the launcher of `python -m pydvl_datainf.demo`; the demo is experiments.demo
NOT_COLLECTED = {"pydvl_datainf.demo"}
PYTHON_FENCE = re.compile(r"^\s*```+\s*(python|py)\b")


def library_modules() -> List[str]:
    """Every module of the package, walked, less `NOT_COLLECTED`."""
    names = ["pydvl_datainf"] + [
        m.name for m in pkgutil.walk_packages(pydvl_datainf.__path__, "pydvl_datainf.")
    ]
    return sorted(n for n in names if n not in NOT_COLLECTED)


def _doc(obj: Any) -> str:
    # `__doc__`, not `inspect.getdoc`: a method without a docstring must not
    # run the example of the method it overrides a second time
    doc = obj.fget.__doc__ if isinstance(obj, property) else obj.__doc__
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def collect() -> Dict[str, List[Block]]:
    """`{qualified name: [blocks]}` for every docstring with Python examples."""
    found: Dict[str, List[Block]] = {}
    seen: Set[int] = set()

    def visit(obj: Any, key: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        blocks = markdown_python_blocks(_doc(obj), key)
        if blocks:
            found[key] = blocks
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    visit(member, f"{key}.{attr}")
                elif inspect.isclass(member) and member.__qualname__.startswith(
                    obj.__qualname__ + "."
                ):
                    visit(member, f"{key}.{attr}")

    for module_name in library_modules():
        module = importlib.import_module(module_name)
        visit(module, module_name)
        for member in vars(module).values():
            is_code = inspect.isclass(member) or inspect.isfunction(member)
            # re-exports are visited once, in the module that defines them
            if is_code and getattr(member, "__module__", None) == module_name:
                visit(member, f"{module_name}.{member.__qualname__}")
    return found


EXAMPLES = collect()


def fences_in_sources() -> int:
    count = 0
    for path in PACKAGE_DIR.rglob("*.py"):
        rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name in NOT_COLLECTED:
            continue
        text = path.read_text(encoding="utf-8")
        count += sum(bool(PYTHON_FENCE.match(ln)) for ln in text.splitlines())
    return count


def test_the_collector_walks_the_package():
    modules = library_modules()
    for expected in (
        "pydvl_datainf",
        "pydvl_datainf.operator",
        "pydvl_datainf.storage.zarr",
        "pydvl_datainf.gradients.hooks.engine",
        "pydvl_datainf.scoring.executors.dask",
        "pydvl_datainf.experiments.pipelines",
    ):
        assert expected in modules
    assert "pydvl_datainf.demo" not in modules
    assert len(EXAMPLES) >= 50, sorted(EXAMPLES)


def test_every_fence_in_the_sources_is_collected():
    collected = sum(len(blocks) for blocks in EXAMPLES.values())
    assert collected == fences_in_sources()


def test_a_failing_example_fails(tmp_path: Path) -> None:
    """The runner raises on a failing example (else these tests prove nothing)."""
    (block,) = markdown_python_blocks(
        '"""Doc.\n\n```python\nassert 1 + 1 == 3, "wrong"\n```\n"""', "fake"
    )
    with pytest.raises(AssertionError, match="fake:3 failed"):
        run_example([block], tmp_path)


def run_example(blocks: List[Block], tmp_path: Path) -> None:
    """The blocks of one docstring, in order, in one fresh namespace."""
    for b in blocks[1:]:
        b.continues = True
    run_page(blocks, tmp_path)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_docstring_example_runs(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import matplotlib

    matplotlib.use("Agg")
    run_example(EXAMPLES[name], tmp_path)


DOCTEST_FINDER = doctest.DocTestFinder(exclude_empty=True)


def doctests(module_name: str) -> List[doctest.DocTest]:
    """The doctests of the objects a module defines (not of its re-exports)."""
    module = importlib.import_module(module_name)
    return [t for t in DOCTEST_FINDER.find(module, module_name) if t.examples]


DOCTEST_MODULES = [name for name in library_modules() if doctests(name)]


def test_the_library_has_doctests():
    assert len(DOCTEST_MODULES) >= 5, DOCTEST_MODULES


@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_doctests_pass(module_name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctests(module_name):
        # as under `pytest --doctest-modules`, a doctest starts from a copy
        # of its module's globals
        runner.run(test, out=lambda s: print(s, end=""))
    results = runner.summarize(verbose=False)
    assert results.attempted > 0
    assert results.failed == 0, f"{results.failed} doctest(s) failed, see stdout"
