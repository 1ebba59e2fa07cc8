r"""The gradient store interface and what `fit` records besides gradients.

A store holds, for each block $l$, the $(n, d_l)$ matrix of per-sample training
gradients, written once during `fit` in row order and read in chunks of rows by
queries. Every query reads gradients through this interface only, so results
do not depend on where (or in how many chunks) they are kept.

Example:
    ```python
    import torch
    from pydvl_datainf.storage import MemoryGradientStore

    with MemoryGradientStore(["a", "b"]) as store:
        store.append({"a": torch.ones(2, 3), "b": torch.zeros(2, 1)})
        store.finalize()
        assert store.n == 2
    ```
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import TracebackType
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

import torch

from ..factored import Rows

__all__ = [
    "GradientStore",
    "FitState",
    "DEFAULT_CHUNK_BYTES",
    "default_chunk_rows",
    "trim_heap",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Target size of one chunk of rows over all blocks (64 MiB)."""

_libc: Any = None


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's `malloc_trim`; no-op elsewhere).

    Interleaving per-sample gradient buffers with chunk buffers of a few MB
    fragments glibc's heap, whose freed pages it would otherwise keep: without
    this, the resident memory of a long `fit` into Zarr grows with $n$.
    """
    global _libc
    if _libc is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def default_chunk_rows(row_bytes: int, target_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk over all blocks is about `target_bytes`.

    A power of two between 16 and 65536.

    Example:
        >>> default_chunk_rows(4 * 12_000)
        1024
    """
    rows = max(1, target_bytes // max(1, row_bytes))
    p = 1 << (int(rows).bit_length() - 1)
    return int(min(max(p, 16), 65536))


@dataclass
class FitState:
    """What `fit` learned besides the gradients; persisted by Zarr stores.

    Attributes:
        n_train: number of training samples $n$.
        regularization: the resolved $\\lambda_l$ per block.
        regularization_spec: the spec they came from (`"auto"` or floats).
        regularization_scale: $c$ in the `"auto"` rule.
        squared_norms: $\\lVert g_{il}\\rVert^2$, `(n,)` per block (from the
            exact gradients, before any half-precision rounding).
        weights_digest: SHA-256 of the trainable weights at fit.
        block_structure: `{block: [parameter names]}`.
        block_shapes: `{block: [parameter shapes]}`.
        frozen_digest: digest of every other parameter and buffer of the
            model (the frozen base of a LoRA model), see
            [frozen_digest][pydvl_datainf.fingerprint.frozen_digest].
        rows_digest: SHA-256 of the training rows' digests, in the order of
            the fit pass.
        extra: more JSON-serialisable facts about the fit (for example the
            loss), saved and loaded as they are.

    Example:
        ```python
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from pydvl_datainf import DataInfInfluence, ZarrGradientStore

        model, loss = torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy
        x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
        DataInfInfluence(model, loss, store="zarr", store_path="grads.zarr",
                         regularization=0.5).fit(DataLoader(TensorDataset(x, y), 8))
        state = ZarrGradientStore.open("grads.zarr").load_fit_state()
        assert state.n_train == 20 and state.regularization == {"": 0.5}
        ```
    """

    n_train: int
    regularization: Dict[str, float]
    regularization_spec: Dict[str, Union[float, str]]
    regularization_scale: float
    squared_norms: Dict[str, torch.Tensor]
    weights_digest: str
    block_structure: Dict[str, List[str]]
    block_shapes: Dict[str, List[List[int]]] = field(default_factory=dict)
    frozen_digest: str = ""
    rows_digest: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


class GradientStore(ABC):
    """Per-block matrices of per-sample training gradients, appended in row order.

    Subclasses implement `n`, `append`, `chunks` and `take`; `read` and
    `iter_chunks` have generic implementations on top of them.

    Attributes:
        random_access: whether `read` and `take` are cheap (no recomputation).
        accepts_factored: whether `append` takes
            [FactoredGrads][pydvl_datainf.factored.FactoredGrads] blocks; `fit`
            passes dense rows to stores that do not.

    Example:
        ```python
        import torch
        from pydvl_datainf.storage import MemoryGradientStore

        store = MemoryGradientStore(["w"])
        store.append({"w": torch.arange(10.0).reshape(5, 2)})
        store.finalize()
        for index, start, grads in store.iter_chunks(2):
            print(index, start, grads["w"].shape)  # (<=2, d_l), rows start..start+1
        assert [s for _, s, _ in store.iter_chunks(2)] == [0, 2, 4]
        ```
    """

    random_access: bool = True
    accepts_factored: bool = False
    _trim_heap: bool = False  # return freed chunk buffers to the OS after each read

    def __init__(self, block_names: Sequence[str]):
        self.block_names: List[str] = list(block_names)
        self._finalized = False

    @property
    @abstractmethod
    def n(self) -> int:
        """Number of rows (training samples) written so far."""

    @abstractmethod
    def append(self, grads: Mapping[str, Rows]) -> None:
        """Append the rows of a batch: one `(b, d_l)` tensor per block (or its
        factors, if the store `accepts_factored`)."""

    def note_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Called by `fit` with the inputs of each batch before its `append`."""
        return None

    def finalize(self, publish: bool = True) -> None:
        """Mark the store complete; no more appends.

        Args:
            publish: also [publish][pydvl_datainf.storage.base.GradientStore.publish]
                it (`fit` publishes after saving its state).
        """
        self._finalized = True

    def publish(self) -> None:
        """Make a finished store visible at its path (a no-op for stores that
        are not built aside)."""
        return None

    def save_fit_state(self, state: FitState) -> None:
        """Persist what `fit` learned (no-op except for on-disk stores)."""
        return None

    @property
    def chunk_rows(self) -> Optional[int]:
        """The natural number of rows per chunk (aligned reads), if any."""
        return None

    @abstractmethod
    def chunks(
        self, rows: Optional[int] = None
    ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        """Yield `(start_row, {block: (k, d_l) tensor})` over all rows.

        Args:
            rows: the number of rows per chunk; `None` lets the store choose.
        """

    def iter_chunks(
        self, rows: int, wanted: Optional[Iterable[int]] = None, buffers: int = 0
    ) -> Iterator[Tuple[int, int, Dict[str, torch.Tensor]]]:
        """Yield `(chunk_index, start_row, grads)` for chunks of exactly `rows` rows.

        Args:
            rows: rows per chunk (the last one may be shorter).
            wanted: chunk indices to yield (all if `None`). Random-access stores
                read only these; others stream and skip.
            buffers: allow the store to read into this many sets of buffers
                used in rotation (`0`: fresh memory for every chunk). A chunk
                yielded with `buffers=b` stays valid until `b - 1` further
                chunks have been requested: a consumer that reads ahead
                `depth` chunks asks for `depth + 2`. Stores without such a
                read path ignore it.
        """
        keep = None if wanted is None else set(wanted)
        if self.random_access:
            todo = self.wanted_chunks(rows, wanted)

            def read(c: int) -> Dict[str, torch.Tensor]:
                return self.read(c * rows, min(self.n, (c + 1) * rows))

            # Reading ahead is the caller's choice (the operator's prefetching
            # reader), so that chunks are never read ahead twice.
            for c in todo:
                data = read(c)
                yield c, c * rows, data
                del data
                if self._trim_heap:
                    trim_heap()
            return
        for start, grads in self.chunks(rows):
            c = start // rows
            if keep is None or c in keep:
                yield c, start, grads

    def wanted_chunks(
        self, rows: int, wanted: Optional[Iterable[int]] = None
    ) -> List[int]:
        """The indices of the chunks of `rows` rows to read, in order (all if `wanted` is `None`).

        Example:
            ```python
            import torch
            from pydvl_datainf.storage import MemoryGradientStore

            store = MemoryGradientStore(["w"])
            store.append({"w": torch.zeros(5, 2)})
            assert store.wanted_chunks(2) == [0, 1, 2]
            assert store.wanted_chunks(2, [2, 0, 7]) == [0, 2]
            ```
        """
        keep = None if wanted is None else set(wanted)
        return [c for c in range(-(-self.n // rows)) if keep is None or c in keep]

    def read(self, start: int, stop: int) -> Dict[str, torch.Tensor]:
        """Rows `start:stop` of every block."""
        return self.take(torch.arange(start, stop))

    @abstractmethod
    def take(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The rows at `index` (a 1-D integer tensor), per block."""

    def to(self, device: torch.device) -> GradientStore:
        """Move in-memory tensors to `device` (no-op for on-disk stores)."""
        return self

    def close(self) -> None:
        """Release what the store holds that outlives it (a temporary directory
        it created is removed). The store must not be used afterwards. Safe to
        call more than once; stores without such resources do nothing."""
        return None

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def _check_append(self, grads: Mapping[str, Rows]) -> None:
        if self._finalized:
            raise RuntimeError("Cannot append to a finalized gradient store")
        if list(grads) != self.block_names:
            raise ValueError(
                f"Expected gradients for blocks {self.block_names}, got {list(grads)}"
            )
        lengths = {len(g) for g in grads.values()}
        if len(lengths) != 1:
            raise ValueError(f"Blocks have different numbers of rows: {lengths}")
