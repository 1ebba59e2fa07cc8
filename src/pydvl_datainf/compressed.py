r"""DataInf in projected space: exact norms and $\lambda$, projected inner products.

With a projection $P_l$ per block ([projection][pydvl_datainf.projection]),
$\tilde g_{il} = P_l g_{il}$ and $\tilde v = P_l v$, DataInf's operator is
approximated by

$$
\tilde R_l \tilde v = \frac{1}{\lambda_l}\Big(\tilde v - \frac1n \sum_{i=1}^n
\frac{\tilde g_{il} \cdot \tilde v}{\lambda_l + \lVert g_{il}\rVert^2}\,\tilde g_{il}\Big),
$$

where the squared norms $\lVert g_{il}\rVert^2$ and
$\lambda_l = c \cdot \frac1n\sum_i \lVert g_{il}\rVert^2 / d_l$ are exact: they
are taken from the unprojected gradients, before the projection (with the
block's own $d_l$, not $k_l$). Only the inner products are approximated. With
an orthogonal projection ($k_l \ge d_l$, $P_l^\top P_l = I$) every inner
product is kept, and the score $(\tilde R_l \tilde g_{t})\cdot \tilde g_j$ equals
the uncompressed $(R_l g_t) \cdot g_j$.

**Precomputed curvature.** Where $k_l$ is small, the $k_l \times k_l$ matrix

$$
M_l = \frac1n \sum_{i=1}^n \frac{\tilde g_{il}\tilde g_{il}^\top}{\lambda_l + \lVert g_{il}\rVert^2}
$$

is built once per $\lambda_l$ (one pass over the rows, additive over chunks:
[curvature_sum][pydvl_datainf.compressed.curvature_sum]), and then
$\tilde R_l \tilde v = (\tilde v - M_l \tilde v)/\lambda_l$ needs no pass over
the rows ([apply_curvature][pydvl_datainf.compressed.apply_curvature]).

**Sign.** As everywhere in the library, a score is
$\tilde g_{t}^\top \tilde R \tilde g_j$ (positive: helpful), the negative of the
paper's $\mathcal{I}_{DataInf}$.

Example:
    >>> g = torch.tensor([[3.0, 4.0]])          # one training row, ||g||^2 = 25
    >>> rows = g[:, :1]                          # a (trivial) projection to k = 1
    >>> m = curvature_matrix(rows, torch.tensor([25.0]), regularization=5.0)
    >>> m
    tensor([[0.3000]])
    >>> apply_curvature(torch.tensor([[1.0]]), m, 5.0)
    tensor([[0.1400]])
"""

from __future__ import annotations

from typing import Optional

import torch

from . import formula
from .jl import jl_epsilon

__all__ = [
    "apply_compressed",
    "curvature_sum",
    "curvature_matrix",
    "apply_curvature",
    "token_squared_norms",
    "score_pairs",
    "score_error_bound",
]


def apply_compressed(
    v: torch.Tensor,
    rows: torch.Tensor,
    squared_norms: torch.Tensor,
    regularization: float,
) -> torch.Tensor:
    r"""$\tilde R_l \tilde v$ for the rows of `v`, from the projected training rows.

    Args:
        v: $(m, k_l)$ projected vectors (e.g. test gradients).
        rows: $(n, k_l)$ projected training rows $\tilde g_{il}$.
        squared_norms: $(n,)$ exact $\lVert g_{il}\rVert^2$ of the *unprojected*
            rows (never the projected ones').
        regularization: $\lambda_l > 0$, from the unprojected rows.

    Returns:
        $(m, k_l)$.

    Example:
        >>> rows, norms = torch.tensor([[1.0, 0.0]]), torch.tensor([3.0])
        >>> apply_compressed(torch.tensor([[1.0, 1.0]]), rows, norms, 1.0)
        tensor([[0.7500, 1.0000]])
    """
    if len(squared_norms) != len(rows):
        raise ValueError(
            f"{len(squared_norms)} squared norms for {len(rows)} projected rows"
        )
    return formula.apply_inverse_harmonic_mean(v, rows, regularization, squared_norms)


def curvature_sum(
    rows: torch.Tensor, squared_norms: torch.Tensor, regularization: float
) -> torch.Tensor:
    r"""The chunk sum $\sum_i \tilde g_{il}\tilde g_{il}^\top / (\lambda_l + \lVert g_{il}\rVert^2)$.

    Summing it over all chunks of rows and dividing by $n$ gives $M_l$.

    Args:
        rows: $(c, k_l)$ projected rows of one chunk.
        squared_norms: $(c,)$ their exact squared norms.
        regularization: $\lambda_l > 0$.

    Returns:
        $(k_l, k_l)$, symmetric.
    """
    if regularization <= 0:
        raise ValueError(f"regularization must be positive, got {regularization}")
    weighted = rows / (regularization + squared_norms)[:, None]
    return weighted.T @ rows


def curvature_matrix(
    rows: torch.Tensor,
    squared_norms: torch.Tensor,
    regularization: float,
    n: Optional[int] = None,
) -> torch.Tensor:
    r"""$M_l = \frac1n\sum_i \tilde g_{il}\tilde g_{il}^\top/(\lambda_l + \lVert g_{il}\rVert^2)$.

    Args:
        rows: $(n, k_l)$ projected rows (all of them, or a chunk when `n` is
            given and the chunk sums are added by the caller).
        squared_norms: $(n,)$ exact squared norms.
        regularization: $\lambda_l > 0$.
        n: the number of training rows (default: `len(rows)`).

    Returns:
        $(k_l, k_l)$, to be recomputed whenever $\lambda_l$ changes.
    """
    total = curvature_sum(rows, squared_norms, regularization)
    return total / (len(rows) if n is None else n)


def apply_curvature(
    v: torch.Tensor, matrix: torch.Tensor, regularization: float
) -> torch.Tensor:
    r"""$\tilde R_l \tilde v = (\tilde v - M_l \tilde v)/\lambda_l$ for the rows of `v`.

    Args:
        v: $(m, k_l)$ projected vectors.
        matrix: $M_l$ from [curvature_matrix][pydvl_datainf.compressed.curvature_matrix]
            (built with the same $\lambda_l$).
        regularization: $\lambda_l$.

    Returns:
        $(m, k_l)$.
    """
    if regularization <= 0:
        raise ValueError(f"regularization must be positive, got {regularization}")
    return formula.finish_inverse_harmonic_mean(v, v @ matrix, 1, regularization)


def token_squared_norms(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    r"""Exact $\lVert \sum_t \delta_{it} a_{it}^\top \rVert_F^2$ from per-token factors.

    Through the token Gram matrices,
    $\lVert\sum_t \delta_t a_t^\top\rVert_F^2 = \sum_{t,s} (\delta_t\cdot\delta_s)(a_t\cdot a_s)$,
    in $O(T^2(d_{out} + d_{in}))$ per sample, or by forming the per-sample
    gradient, in $O(T d_{out} d_{in})$, whichever costs fewer operations.

    Args:
        left: $(n, T, d_{out})$ output gradients.
        right: $(n, T, d_{in})$ inputs.

    Returns:
        $(n,)$.

    Example:
        >>> d, a = torch.randn(4, 5, 3).double(), torch.randn(4, 5, 2).double()
        >>> g = d.transpose(1, 2) @ a
        >>> torch.allclose(token_squared_norms(d, a), g.square().sum((1, 2)))
        True
    """
    t, p, q = left.shape[1], left.shape[2], right.shape[2]
    if t * t * (p + q) < t * p * q:
        gram_left = left @ left.transpose(1, 2)
        gram_right = right @ right.transpose(1, 2)
        return (gram_left * gram_right).sum((1, 2))
    grads = left.transpose(1, 2) @ right
    return torch.linalg.vector_norm(grads.reshape(len(grads), -1), dim=1).square()


def score_pairs(n_fit: int, n_test: int, n_scored: int) -> int:
    r"""How many inner products one block's score matrix depends on.

    A score $(\tilde R_l\tilde g_t)\cdot\tilde g_j$ uses $\tilde g_t\cdot\tilde g_j$,
    $\tilde g_i\cdot\tilde g_t$ and $\tilde g_i\cdot\tilde g_j$ for the $n$ fitted
    rows $i$: $m N + n m + n N$ pairs for $m$ test and $N$ scored rows. This is
    the `pairs` of [jl_epsilon][pydvl_datainf.jl.jl_epsilon].

    Example:
        >>> score_pairs(n_fit=100, n_test=2, n_scored=100)
        10400
    """
    return n_test * n_scored + n_fit * n_test + n_fit * n_scored


def score_error_bound(
    test_norms: torch.Tensor,
    train_norms: torch.Tensor,
    regularization: float,
    epsilon: Optional[float] = None,
    *,
    fit_squared_norms: Optional[torch.Tensor] = None,
    k: Optional[int] = None,
    delta: Optional[float] = None,
    pairs: Optional[int] = None,
) -> torch.Tensor:
    r"""A bound on $|(\tilde R_l\tilde g_t)\cdot\tilde g_j - (R_l g_t)\cdot g_j|$ for one block.

    If every inner product that the score uses (see
    [score_pairs][pydvl_datainf.compressed.score_pairs]) is within
    $\varepsilon\lVert u\rVert\lVert v\rVert$ of the exact one, then, with
    $\rho_l = \frac1n\sum_i \lVert g_{il}\rVert^2/(\lambda_l + \lVert g_{il}\rVert^2) < 1$,

    $$
    \big|(\tilde R_l\tilde g_t)\cdot\tilde g_j - (R_l g_t)\cdot g_j\big|
    \le \big(\varepsilon + (2\varepsilon + \varepsilon^2)\rho_l\big)
    \frac{\lVert g_{t}\rVert\,\lVert g_{j}\rVert}{\lambda_l}.
    $$

    (Each product of two inner products is off by at most
    $(2\varepsilon+\varepsilon^2)\lVert g_i\rVert^2\lVert g_t\rVert\lVert g_j\rVert$;
    dividing by $\lambda_l + \lVert g_i\rVert^2$ and averaging gives the $\rho_l$
    term.) The Johnson–Lindenstrauss bound of [jl][pydvl_datainf.jl] gives the
    premise with probability at least $1-\delta$ for
    $\varepsilon$ = `jl_epsilon(k, delta, pairs)`, for dense Gaussian or
    Rademacher projections.

    Args:
        test_norms: $(m,)$ the norms $\lVert g_t\rVert$ (not squared).
        train_norms: $(N,)$ the norms $\lVert g_j\rVert$ of the scored rows.
        regularization: $\lambda_l$.
        epsilon: the inner-product error; or give `k`, `delta` and `pairs`.
        fit_squared_norms: $\lVert g_{il}\rVert^2$ of the fitted rows, for
            $\rho_l$ (default: $\rho_l = 1$).
        k: the projected dimension (with `delta` and `pairs`).
        delta: the failure probability.
        pairs: the number of inner products (default:
            `score_pairs(len(fit_squared_norms), m, N)`).

    Returns:
        $(m, N)$ bounds.

    Example:
        >>> b = score_error_bound(torch.tensor([1.0]), torch.tensor([2.0]), 0.5, 0.1)
        >>> b  # (0.1 + 0.21) * 1 * 2 / 0.5
        tensor([[1.2400]])
    """
    if epsilon is None:
        if k is None or delta is None:
            raise ValueError("give epsilon, or k and delta")
        if pairs is None:
            n_fit = (
                len(train_norms)
                if fit_squared_norms is None
                else len(fit_squared_norms)
            )
            pairs = score_pairs(n_fit, len(test_norms), len(train_norms))
        epsilon = jl_epsilon(k, delta, pairs)
    rho = 1.0
    if fit_squared_norms is not None:
        s = fit_squared_norms.double()
        rho = float((s / (regularization + s)).mean())
    factor = (epsilon + (2 * epsilon + epsilon**2) * rho) / regularization
    return factor * torch.outer(test_norms, train_norms)
