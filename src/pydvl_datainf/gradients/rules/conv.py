"""Rules for `nn.Conv1d` and `nn.Conv2d` (patches by `unfold`)."""

from __future__ import annotations

from typing import (
    Any,
    Collection,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import torch
import torch.nn.functional as F
from torch import nn

from .registry import (
    batched_input,
    out_buffer,
    register_rule,
    to_accumulation,
    wanted,
)

__all__ = ["conv1d_rule", "conv2d_rule"]


def _explicit_padding(module: Any, n_spatial: int) -> List[Tuple[int, int]]:
    """(left, right) padding for each spatial dimension of a convolution."""
    padding = module.padding
    dilation = module.dilation
    kernel = module.kernel_size
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * n_spatial
        pads = []
        for d, k in zip(dilation, kernel):
            total = d * (k - 1)
            left = total // 2
            pads.append((left, total - left))
        return pads
    return [(p, p) for p in padding]


def _conv_rule(
    module: Any,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]],
    out: Optional[Mapping[str, torch.Tensor]],
    n_spatial: int,
) -> Dict[str, torch.Tensor]:
    todo = wanted(module, names)
    if not todo:
        return {}
    weight = module.weight
    x = to_accumulation(batched_input(inputs[0]), weight)
    g = to_accumulation(grad_output, weight)
    if x.dim() != n_spatial + 2:
        raise ValueError(
            f"the conv rule needs batched inputs of rank {n_spatial + 2}, "
            f"got shape {tuple(x.shape)}"
        )
    b = x.shape[0]
    result: Dict[str, torch.Tensor] = {}
    if "bias" in todo:
        result["bias"] = torch.sum(
            g.reshape(b, g.shape[1], -1), -1, out=out_buffer(out, "bias")
        )
    if "weight" not in todo:
        return result

    pads = _explicit_padding(module, n_spatial)
    if module.padding_mode != "zeros":
        # as in nn.Conv*d: pad with the mode, then convolve without padding
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        pads = [(0, 0)] * n_spatial
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        x = F.pad(x, flat)

    kernel = tuple(module.kernel_size)
    stride = tuple(module.stride)
    dilation = tuple(module.dilation)
    if n_spatial == 1:  # view a 1-d convolution as a 2-d one of height 1
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    # columns: (B, C_in * prod(kernel), L), channel-major as the weight layout
    cols = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)
    groups = module.groups
    c_out = weight.shape[0]
    cols = cols.reshape(b, groups, -1, cols.shape[-1])
    gg = g.reshape(b, groups, c_out // groups, -1)
    if gg.shape[-1] != cols.shape[-1]:
        raise ValueError(
            f"conv rule: {gg.shape[-1]} output positions but {cols.shape[-1]} "
            "patches; unsupported padding or input"
        )
    dst = out_buffer(out, "weight")
    gw = torch.matmul(
        gg,
        cols.transpose(-1, -2),
        out=None if dst is None else dst.view(b, groups, c_out // groups, -1),
    )
    result["weight"] = gw.view(b, *weight.shape)
    return result


@register_rule(nn.Conv1d)
def conv1d_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.Conv1d` for inputs `(B, C, L)`.

    The input is unfolded into patches $u_{il}$ (one per output position $l$),
    so that $\nabla_W \ell_i = \sum_l g_{il} u_{il}^\top$ group by group.
    """
    return _conv_rule(module, inputs, grad_output, names, out, 1)


@register_rule(nn.Conv2d)
def conv2d_rule(
    module: nn.Module,
    inputs: Sequence[Any],
    grad_output: torch.Tensor,
    names: Optional[Collection[str]] = None,
    out: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    r"""Per-sample gradients of `nn.Conv2d` for inputs `(B, C, H, W)`.

    As [conv1d_rule][pydvl_datainf.gradients.rules.conv.conv1d_rule], with patches
    extracted by `torch.nn.functional.unfold`.
    """
    return _conv_rule(module, inputs, grad_output, names, out, 2)
