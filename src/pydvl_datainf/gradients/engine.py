r"""The engine interface: per-sample gradients of a loss.

DataInf needs, for every sample $i$ and every block $l$, the gradient
$g_{il} = \nabla_{\theta_l} \ell(y_i, f_\theta(x_i))$ of the loss of that sample
*alone*. This follows pyDVL's convention: the per-sample loss is
`loss(model(x[i:i+1]), y[i:i+1])` with the user's loss function, whatever its
reduction, so that results do not depend on how samples are batched.

Engines return float32 (or float64 for float64 parameters) gradients, flattened
per parameter, so that half-precision models accumulate in float32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
from torch import nn

from ..projection import ProjectedGrads, Projection, project_rows

__all__ = [
    "LossFn",
    "GradientEngine",
    "accumulation_dtype",
    "check_projections",
    "functional_sample_loss",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A loss `loss(prediction, target) -> scalar`, as pyDVL's models take it."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which gradients of parameters of `dtype` are returned.

    Half precision (float16, bfloat16) is promoted to float32; float32 and
    float64 are kept.

    Example:
        ```python
        import torch
        from pydvl_datainf.gradients import accumulation_dtype

        assert accumulation_dtype(torch.bfloat16) == torch.float32
        assert accumulation_dtype(torch.float64) == torch.float64
        ```
    """
    return torch.promote_types(dtype, torch.float32)


class GradientEngine(ABC):
    """Computes per-sample gradients of a loss with respect to some parameters.

    Subclasses implement `per_sample_grads`; `fit` calls
    `per_sample_grads_factored`, which an engine may override to keep some
    gradients as rank-one factors.

    Example:
        ```python
        import torch
        from pydvl_datainf.gradients import GradientEngine, LoopGradientEngine

        assert isinstance(LoopGradientEngine(), GradientEngine)
        ```
    """

    name: str = "abstract"

    @abstractmethod
    def per_sample_grads(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
    ) -> Dict[str, torch.Tensor]:
        """Per-sample gradients of `loss(model(x_i), y_i)`.

        Args:
            model: the model; its parameters named in `params` are differentiated.
            loss: the loss, applied to each sample alone (batch of one).
            x: inputs, first dimension is the batch.
            y: targets, first dimension is the batch.
            params: the parameters to differentiate, by their name in
                `model.named_parameters()`.

        Returns:
            For each name in `params`, a tensor of shape `(len(x), p.numel())` in
            [accumulation_dtype][pydvl_datainf.gradients.engine.accumulation_dtype]
            of the parameter, detached.
        """

    def per_sample_grads_factored(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
    ) -> Dict[str, Any]:
        """Per-sample gradients, where an engine may keep some rank-one factored.

        Values are dense tensors as from `per_sample_grads`, or
        [FactoredGrads][pydvl_datainf.factored.FactoredGrads] standing for them.
        `fit` calls this to cache compact gradients. The default returns
        `per_sample_grads`; the hooks engine factors linear layers without a
        token dimension.
        """
        return dict(self.per_sample_grads(model, loss, x, y, params))

    def per_sample_grads_projected(
        self,
        model: nn.Module,
        loss: LossFn,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Mapping[str, nn.Parameter],
        projections: Mapping[str, Projection],
    ) -> Dict[str, ProjectedGrads]:
        r"""Projected per-sample gradients with their exact squared norms.

        Every parameter needs a projection (an `"identity"` one keeps it as
        it is). The default projects the rows of `per_sample_grads_factored`
        (factored rows side by side); the hook engine projects linear layers
        with a token dimension from their per-token factors, without forming
        any per-sample weight gradient.

        Args:
            model: the model.
            loss: the loss, applied to each sample alone.
            x: inputs.
            y: targets.
            params: the parameters to differentiate, by name.
            projections: a projection of `p.numel()` columns per parameter.

        Returns:
            For each name in `params`, a
            [ProjectedGrads][pydvl_datainf.projection.ProjectedGrads]: the
            projected rows and $\lVert g_i\rVert^2$ of the unprojected ones.
        """
        check_projections(params, projections)
        grads = self.per_sample_grads_factored(model, loss, x, y, params)
        return {k: project_rows(projections[k], grads[k]) for k in params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_projections(
    params: Mapping[str, torch.Tensor], projections: Mapping[str, Projection]
) -> None:
    """Raises a `ValueError` unless every parameter has a projection of its size.

    Example:
        ```python
        import torch
        from pydvl_datainf.gradients import check_projections
        from pydvl_datainf.projection import Projection, dense_spec

        w = torch.zeros(3, 4)
        check_projections({"w": w}, {"w": Projection(dense_spec(12, 5))})
        ```
    """
    missing = [k for k in params if k not in projections]
    if missing:
        raise ValueError(f"no projection for the parameters {missing}")
    wrong = {
        k: (projections[k].dim, p.numel())
        for k, p in params.items()
        if projections[k].dim != p.numel()
    }
    if wrong:
        raise ValueError(
            "projections of the wrong size (projection columns, parameter size): "
            f"{wrong}"
        )


def functional_sample_loss(
    model: nn.Module, loss: LossFn, params: Mapping[str, nn.Parameter]
) -> Tuple[
    Dict[str, torch.Tensor],
    Callable[[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor],
]:
    """The loss of one sample as a pure function of `params`, for `torch.func`.

    Args:
        model: the model.
        loss: the loss, applied to a batch of one.
        params: the parameters to differentiate, by name.

    Returns:
        The detached `params`, and `sample_loss(params, x_i, y_i)` evaluating
        `loss(model(x_i[None]), y_i[None])` with every other parameter and
        buffer held constant.

    Example:
        ```python
        import torch
        from pydvl_datainf.gradients import functional_sample_loss

        model = torch.nn.Linear(3, 1)
        params, f = functional_sample_loss(
            model, torch.nn.functional.mse_loss, dict(model.named_parameters())
        )
        value = f(params, torch.randn(3), torch.randn(1))
        assert value.shape == ()
        ```
    """
    diff = {k: p.detach() for k, p in params.items()}
    const = {
        k: v.detach()
        for k, v in list(model.named_parameters()) + list(model.named_buffers())
        if k not in diff
    }

    def sample_loss(
        d: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> torch.Tensor:
        out = torch.func.functional_call(
            model, {**const, **d}, (xi.unsqueeze(0),), strict=False
        )
        return loss(out, yi.unsqueeze(0))

    return diff, sample_loss
