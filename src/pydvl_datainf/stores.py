"""Gradient stores: where `fit` keeps the per-sample training gradients.

A store holds, for each block $l$, the $(n, d_l)$ matrix of per-sample training
gradients, written once during `fit` in row order and read in chunks of rows by
queries. Every query of [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence]
reads gradients through this interface only, so results do not depend on where
(or in how many chunks) they are kept.

* [MemoryGradientStore][pydvl_datainf.stores.MemoryGradientStore]: tensors in
  memory (CPU or the model's device).

Example:
    ```python
    import torch
    from pydvl_datainf.stores import MemoryGradientStore

    store = MemoryGradientStore(["a", "b"])
    store.append({"a": torch.ones(2, 3), "b": torch.zeros(2, 1)})
    store.finalize()
    store.n  # 2
    ```
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["GradientStore", "MemoryGradientStore"]


class GradientStore(ABC):
    """Per-block matrices of per-sample training gradients, appended in row order."""

    def __init__(self, block_names: Sequence[str]):
        self.block_names: List[str] = list(block_names)
        self._finalized = False

    @property
    @abstractmethod
    def n(self) -> int:
        """Number of rows (training samples) written so far."""

    @abstractmethod
    def append(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Append the rows of a batch: one `(b, d_l)` tensor per block."""

    def finalize(self) -> None:
        """Mark the store complete; no more appends."""
        self._finalized = True

    @abstractmethod
    def chunks(
        self, rows: Optional[int] = None
    ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        """Yield `(start_row, {block: (k, d_l) tensor})` over all rows.

        Args:
            rows: the number of rows per chunk; `None` lets the store choose.
        """

    @abstractmethod
    def take(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The rows at `index` (a 1-D integer tensor), per block."""

    def to(self, device: torch.device) -> GradientStore:
        """Move in-memory tensors to `device` (no-op for on-disk stores)."""
        return self

    def _check_append(self, grads: Mapping[str, torch.Tensor]) -> None:
        if self._finalized:
            raise RuntimeError("Cannot append to a finalized gradient store")
        if list(grads) != self.block_names:
            raise ValueError(
                f"Expected gradients for blocks {self.block_names}, got {list(grads)}"
            )
        lengths = {len(g) for g in grads.values()}
        if len(lengths) != 1:
            raise ValueError(f"Blocks have different numbers of rows: {lengths}")


class MemoryGradientStore(GradientStore):
    """Keeps every block's gradients as one tensor in memory."""

    def __init__(self, block_names: Sequence[str]):
        super().__init__(block_names)
        self._parts: Dict[str, List[torch.Tensor]] = {k: [] for k in self.block_names}
        self._data: Dict[str, torch.Tensor] = {}
        self._n = 0

    @property
    def n(self) -> int:
        return self._n

    def append(self, grads: Mapping[str, torch.Tensor]) -> None:
        self._check_append(grads)
        for k, g in grads.items():
            self._parts[k].append(g.detach())
        self._n += len(next(iter(grads.values())))

    def finalize(self) -> None:
        super().finalize()
        self._data = {k: torch.cat(v) for k, v in self._parts.items() if v}
        self._parts = {k: [] for k in self.block_names}

    @property
    def data(self) -> Dict[str, torch.Tensor]:
        """The `(n, d_l)` gradient matrix of each block."""
        if not self._finalized:
            self.finalize()
        return self._data

    def chunks(
        self, rows: Optional[int] = None
    ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        data = self.data
        step = self._n if rows is None else max(1, rows)
        for start in range(0, self._n, step):
            yield start, {k: v[start : start + step] for k, v in data.items()}

    def take(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        data = self.data
        return {k: v[index.to(v.device)] for k, v in data.items()}

    def to(self, device: torch.device) -> MemoryGradientStore:
        self._data = {k: v.to(device) for k, v in self.data.items()}
        return self
