"""A gradient store that starts in memory and spills to Zarr past a budget.

Example:
    ```python
    import torch
    from pydvl_datainf.storage import AutoGradientStore, ZarrGradientStore

    store = AutoGradientStore(["w"], 100, lambda: ZarrGradientStore("g.zarr", ["w"]))
    store.append({"w": torch.randn(10, 4)})  # 160 bytes > 100: spills
    store.finalize()
    assert type(store.resolved).__name__ == "ZarrGradientStore"
    ```
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch

from ..factored import Rows, rows_nbytes
from .base import FitState, GradientStore
from .memory import MemoryGradientStore

__all__ = ["AutoGradientStore"]

logger = logging.getLogger(__name__)


class AutoGradientStore(GradientStore):
    """Memory while the gradients fit `budget_bytes`, then a Zarr store.

    When an append would exceed the budget, the rows kept so far are written
    to a new [ZarrGradientStore][pydvl_datainf.storage.ZarrGradientStore] and
    all further rows go there. After `finalize`, `resolved` is the store
    actually used.

    Args:
        block_names: block names, in order.
        budget_bytes: the most bytes of gradients kept in memory.
        zarr_factory: creates the Zarr store when needed.

    Example:
        ```python
        import os
        import torch
        from pydvl_datainf.storage import AutoGradientStore, ZarrGradientStore

        store = AutoGradientStore(
            ["w"], 10**9, lambda: ZarrGradientStore("grads.zarr", ["w"])
        )
        store.append({"w": torch.randn(10, 4)})  # well under the budget
        store.finalize()
        assert type(store.resolved).__name__ == "MemoryGradientStore"
        assert not os.path.exists("grads.zarr")  # never created
        ```
    """

    def __init__(
        self,
        block_names: Sequence[str],
        budget_bytes: int,
        zarr_factory: Callable[[], GradientStore],
    ):
        super().__init__(block_names)
        self.budget_bytes = int(budget_bytes)
        self._factory = zarr_factory
        self._memory: Optional[MemoryGradientStore] = MemoryGradientStore(block_names)
        self._inner: GradientStore = self._memory

    @property
    def resolved(self) -> GradientStore:
        """The store holding the gradients (memory or Zarr)."""
        return self._inner

    @property
    def n(self) -> int:
        return self._inner.n

    @property
    def random_access(self) -> bool:  # type: ignore[override]
        return self._inner.random_access

    accepts_factored = True

    def append(self, grads: Mapping[str, Rows]) -> None:
        self._check_append(grads)
        if self._memory is not None:
            new = sum(rows_nbytes(g) for g in grads.values())
            if self._memory.nbytes + new > self.budget_bytes:
                disk = self._factory()
                logger.info(
                    "Gradients exceed the memory budget of %.3g GB: spilling to %s",
                    self.budget_bytes / 1e9,
                    getattr(disk, "path", disk),
                )
                for part in self._memory.appended():
                    disk.append(part)
                self._memory = None
                self._inner = disk
        self._inner.append(grads)

    def note_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self._inner.note_batch(x, y)

    def finalize(self, publish: bool = True) -> None:
        self._inner.finalize(publish)
        super().finalize(publish)

    def publish(self) -> None:
        self._inner.publish()

    def save_fit_state(self, state: FitState) -> None:
        self._inner.save_fit_state(state)

    @property
    def chunk_rows(self) -> Optional[int]:
        return self._inner.chunk_rows

    def chunks(
        self, rows: Optional[int] = None
    ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        return self._inner.chunks(rows)

    def read(self, start: int, stop: int) -> Dict[str, torch.Tensor]:
        return self._inner.read(start, stop)

    def take(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self._inner.take(index)

    def to(self, device: torch.device) -> GradientStore:
        self._inner = self._inner.to(device)
        return self

    def close(self) -> None:
        """Close the store holding the gradients (a Zarr store removes its
        temporary directory, if it owns one)."""
        self._inner.close()
