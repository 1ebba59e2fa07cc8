r"""Per-sample gradients kept as rank-one factors (exact, far smaller).

For a linear layer $y = W a (+ b)$ that sees one input vector per sample (no
token or position dimension), the per-sample gradient of the weight is a
rank-one matrix,

$$
\nabla_W \ell_i = u_i a_i^\top, \qquad u_i = \partial \ell_i / \partial y_i,
$$

so it is fully described by $u_i \in \mathbb{R}^{p}$ and $a_i \in \mathbb{R}^{q}$:
$p + q$ numbers instead of $p q$. Two quantities DataInf needs from every
training gradient follow from the factors directly:

$$
\lVert u_i a_i^\top \rVert_F^2 = \lVert u_i \rVert^2 \lVert a_i \rVert^2 ,
\qquad
\operatorname{vec}(u_i a_i^\top) = u_i \otimes a_i .
$$

[FactoredGrads][pydvl_datainf.factored.FactoredGrads] holds the rows of one
block as `left` ($u_i$), `right` ($a_i$) and an optional dense `tail` for the
block's other parameters (e.g. the bias, whose gradient is $u_i$). `fit` keeps
such blocks factored in the in-memory gradient cache: for a rank-8 LoRA-MLP this
is 8 times less memory and no per-sample outer products at all. Reads expand
chunks of rows to the dense layout on demand, with the same numbers as the
dense path (each entry is one product $u_{io} a_{ij}$).

Example:
    >>> u, a = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0, 1.0]])
    >>> g = FactoredGrads(u, a)
    >>> g.dense()
    tensor([[3., 0., 1., 6., 0., 2.]])
    >>> g.squared_norms()
    tensor([50.])
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from . import formula

__all__ = [
    "FactoredGrads",
    "RowParts",
    "Rows",
    "densify",
    "join",
    "owns_storage",
    "rows_nbytes",
    "squared_norms",
]


@dataclass(frozen=True)
class FactoredGrads:
    r"""Rows $g_i = [\,u_i \otimes a_i,\ t_i\,]$ of one block, stored as factors.

    Attributes:
        left: $(n, p)$, the factors $u_i$ (output gradients).
        right: $(n, q)$, the factors $a_i$ (layer inputs).
        tail: $(n, r)$ dense remainder of the block (other parameters), or None.
    """

    left: torch.Tensor
    right: torch.Tensor
    tail: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.left.dim() != 2 or self.right.dim() != 2:
            raise ValueError(
                f"factors must be 2-D, got {tuple(self.left.shape)} and "
                f"{tuple(self.right.shape)}"
            )
        rows = {len(self.left), len(self.right)}
        if self.tail is not None:
            if self.tail.dim() != 2:
                raise ValueError(f"tail must be 2-D, got {tuple(self.tail.shape)}")
            rows.add(len(self.tail))
        if len(rows) != 1:
            raise ValueError(f"factors have different numbers of rows: {rows}")
        dtypes = {self.left.dtype, self.right.dtype}
        if self.tail is not None:
            dtypes.add(self.tail.dtype)
        if len(dtypes) != 1:
            raise ValueError(f"factors have different dtypes: {dtypes}")

    def __len__(self) -> int:
        return len(self.left)

    @property
    def factored_size(self) -> int:
        """$p q$: the number of dense columns the factors stand for."""
        return self.left.shape[1] * self.right.shape[1]

    @property
    def layout(self) -> Tuple[int, ...]:
        """The widths of the parts, `(p, q)` or `(p, q, r)`: batches of one
        block with the same layout can share a buffer."""
        return tuple(t.shape[1] for t in self.parts())

    @property
    def shape(self) -> Tuple[int, int]:
        """The dense shape $(n, p q + r)$."""
        r = 0 if self.tail is None else self.tail.shape[1]
        return (len(self), self.factored_size + r)

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @property
    def device(self) -> torch.device:
        return self.left.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the factors and the tail."""
        parts = [self.left, self.right] + ([] if self.tail is None else [self.tail])
        return sum(t.numel() * t.element_size() for t in parts)

    def parts(self) -> Tuple[torch.Tensor, ...]:
        """`(left, right)` or `(left, right, tail)`."""
        if self.tail is None:
            return (self.left, self.right)
        return (self.left, self.right, self.tail)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> FactoredGrads:
        """The same rows with `fn` applied to every part (slicing, moving...)."""
        return FactoredGrads(*(fn(t) for t in self.parts()))

    def __getitem__(self, index: Union[slice, torch.Tensor]) -> FactoredGrads:
        return self.map(lambda t: t[index])

    def to(self, device: Union[str, torch.device]) -> FactoredGrads:
        """The factors on `device`."""
        return self.map(lambda t: t.to(device))

    def detach(self) -> FactoredGrads:
        return self.map(lambda t: t.detach())

    def squared_norms(self) -> torch.Tensor:
        r"""$\lVert u_i\rVert^2 \lVert a_i\rVert^2 + \lVert t_i\rVert^2$, shape $(n,)$."""
        s = torch.linalg.vector_norm(self.left, dim=1).square()
        s = s * torch.linalg.vector_norm(self.right, dim=1).square()
        if self.tail is not None:
            s = s + torch.linalg.vector_norm(self.tail, dim=1).square()
        return s

    def dense(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The $(n, p q + r)$ dense rows, in the parameters' own layout.

        Args:
            out: optional preallocated output of the dense shape and dtype.
        """
        n, d = self.shape
        if out is None:
            out = torch.empty(n, d, dtype=self.dtype, device=self.device)
        elif tuple(out.shape) != (n, d):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, d)}")
        pq = self.factored_size
        outer = out[:, :pq].view(n, self.left.shape[1], self.right.shape[1])
        torch.mul(self.left[:, :, None], self.right[:, None, :], out=outer)
        if self.tail is not None:
            out[:, pq:] = self.tail
        return out


Rows = Union[torch.Tensor, FactoredGrads]
"""Per-sample rows of one block: a dense `(n, d_l)` tensor or its factors."""


def densify(rows: Rows) -> torch.Tensor:
    """The dense `(n, d_l)` tensor of `rows`."""
    return rows.dense() if isinstance(rows, FactoredGrads) else rows


def squared_norms(rows: Rows) -> torch.Tensor:
    r"""Row-wise $\lVert g_i\rVert^2$ of dense or factored rows."""
    if isinstance(rows, FactoredGrads):
        return rows.squared_norms()
    return formula.squared_norms(rows)


def rows_nbytes(rows: Union[Rows, RowParts]) -> int:
    """Bytes held by `rows` (the factors' bytes when factored)."""
    if isinstance(rows, (FactoredGrads, RowParts)):
        return rows.nbytes
    return rows.numel() * rows.element_size()


def join(parts: Sequence[Rows]) -> Rows:
    """One block's rows from its parameters' rows, in order.

    If the first part is factored it stays factored and the others become its
    dense tail; otherwise everything is dense.
    """
    first, rest = parts[0], [densify(p) for p in parts[1:]]
    if isinstance(first, FactoredGrads):
        if not rest:
            return first
        tail = [first.tail] if first.tail is not None else []
        return FactoredGrads(first.left, first.right, torch.cat(tail + rest, dim=1))
    if not rest:
        return first
    return torch.cat([first, *rest], dim=1)


def owns_storage(t: torch.Tensor) -> bool:
    """Whether `t` is contiguous and alone in its storage (keeping it keeps no
    more memory than its own bytes)."""
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


class RowParts:
    """The rows of one factored block, kept as the batches they came in.

    `fit` appends each batch's factors without copying them (they are fresh
    tensors of the engine), so the cache costs no memory traffic beyond the
    engine's own; reads address rows globally and concatenate only the factor
    pieces they touch, which are far smaller than the dense rows they expand
    to.

    Example:
        >>> parts = RowParts()
        >>> parts.append(FactoredGrads(torch.ones(2, 2), torch.ones(2, 3)))
        >>> parts.append(FactoredGrads(torch.zeros(1, 2), torch.ones(1, 3)))
        >>> parts[1:3].dense().sum(1)
        tensor([6., 0.])
    """

    def __init__(self) -> None:
        self.parts: List[FactoredGrads] = []
        self.starts: List[int] = [0]
        self._held: set = set()

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def shape(self) -> Tuple[int, int]:
        """The dense shape `(n, d_l)`."""
        return (len(self), self.parts[0].shape[1] if self.parts else 0)

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def fits(self, g: FactoredGrads) -> bool:
        """Whether `g` has the layout of the rows kept so far."""
        return not self.parts or g.layout == self.parts[0].layout

    def append(
        self,
        g: FactoredGrads,
        copy_views: bool = True,
        foreign: Sequence[torch.Tensor] = (),
    ) -> None:
        """Keep the rows of `g`: as they are when each factor owns its storage
        (not a view of a larger tensor, not already kept, not the memory of a
        `foreign` tensor such as the caller's input batch), else a copy.

        Args:
            copy_views: copy views of larger tensors; `False` keeps them (for
                the owner's own buffers).
            foreign: tensors whose memory must never be kept (copied instead).
        """
        avoid = {t.untyped_storage().data_ptr() for t in foreign}

        def keep(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            key = t.untyped_storage().data_ptr()
            if (
                (copy_views and not owns_storage(t))
                or key in self._held
                or key in avoid
            ):
                t = t.clone(memory_format=torch.contiguous_format)
                key = t.untyped_storage().data_ptr()
            self._held.add(key)
            return t

        if not self.fits(g):
            raise ValueError("factors of another layout than the rows kept so far")
        self.parts.append(g.map(keep))
        self.starts.append(self.starts[-1] + len(g))

    def span(self, start: int, stop: int) -> FactoredGrads:
        """Rows `start:stop` (clipped to the rows kept)."""
        if not self.parts:
            raise ValueError("no rows kept")
        n = len(self)
        start = min(max(0, start), n)
        stop = min(max(start, stop), n)
        if start == stop:
            return self.parts[0][0:0]
        p = bisect.bisect_right(self.starts, start) - 1
        pieces = []
        while p < len(self.parts) and self.starts[p] < stop:
            lo, hi = self.starts[p], self.starts[p + 1]
            pieces.append(self.parts[p][max(start, lo) - lo : min(stop, hi) - lo])
            p += 1
        if len(pieces) == 1:
            return pieces[0]
        return FactoredGrads(
            *(torch.cat(ts) for ts in zip(*(q.parts() for q in pieces)))
        )

    def __getitem__(self, index: Union[slice, torch.Tensor]) -> FactoredGrads:
        """Rows by a slice (step 1) or a 1-D integer tensor."""
        if isinstance(index, slice):
            if index.step not in (None, 1):
                raise ValueError("RowParts slices take no step")
            start, stop, _ = index.indices(len(self))
            return self.span(start, stop)
        return self.take(index)

    def take(self, index: torch.Tensor) -> FactoredGrads:
        """The rows at `index` (a 1-D integer tensor), in its order."""
        index = index.to(torch.long).cpu()
        if len(self.parts) == 1:
            return self.parts[0][index.to(self.device)]
        n = len(self)
        if len(index) and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"row index out of range for {n} rows")
        index = torch.where(index < 0, index + n, index)
        starts = torch.tensor(self.starts[:-1])
        part = torch.searchsorted(starts, index, right=True) - 1
        out = [
            torch.empty(len(index), t.shape[1], dtype=t.dtype, device=t.device)
            for t in self.parts[0].parts()
        ]
        for p in torch.unique(part).tolist():
            rows = torch.nonzero(part == p).flatten()
            local = (index[rows] - self.starts[p]).to(self.device)
            rows = rows.to(self.device)
            for dst, src in zip(out, self.parts[p].parts()):
                dst[rows] = src[local]
        return FactoredGrads(*out)

    def whole(self) -> FactoredGrads:
        """All rows as one [FactoredGrads][pydvl_datainf.factored.FactoredGrads]
        (concatenates the factors)."""
        return self.span(0, len(self))

    def to(self, device: Union[str, torch.device]) -> RowParts:
        """A copy on `device`."""
        moved = RowParts()
        for p in self.parts:
            moved.append(p.to(device))
        return moved
