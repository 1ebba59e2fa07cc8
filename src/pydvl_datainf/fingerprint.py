"""Fingerprints of trainable weights and of the loss, to refuse stale caches.

`fit` caches per-sample gradients that are only valid for the weights and the
loss they were computed with. [weights_digest][pydvl_datainf.fingerprint.weights_digest]
is a SHA-256 over the names, shapes, dtypes and bytes of the trainable
parameters: any change of any value is detected, including edits through
`.data` that keep sums (a permutation, say), and restoring identical weights
is accepted. [WeightWatch][pydvl_datainf.fingerprint.WeightWatch] recomputes
it before each query. Its cost is one read of the trainable parameters (plus a
copy to the CPU for parameters on an accelerator); `benchmarks/fingerprint.py`
measures it.

[loss_name][pydvl_datainf.fingerprint.loss_name] names a loss so that a store
can record it and a reopened model can check it.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Mapping, Optional, cast

import torch

__all__ = ["weights_digest", "WeightWatch", "loss_name"]


def weights_digest(params: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of `params`, in order.

    Example:
        >>> import torch
        >>> w = {"w": torch.tensor([1.0, 2.0])}
        >>> weights_digest(w) == weights_digest({"w": torch.tensor([2.0, 1.0])})
        False
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in params.items():
            t = p.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(memoryview(cast(Any, t.view(torch.uint8).numpy())))
    return h.hexdigest()


class WeightWatch:
    """Remembers the weights of `params` and tells whether they changed.

    Args:
        params: the watched parameters, by name (held by reference).
        digest: the digest they must have (default: the current one), e.g.
            the digest recorded at fit, after a move to another device.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> watch = WeightWatch({"p": p})
        >>> p.data[:] = p.data.flip(0)  # same sum, other values
        >>> watch.changed()
        True
    """

    def __init__(
        self, params: Mapping[str, torch.Tensor], digest: Optional[str] = None
    ):
        self.params = dict(params)
        self.digest = weights_digest(self.params) if digest is None else digest

    def changed(self) -> bool:
        """Whether any watched parameter now holds other values than at creation."""
        return weights_digest(self.params) != self.digest


def loss_name(loss: Any) -> str:
    """A stable name for a loss: its module and qualified name, and its settings.

    Module-level functions and classes are named by `module.qualname`; a
    `torch.nn` loss module adds its `extra_repr()` and its public float, int,
    bool and string attributes (e.g. `reduction`, `label_smoothing`); a
    `functools.partial` adds its arguments; functions defined inside other
    functions (lambdas, closures) add a digest of their code.

    Example:
        >>> import torch
        >>> loss_name(torch.nn.functional.mse_loss)
        'torch.nn.functional.mse_loss'
    """
    func = getattr(loss, "func", None)
    if func is not None and hasattr(loss, "keywords"):  # functools.partial
        args = ", ".join(
            [repr(a) for a in getattr(loss, "args", ())]
            + [f"{k}={v!r}" for k, v in sorted(loss.keywords.items())]
        )
        return f"partial({loss_name(func)}, {args})"
    if inspect.isfunction(loss) or inspect.isbuiltin(loss):
        name = f"{getattr(loss, '__module__', '')}.{loss.__qualname__}"
        code = getattr(loss, "__code__", None)
        if "<" in loss.__qualname__ and code is not None:
            h = hashlib.blake2b(code.co_code, digest_size=8)
            h.update(repr(code.co_consts).encode())
            name += f"[{h.hexdigest()}]"
        return name
    cls = type(loss)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(loss, torch.nn.Module):
        settings = {
            k: v
            for k, v in sorted(vars(loss).items())
            if not k.startswith("_")
            and k != "training"
            and isinstance(v, (bool, int, float, str, type(None)))
        }
        name += f"({loss.extra_repr()}){settings}"
    return name
