"""Per-sample gradients of the whole model with `torch.func`."""

from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import nn

from .engine import GradientEngine, LossFn, accumulation_dtype, functional_sample_loss

__all__ = ["FuncGradientEngine"]


class FuncGradientEngine(GradientEngine):
    """Per-sample gradients with `torch.func.vmap(torch.func.grad(...))`.

    Buffers and parameters that are not differentiated are passed as constants.
    Models with data-dependent control flow (e.g. Hugging Face attention masks)
    cannot be traced by `vmap`; use
    [LoopGradientEngine][pydvl_datainf.gradients.loop.LoopGradientEngine] or the
    hook engine for those.

    Example:
        ```python
        import torch
        from pydvl_datainf.gradients import FuncGradientEngine

        model = torch.nn.Linear(3, 2)
        grads = FuncGradientEngine().per_sample_grads(
            model, torch.nn.functional.mse_loss, torch.randn(5, 3),
            torch.randn(5, 2), dict(model.named_parameters()),
        )
        assert grads["weight"].shape == (5, 6)
        ```
    """

    name = "func"

    def per_sample_grads(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
    ) -> Dict[str, torch.Tensor]:
        diff, sample_loss = functional_sample_loss(model, loss, params)
        grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(
            diff, x, y
        )
        return {
            k: g.reshape(len(x), -1).to(accumulation_dtype(params[k].dtype))
            for k, g in grads.items()
        }
