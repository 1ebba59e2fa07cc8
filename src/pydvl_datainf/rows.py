"""Content digests of samples, to recognise training rows passed back in queries.

pyDVL's calculators pass training data back to the model as tensors, chunk by
chunk. `fit` remembers every training sample `(x_i, y_i)` by a key, so that a query
on rows it has seen reads their cached gradients instead of recomputing them.
Two samples with equal bytes have equal gradients, so duplicates are harmless.

The key is the sample's bytes themselves when a sample is no larger than
`exact_bytes` (`fit` passes the bytes of one cached gradient row, so the index
never outgrows the gradient cache): matching is then exact, and the keys are
only built if a lookup happens. Larger samples get a 16-byte BLAKE2b digest.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any, Dict, List, Optional, Tuple, cast

import numpy as np
import torch

__all__ = ["row_digests", "row_keys", "batch_digest", "RowIndex"]


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(cast(Any, t.reshape(-1).view(torch.uint8).numpy()))


def _header(x: torch.Tensor, y: torch.Tensor) -> bytes:
    return f"{tuple(x.shape[1:])}{x.dtype}{tuple(y.shape[1:])}{y.dtype}".encode()


def row_keys(x: torch.Tensor, y: torch.Tensor) -> List[bytes]:
    """The bytes of each row of `(x, y)` (x's bytes, then y's)."""
    n = len(x)
    if n == 0:
        return []

    def rows(t: torch.Tensor) -> np.ndarray:
        t = t.detach().to("cpu").contiguous()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        return cast(np.ndarray, t.reshape(n, -1).view(torch.uint8).numpy())

    buf = np.ascontiguousarray(np.concatenate([rows(x), rows(y)], axis=1))
    # one void scalar per row: `tolist` makes the bytes objects in C, zeros kept
    return cast(
        List[bytes], buf.view(np.dtype((np.void, buf.shape[1]))).ravel().tolist()
    )


def row_digests(x: torch.Tensor, y: torch.Tensor) -> List[bytes]:
    """One 16-byte digest per row of `(x, y)`, over bytes, shapes and dtypes."""
    xb, yb = _as_bytes(x), _as_bytes(y)
    n = len(x)
    sx, sy = (len(xb) // n if n else 0), (len(yb) // n if n else 0)
    header = _header(x, y)
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
    """Maps samples to their row in the training set (first occurrence).

    Samples are grouped by shape and dtype (batches padded to different
    lengths are different groups); within a group they are keyed by their
    bytes, or by a digest when larger than `exact_bytes`. Byte keys are built
    at the first lookup, from copies of the batches taken by `add` (a copy is
    cheap, and most users never look rows up); digests are computed by `add`.

    Args:
        exact_bytes: samples of at most this many bytes (x's and y's together)
            are keyed by their bytes (exact); larger ones by a digest.
    """

    def __init__(self, exact_bytes: int = 0) -> None:
        self._tables: Dict[bytes, Tuple[bool, Dict[bytes, int]]] = {}
        self._pending: List[
            Tuple[Dict[bytes, int], torch.Tensor, torch.Tensor, int]
        ] = []
        self._lock = threading.Lock()
        self.n = 0
        self.exact_bytes = int(exact_bytes)

    def __getstate__(self) -> Dict[str, Any]:
        self._build()
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _table(
        self, x: torch.Tensor, y: torch.Tensor, create: bool
    ) -> Optional[Tuple[bool, Dict[bytes, int]]]:
        header = _header(x, y)
        table = self._tables.get(header)
        if table is None and create:
            size = x[:1].numel() * x.element_size() + y[:1].numel() * y.element_size()
            table = self._tables[header] = (size <= self.exact_bytes, {})
        return table

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Register the rows of a batch, in order."""
        exact, rows = cast(Tuple[bool, Dict[bytes, int]], self._table(x, y, True))
        if exact:
            self._pending.append((rows, x.detach().clone(), y.detach().clone(), self.n))
        else:
            for i, k in enumerate(row_digests(x, y), self.n):
                rows.setdefault(k, i)
        self.n += len(x)

    def _build(self) -> None:
        """Key the copied batches, in the order they were added."""
        with self._lock:
            for rows, x, y, start in self._pending:
                for i, k in enumerate(row_keys(x, y), start):
                    rows.setdefault(k, i)
            self._pending = []

    def lookup(self, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """Row indices of all samples of `(x, y)`, or None if any is unknown."""
        if self._pending:
            self._build()
        table = self._table(x, y, False)
        if table is None:
            return None
        exact, known = table
        rows = []
        for k in row_keys(x, y) if exact else row_digests(x, y):
            r = known.get(k)
            if r is None:
                return None
            rows.append(r)
        return torch.tensor(rows, dtype=torch.long)
