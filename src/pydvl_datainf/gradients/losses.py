r"""Per-sample losses of a batched output, as pyDVL's convention defines them.

The loss of sample $i$ is `loss(out[i:i+1], y[i:i+1])`: the user's loss on a
batch of one, whatever its reduction. Common `torch.nn.functional` losses are
evaluated in one call with `reduction="none"` (closed form), others with
`torch.func.vmap` when possible, otherwise in a loop.

Example:
    ```python
    import torch
    import torch.nn.functional as F
    from pydvl_datainf.gradients.losses import per_sample_losses

    out, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    values = per_sample_losses(F.cross_entropy, out, y)
    assert values.shape == (4,)
    ```
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from .engine import LossFn

__all__ = ["closed_form_losses", "per_sample_losses", "slice_batch"]

logger = logging.getLogger(__name__)


def slice_batch(out: Any, i: int, batch: int) -> Any:
    """`out[i:i+1]` for every tensor leaf of `out` with the batch in dim 0."""

    def cut(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch:
            return t[i : i + 1]
        return t

    return tree_map(cut, out)


_CLASS_LOSSES = (F.cross_entropy, F.nll_loss)
_ELEMENT_LOSSES = (
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.binary_cross_entropy_with_logits,
    F.binary_cross_entropy,
)


def closed_form_losses(
    loss: LossFn, out: Any, y: torch.Tensor
) -> Optional[torch.Tensor]:
    """The per-sample losses of common `torch.nn.functional` losses (called with
    their defaults) in one call, in the cases where `reduction="none"` gives
    exactly the batch-of-one values; `None` otherwise."""
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or len(out) != len(y):
        return None
    if loss in _CLASS_LOSSES:
        if out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
            if bool((y == -100).any()):  # ignored target: a batch of one is NaN
                return None
            return loss(out, y, reduction="none")
        return None
    if loss in _ELEMENT_LOSSES and out.shape == y.shape:
        return loss(out, y, reduction="none").reshape(len(y), -1).mean(1)
    return None


def per_sample_losses(
    loss: LossFn, out: Any, y: torch.Tensor, vectorize: bool = True
) -> torch.Tensor:
    """The losses $\\ell_i = $ `loss(out[i:i+1], y[i:i+1])`, as a vector.

    Common losses of `torch.nn.functional` with their default arguments
    (`cross_entropy` and `nll_loss` on class indices; `mse_loss`, `l1_loss`,
    `smooth_l1_loss`, `huber_loss` and the binary cross-entropies on targets of
    the output's shape) are evaluated in one call with `reduction="none"`,
    which gives the same values.

    Args:
        loss: the user's loss, applied to batches of one.
        out: the batched model output (a tensor or a pytree of tensors).
        y: the batched targets.
        vectorize: try `torch.func.vmap` over the loss first; on any failure
            fall back to a Python loop.

    Returns:
        A tensor of shape `(len(y),)`, differentiable with respect to `out`.
    """
    batch = len(y)
    closed = closed_form_losses(loss, out, y)
    if closed is not None:
        return closed
    if vectorize:
        try:

            def one(o: Any, t: torch.Tensor) -> torch.Tensor:
                return loss(tree_map(lambda u: u.unsqueeze(0), o), t.unsqueeze(0))

            values = torch.func.vmap(one)(out, y)
            if values.shape == (batch,):
                return values
            logger.debug("vmap over the loss gave shape %s", tuple(values.shape))
        except Exception as e:  # noqa: BLE001 - any failure means: loop instead
            logger.debug("vmap over the loss failed (%s); looping", e)
    return torch.stack(
        [
            loss(slice_batch(out, i, batch), y[i : i + 1]).reshape(())
            for i in range(batch)
        ]
    )
