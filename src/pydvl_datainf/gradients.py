r"""Per-sample gradient engines.

DataInf needs, for every sample $i$ and every block $l$, the gradient
$g_{il} = \nabla_{\theta_l} \ell(y_i, f_\theta(x_i))$ of the loss of that sample
*alone*. This follows pyDVL's convention: the per-sample loss is
`loss(model(x[i:i+1]), y[i:i+1])` with the user's loss function, whatever its
reduction, so that results do not depend on how samples are batched.

An engine is a small object with one method, [GradientEngine.per_sample_grads][],
so that a faster engine can replace another without touching the maths:

* [FuncGradientEngine][pydvl_datainf.gradients.FuncGradientEngine]: `torch.func`
  (`vmap(grad(...))`), general but it cannot trace data-dependent control flow
  (e.g. Hugging Face attention masks).
* [LoopGradientEngine][pydvl_datainf.gradients.LoopGradientEngine]: plain autograd,
  one sample at a time. Slow, works for every model; also the reference in tests.

Engines return float32 (or float64 for float64 parameters) gradients, flattened
per parameter, so that half-precision models accumulate in float32.

Example:
    ```python
    import torch
    from pydvl_datainf.gradients import get_engine

    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    engine = get_engine("func")
    grads = engine.per_sample_grads(
        model, torch.nn.functional.mse_loss, torch.randn(5, 3), torch.randn(5, 2), params
    )
    grads["weight"].shape  # (5, 6)
    ```
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Mapping, Tuple, Union

import torch
from torch import nn

__all__ = [
    "LossFn",
    "GradientEngine",
    "FuncGradientEngine",
    "LoopGradientEngine",
    "accumulation_dtype",
    "get_engine",
    "register_engine",
]

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A loss `loss(prediction, target) -> scalar`, as pyDVL's models take it."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which gradients of parameters of `dtype` are returned.

    Half precision (float16, bfloat16) is promoted to float32; float32 and
    float64 are kept.
    """
    return torch.promote_types(dtype, torch.float32)


class GradientEngine(ABC):
    """Computes per-sample gradients of a loss with respect to some parameters."""

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
            [accumulation_dtype][pydvl_datainf.gradients.accumulation_dtype] of the
            parameter, detached.
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def functional_sample_loss(
    model: nn.Module, loss: LossFn, params: Mapping[str, nn.Parameter]
) -> Tuple[
    Dict[str, torch.Tensor],
    Callable[[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor],
]:
    """The loss of one sample as a pure function of `params`, for `torch.func`.

    Returns:
        The detached `params`, and `sample_loss(params, x_i, y_i)` evaluating
        `loss(model(x_i[None]), y_i[None])` with every other parameter and
        buffer held constant.
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


class FuncGradientEngine(GradientEngine):
    """Per-sample gradients with `torch.func.vmap(torch.func.grad(...))`.

    Buffers and parameters that are not differentiated are passed as constants.
    Models with data-dependent control flow cannot be traced by `vmap`; use
    [LoopGradientEngine][pydvl_datainf.gradients.LoopGradientEngine] or the hook
    engine for those.
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


class LoopGradientEngine(GradientEngine):
    """Per-sample gradients by plain autograd, one sample at a time.

    Works for any model that autograd can differentiate; slow. It is the
    fallback for models that neither `torch.func` nor hooks can handle.
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
        rows: Dict[str, list] = {k: [] for k in names}
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


_ENGINES: Dict[str, Callable[[], GradientEngine]] = {
    FuncGradientEngine.name: FuncGradientEngine,
    LoopGradientEngine.name: LoopGradientEngine,
}
_DEFAULT_ENGINE = "func"


def register_engine(
    name: str, factory: Callable[[], GradientEngine], default: bool = False
) -> None:
    """Make an engine available by name to [get_engine][pydvl_datainf.gradients.get_engine].

    Args:
        name: the name users pass as `engine=`.
        factory: a callable returning a new engine.
        default: whether `"auto"` resolves to this engine.
    """
    global _DEFAULT_ENGINE
    _ENGINES[name] = factory
    if default:
        _DEFAULT_ENGINE = name


def get_engine(engine: Union[str, GradientEngine] = "auto") -> GradientEngine:
    """An engine instance from a name (`"auto"`, `"func"`, `"loop"`, ...) or itself.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if isinstance(engine, GradientEngine):
        return engine
    name = _DEFAULT_ENGINE if engine == "auto" else engine
    try:
        return _ENGINES[name]()
    except KeyError:
        raise ValueError(
            f"Unknown gradient engine {engine!r}; known engines: "
            f"{sorted(['auto', *_ENGINES])}"
        ) from None
