r"""The linear datamodeling score (LDS): do the scores predict retrained models?

An attribution benchmark beyond detection tasks. Draw $M$ random subsets
$S_1, \dots, S_M$, each of half the training set (seeded), retrain the same
fine-tuning on each, and measure every test loss $L_j(S_k)$. A method's scores
$\tau_{ji}$ (test point $j$, training point $i$) predict a linear datamodel:
with pyDVL's sign (positive = helpful: up-weighting $i$ lowers the loss of
$j$), the predicted test loss of $S_k$ is, up to a constant,

$$\hat L_j(S_k) = -\sum_{i \in S_k} \tau_{ji}.$$

The LDS of test point $j$ is the Spearman rank correlation, across the $M$
subsets, between $\hat L_j(S_k)$ and $L_j(S_k)$; the method's LDS is the
mean over test points. 1 is a perfect ranking of the subsets, 0 no better
than chance. The scores are those of the model fine-tuned on the whole
training set, as a user would compute them.

The confidence interval is a percentile bootstrap that resamples the test
points and the subsets together (independently, with replacement): it covers
both the choice of test points and the finite number of retrained models.
The same resamples serve every method, so the difference between two methods
gets a paired interval as well ([bootstrap_lds][pydvl_datainf.experiments.lds.bootstrap_lds]).

Two setups are provided, each a function that fine-tunes, scores with every
method of [METHODS][pydvl_datainf.experiments.lds.METHODS], retrains on the
subsets and returns a JSON-friendly record:

* [classifier_lds][pydvl_datainf.experiments.lds.classifier_lds]: PEFT LoRA
  on MiniLM (or your sequence classifier), on a text classification set;
* [causal_lm_lds][pydvl_datainf.experiments.lds.causal_lm_lds]: LoRA on
  SmolLM2-135M (or your causal LM), on a generative task.

TracIn sums, over checkpoints saved during the full fine-tuning
([record_checkpoints][pydvl_datainf.experiments.lds.record_checkpoints]),
the learning rate times the gradient dot product at that checkpoint.

Run the full benchmark from the command line (the results go to one JSON file,
one entry per setup):

    python -m pydvl_datainf.experiments.lds --setup classifier --mode full \
        --out notebooks/results/lds.json

Example:
    ```python
    import numpy as np
    from pydvl_datainf.experiments.lds import bootstrap_lds, lds, subset_masks

    rng = np.random.default_rng(0)
    n_train, n_test = 40, 8
    effect = rng.normal(size=(n_test, n_train))      # true helpfulness
    masks = subset_masks(n_train, 32, seed=0)        # (32, 40), 20 rows each
    noise = 0.1 * rng.normal(size=(32, n_test))
    losses = -(masks @ effect.T) + noise             # retrained test losses
    per_test = lds(effect, masks, losses)            # exact scores: LDS near 1
    assert per_test.shape == (n_test,) and per_test.mean() > 0.9
    summary = bootstrap_lds({"exact": effect, "reversed": -effect}, masks, losses,
                            reference="exact", resamples=200)
    lo, hi = summary["exact"]["ci"]
    assert lo <= summary["exact"]["lds"] <= hi
    assert summary["reversed"]["lds"] < -0.9          # the wrong sign is caught
    ```
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from pydvl_datainf.hf import CausalLMWrapper, causal_lm_loss, unpack_inputs
from pydvl_datainf.influence import DataInfInfluence

from . import baselines, llm
from .datasets import TextDataset
from .finetune import lora_classifier, predict, train_classifier
from .generative_tasks import GenerativeTask, paper_task
from .llm import (
    FineTuning,
    encode_scope,
    evaluate_causal_lm,
    finetune_lora,
    load_smollm2,
    unload_lora,
)
from .pipelines import compare_methods, fit_datainf, mislabel_task

__all__ = [
    "METHODS",
    "METHOD_LABELS",
    "Checkpoint",
    "subset_masks",
    "predicted_losses",
    "lds",
    "bootstrap_lds",
    "record_checkpoints",
    "tracin_influences",
    "cosine_influences",
    "retrain_losses",
    "classifier_lds",
    "causal_lm_lds",
    "LDS_FINETUNING",
    "FULL",
    "REDUCED",
    "run",
    "save",
    "main",
]

logger = logging.getLogger(__name__)

Grads = Mapping[str, torch.Tensor]

METHODS = (
    "datainf",
    "exact",
    "lissa",
    "ekfac",
    "hessian_free",
    "cosine",
    "tracin",
)
"""The methods the LDS setups score, in the order of the tables."""

METHOD_LABELS = {
    "datainf": "DataInf",
    "exact": "Exact inverse",
    "lissa": "LiSSA",
    "ekfac": "EK-FAC",
    "hessian_free": "Hessian-free",
    "cosine": "Gradient cosine",
    "tracin": "TracIn",
}
"""Display names of the methods."""


# --------------------------------------------------------------- the metric
def subset_masks(
    n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Random training subsets of a fixed size, as a boolean matrix.

    Args:
        n_train: training points.
        n_subsets: subsets $M$.
        fraction: each subset holds `round(fraction * n_train)` points.
        seed: seed of the draw; the same seed gives the same subsets.

    Returns:
        `(n_subsets, n_train)` booleans, row $k$ marking the members of $S_k$.

    Raises:
        ValueError: a subset would be empty or the whole set, or fewer than 2
            subsets are asked for.

    Example:
        >>> masks = subset_masks(10, 4, seed=1)
        >>> masks.shape, masks.sum(axis=1).tolist()
        ((4, 10), [5, 5, 5, 5])
        >>> bool((masks == subset_masks(10, 4, seed=1)).all())
        True
    """
    size = int(round(fraction * n_train))
    if not 0 < size < n_train:
        raise ValueError(
            f"fraction={fraction} of {n_train} training points gives subsets of "
            f"{size}: need at least one point in and one out"
        )
    if n_subsets < 2:
        raise ValueError(f"Need at least 2 subsets to rank, got {n_subsets}")
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for k in range(n_subsets):
        masks[k, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def predicted_losses(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    r"""The linear datamodel's test losses, up to a constant per test point.

    With pyDVL's sign a helpful training point has a positive score and
    lowers the loss, so $\hat L_j(S_k) = -\sum_{i \in S_k} \tau_{ji}$.

    Args:
        scores: `(n_test, n_train)` influences, pyDVL's sign.
        masks: `(n_subsets, n_train)` from
            [subset_masks][pydvl_datainf.experiments.lds.subset_masks].

    Returns:
        `(n_subsets, n_test)`.

    Example:
        >>> predicted_losses(np.array([[1.0, 2.0, 4.0]]),
        ...                  np.array([[True, False, True]])).tolist()
        [[-5.0]]
    """
    scores = np.asarray(scores, dtype=np.float64)
    masks = np.asarray(masks)
    if scores.ndim != 2 or masks.ndim != 2 or scores.shape[1] != masks.shape[1]:
        raise ValueError(
            f"scores (n_test, n_train) and masks (n_subsets, n_train) disagree: "
            f"{scores.shape} and {masks.shape}"
        )
    return -(masks.astype(np.float64) @ scores.T)


def _centred_ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks of each column (ties share their mean rank), minus their mean."""
    r = rankdata(a, axis=0)
    return r - r.mean(axis=0)


def _rank_correlation(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Pearson correlation of centred rank columns; NaN where a column is all ties."""
    denom = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=0) / denom, np.nan)


def _columnwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of `a` with the same column of `b`.

    A column without spread (all values tied) gives NaN.
    """
    return _rank_correlation(_centred_ranks(a), _centred_ranks(b))


def lds(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """The LDS of every test point.

    Args:
        scores: `(n_test, n_train)` influences, pyDVL's sign.
        masks: `(n_subsets, n_train)` subsets.
        losses: `(n_subsets, n_test)` test losses of the models retrained on
            the subsets.

    Returns:
        `(n_test,)` Spearman correlations across subsets between predicted and
        actual losses; NaN for a test point whose actual (or predicted) loss
        is the same on every subset. The method's LDS is their mean
        (`np.nanmean`).

    Example:
        >>> masks = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=bool)
        >>> scores = np.array([[3.0, 2.0, 1.0]])   # the first point helps most
        >>> losses = np.array([[0.1], [0.2], [0.3]])
        >>> lds(scores, masks, losses).tolist()
        [1.0]
    """
    losses = np.asarray(losses, dtype=np.float64)
    predicted = predicted_losses(scores, masks)
    if losses.shape != predicted.shape:
        raise ValueError(
            f"losses must be (n_subsets, n_test) = {predicted.shape}, got "
            f"{losses.shape}"
        )
    return _columnwise_spearman(predicted, losses)


def bootstrap_lds(
    scores: Mapping[str, np.ndarray],
    masks: np.ndarray,
    losses: np.ndarray,
    reference: Optional[str] = "datainf",
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Dict[str, Dict[str, Any]]:
    """LDS of several methods, with percentile bootstrap confidence intervals.

    Each resample draws test points and subsets with replacement (both at
    once, independently) and recomputes every method's mean LDS on them; a
    subset drawn twice counts twice in the rank correlation. The same
    resamples serve all methods, so the interval of the difference to
    `reference` is paired.

    Args:
        scores: `{method: (n_test, n_train)}`, pyDVL's sign.
        masks: `(n_subsets, n_train)` subsets.
        losses: `(n_subsets, n_test)` retrained test losses.
        reference: the method the others are compared with (`None`: no
            comparison).
        resamples: bootstrap resamples.
        level: coverage of the intervals.
        seed: seed of the resamples.

    Returns:
        `{method: {"lds", "ci", "per_test", "test_points"}}`, plus, for
        every method but the reference, `"difference"` (its LDS minus the
        reference's) and `"difference_ci"`. `ci` is `[low, high]`;
        `per_test` the LDS of each test point (`None` where it is not
        defined); `test_points` how many had a defined correlation.

    Example:
        ```python
        import numpy as np
        from pydvl_datainf.experiments.lds import bootstrap_lds, subset_masks

        rng = np.random.default_rng(1)
        masks = subset_masks(30, 16)
        effect = rng.normal(size=(5, 30))
        losses = -(masks @ effect.T) + rng.normal(size=(16, 5))
        out = bootstrap_lds({"a": effect, "b": rng.normal(size=(5, 30))},
                            masks, losses, reference="a", resamples=300)
        lo, hi = out["b"]["difference_ci"]
        assert hi < 0  # "a" (the true effect) beats random scores
        ```
    """
    if not scores:
        raise ValueError("No scores given")
    if reference is not None and reference not in scores:
        raise ValueError(f"reference {reference!r} is not among {list(scores)}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    losses = np.asarray(losses, dtype=np.float64)
    predicted = {m: predicted_losses(s, masks) for m, s in scores.items()}
    for m, p in predicted.items():
        if p.shape != losses.shape:
            raise ValueError(
                f"{m}: predicted losses {p.shape} do not match losses {losses.shape}"
            )
    n_subsets, n_test = losses.shape
    rng = np.random.default_rng(seed)
    draws = {m: np.full(resamples, np.nan) for m in predicted}
    for b in range(resamples):
        rows = rng.integers(0, n_subsets, n_subsets)
        cols = rng.integers(0, n_test, n_test)
        actual = _centred_ranks(losses[rows][:, cols])
        for m, p in predicted.items():
            r = _rank_correlation(_centred_ranks(p[rows][:, cols]), actual)
            if np.isfinite(r).any():  # else every drawn test point is all ties
                draws[m][b] = np.nanmean(r)
    tail = 100 * (1 - level) / 2
    out: Dict[str, Dict[str, Any]] = OrderedDict()
    for m, p in predicted.items():
        per_test = _columnwise_spearman(p, losses)
        lo, hi = np.nanpercentile(draws[m], [tail, 100 - tail])
        entry: Dict[str, Any] = {
            "lds": float(np.nanmean(per_test)),
            "ci": [float(lo), float(hi)],
            "per_test": [float(v) if np.isfinite(v) else None for v in per_test],
            "test_points": int(np.isfinite(per_test).sum()),
        }
        if reference is not None and m != reference:
            ref = float(np.nanmean(_columnwise_spearman(predicted[reference], losses)))
            diff = draws[m] - draws[reference]
            dlo, dhi = np.nanpercentile(diff, [tail, 100 - tail])
            entry["difference"] = entry["lds"] - ref
            entry["difference_ci"] = [float(dlo), float(dhi)]
        out[m] = entry
    return out


# ------------------------------------------------------- checkpoints, TracIn
@dataclass
class Checkpoint:
    """Trainable parameters saved after an optimizer step.

    Attributes:
        step: the number of optimizer steps taken (1-based).
        lr: the mean learning rate of the steps since the previous
            checkpoint (the weight of this checkpoint in TracIn).
        values: `(parameter, saved value)` pairs, in the optimizer's order.
    """

    step: int
    lr: float
    values: List[Tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved values back into the parameters."""
        for p, v in self.values:
            p.copy_(v)


@contextlib.contextmanager
def record_checkpoints(every: int) -> Iterator[List[Checkpoint]]:
    """Save the trainable parameters every `every` optimizer steps, and at the end.

    Works with any training loop that steps a `torch.optim` optimizer: a
    global step hook copies the parameters of the optimizer's groups and
    notes the learning rate each step used. The last step is always saved
    (when training stops between two checkpoints). Use one optimizer at a
    time inside the block.

    Args:
        every: steps between checkpoints.

    Yields:
        The list the checkpoints are appended to.

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.lds import record_checkpoints

        w = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([w], lr=0.5)
        with record_checkpoints(every=2) as checkpoints:
            for _ in range(5):
                opt.zero_grad()
                (w - 1).pow(2).sum().backward()
                opt.step()
        assert [c.step for c in checkpoints] == [2, 4, 5]
        assert [c.lr for c in checkpoints] == [0.5, 0.5, 0.5]
        checkpoints[0].restore()   # w as it was after 2 steps
        assert torch.allclose(w, torch.ones(2))
        ```
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    checkpoints: List[Checkpoint] = []
    state: Dict[str, Any] = {"step": 0, "lrs": [], "optimizer": None}

    def save() -> None:
        opt = state["optimizer"]
        values = [
            (p, p.detach().clone()) for g in opt.param_groups for p in g["params"]
        ]
        checkpoints.append(
            Checkpoint(state["step"], float(np.mean(state["lrs"])), values)
        )
        state["lrs"] = []

    def hook(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if state["optimizer"] is not None and optimizer is not state["optimizer"]:
            raise RuntimeError(
                "record_checkpoints saw two optimizers: use one at a time"
            )
        state["optimizer"] = optimizer
        state["step"] += 1
        state["lrs"].append(float(optimizer.param_groups[0]["lr"]))
        if state["step"] % every == 0:
            save()

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield checkpoints
    finally:
        handle.remove()
    if state["lrs"]:
        save()


@torch.no_grad()
def tracin_influences(
    checkpoints: Sequence[Checkpoint],
    gradients: Callable[[], Tuple[Grads, Grads]],
) -> torch.Tensor:
    r"""TracIn over checkpoints: $\sum_c \eta_c\, g_{test}(\theta_c)^\top g_{train}(\theta_c)$.

    Each checkpoint is restored in turn, `gradients()` computes the
    per-sample gradients there, and the parameters are put back as they were
    on entry.

    Args:
        checkpoints: from [record_checkpoints][pydvl_datainf.experiments.lds.record_checkpoints].
        gradients: returns `(g_train, g_test)`, `{block: (k, d_l)}`, at the
            current parameters.

    Returns:
        `(n_test, n_train)` float64, pyDVL's sign (positive = helpful).

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.lds import Checkpoint, tracin_influences

        w = torch.nn.Parameter(torch.tensor([1.0]))
        x_train, x_test = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0]])
        def grads():   # gradients of w * x: x times w (any function of w)
            return {"w": x_train * w.detach()}, {"w": x_test * w.detach()}
        checkpoints = [Checkpoint(1, 0.1, [(w, torch.tensor([1.0]))]),
                       Checkpoint(2, 0.2, [(w, torch.tensor([2.0]))])]
        s = tracin_influences(checkpoints, grads)
        # 0.1 * (3 * [1, 2]) + 0.2 * (6 * [2, 4])
        assert torch.allclose(s, torch.tensor([[2.7, 5.4]], dtype=torch.float64))
        assert w.item() == 1.0   # restored
        ```
    """
    if not checkpoints:
        raise ValueError("TracIn needs at least one checkpoint")
    saved = [(p, p.detach().clone()) for p, _ in checkpoints[0].values]
    total: Optional[torch.Tensor] = None
    try:
        for c in checkpoints:
            c.restore()
            g_train, g_test = gradients()
            s = c.lr * baselines.hessian_free_influences(g_test, g_train)
            total = s if total is None else total + s
    finally:
        Checkpoint(0, 0.0, saved).restore()
    assert total is not None
    return total


def cosine_influences(test: Grads, train: Grads) -> torch.Tensor:
    """The cosine of test and training gradients (all blocks together).

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.lds import cosine_influences

        g_train = {"a": torch.tensor([[1.0, 0.0], [2.0, 2.0]])}
        g_test = {"a": torch.tensor([[3.0, 0.0]])}
        s = cosine_influences(g_test, g_train)
        assert torch.allclose(s, torch.tensor([[1.0, 2 ** -0.5]], dtype=torch.float64))
        ```
    """
    dots = baselines.hessian_free_influences(test, train)
    nt = torch.as_tensor(baselines.gradient_norms(test), dtype=torch.float64)
    nz = torch.as_tensor(baselines.gradient_norms(train), dtype=torch.float64)
    return dots / (nt[:, None] * nz[None, :]).clamp_min(1e-300)


def _gradients(
    model: nn.Module,
    loss: Callable[..., torch.Tensor],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    batch_size: int,
    progress: bool,
) -> Tuple[Grads, Grads]:
    """Per-sample gradients of training and test rows (`"module"` blocks)."""
    infl = DataInfInfluence(
        model, loss, block_structure="module", engine="hooks", progress=progress
    )
    infl.fit(DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size))
    return baselines.training_gradients(infl), infl.per_sample_gradients(x_test, y_test)


# ------------------------------------------------------------- retraining
def retrain_losses(
    retrain: Callable[[np.ndarray], np.ndarray],
    masks: np.ndarray,
    progress: bool = True,
) -> np.ndarray:
    """Test losses of the models retrained on each subset.

    Args:
        retrain: takes the training rows of a subset (sorted indices) and
            returns the `(n_test,)` test losses of the model trained on them.
        masks: `(n_subsets, n_train)` subsets.
        progress: show a progress bar.

    Returns:
        `(n_subsets, n_test)` float64.

    Example:
        ```python
        import numpy as np
        from pydvl_datainf.experiments.lds import retrain_losses, subset_masks

        masks = subset_masks(6, 3)
        losses = retrain_losses(lambda rows: np.array([rows.sum(), len(rows)]),
                                masks, progress=False)
        assert losses.shape == (3, 2) and (losses[:, 1] == 3).all()
        ```
    """
    rows = []
    for mask in tqdm(masks, desc="retraining on subsets", disable=not progress):
        rows.append(np.asarray(retrain(np.flatnonzero(mask)), dtype=np.float64))
        logger.info("subset %d of %d retrained", len(rows), len(masks))
    return np.stack(rows)


class _Clock:
    """Wall and process CPU seconds of named steps."""

    def __init__(self) -> None:
        self.wall: Dict[str, float] = OrderedDict()
        self.cpu: Dict[str, float] = OrderedDict()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def record(self) -> Dict[str, Dict[str, float]]:
        return {
            "wall": dict(self.wall),
            "cpu": dict(self.cpu),
            "total": {"wall": sum(self.wall.values()), "cpu": sum(self.cpu.values())},
        }


def _summary(
    scores: Mapping[str, np.ndarray],
    masks: np.ndarray,
    losses: np.ndarray,
    resamples: int,
    seed: int,
) -> Dict[str, Any]:
    """The per-method LDS record, and the settings of the metric."""
    methods = bootstrap_lds(
        scores, masks, losses, reference="datainf", resamples=resamples, seed=seed
    )
    return {
        "metric": {
            "n_subsets": int(len(masks)),
            "subset_size": int(masks[0].sum()),
            "bootstrap": {
                "resamples": resamples,
                "level": 0.95,
                "over": "test points and subsets",
                "seed": seed,
            },
        },
        "methods": methods,
        "losses": np.round(losses, 6).tolist(),
    }


def _check_methods(methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose among {list(METHODS)}")
    if "datainf" not in methods:
        raise ValueError("The LDS record compares every method with 'datainf'")


_PIPELINE_METHODS = ("datainf", "exact", "lissa", "ekfac", "hessian_free")


def _more_scores(
    scores: Mapping[str, Any],
    seconds: Mapping[str, float],
    methods: Sequence[str],
    g_train: Grads,
    g_test: Grads,
    checkpoints: Sequence[Checkpoint],
    gradients: Callable[[], Tuple[Grads, Grads]],
    clock: _Clock,
) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """All methods' scores in the order of `methods`, with cosine and TracIn added."""
    out: Dict[str, np.ndarray] = OrderedDict()
    wall: Dict[str, float] = OrderedDict()
    for m in methods:
        if m in scores:
            out[m] = np.asarray(scores[m], dtype=np.float64)
            wall[m] = float(seconds[m])
            continue
        t = time.perf_counter()
        with clock(m):
            if m == "cosine":
                out[m] = cosine_influences(g_test, g_train).numpy()
            elif m == "tracin":
                out[m] = tracin_influences(checkpoints, gradients).numpy()
            else:
                raise ValueError(f"No scores for method {m!r}")
        wall[m] = time.perf_counter() - t
        logger.info("%s: %.1f s", m, wall[m])
    return out, wall


# ----------------------------------------------------- setup (a): classifier
def classifier_lds(
    dataset: Union[str, TextDataset] = "bbc",
    n_train: int = 160,
    n_test: int = 64,
    *,
    n_subsets: int = 32,
    fraction: float = 0.5,
    epochs: int = 3,
    lr: float = 3e-3,
    batch_size: int = 16,
    max_length: int = 48,
    rank: int = 8,
    methods: Sequence[str] = METHODS,
    lissa_iterations: int = 100,
    resamples: int = 1000,
    model: Optional[nn.Module] = None,
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, Any]:
    """LDS of every method for a LoRA-fine-tuned sequence classifier.

    Fine-tunes (MiniLM by default) on `n_train` texts with
    [mislabel_task][pydvl_datainf.experiments.pipelines.mislabel_task] (no
    flipped labels), saving a checkpoint after every epoch; scores every
    method on the LoRA matrices (the same $\\lambda_l$ for DataInf, the exact
    inverse and LiSSA; pyDVL's EK-FAC); then retrains the same fine-tuning
    (same seed, epochs, batch size and learning rate) on each subset and
    measures the test cross-entropy.

    Args:
        dataset: `"bbc"`, `"sms"` or your own
            [TextDataset][pydvl_datainf.experiments.datasets.TextDataset].
        n_train: training texts.
        n_test: test texts.
        n_subsets: retrained subsets $M$.
        fraction: the share of the training set in each subset.
        epochs: fine-tuning epochs.
        lr: AdamW's learning rate (linear decay).
        batch_size: fine-tuning batch size.
        max_length: tokens per text.
        rank: LoRA rank.
        methods: a subset of [METHODS][pydvl_datainf.experiments.lds.METHODS]
            with `"datainf"`.
        lissa_iterations: LiSSA's recursion depth.
        resamples: bootstrap resamples.
        model: a `transformers` sequence classifier to use instead of MiniLM
            (copied, never modified).
        seed: seed of the split, the fine-tuning and the subsets.
        progress: show progress bars.

    Returns:
        A JSON-friendly record: `config`, `quality`, `metric`, `methods`
        (see [bootstrap_lds][pydvl_datainf.experiments.lds.bootstrap_lds]),
        `losses` and `seconds`.

    Example:
        ```python
        from transformers import BertConfig, BertForSequenceClassification
        from pydvl_datainf.experiments.lds import classifier_lds

        # MiniLM by default; here a tiny random BERT (with MiniLM's tokenizer)
        tiny_bert = BertForSequenceClassification(BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=2,
        ))
        r = classifier_lds("sms", n_train=16, n_test=4, n_subsets=4, epochs=1,
                           max_length=16, rank=2, resamples=50,
                           methods=["datainf", "hessian_free", "tracin"],
                           model=tiny_bert, progress=False)
        assert set(r["methods"]) == {"datainf", "hessian_free", "tracin"}
        print(r["methods"]["datainf"]["lds"], r["methods"]["datainf"]["ci"])
        ```
    """
    _check_methods(methods)
    clock = _Clock()
    pristine = copy.deepcopy(model) if model is not None else None
    steps_per_epoch = math.ceil(n_train / batch_size)
    with clock("fine-tuning"), record_checkpoints(steps_per_epoch) as checkpoints:
        task = mislabel_task(
            dataset,
            n_train,
            n_test,
            flip=0.0,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            max_length=max_length,
            rank=rank,
            model=copy.deepcopy(pristine),
            seed=seed,
            progress=progress,
        )
    with clock("gradients"):
        infl = fit_datainf(task, "module", progress=progress)
        g_train = baselines.training_gradients(infl)
        g_test = infl.per_sample_gradients(task.x_test, task.y_test)
    standard = [m for m in methods if m in _PIPELINE_METHODS]
    with clock("methods"):
        comparison = compare_methods(
            task,
            standard,
            infl=infl,
            gradients=(g_train, g_test),
            lissa_iterations=lissa_iterations,
            seed=seed,
            progress=progress,
        )
    scores, method_seconds = _more_scores(
        comparison.scores,
        comparison.seconds,
        methods,
        g_train,
        g_test,
        checkpoints,
        lambda: _gradients(
            task.model,
            F.cross_entropy,
            task.x_train,
            task.y_train,
            task.x_test,
            task.y_test,
            32,
            progress,
        ),
        clock,
    )
    full_losses = baselines.per_sample_losses(
        predict(task.model, task.x_test), task.y_test
    )
    n_classes = task.train.n_classes

    def retrain(rows: np.ndarray) -> np.ndarray:
        net = lora_classifier(
            n_classes,
            rank=rank,
            seed=seed,
            base_model=copy.deepcopy(pristine) if pristine is not None else None,
        )
        train_classifier(
            net,
            task.x_train[rows],
            task.y_train[rows],
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            progress=False,
        )
        return baselines.per_sample_losses(predict(net, task.x_test), task.y_test)

    masks = subset_masks(n_train, n_subsets, fraction, seed)
    with clock("retraining"):
        losses = retrain_losses(retrain, masks, progress)
    record: Dict[str, Any] = {
        "setup": "classifier",
        "config": {
            "dataset": dataset if isinstance(dataset, str) else dataset.name,
            "model": task.config["model"],
            "n_train": n_train,
            "n_test": n_test,
            "fraction": fraction,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "max_length": max_length,
            "rank": rank,
            "target_modules": task.config["target_modules"],
            "methods": list(methods),
            "lissa_iterations": lissa_iterations,
            "checkpoints": [{"step": c.step, "lr": c.lr} for c in checkpoints],
            "seed": seed,
        },
        "quality": {
            "test_accuracy": task.test_accuracy,
            "test_loss": float(full_losses.mean()),
            "epoch_losses": task.losses,
            "subset_test_loss": float(losses.mean()),
        },
    }
    record.update(_summary(scores, masks, losses, resamples, seed))
    record["seconds"] = clock.record()
    record["method_seconds"] = method_seconds
    return record


# ------------------------------------------------ setup (b): causal LM, LoRA
LDS_FINETUNING = FineTuning(updates=None, epochs=2, batch_size=4)
r"""The causal LM's recipe for the LDS: the paper's (LoRA rank 8, $\alpha = 32$,
dropout 0.05 on query and value, the loss on the whole text, AdamW at
$3 \cdot 10^{-4}$ falling linearly to 0), in 2 epochs of batches of 4 rather
than 10 updates of 64, so that 32 retrainings fit on a CPU."""


def causal_lm_lds(
    train: GenerativeTask,
    test: GenerativeTask,
    *,
    recipe: FineTuning = LDS_FINETUNING,
    test_scope: str = "answer",
    n_subsets: int = 32,
    fraction: float = 0.5,
    checkpoints: int = 3,
    methods: Sequence[str] = METHODS,
    lissa_iterations: int = 100,
    resamples: int = 1000,
    base: Optional[Tuple[nn.Module, Any]] = None,
    micro_batch: int = 16,
    progress: bool = True,
) -> Dict[str, Any]:
    """LDS of every method for a LoRA-fine-tuned causal language model.

    Fine-tunes LoRA adapters by `recipe` with
    [finetune_lora][pydvl_datainf.experiments.llm.finetune_lora], saving
    `checkpoints` evenly spaced checkpoints; scores every method with
    [influence_scores][pydvl_datainf.experiments.llm.influence_scores]
    (EK-FAC fitted under the training loss) plus TracIn; then retrains the
    same recipe (same seed, epochs, batch size and learning rate) on each
    subset. The training gradients are those of the fine-tuning loss (the
    tokens of `recipe.scope`); the test losses, measured and differentiated
    alike, score the tokens of `test_scope` (by default the answer: which
    training examples make the model give this answer).

    Args:
        train: the training examples.
        test: the test examples.
        recipe: the fine-tuning (see [FineTuning][pydvl_datainf.experiments.llm.FineTuning]);
            it must train by epochs (`updates=None`).
        test_scope: the tokens of the test loss (see
            [GRADIENT_SCOPES][pydvl_datainf.experiments.llm.GRADIENT_SCOPES]).
        n_subsets: retrained subsets $M$.
        fraction: the share of the training set in each subset.
        checkpoints: TracIn's checkpoints, evenly spaced over the updates
            of the full fine-tuning (the last one is the final model).
        methods: a subset of [METHODS][pydvl_datainf.experiments.lds.METHODS]
            with `"datainf"`.
        lissa_iterations: LiSSA's recursion depth.
        resamples: bootstrap resamples.
        base: `(model, tokenizer)`, e.g. from
            [load_smollm2][pydvl_datainf.experiments.llm.load_smollm2]
            (loaded if omitted); the adapters are removed again at the end.
        micro_batch: rows per forward pass of the fine-tuning.
        progress: show progress bars.

    Returns:
        A JSON-friendly record, as
        [classifier_lds][pydvl_datainf.experiments.lds.classifier_lds]'s.

    Example:
        ```python
        from transformers import LlamaConfig, LlamaForCausalLM
        from pydvl_datainf.experiments.finetune import load_tokenizer
        from pydvl_datainf.experiments.generative_tasks import paper_task
        from pydvl_datainf.experiments.lds import causal_lm_lds
        from pydvl_datainf.experiments.llm import FineTuning

        # SmolLM2 by default (load_smollm2); here a tiny random Llama, and MiniLM's
        # tokenizer with [CLS] and [SEP] as its BOS and EOS tokens
        tokenizer = load_tokenizer()
        tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
        tiny_llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        ))
        train, test = paper_task("math without reasoning", n_train=4, n_test=1,
                                 classes=2)
        recipe = FineTuning(rank=2, updates=None, epochs=1, batch_size=4, lr=1e-2)
        r = causal_lm_lds(train, test, recipe=recipe, n_subsets=4, resamples=50,
                          base=(tiny_llama, tokenizer),
                          methods=["datainf", "cosine", "tracin"], progress=False)
        assert r["metric"]["subset_size"] == 4 and len(r["losses"]) == 4
        print(r["methods"]["datainf"]["lds"], r["methods"]["datainf"]["ci"])
        ```
    """
    _check_methods(methods)
    if recipe.updates is not None:
        raise ValueError(
            "The LDS retrains the same epochs on every subset: give a recipe "
            "with updates=None"
        )
    clock = _Clock()
    name = "SmolLM2-135M" if base is None else type(base[0]).__name__
    if base is None:
        with clock("load"):
            base = load_smollm2()
    tokenizer = base[1]
    x, y = encode_scope(tokenizer, train, recipe.scope)
    xt, yt = encode_scope(tokenizer, test, test_scope)
    every = max(1, math.ceil(len(recipe.batches(len(train))) / checkpoints))

    def fine_tune(rows: Optional[np.ndarray]) -> Tuple[CausalLMWrapper, List[float]]:
        data = train if rows is None else train.subset(rows.tolist())
        return finetune_lora(
            base, data, recipe, micro_batch, progress=progress and rows is None
        )

    with clock("fine-tuning"), record_checkpoints(every) as saved:
        lm, update_losses = fine_tune(None)
    try:
        full = evaluate_causal_lm(lm, xt, yt)
        with clock("methods"):
            got, seconds = llm.influence_scores(
                lm,
                x,
                y,
                xt,
                yt,
                methods=[m for m in methods if m in llm.METHODS],
                lissa_iterations=lissa_iterations,
                seed=recipe.seed,
                progress=progress,
            )
        # llm.influence_scores gives the cosine too: only TracIn is added
        scores, method_seconds = _more_scores(
            got,
            seconds,
            methods,
            {},
            {},
            saved,
            lambda: _gradients(lm, causal_lm_loss, x, y, xt, yt, 16, progress),
            clock,
        )
    finally:
        unload_lora(lm)

    def retrain(rows: np.ndarray) -> np.ndarray:
        net, _ = fine_tune(rows)
        try:
            return evaluate_causal_lm(net, xt, yt)["loss"]
        finally:
            unload_lora(net)

    masks = subset_masks(len(train), n_subsets, fraction, recipe.seed)
    with clock("retraining"):
        losses = retrain_losses(retrain, masks, progress)
    record: Dict[str, Any] = {
        "setup": "causal_lm",
        "config": {
            "model": name,
            "task": train.name,
            "classes": len(train.class_names),
            "n_train": len(train),
            "n_test": len(test),
            "fraction": fraction,
            "recipe": recipe.as_dict(),
            "epochs": recipe.epochs,
            "lr": recipe.lr,
            "batch_size": recipe.batch_size,
            "rank": recipe.rank,
            "updates": len(recipe.batches(len(train))),
            "train_scope": recipe.scope,
            "test_scope": test_scope,
            "max_tokens": int(unpack_inputs(x)[1].sum(1).max()),
            "methods": list(methods),
            "lissa_iterations": lissa_iterations,
            "checkpoints": [{"step": c.step, "lr": c.lr} for c in saved],
            "seed": recipe.seed,
        },
        "quality": {
            "test_loss": float(full["loss"].mean()),
            "test_exact": float(full["exact"].mean()),
            "update_losses": update_losses,
            "subset_test_loss": float(losses.mean()),
        },
    }
    record.update(_summary(scores, masks, losses, resamples, recipe.seed))
    record["seconds"] = clock.record()
    record["method_seconds"] = method_seconds
    return record


# ------------------------------------------------------------------ the CLI
FULL = {
    "classifier": dict(
        dataset="bbc",
        n_train=96,
        n_test=48,
        n_subsets=32,
        epochs=3,
        batch_size=8,
        max_length=32,
    ),
    "causal_lm": dict(
        task="sentence transformations",
        classes=4,
        n_train=6,
        n_test=4,
        n_subsets=32,
        checkpoints=3,
    ),
}
"""The settings of the full runs, by setup (for the causal LM: examples per
class; the recipe is [LDS_FINETUNING][pydvl_datainf.experiments.lds.LDS_FINETUNING])."""

REDUCED = {
    "classifier": dict(
        dataset="sms",
        n_train=16,
        n_test=8,
        n_subsets=4,
        epochs=1,
        max_length=16,
        resamples=100,
        lissa_iterations=10,
    ),
    "causal_lm": dict(
        task="math without reasoning",
        classes=2,
        n_train=4,
        n_test=2,
        n_subsets=4,
        recipe=FineTuning(updates=None, epochs=1, batch_size=4),
        resamples=100,
        lissa_iterations=10,
    ),
}
"""The settings of the reduced runs (a smoke test of the whole pipeline)."""


def run(setup: str, mode: str = "full", progress: bool = True) -> Dict[str, Any]:
    """One setup at the settings of `mode` (`"full"` or `"reduced"`).

    Returns:
        The record of [classifier_lds][pydvl_datainf.experiments.lds.classifier_lds]
        or [causal_lm_lds][pydvl_datainf.experiments.lds.causal_lm_lds], with
        `mode` added.
    """
    if mode not in ("full", "reduced"):
        raise ValueError(f"mode must be 'full' or 'reduced', got {mode!r}")
    settings = dict((FULL if mode == "full" else REDUCED)[setup])
    if setup == "classifier":
        record = classifier_lds(progress=progress, **settings)  # type: ignore[arg-type]
    elif setup == "causal_lm":
        train, test = paper_task(
            str(settings.pop("task")),
            n_train=int(settings.pop("n_train")),  # type: ignore[call-overload]
            n_test=int(settings.pop("n_test")),  # type: ignore[call-overload]
            classes=int(settings.pop("classes")),  # type: ignore[call-overload]
        )
        record = causal_lm_lds(train, test, progress=progress, **settings)  # type: ignore[arg-type]
    else:
        raise ValueError(f"Unknown setup {setup!r}; choose 'classifier' or 'causal_lm'")
    record["mode"] = mode
    return record


def save(record: Mapping[str, Any], path: Union[str, Path]) -> None:
    """Write `record` into the results file `path`, keyed by its setup.

    The other setups already in the file are kept, so the setups can be run
    one at a time.
    """
    path = Path(path)
    doc: Dict[str, Any] = (
        json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    )
    setups = doc.setdefault("setups", {})
    setups[record["setup"]] = record
    doc["setups"] = {k: setups[k] for k in sorted(setups)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: run one setup and save it into the results file."""
    ap = argparse.ArgumentParser(
        description="The linear datamodeling score of the influence methods"
    )
    ap.add_argument("--setup", choices=["classifier", "causal_lm"], required=True)
    ap.add_argument("--mode", choices=["full", "reduced"], default="full")
    ap.add_argument("--out", type=Path, required=True, help="the results JSON file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = run(args.setup, args.mode, progress=not args.no_progress)
    save(record, args.out)
    for m, v in record["methods"].items():
        print(f"{m:>14}: LDS {v['lds']:.3f}  [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
