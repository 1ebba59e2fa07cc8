r"""Per-sample gradient engines.

DataInf needs, for every sample $i$ and every block $l$, the gradient
$g_{il} = \nabla_{\theta_l} \ell(y_i, f_\theta(x_i))$ of the loss of that sample
*alone*. This follows pyDVL's convention: the per-sample loss is
`loss(model(x[i:i+1]), y[i:i+1])` with the user's loss function, whatever its
reduction, so that results do not depend on how samples are batched.

An engine is a small object with one method,
[per_sample_grads][pydvl_datainf.gradients.engine.GradientEngine.per_sample_grads],
so that a faster engine can replace another without touching the maths:

* [HookGradientEngine][pydvl_datainf.gradients.hooks.engine.HookGradientEngine]
  (`"hooks"`, the default that `"auto"` resolves to): one batched forward and
  backward with per-layer [rules][pydvl_datainf.gradients.rules], and a
  module-local fallback for layers without a rule;
* [FuncGradientEngine][pydvl_datainf.gradients.func.FuncGradientEngine]
  (`"func"`): `torch.func` (`vmap(grad(...))`) over the whole model, general
  but it cannot trace data-dependent control flow (e.g. Hugging Face attention
  masks);
* [LoopGradientEngine][pydvl_datainf.gradients.loop.LoopGradientEngine]
  (`"loop"`): plain autograd, one sample at a time. Slow, works for every
  model; also the reference in tests.

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
    assert grads["weight"].shape == (5, 6)
    ```
"""

from __future__ import annotations

from .engine import (
    GradientEngine,
    LossFn,
    accumulation_dtype,
    check_projections,
    functional_sample_loss,
)
from .func import FuncGradientEngine
from .hooks import GradientFallbackWarning, HookedModule, HookGradientEngine, HookPlan
from .loop import LoopGradientEngine
from .registry import DEFAULT_ENGINE, get_engine, register_engine

__all__ = [
    "DEFAULT_ENGINE",
    "FuncGradientEngine",
    "GradientEngine",
    "GradientFallbackWarning",
    "HookGradientEngine",
    "HookPlan",
    "HookedModule",
    "LoopGradientEngine",
    "LossFn",
    "accumulation_dtype",
    "check_projections",
    "functional_sample_loss",
    "get_engine",
    "register_engine",
]
