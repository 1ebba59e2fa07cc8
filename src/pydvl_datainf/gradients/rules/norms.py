"""Rules for `nn.LayerNorm` and `nn.RMSNorm`."""

from __future__ import annotations

from typing import (
    Any,
    Callable,
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
    register_rule,
    to_accumulation,
    wanted,
)

__all__ = ["layer_norm_rule", "rms_norm_rule"]


def _norm_rule(
    module: Any,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]],
    out: Optional[Mapping[str, torch.Tensor]],
    normalize: Callable[[torch.Tensor, Tuple[int, ...]], torch.Tensor],
) -> Dict[str, torch.Tensor]:
    todo = wanted(module, names)
    if not todo:
        return {}
    ref = module.weight if module.weight is not None else module.bias
    x = to_accumulation(batched_input(inputs[0]), ref)
    g = to_accumulation(grad_output, ref)
    shape = tuple(module.normalized_shape)
    b = x.shape[0]
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    result: Dict[str, torch.Tensor] = {}
    if "weight" in todo:
        xhat = normalize(x, dims)
        prod = (g * xhat).reshape(b, -1, *shape)
        result["weight"] = torch.sum(prod, 1, out=out_buffer(out, "weight"))
    if "bias" in todo:
        result["bias"] = torch.sum(
            g.reshape(b, -1, *shape), 1, out=out_buffer(out, "bias")
        )
    return result


@register_rule(nn.LayerNorm)
def layer_norm_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.LayerNorm` (affine weight, optional bias).

    With $\hat{x} = (x - \mu) / \sqrt{\sigma^2 + \epsilon}$ over the normalised
    dimensions, $\nabla_\gamma \ell_i = \sum_t g_{it} \odot \hat{x}_{it}$ and
    $\nabla_\beta \ell_i = \sum_t g_{it}$.
    """
    eps = cast(nn.LayerNorm, module).eps

    def normalize(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps)

    return _norm_rule(module, inputs, grad_output, names, out, normalize)


def rms_norm_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.RMSNorm`.

    $\nabla_\gamma \ell_i = \sum_t g_{it} \odot x_{it} /
    \sqrt{\overline{x_{it}^2} + \epsilon}$.
    """
    x0 = batched_input(inputs[0])
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = torch.finfo(x0.dtype).eps

    def normalize(x: torch.Tensor, dims: Tuple[int, ...]) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)

    return _norm_rule(module, inputs, grad_output, names, out, normalize)


if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_rule(nn.RMSNorm)(rms_norm_rule)
