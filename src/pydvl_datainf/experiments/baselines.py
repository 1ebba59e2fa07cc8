r"""Baselines that DataInf is compared with, and the metrics of the comparison.

All influence functions here take per-block gradients, `{block: (k, d_l)}`
(e.g. from [training_gradients][pydvl_datainf.experiments.baselines.training_gradients]
and `DataInfInfluence.per_sample_gradients`), and return influences with
pyDVL's sign: $g_{test}^\top M\, g_{train}$ summed over blocks, positive for a
helpful training point. The paper's $\mathcal{I}$ is the negative.

| function | $M_l$ (per block $l$) |
| --- | --- |
| [exact_influences][pydvl_datainf.experiments.baselines.exact_influences] | $(G_l + \lambda_l I)^{-1}$, $G_l = \frac{1}{n}\sum_i g_{il} g_{il}^\top$: the damped Gauss–Newton block, inverted by a dense solve |
| [datainf_influences][pydvl_datainf.experiments.baselines.datainf_influences] | $\frac{1}{n}\sum_i (g_{il} g_{il}^\top + \lambda_l I)^{-1}$ (DataInf by the library's operator, on given gradients) |
| [lissa_influences][pydvl_datainf.experiments.baselines.lissa_influences] | LiSSA's stochastic estimate of $(G_l + \lambda_l I)^{-1}$ |
| [hessian_free_influences][pydvl_datainf.experiments.baselines.hessian_free_influences] | $I$ (gradient dot products) |
| [ekfac_influences][pydvl_datainf.experiments.ekfac.ekfac_influences] | EK-FAC's Kronecker-factored eigenbasis (in [ekfac][pydvl_datainf.experiments.ekfac]) |

The "exact" baseline is our own: pyDVL 0.10's
`DirectInfluence(second_order_mode=GAUSS_NEWTON)` is mis-normalised.

Metrics: [roc_auc][pydvl_datainf.experiments.baselines.roc_auc],
[detection_metrics][pydvl_datainf.experiments.baselines.detection_metrics] (mislabeled
data), [class_match_metrics][pydvl_datainf.experiments.baselines.class_match_metrics]
(influential data), [rowwise_correlation][pydvl_datainf.experiments.baselines.rowwise_correlation]
(approximation quality).

Example:
    ```python
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from pydvl_datainf import DataInfInfluence
    from pydvl_datainf.experiments.baselines import (
        exact_influences, hessian_free_influences, rowwise_correlation,
        training_gradients,
    )

    torch.manual_seed(0)
    model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    train_loader = DataLoader(TensorDataset(x, y), batch_size=20)
    x_test, y_test = torch.randn(5, 4), torch.randint(0, 3, (5,))

    infl = DataInfInfluence(model, loss).fit(train_loader)
    g_train = training_gradients(infl)
    g_test = infl.per_sample_gradients(x_test, y_test)
    exact = exact_influences(g_test, g_train, infl.block_regularization)
    plain = hessian_free_influences(g_test, g_train)
    datainf = infl.train_influences(x_test, y_test)
    mean_r, per_row = rowwise_correlation(datainf.numpy(), exact.numpy())
    print(f"DataInf vs exact: mean Pearson r = {mean_r:.3f}")
    ```
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import rankdata

from pydvl_datainf import formula
from pydvl_datainf.operator import DataInfOperator
from pydvl_datainf.state import FittedState

__all__ = [
    "training_gradients",
    "merge_blocks",
    "exact_factors",
    "exact_influences",
    "datainf_influences",
    "hessian_free_influences",
    "datainf_self_influences",
    "per_sample_losses",
    "el2n_scores",
    "gradient_norms",
    "lissa_factors",
    "lissa_influences",
    "factor_influences",
    "roc_auc",
    "detection_metrics",
    "class_match_metrics",
    "class_match_per_point",
    "rowwise_correlation",
]

logger = logging.getLogger(__name__)

Grads = Mapping[str, torch.Tensor]


def _check(test: Grads, train: Grads) -> None:
    if list(test) != list(train):
        raise ValueError(
            f"Test and train gradients have different blocks: {list(test)} vs "
            f"{list(train)}"
        )
    for k in test:
        if test[k].ndim != 2 or train[k].ndim != 2:
            raise ValueError(f"Gradients of block {k!r} must be 2-D (k, d_l)")
        if test[k].shape[1] != train[k].shape[1]:
            raise ValueError(
                f"Block {k!r}: test width {test[k].shape[1]} != train width "
                f"{train[k].shape[1]}"
            )


def training_gradients(infl: Any) -> OrderedDict[str, torch.Tensor]:
    """All per-sample training gradients cached by a fitted DataInfInfluence.

    Args:
        infl: a fitted [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence].

    Returns:
        `{block: (n_train, d_l)}`, rows in the order of the fit pass.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence
        from pydvl_datainf.experiments.baselines import training_gradients

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
        infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 8))
        g = training_gradients(infl)
        assert g[""].shape == (30, 15)  # one block: the layer's 12 + 3 parameters
        assert torch.allclose(g[""][:4], infl.per_sample_gradients(x[:4], y[:4])[""])
        ```
    """
    if getattr(infl, "store", None) is None:
        raise ValueError("The influence model is not fitted")
    parts: Dict[str, list] = {k: [] for k in infl.block_names}
    for _, chunk in infl.store.chunks():
        for k in parts:
            parts[k].append(chunk[k])
    return OrderedDict((k, torch.cat(v)) for k, v in parts.items())


def merge_blocks(
    grads: Grads, groups: Mapping[str, Sequence[str]]
) -> OrderedDict[str, torch.Tensor]:
    """Concatenate blocks into bigger ones (e.g. `lora_A` with `lora_B`).

    Args:
        grads: `{block: (k, d_l)}`.
        groups: `{new_block: [old_block, ...]}`; every old block exactly once.

    Returns:
        `{new_block: (k, sum of d_l)}`.

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.baselines import merge_blocks

        g = {"layer0.lora_A": torch.randn(5, 8), "layer0.lora_B": torch.randn(5, 6)}
        merged = merge_blocks(g, {"layer0": ["layer0.lora_A", "layer0.lora_B"]})
        assert merged["layer0"].shape == (5, 14)
        ```
    """
    used = [b for names in groups.values() for b in names]
    if sorted(used) != sorted(grads):
        raise ValueError("groups must use every block exactly once")
    return OrderedDict(
        (k, torch.cat([grads[b] for b in names], dim=1)) for k, names in groups.items()
    )


# ------------------------------------------------------------------- exact
@torch.no_grad()
def exact_factors(
    test: Grads, train: Grads, regularization: Mapping[str, float]
) -> OrderedDict[str, torch.Tensor]:
    r"""$(G_l + \lambda_l I)^{-1} v$ for every test gradient $v$, in float64.

    $G_l = \frac{1}{n} \sum_i g_{il} g_{il}^\top$ over the rows of `train`.
    The system is solved by a Cholesky factorisation in the smaller of the two
    spaces: the $d_l \times d_l$ matrix itself when $d_l \le n$, otherwise the
    $n \times n$ matrix of Woodbury's identity
    $(\lambda I + G^\top G / n)^{-1} = \frac{1}{\lambda}\left(I - G^\top (n\lambda I + G G^\top)^{-1} G\right)$,
    which is exact as well.

    Args:
        test: `{block: (m, d_l)}` vectors to transform.
        train: `{block: (n, d_l)}` training gradients defining $G_l$.
        regularization: $\lambda_l > 0$ per block.

    Returns:
        `{block: (m, d_l)}`, float64.

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.baselines import exact_factors

        torch.manual_seed(0)
        g_train = {"a": torch.randn(50, 4), "b": torch.randn(50, 3)}
        g_test = {"a": torch.randn(2, 4), "b": torch.randn(2, 3)}

        f = exact_factors(g_test, g_train, {k: 0.1 for k in g_train})
        a = g_train["a"].double()
        damped = a.T @ a / 50 + 0.1 * torch.eye(4, dtype=torch.float64)
        assert torch.allclose(f["a"] @ damped, g_test["a"].double())
        ```
    """
    _check(test, train)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k in test:
        lam = float(regularization[k])
        if not lam > 0:
            raise ValueError(f"regularization of block {k!r} must be positive")
        g = train[k].double()
        v = test[k].double().to(g.device)
        n, d = g.shape
        if d <= n:
            a = g.T @ g / n
            a.diagonal().add_(lam)
            chol = torch.linalg.cholesky(a)
            out[k] = torch.cholesky_solve(v.T, chol).T
        else:
            kmat = g @ g.T
            kmat.diagonal().add_(n * lam)
            chol = torch.linalg.cholesky(kmat)
            coef = torch.cholesky_solve(g @ v.T, chol)  # (n, m)
            out[k] = (v - coef.T @ g) / lam
    return out


def factor_influences(factors: Grads, train: Grads) -> torch.Tensor:
    r"""$\sum_l f_{t,l}^\top g_{z,l}$: influences from transformed test gradients.

    Args:
        factors: `{block: (m, d_l)}`, e.g. from [exact_factors][pydvl_datainf.experiments.baselines.exact_factors]
            or [lissa_factors][pydvl_datainf.experiments.baselines.lissa_factors].
        train: `{block: (n, d_l)}` training gradients.

    Returns:
        `(m, n)`, in the wider of the two dtypes.

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.baselines import (
            exact_factors, exact_influences, factor_influences,
        )

        g_train = {"a": torch.randn(20, 4)}
        g_test = {"a": torch.randn(2, 4)}
        f = exact_factors(g_test, g_train, {"a": 0.5})
        assert torch.allclose(factor_influences(f, g_train),
                              exact_influences(g_test, g_train, {"a": 0.5}))
        ```
    """
    total: Optional[torch.Tensor] = None
    for k, f in factors.items():
        g = train[k].to(device=f.device)
        dtype = torch.promote_types(f.dtype, g.dtype)
        part = f.to(dtype) @ g.to(dtype).T
        total = part if total is None else total + part
    assert total is not None
    return total


def exact_influences(
    test: Grads,
    train: Grads,
    regularization: Mapping[str, float],
    other: Optional[Grads] = None,
) -> torch.Tensor:
    r"""$\sum_l g_{t,l}^\top (G_l + \lambda_l I)^{-1} g_{z,l}$ (pyDVL sign), float64.

    Args:
        test: `{block: (m, d_l)}` test gradients.
        train: `{block: (n, d_l)}` training gradients (define $G_l$).
        regularization: $\lambda_l$ per block, e.g. a fitted model's
            `block_regularization`, so that both use the same damping.
        other: gradients of the training-side points to score (default:
            `train` itself).

    Returns:
        `(m, n)` influences.

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.baselines import (
            exact_influences, hessian_free_influences,
        )

        torch.manual_seed(0)
        g_train = {"a": torch.randn(50, 4), "b": torch.randn(50, 3)}
        g_test = {"a": torch.randn(2, 4), "b": torch.randn(2, 3)}

        scores = exact_influences(g_test, g_train, {"a": 0.1, "b": 0.1})
        assert scores.shape == (2, 50)
        # with a huge damping, (G + lambda I)^-1 ~ I / lambda: Hessian-free, scaled
        damped = exact_influences(g_test, g_train, {"a": 1e6, "b": 1e6})
        plain = hessian_free_influences(g_test, g_train)
        assert torch.allclose(damped * 1e6, plain, rtol=1e-3)
        ```
    """
    factors = exact_factors(test, train, regularization)
    return factor_influences(factors, train if other is None else other)


def _float64(grads: Grads) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v.detach().double()) for k, v in grads.items())


@torch.no_grad()
def datainf_influences(
    test: Grads,
    train: Grads,
    regularization: Mapping[str, float],
    other: Optional[Grads] = None,
) -> torch.Tensor:
    r"""DataInf's $\sum_l g_{t,l}^\top R_l\, g_{z,l}$ by the library's operator.

    Builds an in-memory
    [FittedState][pydvl_datainf.state.FittedState] from the training
    gradients (float64) and applies the library's
    [DataInfOperator][pydvl_datainf.operator.DataInfOperator]: the same
    numbers as
    [DataInfInfluence.influences][pydvl_datainf.influence.DataInfInfluence.influences]
    for the same blocks and $\lambda_l$, for other block groupings too
    (see [merge_blocks][pydvl_datainf.experiments.baselines.merge_blocks])
    without recomputing gradients.

    Args:
        test: `{block: (m, d_l)}` test gradients.
        train: `{block: (n, d_l)}` training gradients (define $R_l$).
        regularization: $\lambda_l$ per block.
        other: gradients of the training-side points to score (default:
            `train` itself).

    Returns:
        `(m, n)` influences, float64.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence
        from pydvl_datainf.experiments.baselines import (
            datainf_influences, training_gradients,
        )

        model, loss = torch.nn.Linear(4, 3), torch.nn.functional.cross_entropy
        x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
        infl = DataInfInfluence(model, loss).fit(DataLoader(TensorDataset(x, y), 10))
        g_train = training_gradients(infl)
        g_test = infl.per_sample_gradients(x[:3], y[:3])
        scores = datainf_influences(g_test, g_train, infl.block_regularization)
        assert torch.allclose(scores.float(), infl.train_influences(x[:3], y[:3]),
                              rtol=1e-4, atol=1e-6)
        ```
    """
    _check(test, train)
    state = FittedState.from_gradients(
        _float64(train), regularization={k: float(regularization[k]) for k in train}
    )
    op = DataInfOperator(state)
    if other is None:
        return op.influences(_float64(test))
    return factor_influences(op.apply(_float64(test)), other)


@torch.no_grad()
def datainf_self_influences(
    train: Grads, regularization: Mapping[str, float]
) -> np.ndarray:
    r"""DataInf's self-influences $g_i^\top R\, g_i$ (float64), by the library's operator.

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.baselines import (
            datainf_influences, datainf_self_influences,
        )

        torch.manual_seed(0)
        g_train = {"a": torch.randn(50, 4), "b": torch.randn(50, 3)}
        g_test = {"a": torch.randn(2, 4), "b": torch.randn(2, 3)}

        lam = {"a": 0.1, "b": 0.1}
        s = datainf_self_influences(g_train, lam)
        full = datainf_influences(g_train, g_train, lam)  # (n, n)
        assert s.shape == (50,) and (s > 0).all()
        assert torch.allclose(torch.from_numpy(s), full.diagonal())
        ```
    """
    state = FittedState.from_gradients(
        _float64(train), regularization={k: float(regularization[k]) for k in train}
    )
    return DataInfOperator(state).self_scores().double().cpu().numpy()


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Cross-entropy of every sample under its (possibly noisy) label.

    Example:
        ```python
        import numpy as np
        import torch
        from pydvl_datainf.experiments.baselines import per_sample_losses

        logits = torch.tensor([[0.0, 0.0], [2.0, -2.0]])
        loss = per_sample_losses(logits, torch.tensor([0, 1]))  # (n,)
        assert np.allclose(loss, [np.log(2), np.log(1 + np.exp(4))])
        ```
    """
    lab = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    out = torch.nn.functional.cross_entropy(logits.double(), lab, reduction="none")
    return out.detach().cpu().numpy()


def el2n_scores(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    r"""EL2N: $\lVert \mathrm{softmax}(f(x)) - e_y\rVert_2$ per sample (Paul et al., 2021).

    Example:
        ```python
        import numpy as np
        import torch
        from pydvl_datainf.experiments.baselines import el2n_scores

        logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
        s = el2n_scores(logits, torch.tensor([0, 1]))  # (n,)
        assert np.allclose(s, [np.sqrt(0.5), np.sqrt(2)], atol=1e-6)  # 2nd: wrong
        ```
    """
    lab = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
    p = torch.softmax(logits.double(), dim=1)
    onehot = torch.nn.functional.one_hot(lab, p.shape[1]).double()
    return (p - onehot).norm(dim=1).detach().cpu().numpy()


def gradient_norms(grads: Grads) -> np.ndarray:
    r"""$\lVert g_i\rVert_2$ over all blocks, per sample.

    Example:
        ```python
        import numpy as np
        import torch
        from pydvl_datainf.experiments.baselines import gradient_norms

        g_train = {"a": torch.tensor([[3.0], [0.0]]), "b": torch.tensor([[4.0], [1.0]])}
        s = gradient_norms(g_train)  # (n,), over all blocks
        assert np.allclose(s, [5.0, 1.0])
        ```
    """
    total: Optional[torch.Tensor] = None
    for g in grads.values():
        part = g.double().pow(2).sum(dim=1)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("No gradient blocks")
    return total.sqrt().cpu().numpy()


@torch.no_grad()
def hessian_free_influences(test: Grads, train: Grads) -> torch.Tensor:
    r"""The Hessian-free baseline $\sum_l g_{t,l}^\top g_{z,l}$ (no inverse).

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.baselines import hessian_free_influences

        torch.manual_seed(0)
        g_train = {"a": torch.randn(50, 4), "b": torch.randn(50, 3)}
        g_test = {"a": torch.randn(2, 4), "b": torch.randn(2, 3)}

        scores = hessian_free_influences(g_test, g_train)  # (m, n)
        dots = g_test["a"] @ g_train["a"].T + g_test["b"] @ g_train["b"].T
        assert torch.allclose(scores.float(), dots, atol=1e-5)
        ```
    """
    _check(test, train)
    return factor_influences(
        OrderedDict((k, v.double()) for k, v in test.items()), train
    )


# -------------------------------------------------------------------- LiSSA
def _max_sq_norm(g: torch.Tensor) -> float:
    """$\\max_i \\lVert g_i\\rVert^2$: bounds the top eigenvalue of any mini-batch mean."""
    return float(formula.squared_norms(g).max()) if len(g) else 0.0


@torch.no_grad()
def lissa_factors(
    test: Grads,
    train: Grads,
    regularization: Mapping[str, float],
    iterations: int = 100,
    batch_size: int = 32,
    scale: Optional[float] = None,
    seed: int = 0,
    on_step: Optional[Callable[[str, int, torch.Tensor], None]] = None,
) -> OrderedDict[str, torch.Tensor]:
    r"""LiSSA's estimate of $(G_l + \lambda_l I)^{-1} v$ for every test gradient.

    The recursion (Agarwal et al., 2017) with the damping *added* to the
    curvature, on a random mini-batch $B_t$ of training gradients per step:

    $$
    h_0 = v, \qquad
    h_{t+1} = v + h_t - \frac{1}{s}\left(\frac{1}{|B_t|}\sum_{i \in B_t}
        g_{il} g_{il}^\top + \lambda_l I\right) h_t,
    \qquad \hat{x} = h_T / s .
    $$

    It converges to $(G_l + \lambda_l I)^{-1} v$ when $s$ exceeds the
    largest eigenvalue of the damped curvature; directions with small
    eigenvalues converge slowly (at the rate $1 - \lambda_l / s$), which is
    why a finite number of iterations is an approximation.

    Args:
        test: `{block: (m, d_l)}`.
        train: `{block: (n, d_l)}`.
        regularization: $\lambda_l$ per block.
        iterations: $T$.
        batch_size: $|B_t|$, drawn with replacement; at least $n$ means the
            full batch (deterministic).
        scale: $s$; default $1.1\,(\max_i \lVert g_{il}\rVert^2 + \lambda_l)$
            per block, which bounds the largest eigenvalue of every
            mini-batch's damped curvature, so that the recursion never
            diverges (a scale from the full-batch spectrum alone lets
            mini-batches holding a large gradient, e.g. a mislabeled point,
            blow the recursion up).
        seed: seed of the mini-batches.
        on_step: called after every step $t$ (from 1) of every block as
            `on_step(block, t, h_t / s)`, e.g. to follow the convergence.

    Returns:
        `{block: (m, d_l)}`, float64.

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.baselines import exact_factors, lissa_factors

        torch.manual_seed(0)
        g_train = {"a": torch.randn(50, 4), "b": torch.randn(50, 3)}
        g_test = {"a": torch.randn(2, 4), "b": torch.randn(2, 3)}

        lam = {"a": 2.0, "b": 2.0}
        f = lissa_factors(g_test, g_train, lam, iterations=100)
        exact = exact_factors(g_test, g_train, lam)
        error = (f["a"] - exact["a"]).norm() / exact["a"].norm()
        print(f"relative error of LiSSA: {error:.3f}")  # mini-batch noise
        assert error < 0.2
        ```
    """
    _check(test, train)
    gen = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k in test:
        g = train[k].double().cpu()
        v = test[k].double().cpu()
        lam = float(regularization[k])
        s = float(scale) if scale is not None else 1.1 * (_max_sq_norm(g) + lam)
        h = v.clone()
        n = len(g)
        for step in range(iterations):
            if batch_size >= n:
                gb = g  # the full batch: deterministic
            else:
                gb = g[torch.randint(0, n, (batch_size,), generator=gen)]
            curv = (h @ gb.T) @ gb / len(gb) + lam * h
            h = v + h - curv / s
            if on_step is not None:
                on_step(k, step + 1, h / s)
        out[k] = h / s
    return out


def lissa_influences(
    test: Grads,
    train: Grads,
    regularization: Mapping[str, float],
    iterations: int = 100,
    batch_size: int = 32,
    scale: Optional[float] = None,
    seed: int = 0,
) -> torch.Tensor:
    r"""Influences with LiSSA's inverse, see [lissa_factors][pydvl_datainf.experiments.baselines.lissa_factors].

    Example:
        ```python
        import torch
        from pydvl_datainf.experiments.baselines import (
            exact_influences, lissa_influences,
        )

        torch.manual_seed(0)
        g_train = {"a": torch.randn(50, 4), "b": torch.randn(50, 3)}
        g_test = {"a": torch.randn(2, 4), "b": torch.randn(2, 3)}

        lam = {"a": 2.0, "b": 2.0}
        full_batch = lissa_influences(g_test, g_train, lam, iterations=100,
                                      batch_size=50)  # deterministic
        assert torch.allclose(full_batch, exact_influences(g_test, g_train, lam),
                              rtol=1e-3, atol=1e-3)
        ```
    """
    factors = lissa_factors(
        test, train, regularization, iterations, batch_size, scale, seed
    )
    return factor_influences(factors, train)


# ------------------------------------------------------------------ metrics
def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of `scores` for binary `labels` (Mann–Whitney; ties count half).

    Args:
        scores: higher means "more likely positive".
        labels: 0/1.

    Returns:
        The AUC in `[0, 1]`.

    Raises:
        ValueError: `labels` has only one class.

    Example:
        >>> roc_auc(np.array([0.1, 0.9, 0.4]), np.array([0, 1, 0]))
        1.0
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_metrics(
    harm: np.ndarray, flipped: np.ndarray, top_fraction: float = 0.2
) -> Dict[str, float]:
    """How well `harm` scores find the flipped (mislabeled) training points.

    Args:
        harm: a score per training point, higher = more likely mislabeled (for
            pyDVL-signed influences on a clean test set, minus their mean over
            the test points).
        flipped: 0/1 per training point.
        top_fraction: inspect this fraction of the highest scores.

    Returns:
        `{"auc": ..., "recall_top": ...}`: the ROC AUC, and the fraction of all
        flipped points found among the `top_fraction` highest scores.

    Example:
        >>> detection_metrics(np.array([3.0, 1.0, 2.0, 0.0, -1.0]),
        ...                   np.array([1, 0, 0, 0, 0]))
        {'auc': 1.0, 'recall_top': 1.0}
    """
    harm = np.asarray(harm, dtype=np.float64)
    flipped = np.asarray(flipped).astype(bool)
    k = max(1, int(round(top_fraction * len(harm))))
    top = np.argsort(-harm, kind="stable")[:k]
    return {
        "auc": roc_auc(harm, flipped),
        "recall_top": float(flipped[top].sum() / max(1, flipped.sum())),
    }


def class_match_metrics(
    scores: np.ndarray, test_groups: np.ndarray, train_groups: np.ndarray
) -> Dict[str, float]:
    """Do a test point's most influential training points share its class?

    For each test point $j$ (a row of `scores`), with $k_j$ the number of
    training points of its class: the AUC of its scores for "same class", and
    the recall, the fraction of its top-$k_j$ training points (highest
    scores, i.e. most helpful with pyDVL's sign) that share its class.

    Args:
        scores: `(m, n)` influences.
        test_groups: `(m,)` classes of the test points.
        train_groups: `(n,)` classes of the training points.

    Returns:
        `{"auc": mean AUC, "recall": mean recall}` over test points.

    Example:
        >>> s = np.array([[2.0, 1.0, 0.0], [0.0, 0.5, 1.0]])
        >>> class_match_metrics(s, np.array([0, 1]), np.array([0, 0, 1]))
        {'auc': 1.0, 'recall': 1.0}
    """
    aucs, recalls = class_match_per_point(scores, test_groups, train_groups)
    return {"auc": float(np.mean(aucs)), "recall": float(np.mean(recalls))}


def class_match_per_point(
    scores: np.ndarray, test_groups: np.ndarray, train_groups: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """The AUC and the recall of every test point, as in [class_match_metrics][pydvl_datainf.experiments.baselines.class_match_metrics].

    Test points whose class holds no training point, or every training
    point, are left out.

    Returns:
        `(aucs, recalls)`, one value per test point kept.

    Example:
        >>> s = np.array([[2.0, 1.0, 0.0], [1.0, 0.5, 0.0]])
        >>> aucs, recalls = class_match_per_point(s, np.array([0, 1]), np.array([0, 0, 1]))
        >>> aucs.tolist(), recalls.tolist()
        ([1.0, 0.0], [1.0, 0.0])
    """
    scores = np.asarray(scores, dtype=np.float64)
    test_groups = np.asarray(test_groups)
    train_groups = np.asarray(train_groups)
    aucs, recalls = [], []
    for j in range(len(scores)):
        same = train_groups == test_groups[j]
        k = int(same.sum())
        if k == 0 or k == len(same):
            continue
        aucs.append(roc_auc(scores[j], same))
        top = np.argsort(-scores[j], kind="stable")[:k]
        recalls.append(float(same[top].mean()))
    return np.array(aucs), np.array(recalls)


def rowwise_correlation(
    a: np.ndarray, b: np.ndarray, method: str = "pearson"
) -> Tuple[float, np.ndarray]:
    """Correlation of two influence matrices, row (test point) by row.

    Args:
        a: `(m, n)`.
        b: `(m, n)`.
        method: `"pearson"` or `"spearman"`.

    Returns:
        `(mean over rows, per-row correlations)`.

    Example:
        >>> rowwise_correlation(np.array([[1.0, 2, 3]]), np.array([[2.0, 4, 7]]))[0]
        0.9933992677987828
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (m, n) arrays, got {a.shape} and {b.shape}")
    if method == "spearman":
        a = np.apply_along_axis(rankdata, 1, a)
        b = np.apply_along_axis(rankdata, 1, b)
    elif method != "pearson":
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a**2).sum(axis=1) * (b**2).sum(axis=1))
    r = np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1), 0.0)
    return float(r.mean()), r
