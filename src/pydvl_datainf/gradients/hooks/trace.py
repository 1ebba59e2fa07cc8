r"""Tracing the linear uses of a module's own parameters, in the batched pass.

Most layers without a rule use their parameters through linear maps: loralib's
`x @ lora_A.T @ lora_B.T`, `F.linear(x, weight, bias)`, `x @ W`. For such a
use $z = a P^\top$ (or $z = a P$), the per-sample gradient is the same as for
`nn.Linear`, $\sum_t g_{it} a_{it}^\top$, from the input $a$ of the operation
and the gradient $g$ of its output: no forward needs to run again, and a use on
one vector per sample gives rank-one factors.

While a module without a rule runs its forward, a `TorchFunctionMode` records
every operation that touches one of its requested parameters. If each of them
is a recognised linear use (or a transpose feeding one), the call is *traced*
and its gradients come from the recorded uses; otherwise the module-local
`vmap` fallback re-runs the module for that call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["LinearUse", "Tracer", "use_grads"]

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm}
_MATMUL_NAMES = {"matmul", "__matmul__", "mm"}


@dataclass
class LinearUse:
    """One linear use of a parameter in a traced call.

    Attributes:
        local: the parameter's local name in its module.
        form: `"t"` for $z = a P^\\top$ (as `F.linear`), `"n"` for $z = a P$,
            `"bias"` for the bias of `F.linear`.
        input: the operation's input $a$, detached (`None` for a bias).
        version: its version counter at the call.
        edge: the autograd edge of the operation's output.
    """

    local: str
    form: str
    input: Optional[torch.Tensor]
    version: int
    edge: GradientEdge


class Tracer(TorchFunctionMode):
    """Records the linear uses of `params` (local name -> tensor) in a forward.

    Args:
        params: the module's requested parameters by local name.

    Attributes:
        uses: the recognised uses.
        ok: `False` once a parameter was used in any other way.
    """

    def __init__(self, params: Dict[str, torch.Tensor]):
        super().__init__()
        self.params = params
        self.uses: List[LinearUse] = []
        self.ok = True
        self._ids = {id(p): n for n, p in self.params.items()}
        self._transposed: Dict[int, str] = {}  # id of a P.T view -> local name
        self._views: List[torch.Tensor] = []  # kept alive: ids stay unique

    def _which(self, t: Any) -> Tuple[Optional[str], bool]:
        """(local name, transposed) of a tracked tensor, else (None, False)."""
        if not isinstance(t, torch.Tensor):
            return None, False
        if id(t) in self._ids:
            return self._ids[id(t)], False
        if id(t) in self._transposed:
            return self._transposed[id(t)], True
        return None, False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.ok:
            return result
        leaves, _ = tree_flatten((args, kwargs))
        touched = [self._which(t) for t in leaves]
        if not any(n is not None for n, _ in touched):
            return result
        if not isinstance(result, torch.Tensor):
            return result  # a shape, a dtype...: no data flows
        if not self._record(func, args, kwargs, result):
            self.ok = False
        return result

    def _record(
        self, func: Any, args: Tuple, kwargs: Dict, result: torch.Tensor
    ) -> bool:
        """Records a recognised use; `False` for any other use."""
        name, _ = self._which(args[0]) if args else (None, False)
        if name is not None and len(args) == 1 and not kwargs:
            p = self.params[name]
            if (
                p.dim() == 2
                and result.dim() == 2
                and result._base is p
                and result.shape == p.shape[::-1]
                and result.stride() == p.stride()[::-1]
            ):  # P.T, P.t(), P.mT, P.transpose(0, 1)
                self._transposed[id(result)] = name
                self._views.append(result)
                return True
            return False
        if not result.requires_grad:
            return False
        fname = getattr(func, "__name__", "")
        if func is F.linear:
            return self._linear(args, kwargs, result)
        if func in _MATMULS or fname in _MATMUL_NAMES:
            if len(args) != 2 or kwargs:
                return False
            a, w = args
            name, transposed = self._which(w)
            if name is None or self._which(a)[0] is not None:
                return False
            return self._add(name, "t" if transposed else "n", a, result)
        return False

    def _linear(self, args: Tuple, kwargs: Dict, result: torch.Tensor) -> bool:
        a = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if self._which(a)[0] is not None:
            return False
        w_name, w_t = self._which(w)
        b_name, _ = self._which(b)
        if w_t:
            return False
        ok = True
        if w_name is not None:
            ok = self._add(w_name, "t", a, result)
        if b_name is not None:
            ok = ok and self._add(b_name, "bias", None, result)
        return ok

    def _add(self, name: str, form: str, a: Any, result: torch.Tensor) -> bool:
        p = self.params[name]
        if form != "bias":
            if not isinstance(a, torch.Tensor) or a.dim() < 2 or p.dim() != 2:
                return False
        elif p.dim() != 1:
            return False
        a = a.detach() if isinstance(a, torch.Tensor) else None
        version = a._version if a is not None else 0
        self.uses.append(LinearUse(name, form, a, version, get_gradient_edge(result)))
        return True


def use_grads(
    use: LinearUse,
    g: torch.Tensor,
    param: torch.Tensor,
    batch: int,
    factored: bool,
) -> Tuple[Optional[torch.Tensor], Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """Per-sample gradients of one use: `(dense, None)` or `(None, factors)`.

    Args:
        use: the recorded use.
        g: the gradient of the summed loss w.r.t. the use's output.
        param: the parameter.
        batch: the batch size.
        factored: return rank-one factors `(left, right)` when the use sees one
            vector per sample.

    Raises:
        ValueError: if the input or gradient does not have the batch in
            dimension 0, or the input was modified in place.
    """
    dtype = torch.promote_types(param.dtype, torch.float32)
    if g.dim() < 1 or g.shape[0] != batch:
        raise ValueError("the output of a traced use does not have the batch first")
    g = g.to(dtype).reshape(batch, -1, g.shape[-1])
    if use.form == "bias":
        return g.sum(1), None
    a = use.input
    assert a is not None
    if a.shape[0] != batch or a._version != use.version:
        raise ValueError("the input of a traced use is not batch first, or changed")
    a = a.to(dtype).reshape(batch, -1, a.shape[-1])
    left, right = (g, a) if use.form == "t" else (a, g)
    if (
        factored
        and a.shape[1] == 1
        and left.shape[-1] * right.shape[-1] > (left.shape[-1] + right.shape[-1])
    ):
        return None, (left[:, 0], right[:, 0])
    return torch.bmm(left.transpose(1, 2), right), None
