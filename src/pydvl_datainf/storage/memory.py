"""In-memory gradient store: dense rows or rank-one factors, in RAM.

Example:
    ```python
    import torch
    from pydvl_datainf.storage import MemoryGradientStore

    store = MemoryGradientStore(["w"])
    store.append({"w": torch.randn(5, 3)})
    store.finalize()
    assert store.read(0, 2)["w"].shape == (2, 3)
    ```
"""

from __future__ import annotations

import ctypes
import sys
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch

from ..factored import FactoredGrads, RowParts, Rows, densify, rows_nbytes
from .base import GradientStore, default_chunk_rows

__all__ = ["MemoryGradientStore"]


def _large_empty(
    shape: Tuple[int, int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`torch.empty` for a large, long-lived buffer, with a transparent huge
    page hint on Linux CPUs (first-touch page faults dominate writing a fresh
    gradient cache; 2 MiB pages make them ~500 times fewer). Best effort."""
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if device.type == "cpu" and nbytes >= 2 << 20 and sys.platform == "linux":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            page = 2 << 20
            start = (t.data_ptr() + page - 1) // page * page
            length = (t.data_ptr() + nbytes - start) // page * page
            if length > 0:
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 14)
        except (OSError, AttributeError):  # pragma: no cover - platform specific
            pass
    return t


_Kept = Union[torch.Tensor, FactoredGrads, RowParts]


class MemoryGradientStore(GradientStore):
    """Keeps every block's gradients in memory, dense or as rank-one factors.

    Blocks appended as [FactoredGrads][pydvl_datainf.factored.FactoredGrads]
    (what `fit` does for linear layers without a token dimension) stay
    factored; `read`, `take`, `chunks` and `data` expand them to dense rows,
    chunk by chunk. With `capacity`, each block is one buffer allocated at the
    first append (with a transparent-huge-page hint: writing fresh memory is
    mostly page faults otherwise); without it, batches are kept as they come
    (factored blocks in [RowParts][pydvl_datainf.factored.RowParts], dense
    ones concatenated once at `finalize`).

    Args:
        block_names: block names, in order.
        capacity: the number of rows expected, if known.

    Example:
        ```python
        import torch
        from pydvl_datainf.storage import MemoryGradientStore

        store = MemoryGradientStore(["w"])
        store.append({"w": torch.randn(5, 3)})
        store.finalize()
        assert [start for start, _ in store.chunks(2)] == [0, 2, 4]
        ```
    """

    accepts_factored = True

    def __init__(self, block_names: Sequence[str], capacity: Optional[int] = None):
        super().__init__(block_names)
        self.capacity = capacity
        self._buffers: Dict[str, Rows] = {}  # preallocated, filled up to n
        self._parts: Dict[str, Union[List[torch.Tensor], RowParts]] = {}
        self._data: Dict[str, _Kept] = {}  # after finalize
        self._batch_starts: List[int] = [0]
        self._batch: Tuple[torch.Tensor, ...] = ()  # the inputs of this append
        self._n = 0

    @property
    def n(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes held by the gradients (by the factors, for factored blocks)."""
        return sum(self._block_nbytes(k) for k in self._known())

    def _block_nbytes(self, k: str) -> int:
        parts = self._parts.get(k)
        if isinstance(parts, list):  # do not concatenate (`AutoGradientStore`
            return sum(rows_nbytes(t) for t in parts)  # asks at every append)
        return rows_nbytes(self._block(k))

    def _known(self) -> List[str]:
        return [
            k
            for k in self.block_names
            if k in self._data or k in self._buffers or k in self._parts
        ]

    def _block(self, k: str) -> _Kept:
        """Block `k`'s rows so far (dense parts are concatenated)."""
        if k in self._data:
            return self._data[k]
        if k in self._buffers:
            return self._buffers[k][: self._n]
        parts = self._parts[k]
        if isinstance(parts, RowParts):
            return parts
        if len(parts) > 1:
            self._parts[k] = parts = [torch.cat(parts)]
        return parts[0]

    def _make_dense(self, k: str) -> None:
        """Block `k` continues dense (a batch that could not be factored)."""
        kept = self._block(k)
        self._buffers.pop(k, None)
        whole = kept.whole() if isinstance(kept, RowParts) else kept
        self._parts[k] = [densify(whole)]

    def _append_block(self, k: str, g: Rows) -> None:
        rows = len(g)
        factored = isinstance(g, FactoredGrads)
        if k not in self._buffers and k not in self._parts:  # first batch
            if self.capacity is not None:
                size = max(self.capacity, rows)
                self._buffers[k] = (
                    g.map(lambda t: _large_empty((size, t.shape[1]), t.dtype, t.device))
                    if isinstance(g, FactoredGrads)
                    else _large_empty((size, g.shape[1]), g.dtype, g.device)
                )
            else:
                self._parts[k] = RowParts() if factored else []
        buf = self._buffers.get(k)
        if buf is not None:
            same_kind = (
                buf.layout == g.layout
                if isinstance(buf, FactoredGrads) and isinstance(g, FactoredGrads)
                else isinstance(buf, FactoredGrads) == factored
            )
            if same_kind and self._n + rows <= len(buf):
                if isinstance(buf, FactoredGrads):
                    for dst, src in zip(buf.parts(), cast(FactoredGrads, g).parts()):
                        dst[self._n : self._n + rows] = src.detach()
                else:
                    buf[self._n : self._n + rows] = cast(torch.Tensor, g).detach()
                return
            # more rows than announced, or another kind: keep as parts
            del self._buffers[k]
            if isinstance(buf, FactoredGrads):
                kept = RowParts()
                kept.append(buf[: self._n], copy_views=False)
                self._parts[k] = kept
            else:
                self._parts[k] = [buf[: self._n]]
        parts = self._parts[k]
        if isinstance(parts, RowParts):
            if isinstance(g, FactoredGrads) and parts.fits(g):
                parts.append(g, foreign=self._batch)  # never alias the inputs
                return
            self._make_dense(k)
            parts = self._parts[k]
        cast(List[torch.Tensor], parts).append(densify(g).detach())

    def note_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._batch = (x, y)

    def append(self, grads: Mapping[str, Rows]) -> None:
        self._check_append(grads)
        for k, g in grads.items():
            self._append_block(k, g)
        self._batch = ()
        self._n += len(next(iter(grads.values())))
        self._batch_starts.append(self._n)

    def appended(self) -> Iterator[Dict[str, Rows]]:
        """The rows appended so far, as per-block batches (before `finalize`)."""
        if self._n == 0:
            return
        blocks = {k: self._block(k) for k in self.block_names}
        for lo, hi in zip(self._batch_starts, self._batch_starts[1:]):
            yield {k: b[lo:hi] for k, b in blocks.items()}

    def finalize(self, publish: bool = True) -> None:
        if self._finalized:
            return
        super().finalize(publish)
        self._data = {k: self._block(k) for k in self._known()}
        self._buffers, self._parts = {}, {}

    def _kept(self) -> Dict[str, _Kept]:
        if not self._finalized:
            self.finalize()
        return self._data

    @property
    def rows(self) -> Dict[str, Rows]:
        """Each block's rows as kept: a dense `(n, d_l)` tensor or its factors
        (factors kept batch by batch are concatenated for this view)."""
        return {
            k: (v.whole() if isinstance(v, RowParts) else v)
            for k, v in self._kept().items()
        }

    @property
    def factored_blocks(self) -> List[str]:
        """The blocks kept as rank-one factors."""
        return [
            k
            for k, v in self._kept().items()
            if isinstance(v, (FactoredGrads, RowParts))
        ]

    @property
    def data(self) -> Dict[str, torch.Tensor]:
        """The dense `(n, d_l)` gradient matrix of each block (factored blocks
        are expanded: prefer `read`, `take` or `chunks` for large stores)."""
        return {k: densify(v) for k, v in self.rows.items()}

    @property
    def chunk_rows(self) -> Optional[int]:
        kept = self._kept()
        if not kept or self._n == 0:
            return None
        return default_chunk_rows(
            sum(v.shape[1] * v.dtype.itemsize for v in kept.values())
        )

    def chunks(
        self, rows: Optional[int] = None
    ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        if rows is None:  # all at once, unless factored blocks must be expanded
            rows = (self.chunk_rows or 1) if self.factored_blocks else self._n
        step = max(1, rows)
        for start in range(0, self._n, step):
            yield start, self.read(start, start + step)

    def read(self, start: int, stop: int) -> Dict[str, torch.Tensor]:
        return {k: densify(v[start:stop]) for k, v in self._kept().items()}

    def take(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {k: densify(v[index.to(v.device)]) for k, v in self._kept().items()}

    def to(self, device: torch.device) -> MemoryGradientStore:
        self._data = {k: v.to(device) for k, v in self._kept().items()}
        return self
