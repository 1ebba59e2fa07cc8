"""dattri's `IFAttributorDataInf` on the shared jobs.

dattri computes per-sample gradients with `torch.func` (`vmap(grad(...))` over a
`functional_call` of the model), splits them per module (the same blocks as
ours: its `param_layer_map` groups parameters by module name), and applies the
DataInf transform with one λ for all layers (it takes a single float, so the
paper's per-block λ_l cannot be passed; the job's one-block λ is used, as for
pyDVL). Its `attribute` recomputes the test transform for every training batch,
so the fastest setting is one training batch (the whole set) where memory allows,
which is also what its docs recommend for `cache`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from dattri.algorithm.influence_function import IFAttributorDataInf
from dattri.task import AttributionTask

from .base import ToolOutput
from .jobs import JobData


def run_dattri(job: JobData, quick: bool) -> ToolOutput:
    model = job.model

    def loss_func(params: Any, data: Any) -> torch.Tensor:
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(out, y)

    task = AttributionTask(
        loss_func=loss_func, model=model, checkpoints=model.state_dict()
    )
    attributor = IFAttributorDataInf(
        task=task, device=str(job.device), regularization=float(job.lam_scalar)
    )
    # one training batch for MLPs (one test transform); transformers: 4 batches
    # of the job's size, to bound vmap's activation memory
    batch = job.n_train if job.key in ("a", "b") else 4 * job.batch_size
    train = job.train_loader(batch)
    test = job.test_loader()
    t0 = time.perf_counter()
    attributor.cache(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = attributor.attribute(train, test)  # (n_train, n_test)
    matrix_s = time.perf_counter() - t0
    return ToolOutput(
        fit_s,
        matrix_s,
        scores.T,
        f"λ = {job.lam_scalar:.3g} (one float for all layers), per-module layers, "
        f"train batch {batch}, test batch {job.n_test}",
    )
