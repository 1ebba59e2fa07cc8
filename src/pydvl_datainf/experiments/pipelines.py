r"""The paper's experiments as functions: fine-tune, then compare influence methods.

Used by the demo and the tutorials (notebooks/):

* [finetune_task][pydvl_datainf.experiments.pipelines.finetune_task] LoRA-fine-tunes
  MiniLM on a [TextDataset][pydvl_datainf.experiments.datasets.TextDataset] (optionally
  with flipped labels) and returns everything the influence methods need as a
  [FineTunedTask][pydvl_datainf.experiments.pipelines.FineTunedTask];
* [mislabel_task][pydvl_datainf.experiments.pipelines.mislabel_task] does the same for
  a real data set with 20% of the training labels flipped;
* [compare_methods][pydvl_datainf.experiments.pipelines.compare_methods] computes the
  `(n_test, n_train)` influence matrices of DataInf and of the baselines of
  [baselines][pydvl_datainf.experiments.baselines] from one pass of per-sample gradients,
  and times each method.

Scores follow pyDVL's sign (positive = helpful). The paper's influence is the
negative: the paper's most harmful (likely mislabeled) training points are the
ones with the most negative mean influence on a clean test set here, so
detection ranks by [harm][pydvl_datainf.experiments.pipelines.harm].

Example:
    ```python
    from pydvl_datainf.experiments.baselines import detection_metrics
    from transformers import BertConfig, BertForSequenceClassification
    from pydvl_datainf.experiments.pipelines import compare_methods, harm, mislabel_task

    # MiniLM by default; here a tiny random BERT (with MiniLM's tokenizer)
    tiny_bert = BertForSequenceClassification(BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=2,
    ))
    task = mislabel_task("sms", n_train=40, n_test=10, model=tiny_bert, rank=2,
                         epochs=1, max_length=16, progress=False)
    result = compare_methods(task, ["datainf", "exact", "hessian_free"],
                             progress=False)
    for name, scores in result.scores.items():
        print(name, detection_metrics(harm(scores), task.flipped))
    assert result.scores["datainf"].shape == (10, 40)
    ```
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pydvl_datainf.blocks import BlockSpec, build_blocks, freeze_all_but_lora
from pydvl_datainf.config import RegularizationSpec, resolve_regularization
from pydvl_datainf.influence import DataInfInfluence

from . import baselines, ekfac
from .datasets import TextDataset, encode_labels, flip_labels, load_text_dataset, split
from .finetune import (
    accuracy,
    encode,
    load_tokenizer,
    lora_classifier,
    predict,
    sort_by_length,
    train_classifier,
)

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
    "POINT_METHODS",
    "point_scores",
    "block_regularization",
]

logger = logging.getLogger(__name__)

METHODS = ("datainf", "exact", "lissa", "hessian_free", "ekfac")
"""Names of the methods [compare_methods][pydvl_datainf.experiments.pipelines.compare_methods] knows."""

METHOD_LABELS = {
    "datainf": "DataInf",
    "exact": "Exact inverse",
    "lissa": "LiSSA",
    "hessian_free": "Hessian-free",
    "ekfac": "EK-FAC",
    "training_loss": "Training loss",
    "el2n": "EL2N",
    "gradient_norm": "Gradient norm",
    "self_influence": "Self-influence",
}
"""Display names of the methods."""

POINT_METHODS = ("training_loss", "el2n", "gradient_norm", "self_influence")
"""Per-point scores [point_scores][pydvl_datainf.experiments.pipelines.point_scores] knows
(no test set needed)."""


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
        train: the training texts and true labels, in the rows' order;
            `train.row_ids` gives each row's position in the user's data.
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

    def to_user_order(self, values: np.ndarray) -> np.ndarray:
        """Reorder per-training-row values (last axis) to the user's row order.

        The task's rows are sorted by length; this undoes it, so that entry
        `j` belongs to the `j`-th training row in increasing `train.row_ids`
        (for a training set given whole to
        [finetune_task][pydvl_datainf.experiments.pipelines.finetune_task],
        exactly the user's row `j`).

        Example:
            ```python
            from transformers import BertConfig, BertForSequenceClassification
            from pydvl_datainf.experiments.pipelines import mislabel_task

            # MiniLM by default; here a tiny random BERT (with MiniLM's tokenizer)
            tiny_bert = BertForSequenceClassification(BertConfig(
                hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, num_labels=2,
            ))
            task = mislabel_task("sms", n_train=40, n_test=10, model=tiny_bert, rank=2,
                                 epochs=1, max_length=16, progress=False)
            # rows are sorted by length; back to the order of the training texts
            mine = task.to_user_order(task.train.row_ids)
            assert (mine == task.user_rows()).all() and (mine[:-1] < mine[1:]).all()
            ```
        """
        values = np.asarray(values)
        if values.shape[-1] != len(self.train):
            raise ValueError(
                f"Expected {len(self.train)} values on the last axis, got "
                f"{values.shape[-1]}"
            )
        return values[..., np.argsort(self.train.row_ids, kind="stable")]

    def user_rows(self) -> np.ndarray:
        """The training rows' `row_ids`, in the order of `to_user_order`."""
        return np.sort(self.train.row_ids, kind="stable")

    def test_loader(self, batch_size: int = 32) -> DataLoader:
        """The test rows in order."""
        return DataLoader(
            TensorDataset(self.x_test, self.y_test), batch_size=batch_size
        )


def _noisy_labels(
    train: TextDataset,
    flip: float,
    noisy_labels: Union[Sequence[object], np.ndarray, None],
    flipped: Union[Sequence[object], np.ndarray, None],
    seed: int,
) -> tuple:
    """The labels to train on and the 0/1 flip mask, checked."""
    n = len(train)
    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip must lie in [0, 1], got {flip}")
    if noisy_labels is not None and flip > 0:
        raise ValueError(
            "Give either noisy_labels (your own) or flip > 0 (random flips), not both"
        )
    if noisy_labels is not None:
        if len(noisy_labels) != n:
            raise ValueError(
                f"noisy_labels has {len(noisy_labels)} entries for {n} training texts"
            )
        noisy, _ = encode_labels(
            np.asarray(noisy_labels, dtype=object), train.class_names, "noisy_labels"
        )
    elif flip > 0:
        if flipped is not None:
            raise ValueError("flipped describes your own noisy_labels; drop flip")
        noisy, mask = flip_labels(train.labels, flip, train.n_classes, seed=seed)
        return noisy, mask
    else:
        noisy = train.labels.copy()
    if flipped is None:
        mask = (noisy != train.labels).astype(np.int64)
    else:
        arr = np.asarray(flipped)
        if arr.shape != (n,):
            raise ValueError(f"flipped must have shape ({n},), got {arr.shape}")
        if not np.isin(arr, (0, 1)).all():
            raise ValueError("flipped must hold 0/1 (or booleans) only")
        mask = arr.astype(np.int64)
    return noisy, mask


def finetune_task(
    train: TextDataset,
    test: TextDataset,
    *,
    flip: float = 0.0,
    noisy_labels: Union[Sequence[object], np.ndarray, None] = None,
    flipped: Union[Sequence[object], np.ndarray, None] = None,
    rank: int = 8,
    alpha: Optional[int] = None,
    epochs: int = 3,
    lr: float = 3e-3,
    batch_size: int = 16,
    max_length: int = 64,
    target_modules: Sequence[str] = ("query", "value"),
    model: Union[str, Path, nn.Module, None] = None,
    tokenizer: Any = None,
    seed: int = 0,
    progress: bool = True,
) -> FineTunedTask:
    """Tokenise, LoRA-fine-tune a classifier (MiniLM or yours), freeze all but LoRA.

    The model is trained on `train.labels`, or on `noisy_labels` when given
    (your own noisy labels: `train.labels` then holds the true ones), or on
    labels of which a fraction `flip` was flipped at random. Nothing is
    flipped unless `flip > 0`.

    Args:
        train: training texts and true labels.
        test: test texts and labels (never flipped); the same classes.
        flip: fraction of training labels to flip at random.
        noisy_labels: the labels to train on, one per training text
            (strings or ids of `train.class_names`).
        flipped: 0/1 per training text marking the wrong labels, when you
            know them (default: where `noisy_labels` differs from
            `train.labels`; all zeros without noisy labels).
        rank: LoRA rank.
        alpha: LoRA's `lora_alpha` (default `2 * rank`).
        epochs: fine-tuning epochs.
        lr: AdamW learning rate.
        batch_size: fine-tuning batch size.
        max_length: tokens per text (truncation).
        target_modules: the adapted linear layers.
        model: `None` for the packaged MiniLM, a local Hugging Face folder
            of a sequence classifier (or hub name), or a `transformers`
            sequence-classification model with `train.n_classes` labels
            (see [lora_classifier][pydvl_datainf.experiments.finetune.lora_classifier]).
        tokenizer: a tokenizer object or folder; default: the model folder's,
            or MiniLM's.
        seed: seed of the flips, the initialisation and the batches.
        progress: show progress bars.

    Returns:
        The [FineTunedTask][pydvl_datainf.experiments.pipelines.FineTunedTask];
        its rows are sorted by length, `to_user_order` restores yours.

    Raises:
        ValueError: classes of `test` unlike those of `train`, bad
            `noisy_labels` or `flipped`, both `flip` and `noisy_labels`.

    Example:
        ```python
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.datasets import split, templated_tasks
        from pydvl_datainf.experiments.pipelines import finetune_task

        train, test = split(templated_tasks(10), 60, 20)
        # MiniLM by default; here a tiny random BERT (with MiniLM's tokenizer)
        tiny_bert = BertForSequenceClassification(BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=2,
        ))
        task = finetune_task(train, test, model=tiny_bert, rank=2, epochs=1,
                             max_length=16, progress=False)
        assert len(task.x_train) == 60 and task.flipped.sum() == 0  # no flip asked
        print(task.test_accuracy, task.losses)
        ```
    """
    if list(test.class_names) != list(train.class_names):
        raise ValueError(
            f"train and test classes differ: {train.class_names} vs {test.class_names}"
        )
    if train.n_classes < 2:
        raise ValueError(f"Need at least 2 classes, got {train.class_names}")
    n_classes = train.n_classes
    noisy, flipped_mask = _noisy_labels(train, flip, noisy_labels, flipped, seed)
    if tokenizer is None:
        tok = load_tokenizer(None if isinstance(model, nn.Module) else model)
    elif isinstance(tokenizer, (str, Path)):
        tok = load_tokenizer(tokenizer)
    else:
        tok = tokenizer
    x = encode(tok, train.texts, max_length)
    order = sort_by_length(x)
    x = x[order]
    idx = order.numpy()
    train_sorted = train.subset(idx)
    y = torch.as_tensor(noisy[idx], dtype=torch.long)
    flipped_mask = flipped_mask[idx]
    xt = encode(tok, test.texts, max_length)
    t_order = sort_by_length(xt)
    xt = xt[t_order]
    test_sorted = test.subset(t_order.numpy())
    yt = torch.as_tensor(test_sorted.labels, dtype=torch.long)

    net = lora_classifier(
        n_classes,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
        seed=seed,
        base_model=model,
    )
    t0 = time.perf_counter()
    losses = train_classifier(
        net,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    freeze_all_but_lora(net)
    net.eval()
    acc = accuracy(net, xt, yt)
    logger.info(
        "fine-tuned rank %d on %d texts in %.1f s: test accuracy %.3f",
        rank,
        len(x),
        seconds,
        acc,
    )
    return FineTunedTask(
        model=net,
        x_train=x,
        y_train=y,
        x_test=xt,
        y_test=yt,
        train=train_sorted,
        test=test_sorted,
        flipped=flipped_mask,
        test_accuracy=acc,
        train_seconds=seconds,
        losses=losses,
        config={
            "flip": flip,
            "own_noisy_labels": noisy_labels is not None,
            "rank": rank,
            "alpha": 2 * rank if alpha is None else alpha,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "max_length": max_length,
            "target_modules": list(target_modules),
            "model": "MiniLM"
            if model is None
            else str(getattr(model, "name_or_path", model)),
            "seed": seed,
        },
    )


def mislabel_task(
    dataset: Union[str, TextDataset],
    n_train: int,
    n_test: int,
    *,
    flip: Optional[float] = None,
    noisy_labels: Union[Sequence[object], np.ndarray, None] = None,
    flipped: Union[Sequence[object], np.ndarray, None] = None,
    seed: int = 0,
    **kwargs: Any,
) -> FineTunedTask:
    """Split a data set, optionally flip training labels, fine-tune.

    Args:
        dataset: `"sms"` or `"bbc"` (see
            [datasets][pydvl_datainf.experiments.datasets]), or your own
            [TextDataset][pydvl_datainf.experiments.datasets.TextDataset].
        n_train: training texts.
        n_test: clean test texts.
        flip: fraction of training labels flipped at random; default 0.2
            for the named data sets and 0 for your own (no forced flips).
        noisy_labels: for your own data set: the labels to train on, one
            per row of `dataset` (its `labels` are then the true ones).
        flipped: 0/1 per row of `dataset` marking known wrong labels.
        seed: seed of the split, the flips and the fine-tuning.
        **kwargs: passed to [finetune_task][pydvl_datainf.experiments.pipelines.finetune_task].

    Example:
        ```python
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.pipelines import mislabel_task

        # MiniLM by default; here a tiny random BERT (with MiniLM's tokenizer)
        tiny_bert = BertForSequenceClassification(BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=2,
        ))
        task = mislabel_task("sms", n_train=40, n_test=10, model=tiny_bert, rank=2,
                             epochs=1, max_length=16, progress=False)
        assert len(task.x_train) == 40 and len(task.x_test) == 10
        assert task.flipped.sum() == 8  # 20% of the training labels flipped
        assert (task.y_train.numpy() != task.train.labels).sum() == 8
        ```
    """
    if isinstance(dataset, str):
        if noisy_labels is not None or flipped is not None:
            raise ValueError(
                "noisy_labels and flipped apply to your own TextDataset, not to "
                f"{dataset!r}"
            )
        data = load_text_dataset(dataset)
        flip = 0.2 if flip is None else flip
    elif isinstance(dataset, TextDataset):
        data = dataset
        flip = 0.0 if flip is None else flip
        for arg, name in ((noisy_labels, "noisy_labels"), (flipped, "flipped")):
            if arg is not None and len(arg) != len(data):
                raise ValueError(
                    f"{name} has {len(arg)} entries for {len(data)} rows of the data set"
                )
    else:
        raise TypeError(
            "dataset must be 'sms', 'bbc' or a TextDataset, got "
            f"{type(dataset).__name__}"
        )
    train, test = split(data, n_train, n_test, seed=seed)
    # positions of the training rows in `data` (its own row_ids may differ)
    lookup = {int(r): i for i, r in enumerate(data.row_ids)}
    pos = np.array([lookup[int(r)] for r in train.row_ids], dtype=np.int64)
    own = None if noisy_labels is None else np.asarray(noisy_labels, dtype=object)[pos]
    mask = None if flipped is None else np.asarray(flipped)[pos]
    return finetune_task(
        train,
        test,
        flip=flip,
        noisy_labels=own,
        flipped=mask,
        seed=seed,
        **kwargs,
    )


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
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.pipelines import fit_datainf, mislabel_task

        # MiniLM by default; here a tiny random BERT (with MiniLM's tokenizer)
        tiny_bert = BertForSequenceClassification(BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=2,
        ))
        task = mislabel_task("sms", n_train=40, n_test=10, model=tiny_bert, rank=2,
                             epochs=1, max_length=16, progress=False)
        infl = fit_datainf(task, progress=False)
        scores = infl.train_influences(task.x_test, task.y_test)
        assert scores.shape == (10, 40)
        assert len(infl.block_names) == 4  # lora_A and lora_B of query and value
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
        [merge_blocks][pydvl_datainf.experiments.baselines.merge_blocks].

    Example:
        ```python
        import torch
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf import build_blocks
        from pydvl_datainf.blocks import freeze_all_but_lora
        from pydvl_datainf.experiments.baselines import merge_blocks
        from pydvl_datainf.experiments.finetune import lora_classifier
        from pydvl_datainf.experiments.pipelines import lora_groups

        model = lora_classifier(2, rank=2, base_model=BertForSequenceClassification(
            BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=2)))
        freeze_all_but_lora(model)
        groups = lora_groups(model)
        assert len(groups) == 2 and all(len(m) == 2 for m in groups.values())
        modules = build_blocks(model, "module")
        g_module = {k: torch.randn(3, d) for k, d in zip(modules.names, modules.sizes)}
        g_lora = merge_blocks(g_module, groups)
        assert [g.shape[1] for g in g_lora.values()] == [64, 64]  # 2 x (2*16 + 16*2)
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
    r"""The output of [compare_methods][pydvl_datainf.experiments.pipelines.compare_methods].

    Attributes:
        scores: `{method: (n_test, n_train) float64 array}`, pyDVL sign.
        seconds: `{method: wall time}` of each method on top of the shared
            per-sample gradients (EK-FAC's includes its own fitting passes).
        gradient_seconds: wall time of the shared per-sample gradients (the
            DataInf fit pass over the training rows plus the test rows).
        regularization: $\lambda_l$ per block (the paper's rule), used by
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
    regularization: RegularizationSpec = "auto",
    regularization_scale: Optional[float] = None,
    lissa_iterations: int = 100,
    lissa_batch_size: int = 32,
    lissa_scale: Optional[float] = None,
    infl: Optional[DataInfInfluence] = None,
    gradients: Optional[tuple] = None,
    mean_test: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> MethodComparison:
    r"""Influence matrices of several methods on one fine-tuned task.

    Per-sample gradients of the training and test rows are computed once
    (by fitting DataInf with `"module"` blocks); `"lora"` blocks concatenate
    each layer's `lora_A` and `lora_B` gradients. DataInf, the exact inverse
    and LiSSA use the same $\lambda_l$ (the paper's rule for the chosen
    blocks).

    Args:
        task: from [finetune_task][pydvl_datainf.experiments.pipelines.finetune_task].
        methods: a subset of [METHODS][pydvl_datainf.experiments.pipelines.METHODS].
            `"ekfac"` needs `"module"` blocks.
        block_structure: `"module"` or `"lora"`.
        regularization: $\lambda$ for DataInf, the exact inverse and LiSSA:
            `"auto"` (the paper's per-block rule), `"global"` (one value for
            all blocks, the same rule over all parameters together), a float
            or `{block: float}`; see
            [block_regularization][pydvl_datainf.experiments.pipelines.block_regularization].
        regularization_scale: $c$ of the rule (default: `infl`'s, 0.1).
        lissa_iterations: LiSSA's recursion depth.
        lissa_batch_size: LiSSA's mini-batch size (at least `n`: full batch).
        lissa_scale: LiSSA's scale $s$ (default: a stable one per block).
        infl: a DataInfInfluence already fitted on the task with `"module"`
            blocks (saves the gradient pass).
        gradients: `(g_train, g_test)` with `"module"` blocks from an earlier
            call (saves the gradient pass; needs `infl` for EK-FAC's scale).
        mean_test: average the test gradients first (the paper's protocol
            for the mean test loss): every method is linear in the test
            gradient, so the scores are `(1, n_train)`, the mean of the rows
            of the full matrices, at a fraction of the cost.
        seed: seed of LiSSA's mini-batches.
        progress: show progress bars.

    Returns:
        A [MethodComparison][pydvl_datainf.experiments.pipelines.MethodComparison].

    Example:
        ```python
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.pipelines import compare_methods, mislabel_task

        # MiniLM by default; here a tiny random BERT (with MiniLM's tokenizer)
        tiny_bert = BertForSequenceClassification(BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=2,
        ))
        task = mislabel_task("sms", n_train=40, n_test=10, model=tiny_bert, rank=2,
                             epochs=1, max_length=16, progress=False)
        result = compare_methods(task, ["datainf", "exact", "hessian_free"],
                                 progress=False)
        assert result.scores["exact"].shape == (10, 40)  # (n_test, n_train)
        assert set(result.seconds) == {"datainf", "exact", "hessian_free"}
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
    if gradients is not None:
        g_train, g_test = gradients
    else:
        if infl is None:
            infl = fit_datainf(task, "module", progress=progress)
        elif infl.block_names != build_blocks(task.model, "module").names:
            raise ValueError("infl must be fitted on the task with 'module' blocks")
        g_train = baselines.training_gradients(infl)
        g_test = infl.per_sample_gradients(task.x_test, task.y_test)
    gradient_seconds = time.perf_counter() - t0
    if mean_test:
        g_test = OrderedDict(
            (k, v.mean(dim=0, keepdim=True)) for k, v in g_test.items()
        )
    if block_structure == "lora":
        groups = lora_groups(task.model)
        g_train = baselines.merge_blocks(g_train, groups)
        g_test = baselines.merge_blocks(g_test, groups)
    scale = (
        float(regularization_scale)
        if regularization_scale is not None
        else float(getattr(infl, "regularization_scale", 0.1))
    )
    lam = block_regularization(g_train, regularization, scale)
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
                scale=lissa_scale,
                seed=seed,
            )
        elif method == "hessian_free":
            s = baselines.hessian_free_influences(g_test, g_train)
        else:  # ekfac
            fitted = ekfac.fit_pydvl_ekfac(task.model, task.train_loader(), progress)
            s = ekfac.ekfac_influences(ekfac.from_pydvl(fitted), g_test, g_train, scale)
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


def block_regularization(
    train: Mapping[str, torch.Tensor],
    spec: Union[RegularizationSpec, str] = "auto",
    scale: float = 0.1,
) -> Dict[str, float]:
    r"""$\lambda_l$ per block from training gradients, resolved by the library's rule.

    `"auto"` is the paper's $\lambda_l = c\,\text{mean}_i\lVert g_{il}\rVert^2/d_l$;
    `"global"` gives every block the same value, the same rule over all
    parameters together ($c \sum_l \text{mean}_i\lVert g_{il}\rVert^2 /
    \sum_l d_l$); floats and `{block: float}` are used as given. All values
    go through [resolve_regularization][pydvl_datainf.config.resolve_regularization].

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.pipelines import block_regularization

        g_train = {"a": torch.ones(4, 2), "b": 2 * torch.ones(4, 8)}
        lam = block_regularization(g_train, "auto", 0.1)  # c * mean |g|^2 / d
        assert lam == {"a": 0.1 * 2 / 2, "b": 0.1 * 32 / 8}
        one = block_regularization(g_train, "global", 0.1)  # over all parameters
        assert one["a"] == one["b"] == 0.1 * (2 + 32) / 10
        ```
    """
    sizes = OrderedDict((k, int(g.shape[1])) for k, g in train.items())
    sums = OrderedDict((k, float(g.double().pow(2).sum())) for k, g in train.items())
    n = len(next(iter(train.values())))
    if isinstance(spec, str) and spec == "global":
        value = scale * sum(sums.values()) / n / sum(sizes.values())
        spec = float(value)
    return dict(resolve_regularization(spec, sizes, sums, n, scale))


def point_scores(
    task: FineTunedTask,
    g_train: Mapping[str, torch.Tensor],
    regularization: Mapping[str, float],
    methods: Sequence[str] = POINT_METHODS,
) -> Dict[str, np.ndarray]:
    r"""Mislabel scores that need no test set, higher = more suspicious.

    * `"training_loss"`: the cross-entropy of each training text under the
      label it was trained on;
    * `"el2n"`: the L2 norm of softmax minus one-hot (EL2N, Paul et al. 2021);
    * `"gradient_norm"`: the norm of the per-sample gradient of the LoRA
      matrices;
    * `"self_influence"`: DataInf's self-influence $g_i^\top R g_i$.

    Args:
        task: the fine-tuned task.
        g_train: its per-sample training gradients `{block: (n, d_l)}`.
        regularization: $\lambda_l$ per block of `g_train`.
        methods: a subset of [POINT_METHODS][pydvl_datainf.experiments.pipelines.POINT_METHODS].

    Returns:
        `{method: (n,) float64}` in the task's row order.

    Example:
        ```python
        from pydvl_datainf.experiments.baselines import (
            detection_metrics, training_gradients,
        )
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.pipelines import (
            fit_datainf, mislabel_task, point_scores,
        )

        # MiniLM by default; here a tiny random BERT (with MiniLM's tokenizer)
        tiny_bert = BertForSequenceClassification(BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=2,
        ))
        task = mislabel_task("sms", n_train=40, n_test=10, model=tiny_bert, rank=2,
                             epochs=1, max_length=16, progress=False)
        infl = fit_datainf(task, progress=False)
        g_train = training_gradients(infl)
        s = point_scores(task, g_train, infl.block_regularization)
        assert set(s) == {"training_loss", "el2n", "gradient_norm", "self_influence"}
        print(detection_metrics(s["training_loss"], task.flipped))
        ```
    """
    unknown = [m for m in methods if m not in POINT_METHODS]
    if unknown:
        raise ValueError(
            f"Unknown methods {unknown}; choose among {list(POINT_METHODS)}"
        )
    out: Dict[str, np.ndarray] = OrderedDict()
    logits = None
    if "training_loss" in methods or "el2n" in methods:
        logits = predict(task.model, task.x_train).double()
    for m in methods:
        if m == "training_loss":
            assert logits is not None
            out[m] = baselines.per_sample_losses(logits, task.y_train)
        elif m == "el2n":
            assert logits is not None
            out[m] = baselines.el2n_scores(logits, task.y_train)
        elif m == "gradient_norm":
            out[m] = baselines.gradient_norms(g_train)
        else:
            out[m] = baselines.datainf_self_influences(g_train, regularization)
    return out


def harm(scores: np.ndarray) -> np.ndarray:
    r"""Mislabel score per training point: minus its mean influence on the test rows.

    With pyDVL's sign a harmful training point has a negative influence on the
    (clean) test loss; this flips the sign so that higher means more likely
    mislabeled, as the paper's $\mathcal{I}$ does.

    Example:
        ```python
        import numpy as np
        from pydvl_datainf.experiments.pipelines import harm

        scores = np.array([[1.0, -2.0, 0.5],   # (n_test, n_train), pyDVL sign
                           [3.0, -4.0, 0.5]])
        assert harm(scores).tolist() == [-2.0, 3.0, -0.5]
        suspects = np.argsort(-harm(scores))[:1]
        assert suspects.tolist() == [1]  # hurts every test point
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
        import numpy as np
        from pydvl_datainf.experiments.pipelines import MethodComparison, summary_rows

        flipped = np.array([1, 0, 0, 0, 0])
        result = MethodComparison(
            scores={"datainf": np.array([[-3.0, 1.0, 0.0, 2.0, 1.0]])},
            seconds={"datainf": 0.5}, gradient_seconds=1.0,
            regularization={}, block_sizes={},
        )
        rows = summary_rows(result, flipped, extra={"seed": 0})
        assert rows == [{"seed": 0, "method": "DataInf", "auc": 1.0,
                         "recall_top": 1.0, "seconds": 0.5}]
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
