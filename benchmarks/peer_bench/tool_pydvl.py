"""pyDVL 0.10's own influence models on the shared jobs.

Every model gets the job's blocks (one per leaf module, as ours) where it takes
a block structure, and the job's one-block λ (pyDVL 0.10 rejects per-block
regularization dicts, so the paper's per-block λ_l cannot be passed). Unless
`pipeline="calculator"`, the test factors are computed once for all test points
and contracted with each training batch (`influence_factors` +
`influences_from_factors`), the fastest way to get the full matrix from a pyDVL
model; the calculator pipeline recomputes the factors for every pair of chunks,
as `SequentialInfluenceCalculator` does.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydvl.influence import SequentialInfluenceCalculator
from pydvl.influence.torch import (
    ArnoldiInfluence,
    EkfacInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
)
from pydvl.influence.torch.util import NestedTorchCatAggregator

from .base import ToolOutput
from .jobs import JobData


def _matrix(model: Any, job: JobData, pipeline: str) -> torch.Tensor:
    train = job.train_loader()
    if pipeline == "calculator":
        calc = SequentialInfluenceCalculator(model)
        return calc.influences(job.test_loader(100), train).compute(
            NestedTorchCatAggregator()
        )
    dev = job.device
    factors = model.influence_factors(job.x_test.to(dev), job.y_test.to(dev))
    cols = [
        model.influences_from_factors(factors, x.to(dev), y.to(dev)) for x, y in train
    ]
    return torch.cat(cols, dim=1)


def _fit_and_query(model: Any, job: JobData, pipeline: str) -> tuple:
    t0 = time.perf_counter()
    model.fit(job.train_loader())
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matrix = _matrix(model, job, pipeline)
    return fit_s, time.perf_counter() - t0, matrix


def _pipeline_text(pipeline: str) -> str:
    return (
        "SequentialInfluenceCalculator chunks 100"
        if pipeline == "calculator"
        else "factors once + influences_from_factors"
    )


def run_ihm(job: JobData, quick: bool, pipeline: str = "factors") -> ToolOutput:
    """`InverseHarmonicMeanInfluence`: pyDVL's DataInf."""
    model = InverseHarmonicMeanInfluence(
        job.model,
        job.loss,
        regularization=float(job.lam_scalar),
        block_structure=job.blocks,
    )
    fit_s, matrix_s, matrix = _fit_and_query(model, job, pipeline)
    return ToolOutput(
        fit_s,
        matrix_s,
        matrix,
        f"λ = {job.lam_scalar:.3g} (one-block rule), same blocks, fit batch "
        f"{job.batch_size}, {_pipeline_text(pipeline)}",
    )


def run_ekfac(job: JobData, quick: bool) -> ToolOutput:
    """`EkfacInfluence` (cross-entropy only, Linear layers only)."""
    model = EkfacInfluence(
        job.model,
        update_diagonal=True,
        hessian_regularization=float(job.lam_scalar),
        progress=False,
    )
    fit_s, matrix_s, matrix = _fit_and_query(model, job, "factors")
    return ToolOutput(
        fit_s,
        matrix_s,
        matrix,
        f"update_diagonal=True, hessian_regularization = {job.lam_scalar:.3g}, "
        "one block per Linear (= ours)",
    )


def run_lissa(job: JobData, quick: bool) -> ToolOutput:
    """`LissaInfluence` with pyDVL's defaults (Hessian, maxiter 1000, scale 10)."""
    maxiter = 100 if quick else 1000
    model = LissaInfluence(
        job.model,
        job.loss,
        regularization=float(job.lam_scalar),
        maxiter=maxiter,
        block_structure=job.blocks,
        warn_on_max_iteration=False,
    )
    fit_s, matrix_s, matrix = _fit_and_query(model, job, "factors")
    return ToolOutput(
        fit_s,
        matrix_s,
        matrix,
        f"Hessian, maxiter={maxiter}, scale=10, dampen=0, rtol=1e-4, "
        f"λ = {job.lam_scalar:.3g}, same blocks",
    )


def run_arnoldi(job: JobData, quick: bool) -> ToolOutput:
    """`ArnoldiInfluence` with pyDVL's defaults (Hessian, rank 10)."""
    model = ArnoldiInfluence(
        job.model,
        job.loss,
        regularization=float(job.lam_scalar),
        rank=10,
        block_structure=job.blocks,
    )
    fit_s, matrix_s, matrix = _fit_and_query(model, job, "factors")
    return ToolOutput(
        fit_s,
        matrix_s,
        matrix,
        f"Hessian, rank=10, λ = {job.lam_scalar:.3g}, same blocks",
    )
