r"""Gradients in a Zarr group, on local disk or any fsspec URL, checksummed.

Example:
    ```python
    import torch
    from pydvl_datainf.storage import ZarrGradientStore

    store = ZarrGradientStore("grads.zarr", ["w"], dtype="bfloat16")
    store.append({"w": torch.randn(10, 4)})
    store.finalize()
    n_chunks = ZarrGradientStore.open("grads.zarr").verify()  # reads every chunk
    ```
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
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
    Union,
)

import numpy as np
import torch

from ..errors import NonFiniteGradientError, StoreMismatchError
from ..factored import Rows, densify
from .base import FitState, GradientStore, default_chunk_rows, trim_heap
from .dtypes import (
    STORE_DTYPES,
    dtype_name,
    numpy_dtype,
    numpy_to_torch,
    read_dtype,
    resolve_store_dtype,
    torch_to_numpy,
)
from .format import (
    FORMATS,
    GRADIENT_STORE,
    PathLike,
    RawChunkReader,
    claim_path,
    create_checked_array,
    open_checked_array,
    open_zarr_group,
    read_checked,
    read_manifest,
    verify_array,
    write_manifest,
)

__all__ = ["ZarrGradientStore", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Version of the gradient store format (2: checksummed chunks and a manifest)."""

_WHAT = "gradient store"


def _orthogonal_rows(arr: Any, rows: np.ndarray) -> Any:
    return arr.oindex[rows, :]


def _remove_directory(path: str) -> None:
    """Remove a temporary directory the library created (a finalizer)."""
    try:
        shutil.rmtree(path)
        logger.debug("Removed the temporary directory %s", path)
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - e.g. a file still open on Windows
        logger.warning("Could not remove the temporary directory %s: %s", path, e)


class ZarrGradientStore(GradientStore):
    """Gradients in a Zarr group: one `(n, d_l)` array per block, chunked by rows.

    Written during `fit` in whole chunks of `chunk_rows` rows (rows are buffered
    until a chunk is full), so `fit` never holds more than one chunk. The group
    records, in its attributes: block names and sizes, dtype, chunk rows, $n$,
    $\\lambda_l$, the regularization spec, the SHA-256 of the fitted weights,
    the block structure and the library version; per-block squared norms are
    arrays. `complete` is set last, so an interrupted fit is recognisable.

    Safety (see the Guarantees page of the docs):

    - The store only replaces a directory that holds a gradient store written
      by this library (its `format` marker), and only with `overwrite=True`.
      A non-empty directory it did not create, or an influence matrix, is
      refused with [StoreExistsError][pydvl_datainf.errors.StoreExistsError]
      and never emptied.
    - Every chunk of gradients and norms carries a CRC-32C checksum, and a
      manifest of the finished arrays is written last. Opening checks the
      metadata, the manifest and the array shapes; reading checks that the
      chunks read exist and their checksums; [verify][pydvl_datainf.storage.zarr.ZarrGradientStore.verify]
      reads everything. A missing or damaged chunk raises
      [StoreCorruptError][pydvl_datainf.errors.StoreCorruptError], naming the
      array and the chunk; it never reads as zeros.
    - With `temporary_directory`, the store owns that directory and removes it
      on [close][pydvl_datainf.storage.zarr.ZarrGradientStore.close], when it is
      garbage-collected, and at interpreter exit.

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
        `manifest` (in the attributes) lists every finished array with its
        shape and chunks.

    Args:
        path: a local path or fsspec URL (`s3://bucket/grads.zarr`, ...).
        block_names: block names, in order.
        dtype: stored dtype (`"float16"`, `"bfloat16"`, `"float32"`,
            `"float64"`); `None` keeps the dtype of the gradients.
        chunk_rows: rows per chunk; `None` picks about 64 MiB per chunk.
        overwrite: replace an existing store; otherwise an existing store
            raises [StoreExistsError][pydvl_datainf.errors.StoreExistsError].
        storage_options: fsspec options for URLs (credentials, endpoints).
        compressors: Zarr compressors; default none (gradients compress
            badly). A CRC-32C checksum is always added after them.
        temporary_directory: a directory created for this store alone (the
            store's path is inside it); the store removes it on `close`, when
            garbage-collected, and at interpreter exit.

    Example:
        ```python
        import torch
        from pydvl_datainf.storage import ZarrGradientStore

        g = torch.randn(10, 4)
        store = ZarrGradientStore("grads.zarr", ["w"], dtype="bfloat16")
        store.append({"w": g})
        store.finalize()
        reopened = ZarrGradientStore.open("grads.zarr")
        rows = reopened.read(0, 3)["w"]
        assert rows.dtype == torch.float32  # kept in bfloat16, read as float32
        assert torch.equal(rows, g[:3].bfloat16().float())
        ```
    """

    _trim_heap = True

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
        temporary_directory: Optional[str] = None,
    ):
        super().__init__(block_names)
        self._cleanup: Optional[weakref.finalize] = None
        if temporary_directory is not None:
            self._cleanup = weakref.finalize(
                self, _remove_directory, os.fspath(temporary_directory)
            )
        self.path = os.fspath(path)
        self.storage_options = dict(storage_options or {})
        self._dtype = resolve_store_dtype(dtype)
        self._chunk_rows = None if chunk_rows is None else int(chunk_rows)
        if self._chunk_rows is not None and self._chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self._compressors = compressors
        self._lock = threading.RLock()
        self._arrays: Optional[List[Any]] = None
        self._raw: Optional[List[RawChunkReader]] = None
        self._group: Any = None
        self._buffer: Dict[str, List[np.ndarray]] = {k: [] for k in self.block_names}
        self._buffered = 0
        self._n = 0
        self._sizes: List[int] = []
        self._writer: Optional[ThreadPoolExecutor] = None
        self._pending: List[Future] = []
        self._group = claim_path(
            self.path,
            GRADIENT_STORE,
            overwrite=overwrite,
            storage_options=self.storage_options,
            attributes={
                "format_version": FORMAT_VERSION,
                "block_names": self.block_names,
                "store_id": uuid.uuid4().hex,
                "finalized": False,
                "complete": False,
            },
            exists_hint=(
                "Pass overwrite=True (store_options={'overwrite': True} to "
                "DataInfInfluence) to replace it, or reopen it with "
                "DataInfInfluence.from_store."
            ),
        )

    # --------------------------------------------------------------- reading
    @classmethod
    def open(
        cls,
        path: PathLike,
        storage_options: Optional[Mapping[str, Any]] = None,
    ) -> ZarrGradientStore:
        """Open a finalized store for reading.

        Cheap checks only (metadata): the format and its version, that the
        store was finalized, its manifest, and the shapes and chunks of its
        arrays. Reads check chunks; [verify][pydvl_datainf.storage.zarr.ZarrGradientStore.verify]
        checks all of them.

        Args:
            path: where it was written.
            storage_options: fsspec options for URLs.

        Raises:
            FileNotFoundError: nothing at `path`.
            StoreMismatchError: not a gradient store, written by an older
                format, or never finalized (the fit that wrote it was
                interrupted).
            StoreCorruptError: the manifest is missing, or an array is missing
                or has another shape than was written.
        """
        import zarr.errors

        path = os.fspath(path)
        try:
            group = open_zarr_group(path, "r", storage_options)
        except zarr.errors.NodeNotFoundError as e:  # other errors propagate
            raise FileNotFoundError(f"No Zarr gradient store at {path!r}: {e}") from e
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMATS[GRADIENT_STORE]:
            raise StoreMismatchError(
                f"The Zarr group at {path!r} is not a pydvl-datainf gradient store "
                f"(format {attrs.get('format')!r})"
            )
        if int(attrs.get("format_version", 0)) < FORMAT_VERSION:
            raise StoreMismatchError(
                f"The gradient store at {path!r} was written in an older format "
                f"(version {attrs.get('format_version')}, without checksums); "
                f"fit again with overwrite=True to rewrite it."
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
        self._cleanup = None
        self._lock = threading.RLock()
        self._group = group
        self._arrays = None
        self._raw = None
        self._buffer = {k: [] for k in self.block_names}
        self._buffered = 0
        self._writer = None
        self._pending = []
        self._n = int(attrs["n"])
        self._sizes = [int(s) for s in attrs["block_sizes"]]
        self._finalized = True
        self._get_arrays()  # the manifest and the shapes
        if attrs.get("complete"):
            self._norm_arrays()
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
                manifest = read_manifest(group, self.path, _WHAT)
                self._arrays = [
                    open_checked_array(
                        group,
                        f"grads/{i}",
                        self.path,
                        shape=(self._n, d),
                        manifest=manifest,
                        what=_WHAT,
                    )
                    for i, d in enumerate(self._sizes)
                ]
            return self._arrays

    def _norm_arrays(self) -> List[Any]:
        group = self._get_group()
        manifest = read_manifest(group, self.path, _WHAT)
        return [
            open_checked_array(
                group,
                f"norms/{i}",
                self.path,
                shape=(self._n,),
                manifest=manifest,
                what=_WHAT,
            )
            for i in range(len(self.block_names))
        ]

    def read(self, start: int, stop: int) -> Dict[str, torch.Tensor]:
        assert self._dtype is not None
        stop = min(stop, self._n)
        start = min(start, stop)
        arrays = self._get_arrays()
        return {
            k: numpy_to_torch(
                read_checked(
                    a, f"grads/{i}", self.path, (slice(start, stop),), what=_WHAT
                ),
                self._dtype,
            )
            for i, (k, a) in enumerate(zip(self.block_names, arrays))
        }

    def verify(self, progress: bool = False) -> int:
        """Read every chunk of every array, checking that it exists and its
        checksum, after the checks of [open][pydvl_datainf.storage.zarr.ZarrGradientStore.open].

        Costs one full read of the store.

        Args:
            progress: show a progress bar.

        Returns:
            The number of chunks checked.

        Raises:
            StoreCorruptError: the first missing or damaged chunk, naming the
                array and the chunk.

        Example:
            ```python
            import torch
            from pydvl_datainf.storage import ZarrGradientStore

            store = ZarrGradientStore("grads.zarr", ["a", "b"], chunk_rows=4)
            store.append({"a": torch.randn(10, 3), "b": torch.randn(10, 2)})
            store.finalize()
            print(ZarrGradientStore.open("grads.zarr").verify())  # chunks read
            ```
        """
        from tqdm.auto import tqdm

        if not self._finalized:
            raise RuntimeError("Finalize the store before verifying it")
        named = [(f"grads/{i}", a) for i, a in enumerate(self._get_arrays())]
        if self.is_complete:
            named += [(f"norms/{i}", a) for i, a in enumerate(self._norm_arrays())]
        checked = 0
        for name, arr in tqdm(named, desc="Verifying", disable=not progress):
            checked += verify_array(arr, name, self.path, what=_WHAT)
        logger.info("Verified %d chunks of %s", checked, self.path)
        return checked

    def _raw_readers(self) -> Optional[List[RawChunkReader]]:
        """Readers of the gradient chunks straight from their files, if they apply."""
        with self._lock:
            if self._raw is None:
                readers = [
                    RawChunkReader.for_array(a, f"grads/{i}", self.path, what=_WHAT)
                    for i, a in enumerate(self._get_arrays())
                ]
                # all arrays read raw, or none
                self._raw = [r for r in readers if r is not None]
                if None in readers:
                    self._raw = []
            return self._raw or None

    def iter_chunks(
        self, rows: int, wanted: Optional[Iterable[int]] = None, buffers: int = 0
    ) -> Iterator[Tuple[int, int, Dict[str, torch.Tensor]]]:
        """Yield `(chunk_index, start_row, grads)` for chunks of exactly `rows` rows.

        With `buffers > 0`, `rows` equal to the store's chunk rows, and chunks
        stored raw on a local disk (no compressors), each chunk is read
        straight from its files into one of `buffers` sets of buffers used
        in rotation, checksums checked
        ([RawChunkReader][pydvl_datainf.storage.integrity.RawChunkReader]);
        otherwise as [GradientStore.iter_chunks][pydvl_datainf.storage.base.GradientStore.iter_chunks].
        """
        readers = (
            self._raw_readers()
            if buffers > 0 and rows == self._chunk_rows and self._finalized
            else None
        )
        if readers is None:
            yield from super().iter_chunks(rows, wanted, buffers)
            return
        assert self._dtype is not None
        ring = [[r.new_buffer() for r in readers] for _ in range(buffers)]
        for j, c in enumerate(self.wanted_chunks(rows, wanted)):
            k = min(rows, self._n - c * rows)
            data = {
                name: numpy_to_torch(r.read_into((c, 0), b)[:k], self._dtype)
                for name, r, b in zip(self.block_names, readers, ring[j % buffers])
            }
            yield c, c * rows, data

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
        assert self._chunk_rows is not None
        touched = [(int(c), 0) for c in np.unique(uniq // self._chunk_rows)]
        if len(uniq) and int(uniq[-1]) >= self._n:
            raise IndexError(f"Row {int(uniq[-1])} is out of range (n={self._n})")
        for i, (k, a) in enumerate(zip(self.block_names, self._get_arrays())):
            raw = read_checked(
                a,
                f"grads/{i}",
                self.path,
                (slice(int(uniq[0]), int(uniq[-1]) + 1),),
                read=partial(_orthogonal_rows, a, uniq),
                chunks=touched,
                what=_WHAT,
            )
            rows = numpy_to_torch(raw, self._dtype)
            back = torch.empty(len(idx), dtype=torch.long)
            back[torch.from_numpy(order)] = torch.from_numpy(inverse)
            out[k] = rows[back]
        return out

    def load_fit_state(self) -> FitState:
        """The [FitState][pydvl_datainf.storage.FitState] saved by `fit`.

        Raises:
            StoreMismatchError: the fit that wrote the store did not finish.
        """
        attrs = self.attrs
        if not attrs.get("complete"):
            raise StoreMismatchError(
                f"The gradient store at {self.path!r} is incomplete: the fit that "
                f"wrote it did not finish. Fit again with overwrite."
            )
        norms = {
            k: torch.from_numpy(
                np.asarray(
                    read_checked(
                        a, f"norms/{i}", self.path, (slice(0, self._n),), what=_WHAT
                    )
                )
            )
            for i, (k, a) in enumerate(zip(self.block_names, self._norm_arrays()))
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
            extra=dict(attrs.get("fit_extra") or {}),
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
                create_checked_array(
                    self._group,
                    f"grads/{i}",
                    shape=(0, d),
                    chunks=(self._chunk_rows, d),
                    dtype=numpy_dtype(self._dtype),
                    compressors=self._compressors,
                )
            )
        self._arrays = arrays
        self._group.attrs.update(
            {
                "block_sizes": self._sizes,
                "dtype": dtype_name(self._dtype),
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
                        f"Gradients of block {k!r} overflow {dtype_name(self._dtype)} "
                        f"(|g| > {torch.finfo(self._dtype).max:.4g}); store them in "
                        f"bfloat16 or float32 instead."
                    )
                self._buffer[k].append(torch_to_numpy(t, self._dtype))
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
            write_manifest(
                self._group, [f"grads/{i}" for i in range(len(self.block_names))]
            )
            self._group.attrs.update({"n": self._n, "finalized": True})
            super().finalize()
        logger.info(
            "Wrote %d gradient rows (%.3g GB, %s) to %s",
            self._n,
            self.nbytes / 1e9,
            dtype_name(self._dtype) if self._dtype else "?",
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
            arr = create_checked_array(
                group,
                f"norms/{i}",
                shape=s.shape,
                chunks=(max(1, min(len(s), 2**20)),),
                dtype=s.dtype,
            )
            arr[:] = s
        write_manifest(group, [f"norms/{i}" for i in range(len(self.block_names))])
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
                "fit_extra": dict(state.extra),
            }
        )
        group.attrs["complete"] = True

    # ------------------------------------------------------------ pickling
    def __getstate__(self) -> Dict[str, Any]:
        if not self._finalized:
            raise RuntimeError("A Zarr gradient store can only be pickled after fit")
        state = self.__dict__.copy()
        for k in ("_lock", "_group", "_arrays", "_raw", "_writer", "_pending"):
            state.pop(k, None)
        state["_cleanup"] = None  # a copy never owns the temporary directory
        state["_buffer"] = {k: [] for k in self.block_names}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._group = None
        self._arrays = None
        self._raw = None
        self._writer = None
        self._pending = []

    def close(self) -> None:
        """Stop the writer and, if the store owns a temporary directory, remove
        it (with the gradients). Safe to call more than once."""
        with self._lock:
            try:
                self._drain()
            finally:
                if self._cleanup is not None and self._cleanup.alive:
                    self._cleanup()
                    self._group, self._arrays = None, None

    @property
    def temporary_directory(self) -> Optional[str]:
        """The temporary directory the store owns and removes, if any."""
        if self._cleanup is None or not self._cleanup.alive:
            return None
        info = self._cleanup.peek()
        return None if info is None else str(info[2][0])

    def __repr__(self) -> str:
        dt = dtype_name(self._dtype) if self._dtype else "?"
        return f"ZarrGradientStore({self.path!r}, n={self._n}, dtype={dt})"
