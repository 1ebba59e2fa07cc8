"""Fingerprints of trainable weights, to refuse queries against a stale cache.

`fit` caches per-sample gradients that are only valid for the weights they were
computed with. [WeightWatch][pydvl_datainf.fingerprint.WeightWatch] records a
SHA-256 digest of the block parameters at fit time, and checks cheaply before
each query: a signature of storage pointer, autograd version counter and two
float64 reductions per parameter. Only when the signature moved (an optimizer
step, `load_state_dict`, or an edit through `.data`) is the full digest
recomputed and compared, so restoring identical weights is accepted.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Tuple

import torch

__all__ = ["weights_digest", "WeightWatch"]


def weights_digest(params: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of `params`, in order."""
    h = hashlib.sha256()
    for name, p in params.items():
        t = p.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _signature(params: Mapping[str, torch.Tensor]) -> Tuple:
    sig = []
    with torch.no_grad():
        for p in params.values():
            sig.append(
                (
                    p.data_ptr(),
                    p._version,
                    float(torch.sum(p, dtype=torch.float64)),
                    float(torch.sum(p * p, dtype=torch.float64)),
                )
            )
    return tuple(sig)


class WeightWatch:
    """Remembers the weights of `params` and tells whether they changed.

    Args:
        params: the watched parameters, by name (held by reference).
    """

    def __init__(self, params: Mapping[str, torch.Tensor]):
        self.params = dict(params)
        self.digest = weights_digest(self.params)
        self._signature = _signature(self.params)

    def changed(self) -> bool:
        """Whether any watched parameter now holds other values than at creation."""
        sig = _signature(self.params)
        if sig == self._signature:
            return False
        if weights_digest(self.params) != self.digest:
            return True
        self._signature = sig
        return False
