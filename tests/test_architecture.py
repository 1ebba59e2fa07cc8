"""The package's layering, checked from the source (docs/architecture.md).

Each library module belongs to one layer and imports only modules of its own
layer or of layers below it; the application subpackage (`experiments`) is
never imported by the library; there are no import cycles between modules, no
imports of private names across modules, no lazy imports of the package's own
modules, the maths imports neither Zarr nor Dask, and library code sets no
environment variables.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src" / "pydvl_datainf"
PACKAGE = "pydvl_datainf"

#: module (or package prefix) -> layer; the longest matching prefix wins.
LAYERS: Dict[str, int] = {
    # 1. maths: pure functions and values, no storage, no engines
    "errors": 1,
    "formula": 1,
    "factored": 1,
    "blocks": 1,
    "config": 1,
    "fingerprint": 1,
    "rows": 1,
    "projection": 1,
    "jl": 1,
    "compressed": 1,
    "batches": 1,
    # 2. per-sample gradients and storage
    "gradients": 2,
    "storage": 2,
    # 3. the fitted state, the fit pass, persistence, the operator over a state
    "state": 3,
    "fit": 3,
    "dask_fit": 3,
    "persistence": 3,
    "operator": 3,
    # 4. the pyDVL model
    "perturbation": 4,
    "influence": 4,
    # 5. scoring: tiles, the matrix, reductions, executors
    "scoring": 5,
    # 6. integrations
    "hf": 6,
    "diffusion": 6,
    "dataset_influence": 6,
    "trainer": 6,
    "cli": 6,
    # the package's public namespace re-exports from every layer
    "": 7,
}
APPLICATION = "experiments"
LAUNCHER = "demo"  # `python -m pydvl_datainf.demo`, only runs the application
MATHS_FORBIDDEN = ("zarr", "dask", "distributed", "fsspec")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> Dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = modules()


def resolve(name: str) -> Optional[str]:
    """The package-relative module that `name` (absolute, dotted) refers to."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    rel = name[len(PACKAGE) + 1 :] if name != PACKAGE else ""
    while rel not in MODULES:
        if not rel:
            return ""
        rel = rel.rsplit(".", 1)[0] if "." in rel else ""
    return rel


def is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def imports(mod: str) -> Iterator[Tuple[ast.AST, str, List[str], bool]]:
    """(node, imported module, imported names, at top level) for each import."""
    tree = ast.parse(MODULES[mod].read_text())
    top: Set[int] = set()
    for node in tree.body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            top.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, [], id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = (PACKAGE + "." + mod if mod else PACKAGE).split(".")
                if not is_package(mod):
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node, target, [a.name for a in node.names], id(node) in top


def internal_edges(mod: str) -> Iterator[Tuple[str, List[str], bool]]:
    """Package-internal imports of `mod`: (module, names, top level)."""
    for _, target, names, top in imports(mod):
        resolved = resolve(target)
        if resolved is None:
            continue
        sub = [n for n in names if resolve(f"{target}.{n}") == _join(resolved, n)]
        for n in sub:
            yield _join(resolved, n), [], top
        rest = [n for n in names if n not in sub]
        if rest or not names:
            yield resolved, rest, top


def _join(mod: str, name: str) -> str:
    return f"{mod}.{name}" if mod else name


def layer(mod: str) -> Optional[int]:
    if mod.split(".")[0] in (APPLICATION, LAUNCHER):
        return None
    best = max(
        (p for p in LAYERS if p == "" or mod == p or mod.startswith(p + ".")), key=len
    )
    return LAYERS[best]


LIBRARY = [m for m in MODULES if layer(m) is not None]


def test_every_library_module_has_a_layer():
    for mod in LIBRARY:
        if mod:
            assert mod.split(".")[0] in LAYERS, f"{mod} is in no layer of LAYERS"


@pytest.mark.parametrize("mod", LIBRARY)
def test_imports_go_down_the_layers(mod):
    own = layer(mod)
    for target, _, _ in internal_edges(mod):
        if target == mod:
            continue
        assert target.split(".")[0] != APPLICATION, (
            f"{mod} imports the application: {target}"
        )
        theirs = layer(target)
        assert theirs is not None and theirs <= own, (
            f"{mod} (layer {own}) imports {target} (layer {theirs})"
        )


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_lazy_imports_of_the_package(mod):
    lazy = [t for t, _, top in internal_edges(mod) if not top]
    assert not lazy, f"{mod} imports {lazy} inside a function"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_private_names_across_modules(mod):
    for target, names, _ in internal_edges(mod):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{mod} imports private {private} from {target}"


def test_no_cycles_between_modules():
    graph = {
        m: {t for t, _, _ in internal_edges(m) if t != m and not _is_parent(t, m)}
        for m in MODULES
    }
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _is_parent(pkg: str, mod: str) -> bool:
    """A package's `__init__` re-exports its submodules; a submodule importing a
    sibling through the package would be a cycle, importing the package's
    parent namespace is not counted here (the checks above cover layers)."""
    return is_package(pkg) and (pkg == "" or mod.startswith(pkg + "."))


@pytest.mark.parametrize("mod", [m for m in LIBRARY if layer(m) == 1])
def test_the_maths_needs_no_zarr_or_dask(mod):
    for _, target, _, _ in imports(mod):
        assert target.split(".")[0] not in MATHS_FORBIDDEN, f"{mod} imports {target}"


@pytest.mark.parametrize("mod", LIBRARY)
def test_library_sets_no_environment_variables(mod):
    tree = ast.parse(MODULES[mod].read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                assert "environ" not in ast.unparse(t), (
                    f"{mod}:{node.lineno} sets {ast.unparse(t)}"
                )
        if isinstance(node, ast.Call):
            call = ast.unparse(node.func)
            assert not call.endswith(
                ("environ.setdefault", "environ.update", "putenv")
            ), f"{mod}:{node.lineno} calls {call}"


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
    """The layer check fails on a module that imports upwards."""
    bad = ROOT / "formula.py"
    source = bad.read_text() + "\nfrom .influence import DataInfInfluence\n"
    monkeypatch.setitem(MODULES, "formula", tmp_path / "formula.py")
    (tmp_path / "formula.py").write_text(source)
    with pytest.raises(AssertionError, match="formula .layer 1. imports influence"):
        test_imports_go_down_the_layers("formula")
