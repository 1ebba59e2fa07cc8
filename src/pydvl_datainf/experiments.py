r"""The paper's experiments as functions: fine-tune, then compare influence methods.

Used by the demo and the tutorials (notebooks/):

* [finetune_task][pydvl_datainf.experiments.finetune_task] LoRA-fine-tunes
  MiniLM on a [TextDataset][pydvl_datainf.datasets.TextDataset] (optionally
  with flipped labels) and returns everything the influence methods need as a
  [FineTunedTask][pydvl_datainf.experiments.FineTunedTask];
* [mislabel_task][pydvl_datainf.experiments.mislabel_task] does the same for
  a real data set with 20% of the training labels flipped;
* [compare_methods][pydvl_datainf.experiments.compare_methods] computes the
  `(n_test, n_train)` influence matrices of DataInf and of the baselines of
  [baselines][pydvl_datainf.baselines] from one pass of per-sample gradients,
  and times each method.

Scores follow pyDVL's sign (positive = helpful). The paper's influence is the
negative: the paper's most harmful (likely mislabeled) training points are the
ones with the most negative mean influence on a clean test set here, so
detection ranks by [harm][pydvl_datainf.experiments.harm].

Example:
    ```python
    from pydvl_datainf.baselines import detection_metrics
    from pydvl_datainf.experiments import compare_methods, harm, mislabel_task

    task = mislabel_task("sms", n_train=400, n_test=100, seed=0)
    result = compare_methods(task)
    for name, scores in result.scores.items():
        print(name, detection_metrics(harm(scores), task.flipped))
    ```
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from . import baselines
from . import hooks as _hooks  # noqa: F401  (registers the "hooks" engine)
from .blocks import BlockSpec, build_blocks
from .datasets import TextDataset, flip_labels, load_text_dataset, split
from .finetune import (
    accuracy,
    encode,
    freeze_all_but_lora,
    load_tokenizer,
    lora_classifier,
    sort_by_length,
    train_classifier,
)
from .influence import DataInfInfluence

__all__ = [
    "FineTunedTask",
    "MethodComparison",
    "METHODS",
    "finetune_task",
    "mislabel_task",
    "fit_datainf",
    "lora_groups",
    "compare_methods",
    "harm",
    "summary_rows",
    "METHOD_LABELS",
]

logger = logging.getLogger(__name__)

METHODS = ("datainf", "exact", "lissa", "hessian_free", "ekfac")
"""Names of the methods [compare_methods][pydvl_datainf.experiments.compare_methods] knows."""

METHOD_LABELS = {
    "datainf": "DataInf",
    "exact": "Exact inverse",
    "lissa": "LiSSA",
    "hessian_free": "Hessian-free",
    "ekfac": "EK-FAC",
}
"""Display names of the methods."""


@dataclass
class FineTunedTask:
    """A LoRA-fine-tuned classifier and its data, ready for influence methods.

    The training rows are sorted by length (so that fit batches carry little
    padding); `train` holds the texts and *true* labels in that order, while
    `y_train` holds the labels the model was trained on (flipped ones
    included).

    Attributes:
        model: the wrapped PEFT model, only its LoRA matrices trainable, in
            eval mode.
        x_train: packed training inputs `(n, 2, L)`.
        y_train: training labels as used for fine-tuning `(n,)`.
        x_test: packed test inputs.
        y_test: test labels (clean).
        train: the training texts and true labels, in the rows' order.
        test: the test texts and labels, in the rows' order.
        flipped: 1 for training rows whose label was flipped.
        test_accuracy: accuracy on the test rows after fine-tuning.
        train_seconds: wall time of the fine-tuning.
        losses: mean training loss per epoch.
        config: the fine-tuning settings.
    """

    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train: TextDataset
    test: TextDataset
    flipped: np.ndarray
    test_accuracy: float
    train_seconds: float
    losses: List[float] = field(default_factory=list)
    config: Dict[str, object] = field(default_factory=dict)

    def train_loader(self, batch_size: int = 32) -> DataLoader:
        """The training rows in order (no shuffling), for `fit` methods."""
        return DataLoader(
            TensorDataset(self.x_train, self.y_train), batch_size=batch_size
        )

    def test_loader(self, batch_size: int = 32) -> DataLoader:
        """The test rows in order."""
        return DataLoader(
            TensorDataset(self.x_test, self.y_test), batch_size=batch_size
        )


def finetune_task(
    train: TextDataset,
    test: TextDataset,
    *,
    flip: float = 0.0,
    rank: int = 8,
    epochs: int = 3,
    lr: float = 3e-3,
    batch_size: int = 16,
    max_length: int = 64,
    target_modules: Sequence[str] = ("query", "value"),
    seed: int = 0,
    progress: bool = True,
) -> FineTunedTask:
    """Flip labels (optionally), tokenise, LoRA-fine-tune MiniLM, freeze all but LoRA.

    Args:
        train: training texts and true labels.
        test: test texts and labels (never flipped).
        flip: fraction of training labels to flip.
        rank: LoRA rank.
        epochs: fine-tuning epochs.
        lr: AdamW learning rate.
        batch_size: fine-tuning batch size.
        max_length: tokens per text (truncation).
        target_modules: the adapted linear layers.
        seed: seed of the flips, the initialisation and the batches.
        progress: show progress bars.

    Returns:
        The [FineTunedTask][pydvl_datainf.experiments.FineTunedTask].

    Example:
        ```python
        from pydvl_datainf.datasets import templated_tasks, split
        train, test = split(templated_tasks(40), 240, 80)
        task = finetune_task(train, test, rank=4, epochs=2)
        ```
    """
    n_classes = max(train.n_classes, int(train.labels.max()) + 1)
    if flip > 0:
        noisy, flipped = flip_labels(train.labels, flip, n_classes, seed=seed)
    else:
        noisy, flipped = train.labels.copy(), np.zeros(len(train), dtype=np.int64)
    tok = load_tokenizer()
    x = encode(tok, train.texts, max_length)
    order = sort_by_length(x)
    x = x[order]
    idx = order.numpy()
    train_sorted = train.subset(idx)
    y = torch.as_tensor(noisy[idx], dtype=torch.long)
    flipped = flipped[idx]
    xt = encode(tok, test.texts, max_length)
    t_order = sort_by_length(xt)
    xt = xt[t_order]
    test_sorted = test.subset(t_order.numpy())
    yt = torch.as_tensor(test_sorted.labels, dtype=torch.long)

    model = lora_classifier(
        n_classes, rank=rank, target_modules=target_modules, seed=seed
    )
    t0 = time.perf_counter()
    losses = train_classifier(
        model,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    freeze_all_but_lora(model)
    model.eval()
    acc = accuracy(model, xt, yt)
    logger.info(
        "fine-tuned rank %d on %d texts in %.1f s: test accuracy %.3f",
        rank,
        len(x),
        seconds,
        acc,
    )
    return FineTunedTask(
        model=model,
        x_train=x,
        y_train=y,
        x_test=xt,
        y_test=yt,
        train=train_sorted,
        test=test_sorted,
        flipped=flipped,
        test_accuracy=acc,
        train_seconds=seconds,
        losses=losses,
        config={
            "flip": flip,
            "rank": rank,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "max_length": max_length,
            "target_modules": list(target_modules),
            "seed": seed,
        },
    )


def mislabel_task(
    dataset: str,
    n_train: int,
    n_test: int,
    *,
    flip: float = 0.2,
    seed: int = 0,
    **kwargs: object,
) -> FineTunedTask:
    """Load a real data set, split it, flip `flip` of the training labels, fine-tune.

    Args:
        dataset: `"sms"` or `"bbc"` (see [datasets][pydvl_datainf.datasets]).
        n_train: training texts.
        n_test: clean test texts.
        flip: fraction of flipped training labels.
        seed: seed of the split, the flips and the fine-tuning.
        **kwargs: passed to [finetune_task][pydvl_datainf.experiments.finetune_task].

    Example:
        ```python
        task = mislabel_task("bbc", 600, 150, seed=1, max_length=48)
        ```
    """
    data = load_text_dataset(dataset)
    train, test = split(data, n_train, n_test, seed=seed)
    return finetune_task(train, test, flip=flip, seed=seed, **kwargs)  # type: ignore[arg-type]


def fit_datainf(
    task: FineTunedTask,
    block_structure: BlockSpec = "module",
    batch_size: int = 32,
    progress: bool = True,
    **kwargs: object,
) -> DataInfInfluence:
    """Fit [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence] on the task's training rows.

    Uses the one-backward `"hooks"` gradient engine.

    Example:
        ```python
        infl = fit_datainf(task)
        scores = infl.train_influences(task.x_test, task.y_test)
        ```
    """
    infl = DataInfInfluence(
        task.model,
        F.cross_entropy,
        block_structure=block_structure,
        engine="hooks",
        progress=progress,
        **kwargs,  # type: ignore[arg-type]
    )
    return infl.fit(task.train_loader(batch_size))


def lora_groups(model: nn.Module) -> OrderedDict[str, List[str]]:
    """How `"module"` blocks (`lora_A`, `lora_B` apart) merge into `"lora"` blocks.

    Returns:
        `{lora_block: [module_block, ...]}`, for
        [merge_blocks][pydvl_datainf.baselines.merge_blocks].

    Example:
        ```python
        g_lora = merge_blocks(g_module, lora_groups(task.model))
        ```
    """
    module = build_blocks(model, "module").to_dict()
    lora = build_blocks(model, "lora").to_dict()
    owner = {p: name for name, params in module.items() for p in params}
    groups: OrderedDict[str, List[str]] = OrderedDict()
    for name, params in lora.items():
        members: List[str] = []
        for p in params:
            if owner[p] not in members:
                members.append(owner[p])
        groups[name] = members
    return groups


@dataclass
class MethodComparison:
    """The output of [compare_methods][pydvl_datainf.experiments.compare_methods].

    Attributes:
        scores: `{method: (n_test, n_train) float64 array}`, pyDVL sign.
        seconds: `{method: wall time}` of each method on top of the shared
            per-sample gradients (EK-FAC's includes its own fitting passes).
        gradient_seconds: wall time of the shared per-sample gradients (the
            DataInf fit pass over the training rows plus the test rows).
        regularization: $\\lambda_l$ per block (the paper's rule), used by
            DataInf, the exact inverse and LiSSA alike.
        block_sizes: $d_l$ per block.
    """

    scores: Dict[str, np.ndarray]
    seconds: Dict[str, float]
    gradient_seconds: float
    regularization: Dict[str, float]
    block_sizes: Dict[str, int]


def compare_methods(
    task: FineTunedTask,
    methods: Sequence[str] = METHODS,
    *,
    block_structure: str = "module",
    lissa_iterations: int = 100,
    lissa_batch_size: int = 32,
    infl: Optional[DataInfInfluence] = None,
    seed: int = 0,
    progress: bool = True,
) -> MethodComparison:
    """Influence matrices of several methods on one fine-tuned task.

    Per-sample gradients of the training and test rows are computed once
    (by fitting DataInf with `"module"` blocks); `"lora"` blocks concatenate
    each layer's `lora_A` and `lora_B` gradients. DataInf, the exact inverse
    and LiSSA use the same $\\lambda_l$ (the paper's rule for the chosen
    blocks).

    Args:
        task: from [finetune_task][pydvl_datainf.experiments.finetune_task].
        methods: a subset of [METHODS][pydvl_datainf.experiments.METHODS].
            `"ekfac"` needs `"module"` blocks.
        block_structure: `"module"` or `"lora"`.
        lissa_iterations: LiSSA's recursion depth.
        lissa_batch_size: LiSSA's mini-batch size.
        infl: a DataInfInfluence already fitted on the task with `"module"`
            blocks (saves the gradient pass).
        seed: seed of LiSSA's mini-batches.
        progress: show progress bars.

    Returns:
        A [MethodComparison][pydvl_datainf.experiments.MethodComparison].

    Example:
        ```python
        result = compare_methods(task, ["datainf", "exact", "hessian_free"])
        result.scores["exact"].shape  # (n_test, n_train)
        ```
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose among {list(METHODS)}")
    if block_structure not in ("module", "lora"):
        raise ValueError("block_structure must be 'module' or 'lora'")
    if "ekfac" in methods and block_structure != "module":
        raise ValueError("EK-FAC works per linear layer: use 'module' blocks")
    t0 = time.perf_counter()
    if infl is None:
        infl = fit_datainf(task, "module", progress=progress)
    elif infl.block_names != build_blocks(task.model, "module").names:
        raise ValueError("infl must be fitted on the task with 'module' blocks")
    g_train = baselines.training_gradients(infl)
    g_test = infl.per_sample_gradients(task.x_test, task.y_test)
    gradient_seconds = time.perf_counter() - t0
    if block_structure == "lora":
        groups = lora_groups(task.model)
        g_train = baselines.merge_blocks(g_train, groups)
        g_test = baselines.merge_blocks(g_test, groups)
    lam = baselines.auto_regularization(g_train, infl.regularization_scale)

    scores: Dict[str, np.ndarray] = OrderedDict()
    seconds: Dict[str, float] = OrderedDict()
    for method in methods:
        t = time.perf_counter()
        if method == "datainf":
            s = baselines.datainf_influences(g_test, g_train, lam)
        elif method == "exact":
            s = baselines.exact_influences(g_test, g_train, lam)
        elif method == "lissa":
            s = baselines.lissa_influences(
                g_test,
                g_train,
                lam,
                iterations=lissa_iterations,
                batch_size=lissa_batch_size,
                seed=seed,
            )
        elif method == "hessian_free":
            s = baselines.hessian_free_influences(g_test, g_train)
        else:  # ekfac
            ekfac = baselines.ekfac_fit(task.model, task.train_loader(), progress)
            s = baselines.ekfac_influences(
                ekfac, g_test, g_train, infl.regularization_scale
            )
        scores[method] = s.detach().cpu().double().numpy()
        seconds[method] = time.perf_counter() - t
        logger.info("%s: %.2f s", method, seconds[method])
    return MethodComparison(
        scores=scores,
        seconds=seconds,
        gradient_seconds=gradient_seconds,
        regularization=dict(lam),
        block_sizes={k: int(v.shape[1]) for k, v in g_train.items()},
    )


def harm(scores: np.ndarray) -> np.ndarray:
    """Mislabel score per training point: minus its mean influence on the test rows.

    With pyDVL's sign a harmful training point has a negative influence on the
    (clean) test loss; this flips the sign so that higher means more likely
    mislabeled, as the paper's $\\mathcal{I}$ does.

    Example:
        ```python
        suspects = np.argsort(-harm(result.scores["datainf"]))[:10]
        ```
    """
    return -np.asarray(scores, dtype=np.float64).mean(axis=0)


def summary_rows(
    comparison: MethodComparison,
    flipped: np.ndarray,
    top_fraction: float = 0.2,
    extra: Optional[Mapping[str, object]] = None,
) -> List[Dict[str, object]]:
    """One table row per method: AUC, recall in the top fraction, seconds.

    Example:
        ```python
        rows = summary_rows(result, task.flipped, extra={"seed": 0})
        ```
    """
    rows: List[Dict[str, object]] = []
    for method, s in comparison.scores.items():
        m = baselines.detection_metrics(harm(s), flipped, top_fraction)
        row: Dict[str, object] = dict(extra or {})
        row.update(
            method=METHOD_LABELS.get(method, method),
            auc=m["auc"],
            recall_top=m["recall_top"],
            seconds=comparison.seconds[method],
        )
        rows.append(row)
    return rows
