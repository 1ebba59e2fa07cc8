"""Content digests of samples, to recognise training rows passed back in queries.

pyDVL's calculators pass training data back to the model as tensors, chunk by
chunk. `fit` remembers every training sample `(x_i, y_i)` by a 16-byte digest
of its bytes, shape and dtype ([row_digests][pydvl_datainf.rows.row_digests],
computed for a whole batch at once), so that a query on rows it has seen reads
their stored gradients instead of recomputing them. Two samples with equal
bytes have equal gradients, so duplicates are harmless.

Memory is bounded: 16 bytes per row, plus 8 bytes per row for the sorted
lookup table, built at the first lookup (about 24 MB per million rows). No
copy of any input batch is kept. The digests are saved with a Zarr gradient
store and reloaded with it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, cast

import numpy as np
import torch

__all__ = [
    "row_digests",
    "row_keys",
    "batch_digest",
    "RowIndex",
    "RowOrder",
    "DIGEST_BYTES",
]

DIGEST_BYTES = 16
_MAX_BATCHES = 2**18  # batches of the fit recognised whole
_RECENT = 256  # recent lookups remembered
_KEY = np.dtype([("hi", ">u8"), ("lo", ">u8")])


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(cast(Any, t.reshape(-1).view(torch.uint8).numpy()))


def _header(x: torch.Tensor, y: torch.Tensor) -> bytes:
    return f"{tuple(x.shape[1:])}{x.dtype}{tuple(y.shape[1:])}{y.dtype}".encode()


def _row_bytes(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """`(n, bytes)` uint8: each row's bytes of `x`, then of `y`."""
    n = len(x)

    def rows(t: torch.Tensor) -> np.ndarray:
        t = t.detach().to("cpu").contiguous()
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        return cast(np.ndarray, t.reshape(n, -1).view(torch.uint8).numpy())

    return np.ascontiguousarray(np.concatenate([rows(x), rows(y)], axis=1))


def row_keys(x: torch.Tensor, y: torch.Tensor) -> List[bytes]:
    """The bytes of each row of `(x, y)` (x's bytes, then y's)."""
    if len(x) == 0:
        return []
    buf = _row_bytes(x, y)
    return cast(
        List[bytes], buf.view(np.dtype((np.void, buf.shape[1]))).ravel().tolist()
    )


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (a bijection that spreads
    every input bit over the whole word; products wrap modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_digests(x: torch.Tensor, y: torch.Tensor) -> List[bytes]:
    """One 16-byte digest per row of `(x, y)`, over bytes, shapes and dtypes.

    Two 64-bit lanes, each a sum over the row's 8-byte words of a strong
    mix of the word keyed by its position (and by the rows' shapes and
    dtypes), then mixed again with the row's length: computed for a whole
    batch at once, with no loop over rows. Two different rows share a digest
    by accident with a probability of about $2^{-128}$. This recognises rows;
    it is not a defence against rows crafted to collide.

    Example:
        >>> import torch
        >>> x, y = torch.arange(6.0).reshape(3, 2), torch.arange(3)
        >>> a = row_digests(x, y)
        >>> len(a), len(a[0]), a[1] == row_digests(x[1:2], y[1:2])[0], a[0] == a[1]
        (3, 16, True, False)
    """
    n = len(x)
    if n == 0:
        return []
    buf = _row_bytes(x, y)
    width = buf.shape[1]
    pad = (-width) % 8
    if pad:
        buf = np.concatenate([buf, np.zeros((n, pad), dtype=np.uint8)], axis=1)
    words = buf.view("<u8").astype(np.uint64, copy=False)
    seed = hashlib.blake2b(_header(x, y), digest_size=16).digest()
    lanes = []
    with np.errstate(over="ignore"):
        for lane in range(2):
            s = np.uint64(int.from_bytes(seed[8 * lane : 8 * lane + 8], "little"))
            keys = _mix(np.arange(words.shape[1], dtype=np.uint64) * _GOLDEN + s)
            h = _mix(words ^ keys).sum(axis=1, dtype=np.uint64)
            lanes.append(_mix(h ^ s ^ np.uint64(width)))
    out = np.stack(lanes, axis=1).astype("<u8").view(np.uint8).reshape(n, DIGEST_BYTES)
    return cast(
        List[bytes], out.view(np.dtype((np.void, DIGEST_BYTES))).ravel().tolist()
    )


def batch_digest(*tensors: torch.Tensor) -> bytes:
    """One digest over whole tensors (shapes, dtypes and bytes)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for t in tensors:
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(_as_bytes(t))
    return h.digest()


def _keys(digests: List[bytes]) -> np.ndarray:
    raw = np.frombuffer(b"".join(digests), dtype=np.uint8)
    return raw.reshape(-1, DIGEST_BYTES)


class RowIndex:
    """Maps samples to their row in the training set (first occurrence).

    Each sample is keyed by a 16-byte digest of its bytes, shape and dtype
    (so batches padded to other lengths, or in another dtype, never match).
    Only the digests are kept.

    Example:
        >>> import torch
        >>> x, y = torch.randn(4, 3), torch.arange(4)
        >>> index = RowIndex()
        >>> index.add(x, y)
        >>> index.locate(x[[2, 0]], y[[2, 0]]).tolist()
        [2, 0]
    """

    def __init__(self) -> None:
        self._parts: List[np.ndarray] = []
        self._sorted: Optional[np.ndarray] = None
        self._order: Optional[np.ndarray] = None
        self._first: Optional[np.ndarray] = None
        self._batches: Dict[bytes, Tuple[int, int]] = {}
        self._recent: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.n = 0

    def __getstate__(self) -> Dict[str, Any]:
        return {"digests": self.digests()}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self._add_digests(state["digests"])

    @property
    def nbytes(self) -> int:
        """Bytes held by the index (digests and lookup table)."""
        held = sum(p.nbytes for p in self._parts)
        if self._sorted is not None and self._order is not None:
            held += self._sorted.nbytes + self._order.nbytes
        return held

    def _add_digests(self, digests: np.ndarray) -> None:
        digests = np.ascontiguousarray(digests, dtype=np.uint8)
        if digests.ndim != 2 or digests.shape[1] != DIGEST_BYTES:
            raise ValueError(
                f"Row digests must have shape (n, {DIGEST_BYTES}), got {digests.shape}"
            )
        with self._lock:
            self._parts.append(digests)
            self._sorted = self._order = self._first = None
            self._recent.clear()
            self.n += len(digests)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Register the rows of a batch, in order."""
        if len(x):
            self._add_digests(_keys(row_digests(x, y)))

    def extend(self, digests: List[bytes], batch: Optional[bytes] = None) -> None:
        """Register rows by their digests (from [row_digests][pydvl_datainf.rows.row_digests]), in order.

        Args:
            digests: the rows' digests.
            batch: the [batch_digest][pydvl_datainf.rows.batch_digest] of the
                batch they came in: a query that passes the same batch again
                (as pyDVL's calculators do) is then recognised whole.
        """
        if not digests:
            return
        start = self.n
        self._add_digests(_keys(digests))
        if batch is not None and len(self._batches) < _MAX_BATCHES:
            with self._lock:
                self._batches.setdefault(batch, (start, len(digests)))

    def digests(self) -> np.ndarray:
        """All digests in row order, `(n, 16)` uint8 (what is saved)."""
        with self._lock:
            if len(self._parts) > 1:
                self._parts = [np.concatenate(self._parts)]
            if not self._parts:
                return np.zeros((0, DIGEST_BYTES), dtype=np.uint8)
            return self._parts[0]

    @classmethod
    def from_digests(cls, digests: np.ndarray) -> RowIndex:
        """An index from saved digests, `(n, 16)` uint8 in row order."""
        index = cls()
        index._add_digests(np.asarray(digests))
        return index

    def _table(self) -> tuple:
        with self._lock:
            if self._sorted is None or self._order is None or self._first is None:
                keys = (
                    np.concatenate(self._parts)
                    if self._parts
                    else np.zeros((0, DIGEST_BYTES), dtype=np.uint8)
                )
                flat = np.ascontiguousarray(keys).view(_KEY).ravel()
                order = np.argsort(flat, kind="stable")  # first occurrence first
                ordered = flat[order]
                # each row's first occurrence: the start of its run of equal keys
                starts = np.ones(len(ordered), dtype=bool)
                starts[1:] = ordered[1:] != ordered[:-1]
                first = np.empty(len(order), dtype=np.int64)
                first[order] = order[
                    np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
                ]
                self._sorted, self._order, self._first = ordered, order, first
            return self._sorted, self._order, self._first

    def locate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Row index of each sample of `(x, y)`, -1 for unknown samples.

        A batch seen before (in `fit`, or in a recent lookup) is recognised
        by one digest of the whole batch; other batches row by row.
        """
        if len(x) == 0:
            return torch.zeros(0, dtype=torch.long)
        keys, order, first = self._table()
        key = batch_digest(x, y)
        with self._lock:
            span = self._batches.get(key)
            hit = self._recent.get(key)
            if hit is not None:
                self._recent.move_to_end(key)
        if span is not None and span[1] == len(x):
            return torch.from_numpy(first[span[0] : span[0] + span[1]].copy())
        if hit is not None:
            return torch.from_numpy(hit.copy())
        query = np.ascontiguousarray(_keys(row_digests(x, y))).view(_KEY).ravel()
        out = np.full(len(query), -1, dtype=np.int64)
        if len(keys):
            pos = np.searchsorted(keys, query)
            found = pos < len(keys)
            found[found] = keys[pos[found]] == query[found]
            out[found] = order[pos[found]]
        with self._lock:
            self._recent[key] = out
            while len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
        return torch.from_numpy(out.copy())

    def lookup(self, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """Row indices of all samples of `(x, y)`, or None if any is unknown."""
        rows = self.locate(x, y)
        return None if bool((rows < 0).any()) else rows


class RowOrder:
    """A digest of rows in their order: what makes the columns of a result.

    Two fits of the same rows in another order give other digests (and the
    same rows in the same order, however batched, the same one).

    Example:
        >>> import torch
        >>> x, y = torch.arange(6.0).reshape(3, 2), torch.arange(3)
        >>> a, b = RowOrder(), RowOrder()
        >>> a.add(row_digests(x, y))
        >>> b.add(row_digests(x[:1], y[:1])); b.add(row_digests(x[1:], y[1:]))
        >>> a.hexdigest() == b.hexdigest()
        True
        >>> c = RowOrder(); c.add(row_digests(x.flip(0), y.flip(0)))
        >>> c.hexdigest() == a.hexdigest()
        False
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.n = 0

    def add(self, digests: List[bytes]) -> None:
        """Add the next rows, by their digests."""
        for d in digests:
            self._h.update(d)
        self.n += len(digests)

    def hexdigest(self) -> str:
        """The digest of the rows added so far, in order."""
        return self._h.hexdigest()
