r"""A gradient store that keeps nothing and recomputes gradients on every read.

Example:
    ```python
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from pydvl_datainf import DataInfInfluence, RecomputeGradientStore

    model, loss = torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    infl = DataInfInfluence(model, loss, store="recompute").fit(loader)
    assert isinstance(infl.store, RecomputeGradientStore)  # replays `loader`
    kept = DataInfInfluence(model, loss).fit(loader)       # keeps the gradients
    assert torch.allclose(infl.train_influences(x[:2], y[:2]),
                          kept.train_influences(x[:2], y[:2]))
    ```
"""

from __future__ import annotations

from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import torch

from ..errors import StoreMismatchError
from ..factored import Rows
from ..rows import batch_digest
from .base import GradientStore

__all__ = ["RecomputeGradientStore", "GradientFn"]


GradientFn = Callable[[torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]
"""`gradients(x, y) -> {block: (b, d_l)}`: the per-sample gradients of a batch."""


class RecomputeGradientStore(GradientStore):
    """Keeps no gradients: every read replays the training loader.

    Memory is $O(1)$ per row (the per-block norms and $\\lambda_l$ live in the
    model). Each full read costs one pass of per-sample gradients over the
    training data, so a full influence matrix costs two passes (factors, then
    the matrix), whatever the number of test points, as long as the test
    factors fit the factor memory budget.

    The store keeps the loader: it must yield the same batches in the same
    order as during `fit` (no shuffling). A digest of every batch is recorded
    at `fit` and checked on replay; a different batch raises
    [StoreMismatchError][pydvl_datainf.errors.StoreMismatchError].

    Args:
        block_names: block names, in order.
        data: the training loader used for `fit`, yielding `(x, y)`.
        gradients: a plain function `gradients(x, y) -> {block: (b, d_l)}`
            computing the per-sample gradients of a batch (the store never
            sees the model).
        verify: check batch digests on replay.

    Example:
        ```python
        import torch
        from pydvl_datainf.storage import RecomputeGradientStore

        x, y = torch.randn(6, 2), torch.zeros(6)
        batches = [(x[:3], y[:3]), (x[3:], y[3:])]
        store = RecomputeGradientStore(["w"], batches, lambda x, y: {"w": 2 * x})
        for bx, by in batches:  # what `fit` does
            store.note_batch(bx, by)
            store.append({"w": 2 * bx})
        store.finalize()
        store.read(2, 4)["w"]  # recomputed: 2 * x[2:4]
        ```
    """

    random_access = False

    def __init__(
        self,
        block_names: Sequence[str],
        data: Iterable[Any],
        gradients: GradientFn,
        *,
        verify: bool = True,
    ):
        super().__init__(block_names)
        if not callable(gradients):
            raise TypeError(
                "gradients must be a function gradients(x, y) -> {block: (b, d)}, "
                f"got {type(gradients).__name__}"
            )
        self.loader = data
        """The replayed training loader."""
        self.gradients = gradients
        self.verify = verify
        self._digests: List[bytes] = []
        self._n = 0
        self.passes = 0
        """Number of replays of the loader so far (for accounting)."""

    @property
    def n(self) -> int:
        return self._n

    def note_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.verify:
            self._digests.append(batch_digest(x, y))

    def append(self, grads: Mapping[str, Rows]) -> None:
        self._check_append(grads)
        self._n += len(next(iter(grads.values())))

    def _batches(self) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        self.passes += 1
        offset = 0
        b = 0
        for batch in self.loader:
            x, y = batch
            if len(x) == 0:
                continue
            if self.verify:
                if b >= len(self._digests) or batch_digest(x, y) != self._digests[b]:
                    raise StoreMismatchError(
                        f"The training loader yields other data than at fit (batch "
                        f"{b}, rows from {offset}). A recompute store replays the "
                        f"loader: use a deterministic loader (shuffle=False) and do "
                        f"not change the data set."
                    )
            yield offset, dict(self.gradients(x, y))
            offset += len(x)
            b += 1
        if offset != self._n:
            raise StoreMismatchError(
                f"The training loader yielded {offset} rows on replay, {self._n} at "
                f"fit; it must yield the same data in the same order."
            )

    def chunks(
        self, rows: Optional[int] = None
    ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        if rows is None:
            yield from self._batches()
            return
        rows = max(1, rows)
        buf: Dict[str, List[torch.Tensor]] = {k: [] for k in self.block_names}
        buffered = 0
        start = 0
        for _, grads in self._batches():
            for k in self.block_names:
                buf[k].append(grads[k])
            buffered += len(next(iter(grads.values())))
            while buffered >= rows:
                cat = {k: torch.cat(v) for k, v in buf.items()}
                yield start, {k: v[:rows] for k, v in cat.items()}
                buf = {k: [v[rows:]] for k, v in cat.items()}
                buffered -= rows
                start += rows
        if buffered:
            yield start, {k: torch.cat(v) for k, v in buf.items()}

    def read(self, start: int, stop: int) -> Dict[str, torch.Tensor]:
        return self.take(torch.arange(start, min(stop, self._n)))

    def take(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Rows at `index`, by one replay of the loader (slow: prefer `chunks`)."""
        idx = index.detach().to("cpu", torch.long)
        parts: Dict[str, List[torch.Tensor]] = {k: [] for k in self.block_names}
        positions: List[torch.Tensor] = []
        for offset, grads in self._batches():
            k0 = len(next(iter(grads.values())))
            mask = (idx >= offset) & (idx < offset + k0)
            if mask.any():
                where = torch.nonzero(mask).flatten()
                positions.append(where)
                for k in self.block_names:
                    parts[k].append(grads[k][(idx[where] - offset).to(grads[k].device)])
        order = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return {k: torch.cat(v)[inverse.to(v[0].device)] for k, v in parts.items() if v}
