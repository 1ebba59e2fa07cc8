"""Per-sample gradients by plain autograd, one sample at a time."""

from __future__ import annotations

from typing import Dict, List, Mapping

import torch
from torch import nn

from .engine import GradientEngine, LossFn, accumulation_dtype

__all__ = ["LoopGradientEngine"]


class LoopGradientEngine(GradientEngine):
    """Per-sample gradients by plain autograd, one sample at a time.

    Works for any model that autograd can differentiate; slow. It is the last
    resort for models that neither hooks nor `torch.func` can handle, and the
    reference in tests.

    Example:
        ```python
        import torch
        from pydvl_datainf.gradients import LoopGradientEngine

        model = torch.nn.Linear(3, 2)
        grads = LoopGradientEngine().per_sample_grads(
            model, torch.nn.functional.mse_loss, torch.randn(5, 3),
            torch.randn(5, 2), dict(model.named_parameters()),
        )
        assert grads["bias"].shape == (5, 2)
        ```
    """

    name = "loop"

    def per_sample_grads(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
    ) -> Dict[str, torch.Tensor]:
        names = list(params)
        tensors = [params[k] for k in names]
        rows: Dict[str, List[torch.Tensor]] = {k: [] for k in names}
        for i in range(len(x)):
            value = loss(model(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(value, tensors, allow_unused=True)
            for k, p, g in zip(names, tensors, grads):
                if g is None:
                    g = torch.zeros_like(p)
                rows[k].append(g.detach().reshape(-1).to(accumulation_dtype(p.dtype)))
        return {
            k: (
                torch.stack(v)
                if v
                else torch.empty(
                    0, params[k].numel(), dtype=accumulation_dtype(params[k].dtype)
                )
            )
            for k, v in rows.items()
        }
