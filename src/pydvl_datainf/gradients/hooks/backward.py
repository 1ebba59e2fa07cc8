"""The one batched backward, to the captured module outputs, and its check."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ..engine import LossFn
from ..losses import per_sample_losses

__all__ = ["check_sum", "output_gradients"]


def output_gradients(
    loss: LossFn,
    out: Any,
    y: torch.Tensor,
    edges: Sequence[GradientEdge],
    checked: Sequence[torch.Tensor],
    vectorize: bool,
) -> List[Optional[torch.Tensor]]:
    """Gradients of the summed per-sample losses w.r.t. `edges` and `checked`.

    Never with respect to the parameters themselves (no `.grad` is populated),
    except the `checked` ones, whose batch gradients `validate` compares.

    Args:
        loss: the user's loss, applied to batches of one.
        out: the batched model output.
        y: the batched targets.
        edges: the autograd edges of the captured module outputs.
        checked: parameters whose batch gradient is also wanted.
        vectorize: try `torch.func.vmap` over the loss.

    Returns:
        One gradient (or `None` where none reaches) per edge, then per checked
        parameter.
    """
    with torch.enable_grad():
        total = per_sample_losses(loss, out, y, vectorize).sum()
    if not edges or not total.requires_grad:
        return [None] * (len(edges) + len(checked))
    targets = [*edges, *(get_gradient_edge(p) for p in checked)]
    return list(torch.autograd.grad(total, targets, allow_unused=True))


def check_sum(
    name: str, p: torch.Tensor, per_sample: torch.Tensor, g: Optional[torch.Tensor]
) -> None:
    """Raises if the summed per-sample gradients differ from the batch one.

    The error is measured relative to the sum of the per-sample magnitudes,
    the scale of rounding errors even when the per-sample gradients cancel.

    Raises:
        RuntimeError: naming the parameter.
    """
    dtype = per_sample.dtype
    total = per_sample.sum(0)
    ref = torch.zeros_like(total) if g is None else g.detach().reshape(-1).to(dtype)
    scale = per_sample.abs().sum(0).norm().item()
    tol = {torch.float64: 1e-8, torch.float32: 1e-3}.get(p.dtype, 5e-2)
    diff = (total - ref).norm().item()
    if diff > tol * scale + torch.finfo(dtype).tiny:
        raise RuntimeError(
            f"per-sample gradients of {name!r} do not sum to the batch gradient "
            f"(error {diff:.2e}, scale {scale:.2e}); is the parameter used "
            "outside its module's forward?"
        )
