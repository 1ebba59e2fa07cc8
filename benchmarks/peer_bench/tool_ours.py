"""Our `DataInfInfluence`, and the exact per-block inverse (the reference).

Both use the same per-sample gradients (the hook engine where it exists), so
that the reference differs from DataInf only in the inverse.
"""

from __future__ import annotations

import time
from typing import Dict, List, Union

import torch
from pydvl.influence import SequentialInfluenceCalculator
from pydvl.influence.torch.util import NestedTorchCatAggregator

from pydvl_datainf import DataInfInfluence

from .base import ToolOutput
from .jobs import JobData, engine

ENGINE = engine()


def _engine() -> str:
    return ENGINE


def run_ours(
    job: JobData,
    quick: bool,
    regularization: Union[str, float] = "auto",
    pipeline: str = "direct",
) -> ToolOutput:
    """`fit`, then `train_influences` (or pyDVL's calculator) for all test points.

    Args:
        regularization: `"auto"` (the paper's λ_l per block) or `"scalar"`
            (the job's one-block λ for every block, as the scalar-only tools).
        pipeline: `"direct"` (`train_influences`, one call for all test points)
            or `"calculator"` (pyDVL's `SequentialInfluenceCalculator`, chunks
            of 100, as `bench_mlp_matrix.py`).
    """
    lam: Union[str, float] = (
        job.lam_scalar if regularization == "scalar" else regularization
    )
    engine = _engine()
    infl = DataInfInfluence(
        job.model,
        job.loss,
        regularization=lam,
        block_structure=job.blocks,
        engine=engine,
        progress=False,
    )
    train = job.train_loader()
    t0 = time.perf_counter()
    infl.fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if pipeline == "calculator":
        calc = SequentialInfluenceCalculator(infl)
        matrix = calc.influences(job.test_loader(100), train).compute(
            NestedTorchCatAggregator()
        )
    else:
        matrix = infl.train_influences(job.x_test, job.y_test)
    matrix_s = time.perf_counter() - t0
    lam_text = "λ_l = paper rule per block" if lam == "auto" else f"λ = {lam:.3g}"
    return ToolOutput(
        fit_s,
        matrix_s,
        matrix,
        f"engine={infl.engine.name}, {lam_text}, {len(job.blocks)} blocks, "
        f"{'SequentialInfluenceCalculator chunks 100' if pipeline == 'calculator' else 'train_influences'}",
    )


def run_exact(job: JobData, quick: bool) -> ToolOutput:
    r"""Exact $g_{test,l}^\top (G_l + \lambda_l I)^{-1} g_{train,l}$, float64.

    $G_l = \frac{1}{n}\sum_i g_{il} g_{il}^\top$ with the paper's λ_l. Where
    $d_l \le n$ the "fit" Cholesky-factors $G_l + \lambda_l I$ ($d_l \times d_l$);
    where $n < d_l$ it uses the push-through identity
    $(G_l + \lambda_l I)^{-1} g^\top = n\, g^\top (g g^\top + n \lambda_l I)^{-1}$
    and factors the $n \times n$ kernel instead: both are exact solves.
    """
    grads_of = DataInfInfluence(
        job.model,
        job.loss,
        block_structure=job.blocks,
        engine=_engine(),
        progress=False,
    )
    dtype = torch.float64
    n = job.n_train
    t0 = time.perf_counter()
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in job.blocks}
    for x, y in job.train_loader():
        for k, g in grads_of.per_sample_gradients(x, y).items():
            parts[k].append(g.to(dtype))
    train = {k: torch.cat(v) for k, v in parts.items()}
    del parts
    factors: Dict[str, torch.Tensor] = {}
    for k, g in train.items():
        lam = job.lam_blocks[k]
        if g.shape[1] <= n:  # primal: (G + λI), d x d
            gram = g.T @ g / n
            gram.diagonal().add_(lam)
        else:  # kernel: (g gᵀ + nλI), n x n
            gram = g @ g.T
            gram.diagonal().add_(n * lam)
        factors[k] = torch.linalg.cholesky(gram)
        del gram
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matrix = torch.zeros(job.n_test, n, dtype=dtype, device=job.device)
    start = 0
    for xt, yt in job.test_loader(job.batch_size):
        rows = slice(start, start + len(xt))
        start += len(xt)
        for k, g in grads_of.per_sample_gradients(xt, yt).items():
            g = g.to(dtype)
            if g.shape[1] <= n:
                sol = torch.cholesky_solve(g.T, factors[k])  # (d, b)
                matrix[rows] += sol.T @ train[k].T
            else:
                a = g @ train[k].T  # (b, n)
                matrix[rows] += n * torch.cholesky_solve(a.T, factors[k]).T
    matrix_s = time.perf_counter() - t0
    return ToolOutput(
        fit_s,
        matrix_s,
        matrix,
        f"float64 Cholesky per block (d×d, or n×n kernel where n < d), λ_l = "
        f"paper rule, {len(job.blocks)} blocks",
    )
