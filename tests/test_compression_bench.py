"""The helpers of the compression benchmarks on real models
(`benchmarks/compression_common.py`): their scores against the independent
float64 reference, their agreement measures, and the projections they
measure going through `DataInfInfluence(compression=...)` unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from reference import auto_lambda, dense_R, rel_err

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compression_common as cc  # noqa: E402
from pydvl_datainf import DataInfInfluence  # noqa: E402


def _grads(seed: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def test_scores_match_the_dense_reference() -> None:
    train = {"a": _grads(0, 30, 6), "b": _grads(1, 30, 4)}
    test = {"a": _grads(2, 3, 6), "b": _grads(3, 3, 4)}
    norms = cc.squared_norms(train)
    lam = cc.regularization(norms, {"a": 6, "b": 4})
    assert lam == pytest.approx({k: auto_lambda(v) for k, v in train.items()})
    want = sum(test[k] @ dense_R(train[k], lam[k]) @ train[k].T for k in train)
    got = cc.datainf_scores(test, train, norms, lam)
    assert rel_err(got, want) < 1e-8


def test_agreement_measures() -> None:
    a = torch.arange(12, dtype=torch.float64).reshape(2, 6)
    assert cc.spearman(a, a) == pytest.approx(1.0)
    assert cc.spearman(-a, a) == pytest.approx(-1.0)
    assert cc.top_overlap(a, a, 3) == 1.0
    assert cc.top_overlap(-a, a, 3) == 0.0
    b = a.clone()
    b[:, [4, 5]] = b[:, [5, 4]]  # swaps within the top 2: same set, other order
    assert cc.top_overlap(b, a, 2) == 1.0 and cc.spearman(b, a) < 1.0
    assert cc.relative_error(2 * a, a) == pytest.approx(1.0)


@pytest.mark.parametrize("family, size", [("gaussian", 3), ("kronecker", 2)])
def test_in_memory_projection_is_what_the_library_computes(
    family: str, size: int
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(6, 3, bias=False),
    )
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    dense = DataInfInfluence(model, torch.nn.functional.cross_entropy, progress=False)
    dense.fit(loader)
    shapes = {b.name: [list(s) for s in b.shapes] for b in dense.blocks}
    specs = cc.projection_specs(family, size, shapes, seed=1)
    assert cc.width(specs) == sum(s.k for s in specs.values()) < 48
    train = {k: v.double() for k, v in dense.per_sample_gradients(x, y).items()}
    test = {k: v[:4] for k, v in train.items()}
    norms = cc.squared_norms(train)
    lam = cc.regularization(norms, {k: v.shape[1] for k, v in train.items()})
    memory = cc.datainf_scores(
        cc.project(specs, test), cc.project(specs, train), norms, lam
    )
    compressed = DataInfInfluence(
        model, torch.nn.functional.cross_entropy, compression=specs, progress=False
    ).fit(loader)
    library = compressed.train_influences(x[:4], y[:4]).double()
    assert rel_err(library, memory) < 1e-5


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="family"):
        cc.projection_specs("sparse", 2, {"w": [[3, 4]]}, seed=0)
