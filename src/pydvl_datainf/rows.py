"""Content digests of samples, to recognise training rows passed back in queries.

pyDVL's calculators pass training data back to the model as tensors, chunk by
chunk. `fit` remembers a digest of every training sample `(x_i, y_i)`, so that
a query on rows it has seen reads their cached gradients instead of
recomputing them. Two samples with equal bytes have equal gradients, so a
digest collision between duplicates is harmless.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, cast

import torch

__all__ = ["row_digests", "batch_digest", "RowIndex"]


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(cast(Any, t.reshape(-1).view(torch.uint8).numpy()))


def row_digests(x: torch.Tensor, y: torch.Tensor) -> List[bytes]:
    """One 16-byte digest per row of `(x, y)`, over bytes, shapes and dtypes."""
    xb, yb = _as_bytes(x), _as_bytes(y)
    n = len(x)
    sx, sy = (len(xb) // n if n else 0), (len(yb) // n if n else 0)
    header = f"{tuple(x.shape[1:])}{x.dtype}{tuple(y.shape[1:])}{y.dtype}".encode()
    out = []
    for i in range(n):
        h = hashlib.blake2b(header, digest_size=16)
        h.update(xb[i * sx : (i + 1) * sx])
        h.update(yb[i * sy : (i + 1) * sy])
        out.append(h.digest())
    return out


def batch_digest(*tensors: torch.Tensor) -> bytes:
    """One digest over whole tensors (shapes, dtypes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(_as_bytes(t))
    return h.digest()


class RowIndex:
    """Maps sample digests to their row in the training set (first occurrence)."""

    def __init__(self) -> None:
        self._rows: Dict[bytes, int] = {}
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Register the rows of a batch, in order."""
        for d in row_digests(x, y):
            self._rows.setdefault(d, self.n)
            self.n += 1

    def lookup(self, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """Row indices of all samples of `(x, y)`, or None if any is unknown."""
        rows = []
        for d in row_digests(x, y):
            r = self._rows.get(d)
            if r is None:
                return None
            rows.append(r)
        return torch.tensor(rows, dtype=torch.long)
