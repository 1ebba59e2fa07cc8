"""Rules for `nn.Linear`: dense per-sample gradients and rank-one factors."""

from __future__ import annotations

from typing import (
    Any,
    Collection,
    Dict,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    cast,
)

import torch
from torch import nn

from .registry import (
    batched_input,
    out_buffer,
    register_factor_rule,
    register_rule,
    register_token_factor_rule,
    to_accumulation,
    wanted,
)

__all__ = ["linear_factors", "linear_rule", "linear_token_factors"]

_SMALL_OUTER = 2048


@register_rule(nn.Linear)
def linear_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.Linear` for inputs `(B, ..., in_features)`.

    $\nabla_W \ell_i = \sum_t g_{it} a_{it}^\top$ and
    $\nabla_b \ell_i = \sum_t g_{it}$, where $t$ runs over all the middle
    dimensions (tokens, positions...).
    """
    todo = wanted(module, names)
    if not todo:
        return {}
    weight = cast(nn.Linear, module).weight
    a = to_accumulation(batched_input(inputs[0]), weight)
    g = to_accumulation(grad_output, weight)
    if a.dim() < 2:
        raise ValueError("the linear rule needs batched inputs (B, ..., in)")
    b = a.shape[0]
    g = g.reshape(b, -1, g.shape[-1])
    result: Dict[str, torch.Tensor] = {}
    if "weight" in todo:
        a = a.reshape(b, -1, a.shape[-1])
        dst = out_buffer(out, "weight")
        if a.shape[1] == 1 and a.shape[-1] * g.shape[-1] <= _SMALL_OUTER:
            # one token, small matrix: a broadcast product beats a batched matmul
            result["weight"] = torch.mul(g[:, 0, :, None], a[:, 0, None, :], out=dst)
        else:
            result["weight"] = torch.bmm(g.transpose(1, 2), a, out=dst)
    if "bias" in todo:
        result["bias"] = torch.sum(g, 1, out=out_buffer(out, "bias"))
    return result


@register_factor_rule(nn.Linear)
def linear_factors(
    module: nn.Module, inputs: Sequence[Any], grad_output: torch.Tensor
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    r"""$(g_i, a_i)$ for a linear layer that sees one input vector per sample.

    Declines (returns `None`) inputs with token dimensions of length other than
    one, and layers too small to gain from factors ($p q \le p + q$).
    """
    weight = cast(nn.Linear, module).weight
    a = batched_input(inputs[0])
    if a.dim() < 2 or a[0].numel() != a.shape[-1]:
        return None
    p, q = weight.shape
    if p * q <= p + q or grad_output.shape[0] != a.shape[0]:
        return None
    b = a.shape[0]
    left = to_accumulation(grad_output, weight).reshape(b, p)
    right = to_accumulation(a, weight).reshape(b, q)
    return left, right


@register_token_factor_rule(nn.Linear)
def linear_token_factors(
    module: nn.Module, inputs: Sequence[Any], grad_output: torch.Tensor
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    r"""$(\delta_{it}, a_{it})$ of shapes $(B, T, p)$ and $(B, T, q)$, $T$ the
    product of the middle dimensions (tokens, positions...; 1 if none), so that
    $\nabla_W \ell_i = \sum_t \delta_{it} a_{it}^\top$.

    Views of the layer's input and output gradient, in the accumulation dtype.
    """
    weight = cast(nn.Linear, module).weight
    a = batched_input(inputs[0])
    if a.dim() < 2 or grad_output.dim() < 2 or grad_output.shape[0] != a.shape[0]:
        return None
    p, q = weight.shape
    b = a.shape[0]
    left = to_accumulation(grad_output, weight).reshape(b, -1, p)
    right = to_accumulation(a, weight).reshape(b, -1, q)
    if left.shape[1] != right.shape[1]:
        return None
    return left, right
