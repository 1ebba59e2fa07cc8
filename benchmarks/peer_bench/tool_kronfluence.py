"""kronfluence's EK-FAC on the shared jobs.

Configured as its docs recommend for influence on classifiers, with two choices
that make it compute the same quantity as DataInf:

* `use_empirical_fisher=True`: the curvature is the empirical Fisher
  $\\frac{1}{n}\\sum_i g_i g_i^\\top$ (DataInf's $G$), not the true Fisher
  with sampled labels;
* `damping_factor=None`: kronfluence's heuristic, 0.1 × the mean eigenvalue per
  module. With the empirical Fisher the corrected eigenvalues sum to
  $\\operatorname{tr} G_l$, so this is exactly the paper's
  λ_l = 0.1 · mean_i ‖g_il‖² / d_l, per block.

The tracked modules are the job's blocks (one per leaf Linear). For the
transformer jobs the attention mask is passed (`get_attention_mask`) so padding
tokens do not enter the activation covariances.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset

from .base import ToolOutput
from .jobs import JobData


def run_kronfluence(job: JobData, quick: bool) -> ToolOutput:
    tracked = job.module_names()
    packed = job.x_train.dim() == 3  # (B, 2, L): ids and attention mask

    class ClassificationTask(Task):
        def compute_train_loss(
            self, batch: Any, model: nn.Module, sample: bool = False
        ) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().float(), -1)
                    y = torch.multinomial(probs, 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def get_influence_tracked_modules(self) -> Optional[List[str]]:
            return tracked

        def get_attention_mask(self, batch: Any) -> Optional[torch.Tensor]:
            return batch[0][:, 1] if packed else None

    model = job.model
    task = getattr(model, "_bench_kronfluence_task", None)
    if task is None:  # prepare once per process (the warm-up run prepares it)
        task = ClassificationTask()
        model = prepare_model(model, task)
        model._bench_kronfluence_task = task
    train = TensorDataset(job.x_train, job.y_train)
    test = TensorDataset(job.x_test, job.y_test)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(
            analysis_name="bench",
            model=model,
            task=task,
            cpu=job.device.type == "cpu",
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=out,
        )
        t0 = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=job.batch_size,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
            overwrite_output_dir=True,
        )
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name="ekfac",
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=job.n_test,
            per_device_train_batch_size=job.batch_size,
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("scores")
        assert scores is not None
        matrix = scores["all_modules"]
        matrix_s = time.perf_counter() - t0
    return ToolOutput(
        fit_s,
        matrix_s,
        matrix,
        "strategy=ekfac, use_empirical_fisher=True, damping_factor=None "
        "(0.1 × mean eigenvalue per module = paper λ_l), tracked = our blocks, "
        f"batch {job.batch_size}",
    )
