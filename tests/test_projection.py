"""Seeded projections: specs, bit-exact regeneration, and every way to apply them.

Every projected value is compared with the explicit k x d matrix applied to the
explicit dense rows (torch.kron / torch.block_diag / explicit outer products),
in float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pydvl_datainf.factored import FactoredGrads
from pydvl_datainf.projection import (
    Projection,
    ProjectionMismatchError,
    ProjectionSpec,
    block_spec,
    block_specs,
    concat_spec,
    dense_spec,
    derive_seed,
    kronecker_spec,
    project_rows,
)
from reference import rel_err

F64 = "float64"


def specs():
    return [
        dense_spec(12, 5, "gaussian", seed=1, dtype=F64),
        dense_spec(12, 5, "rademacher", seed=2, dtype=F64),
        dense_spec(12, 17, "orthogonal", seed=3, dtype=F64),
        kronecker_spec((6, 7), (3, 4), seed=4, dtype=F64),
        concat_spec(
            [
                kronecker_spec((6, 7), (8, 9), "orthogonal", seed=5, dtype=F64),
                dense_spec(6, 2, seed=6, dtype=F64),
            ]
        ),
    ]


# ------------------------------------------------------------------ the spec


@pytest.mark.parametrize("spec", specs(), ids=lambda s: s.kind)
def test_the_spec_round_trips_through_json(spec):
    text = spec.to_json()
    json.loads(text)  # plain JSON
    again = ProjectionSpec.from_json(text)
    assert again == spec
    assert torch.equal(Projection(again).matrix(), Projection(spec).matrix())


def test_a_spec_of_another_version_is_refused():
    d = dense_spec(4, 2).to_dict()
    d["version"] = 99
    with pytest.raises(ProjectionMismatchError, match="version 99"):
        ProjectionSpec.from_dict(d)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="orthogonal", dim=5, k=4), "k >= dim"),
        (dict(kind="identity", dim=5, k=4), "k == dim"),
        (dict(kind="sparse", dim=5, k=4), "kind must be"),
        (dict(kind="gaussian", dim=5, k=0), "positive"),
        (dict(kind="gaussian", dim=5, k=2, dtype="int8"), "dtype"),
    ],
)
def test_invalid_specs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectionSpec(**kwargs)


def test_a_changed_matrix_is_detected_by_its_digest():
    spec = dense_spec(8, 3, seed=0)
    forged = ProjectionSpec.from_dict({**spec.to_dict(), "digest": "0" * 64})
    with pytest.raises(ProjectionMismatchError, match="differs"):
        Projection(forged)
    other_seed = ProjectionSpec.from_dict({**spec.to_dict(), "seed": 1})
    with pytest.raises(ProjectionMismatchError):
        Projection(other_seed)


def test_seeds_differ_by_name_and_matrices_by_seed():
    assert derive_seed(0, "a") != derive_seed(0, "b") != derive_seed(1, "a")
    a = Projection(dense_spec(10, 4, seed=0)).matrix()
    b = Projection(dense_spec(10, 4, seed=1)).matrix()
    assert not torch.equal(a, b)
    w = kronecker_spec((10, 10), (4, 4), seed=0)
    assert w.parts[0].seed != w.parts[1].seed


_REGENERATE = """
import hashlib, json, sys, torch
torch.set_num_threads(1)
from pydvl_datainf.projection import Projection, ProjectionSpec
out = []
for text in json.loads(sys.stdin.read()):
    m = Projection(ProjectionSpec.from_json(text)).matrix().contiguous()
    out.append(hashlib.sha256(m.view(torch.uint8).numpy().tobytes()).hexdigest())
print(json.dumps(out))
"""


def test_another_process_regenerates_the_same_bits():
    """A fresh process with one thread (as a Dask worker may have) draws the
    same float64 matrices, bit for bit, as this one with two."""
    torch.set_num_threads(2)
    chosen = specs()
    here = []
    for spec in chosen:
        m = Projection(spec).matrix().contiguous()
        here.append(m.view(torch.uint8).numpy().tobytes())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _REGENERATE],
        input=json.dumps([s.to_json() for s in chosen]),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    import hashlib

    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert theirs == [hashlib.sha256(b).hexdigest() for b in here]


# ------------------------------------------------------------------ the matrices


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_random_projections_keep_squared_norms_in_expectation(kind):
    """E||Px||^2 = ||x||^2: the mean over 400 seeds is within 5 standard errors."""
    x = torch.randn(40, dtype=torch.float64)
    k, seeds = 16, 400
    ratios = torch.tensor(
        [
            float(
                Projection(dense_spec(40, k, kind, s, F64, seal=False))
                .apply(x[None])
                .square()
                .sum()
            )
            / float(x.square().sum())
            for s in range(seeds)
        ]
    )
    stderr = (2 / k) ** 0.5 / seeds**0.5
    assert abs(float(ratios.mean()) - 1) < 5 * stderr
    assert float(ratios.std()) > 0.5 * (2 / k) ** 0.5  # it is random


def test_kronecker_projections_keep_inner_products_in_expectation():
    u, v = torch.randn(2, 5, 6, dtype=torch.float64)
    seeds, est = 400, []
    for s in range(seeds):
        p = Projection(kronecker_spec((5, 6), (3, 3), seed=s, dtype=F64, seal=False))
        est.append(float(p.apply(u.reshape(1, -1)) @ p.apply(v.reshape(1, -1)).T))
    exact = float((u * v).sum())
    scale = float(u.norm() * v.norm())
    mean = sum(est) / seeds
    assert abs(mean - exact) < 5 * scale * (2 / 3 + 2 / 3) ** 0.5 / seeds**0.5


@pytest.mark.parametrize("shape", [(7, 7), (9, 4)])
def test_orthogonal_projections_are_isometries(shape):
    k, d = shape
    p = Projection(dense_spec(d, k, "orthogonal", seed=0, dtype=F64)).matrix()
    assert p.shape == (k, d)
    assert rel_err(p.T @ p, torch.eye(d, dtype=torch.float64)) < 1e-13
    w = Projection(kronecker_spec((3, 4), (5, 4), "orthogonal", seed=1, dtype=F64))
    m = w.matrix()
    assert rel_err(m.T @ m, torch.eye(12, dtype=torch.float64)) < 1e-13


def test_a_side_that_would_not_shrink_is_the_identity():
    s = kronecker_spec((8, 100), (16, 10))
    assert [p.kind for p in s.parts] == ["identity", "gaussian"]
    assert s.k == 80


# ------------------------------------------------------------------ application


@pytest.mark.parametrize("spec", specs(), ids=lambda s: s.kind)
def test_dense_rows_are_projected_by_the_explicit_matrix(spec):
    p = Projection(spec)
    rows = torch.randn(6, spec.dim, dtype=torch.float64)
    expected = rows @ p.matrix().T
    assert p.matrix().shape == (spec.k, spec.dim)
    assert rel_err(p.apply(rows), expected) < 1e-12


def test_the_explicit_kronecker_matrix_is_the_kronecker_product_of_its_sides():
    spec = kronecker_spec((6, 7), (3, 4), seed=4, dtype=F64)
    p = Projection(spec)
    out, inp = (Projection(s).matrix() for s in spec.parts)
    assert torch.equal(p.matrix(), torch.kron(out, inp))
    g = torch.randn(6, 7, dtype=torch.float64)
    assert rel_err(p.apply(g.reshape(1, -1))[0], (out @ g @ inp.T).reshape(-1)) < 1e-12


@pytest.mark.parametrize("tail", [False, True])
def test_factored_rows_stay_factored_and_match_the_dense_projection(tail):
    u = torch.randn(5, 6, dtype=torch.float64)
    a = torch.randn(5, 7, dtype=torch.float64)
    t = torch.randn(5, 6, dtype=torch.float64) if tail else None
    kron = kronecker_spec((6, 7), (3, 4), seed=4, dtype=F64)
    spec = concat_spec([kron, dense_spec(6, 2, seed=9, dtype=F64)]) if tail else kron
    g = FactoredGrads(u, a, t)
    p = Projection(spec)
    projected = p.apply_rows(g)
    assert isinstance(projected, FactoredGrads)
    assert projected.layout == ((3, 4, 2) if tail else (3, 4))
    assert rel_err(projected.dense(), g.dense() @ p.matrix().T) < 1e-12


def test_factored_rows_of_another_layout_are_projected_densely():
    g = FactoredGrads(torch.randn(5, 6).double(), torch.randn(5, 7).double())
    p = Projection(dense_spec(42, 10, seed=0, dtype=F64))
    out = p.apply_rows(g)
    assert isinstance(out, torch.Tensor)
    assert rel_err(out, g.dense() @ p.matrix().T) < 1e-12


def test_per_token_factors_are_projected_without_the_dense_gradient():
    left = torch.randn(4, 9, 6, dtype=torch.float64)
    right = torch.randn(4, 9, 7, dtype=torch.float64)
    dense = torch.stack(
        [sum(torch.outer(left[i, t], right[i, t]) for t in range(9)) for i in range(4)]
    ).reshape(4, -1)
    p = Projection(kronecker_spec((6, 7), (3, 4), seed=4, dtype=F64))
    assert rel_err(p.apply_tokens(left, right), dense @ p.matrix().T) < 1e-12


def test_project_rows_keeps_the_exact_norms():
    rows = torch.randn(5, 12, dtype=torch.float64)
    p = Projection(dense_spec(12, 3, seed=0, dtype=F64))
    out = project_rows(p, rows)
    assert rel_err(out.squared_norms, rows.square().sum(1)) < 1e-14
    assert not torch.allclose(out.dense().square().sum(1), out.squared_norms)
    factored = FactoredGrads(torch.randn(5, 3).double(), torch.randn(5, 4).double())
    q = Projection(kronecker_spec((3, 4), (2, 2), dtype=F64))
    assert (
        rel_err(
            project_rows(q, factored).squared_norms, factored.dense().square().sum(1)
        )
        < 1e-14
    )


def test_projections_refuse_rows_of_the_wrong_width():
    p = Projection(dense_spec(12, 3, seed=0))
    with pytest.raises(ValueError, match="12 columns"):
        p.apply(torch.randn(2, 11))
    with pytest.raises(ValueError, match="Kronecker"):
        p.apply_tokens(torch.randn(2, 3, 4), torch.randn(2, 3, 3))
    q = Projection(kronecker_spec((3, 4), (2, 2)))
    with pytest.raises(ValueError, match="widths"):
        q.apply_tokens(torch.randn(2, 3, 4), torch.randn(2, 3, 3))


def test_the_projection_is_applied_in_its_dtype():
    p = Projection(dense_spec(12, 3, seed=0), dtype=torch.float64)
    assert p.apply(torch.randn(2, 12)).dtype == torch.float64
    assert (
        Projection(dense_spec(12, 3, seed=0)).apply(torch.randn(2, 12)).dtype
        == torch.float32
    )


def test_block_specs_have_one_part_per_parameter():
    s = block_spec([(8, 4096), (4096, 8), (100,), (300,)], side=16, dense_k=256)
    assert [p.kind for p in s.parts] == [
        "kronecker",
        "kronecker",
        "identity",
        "gaussian",
    ]
    assert [p.dim for p in s.parts] == [8 * 4096, 4096 * 8, 100, 300]
    assert [p.k for p in s.parts] == [8 * 16, 16 * 8, 100, 256]
    specs = block_specs({"a": [(4, 4)], "b": [(4, 4)]}, side=2)
    assert specs["a"].parts[0].parts[0].seed != specs["b"].parts[0].parts[0].seed
    one = Projection(block_spec([(3, 4)], side=2, dtype=F64))
    g = FactoredGrads(torch.randn(5, 3).double(), torch.randn(5, 4).double())
    projected = one.apply_rows(g)
    assert isinstance(projected, FactoredGrads)
    assert rel_err(projected.dense(), g.dense() @ one.matrix().T) < 1e-12
