r"""The Johnson–Lindenstrauss bound for inner products, and how to choose $k$.

**The inequality.** Let $P \in \mathbb{R}^{k \times d}$ have i.i.d. entries
$\mathcal N(0, 1/k)$ (`"gaussian"`) or $\pm 1/\sqrt{k}$ with equal probability
(`"rademacher"`). For any fixed $x \in \mathbb{R}^d$ and $0 < \varepsilon < 1$,

$$
\Pr\Big[\big|\lVert Px\rVert^2 - \lVert x\rVert^2\big| > \varepsilon \lVert x\rVert^2\Big]
\le 2 \exp\Big(-\frac{k}{2}\Big(\frac{\varepsilon^2}{2} - \frac{\varepsilon^3}{3}\Big)\Big).
$$

For Gaussian entries $k\lVert Px\rVert^2/\lVert x\rVert^2$ is $\chi^2_k$, and each
tail is bounded by $\exp(\frac k2(1 - \beta + \ln\beta))$ at $\beta = 1 \pm
\varepsilon$ (Dasgupta and Gupta, 2003, Lemma 2.2 and its proof), which is at most
$\exp(-\frac k2(\frac{\varepsilon^2}{2} - \frac{\varepsilon^3}{3}))$. Achlioptas
(2003, Theorem 1.1 and Lemma 5.1) proves the same two tail bounds, with the same
constants, for the $\pm 1/\sqrt k$ entries.

**Inner products.** Applying the bound to $u/\lVert u\rVert + v/\lVert v\rVert$
and $u/\lVert u\rVert - v/\lVert v\rVert$ and using
$4\,u\cdot v = \lVert u+v\rVert^2 - \lVert u-v\rVert^2$ gives, for fixed $u, v$,

$$
\Pr\Big[\,|Pu \cdot Pv - u \cdot v| > \varepsilon \lVert u\rVert \lVert v\rVert\,\Big]
\le 4 \exp\Big(-\frac{k}{2}\Big(\frac{\varepsilon^2}{2} - \frac{\varepsilon^3}{3}\Big)\Big),
$$

and, by the union bound, all of $m$ fixed pairs are within $\varepsilon$ with
probability at least $1 - \delta$ as soon as

$$
k \ge \frac{2 \ln(4m/\delta)}{\varepsilon^2/2 - \varepsilon^3/3}
$$

([jl_dimension][pydvl_datainf.jl.jl_dimension];
[jl_epsilon][pydvl_datainf.jl.jl_epsilon] inverts it). How the inner-product
error carries to DataInf scores is stated in
[score_error_bound][pydvl_datainf.compressed.score_error_bound].

**What it does not cover.** The bound is for one dense projection per block.
A Kronecker projection $P_{out} \otimes P_{in}$ (for linear layers) is unbiased
too, but its entries are not independent and this bound does not apply to it;
for a rank-one gradient $u a^\top$ the relative variance of the squared norm is
$(1 + 2/k_{out})(1 + 2/k_{in}) - 1 \approx 2/k_{out} + 2/k_{in}$, against $2/k$
for a dense Gaussian projection with $k = k_{out}k_{in}$. Its error is measured,
not bounded.

References: S. Dasgupta and A. Gupta, *An elementary proof of a theorem of
Johnson and Lindenstrauss*, Random Structures & Algorithms 22(1), 2003.
D. Achlioptas, *Database-friendly random projections: Johnson–Lindenstrauss
with binary coins*, Journal of Computer and System Sciences 66(4), 2003.

Example:
    >>> jl_dimension(epsilon=0.1, delta=0.01)
    2568
    >>> round(jl_epsilon(2568, delta=0.01), 4)
    0.1
"""

from __future__ import annotations

import math

__all__ = ["jl_exponent", "jl_failure_probability", "jl_dimension", "jl_epsilon"]


def _check(epsilon: float) -> None:
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")


def jl_exponent(epsilon: float) -> float:
    r"""$\varepsilon^2/2 - \varepsilon^3/3$, the rate in the bound (increasing on $(0, 1)$)."""
    _check(epsilon)
    return epsilon**2 / 2 - epsilon**3 / 3


def jl_failure_probability(k: int, epsilon: float, pairs: int = 1) -> float:
    r"""An upper bound on the probability that some inner product of `pairs`
    fixed pairs is off by more than $\varepsilon \lVert u\rVert\lVert v\rVert$.

    $\min(1, 4m \exp(-\frac k2(\varepsilon^2/2 - \varepsilon^3/3)))$.

    Example:
        >>> jl_failure_probability(2568, 0.1) < 0.01
        True
    """
    if k <= 0 or pairs <= 0:
        raise ValueError(f"k and pairs must be positive, got {k}, {pairs}")
    return min(1.0, 4 * pairs * math.exp(-k / 2 * jl_exponent(epsilon)))


def jl_dimension(epsilon: float, delta: float, pairs: int = 1) -> int:
    r"""The smallest $k$ for which the bound guarantees an inner-product error of
    at most $\varepsilon\lVert u\rVert\lVert v\rVert$ on all of `pairs` fixed pairs
    with probability at least $1 - \delta$.

    Args:
        epsilon: the relative error, in $(0, 1)$.
        delta: the failure probability, in $(0, 1)$.
        pairs: the number of pairs of vectors (union bound).

    Example:
        >>> jl_dimension(0.1, 0.01, pairs=10**6) > jl_dimension(0.1, 0.01)
        True
    """
    if not 0 < delta < 1 or pairs <= 0:
        raise ValueError(f"delta must be in (0, 1) and pairs positive, got {delta}")
    return math.ceil(2 * math.log(4 * pairs / delta) / jl_exponent(epsilon))


def jl_epsilon(k: int, delta: float, pairs: int = 1) -> float:
    r"""The smallest $\varepsilon$ the bound guarantees for $k$ dimensions.

    Solves $4m\exp(-\frac k2(\varepsilon^2/2 - \varepsilon^3/3)) = \delta$.

    Raises:
        ValueError: if $k$ is too small for any $\varepsilon < 1$.

    Example:
        >>> round(jl_epsilon(1024, delta=0.001), 3)
        0.193
    """
    if k <= 0 or not 0 < delta < 1 or pairs <= 0:
        raise ValueError(f"need k > 0, delta in (0, 1), pairs > 0; got {k}, {delta}")
    target = 2 * math.log(4 * pairs / delta) / k
    if target >= 1 / 6:  # the rate's supremum on (0, 1)
        raise ValueError(
            f"k = {k} is too small: the bound gives no error below 1 for "
            f"delta = {delta} and {pairs} pairs; need k > {12 * math.log(4 * pairs / delta):.0f}"
        )
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid**2 / 2 - mid**3 / 3 < target:
            lo = mid
        else:
            hi = mid
    return hi
