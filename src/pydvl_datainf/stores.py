r"""Gradient stores: where `fit` keeps the per-sample training gradients.

A store holds, for each block $l$, the $(n, d_l)$ matrix of per-sample training
gradients, written once during `fit` in row order and read in chunks of rows by
queries. Every query of [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence]
reads gradients through this interface only, so results do not depend on where
(or in how many chunks) they are kept.

| store | memory | queries read | reopen without refit |
| --- | --- | --- | --- |
| [MemoryGradientStore][pydvl_datainf.stores.MemoryGradientStore] | $n \sum_l d_l$ floats | RAM | no |
| [ZarrGradientStore][pydvl_datainf.stores.ZarrGradientStore] | one chunk of rows | disk / object storage | yes |
| [RecomputeGradientStore][pydvl_datainf.stores.RecomputeGradientStore] | nothing per row | the training loader, again | no |
| [AutoGradientStore][pydvl_datainf.stores.AutoGradientStore] | memory below a budget, then Zarr | either | when spilled |

The per-block squared norms and $\lambda_l$ ($O(nL)$ numbers) always live in
the [DataInfInfluence][pydvl_datainf.influence.DataInfInfluence] itself, and a
Zarr store also records them (see
[FitState][pydvl_datainf.stores.FitState]) so that a fitted model can be
reopened from disk.

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

import ctypes
import logging
import os
import sys
import threading
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import numpy as np
import torch

from .errors import NonFiniteGradientError, StoreExistsError, StoreMismatchError
from .factored import FactoredGrads, RowParts, Rows, densify, rows_nbytes
from .rows import batch_digest

__all__ = [
    "GradientStore",
    "MemoryGradientStore",
    "ZarrGradientStore",
    "RecomputeGradientStore",
    "AutoGradientStore",
    "FitState",
    "STORE_DTYPES",
    "default_chunk_rows",
    "open_zarr_group",
    "library_version",
]

logger = logging.getLogger(__name__)

Blockwise = Dict[str, torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]

STORE_DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
"""Dtypes a [ZarrGradientStore][pydvl_datainf.stores.ZarrGradientStore] can
keep gradients in. Half types halve the disk; reads return float32."""

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Target size of one chunk of rows over all blocks (64 MiB)."""

_FORMAT = "pydvl_datainf.gradient_store"
_FORMAT_VERSION = 1


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


def library_version() -> str:
    """The installed version of pydvl-datainf (`"0.0.0"` from a source tree)."""
    try:
        return version("pydvl-datainf")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


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


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


ZarrMode = Literal["r", "r+", "a", "w", "w-"]


def open_zarr_group(
    path: PathLike,
    mode: ZarrMode,
    storage_options: Optional[Mapping[str, Any]] = None,
) -> Any:
    """Open a Zarr group at a local path or any fsspec URL (`s3://`, `gs://`, ...).

    Args:
        path: a local path, `file://` path, or fsspec URL.
        mode: Zarr's mode: `"r"`, `"r+"`, `"a"`, `"w"` or `"w-"`.
        storage_options: passed to fsspec for URLs.

    Returns:
        The `zarr.Group`.

    Example:
        ```python
        group = open_zarr_group("s3://bucket/grads.zarr", "r",
                                storage_options={"anon": False})
        group.attrs["n"]
        ```
    """
    import zarr

    p = _local(os.fspath(path))
    if _is_url(p):
        return zarr.open_group(
            store=p, mode=mode, storage_options=dict(storage_options or {})
        )
    return zarr.open_group(store=p, mode=mode)


def zarr_group_exists(
    path: PathLike, storage_options: Optional[Mapping[str, Any]] = None
) -> bool:
    """Whether a Zarr group (of any content) exists at `path`."""
    try:
        open_zarr_group(path, "r", storage_options)
    except (FileNotFoundError, KeyError, ValueError):
        return False
    except Exception:  # e.g. zarr's GroupNotFoundError
        return False
    return True


def _torch_to_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Cast to the stored dtype and return numpy (bfloat16 as raw uint16 bits)."""
    t = t.detach().to(device="cpu", dtype=dtype).contiguous()
    if dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _numpy_to_torch(a: np.ndarray, stored: torch.dtype) -> torch.Tensor:
    """Back to torch, half types widened to float32."""
    if stored == torch.bfloat16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16))
        return t.view(torch.bfloat16).to(torch.float32)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if stored == torch.float16:
        return t.to(torch.float32)
    return t


def read_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype reads return for a stored dtype: half types widen to float32."""
    return torch.float32 if stored in (torch.float16, torch.bfloat16) else stored


def _numpy_dtype(stored: torch.dtype) -> str:
    return {
        torch.float16: "float16",
        torch.bfloat16: "uint16",
        torch.float32: "float32",
        torch.float64: "float64",
    }[stored]


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in STORE_DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"Unsupported store dtype {dtype}")


def resolve_store_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """`None`, a name from [STORE_DTYPES][pydvl_datainf.stores.STORE_DTYPES] or a
    torch dtype, checked."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in STORE_DTYPES.values():
            raise ValueError(
                f"store dtype must be one of {list(STORE_DTYPES)}, got {dtype}"
            )
        return dtype
    try:
        return STORE_DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(
            f"store dtype must be one of {list(STORE_DTYPES)}, got {dtype!r}"
        ) from None


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

    Example:
        ```python
        state = ZarrGradientStore.open("grads.zarr").load_fit_state()
        state.n_train, state.regularization
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
        for index, start, grads in store.iter_chunks(1024):
            grads["l1.lora_A"].shape  # (<=1024, d_l), rows start..start+1023
        ```
    """

    random_access: bool = True
    accepts_factored: bool = False
    _prefetch: bool = False  # read the next chunk in a thread while one is used

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

    def finalize(self) -> None:
        """Mark the store complete; no more appends."""
        self._finalized = True

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
        self, rows: int, wanted: Optional[Iterable[int]] = None
    ) -> Iterator[Tuple[int, int, Dict[str, torch.Tensor]]]:
        """Yield `(chunk_index, start_row, grads)` for chunks of exactly `rows` rows.

        Args:
            rows: rows per chunk (the last one may be shorter).
            wanted: chunk indices to yield (all if `None`). Random-access stores
                read only these; others stream and skip.
        """
        keep = None if wanted is None else set(wanted)
        if self.random_access:
            n_chunks = -(-self.n // rows)
            todo = [c for c in range(n_chunks) if keep is None or c in keep]

            def read(c: int) -> Dict[str, torch.Tensor]:
                return self.read(c * rows, min(self.n, (c + 1) * rows))

            if not self._prefetch or len(todo) < 2:
                for c in todo:
                    yield c, c * rows, read(c)
                return
            with ThreadPoolExecutor(1, thread_name_prefix="datainf-read") as pool:
                nxt = pool.submit(read, todo[0])
                for i, c in enumerate(todo):
                    data = nxt.result()
                    if i + 1 < len(todo):
                        nxt = pool.submit(read, todo[i + 1])
                    yield c, c * rows, data
                    del data
                    trim_heap()
            return
        for start, grads in self.chunks(rows):
            c = start // rows
            if keep is None or c in keep:
                yield c, start, grads

    def read(self, start: int, stop: int) -> Dict[str, torch.Tensor]:
        """Rows `start:stop` of every block."""
        return self.take(torch.arange(start, stop))

    @abstractmethod
    def take(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The rows at `index` (a 1-D integer tensor), per block."""

    def to(self, device: torch.device) -> GradientStore:
        """Move in-memory tensors to `device` (no-op for on-disk stores)."""
        return self

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
        store = MemoryGradientStore(["w"])
        store.append({"w": torch.randn(5, 3)})
        store.finalize()
        [start for start, _ in store.chunks(2)]  # [0, 2, 4]
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
        blocks = {k: self._block(k) for k in self.block_names}
        for lo, hi in zip(self._batch_starts, self._batch_starts[1:]):
            yield {k: b[lo:hi] for k, b in blocks.items()}

    def finalize(self) -> None:
        if self._finalized:
            return
        super().finalize()
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


class ZarrGradientStore(GradientStore):
    """Gradients in a Zarr group: one `(n, d_l)` array per block, chunked by rows.

    Written during `fit` in whole chunks of `chunk_rows` rows (rows are buffered
    until a chunk is full), so `fit` never holds more than one chunk. The group
    records, in its attributes: block names and sizes, dtype, chunk rows, $n$,
    $\\lambda_l$, the regularization spec, the SHA-256 of the fitted weights,
    the block structure and the library version; per-block squared norms are
    arrays. `complete` is set last, so an interrupted fit is recognisable.

    Gradients can be kept in `float16` or `bfloat16` to halve the disk; reads
    return float32, so all products accumulate in float32. `float16` overflows
    above 65504 (an error names the block); `bfloat16` keeps float32's range
    with 8 bits of mantissa.

    Layout:
        ```
        <path>/            attrs: format, version, block_names, block_sizes, dtype,
                                  chunk_rows, n, regularization, weights_digest, ...
        <path>/grads/<i>   (n, d_i), chunks (chunk_rows, d_i)
        <path>/norms/<i>   (n,), squared norms of block i
        ```

    Args:
        path: a local path or fsspec URL (`s3://bucket/grads.zarr`, ...).
        block_names: block names, in order.
        dtype: stored dtype (`"float16"`, `"bfloat16"`, `"float32"`,
            `"float64"`); `None` keeps the dtype of the gradients.
        chunk_rows: rows per chunk; `None` picks about 64 MiB per chunk.
        overwrite: replace an existing store; otherwise an existing store
            raises [StoreExistsError][pydvl_datainf.errors.StoreExistsError].
        storage_options: fsspec options for URLs (credentials, endpoints).
        compressors: Zarr compressors; default none (gradients compress badly).

    Example:
        ```python
        store = ZarrGradientStore("grads.zarr", ["w"], dtype="bfloat16")
        store.append({"w": torch.randn(10, 4)})
        store.finalize()
        reopened = ZarrGradientStore.open("grads.zarr")
        reopened.read(0, 3)["w"].dtype  # torch.float32
        ```
    """

    _prefetch = True

    def __init__(
        self,
        path: PathLike,
        block_names: Sequence[str],
        *,
        dtype: Union[None, str, torch.dtype] = None,
        chunk_rows: Optional[int] = None,
        overwrite: bool = False,
        storage_options: Optional[Mapping[str, Any]] = None,
        compressors: Any = None,
    ):
        super().__init__(block_names)
        self.path = os.fspath(path)
        self.storage_options = dict(storage_options or {})
        self._dtype = resolve_store_dtype(dtype)
        self._chunk_rows = None if chunk_rows is None else int(chunk_rows)
        if self._chunk_rows is not None and self._chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self._compressors = compressors
        self._lock = threading.RLock()
        self._arrays: Optional[List[Any]] = None
        self._group: Any = None
        self._buffer: Dict[str, List[np.ndarray]] = {k: [] for k in self.block_names}
        self._buffered = 0
        self._n = 0
        self._sizes: List[int] = []
        self._writer: Optional[ThreadPoolExecutor] = None
        self._pending: List[Future] = []
        if not overwrite and zarr_group_exists(self.path, self.storage_options):
            raise StoreExistsError(
                f"A Zarr store already exists at {self.path!r}. Pass overwrite=True "
                f"(store_options={{'overwrite': True}} to DataInfInfluence) to "
                f"replace it, or reopen it with DataInfInfluence.from_store."
            )
        self._group = open_zarr_group(self.path, "w", self.storage_options)
        self._group.attrs.update(
            {
                "format": _FORMAT,
                "format_version": _FORMAT_VERSION,
                "library_version": library_version(),
                "block_names": self.block_names,
                "store_id": uuid.uuid4().hex,
                "finalized": False,
                "complete": False,
            }
        )

    # --------------------------------------------------------------- reading
    @classmethod
    def open(
        cls,
        path: PathLike,
        storage_options: Optional[Mapping[str, Any]] = None,
    ) -> ZarrGradientStore:
        """Open a finalized store for reading.

        Args:
            path: where it was written.
            storage_options: fsspec options for URLs.

        Raises:
            FileNotFoundError: nothing at `path`.
            StoreMismatchError: not a gradient store, or never finalized (the
                fit that wrote it was interrupted).
        """
        path = os.fspath(path)
        try:
            group = open_zarr_group(path, "r", storage_options)
        except FileNotFoundError:
            raise
        except Exception as e:  # zarr raises its own not-found errors
            raise FileNotFoundError(f"No Zarr gradient store at {path!r}: {e}") from e
        attrs = dict(group.attrs)
        if attrs.get("format") != _FORMAT:
            raise StoreMismatchError(
                f"The Zarr group at {path!r} is not a pydvl-datainf gradient store "
                f"(format {attrs.get('format')!r})"
            )
        if not attrs.get("finalized"):
            raise StoreMismatchError(
                f"The gradient store at {path!r} is incomplete: the fit that wrote "
                f"it did not finish. Fit again with overwrite."
            )
        self = cls.__new__(cls)
        GradientStore.__init__(self, attrs["block_names"])
        self.path = path
        self.storage_options = dict(storage_options or {})
        self._dtype = STORE_DTYPES[attrs["dtype"]]
        self._chunk_rows = int(attrs["chunk_rows"])
        self._compressors = None
        self._lock = threading.RLock()
        self._group = group
        self._arrays = None
        self._buffer = {k: [] for k in self.block_names}
        self._buffered = 0
        self._writer = None
        self._pending = []
        self._n = int(attrs["n"])
        self._sizes = [int(s) for s in attrs["block_sizes"]]
        self._finalized = True
        return self

    @property
    def attrs(self) -> Dict[str, Any]:
        """The group's attributes (a copy)."""
        return dict(self._get_group().attrs)

    @property
    def n(self) -> int:
        return self._n

    @property
    def store_id(self) -> str:
        """A random id written when the store was created (changes on overwrite)."""
        return str(self._get_group().attrs.get("store_id", ""))

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The stored dtype (`None` until the first append when not given)."""
        return self._dtype

    @property
    def block_sizes(self) -> List[int]:
        """$d_l$ per block (empty until the first append)."""
        return list(self._sizes)

    @property
    def chunk_rows(self) -> Optional[int]:
        return self._chunk_rows

    @property
    def nbytes(self) -> int:
        """Bytes of gradients on disk (uncompressed)."""
        if self._dtype is None:
            return 0
        item = torch.empty(0, dtype=self._dtype).element_size()
        return self._n * sum(self._sizes) * item

    @property
    def is_complete(self) -> bool:
        """Whether `fit` finished and saved its state in this store."""
        return bool(self._get_group().attrs.get("complete", False))

    def _get_group(self) -> Any:
        with self._lock:
            if self._group is None:
                self._group = open_zarr_group(self.path, "r", self.storage_options)
            return self._group

    def _get_arrays(self) -> List[Any]:
        with self._lock:
            if self._arrays is None:
                group = self._get_group()
                self._arrays = [
                    group[f"grads/{i}"] for i in range(len(self.block_names))
                ]
            return self._arrays

    def read(self, start: int, stop: int) -> Dict[str, torch.Tensor]:
        assert self._dtype is not None
        stop = min(stop, self._n)
        arrays = self._get_arrays()
        return {
            k: _numpy_to_torch(a[start:stop], self._dtype)
            for k, a in zip(self.block_names, arrays)
        }

    def chunks(
        self, rows: Optional[int] = None
    ) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
        step = (self._chunk_rows or 1024) if rows is None else max(1, rows)
        for start in range(0, self._n, step):
            yield start, self.read(start, start + step)

    def take(self, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        assert self._dtype is not None
        idx = index.detach().to("cpu", torch.long).numpy()
        if len(idx) == 0:
            return {
                k: torch.zeros(0, d, dtype=read_dtype(self._dtype))
                for k, d in zip(self.block_names, self._sizes)
            }
        lo, hi = int(idx.min()), int(idx.max()) + 1
        if hi - lo <= 2 * len(idx):  # nearly contiguous: one slice, then gather
            part = self.read(lo, hi)
            sel = torch.from_numpy(idx - lo)
            return {k: v[sel] for k, v in part.items()}
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        out = {}
        for k, a in zip(self.block_names, self._get_arrays()):
            rows = _numpy_to_torch(a.oindex[uniq, :], self._dtype)
            back = torch.empty(len(idx), dtype=torch.long)
            back[torch.from_numpy(order)] = torch.from_numpy(inverse)
            out[k] = rows[back]
        return out

    def load_fit_state(self) -> FitState:
        """The [FitState][pydvl_datainf.stores.FitState] saved by `fit`.

        Raises:
            StoreMismatchError: the fit that wrote the store did not finish.
        """
        attrs = self.attrs
        if not attrs.get("complete"):
            raise StoreMismatchError(
                f"The gradient store at {self.path!r} is incomplete: the fit that "
                f"wrote it did not finish. Fit again with overwrite."
            )
        group = self._get_group()
        norms = {
            k: torch.from_numpy(np.asarray(group[f"norms/{i}"][:]))
            for i, k in enumerate(self.block_names)
        }
        return FitState(
            n_train=int(attrs["n"]),
            regularization={k: float(v) for k, v in attrs["regularization"].items()},
            regularization_spec=dict(attrs["regularization_spec"]),
            regularization_scale=float(attrs["regularization_scale"]),
            squared_norms=norms,
            weights_digest=str(attrs["weights_digest"]),
            block_structure={k: list(v) for k, v in attrs["block_structure"].items()},
            block_shapes={
                k: [list(s) for s in v] for k, v in attrs["block_shapes"].items()
            },
        )

    # --------------------------------------------------------------- writing
    def _create_arrays(self, grads: Mapping[str, torch.Tensor]) -> None:
        first = next(iter(grads.values()))
        if self._dtype is None:
            self._dtype = (
                first.dtype if first.dtype in STORE_DTYPES.values() else torch.float32
            )
        self._sizes = [int(grads[k].shape[1]) for k in self.block_names]
        item = torch.empty(0, dtype=self._dtype).element_size()
        if self._chunk_rows is None:
            self._chunk_rows = default_chunk_rows(sum(self._sizes) * item)
        arrays = []
        for i, d in enumerate(self._sizes):
            arrays.append(
                self._group.create_array(
                    f"grads/{i}",
                    shape=(0, d),
                    chunks=(self._chunk_rows, d),
                    dtype=_numpy_dtype(self._dtype),
                    fill_value=0,
                    compressors=self._compressors,
                    overwrite=True,
                )
            )
        self._arrays = arrays
        self._group.attrs.update(
            {
                "block_sizes": self._sizes,
                "dtype": _dtype_name(self._dtype),
                "chunk_rows": self._chunk_rows,
                "n": 0,
            }
        )

    def append(self, grads: Mapping[str, Rows]) -> None:
        self._check_append(grads)
        dense = {k: densify(g) for k, g in grads.items()}
        with self._lock:
            if self._arrays is None:
                self._create_arrays(dense)
            assert self._dtype is not None and self._chunk_rows is not None
            for k, g in dense.items():
                t = g.detach().to(device="cpu", dtype=self._dtype)
                if t.dtype in (torch.float16, torch.bfloat16) and not bool(
                    torch.isfinite(t).all()
                ):
                    raise NonFiniteGradientError(
                        f"Gradients of block {k!r} overflow {_dtype_name(self._dtype)} "
                        f"(|g| > {torch.finfo(self._dtype).max:.4g}); store them in "
                        f"bfloat16 or float32 instead."
                    )
                self._buffer[k].append(_torch_to_numpy(t, self._dtype))
            self._buffered += len(next(iter(dense.values())))
            self._n += len(next(iter(dense.values())))
            while self._buffered >= self._chunk_rows:
                self._flush(self._chunk_rows)

    def _flush(self, rows: int) -> None:
        """Write the first `rows` buffered rows at the end of every array.

        Writes run in one background thread, in order, so that gradient
        computation overlaps disk I/O; at most one write is pending.
        """
        assert self._arrays is not None
        start = self._n - self._buffered
        heads = []
        for k in self.block_names:
            parts = self._buffer[k]
            data = parts[0] if len(parts) == 1 else np.concatenate(parts)
            heads.append(data[:rows])
            tail = data[rows:]
            self._buffer[k] = [tail] if len(tail) else []
        self._buffered -= rows
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="datainf-write")
        self._pending.append(self._writer.submit(self._write, start, rows, heads))
        while len(self._pending) > 1:
            self._pending.pop(0).result()
            trim_heap()

    def _write(self, start: int, rows: int, heads: List[np.ndarray]) -> None:
        assert self._arrays is not None
        for arr, head in zip(self._arrays, heads):
            arr.resize((start + rows, arr.shape[1]))
            arr[start : start + rows] = head

    def _drain(self) -> None:
        """Wait for pending writes (re-raising their errors) and stop the writer."""
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def finalize(self) -> None:
        with self._lock:
            if self._finalized:
                return
            if self._arrays is None:
                raise RuntimeError("Cannot finalize an empty Zarr gradient store")
            if self._buffered:
                self._flush(self._buffered)
            self._drain()
            self._group.attrs.update({"n": self._n, "finalized": True})
            super().finalize()
        logger.info(
            "Wrote %d gradient rows (%.3g GB, %s) to %s",
            self._n,
            self.nbytes / 1e9,
            _dtype_name(self._dtype) if self._dtype else "?",
            self.path,
        )

    def save_fit_state(self, state: FitState) -> None:
        if not self._finalized:
            raise RuntimeError("Finalize the store before saving the fit state")
        group = self._get_group()
        if group.read_only:
            group = open_zarr_group(self.path, "r+", self.storage_options)
        for i, k in enumerate(self.block_names):
            s = state.squared_norms[k].detach().to("cpu").numpy()
            arr = group.create_array(
                f"norms/{i}",
                shape=s.shape,
                chunks=(max(1, min(len(s), 2**20)),),
                dtype=s.dtype,
                fill_value=0,
                compressors=None,
                overwrite=True,
            )
            arr[:] = s
        group.attrs.update(
            {
                "n_train": state.n_train,
                "regularization": dict(state.regularization),
                "regularization_spec": dict(state.regularization_spec),
                "regularization_scale": state.regularization_scale,
                "weights_digest": state.weights_digest,
                "block_structure": {
                    k: list(v) for k, v in state.block_structure.items()
                },
                "block_shapes": {
                    k: [list(s) for s in v] for k, v in state.block_shapes.items()
                },
            }
        )
        group.attrs["complete"] = True

    # ------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        if not self._finalized:
            raise RuntimeError("A Zarr gradient store can only be pickled after fit")
        state = self.__dict__.copy()
        for k in ("_lock", "_group", "_arrays", "_writer", "_pending"):
            state.pop(k, None)
        state["_buffer"] = {k: [] for k in self.block_names}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._group = None
        self._arrays = None
        self._writer = None
        self._pending = []

    def __repr__(self) -> str:
        dt = _dtype_name(self._dtype) if self._dtype else "?"
        return f"ZarrGradientStore({self.path!r}, n={self._n}, dtype={dt})"


GradsFn = Callable[[torch.Tensor, torch.Tensor, int], Dict[str, torch.Tensor]]
"""`grads_fn(x, y, offset) -> {block: (b, d_l)}`: per-sample gradients of a batch
whose first row is training row `offset`."""


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
        loader: the training loader used for `fit`, yielding `(x, y)`.
        grads_fn: computes per-sample gradients of a batch (the model's).
        verify: check batch digests on replay.

    Example:
        ```python
        infl = DataInfInfluence(model, loss, store="recompute").fit(loader)
        infl.store  # RecomputeGradientStore: replays `loader` on queries
        ```
    """

    random_access = False

    def __init__(
        self,
        block_names: Sequence[str],
        loader: Iterable[Any],
        grads_fn: GradsFn,
        *,
        verify: bool = True,
    ):
        super().__init__(block_names)
        self.loader = loader
        self.grads_fn = grads_fn
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
            yield offset, self.grads_fn(x, y, offset)
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


class AutoGradientStore(GradientStore):
    """Memory while the gradients fit `budget_bytes`, then a Zarr store.

    When an append would exceed the budget, the rows kept so far are written
    to a new [ZarrGradientStore][pydvl_datainf.stores.ZarrGradientStore] and
    all further rows go there. After `finalize`, `resolved` is the store
    actually used.

    Args:
        block_names: block names, in order.
        budget_bytes: the most bytes of gradients kept in memory.
        zarr_factory: creates the Zarr store when needed.

    Example:
        ```python
        store = AutoGradientStore(
            ["w"], 10**9, lambda: ZarrGradientStore("grads.zarr", ["w"])
        )
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

    def finalize(self) -> None:
        self._inner.finalize()
        super().finalize()

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
