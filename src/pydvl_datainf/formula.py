r"""The DataInf formula, as pure functions on tensors.

For one block $l$ with per-sample training gradients $g_{il} \in \mathbb{R}^{d_l}$,
$i = 1..n$, DataInf replaces the inverse of the damped Gauss–Newton block by the
inverse harmonic mean of the damped rank-one terms,

$$
R_l = \frac{1}{n} \sum_{i=1}^n \left(g_{il} g_{il}^\top + \lambda_l I\right)^{-1},
$$

and Sherman–Morrison gives it in closed form:

$$
R_l v = \frac{1}{\lambda_l}\left(v - \frac{1}{n}\sum_{i=1}^n
        \frac{g_{il}^\top v}{\lambda_l + \lVert g_{il} \rVert^2}\, g_{il}\right).
$$

Applied to $m$ vectors at once (rows of $V$), with $G$ the $n \times d_l$ matrix of
training gradients and $s_i = \lVert g_{il}\rVert^2$:

$$
R_l V^\top = \frac{1}{\lambda_l}\left(V - \frac{1}{n}
    \left[(V G^\top) \oslash (\lambda_l + s)^\top\right] G\right)^\top,
$$

two matrix products. When $G$ does not fit in memory, the sum over $i$ is
additive over chunks of rows, see
[inverse_harmonic_mean_correction][pydvl_datainf.formula.inverse_harmonic_mean_correction].

Sign: the library follows pyDVL, `influence = g_testᵀ R g_train` (positive for
self-influence, positive means helpful); the paper's $\mathcal{I}_{DataInf}$ is
the negative of this.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "DEFAULT_REGULARIZATION_SCALE",
    "squared_norms",
    "auto_regularization",
    "inverse_harmonic_mean_correction",
    "apply_inverse_harmonic_mean",
    "finish_inverse_harmonic_mean",
]

DEFAULT_REGULARIZATION_SCALE = 0.1
"""The paper's constant $c$ in $\\lambda_l = c \\cdot \\text{mean}_i \\|g_{il}\\|^2 / d_l$."""


def squared_norms(grads: torch.Tensor) -> torch.Tensor:
    r"""Row-wise squared Euclidean norms $\lVert g_i \rVert^2$ of an $(n, d)$ matrix."""
    return torch.linalg.vector_norm(grads, dim=1).square()


def auto_regularization(
    sum_squared_norms: float,
    n: int,
    d: int,
    scale: float = DEFAULT_REGULARIZATION_SCALE,
) -> float:
    r"""The paper's default $\lambda_l = c \cdot \frac{1}{n}\sum_i \lVert g_{il}\rVert^2 / d_l$.

    Args:
        sum_squared_norms: $\sum_i \lVert g_{il} \rVert^2$ over the training set.
        n: number of training samples.
        d: number of parameters of the block, $d_l$.
        scale: the constant $c$ (0.1 in the paper).

    Returns:
        $\lambda_l$. Zero if all gradients of the block vanish; callers must
        check positivity.

    Example:
        >>> auto_regularization(sum_squared_norms=40.0, n=4, d=10)
        0.1
    """
    if n <= 0 or d <= 0:
        raise ValueError(f"n and d must be positive, got n={n}, d={d}")
    return float(scale * (sum_squared_norms / n) / d)


def inverse_harmonic_mean_correction(
    v: torch.Tensor,
    grads: torch.Tensor,
    sq_norms: torch.Tensor,
    regularization: float,
) -> torch.Tensor:
    r"""The chunk sum $\sum_{i \in \text{chunk}} \frac{g_i^\top v}{\lambda + \lVert g_i\rVert^2} g_i$.

    Summing this over all chunks of training rows and passing the total to
    [finish_inverse_harmonic_mean][pydvl_datainf.formula.finish_inverse_harmonic_mean]
    gives $R v$; results do not depend on the chunking.

    Args:
        v: $(m, d)$ vectors to transform.
        grads: $(k, d)$ training gradients of one chunk.
        sq_norms: $(k,)$ their squared norms.
        regularization: $\lambda > 0$.

    Returns:
        $(m, d)$ tensor.
    """
    coefficients = (v @ grads.T) / (regularization + sq_norms)
    return coefficients @ grads


def finish_inverse_harmonic_mean(
    v: torch.Tensor, correction: torch.Tensor, n: int, regularization: float
) -> torch.Tensor:
    r"""$R v = (v - \text{correction} / n) / \lambda$, from the summed chunk corrections."""
    return (v - correction / n) / regularization


def apply_inverse_harmonic_mean(
    v: torch.Tensor,
    grads: torch.Tensor,
    regularization: float,
    sq_norms: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""$R V^\top$ for the rows of `v`, with $R$ built from all rows of `grads`.

    Args:
        v: $(m, d)$ vectors to transform (e.g. test gradients).
        grads: $(n, d)$ per-sample training gradients of the block.
        regularization: $\lambda_l > 0$.
        sq_norms: precomputed $\lVert g_i\rVert^2$, shape $(n,)$.

    Returns:
        $(m, d)$ tensor whose rows are $R_l v_j$.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> apply_inverse_harmonic_mean(torch.tensor([[1.0, 1.0]]), g, 1.0)
        tensor([[0.7500, 0.6000]])
    """
    if regularization <= 0:
        raise ValueError(f"regularization must be positive, got {regularization}")
    if sq_norms is None:
        sq_norms = squared_norms(grads)
    correction = inverse_harmonic_mean_correction(v, grads, sq_norms, regularization)
    return finish_inverse_harmonic_mean(v, correction, len(grads), regularization)
