r"""The module-local fallback: per-sample gradients of one module by `vmap`.

For a module without a rule, the hook engine captures its inputs $a_i$ and the
gradient $g_i = \partial L / \partial z_i$ of its output in the one batched
pass. Since $\partial L / \partial z_i = \partial \ell_i / \partial z_i$ when
samples do not interact, the per-sample gradient of the module's own
parameters $\theta_m$ is the vector-Jacobian product

$$
\nabla_{\theta_m} \ell_i = \Big(\frac{\partial z_i}{\partial \theta_m}\Big)^\top g_i
= \nabla_{\theta_m} \big\langle f_m(\theta_m; a_i), g_i \big\rangle ,
$$

which `torch.func.vmap(torch.func.grad(...))` computes for all samples at
once, running only this module's `forward` again (on a batch of one per
sample, as in pyDVL's convention), with every other parameter and buffer of
the module held constant.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, List, Optional, Tuple

import torch
from torch import nn

from .capture import Call

__all__ = ["local_per_sample_grads"]


def _batched(a: Any, batch: int) -> bool:
    return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch


def _widening(
    module: nn.Module, diff: Dict[str, torch.Tensor]
) -> Optional[torch.dtype]:
    """float32 if a differentiated parameter is half precision, else `None`."""
    dtypes = {p.dtype for p in diff.values()}
    if dtypes & {torch.float16, torch.bfloat16}:
        return torch.float32
    return None


def _widen(a: Any, dtype: torch.dtype) -> Any:
    """Half-precision floating tensors in `dtype`; anything else unchanged."""
    if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16):
        return a.to(dtype)
    return a


def local_per_sample_grads(
    module: nn.Module,
    call: Call,
    grad_output: torch.Tensor,
    names: Collection[str],
    batch: int,
) -> Dict[str, torch.Tensor]:
    """Per-sample gradients of one call of `module` w.r.t. its own parameters.

    Args:
        module: the module.
        call: its captured call (inputs batch first).
        grad_output: the gradient of the summed loss w.r.t. its output.
        names: local names of the module's own parameters to differentiate.
        batch: the batch size.

    Returns:
        Per-sample gradients by local name, each `(batch, *param.shape)` in
        the parameter's dtype, or in float32 for half-precision parameters:
        the module is then re-run in float32 (its parameters, buffers,
        inputs and output gradient widened), so that the per-sample products
        and their sums over tokens are accumulated in float32.

    Raises:
        ValueError: if no input carries the batch in dimension 0.
        Exception: whatever `torch.func` raises on a module it cannot trace
            (e.g. data-dependent control flow); the engine then uses its
            whole-model fallback.
    """
    arg_pos = [i for i, a in enumerate(call.args) if _batched(a, batch)]
    kw_keys = [k for k, v in call.kwargs.items() if _batched(v, batch)]
    if not arg_pos and not kw_keys:
        raise ValueError("no input of the module has the batch in dimension 0")
    own = dict(module.named_parameters(recurse=False))
    diff = {n: own[n].detach() for n in names}
    wide = _widening(module, diff)
    const: Dict[str, torch.Tensor] = {}
    if wide is not None:  # half precision: differentiate in float32
        diff = {n: p.to(wide) for n, p in diff.items()}
        const = {
            k: _widen(v, wide)
            for k, v in [*module.named_parameters(), *module.named_buffers()]
            if k not in diff
        }
        grad_output = grad_output.to(wide)

    def sample_dot(
        d: Dict[str, torch.Tensor],
        b_args: Tuple[torch.Tensor, ...],
        b_kwargs: Tuple[torch.Tensor, ...],
        g: torch.Tensor,
    ) -> torch.Tensor:
        args: List[Any] = list(call.args)
        for i, t in zip(arg_pos, b_args):
            args[i] = t.unsqueeze(0)
        kwargs = dict(call.kwargs)
        for k, t in zip(kw_keys, b_kwargs):
            kwargs[k] = t.unsqueeze(0)
        if wide is not None:
            args = [_widen(a, wide) for a in args]
            kwargs = {k: _widen(v, wide) for k, v in kwargs.items()}
        out = torch.func.functional_call(
            module, {**const, **d}, tuple(args), kwargs, strict=False
        )
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the module returned {type(out).__name__}")
        return torch.sum(out.reshape(g.shape) * g)

    b_args = tuple(call.args[i] for i in arg_pos)
    b_kwargs = tuple(call.kwargs[k] for k in kw_keys)
    with torch.no_grad():
        return torch.func.vmap(torch.func.grad(sample_dot), in_dims=(None, 0, 0, 0))(
            diff, b_args, b_kwargs, grad_output
        )
