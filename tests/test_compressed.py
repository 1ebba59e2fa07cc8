"""DataInf in projected space and its stated error.

The projected-space operator and the precomputed curvature are compared with
explicit k x k matrices built in float64 from explicit outer products; with an
orthogonal projection (k >= d) the scores are compared with the independent
reference (mean of explicit inverses, tests/reference.py). The
Johnson-Lindenstrauss bound is checked against errors measured on random data,
and shown to fail for a wrongly scaled projection.
"""

from __future__ import annotations

import math

import pytest
import torch

from pydvl_datainf.compressed import (
    apply_compressed,
    apply_curvature,
    curvature_matrix,
    curvature_sum,
    score_error_bound,
    score_pairs,
    token_squared_norms,
)
from pydvl_datainf.jl import (
    jl_dimension,
    jl_epsilon,
    jl_exponent,
    jl_failure_probability,
)
from pydvl_datainf.projection import (
    Projection,
    concat_spec,
    dense_spec,
    kronecker_spec,
)
from reference import auto_lambda, dense_R, rel_err

F64 = torch.float64


def explicit_R_tilde(rows, sq_norms, lam):
    """mean_i (I - g_i g_i^T / (lam + s_i)) / lam, from explicit outer products."""
    n, k = rows.shape
    eye = torch.eye(k, dtype=F64)
    return (
        sum(
            (eye - torch.outer(rows[i], rows[i]) / (lam + sq_norms[i])) / lam
            for i in range(n)
        )
        / n
    )


def explicit_M(rows, sq_norms, lam):
    n = len(rows)
    return sum(torch.outer(r, r) / (lam + s) for r, s in zip(rows, sq_norms)) / n


@pytest.fixture
def block():
    g = torch.randn(40, 30, dtype=F64) * torch.linspace(0.1, 3, 30, dtype=F64)
    p = Projection(dense_spec(30, 12, seed=0, dtype="float64"))
    return g, p, g.square().sum(1), auto_lambda(g)


def test_the_projected_operator_matches_explicit_matrices(block):
    g, p, s, lam = block
    rows, v = p.apply(g), p.apply(torch.randn(5, 30, dtype=F64))
    expected = v @ explicit_R_tilde(rows, s, lam)  # symmetric
    assert rel_err(apply_compressed(v, rows, s, lam), expected) < 1e-8


def test_the_precomputed_curvature_matches_explicit_matrices(block):
    g, p, s, lam = block
    rows, v = p.apply(g), p.apply(torch.randn(5, 30, dtype=F64))
    m = curvature_matrix(rows, s, lam)
    assert rel_err(m, explicit_M(rows, s, lam)) < 1e-8
    assert (
        rel_err(apply_curvature(v, m, lam), v @ explicit_R_tilde(rows, s, lam)) < 1e-8
    )
    assert rel_err(apply_curvature(v, m, lam), apply_compressed(v, rows, s, lam)) < 1e-8


def test_the_curvature_is_additive_over_chunks(block):
    g, p, s, lam = block
    rows = p.apply(g)
    chunks = sum(
        curvature_sum(rows[i : i + 7], s[i : i + 7], lam) for i in range(0, 40, 7)
    )
    assert rel_err(chunks / 40, curvature_matrix(rows, s, lam)) < 1e-12
    assert (
        rel_err(
            curvature_matrix(rows[:7], s[:7], lam, n=40),
            curvature_sum(rows[:7], s[:7], lam) / 40,
        )
        < 1e-14
    )


def test_the_exact_norms_are_used_not_the_projected_ones(block):
    g, p, s, lam = block
    rows, v = p.apply(g), p.apply(torch.randn(3, 30, dtype=F64))
    with_projected = apply_compressed(v, rows, rows.square().sum(1), lam)
    assert rel_err(with_projected, apply_compressed(v, rows, s, lam)) > 1e-3
    with pytest.raises(ValueError, match="squared norms"):
        apply_compressed(v, rows, s[:-1], lam)
    with pytest.raises(ValueError, match="positive"):
        curvature_sum(rows, s, 0.0)


@pytest.mark.parametrize("kind", ["dense", "kronecker", "concat"])
def test_an_orthogonal_projection_gives_the_uncompressed_scores(kind):
    """k >= d, orthogonal: the scores equal the reference's (explicit inverses)."""
    n, shape = 25, (4, 5)
    d = shape[0] * shape[1] + (3 if kind == "concat" else 0)
    train = torch.randn(n, d, dtype=F64)
    test = torch.randn(4, d, dtype=F64)
    if kind == "dense":
        spec = dense_spec(d, d + 3, "orthogonal", seed=1, dtype="float64")
    else:
        spec = kronecker_spec(shape, (6, 5), "orthogonal", seed=2, dtype="float64")
        if kind == "concat":
            spec = concat_spec([spec, dense_spec(3, 4, "orthogonal", 3, "float64")])
    p = Projection(spec)
    lam = auto_lambda(train)
    reference = test @ dense_R(train, lam) @ train.T
    s = train.square().sum(1)
    rows = p.apply(train)
    projected = apply_compressed(p.apply(test), rows, s, lam) @ rows.T
    assert rel_err(projected, reference) < 1e-8
    m = curvature_matrix(rows, s, lam)
    assert rel_err(apply_curvature(p.apply(test), m, lam) @ rows.T, reference) < 1e-8


@pytest.mark.parametrize("t, p, q", [(3, 20, 30), (40, 2, 3)])  # both branches
def test_token_squared_norms_equal_the_norms_of_the_dense_gradients(t, p, q):
    left = torch.randn(5, t, p, dtype=F64)
    right = torch.randn(5, t, q, dtype=F64)
    dense = torch.stack(
        [sum(torch.outer(left[i, j], right[i, j]) for j in range(t)) for i in range(5)]
    )
    assert rel_err(token_squared_norms(left, right), dense.square().sum((1, 2))) < 1e-12


# ------------------------------------------------------------------ the bound


def test_the_dimension_and_the_error_invert_each_other():
    for eps, delta, pairs in [(0.1, 0.01, 1), (0.3, 1e-4, 10**6), (0.05, 0.1, 100)]:
        k = jl_dimension(eps, delta, pairs)
        assert jl_failure_probability(k, eps, pairs) <= delta
        assert jl_failure_probability(k - 1, eps, pairs) > delta
        assert jl_epsilon(k, delta, pairs) <= eps + 1e-12
        assert jl_epsilon(k - 1, delta, pairs) > eps
    assert jl_dimension(0.1, 0.01) == math.ceil(2 * math.log(400) / jl_exponent(0.1))


def test_the_bound_refuses_what_it_cannot_give():
    with pytest.raises(ValueError, match="too small"):
        jl_epsilon(20, 0.01)
    with pytest.raises(ValueError, match="epsilon"):
        jl_dimension(1.5, 0.01)
    with pytest.raises(ValueError, match="delta"):
        jl_dimension(0.1, 0.0)


def _inner_product_errors(p, u, v):
    pu, pv = p(u), p(v)
    return ((pu * pv).sum(1) - (u * v).sum(1)).abs() / (u.norm(dim=1) * v.norm(dim=1))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_measured_inner_product_errors_fall_within_the_bound(kind):
    """1,000 pairs of correlated vectors, k = 256, delta = 1e-3."""
    d, k, pairs, delta = 600, 256, 1000, 1e-3
    u = torch.randn(pairs, d, dtype=F64) * torch.linspace(0.1, 2, d, dtype=F64)
    v = 0.6 * u + torch.randn(pairs, d, dtype=F64)
    proj = Projection(dense_spec(d, k, kind, seed=7, dtype="float64"))
    errors = _inner_product_errors(proj.apply, u, v)
    bound = jl_epsilon(k, delta, pairs)
    assert float(errors.max()) <= bound
    # the bound is not vacuous here: the largest error is a sizeable part of it
    assert float(errors.max()) > 0.2 * bound
    # and the check can fail: a projection scaled 1.5x breaks it
    wrong = _inner_product_errors(lambda x: 1.5 * proj.apply(x), u, v)
    assert float(wrong.max()) > bound


def test_measured_score_errors_fall_within_the_stated_bound():
    """DataInf scores of one block from a Gaussian projection (k = 512) are
    within score_error_bound of the exact ones, for every (test, train) pair."""
    n, m, d, k, delta = 150, 6, 600, 512, 1e-3
    base = torch.randn(n + m, 40, dtype=F64) @ torch.randn(40, d, dtype=F64) / 6
    grads = base + 0.3 * torch.randn(n + m, d, dtype=F64)
    train, test = grads[:n], grads[n:]
    lam = auto_lambda(train)
    s = train.square().sum(1)
    weighted = train.T / (lam + s)  # the uncompressed R_l, explicitly (d x d)
    r = (torch.eye(d, dtype=F64) - weighted @ train / n) / lam
    exact = test @ r @ train.T
    p = Projection(dense_spec(d, k, seed=11, dtype="float64"))
    rows = p.apply(train)
    approx = apply_compressed(p.apply(test), rows, s, lam) @ rows.T
    bound = score_error_bound(
        test.norm(dim=1), train.norm(dim=1), lam, k=k, delta=delta, fit_squared_norms=s
    )
    assert score_pairs(n, m, n) == m * n + n * m + n * n
    ratio = (approx - exact).abs() / bound
    print(f"largest error / bound: {float(ratio.max()):.3g}")
    assert float(ratio.max()) <= 1.0
    assert float(ratio.max()) > 1e-3  # the scores did change: the check is live
    eps = jl_epsilon(k, delta, score_pairs(n, m, n))
    same = score_error_bound(
        test.norm(dim=1), train.norm(dim=1), lam, eps, fit_squared_norms=s
    )
    assert rel_err(same, bound) < 1e-14
