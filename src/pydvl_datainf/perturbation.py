r"""Perturbation-mode influences: gradients with respect to the training inputs.

In `InfluenceMode.Perturbation` the influence of training sample $(x_i, y_i)$ on
test point $j$ is the gradient with respect to $x_i$ of the up-weighting
influence,

$$
\nabla_{x_i}\left( f_j^\top \nabla_\theta \ell(y_i, f_\theta(x_i)) \right),
\qquad f_j = R\, \nabla_\theta \ell(y_j^{test}, f_\theta(x_j^{test})),
$$

an array of shape `(n_test, n_train, *x.shape[1:])`. For block $l$ only the
block's part of $f_j$ and of the gradient enters; the full value is the sum over
blocks. Unlike pyDVL 0.10, the test and train sides are never swapped, so any
chunk sizes work.

The computation uses `torch.func` (`vmap` over training samples of `jacrev`
of the per-sample scores), with a plain autograd loop as fallback for models
that `vmap` cannot trace.
"""

from __future__ import annotations

import logging
from typing import Dict, Mapping

import torch
from torch import nn

from .blocks import BlockStructure
from .gradients import LossFn, functional_sample_loss

__all__ = ["perturbation_influences_by_block"]

logger = logging.getLogger(__name__)


def _check_inputs(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(
            f"Perturbation mode differentiates with respect to the inputs x, which "
            f"must be floating point; got dtype {x.dtype}. For token ids, use "
            f"InfluenceMode.Up."
        )


def _with_func(
    model: nn.Module,
    loss: LossFn,
    params: Mapping[str, nn.Parameter],
    blocks: BlockStructure,
    factors: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    diff, sample_loss = functional_sample_loss(model, loss, params)

    def scores(xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        g = torch.func.grad(sample_loss)(diff, xi, yi)
        per_block = []
        for b in blocks:
            flat = torch.cat([g[p].reshape(-1) for p in b.params])
            per_block.append(factors[b.name].to(flat.dtype) @ flat)
        return torch.stack(per_block)  # (L, m)

    return torch.func.vmap(torch.func.jacrev(scores), in_dims=(0, 0))(x, y)


def _with_loop(
    model: nn.Module,
    loss: LossFn,
    params: Mapping[str, nn.Parameter],
    blocks: BlockStructure,
    factors: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    names = list(params)
    m = len(next(iter(factors.values())))
    out = torch.zeros(len(x), len(blocks), m, *x.shape[1:], dtype=x.dtype)
    for i in range(len(x)):
        xi = x[i : i + 1].detach().clone().requires_grad_(True)
        value = loss(model(xi), y[i : i + 1])
        grads = dict(
            zip(
                names,
                torch.autograd.grad(
                    value, [params[k] for k in names], create_graph=True
                ),
            )
        )
        for li, b in enumerate(blocks):
            flat = torch.cat([grads[p].reshape(-1) for p in b.params])
            s = factors[b.name].to(flat.dtype) @ flat
            for j in range(m):
                (gx,) = torch.autograd.grad(s[j], xi, retain_graph=True)
                out[i, li, j] = gx[0]
    return out


def perturbation_influences_by_block(
    model: nn.Module,
    loss: LossFn,
    params: Mapping[str, nn.Parameter],
    blocks: BlockStructure,
    factors: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """Perturbation influences of test factors on training inputs, per block.

    Args:
        model: the model, in the mode (eval) the caller wants.
        loss: the per-sample loss.
        params: the parameters of all blocks.
        blocks: the block structure.
        factors: `(m, d_l)` test factors $R_l g^{test}$ per block.
        x: `(n, ...)` floating point training inputs.
        y: `(n, ...)` training targets.

    Returns:
        For each block, a tensor of shape `(m, n, *x.shape[1:])`.
    """
    _check_inputs(x)
    try:
        jac = _with_func(model, loss, params, blocks, factors, x, y)
    except Exception as e:  # vmap cannot trace data-dependent control flow
        logger.info("torch.func failed in Perturbation mode (%s); using a loop", e)
        jac = _with_loop(model, loss, params, blocks, factors, x, y)
    # jac: (n, L, m, *xs) -> per block (m, n, *xs)
    return {b.name: jac[:, li].transpose(0, 1) for li, b in enumerate(blocks)}
